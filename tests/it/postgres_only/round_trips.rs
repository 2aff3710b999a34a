//! Round trips, counted through the latency proxy and pinned per phase: at
//! cloud latency the main job's wall time is its round trips times the
//! latency. A round trip is a flight of client messages the server answers
//! (the final Terminate, which nobody answers, is not one).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::helpers::*;
use testbed::proxy::{per_phase, Proxy, RoundTrip};

fn main_job_through_proxy(params: &str) -> (Vec<RoundTrip>, usize) {
    let db = TestDb::migrated();
    let proxy = Proxy::start(db.tcp_addr(), Duration::ZERO).unwrap();
    let url = format!(
        "postgresql://postgres@127.0.0.1:{}/{}{params}",
        proxy.port(),
        db.name
    );
    assert_ok(&bank(&["--database-url", &url]));
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
