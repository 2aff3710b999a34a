//! Network partitions: the main job runs in a namespace of its own, the
//! server in another, and the test cuts the one link between them while a
//! chosen statement (or COMMIT) of a chosen phase is under way.
//!
//! How a moment is chosen without sleeping to synchronise: a trigger makes
//! that statement (or, deferred, that COMMIT) wait for an advisory lock the
//! harness holds; the harness sees the backend waiting in
//! `pg_stat_activity`, cuts the link, then lets the lock go. The server
//! finishes the statement, and its answer is lost. The only sleep is the
//! length of the partition itself.
//!
//! The job runs with `--statement-timeout 3`, so the server also ends the
//! session it lost within 3 s of it going idle in its transaction
//! (`idle_in_transaction_session_timeout`), freeing its locks for the retry.

use std::time::{Duration, Instant};

use super::netns::{apart_from_the_unverified_warning, NsServer};
use crate::helpers::*;

/// Past the client's dead-peer detection, which the tests' URL sets to
/// about 2 s ([`NsServer::fast_detection_url`]; 15 s in production), so
/// the connection is really lost.
const LONG_CUT: Duration = Duration::from_secs(4);
/// Every run here must end by itself within this.
const BOUND: Duration = Duration::from_secs(60);

/// What a partitioned run left: its output, how long it took, and the
/// server, to read what it holds.
struct Partitioned {
    out: std::process::Output,
    took: Duration,
    stdout: Vec<String>,
    stderr: String,
    server: NsServer,
}

/// Runs the main job with 10 accounts and 2 deletions, cuts the link when
/// it is held `at`, and mends it after `cut_for` (never, with `None`, until
/// the run ended).
fn partition(at: HoldAt, cut_for: Option<Duration>) -> Partitioned {
    let server = NsServer::start();
    let mut admin = server.admin("bank");
    let mut holder = server.admin("bank");
    hold_at(&mut admin, &mut holder, at);
    let url = server.fast_detection_url();
    let began = Instant::now();
    // The pool's wait is longer than the cut, with room for a connect
    // under way at the mend to time out (connect_timeout 2 s) and be tried
    // again.
    let args = job_args(
        &url,
        10,
        2,
        &["--statement-timeout", "3", "--pool-timeout", "6"],
    );
    let (child, _workdir) = server.spawn_bank(&strs(&args));
    backend_waiting_for_the_lock(&mut admin, "bank");
    server.cut();
    drop(holder);
    // Until the run ends: the link is mended once `cut_for` has passed
    // (the partition's length: the fault itself, not a synchronisation).
    let mend_at = cut_for.map(|cut_for| Instant::now() + cut_for);
    let mut mended = false;
    let (out, took, ended) = wait_bounded_with(child, began, BOUND, || {
        if !mended && mend_at.is_some_and(|at| Instant::now() >= at) {
            server.mend();
            mended = true;
        }
    });
    server.mend();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(ended, "the job did not end within {BOUND:?}: {stderr}");
    let stdout = lines(&out.stdout);
    Partitioned {
        out,
        took,
        stdout,
        stderr,
        server,
    }
}

impl Partitioned {
    fn accounts(&self) -> Vec<(uuid::Uuid, i64)> {
        use diesel::prelude::*;
        bank::schema::accounts::table
            .select((bank::schema::accounts::id, bank::schema::accounts::balance))
            .order(bank::schema::accounts::id)
            .load(&mut self.server.admin("bank"))
            .unwrap()
    }

    fn report(&self, what: &str) {
        eprintln!(
            "partition {what}: ended after {:.1} s with exit code {:?}; stderr: {}; last stdout line: {:?}",
            self.took.as_secs_f64(),
            self.out.status.code(),
            self.stderr.trim_end(),
            self.stdout.last()
        );
    }

    fn printed_accounts(&self) -> Vec<(uuid::Uuid, i64)> {
        printed_accounts(&self.stdout)
    }
}

fn assert_completed(run: &Partitioned) {
    assert_eq!(run.out.status.code(), Some(0), "{}", run.stderr);
    assert_eq!(apart_from_the_unverified_warning(&run.stderr), "");
    let accounts = run.accounts();
    assert_eq!(accounts.len(), 8, "10 created, 2 deleted");
    let deleted = run
        .stdout
        .iter()
        .filter(|l| l.starts_with("Deleted account"))
        .count();
    assert_eq!(deleted, 2, "{:#?}", run.stdout);
    assert!(run.stdout.contains(&"Transfer complete.".to_owned()));
}

