//! Commits in doubt, made on purpose: a proxy cuts the connection at chosen
//! `COMMIT`s, before forwarding one (the server rolls back) or just after
//! (the server commits, and its answer is lost). Every phase is idempotent
//! by the keys it drew before the helper, so the helper retries it on a new
//! connection and the retry finds out which it was: the job and the
//! workload end as if nothing happened, and the table matches what they
//! printed. Only a budget spent before the doubt is resolved leaves it in
//! doubt.

use std::thread;

use crate::helpers::*;
use crate::main_job::{check_story, parse};
use testbed::proxy::{Cut, Proxy};

/// What `-v` says of each phase's commit, by where it was cut.
fn resolved(cut: Cut) -> &'static str {
    match cut {
        Cut::AfterForwarding => "the retry found it applied by the earlier attempt",
        Cut::BeforeForwarding => "the earlier attempt had not applied it, the retry did",
    }
}

fn the_default_job_through_every_other_commit_cut(cut: Cut) {
    let db = TestDb::migrated();
    let proxy = Proxy::cutting_commits(db.tcp_addr(), 2, cut).unwrap();
    let out = bank(&["--database-url", &db.url_via(proxy.port()), "-v"]);
    assert_ok(&out);
    // The 1st, 3rd and 5th COMMIT: the first attempt of each phase.
    assert_eq!(proxy.commits_cut(), 3);
    // The whole story, as a clean run prints it, and the table holds it:
    // 95 accounts, the transfer's two new balances, the five gone.
    let story = parse(&lines(&out.stdout), 100, 5);
    check_story(&db, &story);
    assert_eq!(
        db.count("transfers"),
        1,
        "the transfer is in the ledger once"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    for phase in [
        "creating accounts",
        "transferring funds",
        "deleting accounts",
    ] {
        let line = format!("{phase}: the commit was in doubt; {}", resolved(cut));
        assert!(stderr.contains(&line), "{line} missing:\n{stderr}");
    }
}

#[test]
fn the_main_job_resolves_commits_cut_after_they_reached_the_server() {
    the_default_job_through_every_other_commit_cut(Cut::AfterForwarding);
}

#[test]
fn the_main_job_resolves_commits_cut_before_they_reached_the_server() {
    the_default_job_through_every_other_commit_cut(Cut::BeforeForwarding);
}

/// A 4-worker workload of 1,000 transfers with every 25th COMMIT cut (about
/// 40 cuts); returns its report and the cuts.
fn workload_through_every_25th_commit_cut(cut: Cut) -> (serde_json::Value, usize) {
    let db = TestDb::migrated();
    let proxy = Proxy::cutting_commits(db.tcp_addr(), 25, cut).unwrap();
    let args = workload_args(
        &db.url_via(proxy.port()),
        &[],
        4,
        100,
        &["--transfers", "1000", "--json"],
    );
    let out = bank(&strs(&args));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{cut:?}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(report["invariant_ok"], true, "{cut:?}: {report}");
    assert_ok(&out);
    assert_eq!(report["in_doubt"], 0, "{cut:?}: {report}");
    assert_eq!(report["failed"], 0, "{cut:?}: {report}");
    assert_eq!(report["ledger"]["rows"], report["committed"], "{report}");
    assert_eq!(db.count("transfers"), report["committed"].as_i64().unwrap());
    (report, proxy.commits_cut())
}

#[test]
fn a_workload_with_every_25th_commit_cut_leaves_nothing_in_doubt() {
    // Both ways side by side.
    let (after, before) = thread::scope(|scope| {
        let after = scope.spawn(|| workload_through_every_25th_commit_cut(Cut::AfterForwarding));
        let before = scope.spawn(|| workload_through_every_25th_commit_cut(Cut::BeforeForwarding));
        (after.join().unwrap(), before.join().unwrap())
    });
    for (cut, (report, cuts)) in [
        (Cut::AfterForwarding, after),
        (Cut::BeforeForwarding, before),
    ] {
        let resolved = &report["resolved_in_doubt"];
        let (earlier, on_retry) = (
            resolved["applied_earlier"].as_u64().unwrap(),
            resolved["applied_on_retry"].as_u64().unwrap(),
        );
        eprintln!(
            "{cut:?}: {cuts} commits cut; {} committed, resolved {earlier} applied earlier and \
             {on_retry} on retry, in doubt {}",
            report["committed"], report["in_doubt"]
        );
        // The first cut is the accounts' creation; each later one a
        // transfer's (a transfer cut twice is resolved once).
        assert!(cuts > 2, "{cut:?}: only {cuts} cuts");
        assert!(earlier + on_retry >= 1 && earlier + on_retry < cuts as u64);
        // Cut after forwarding, the server committed, unless the COMMIT
        // itself failed there (a serialization failure at commit, which the
        // client never heard): then the retry applied it. Cut before, it
        // never committed.
        match cut {
            Cut::AfterForwarding => assert!(earlier > 0, "{report}"),
            Cut::BeforeForwarding => assert_eq!(earlier, 0, "{report}"),
        }
    }
}

#[test]
fn a_budget_spent_before_the_doubt_is_resolved_leaves_it_in_doubt() {
    for cut in [Cut::AfterForwarding, Cut::BeforeForwarding] {
        let db = TestDb::migrated();
        // Every COMMIT cut: no attempt ever hears its answer.
        let proxy = Proxy::cutting_commits(db.tcp_addr(), 1, cut).unwrap();
        let out = bank(&[
            "--database-url",
            &db.url_via(proxy.port()),
            "--max-retries",
            "2",
            "--accounts",
            "10",
        ]);
        assert_eq!(out.status.code(), Some(1), "{cut:?}");
        assert_eq!(proxy.commits_cut(), 3, "three attempts, three cuts");
        let line = one_line(&out);
        assert!(
            line.starts_with(
                "bank: creating accounts (0 created and committed before this): commit result is \
                 ambiguous on attempt 3: the transaction may or may not have been applied"
            ),
            "{cut:?}: {line}"
        );
        assert!(!line.contains("gave up"), "{line}");
        assert!(out.stdout.is_empty(), "nothing printed as created");
        let expected = if cut == Cut::AfterForwarding { 10 } else { 0 };
        assert_eq!(db.count("accounts"), expected, "{cut:?}");
    }
}
