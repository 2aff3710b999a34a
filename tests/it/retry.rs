//! The retry helper on any server: what needs no fault injection.

use std::time::Duration;

use bank::bank::{insert_accounts, transfer, Amount, BankError};
use bank::models::Account;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel_tx_retry::{Context, Protocol, Retrier, RetryPolicy, Server, TxError, TxOptions};

use crate::helpers::*;

fn retrier(db: &TestDb, protocol: Protocol) -> Retrier {
    Retrier::new(RetryPolicy::default(), db.server).with_protocol(protocol)
}

fn a_non_retryable_error_returns_at_once_untouched(protocol: Protocol) {
    let db = TestDb::migrated();
    let id = uuid::Uuid::new_v4();
    db.exec(&format!(
        "INSERT INTO accounts (id, balance) VALUES ('{id}', 10)"
    ));
    let mut runs = 0;
    let result = retrier(&db, protocol).run(&db.pool(1), TxOptions::default(), |conn| {
        runs += 1;
        diesel::sql_query(format!(
            "UPDATE accounts SET balance = -1 WHERE id = '{id}'"
        ))
        .execute(conn)
    });
    assert_eq!(
        failed_kind(&result),
        Some(DatabaseErrorKind::CheckViolation),
        "{result:?}"
    );
    assert_eq!(runs, 1);
    assert_eq!(db.accounts(), vec![(id, 10)]);
}

for_each_protocol!(a_non_retryable_error_returns_at_once_untouched);

#[test]
fn calling_the_helper_inside_a_transaction_is_an_error() {
    let db = TestDb::migrated();
    let mut conn = db.conn();
    let retrier = retrier(&db, db.server.retry_protocol());
    let nested = conn.transaction(|conn| {
        let inner = retrier.run_on(conn, TxOptions::default(), |c| {
            diesel::sql_query("DELETE FROM accounts").execute(c)
        });
        Ok::<_, DieselError>(inner)
    });
    let inner = nested.unwrap();
    assert!(
        matches!(inner, Err(TxError::AlreadyInTransaction)),
        "{inner:?}"
    );
    assert!(inner
        .unwrap_err()
        .to_string()
        .contains("already inside a transaction"));
}

#[test]
fn a_pool_that_cannot_connect_is_reported_with_its_cause_once() {
    let (_reserved, port) = refusing_port();
    let manager =
        ConnectionManager::<PgConnection>::new(format!("postgresql://app@127.0.0.1:{port}/bank"));
    let pool = Pool::builder()
        .connection_timeout(Duration::from_millis(300))
        .build_unchecked(manager);
    let retrier = Retrier::new(RetryPolicy::default(), Server::PostgreSql);
    let result = retrier.run(&pool, TxOptions::default(), |conn| {
        diesel::sql_query("SELECT 1").execute(conn)
    });
    let Err(err @ TxError::NoConnection(_)) = result else {
        panic!("expected a pool error, got {result:?}");
    };
    let line = format!("{:#}", anyhow::Error::new(err));
    assert!(
        line.starts_with(
            "could not get a connection from the pool: timed out waiting for connection"
        ),
        "{line}"
    );
    assert_eq!(
        line.matches("timed out waiting for connection").count(),
        1,
        "{line}"
    );
}

#[test]
fn a_fixed_amount_must_be_at_least_one() {
    let db = TestDb::migrated();
    let [from, to] = [uuid::Uuid::new_v4(), uuid::Uuid::new_v4()];
    let rows = [from, to].map(|id| Account { id, balance: 10 });
    insert_accounts(&mut db.conn(), &rows, 2).unwrap();
    for amount in [0, -5, i64::MIN] {
        let result = transfer(
            &mut db.conn(),
            uuid::Uuid::new_v4(),
            from,
            to,
            Amount::Exactly(amount),
            &Context::new(1, false),
        );
        assert!(
            matches!(result, Err(BankError::NotPositive(a)) if a == amount),
            "{amount}: {result:?}"
        );
    }
    assert_eq!(
        db.accounts().iter().map(|(_, b)| *b).collect::<Vec<_>>(),
        [10, 10]
    );
    let done = transfer(
        &mut db.conn(),
        uuid::Uuid::new_v4(),
        from,
        to,
        Amount::Exactly(1),
        &Context::new(1, false),
    )
    .unwrap();
    assert_eq!((done.from_after.balance, done.to_after.balance), (9, 11));
}

#[test]
fn a_failed_migration_keeps_its_cause_as_the_source() {
    let db = TestDb::empty();
    // A bookkeeping table the harness cannot use.
    db.exec("CREATE TABLE __diesel_schema_migrations (nonsense INT8)");
    let err = bank::db::run_migrations(&mut db.conn()).unwrap_err();
    assert_eq!(err.to_string(), "migration failed");
    let source = std::error::Error::source(&err).expect("a source");
    assert!(source.to_string().contains("version"), "{source}");
}
