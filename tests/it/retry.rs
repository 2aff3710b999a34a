//! The retry helper on any server: what needs no fault injection.

use bank::retry::{Protocol, Retrier, RetryPolicy, TxError, TxOptions};
use diesel::prelude::*;
use diesel::result::{DatabaseErrorKind, Error as DieselError};

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
    assert!(
        matches!(
            result,
            Err(TxError::Failed(DieselError::DatabaseError(
                DatabaseErrorKind::CheckViolation,
                _
            )))
        ),
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
