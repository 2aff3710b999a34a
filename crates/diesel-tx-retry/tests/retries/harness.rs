//! The conflict harness on real units: idempotent ones race too, each
//! with its own context, and a unit that never reaches the meeting point
//! ends the race at once with its own panic message.

use std::panic::{self, AssertUnwindSafe};
use std::time::Duration;

use diesel::prelude::*;
use diesel::result::Error as DieselError;
use diesel_tx_retry::testing::{self, Meet};
use diesel_tx_retry::{Applied, Committed, Protocol, TxError};
use testbed::Database;

use crate::fixture::*;

/// A counter, read then written: two units that meet in between conflict.
fn counter() -> Database {
    let db = Database::create();
    db.exec("CREATE TABLE counter (n INT8 NOT NULL); INSERT INTO counter VALUES (0)");
    db
}

fn bump(conn: &mut PgConnection, meet: &Meet<'_>) -> QueryResult<i64> {
    let n = bigint(conn, "(SELECT n FROM counter)")?;
    meet.here();
    diesel::sql_query(format!("UPDATE counter SET n = {}", n + 1)).execute(conn)?;
    Ok(n + 1)
}

#[test]
fn an_idempotent_unit_races_a_plain_one_each_with_its_context() {
    let db = counter();
    let pool = db.pool(2);
    let (retrier, _) = on_postgres(Protocol::Restart);
    let plain = |meet: &Meet<'_>| -> Result<Committed<i64>, TxError<DieselError>> {
        retrier
            .build_transaction()
            .run(&pool, |conn| bump(conn, meet))
    };
    let keyed = |meet: &Meet<'_>| {
        retrier
            .build_transaction()
            .run_idempotent(&pool, 42_i64, |conn, attempt| {
                assert_eq!(*attempt.key(), 42, "the key travels with every attempt");
                bump(conn, meet).map(Applied::Now)
            })
    };
    let (a, b) = testing::race(Duration::from_secs(30), plain, keyed);
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.retries() + b.retries(), 1, "{a:?} {b:?}");
    assert_eq!(
        bigint(&mut db.conn(), "(SELECT n FROM counter)").unwrap(),
        2
    );
    let mut values = [*a.value(), *b.value().value()];
    values.sort();
    assert_eq!(values, [1, 2]);
}

#[test]
fn a_unit_that_fails_before_the_meeting_point_ends_the_race_with_its_own_message() {
    let db = counter();
    let pool = db.pool(2);
    let (retrier, _) = on_postgres(Protocol::Restart);
    // A minute's bound: had the other side waited it out, it would say so
    // instead of what it says.
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
        testing::race(
            Duration::from_secs(60),
            |_: &Meet<'_>| {
                retrier.transaction(&pool, |_| -> QueryResult<()> {
                    panic!("the unit's own bug")
                })
            },
            |meet: &Meet<'_>| retrier.transaction(&pool, |conn| bump(conn, meet)),
        )
    }));
    let payload = outcome.unwrap_err();
    let message = payload
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        message,
        "unit a panicked: the unit's own bug; unit b panicked: the other unit ended without \
         reaching the meeting point"
    );
    // Both transactions rolled back; the pool has its connections idle.
    assert_eq!(
        bigint(&mut db.conn(), "(SELECT n FROM counter)").unwrap(),
        0
    );
}
