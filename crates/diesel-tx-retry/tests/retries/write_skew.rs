//! Real conflicts, deterministically, with no PL/pgSQL: write skew forced
//! by the crate's harness (`diesel_tx_retry::testing`), as cockroach-go's
//! `ExecuteTxGenericTest` does. Two units each read both accounts of a
//! pair, meet at the barrier on their first attempt (so both have read
//! before either writes), then each withdraws from its own account if the
//! pair stays covered. Run side by side without SERIALIZABLE, both would
//! withdraw.

use std::time::Duration;

use diesel::prelude::*;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel::sql_types::BigInt;
use diesel_tx_retry::testing::{self, Meet};
use diesel_tx_retry::{Committed, Protocol, Server, TxError};
use testbed::Database;

use crate::fixture::*;

const OPENING: i64 = 100;
const WITHDRAWAL: i64 = 100;
/// What the pair must keep in total: one withdrawal fits, two do not.
const FLOOR: i64 = 100;
const BOUND: Duration = Duration::from_secs(30);

/// A database with a pair of accounts (1 and 2), each holding the opening
/// balance.
fn pair() -> Database {
    let db = Database::create();
    db.exec(&format!(
        "CREATE TABLE pair (id INT8 PRIMARY KEY, balance INT8 NOT NULL);
         INSERT INTO pair VALUES (1, {OPENING}), (2, {OPENING})"
    ));
    db
}

fn total(db: &Database) -> i64 {
    bigint(&mut db.conn(), "(SELECT sum(balance)::INT8 FROM pair)").unwrap()
}

/// Withdraws from `own` if the pair stays at or above the floor; returns
/// whether it did. It reads what its write depends on, then meets the
/// other unit (on the first attempt), then writes.
fn withdraw_if_covered(conn: &mut PgConnection, own: i64, meet: &Meet<'_>) -> QueryResult<bool> {
    let sum = bigint(conn, "(SELECT sum(balance)::INT8 FROM pair)")?;
    meet.here();
    if sum - WITHDRAWAL < FLOOR {
        return Ok(false);
    }
    diesel::sql_query("UPDATE pair SET balance = balance - $1 WHERE id = $2")
        .bind::<BigInt, _>(WITHDRAWAL)
        .bind::<BigInt, _>(own)
        .execute(conn)?;
    Ok(true)
}

type Outcome = Result<Committed<bool>, TxError<DieselError>>;

fn without_retries_one_unit_meets_a_genuine_40001(protocol: Protocol) {
    let db = pair();
    let pool = db.pool(2);
    let (retrier, _) = retrier(Server::PostgreSql, protocol, 1);
    let side = |own: i64| {
        let (retrier, pool) = (&retrier, &pool);
        move |meet: &Meet<'_>| -> Outcome {
            retrier
                .build_transaction()
                .run(pool, |conn| withdraw_if_covered(conn, own, meet))
        }
    };
    let (a, b) = testing::race(BOUND, side(1), side(2));
    let outcomes = [a, b];
    let conflicts = outcomes
        .iter()
        .filter(|outcome| {
            matches!(
                outcome,
                Err(TxError::GaveUp {
                    attempts: 1,
                    last: DieselError::DatabaseError(DatabaseErrorKind::SerializationFailure, _),
                    ..
                })
            )
        })
        .count();
    assert_eq!(conflicts, 1, "{outcomes:?}");
    assert!(
        outcomes.iter().any(|o| matches!(o, Ok(c) if *c.value())),
        "{outcomes:?}"
    );
    assert_eq!(total(&db), 2 * OPENING - WITHDRAWAL);
}

fn with_retries_both_commit_and_the_skew_is_prevented(protocol: Protocol) {
    let db = pair();
    let pool = db.pool(2);
    let (retrier, _) = retrier(Server::PostgreSql, protocol, 5);
    let side = |own: i64| {
        let (retrier, pool) = (&retrier, &pool);
        move |meet: &Meet<'_>| -> Outcome {
            retrier
                .build_transaction()
                .run(pool, |conn| withdraw_if_covered(conn, own, meet))
        }
    };
    // The harness checks that both committed and at least one retried; the
    // invariant is the pair staying covered.
    let committed = testing::check(BOUND, side(1), side(2), || total(&db) >= FLOOR)
        .unwrap_or_else(|err| panic!("{err}"));
    let withdrawals = committed.iter().filter(|c| *c.value()).count();
    assert_eq!(withdrawals, 1, "exactly one withdrawal: {committed:?}");
    assert_eq!(
        total(&db),
        2 * OPENING - WITHDRAWAL,
        "the pair stays covered"
    );
}

#[test]
fn the_harness_says_so_when_the_units_never_conflict() {
    // Two units that read nothing their writes depend on do not conflict:
    // the harness must not call that a pass.
    let db = pair();
    let pool = db.pool(2);
    let (retrier, _) = on_postgres(Protocol::Restart);
    let deposit = |own: i64| {
        let (retrier, pool) = (&retrier, &pool);
        move |meet: &Meet<'_>| -> Outcome {
            retrier.build_transaction().run(pool, |conn| {
                meet.here();
                diesel::sql_query("UPDATE pair SET balance = balance + 1 WHERE id = $1")
                    .bind::<BigInt, _>(own)
                    .execute(conn)
                    .map(|n| n == 1)
            })
        }
    };
    let err = testing::check(BOUND, deposit(1), deposit(2), || true).unwrap_err();
    assert!(err.starts_with("neither unit retried"), "{err}");
}

for_each_protocol!(
    without_retries_one_unit_meets_a_genuine_40001,
    with_retries_both_commit_and_the_skew_is_prevented,
);
