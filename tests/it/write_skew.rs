//! Real conflicts, deterministically, on any server and with no PL/pgSQL:
//! write skew forced by the crate's harness (`diesel_tx_retry::testing`),
//! as cockroach-go's `ExecuteTxGenericTest` does. Two units each read both accounts of a pair,
//! meet at the barrier on their first attempt (so both have read before
//! either writes), then each withdraws from its own account if the pair
//! stays covered. Run side by side without SERIALIZABLE, both would withdraw.

use bank::bank::insert_accounts;
use bank::models::Account;
use bank::schema::accounts;
use diesel::prelude::*;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel_tx_retry::testing::{self, Meet};
use diesel_tx_retry::{Protocol, Retrier, RetryPolicy, TxError, TxOptions};
use uuid::Uuid;

use crate::helpers::*;

const OPENING: i64 = 100;
const WITHDRAWAL: i64 = 100;
/// What the pair must keep in total: one withdrawal fits, two do not.
const FLOOR: i64 = 100;

/// Withdraws from `own` if the pair stays at or above the floor; returns
/// whether it did. It reads what its write depends on, then meets the
/// other unit (on the first attempt), then writes.
fn withdraw_if_covered(
    conn: &mut PgConnection,
    pair: [Uuid; 2],
    own: Uuid,
    meet: &Meet<'_>,
) -> QueryResult<bool> {
    let balances: Vec<i64> = accounts::table
        .filter(accounts::id.eq_any(pair))
        .select(accounts::balance)
        .load(conn)?;
    meet.here();
    if balances.iter().sum::<i64>() - WITHDRAWAL < FLOOR {
        return Ok(false);
    }
    diesel::update(accounts::table.find(own))
        .set(accounts::balance.eq(accounts::balance - WITHDRAWAL))
        .execute(conn)?;
    Ok(true)
}

/// A fresh pair of accounts, each holding the opening balance.
fn pair(db: &TestDb) -> [Uuid; 2] {
    let pair = [Uuid::new_v4(), Uuid::new_v4()];
    let rows = pair.map(|id| Account {
        id,
        balance: OPENING,
    });
    insert_accounts(&mut db.conn(), &rows, 2).unwrap();
    pair
}

fn total(db: &TestDb) -> i64 {
    db.accounts().iter().map(|(_, balance)| balance).sum()
}

fn retrier(db: &TestDb, protocol: Protocol, max_attempts: u32) -> Retrier {
    Retrier::new(
        RetryPolicy {
            max_attempts,
            ..RetryPolicy::default()
        },
        db.server,
    )
    .with_protocol(protocol)
}

fn without_retries_one_unit_meets_a_genuine_40001(protocol: Protocol) {
    let db = TestDb::migrated();
    let [a, b] = pair(&db);
    let outcomes = testing::race(
        &retrier(&db, protocol, 1),
        &db.pool(2),
        TxOptions::default(),
        |conn, meet| withdraw_if_covered(conn, [a, b], a, meet),
        |conn, meet| withdraw_if_covered(conn, [a, b], b, meet),
    );
    eprintln!(
        "write skew without retries: {outcomes:?}; the pair holds {}",
        total(&db)
    );
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
        outcomes.iter().any(|o| matches!(o, Ok(c) if c.value)),
        "{outcomes:?}"
    );
    assert_eq!(total(&db), 2 * OPENING - WITHDRAWAL);
}

fn with_retries_both_commit_and_the_skew_is_prevented(protocol: Protocol) {
    let db = TestDb::migrated();
    let [a, b] = pair(&db);
    // The harness checks that both committed and at least one retried;
    // the invariant is the pair staying covered.
    let committed = testing::check(
        &retrier(&db, protocol, 5),
        &db.pool(2),
        TxOptions::default(),
        |conn, meet| withdraw_if_covered(conn, [a, b], a, meet),
        |conn, meet| withdraw_if_covered(conn, [a, b], b, meet),
        |_| total(&db) >= FLOOR,
    )
    .unwrap_or_else(|err| panic!("{err}"));
    eprintln!(
        "write skew with retries: {committed:?}; the pair holds {}",
        total(&db)
    );
    let withdrawals = committed.iter().filter(|c| c.value).count();
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
    let db = TestDb::migrated();
    let [a, b] = pair(&db);
    let deposit = |own: Uuid| {
        move |conn: &mut PgConnection, meet: &Meet<'_>| -> QueryResult<usize> {
            meet.here();
            diesel::update(accounts::table.find(own))
                .set(accounts::balance.eq(accounts::balance + 1))
                .execute(conn)
        }
    };
    let err = testing::check(
        &retrier(&db, Protocol::Restart, 5),
        &db.pool(2),
        TxOptions::default(),
        deposit(a),
        deposit(b),
        |_| true,
    )
    .unwrap_err();
    assert!(err.starts_with("neither unit retried"), "{err}");
}

for_each_protocol!(
    without_retries_one_unit_meets_a_genuine_40001,
    with_retries_both_commit_and_the_skew_is_prevented,
);
