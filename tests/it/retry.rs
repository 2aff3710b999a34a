//! The bank's data functions and migrations where they fail without a
//! fault: what the retry crate's own tests do not cover.

use bank::bank::{insert_accounts, transfer, Amount, BankError, Transfer};
use bank::models::Account;
use diesel_tx_retry::{Applied, Retrier, TxError};
use uuid::Uuid;

use crate::helpers::*;

/// A transfer on its own, through the helper on one connection.
fn transfer_once(db: &TestDb, from: Uuid, to: Uuid, amount: i64) -> Result<Transfer, BankError> {
    Retrier::default()
        .for_server(db.server)
        .idempotent_transaction(&mut db.conn(), Uuid::new_v4(), |conn, attempt| {
            transfer(conn, attempt, from, to, Amount::Exactly(amount))
        })
        .map(Applied::into_inner)
        .map_err(|err| match err {
            TxError::Failed(err) => err,
            other => panic!("{amount}: not the unit's own error: {other}"),
        })
}

#[test]
fn a_fixed_amount_must_be_at_least_one() {
    let db = TestDb::migrated();
    let [from, to] = [Uuid::new_v4(), Uuid::new_v4()];
    let rows = [from, to].map(|id| Account { id, balance: 10 });
    insert_accounts(&mut db.conn(), &rows, 2).unwrap();
    for amount in [0, -5, i64::MIN] {
        let result = transfer_once(&db, from, to, amount);
        assert!(
            matches!(result, Err(BankError::NotPositive(a)) if a == amount),
            "{amount}: {result:?}"
        );
    }
    assert_eq!(
        db.accounts().iter().map(|(_, b)| *b).collect::<Vec<_>>(),
        [10, 10]
    );
    let done = transfer_once(&db, from, to, 1).unwrap();
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