#[test]
fn a_partition_in_the_create_phase_is_retried_on_a_new_connection() {
    let run = partition(HoldAt::Statement("INSERT"), Some(LONG_CUT));
    run.report("in the create phase");
    assert_completed(&run);
    assert_eq!(
        run.printed_accounts().len(),
        10,
        "each account created once"
    );
}

#[test]
fn a_partition_in_the_transfer_is_retried_on_a_new_connection() {
    let run = partition(HoldAt::Statement("UPDATE"), Some(LONG_CUT));
    run.report("in the transfer");
    assert_completed(&run);
    assert_eq!(run.printed_accounts().len(), 10);
}

#[test]
fn a_partition_in_the_delete_phase_is_retried_on_a_new_connection() {
    let run = partition(HoldAt::Statement("DELETE"), Some(LONG_CUT));
    run.report("in the delete phase");
    assert_completed(&run);
}

/// The server applied the commit whose answer the partition lost: the
/// phase is idempotent by its keys, so the job retried it on a new
/// connection once the link was back, found it applied, and went on. `-v`
/// is not on, so nothing but the story is printed.
fn assert_resolved(run: &Partitioned) {
    assert_completed(run);
    let before = run.printed_accounts();
    assert_eq!(before.len(), 10, "each account printed once");
    let ledger: i64 = {
        use diesel::prelude::*;
        bank::schema::transfers::table
            .count()
            .get_result(&mut run.server.admin("bank"))
            .unwrap()
    };
    assert_eq!(ledger, 1, "the transfer is in the ledger once");
    // 10 created once, the transfer applied once, 2 deleted: the printed
    // story and the table agree.
    let after = run.accounts();
    let printed_total: i64 = before.iter().map(|(_, b)| b).sum();
    let deleted: Vec<uuid::Uuid> = run
        .stdout
        .iter()
        .filter_map(|l| l.strip_prefix("Deleted account "))
        .map(|l| l.trim_end_matches('.').parse().unwrap())
        .collect();
    let new_balances: Vec<(uuid::Uuid, i64)> = run
        .stdout
        .iter()
        .skip_while(|l| *l != "New balances:")
        .skip(1)
        .take(2)
        .map(|l| {
            let (id, balance) = l
                .strip_prefix("Account ")
                .and_then(|l| l.split_once(": "))
                .unwrap();
            (id.parse().unwrap(), balance.parse().unwrap())
        })
        .collect();
    let mut expected: std::collections::BTreeMap<uuid::Uuid, i64> = before.into_iter().collect();
    expected.extend(new_balances.iter().copied());
    assert_eq!(expected.values().sum::<i64>(), printed_total, "money kept");
    for id in &deleted {
        expected.remove(id);
    }
    assert_eq!(
        after,
        expected.into_iter().collect::<Vec<_>>(),
        "the table holds the printed story"
    );
}

#[test]
fn a_partition_during_the_create_commit_is_resolved_and_applied_once() {
    let run = partition(HoldAt::Commit("INSERT"), Some(LONG_CUT));
    run.report("during the create phase's COMMIT");
    assert_resolved(&run);
}

#[test]
fn a_partition_during_the_transfer_commit_is_resolved_and_applied_once() {
    let run = partition(HoldAt::Commit("UPDATE"), Some(LONG_CUT));
    run.report("during the transfer's COMMIT");
    assert_resolved(&run);
}

#[test]
fn a_partition_during_the_delete_commit_is_resolved_and_applied_once() {
    let run = partition(HoldAt::Commit("DELETE"), Some(LONG_CUT));
    run.report("during the delete phase's COMMIT");
    assert_resolved(&run);
}

#[test]
fn a_partition_that_outlasts_the_bounds_ends_the_job_with_one_line() {
    let run = partition(HoldAt::Statement("UPDATE"), None);
    run.report("in the transfer, never mended");
    assert_eq!(run.out.status.code(), Some(1));
    let stderr = apart_from_the_unverified_warning(&run.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    // The connection is lost, and no new one can be had: the pool's wait
    // ends it, with the reason of the last attempt (no route, or timed out).
    assert!(
        stderr.starts_with(
            "bank: transferring funds: could not get a connection from the pool: \
             timed out waiting for connection: could not connect to postgres@10.99.0.1:5432/bank: "
        ),
        "{}",
        run.stderr
    );
    // The accounts committed before are printed and untouched.
    assert_eq!(run.printed_accounts(), run.accounts());
}
