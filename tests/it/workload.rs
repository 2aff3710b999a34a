//! `bank workload` through the real binary.

use crate::helpers::*;

#[test]
fn a_counted_workload_accounts_for_every_transfer_and_keeps_the_total() {
    let db = TestDb::migrated();
    let args = workload_args(
        &db.url_string(),
        &[],
        4,
        10,
        &["--transfers", "300", "--json", "--seed", "3"],
    );
    let out = bank(&strs(&args));
    assert_ok(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let n = |key: &str| {
        report[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{key} missing in {report}"))
    };
    assert_eq!(
        n("committed") + n("rejected") + n("gave_up") + n("in_doubt"),
        300,
        "{report}"
    );
    assert_eq!(n("gave_up") + n("in_doubt"), 0, "{report}");
    // The ledger holds one row per committed transfer, and every balance
    // is its initial one plus the ledger's movements.
    assert_eq!(report["ledger"]["rows"], n("committed"), "{report}");
    assert_eq!(report["ledger"]["mismatched_accounts"], 0, "{report}");
    assert_eq!(db.count("transfers") as u64, n("committed"));
    // The retries come from the helper's observer, by cause.
    let by_cause = &report["retries_by_cause"];
    let cause = |key: &str| by_cause[key].as_u64().unwrap();
    assert_eq!(
        cause("conflict") + cause("connection_lost") + cause("other"),
        n("retries"),
        "{report}"
    );
    assert!(report["backoff_ms"].as_f64().unwrap() >= 0.0, "{report}");
    // The client's own CPU while the transfers ran.
    let cpu = report["client_cpu_ms"].as_f64().unwrap();
    let per = report["client_cpu_us_per_transfer"].as_f64().unwrap();
    assert!(cpu > 0.0, "{report}");
    assert!(
        (per * n("committed") as f64 / 1e3 - cpu).abs() < 1e-6 * cpu.max(1.0),
        "{report}"
    );
    assert_eq!(report["invariant_ok"], true);
    for key in ["elapsed_s", "transfers_per_s"] {
        assert!(report[key].as_f64().unwrap() > 0.0, "{key}");
    }
    let latency = &report["latency_ms"];
    let ms = |key: &str| latency[key].as_f64().unwrap();
    assert!(
        ms("p50") > 0.0
            && ms("p50") <= ms("p95")
            && ms("p95") <= ms("p99")
            && ms("p99") <= ms("max"),
        "{latency}"
    );
    let balances = db.accounts();
    assert_eq!(balances.len(), 10);
    assert_eq!(
        balances.iter().map(|(_, b)| b).sum::<i64>(),
        report["total_before"].as_i64().unwrap()
    );
}

#[test]
fn a_timed_workload_prints_a_text_report() {
    let db = TestDb::migrated();
    let args = workload_args(&db.url_string(), &[], 2, 5, &["--duration", "0.5"]);
    let out = bank(&strs(&args));
    assert_ok(&out);
    let text = lines(&out.stdout);
    assert_eq!(text.len(), 6, "{text:#?}");
    let seconds = text[0]
        .strip_prefix("Ran transfers between 5 accounts from 2 workers for ")
        .and_then(|rest| rest.strip_suffix(" s."))
        .unwrap_or_else(|| panic!("{}", text[0]));
    assert!(seconds.parse::<f64>().is_ok(), "{}", text[0]);
    assert!(
        text[3].starts_with("commits in doubt: 0 unresolved"),
        "{}",
        text[3]
    );
    assert!(
        text[5].contains("0 negative balances, ledger "),
        "{}",
        text[5]
    );
    assert!(
        text[5].ends_with(" committed, 0 accounts off it: ok"),
        "{}",
        text[5]
    );
}

#[test]
fn the_workload_refuses_bad_sizes() {
    for (args, expected) in [
        (
            &["--workers", "0", "--duration", "1"][..],
            "--workers 0 is out of range: it must be between 1 and 1024",
        ),
        (
            &["--workers", "5000000000", "--duration", "1"][..],
            "--workers 5000000000 is out of range: it must be between 1 and 1024",
        ),
        (
            &["--accounts", "1", "--duration", "1"][..],
            "--accounts 1 is out of range: it must be between 2 (the transfer needs two accounts)",
        ),
        (
            &["--transfers", "-3"][..],
            "invalid value '-3' for '--transfers <T>': must be a whole number",
        ),
        (
            &["--transfers", "5", "--duration", "1"][..],
            "cannot be used with",
        ),
        (
            &["--workers", "2"][..],
            "<--transfers <T>|--duration <SECONDS>>",
        ),
    ] {
        let workdir = tempdir();
        let out = bank_cmd(workdir.path())
            .args(["--database-url", "postgresql://x@127.0.0.1:1/x", "workload"])
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}
