//! What a transaction costs on the wire, counted through the test proxy: the
//! unit's statements plus two round trips (the `BEGIN` message, the commit
//! message), on either protocol. At cloud latency a transaction's wall time
//! is its round trips times the latency.

use std::time::Duration;

use diesel::prelude::*;
use diesel_tx_retry::Protocol;
use testbed::proxy::{Proxy, RoundTrip};
use testbed::Database;

use crate::fixture::*;

diesel::table! {
    counter (id) {
        id -> Int8,
        n -> Int8,
    }
}

fn bump(conn: &mut PgConnection) -> QueryResult<usize> {
    diesel::update(counter::table.find(1))
        .set(counter::n.eq(counter::n + 1))
        .execute(conn)
}

/// The round trips of one call that runs `bump` twice, on a connection
/// that has run it before (its statement is prepared).
fn one_call(protocol: Protocol) -> Vec<RoundTrip> {
    let db = Database::create();
    db.exec("CREATE TABLE counter (id INT8 PRIMARY KEY, n INT8 NOT NULL); INSERT INTO counter VALUES (1, 0)");
    let proxy = Proxy::start(db.tcp_addr(), Duration::ZERO).unwrap();
    let pool = pool_via(&db, &proxy);
    let (retrier, _) = on_postgres(protocol);
    let retrier = retrier.with_statement_timeout(Duration::from_secs(5));
    retrier.transaction(&pool, bump).unwrap();
    let before = proxy.round_trips().len();
    retrier
        .transaction(&pool, |conn| {
            bump(conn)?;
            bump(conn)
        })
        .unwrap();
    assert_eq!(proxy.connections(), 1);
    assert_eq!(db.count("counter WHERE n = 3"), 1);
    proxy.round_trips().split_off(before)
}

fn a_call_costs_its_statements_and_two_round_trips(protocol: Protocol) {
    let round_trips = one_call(protocol);
    let sent: Vec<&[String]> = round_trips.iter().map(|rt| &rt.sent[..]).collect();
    assert_eq!(sent.len(), 4, "{sent:#?}");
    // BEGIN, the statement bound and (savepoint protocol) the savepoint:
    // one message.
    let begin = &sent[0];
    assert_eq!(begin.len(), 1, "{begin:?}");
    assert!(
        begin[0]
            .starts_with("BEGIN ISOLATION LEVEL SERIALIZABLE; SET LOCAL statement_timeout = 5000"),
        "{begin:?}"
    );
    assert_eq!(
        begin[0].ends_with("; SAVEPOINT cockroach_restart"),
        protocol == Protocol::Savepoint,
        "{begin:?}"
    );
    for statement in &sent[1..3] {
        assert!(
            statement
                .iter()
                .all(|sql| sql.starts_with("UPDATE \"counter\"")),
            "{statement:?}"
        );
    }
    let commit = match protocol {
        // The statement bound again, which finds an aborted transaction out.
        Protocol::Restart => "SET LOCAL statement_timeout = 5000; COMMIT",
        _ => "RELEASE SAVEPOINT cockroach_restart; COMMIT",
    };
    assert_eq!(sent[3], [commit.to_owned()]);
}

for_each_protocol!(a_call_costs_its_statements_and_two_round_trips);
