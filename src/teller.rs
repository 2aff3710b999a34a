//! The bank's three units of work run through the retry helper, on the
//! front end the run asked for: blocking (r2d2 and libpq), or async
//! (`--async`: bb8, diesel-async and tokio-postgres, on a runtime this
//! thread blocks on for each call). The job and account creation speak to
//! a teller and never to a front end.

use diesel_tx_retry::{Applied, Committed, Retrier, TxError};
use uuid::Uuid;

use crate::bank::{self, Amount, BankError, Transfer};
use crate::db::asynch::AsyncPool;
use crate::db::PgPool;
use crate::models::Account;

/// Where the bank's units of work run.
pub enum Teller<'a> {
    /// On the blocking front end, with connections from `pool`.
    Blocking {
        /// The pool.
        pool: &'a PgPool,
        /// The helper.
        retrier: &'a Retrier,
    },
    /// On the async front end, with connections from `pool`, each call
    /// awaited on `runtime`.
    Async {
        /// The pool.
        pool: &'a AsyncPool,
        /// The helper.
        retrier: &'a Retrier,
        /// The runtime the calls run on.
        runtime: &'a tokio::runtime::Runtime,
    },
}

/// What a call through the teller returns.
pub type Done<T> = Result<Committed<Applied<T>>, TxError<BankError>>;

impl Teller<'_> {
    /// The helper the calls go through.
    pub fn retrier(&self) -> &Retrier {
        match self {
            Teller::Blocking { retrier, .. } | Teller::Async { retrier, .. } => retrier,
        }
    }

    /// Creates `rows`, drawn before the call (the batch is its own key), in
    /// inserts of at most `rows_per_insert` rows.
    pub fn create(&self, rows: &[Account], rows_per_insert: usize) -> Done<usize> {
        match *self {
            Teller::Blocking { pool, retrier } => {
                retrier
                    .build_transaction()
                    .run_idempotent(pool, rows, |conn, attempt| {
                        bank::create_batch(conn, attempt, rows_per_insert)
                    })
            }
            Teller::Async {
                pool,
                retrier,
                runtime,
            } => runtime.block_on(retrier.build_transaction().run_idempotent_async(
                pool,
                rows,
                async |conn, attempt| {
                    bank::asynch::create_batch(conn, attempt, rows_per_insert).await
                },
            )),
        }
    }

    /// Moves `amount` from `from` to `to` under the ledger key `key`, drawn
    /// before the call.
    pub fn transfer(&self, key: Uuid, from: Uuid, to: Uuid, amount: Amount) -> Done<Transfer> {
        match *self {
            Teller::Blocking { pool, retrier } => {
                retrier
                    .build_transaction()
                    .run_idempotent(pool, key, |conn, attempt| {
                        bank::transfer(conn, attempt, from, to, amount)
                    })
            }
            Teller::Async {
                pool,
                retrier,
                runtime,
            } => runtime.block_on(retrier.build_transaction().run_idempotent_async(
                pool,
                key,
                async |conn, attempt| bank::asynch::transfer(conn, attempt, from, to, amount).await,
            )),
        }
    }

    /// Deletes the accounts `ids`, chosen before the call.
    pub fn delete(&self, ids: &[Uuid]) -> Done<Vec<Uuid>> {
        match *self {
            Teller::Blocking { pool, retrier } => {
                retrier
                    .build_transaction()
                    .run_idempotent(pool, ids, |conn, attempt| {
                        Ok(bank::delete_accounts(
                            conn,
                            attempt.key(),
                            attempt.in_doubt(),
                        )?)
                    })
            }
            Teller::Async {
                pool,
                retrier,
                runtime,
            } => runtime.block_on(retrier.build_transaction().run_idempotent_async(
                pool,
                ids,
                async |conn, attempt| {
                    Ok(
                        bank::asynch::delete_accounts(conn, attempt.key(), attempt.in_doubt())
                            .await?,
                    )
                },
            )),
        }
    }
}
