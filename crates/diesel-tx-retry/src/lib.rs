//! Retrying transactions for Diesel on CockroachDB and PostgreSQL: the
//! counterpart of cockroach-go's `crdb.ExecuteTx` and
//! sqlalchemy-cockroachdb's `run_transaction`.
//!
//! What it promises:
//! - a unit of work runs in a SERIALIZABLE transaction (or READ COMMITTED,
//!   [`Isolation`]), again after each
//!   serialization failure (SQLSTATE 40001), within a bound on attempts and
//!   on time ([`RetryPolicy`]), with capped, jittered backoff, never
//!   sleeping inside a transaction;
//! - only the value of the attempt that committed is returned
//!   ([`Committed`]); every failure is one [`TxError`];
//! - a commit whose outcome is unknown (the connection lost during COMMIT,
//!   or 40003) is reported as [`TxError::AmbiguousCommit`], never retried
//!   behind the caller's back, unless the unit is declared idempotent
//!   ([`TxOptions::idempotent`]): then it is retried, the unit resolves the
//!   doubt by its key ([`Context`], "Commits in doubt" below), and the
//!   outcome says how ([`Committed::doubt`]);
//! - every statement of an attempt is bounded by the time left before the
//!   deadline (`SET LOCAL statement_timeout`, in the `BEGIN` message);
//! - on CockroachDB, its savepoint protocol (`SAVEPOINT cockroach_restart`),
//!   whose `RELEASE` is the commit; on PostgreSQL, and under READ COMMITTED
//!   everywhere, `BEGIN` ... `COMMIT`.
//!
//! Add it with one line (`r2d2` pools are a default feature):
//!
//! ```toml
//! [dependencies]
//! diesel-tx-retry = { git = "https://github.com/cockroachdb/example-app-rust-diesel" }
//! ```
//!
//! A transfer between two accounts, on a connection from an r2d2 pool:
//!
//! ```no_run
//! use diesel::prelude::*;
//! use diesel::r2d2::{ConnectionManager, Pool};
//! use diesel_tx_retry::{Retrier, RetryPolicy, Server, TxOptions};
//!
//! diesel::table! { accounts (id) { id -> Int8, balance -> Int8 } }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = Pool::new(ConnectionManager::<PgConnection>::new(std::env::var("DATABASE_URL")?))?;
//! let server = Server::detect(&mut *pool.get()?)?;
//! let retrier = Retrier::new(RetryPolicy::default(), server);
//! let done = retrier.run(&pool, TxOptions::default(), |conn| {
//!     diesel::update(accounts::table.find(1))
//!         .set(accounts::balance.eq(accounts::balance - 10))
//!         .execute(conn)?;
//!     diesel::update(accounts::table.find(2))
//!         .set(accounts::balance.eq(accounts::balance + 10))
//!         .execute(conn)
//! })?;
//! println!("moved 10 in {} attempt(s)", done.attempts);
//! # Ok(())
//! # }
//! ```
//!
//! `examples/transfer.rs` runs a whole transfer against `DATABASE_URL`.
//!
//! # The decision table
//!
//! When an attempt fails, one pure function, [`decide`], picks the next
//! [`Step`] from where the error came ([`Stage`]), what it means
//! ([`Class`], from the SQLSTATE by [`classify`], and for the SQLSTATEs
//! Diesel has no kind for, from the message by [`by_message`]: a deadlock
//! is a conflict, a drain or restart a lost connection), the server, the protocol,
//! the isolation level and the unit's options. This table is that function;
//! its unit tests check it row by row. "Savepoint" in it means the savepoint
//! protocol frames the transaction, which it does only under SERIALIZABLE
//! ([`framing`]); under READ COMMITTED read the rows for "otherwise":
//!
//! | stage      | class           | server, protocol          | next step |
//! |------------|-----------------|---------------------------|-----------|
//! | any (but a commit on CockroachDB, below) | definite, aborted | any | fail (at the commit, aborted: [`TxError::SwallowedError`]) |
//! | begin      | conflict        | any                       | restart |
//! | begin, statement | lost      | any                       | reconnect; fail if the connection is the caller's |
//! | begin, statement | other     | any                       | fail |
//! | statement  | conflict        | CockroachDB, savepoint    | rewind if the retry would not wait, else restart |
//! | statement  | conflict        | otherwise (READ COMMITTED included) | restart |
//! | release    | conflict        | CockroachDB               | rewind if the retry would not wait, else restart |
//! | release    | conflict        | PostgreSQL                | restart |
//! | release    | lost            | any                       | ambiguous; if idempotent: reconnect |
//! | release    | other           | PostgreSQL                | fail |
//! | release    | other           | CockroachDB               | ambiguous; if idempotent: restart |
//! | commit     | any             | CockroachDB, savepoint    | committed |
//! | commit     | conflict        | otherwise (READ COMMITTED included) | restart |
//! | commit     | lost, other     | otherwise (READ COMMITTED included) | ambiguous; if idempotent: reconnect (lost) or restart (other) |
//!
//! The steps: **rewind** is `ROLLBACK TO SAVEPOINT cockroach_restart` and an
//! immediate retry inside the same transaction, which keeps its place in line
//! (the savepoint protocol's one advantage); **restart** rolls the whole
//! transaction back, waits the backoff, and begins again; **reconnect** drops
//! the connection (the server rolls back whatever it had open), waits, and
//! retries on a fresh one; **ambiguous** reports [`TxError::AmbiguousCommit`];
//! **fail** rolls back and returns the error; **committed** returns the value.
//! Any retry first checks the budgets ([`RetryPolicy`]) and gives up with
//! [`TxError::GaveUp`] when one ran out.
//!
//! The rules behind the rows:
//! - The helper never sleeps inside a transaction: a transaction left open
//!   during the wait would keep blocking the very transactions it conflicted
//!   with. Only an immediate retry rewinds.
//! - On CockroachDB a successful `RELEASE SAVEPOINT cockroach_restart` *is*
//!   the commit; the `COMMIT` after it only readies the session, so its error
//!   changes nothing (cockroach-go ignores it too). An error *at* that
//!   RELEASE, other than a conflict or a refusal, leaves the outcome unknown.
//!   <https://www.cockroachlabs.com/docs/stable/advanced-client-side-transaction-retries>
//! - On PostgreSQL a RELEASE commits nothing, and rolling back to a savepoint
//!   keeps the transaction's snapshot, which cannot clear a real
//!   serialization failure: there every conflict restarts. These rules follow
//!   the server, not the protocol, so that tests may force the savepoint
//!   protocol on PostgreSQL.
//! - A lost connection before the commit was sent is safe to retry: the
//!   server rolls back a transaction whose connection died. The savepoint
//!   protocol sends `RELEASE SAVEPOINT cockroach_restart; COMMIT` as one
//!   message (one round trip), so a connection lost there may have taken the
//!   COMMIT with it: ambiguous on either server. Any other error of that
//!   message is the RELEASE's on CockroachDB, whose docs do not say what a
//!   failed RELEASE leaves the session in ([`failed_at_savepoint_commit`]).
//! - A unit that catches a database error and returns `Ok` leaves its
//!   transaction aborted, and PostgreSQL answers the `COMMIT` of an aborted
//!   transaction with the tag `ROLLBACK` and no error. So the restart
//!   protocol commits with `SELECT 1; COMMIT` (one message): in an aborted
//!   transaction the `SELECT` fails with 25P02 and the `COMMIT` never runs;
//!   the savepoint protocol's `RELEASE` does the same. The call ends with
//!   [`TxError::SwallowedError`], never with the unit's value.
//! - A rewind sends the statement bound again, for the time left:
//!   CockroachDB's docs say `ROLLBACK TO SAVEPOINT` rolls back what `SET
//!   LOCAL` set.
//! - A panic in the unit rolls back, returns the connection idle, and goes on.
//!
//! After a commit in doubt, until the unit resolves it (below), two rows
//! change and the rest hold ([`Situation::in_doubt`]): a database error
//! before the commit is retried within the budgets (the retry may have
//! waited on the earlier attempt's locks until its statement bound), and
//! every other failure, a spent budget included, is **ambiguous**, never
//! "failed" or "gave up": the earlier attempt may have committed.
//!
//! # Commits in doubt
//!
//! CockroachDB's docs allow retrying a transaction whose commit is in doubt
//! (a lost connection, 40003) only if it is idempotent
//! (<https://www.cockroachlabs.com/docs/stable/transaction-retry-error-reference#result_is_ambiguous>).
//! A unit makes itself so with a key it draws *before* the call (an id, an
//! idempotency key) and writes in its transaction. Run it with
//! [`Retrier::run_with`] and [`TxOptions::idempotent`]: after a commit in
//! doubt the helper retries it on a fresh connection, and the retry, told
//! by [`Context::in_doubt`], looks for its key and says what it found
//! ([`Context::applied_earlier`], [`Context::not_applied_earlier`]); the
//! call's [`Committed::doubt`] reports the [`Resolution`].
//!
//! The rule that makes this safe is the key's uniqueness, not a read after
//! the fact. The first attempt's transaction may still be open on the server
//! when the retry runs (after a partition the old session holds its locks
//! until the server ends it): on PostgreSQL the retry's insert of the same
//! key waits for it, then either proceeds (it did not commit) or meets the
//! key (it did; under SERIALIZABLE, a serialization failure, retried, after
//! which the key is seen). On CockroachDB the retry's write meets the first
//! attempt's write intent and waits for that transaction or pushes it
//! (aborting it if its coordinator is gone), to the same effect
//! (<https://www.cockroachlabs.com/docs/stable/architecture/transaction-layer#write-intents>).
//! On PostgreSQL a plain read cannot decide it: it does not wait for an
//! open transaction, and sees the key absent while the first attempt may
//! still commit. (On CockroachDB "non-locking reads wait for conflicting
//! locks to be released", unlike on PostgreSQL, says its `lock_timeout`
//! docs (<https://www.cockroachlabs.com/docs/stable/session-vars#lock-timeout>),
//! but the rule holds on both servers only through the write.)
//!
//! # READ COMMITTED
//!
//! [`Retrier::with_isolation`] or [`TxOptions::isolation`] asks for it;
//! SERIALIZABLE stays the default, as CockroachDB advises for a workload that
//! runs well under it (<https://www.cockroachlabs.com/docs/stable/read-committed>).
//! The rules the helper follows there, and where they come from:
//! - CockroachDB retries each statement of a READ COMMITTED transaction by
//!   itself (up to the session's `max_retries_for_read_committed`), yet a
//!   40001 still reaches the client: a deadlock broken by aborting one
//!   transaction, those statement retries exhausted ("read committed retry
//!   limit exceeded"), a statement whose results had already streamed
//!   (<https://www.cockroachlabs.com/docs/stable/transaction-retry-error-reference>).
//!   The helper restarts the transaction after the backoff, as under
//!   SERIALIZABLE.
//! - The transaction is framed with `BEGIN ISOLATION LEVEL READ COMMITTED`
//!   ... `COMMIT`, never the savepoint protocol: under READ COMMITTED a
//!   rollback to a savepoint cannot recover from a retry error yet; that
//!   is cockroachdb/cockroach#104233, open ("support savepoint rollback
//!   recovery from retry error under RC"). So the `COMMIT` is the commit on
//!   CockroachDB too.
//! - A read that a later write depends on must lock what it reads
//!   (`SELECT ... FOR UPDATE`, rows in key order so that two transactions
//!   queue instead of deadlocking), as CockroachDB's READ COMMITTED page
//!   advises; otherwise two transfers that read the same balance both write
//!   their own result and one update is lost. The unit must do this; the
//!   helper cannot.
//! - CockroachDB runs READ COMMITTED as SERIALIZABLE without a word when
//!   `sql.txn.read_committed_isolation.enabled` is off (and, in v24.1 and
//!   v24.2, without an enterprise licence). The first READ COMMITTED
//!   transaction of a helper asks `SHOW transaction_isolation` (one round
//!   trip, once) and, if the answer is stronger, logs one warning saying how
//!   to enable it; the run goes on at SERIALIZABLE.
//!
//! # Watching it
//!
//! An [`Observer`] given to [`Retrier::with_observer`] is told of every
//! attempt ([`Attempt`]): how it ended, why, and the backoff that follows.
//! Each attempt is also a `tracing` span (`tx_attempt`) with debug events.
//!
//! # Features
//! - `r2d2` (default): [`Retrier::run`] on an r2d2 pool, which replaces a
//!   connection lost before the commit, or on a [`Held`] connection from
//!   one, which a worker keeps between calls.
//! - `testing`: [`testing::race`] and [`testing::check`], which force a
//!   genuine conflict between two units of yours; and, for the helper's own
//!   tests, `Retrier::with_protocol`, `with_clock` and `with_jitter`.
#![deny(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]
#![warn(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

// Public only with `testing`; the helper uses it either way.
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
mod clock;
#[cfg(feature = "r2d2")]
mod connections;
mod decide;
mod doubt;
mod error;
mod observe;
mod policy;
mod retrier;
mod server;
mod session;
#[cfg(all(feature = "testing", feature = "r2d2"))]
pub mod testing;

#[cfg(feature = "testing")]
pub use clock::{Clock, SystemClock};
#[cfg(feature = "r2d2")]
pub use connections::{Connections, Held};
pub use decide::{
    by_message, classify, commit_in_doubt, decide, failed_at_savepoint_commit, framing, Class,
    Situation, Stage, Step,
};
pub use doubt::{Context, Resolution};
pub use error::{AsDieselError, Budget, Committed, TxError};
pub use observe::{Attempt, Observer, Outcome};
pub use policy::{Backoff, Isolation, RetryPolicy, TxOptions};
pub use retrier::Retrier;
pub use server::{Protocol, Server};
