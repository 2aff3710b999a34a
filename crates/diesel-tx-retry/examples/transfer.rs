//! A transfer between two accounts through the helper, on its own two tables
//! (created if missing) in the database `DATABASE_URL` names:
//!
//!     DATABASE_URL=postgresql://root@127.0.0.1:26257/defaultdb?sslmode=disable \
//!         cargo run -p diesel-tx-retry --example transfer
//!
//! It opens two accounts in one retried transaction, moves 10 from one to
//! the other in an idempotent one (the transfer's id, drawn before the call,
//! is its key: after a commit in doubt the unit finds out whether it is
//! there), prints what the committed attempt returned, and removes what it
//! wrote.

use std::process::ExitCode;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel_tx_retry::{Applied, Retrier, TxError};
use uuid::Uuid;

diesel::table! {
    demo_accounts (id) {
        id -> Uuid,
        balance -> Int8,
    }
}

diesel::table! {
    demo_transfers (id) {
        id -> Uuid,
        amount -> Int8,
    }
}

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS demo_accounts (id UUID PRIMARY KEY, balance INT8 NOT NULL CHECK (balance >= 0)); \
     CREATE TABLE IF NOT EXISTS demo_transfers (id UUID PRIMARY KEY, amount INT8 NOT NULL);";

/// Moves `amount` from `from` to `to` under the key `id`: nothing if the
/// transfer `id` is already there (a commit in doubt that did commit).
fn transfer(
    conn: &mut PgConnection,
    id: Uuid,
    in_doubt: bool,
    [from, to]: [Uuid; 2],
    amount: i64,
) -> QueryResult<Applied<()>> {
    if in_doubt && demo_transfers::table.find(id).execute(conn)? == 1 {
        return Ok(Applied::Earlier(()));
    }
    diesel::insert_into(demo_transfers::table)
        .values((demo_transfers::id.eq(id), demo_transfers::amount.eq(amount)))
        .execute(conn)?;
    diesel::update(demo_accounts::table.find(from))
        .set(demo_accounts::balance.eq(demo_accounts::balance - amount))
        .execute(conn)?;
    diesel::update(demo_accounts::table.find(to))
        .set(demo_accounts::balance.eq(demo_accounts::balance + amount))
        .execute(conn)?;
    Ok(Applied::Now(()))
}

fn run() -> Result<(), String> {
    let url = std::env::var("DATABASE_URL")
        .map_err(|_| "set DATABASE_URL to the database to run the example in".to_owned())?;
    let pool = Pool::builder()
        .max_size(2)
        .build(ConnectionManager::<PgConnection>::new(url))
        .map_err(|err| format!("could not connect: {err}"))?;
    pool.get()
        .map_err(|err| format!("could not connect: {err}"))?
        .batch_execute(SCHEMA)
        .map_err(|err| format!("could not create the example's tables: {err}"))?;
    let retrier = Retrier::default();
    let show = |err: TxError<diesel::result::Error>| err.to_string();

    let accounts = [Uuid::new_v4(), Uuid::new_v4()];
    retrier
        .transaction(&pool, |conn| {
            diesel::insert_into(demo_accounts::table)
                .values(&[
                    (
                        demo_accounts::id.eq(accounts[0]),
                        demo_accounts::balance.eq(100),
                    ),
                    (
                        demo_accounts::id.eq(accounts[1]),
                        demo_accounts::balance.eq(0),
                    ),
                ])
                .execute(conn)
        })
        .map_err(show)?;

    let id = Uuid::new_v4();
    let moved = retrier
        .build_transaction()
        .run_idempotent(&pool, id, |conn, attempt| {
            transfer(conn, *attempt.key(), attempt.in_doubt(), accounts, 10)
        })
        .map_err(show)?;
    let balances: Vec<(Uuid, i64)> = demo_accounts::table
        .filter(demo_accounts::id.eq_any(accounts))
        .load(&mut pool.get().map_err(|err| err.to_string())?)
        .map_err(|err| err.to_string())?;
    println!(
        "transfer {id}: {} in {} attempt(s)",
        if moved.value().was_earlier() {
            "found committed after a commit in doubt"
        } else {
            "moved 10"
        },
        moved.attempts()
    );
    for (account, balance) in balances {
        println!("  account {account} holds {balance}");
    }

    retrier
        .transaction(&pool, |conn| {
            diesel::delete(demo_transfers::table.find(id)).execute(conn)?;
            diesel::delete(demo_accounts::table.filter(demo_accounts::id.eq_any(accounts)))
                .execute(conn)
        })
        .map_err(show)?;
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(line) => {
            eprintln!("transfer: {line}");
            ExitCode::FAILURE
        }
    }
}
