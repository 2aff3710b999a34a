//! The bank's transfer through the helper, against the `accounts` table of
//! the database `DATABASE_URL` names (create it with the repository's
//! migrations or `dbinit.sql`):
//!
//!     DATABASE_URL=postgresql://root@127.0.0.1:26257/defaultdb?sslmode=disable \
//!         cargo run -p diesel-tx-retry --example transfer
//!
//! It opens two accounts, moves 10 from one to the other in a retried
//! transaction, prints what the committed attempt returned, and removes the
//! two accounts again (in a retried transaction too).

use std::process::ExitCode;

use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel::sql_types::{BigInt, Text};
use diesel_tx_retry::{Retrier, RetryPolicy, Server, TxError, TxOptions};

#[derive(Debug, QueryableByName)]
struct Row {
    #[diesel(sql_type = Text)]
    id: String,
    #[diesel(sql_type = BigInt)]
    balance: i64,
}

/// Moves `amount` from `from` to `to` if `from` holds enough; returns both
/// rows as they are after the move.
fn transfer(conn: &mut PgConnection, from: &str, to: &str, amount: i64) -> QueryResult<Vec<Row>> {
    diesel::sql_query(
        "UPDATE accounts SET balance = balance + CASE WHEN id = CAST($1 AS UUID) THEN -$3 ELSE $3 END \
         WHERE id IN (CAST($1 AS UUID), CAST($2 AS UUID)) \
         RETURNING CAST(id AS TEXT) AS id, balance",
    )
    .bind::<Text, _>(from)
    .bind::<Text, _>(to)
    .bind::<BigInt, _>(amount)
    .load(conn)
}

fn run() -> Result<(), String> {
    let url = std::env::var("DATABASE_URL")
        .map_err(|_| "set DATABASE_URL to the database that holds the accounts table".to_owned())?;
    let pool = Pool::builder()
        .max_size(1)
        .build(ConnectionManager::<PgConnection>::new(url))
        .map_err(|err| format!("could not connect: {err}"))?;
    let mut conn = pool
        .get()
        .map_err(|err| format!("could not connect: {err}"))?;
    let server =
        Server::detect(&mut conn).map_err(|err| format!("asking the server what it is: {err}"))?;
    drop(conn);
    let retrier = Retrier::new(RetryPolicy::default(), server);
    let show = |err: TxError<diesel::result::Error>| err.to_string();

    let opened = retrier
        .run(&pool, TxOptions::default(), |conn| {
            diesel::sql_query(
                "INSERT INTO accounts (id, balance) VALUES (gen_random_uuid(), 100), (gen_random_uuid(), 0) \
                 RETURNING CAST(id AS TEXT) AS id, balance",
            )
            .load::<Row>(conn)
        })
        .map_err(show)?;
    let [from, to] = [&opened.value[0].id, &opened.value[1].id];
    let moved = retrier
        .run(&pool, TxOptions::default(), |conn| {
            transfer(conn, from, to, 10)
        })
        .map_err(show)?;
    println!("moved 10 in {} attempt(s):", moved.attempts);
    for row in &moved.value {
        println!("  account {} now holds {}", row.id, row.balance);
    }
    retrier
        .run(&pool, TxOptions::default(), |conn| {
            diesel::sql_query(
                "DELETE FROM accounts WHERE id IN (CAST($1 AS UUID), CAST($2 AS UUID))",
            )
            .bind::<Text, _>(from)
            .bind::<Text, _>(to)
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
