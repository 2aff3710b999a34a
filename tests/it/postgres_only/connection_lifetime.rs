//! `--max-conn-lifetime`: under a running workload every connection is
//! closed once its lifetime (give or take a tenth) is up, between
//! transactions, and nothing fails for it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::sql_types::{Double, Integer};

use crate::helpers::*;

#[derive(QueryableByName)]
struct Session {
    #[diesel(sql_type = Integer)]
    pid: i32,
    /// Seconds since the session began, by the server's clock.
    #[diesel(sql_type = Double)]
    age: f64,
}

#[test]
fn no_connection_outlives_its_lifetime_by_more_than_a_tenth_and_one_transaction() {
    let db = TestDb::migrated();
    let lifetime = 0.5;
    let args = workload_args(
        &db.url_string(),
        &["--max-conn-lifetime", "0.5"],
        4,
        100,
        &["--duration", "3", "--json"],
    );
    let began = Instant::now();
    let (child, _dir) = spawn_bank(&[], &strs(&args));
    let mut watcher = db.conn();
    // The oldest age each session was seen at, by its backend pid.
    let mut oldest: BTreeMap<i32, f64> = BTreeMap::new();
    let query = format!(
        "SELECT pid, EXTRACT(EPOCH FROM clock_timestamp() - backend_start)::FLOAT8 AS age \
         FROM pg_stat_activity WHERE datname = '{}' AND pid <> pg_backend_pid()",
        db.name
    );
    let (out, _, ended) = wait_bounded_with(child, began, Duration::from_secs(60), || {
        for s in diesel::sql_query(&query)
            .load::<Session>(&mut watcher)
            .unwrap_or_default()
        {
            let age = oldest.entry(s.pid).or_insert(0.0);
            *age = age.max(s.age);
        }
    });
    assert!(ended);
    assert_ok(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["invariant_ok"], true, "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    assert_eq!(report["gave_up"], 0, "{report}");
    // A connection is due at most 1.1 lifetimes after it opened, and is
    // closed when its transaction in flight ends: the slowest transfer
    // bounds that, and the watcher samples every 20 ms.
    let slowest = report["latency_ms"]["max"].as_f64().unwrap() / 1e3;
    let bound = lifetime * 1.1 + slowest + 0.1;
    let sessions = oldest.len();
    eprintln!(
        "{sessions} sessions, the oldest seen at {:.3} s, bound {bound:.3} s",
        oldest.values().cloned().fold(0.0, f64::max)
    );
    // Four workers for three seconds with half-second lives: connections
    // were replaced, many times over.
    assert!(sessions >= 12, "only {sessions} sessions: {oldest:?}");
    for (pid, age) in oldest {
        assert!(
            age <= bound,
            "session {pid} lived {age:.3} s, past {bound:.3} s"
        );
    }
}
