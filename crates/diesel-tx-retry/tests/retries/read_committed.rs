//! READ COMMITTED: framed BEGIN ... COMMIT under either protocol, and a
//! 40001 that reaches the client still restarts the transaction.

use diesel::prelude::*;
use diesel_tx_retry::{Isolation, Protocol};

use crate::fixture::*;

fn read_committed_is_asked_for_and_a_40001_restarts_it(protocol: Protocol) {
    let db = with_faults();
    let (retrier, _) = on_postgres(protocol);
    let mut seen = Vec::new();
    let done = retrier
        .build_transaction()
        .isolation(Isolation::ReadCommitted)
        .run(&db.pool(1), |conn| {
            seen.push(setting(conn, "transaction_isolation")?);
            mark(conn, "x")?;
            fail_first(conn, 1, "40001")
        })
        .unwrap();
    assert_eq!(done.attempts(), 2);
    assert_eq!(seen, ["read committed", "read committed"]);
    assert_eq!(db.count("marks"), 1);
    // The helper's own level, for every call that does not ask.
    let level = retrier
        .with_isolation(Isolation::ReadCommitted)
        .transaction(&db.pool(1), |conn| setting(conn, "transaction_isolation"))
        .unwrap();
    assert_eq!(level, "read committed");
}

#[test]
fn read_committed_never_takes_the_savepoint_even_under_cockroachdbs_protocol() {
    let db = with_faults();
    let (retrier, _) = retrier(
        diesel_tx_retry::Server::CockroachDb,
        Protocol::Savepoint,
        10,
    );
    // Inside a transaction framed BEGIN ... COMMIT, releasing the restart
    // savepoint fails: it was never taken.
    let result = retrier
        .build_transaction()
        .isolation(Isolation::ReadCommitted)
        .run(&db.pool(1), |conn| {
            diesel::sql_query("RELEASE SAVEPOINT cockroach_restart").execute(conn)
        });
    let err = result.unwrap_err().to_string();
    assert!(err.contains("cockroach_restart"), "{err}");
}

for_each_protocol!(read_committed_is_asked_for_and_a_40001_restarts_it);
