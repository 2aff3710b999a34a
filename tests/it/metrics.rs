//! `workload --metrics-addr`: the retry helper's metrics, scraped while the
//! workload runs, in Prometheus's text format under OpenTelemetry's names.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::helpers::*;

/// `GET /metrics` from `addr`, within a few seconds.
fn scrape(addr: &str, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).expect("the metrics address answers");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

#[test]
fn the_workload_serves_its_metrics_while_it_runs() {
    let db = TestDb::migrated();
    let args = workload_args(
        &db.url_string(),
        &["-v"],
        4,
        20,
        &["--duration", "2", "--metrics-addr", "127.0.0.1:0"],
    );
    let began = Instant::now();
    let (mut child, _dir) = spawn_bank(&[], &strs(&args));
    // The address it bound, from its log.
    let stderr = child.stderr.take().unwrap();
    let (found, address) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("serving metrics at http://").nth(1) {
                let _ = found.send(rest.trim_end_matches("/metrics").to_owned());
            }
        }
    });
    let addr = address
        .recv_timeout(Duration::from_secs(30))
        .expect("the run says where its metrics are");
    // A few transfers first.
    std::thread::sleep(Duration::from_millis(500));
    let page = scrape(&addr, "/metrics");
    let missing = scrape(&addr, "/other");
    let (out, _, ended) = wait_bounded(child, began, Duration::from_secs(60));
    assert!(ended);
    assert!(out.status.success());
    assert!(page.starts_with("HTTP/1.1 200 OK\r\n"), "{page}");
    for expected in [
        "# TYPE db_client_operation_duration_seconds histogram",
        "db_client_operation_duration_seconds_bucket{db_system_name=\"postgresql\",outcome=\"committed\",le=\"0.005\"}",
        "db_client_operation_duration_seconds_count{db_system_name=\"postgresql\",outcome=\"committed\"}",
        "# TYPE db_client_transaction_attempts histogram",
        "db_client_transaction_attempts_bucket{le=\"1\"}",
    ] {
        assert!(page.contains(expected), "{expected} is not in:\n{page}");
    }
    assert!(
        missing.starts_with("HTTP/1.1 404 Not Found\r\n"),
        "{missing}"
    );
}
