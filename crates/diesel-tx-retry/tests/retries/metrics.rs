//! The metrics (feature `metrics`), read back through a local recorder:
//! their names, kinds and labels as the crate docs list them.

use std::collections::BTreeMap;

use diesel::result::Error as DieselError;
use diesel_tx_retry::{Applied, Protocol};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use testbed::proxy::{Cut, Proxy};

use crate::fixture::*;

/// Every metric `calls` emitted: `name{label=value,...}` to its value (a
/// counter's count, a histogram's samples).
fn recorded(calls: impl FnOnce()) -> BTreeMap<String, String> {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, calls);
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let key = key.key();
            let labels: Vec<String> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            let value = match value {
                DebugValue::Counter(n) => n.to_string(),
                DebugValue::Histogram(samples) => {
                    let rounded: Vec<String> = samples
                        .iter()
                        .map(|s| {
                            if key.name().ends_with("seconds") {
                                "t".to_owned()
                            } else {
                                s.to_string()
                            }
                        })
                        .collect();
                    format!("[{}]", rounded.join(","))
                }
                DebugValue::Gauge(g) => g.to_string(),
            };
            (format!("{}{{{}}}", key.name(), labels.join(",")), value)
        })
        .collect()
}

#[test]
fn each_call_records_its_duration_attempts_retries_give_ups_and_doubts() {
    let db = with_faults();
    let pool = db.pool(1);
    let (retrier, _) = retrier(diesel_tx_retry::Server::PostgreSql, Protocol::Restart, 3);
    let proxy = Proxy::cutting_commits(db.tcp_addr(), 1_000, Cut::AfterForwarding).unwrap();
    let cut = pool_via(&db, &proxy);
    let seen = recorded(|| {
        // Two conflicts, then a commit.
        retrier
            .transaction(&pool, |conn| {
                fail_first(conn, 2, "40001")?;
                mark(conn, "committed")
            })
            .unwrap();
        // Conflicts until the attempts run out.
        let gave_up = retrier.transaction(&pool, |conn| {
            fail_first(conn, 100, "40001")?;
            mark(conn, "never")
        });
        assert!(gave_up.is_err());
        // A commit cut after it reached the server, resolved by the key.
        retrier
            .idempotent_transaction(&cut, "keyed", |conn, attempt| {
                if attempt.in_doubt()
                    && bigint(conn, "(SELECT count(*) FROM marks WHERE note = 'keyed')")? == 1
                {
                    return Ok::<_, DieselError>(Applied::Earlier(()));
                }
                mark(conn, attempt.key())?;
                Ok(Applied::Now(()))
            })
            .unwrap();
    });
    let expected: BTreeMap<String, String> = [
        (
            "db_client_operation_duration_seconds{db_system_name=postgresql,outcome=committed}",
            "[t,t]",
        ),
        (
            "db_client_operation_duration_seconds{db_system_name=postgresql,outcome=gave_up}",
            "[t]",
        ),
        ("db_client_transaction_attempts{}", "[3,3,2]"),
        ("db_client_transaction_retries_total{cause=conflict}", "4"),
        (
            "db_client_transaction_retries_total{cause=connection_lost}",
            "1",
        ),
        ("db_client_transaction_gave_up_total{budget=attempts}", "1"),
        (
            "db_client_commits_in_doubt_total{resolution=applied_earlier}",
            "1",
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(seen, expected);
}
