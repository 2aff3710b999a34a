//! The decision table's rows for PostgreSQL, end to end: the proxy answers
//! the statement of one stage (`BEGIN`, the unit's, `RELEASE`, `COMMIT`)
//! with an error of each class, made by the server itself and without
//! closing the connection, and the call must end as the row says.

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel::result::Error as DieselError;
use diesel_tx_retry::{Applied, Protocol, TxError};
use testbed::proxy::{Faults, Injection, Proxy};

use crate::fixture::*;

/// How a row's call must end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ends {
    /// Committed after this many attempts, on this many connections.
    Committed(u32, usize),
    Failed,
    Ambiguous,
    Swallowed,
}

/// What each class is played as: its SQLSTATE and the server's message.
const CONFLICT: (&str, &str) = (
    "40001",
    "could not serialize access due to concurrent update",
);
const LOST: (&str, &str) = (
    "57P01",
    "terminating connection due to administrator command",
);
const OTHER: (&str, &str) = ("XX000", "internal error");
const DEFINITE: (&str, &str) = ("23514", "new row violates check constraint");
const ABORTED: (&str, &str) = (
    "25P02",
    "current transaction is aborted, commands ignored until end of transaction block",
);

/// Runs one row: the first statement starting with `stage` is answered
/// with `class`; the unit marks (by a simple query, which the proxy reads)
/// and, when `idempotent`, resolves a doubt by its mark.
fn row(
    protocol: Protocol,
    stage: &'static str,
    class: (&'static str, &'static str),
    idempotent: bool,
) -> Ends {
    let db = with_faults();
    let proxy = Proxy::with_faults(
        db.tcp_addr(),
        Faults {
            inject: Some(Injection {
                starting: stage,
                every: 1000,
                code: class.0,
                message: class.1,
            }),
            ..Faults::default()
        },
    )
    .unwrap();
    let pool = Pool::builder()
        .max_size(1)
        .test_on_check_out(false)
        .build(ConnectionManager::<PgConnection>::new(
            db.url_via(proxy.port()),
        ))
        .unwrap();
    let (retrier, _) = on_postgres(protocol);
    let insert =
        |conn: &mut PgConnection| conn.batch_execute("INSERT INTO marks (note) VALUES ('x')");
    let result = if idempotent {
        retrier
            .build_transaction()
            .run_idempotent(&pool, (), |conn, attempt| {
                if attempt.in_doubt() && bigint(conn, "(SELECT count(*) FROM marks)")? == 1 {
                    return Ok(Applied::Earlier(()));
                }
                insert(conn)?;
                Ok::<_, DieselError>(Applied::Now(()))
            })
            .map(|done| done.attempts())
    } else {
        retrier
            .build_transaction()
            .run(&pool, insert)
            .map(|done| done.attempts())
    };
    assert_eq!(proxy.injected(), 1, "the fault was played");
    let ends = match result {
        Ok(attempts) => Ends::Committed(attempts, proxy.connections()),
        Err(TxError::Failed(_)) => Ends::Failed,
        Err(TxError::AmbiguousCommit { .. }) => Ends::Ambiguous,
        Err(TxError::SwallowedError { .. }) => Ends::Swallowed,
        Err(other) => panic!("{other:?}"),
    };
    // Nothing committed twice, and nothing committed by a failed call.
    let marks = db.count("marks");
    match ends {
        Ends::Committed(..) => assert_eq!(marks, 1),
        Ends::Failed | Ends::Swallowed | Ends::Ambiguous => assert_eq!(marks, 0),
    }
    ends
}

#[test]
fn each_row_for_postgresql_with_the_restart_protocol() {
    let p = Protocol::Restart;
    let (begin, statement, commit) = ("BEGIN", "INSERT INTO marks", "SELECT 1; COMMIT");
    for (stage, class, idempotent, ends) in [
        (begin, CONFLICT, false, Ends::Committed(2, 1)),
        (begin, LOST, false, Ends::Committed(2, 2)),
        (begin, OTHER, false, Ends::Failed),
        (statement, CONFLICT, false, Ends::Committed(2, 1)),
        (statement, LOST, false, Ends::Committed(2, 2)),
        (statement, OTHER, false, Ends::Failed),
        (statement, DEFINITE, false, Ends::Failed),
        (commit, CONFLICT, false, Ends::Committed(2, 1)),
        (commit, LOST, false, Ends::Ambiguous),
        (commit, LOST, true, Ends::Committed(2, 2)),
        (commit, OTHER, false, Ends::Ambiguous),
        (commit, OTHER, true, Ends::Committed(2, 1)),
        (commit, DEFINITE, false, Ends::Failed),
        (commit, ABORTED, false, Ends::Swallowed),
    ] {
        assert_eq!(
            row(p, stage, class, idempotent),
            ends,
            "{stage} {} idempotent={idempotent}",
            class.0
        );
    }
}

#[test]
fn each_row_for_postgresql_with_the_savepoint_protocol() {
    // On PostgreSQL the RELEASE commits nothing, and what failed in the
    // RELEASE; COMMIT message is what libpq's status says: here the whole
    // message is answered with an error inside the transaction, so the
    // RELEASE.
    let p = Protocol::Savepoint;
    let release = "RELEASE SAVEPOINT cockroach_restart; COMMIT";
    for (class, idempotent, ends) in [
        (CONFLICT, false, Ends::Committed(2, 1)),
        (LOST, false, Ends::Ambiguous),
        (LOST, true, Ends::Committed(2, 2)),
        (OTHER, false, Ends::Failed),
        (DEFINITE, false, Ends::Failed),
        (ABORTED, false, Ends::Swallowed),
    ] {
        assert_eq!(
            row(p, release, class, idempotent),
            ends,
            "release {} idempotent={idempotent}",
            class.0
        );
    }
    assert_eq!(
        row(p, "INSERT INTO marks", CONFLICT, false),
        Ends::Committed(2, 1)
    );
}
