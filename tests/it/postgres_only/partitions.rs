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

use diesel::connection::SimpleConnection;
use diesel::PgConnection;

use super::netns::NsServer;
use crate::helpers::*;

/// Past the client's dead-peer detection (keepalives after 5 s idle, then
/// `tcp_user_timeout` 15 s), so the connection is really lost.
const LONG_CUT: Duration = Duration::from_secs(20);
/// Every run here must end by itself within this.
const BOUND: Duration = Duration::from_secs(60);

/// Where the job is held when the link goes down.
#[derive(Clone, Copy)]
enum At {
    /// Inside the phase's statement (`INSERT`, `UPDATE` or `DELETE`).
    Statement(&'static str),
    /// Inside the COMMIT of the transaction that ran it.
    Commit(&'static str),
}

fn hold_at(admin: &mut PgConnection, at: At) {
    admin
        .batch_execute(
            "CREATE FUNCTION wait_for_lock() RETURNS trigger AS $$
             BEGIN PERFORM pg_advisory_xact_lock(4242); RETURN NULL; END $$ LANGUAGE plpgsql",
        )
        .unwrap();
    let trigger = match at {
        At::Statement(op) => format!(
            "CREATE TRIGGER wait_for_lock BEFORE {op} ON accounts \
             FOR EACH STATEMENT EXECUTE FUNCTION wait_for_lock()"
        ),
        At::Commit(op) => format!(
            "CREATE CONSTRAINT TRIGGER wait_for_lock AFTER {op} ON accounts \
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION wait_for_lock()"
        ),
    };
    admin.batch_execute(&trigger).unwrap();
}

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
fn partition(at: At, cut_for: Option<Duration>) -> Partitioned {
    let server = NsServer::start();
    let mut admin = server.admin("bank");
    hold_at(&mut admin, at);
    let mut holder = server.admin("bank");
    holder
        .batch_execute("SELECT pg_advisory_lock(4242)")
        .unwrap();
    let url = server.client_url();
    let began = Instant::now();
    let child = server.spawn_bank(&[
        "--database-url",
        &url,
        "--accounts",
        "10",
        "--delete",
        "2",
        "--statement-timeout",
        "3",
    ]);
    server.backend_waiting_for_the_lock(&mut admin);
    server.cut();
    drop(holder);
    // Until the run ends: the link is mended once `cut_for` has passed
    // (the partition's length: the fault itself, not a synchronisation).
    let mend_at = cut_for.map(|cut_for| Instant::now() + cut_for);
    let mut mended = false;
    let mut child = child;
    let ended = loop {
        if !mended && mend_at.is_some_and(|at| Instant::now() >= at) {
            server.mend();
            mended = true;
        }
        if child.try_wait().unwrap().is_some() {
            break true;
        }
        if began.elapsed() > BOUND {
            let _ = child.kill();
            break false;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = began.elapsed();
    let out = child.wait_with_output().unwrap();
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

    /// The accounts the job printed as created, with their balances.
    fn printed_accounts(&self) -> Vec<(uuid::Uuid, i64)> {
        let mut printed: Vec<(uuid::Uuid, i64)> = self
            .stdout
            .iter()
            .filter_map(|line| line.strip_prefix("Created new account with id "))
            .map(|rest| {
                let (id, balance) = rest.split_once(" and balance ").unwrap();
                (
                    id.parse().unwrap(),
                    balance.trim_end_matches('.').parse().unwrap(),
                )
            })
            .collect();
        printed.sort();
        printed
    }
}

const AMBIGUOUS_CREATE: &str = "bank: creating accounts (0 created and committed before this): \
     commit result is ambiguous on attempt 1: the transaction may or may not have been applied; \
     check the data before retrying (";
const AMBIGUOUS_TRANSFER: &str = "bank: transferring funds: \
     commit result is ambiguous on attempt 1: the transaction may or may not have been applied; \
     check the data before retrying (";

fn assert_completed(run: &Partitioned) {
    assert_eq!(run.out.status.code(), Some(0), "{}", run.stderr);
    assert!(run.stderr.is_empty(), "{}", run.stderr);
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
    let run = partition(At::Statement("INSERT"), Some(LONG_CUT));
    run.report("in the create phase, 20 s");
    assert_completed(&run);
    assert_eq!(
        run.printed_accounts().len(),
        10,
        "each account created once"
    );
}

#[test]
fn a_partition_in_the_transfer_is_retried_on_a_new_connection() {
    let run = partition(At::Statement("UPDATE"), Some(LONG_CUT));
    run.report("in the transfer, 20 s");
    assert_completed(&run);
    assert_eq!(run.printed_accounts().len(), 10);
}

#[test]
fn a_partition_in_the_delete_phase_is_retried_on_a_new_connection() {
    let run = partition(At::Statement("DELETE"), Some(LONG_CUT));
    run.report("in the delete phase, 20 s");
    assert_completed(&run);
}

#[test]
fn a_partition_during_the_create_commit_is_reported_ambiguous_and_applied_once() {
    let run = partition(At::Commit("INSERT"), Some(LONG_CUT));
    run.report("during the create phase's COMMIT, 20 s");
    assert_eq!(run.out.status.code(), Some(1));
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    assert!(run.stderr.starts_with(AMBIGUOUS_CREATE), "{}", run.stderr);
    assert!(
        run.printed_accounts().is_empty(),
        "nothing printed as created"
    );
    // The commit went through on the server: the accounts are there once.
    assert_eq!(run.accounts().len(), 10);
}

#[test]
fn a_partition_during_the_transfer_commit_is_reported_ambiguous_and_applied_once() {
    let run = partition(At::Commit("UPDATE"), Some(LONG_CUT));
    run.report("during the transfer's COMMIT, 20 s");
    assert_eq!(run.out.status.code(), Some(1));
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    assert!(run.stderr.starts_with(AMBIGUOUS_TRANSFER), "{}", run.stderr);
    let before = run.printed_accounts();
    let after = run.accounts();
    assert_eq!(before.len(), 10);
    assert_eq!(
        before.iter().map(|(_, b)| b).sum::<i64>(),
        after.iter().map(|(_, b)| b).sum::<i64>(),
        "no money made or lost"
    );
    let changed = before.iter().zip(&after).filter(|(b, a)| b != a).count();
    assert_eq!(
        changed, 2,
        "the transfer applied once: {before:?} {after:?}"
    );
}

#[test]
fn a_partition_that_outlasts_the_bounds_ends_the_job_with_one_line() {
    let run = partition(At::Statement("UPDATE"), None);
    run.report("in the transfer, never mended");
    assert_eq!(run.out.status.code(), Some(1));
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    // The connection is lost, and no new one can be had: the pool's wait
    // ends it, with the reason of the last attempt (no route, or timed out).
    assert!(
        run.stderr.starts_with(
            "bank: transferring funds: could not get a connection from the pool: \
             timed out waiting for connection: could not connect to postgres@10.99.0.1:5432/bank: "
        ),
        "{}",
        run.stderr
    );
    // The accounts committed before are printed and untouched.
    assert_eq!(run.printed_accounts(), run.accounts());
}
