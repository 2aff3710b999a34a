//! Round trips, counted through the latency proxy and pinned per phase: at
//! cloud latency the main job's wall time is its round trips times the
//! latency. A round trip is a flight of client messages the server answers
//! (the final Terminate, which nobody answers, is not one).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::helpers::*;
use testbed::proxy::{per_phase, Proxy, RoundTrip, BIND};

fn main_job_through_proxy(params: &str) -> (Vec<RoundTrip>, usize) {
    main_job_through(Duration::ZERO, params, &[])
}

/// The main job through a proxy that delays each direction by `delay`.
fn main_job_through(delay: Duration, params: &str, args: &[&str]) -> (Vec<RoundTrip>, usize) {
    let db = TestDb::migrated();
    let proxy = Proxy::start(db.tcp_addr(), delay).unwrap();
    let url = format!(
        "postgresql://postgres@127.0.0.1:{}/{}{params}",
        proxy.port(),
        db.name
    );
    let mut all = vec!["--database-url", &url];
    all.extend_from_slice(args);
    assert_ok(&bank(&all));
    (proxy.round_trips(), proxy.connections())
}

fn expect(connect: usize) -> BTreeMap<&'static str, usize> {
    BTreeMap::from([
        ("1 connect", connect),
        ("2 setup", 1),
        ("3 create", 3),
        ("4 transfer", 4),
        ("5 delete", 3),
    ])
}

#[test]
fn the_main_job_takes_14_round_trips_on_one_connection() {
    // A server without TLS, told so: startup, Diesel's two SETs, then one
    // query for the server and the table, then the three transactions.
    let (round_trips, connections) = main_job_through_proxy("?sslmode=disable");
    assert_eq!(connections, 1);
    assert_eq!(per_phase(&round_trips), expect(3), "{round_trips:#?}");
    assert_eq!(round_trips.len(), 14);
}

#[test]
fn libpqs_default_sslmode_adds_one_round_trip_to_ask_for_tls() {
    let (round_trips, connections) = main_job_through_proxy("");
    assert_eq!(connections, 1);
    assert_eq!(per_phase(&round_trips), expect(4), "{round_trips:#?}");
    assert_eq!(round_trips[0].sent, ["<ssl request>"]);
    assert_eq!(round_trips.len(), 15);
}

#[test]
fn the_async_main_job_takes_9_round_trips_each_begin_sent_with_its_first_statement() {
    // A flight is what goes out before an answer comes back; at 20 ms each
    // way a statement sent in the same poll as the BEGIN is in its flight.
    let (round_trips, connections) =
        main_job_through(Duration::from_millis(20), "?sslmode=disable", &["--async"]);
    assert_eq!(connections, 1);
    // tokio-postgres's startup; the quick check, queued ahead of
    // diesel-async's two SETs, all three in one flight (each statement
    // runs unnamed on its first use: vendor/README.md). Then each
    // transaction: BEGIN with its first statement, each further statement,
    // the commit. 9 round trips, against the blocking job's 14.
    assert_eq!(
        per_phase(&round_trips),
        BTreeMap::from([
            ("1 connect", 2),
            ("3 create", 2),
            ("4 transfer", 3),
            ("5 delete", 2),
        ]),
        "{round_trips:#?}"
    );
    assert_eq!(round_trips.len(), 9);
    let setup = &round_trips[1].sent;
    assert_eq!(setup.len(), 3, "{setup:?}");
    assert!(setup[0].starts_with("SELECT version()"), "{setup:?}");
    assert_eq!(
        setup[1..],
        ["SET TIME ZONE 'UTC'", "SET CLIENT_ENCODING TO 'UTF8'"]
    );
    assert!(
        !round_trips
            .iter()
            .any(|rt| rt.sent.iter().any(|s| s == BIND)),
        "no statement is prepared apart from its run: {round_trips:#?}"
    );
    let begins: Vec<&RoundTrip> = round_trips
        .iter()
        .filter(|rt| rt.sent.iter().any(|s| s.starts_with("BEGIN")))
        .collect();
    assert_eq!(begins.len(), 3);
    for (begin, first) in begins.iter().zip(["INSERT", "SELECT", "DELETE"]) {
        assert_eq!(begin.sent.len(), 2, "{begin:?}");
        assert!(begin.sent[1].starts_with(first), "{begin:?}");
    }
}
