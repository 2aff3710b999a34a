//! Tests that need CockroachDB; `./dev test` skips them by this module's
//! name and `./dev test-cockroach` runs them. They have not been run where
//! this was written, as no CockroachDB binary could be installed there.

use diesel::prelude::*;
use diesel_tx_retry::{Backoff, Protocol, Retrier, Server};

use crate::helpers::*;

/// CockroachDB's own fault injection: with `inject_retry_errors_enabled`,
/// every statement of an explicit transaction fails with a retry error
/// until the transaction has been rewound to `cockroach_restart` three
/// times (<https://www.cockroachlabs.com/docs/stable/transaction-retry-error-example>).
/// Immediate retries rewind, so the fourth attempt commits.
#[test]
fn injected_retry_errors_rewind_to_the_savepoint_and_commit_once() {
    let db = TestDb::migrated();
    assert_eq!(
        db.server,
        Server::CockroachDb,
        "run with ./dev test-cockroach"
    );
    let url = db
        .url
        .with_param("options", "-c inject_retry_errors_enabled=true");
    let pool = bank::db::pool(&url, 1).unwrap();
    let retrier = Retrier::default()
        .for_server(Server::CockroachDb)
        .with_backoff(Backoff::none());
    assert_eq!(retrier.protocol(), Some(Protocol::Savepoint));
    let id = uuid::Uuid::new_v4();
    let committed = retrier
        .build_transaction()
        .run(&pool, |conn| {
            diesel::sql_query(format!(
                "INSERT INTO accounts (id, balance) VALUES ('{id}', 1)"
            ))
            .execute(conn)
        })
        .unwrap();
    assert_eq!(committed.attempts(), 4);
    assert_eq!(db.accounts(), vec![(id, 1)]);
}
