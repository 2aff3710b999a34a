//! The app on the async front end (`--async`): the main job's story, the
//! workload's tasks on two runtime threads, and transfers cancelled at a
//! request deadline, none of them half-applied.

use std::time::{Duration, Instant};

use testbed::proxy::Proxy;

use crate::helpers::*;
use crate::main_job::{check_story, parse};

#[test]
fn the_main_job_on_the_async_front_end_tells_the_same_story() {
    let (blocking, on_async) = (TestDb::migrated(), TestDb::migrated());
    let run = |db: &TestDb, extra: &[&str]| {
        let args = job_args(
            &db.url_string(),
            100,
            5,
            &[&["--seed", "7"], extra].concat(),
        );
        let out = bank(&strs(&args));
        assert_ok(&out);
        lines(&out.stdout)
    };
    let story = run(&on_async, &["--async"]);
    assert_eq!(story, run(&blocking, &[]), "the same seed, the same lines");
    check_story(&on_async, &parse(&story, 100, 5));
}

/// The report of a finished `workload --json` run.
fn report(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("no report: {}", String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn the_async_workload_runs_256_tasks_on_a_few_threads_and_keeps_the_invariant() {
    let db = TestDb::migrated();
    let args = workload_args(
        &db.url_string(),
        &["--async"],
        256,
        1_000,
        &["--transfers", "1000", "--json"],
    );
    let began = Instant::now();
    let (child, _dir) = spawn_bank(&[], &strs(&args));
    let pid = child.id();
    let mut threads = 0;
    let (out, _, ended) = wait_bounded_with(child, began, Duration::from_secs(120), || {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let now = status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        threads = threads.max(now);
    });
    assert!(ended, "the run did not end within its bound");
    assert_ok(&out);
    let report = report(&out);
    eprintln!("256 tasks: {report}; at most {threads} threads");
    assert_eq!(report["invariant_ok"], true, "{report}");
    assert_eq!(report["in_doubt"], 0, "{report}");
    let accounted: u64 = [
        "committed",
        "rejected",
        "gave_up",
        "in_doubt",
        "failed",
        "cancelled",
    ]
    .iter()
    .map(|k| report[k].as_u64().unwrap())
    .sum();
    assert_eq!(accounted, 1_000, "every transfer accounted for: {report}");
    // main, the watchdog, two runtime workers, r2d2's three helpers (the
    // blocking pool that checks the schema and the balances).
    assert!(threads > 0 && threads <= 8, "{threads} threads");
}

#[test]
fn transfers_cancelled_at_the_request_deadline_are_never_half_applied() {
    // Every round trip takes 4 ms through the proxy and a transfer takes at
    // least four: deadlines from 10 to 60 ms land on every await point of
    // the calls, their commits' included, and some transfers make it.
    let (mut cancelled, mut committed, mut committed_anyway) = (0, 0, 0);
    for deadline in ["10", "25", "40", "60"] {
        let db = TestDb::migrated();
        let proxy = Proxy::start(db.tcp_addr(), Duration::from_millis(2)).unwrap();
        let args = workload_args(
            &db.url_via(proxy.port()),
            &["--async"],
            16,
            200,
            &[
                "--transfers",
                "200",
                "--request-timeout",
                deadline,
                "--json",
            ],
        );
        let out = bank(&strs(&args));
        assert_ok(&out);
        let report = report(&out);
        let count = |key: &str| report[key].as_u64().unwrap();
        eprintln!(
            "deadline {deadline} ms: {} committed, {} cancelled ({} of them committed anyway)",
            count("committed"),
            count("cancelled"),
            count("cancelled_committed")
        );
        assert_eq!(report["in_doubt"], 0, "{report}");
        // The ledger holds exactly the transfers that committed, those
        // whose caller gave up while their commit went through included,
        // and every balance is its initial one plus the ledger's movements.
        assert_eq!(report["invariant_ok"], true, "{report}");
        assert_eq!(
            report["ledger"]["rows"].as_u64().unwrap(),
            count("committed") + count("cancelled_committed"),
            "{report}"
        );
        assert_eq!(report["ledger"]["mismatched_accounts"], 0, "{report}");
        cancelled += count("cancelled");
        committed += count("committed");
        committed_anyway += count("cancelled_committed");
    }
    assert!(
        cancelled > 0 && committed > 0,
        "{cancelled} cancelled, {committed} committed"
    );
    eprintln!("in all: {committed} committed, {cancelled} cancelled, {committed_anyway} of them committed anyway");
}

#[test]
fn the_async_front_ends_refusals_are_one_line_before_anything_connects() {
    let (_reserved, port) = refusing_port();
    let plain = format!("postgresql://app:s3cret@127.0.0.1:{port}/bank?sslmode=disable");
    let out = bank(&[
        "--database-url",
        &plain,
        "workload",
        "--transfers",
        "1",
        "--request-timeout",
        "5",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        one_line(&out),
        "bank: --request-timeout drops a transfer's async call, and needs --async; add --async, or drop it"
    );
    // An option libpq reads and tokio-postgres cannot honour is refused by
    // name, before anything connects.
    let standby = format!(
        "postgresql://app:s3cret@127.0.0.1:{port}/bank?sslmode=disable&target_session_attrs=read-only"
    );
    let out = bank(&["--database-url", &standby, "--async"]);
    assert_eq!(out.status.code(), Some(2));
    let line = one_line(&out);
    assert_eq!(
        line,
        "bank: --async cannot honour target_session_attrs=read-only; use any or read-write, or drop --async"
    );
    assert!(!line.contains("s3cret"), "{line}");
}

#[test]
fn a_server_that_never_answers_the_async_start_up_times_out_as_the_blocking_one_does() {
    // The kernel completes the TCP handshake for the backlog, but nothing
    // ever answers: the URL's connect_timeout bounds the whole connect, as
    // libpq's does (tokio-postgres's own bounds only the socket's).
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let url =
        format!("postgresql://app:s3cret@127.0.0.1:{port}/bank?sslmode=disable&connect_timeout=1");
    let began = Instant::now();
    let (child, _dir) = spawn_bank(&[], &["--database-url", &url, "--async"]);
    let (out, _, ended) = wait_bounded(child, began, Duration::from_secs(30));
    assert!(ended, "still waiting after 30 s");
    assert_eq!(out.status.code(), Some(1));
    let line = one_line(&out);
    assert!(line.contains("timed out"), "{line}");
    assert!(!line.contains("s3cret"), "{line}");
    drop(silent);
}
