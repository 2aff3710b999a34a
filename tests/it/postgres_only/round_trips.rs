//! Round trips, counted through the latency proxy and pinned per phase: at
//! cloud latency the main job's wall time is its round trips times the
//! latency. A round trip is a flight of client messages the server answers
//! (the final Terminate, which nobody answers, is not one).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use diesel::sql_types::Text;

use bank::job;
use bank::plan::{Batches, Plan};
use bank::retry::{Protocol, Retrier, RetryPolicy};

use crate::helpers::*;
use crate::proxy::{Proxy, RoundTrip};

/// The test server's TCP address.
fn server_addr(db: &TestDb) -> SocketAddr {
    let port = scalar::<Text, String>(&mut db.conn(), "current_setting('port')").unwrap();
    format!("127.0.0.1:{port}").parse().unwrap()
}

/// Names the phase each round trip belongs to, and counts them.
fn per_phase(round_trips: &[RoundTrip]) -> BTreeMap<&'static str, usize> {
    let mut counts = BTreeMap::new();
    let mut transaction: Vec<&RoundTrip> = Vec::new();
    let label_tx = |tx: &[&RoundTrip]| {
        let all: Vec<&str> = tx
            .iter()
            .flat_map(|r| r.sent.iter().map(String::as_str))
            .collect();
        if all.iter().any(|s| s.starts_with("INSERT")) {
            "3 create"
        } else if all.iter().any(|s| s.contains("FOR UPDATE")) {
            "4 transfer"
        } else if all.iter().any(|s| s.starts_with("DELETE")) {
            "5 delete"
        } else {
            "? other transaction"
        }
    };
    for rt in round_trips {
        let sent = |p: &str| rt.sent.iter().any(|s| s.starts_with(p) || s.contains(p));
        if !transaction.is_empty() || sent("BEGIN") {
            transaction.push(rt);
            if sent("COMMIT") {
                *counts.entry(label_tx(&transaction)).or_default() += transaction.len();
                transaction.clear();
            }
            continue;
        }
        let phase = if sent("<") || sent("SET TIME ZONE") || sent("SET CLIENT_ENCODING") {
            "1 connect"
        } else if sent("version()") {
            "2 setup"
        } else {
            "? other"
        };
        *counts.entry(phase).or_default() += 1;
    }
    counts
}

fn main_job_through_proxy(params: &str) -> (Vec<RoundTrip>, usize) {
    let db = TestDb::migrated();
    let proxy = Proxy::start(server_addr(&db), Duration::ZERO).unwrap();
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

#[test]
fn the_savepoint_protocol_costs_no_extra_round_trip() {
    // Through the library: the command line refuses this protocol on
    // PostgreSQL. BEGIN with SAVEPOINT, and RELEASE with COMMIT, go as one
    // message each.
    let db = TestDb::migrated();
    let proxy = Proxy::start(server_addr(&db), Duration::ZERO).unwrap();
    let url = bank::config::DbUrl::parse(&format!(
        "postgresql://postgres@127.0.0.1:{}/{}?sslmode=disable",
        proxy.port(),
        db.name
    ))
    .unwrap();
    let manager = bank::db::Manager::new(&url).without_statement_cache();
    let pool = bank::db::pool_of(manager, 1).unwrap();
    let retrier =
        Retrier::new(RetryPolicy::default(), db.server).with_protocol(Protocol::Savepoint);
    let plan = Plan::new(100, 5, Batches::default()).unwrap();
    job::run(&pool, &retrier, plan, &mut Vec::new()).unwrap();
    drop(pool);
    let round_trips = proxy.round_trips();
    let mut counts = per_phase(&round_trips);
    assert_eq!(counts.remove("1 connect"), Some(3));
    assert_eq!(
        counts,
        BTreeMap::from([("3 create", 3), ("4 transfer", 4), ("5 delete", 3)]),
        "{round_trips:#?}"
    );
    let first = &round_trips[3].sent;
    assert_eq!(
        first,
        &["BEGIN ISOLATION LEVEL SERIALIZABLE; SAVEPOINT cockroach_restart"]
    );
    assert!(round_trips
        .iter()
        .any(|rt| rt.sent == ["RELEASE SAVEPOINT cockroach_restart; COMMIT"]));
}
