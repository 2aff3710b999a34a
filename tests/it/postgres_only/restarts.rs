//! Server restarts under the main job and the workload: `pg_ctl restart`
//! in `immediate` mode (a crash: every backend killed, recovery on start)
//! and in `fast` mode (backends told to end, then a clean shutdown), on a
//! private server (see `netns`) so the suite's shared one stays up.
//!
//! The job is held inside its transfer by a trigger waiting for an advisory
//! lock the harness holds, so the restart lands inside an open transaction;
//! the restart ends the harness's session too, which frees the lock.

use std::process::Output;
use std::time::{Duration, Instant};

use diesel::sql_types::BigInt;

use super::netns::{apart_from_the_unverified_warning, NsServer};
use crate::helpers::*;

const BOUND: Duration = Duration::from_secs(60);

fn main_job_through_a_restart(mode: &str) {
    let server = NsServer::start();
    let mut admin = server.admin("bank");
    // The restart ends the holder's session too, which frees the lock.
    let mut holder = server.admin("bank");
    hold_at(&mut admin, &mut holder, HoldAt::Statement("UPDATE"));
    let url = server.client_url();
    let began = Instant::now();
    let args = job_args(&url, 10, 2, &["--statement-timeout", "3"]);
    let (child, _workdir) = server.spawn_bank(&strs(&args));
    backend_waiting_for_the_lock(&mut admin, "bank");
    server.restart(mode);
    let (out, took, ended) = wait_bounded(child, began, BOUND);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "restart -m {mode} in the transfer: the job ended after {:.1} s, exit code {:?}, stderr {:?}",
        took.as_secs_f64(),
        out.status.code(),
        stderr.trim_end()
    );
    assert!(ended, "the job did not end within {BOUND:?}");
    // Retried on a new connection once the server was back: the job ran to
    // its end, each phase once.
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(apart_from_the_unverified_warning(&stderr), "");
    let stdout = lines(&out.stdout);
    assert_eq!(
        stdout
            .iter()
            .filter(|l| l.starts_with("Created new account"))
            .count(),
        10
    );
    assert!(stdout.contains(&"Transfer complete.".to_owned()));
    let mut after = server.admin("bank");
    let left: i64 = scalar::<BigInt, _>(&mut after, "(SELECT count(*) FROM accounts)").unwrap();
    assert_eq!(left, 8);
}

#[test]
fn the_main_job_survives_a_crash_restart_in_its_transfer() {
    main_job_through_a_restart("immediate");
}

#[test]
fn the_main_job_survives_a_fast_restart_in_its_transfer() {
    main_job_through_a_restart("fast");
}

fn workload_through_a_restart(mode: &str) -> Output {
    let server = NsServer::start();
    let url = server.client_url();
    let began = Instant::now();
    let (child, _workdir) = server.spawn_bank(&[
        "--database-url",
        &url,
        "--statement-timeout",
        "3",
        "workload",
        "--workers",
        "4",
        "--accounts",
        "100",
        "--duration",
        "2",
        "--json",
    ]);
    // Restart once every worker is connected and transferring: four of the
    // app's sessions in the table's database, looked for at most 400 times.
    let mut watcher = server.admin("bank");
    let mut busy = 0;
    for _ in 0..400 {
        busy = scalar::<BigInt, _>(
            &mut watcher,
            "(SELECT count(*) FROM pg_stat_activity WHERE datname = 'bank' \
             AND application_name = 'docs_simplecrud_diesel')",
        )
        .unwrap();
        if busy >= 4 {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    assert!(busy >= 4, "the workers never connected");
    server.restart(mode);
    let (out, took, ended) = wait_bounded(child, began, BOUND);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "restart -m {mode} under the workload: ended after {:.1} s, exit code {:?}, stdout {}, stderr {:?}",
        took.as_secs_f64(),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).trim_end(),
        stderr.trim_end()
    );
    assert!(ended, "the workload did not end within {BOUND:?}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["invariant_ok"], true, "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    assert!(report["committed"].as_u64().unwrap() > 0, "{report}");
    // The balances the report read are the ones in the table.
    let mut after = server.admin("bank");
    let total: i64 =
        scalar::<BigInt, _>(&mut after, "(SELECT sum(balance)::INT8 FROM accounts)").unwrap();
    assert_eq!(report["total_after"], total);
    out
}

#[test]
fn the_workload_survives_a_crash_restart() {
    workload_through_a_restart("immediate");
}

#[test]
fn the_workload_survives_a_fast_restart() {
    workload_through_a_restart("fast");
}
