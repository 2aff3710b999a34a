//! Waits that must end: a lock never released, in each phase; a statement
//! blocked past `--tx-deadline`; a hard error in the middle of the
//! workload. The time asserts are the bounds themselves, with room to
//! spare; nothing here sleeps to synchronise.

use std::process::Output;
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;

use crate::helpers::*;

/// Runs the main job with a statement timeout of 1 s, and checks it ended
/// by itself within a bound that leaves 9 s to spare (killed after it).
fn run_bounded(db: &TestDb, extra: &[&str]) -> Output {
    let url = db.url_string();
    let mut args = vec![
        "--database-url",
        &url,
        "--statement-timeout",
        "1",
        "--max-retries",
        "0",
    ];
    args.extend_from_slice(extra);
    let began = Instant::now();
    let (child, _workdir) = spawn_bank(&[], &args);
    let (out, took, ended) = wait_bounded(child, began, Duration::from_secs(10));
    eprintln!(
        "lock never released: the job ended after {:.1} s: {}",
        took.as_secs_f64(),
        String::from_utf8_lossy(&out.stderr).trim_end()
    );
    assert!(ended, "the job did not end by itself within 10 s");
    out
}

/// Holds `operation` on accounts behind the lock the returned connection
/// holds until it is dropped.
fn hold_lock_for(db: &TestDb, operation: &'static str) -> diesel::PgConnection {
    let mut holder = db.conn();
    hold_at(&mut db.conn(), &mut holder, HoldAt::Statement(operation));
    holder
}

#[test]
fn a_lock_never_released_in_the_create_phase_ends_it_with_nothing_written() {
    let db = TestDb::migrated();
    let _holder = hold_lock_for(&db, "INSERT");
    let out = run_bounded(&db, &["--accounts", "10", "--delete", "2"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        one_line(&out),
        "bank: creating accounts (0 created and committed before this): \
         canceling statement due to statement timeout"
    );
    assert!(out.stdout.is_empty());
    assert_eq!(db.count("accounts"), 0);
}

#[test]
fn a_lock_never_released_in_the_transfer_ends_it_with_the_accounts_shown_and_untouched() {
    let db = TestDb::migrated();
    let _holder = hold_lock_for(&db, "UPDATE");
    let out = run_bounded(&db, &["--accounts", "10", "--delete", "2"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        one_line(&out),
        "bank: transferring funds: canceling statement due to statement timeout"
    );
    // Every committed account was printed, and the database holds exactly
    // those, with the balances they were created with.
    let stdout = lines(&out.stdout);
    assert_eq!(stdout.len(), 11, "{stdout:#?}");
    let printed = printed_accounts(&stdout);
    assert_eq!(printed.len(), 10, "{stdout:#?}");
    assert_eq!(db.accounts(), printed);
}

#[test]
fn a_lock_never_released_in_the_delete_phase_ends_it_with_the_transfer_kept() {
    let db = TestDb::migrated();
    let _holder = hold_lock_for(&db, "DELETE");
    let out = run_bounded(&db, &["--accounts", "10", "--delete", "2"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        one_line(&out),
        "bank: deleting accounts (0 deleted and committed before this): \
         canceling statement due to statement timeout"
    );
    let stdout = lines(&out.stdout);
    assert!(
        stdout.contains(&"Transfer complete.".to_owned()),
        "{stdout:#?}"
    );
    assert!(!stdout.iter().any(|l| l.starts_with("Deleted")));
    assert_eq!(db.count("accounts"), 10, "nothing deleted");
}

#[test]
fn the_tx_deadline_bounds_a_statement_blocked_behind_a_lock() {
    // The case: another session holds the table for longer than the
    // deadline; the statement timeout alone (30 s here) would wait it out.
    let db = TestDb::migrated();
    let mut holder = db.conn();
    holder
        .batch_execute("BEGIN; LOCK TABLE accounts IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    let url = db.url_string();
    let began = Instant::now();
    let args = job_args(
        &url,
        100,
        5,
        &[
            "--tx-deadline",
            "2",
            "--statement-timeout",
            "30",
            "--max-retries",
            "0",
            "-q",
        ],
    );
    let (child, _workdir) = spawn_bank(&[], &strs(&args));
    // Without the deadline's bound the statement would wait its 30 s.
    let (out, took, ended) = wait_bounded(child, began, Duration::from_secs(12));
    eprintln!(
        "table locked past --tx-deadline 2: the job ended after {:.1} s",
        took.as_secs_f64()
    );
    assert!(ended, "the job did not end by itself within 12 s");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        one_line(&out),
        "bank: creating accounts (0 created and committed before this): \
         canceling statement due to statement timeout"
    );
    holder.batch_execute("ROLLBACK").unwrap();
    assert_eq!(db.count("accounts"), 0);
}

#[test]
fn a_hard_error_ends_the_workload_with_its_report_first() {
    let db = TestDb::migrated();
    // After 20 updated rows (10 transfers) every update fails for good.
    db.exec(
        "CREATE SEQUENCE updates;
         CREATE FUNCTION break_after() RETURNS trigger AS $$
         BEGIN
             IF nextval('updates') > 20 THEN
                 RAISE EXCEPTION 'the disk is on fire' USING ERRCODE = 'XX000';
             END IF;
             RETURN NEW;
         END $$ LANGUAGE plpgsql;
         CREATE TRIGGER break_after BEFORE UPDATE ON accounts
         FOR EACH ROW EXECUTE FUNCTION break_after()",
    );
    let url = db.url_string();
    let run = |json: bool| {
        let mut args = vec![
            "--database-url",
            &url,
            "workload",
            "--workers",
            "1",
            "--accounts",
            "10",
            "--transfers",
            "100",
        ];
        if json {
            args.push("--json");
        }
        bank(&args)
    };
    let out = run(true);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(one_line(&out), "bank: transferring: the disk is on fire");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["committed"], 10, "{report}");
    assert_eq!(report["failed"], 1, "{report}");
    assert_eq!(report["invariant_ok"], true, "{report}");
    assert_eq!(report["error"], "transferring: the disk is on fire");
    // The same in text: the report, then the error.
    let out = run(false);
    assert_eq!(out.status.code(), Some(1));
    let text = lines(&out.stdout);
    assert_eq!(text.len(), 6, "{text:#?}");
    assert!(
        text[2].ends_with("gave up: 0 (0 attempts, 0 deadline, 0 retry budget), failed: 1"),
        "{}",
        text[2]
    );
}

/// Resumes a stopped backend when dropped, whatever the test did.
struct Frozen(i32);

impl Frozen {
    fn stop(pid: i32) -> Self {
        signal("-STOP", pid);
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        signal("-CONT", self.0);
    }
}

fn signal(which: &str, pid: i32) {
    let status = std::process::Command::new("kill")
        .args([which, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill {which} {pid}");
}

/// Waits 30 s at the most for `child` to end by itself (killing it after
/// that), then resumes the frozen backend; returns what the child printed
/// and how long it ran since `began`.
fn wait_ending(child: std::process::Child, began: Instant, frozen: Frozen) -> (Output, Duration) {
    let (out, took, ended) = wait_bounded(child, began, Duration::from_secs(30));
    drop(frozen);
    assert!(ended, "the run did not end within 30 s");
    (out, took)
}

/// The limits the frozen-backend runs set: a deadline of 1 s, one
/// statement's wait of 1 s, and the watchdog's slack of 1 s (5 s in
/// production) after them, so the watchdog ends the run after 3 s.
const FROZEN_LIMITS: [&str; 6] = [
    "--tx-deadline",
    "1",
    "--statement-timeout",
    "1",
    "--watchdog-slack",
    "1",
];

const STALL: &str = "no answer from the server within 3 s, every limit included; \
                     its process may be frozen or its disk stalled, so this run stops here";

/// Freezes the job's backend while its `operation` waits for a lock, lets
/// the lock go, and checks the job ends within its bound with one line
/// naming `phase`; returns what it printed on stdout.
fn frozen_in(operation: &'static str, phase: &str) -> Vec<String> {
    let db = TestDb::migrated();
    let holder = hold_lock_for(&db, operation);
    let url = db.url_string();
    let began = Instant::now();
    let mut args = vec!["--database-url", &url, "--accounts", "10", "--delete", "2"];
    args.extend(FROZEN_LIMITS);
    let (child, _workdir) = spawn_bank(&[], &args);
    // Freeze the backend while it waits, then let the lock go: a stopped
    // process neither takes it nor runs its statement timeout.
    let frozen = Frozen::stop(backend_waiting_for_the_lock(&mut db.conn(), &db.name));
    drop(holder);
    let (out, took) = wait_ending(child, began, frozen);
    eprintln!(
        "frozen backend while {phase}: the job ended after {:.1} s: {}",
        took.as_secs_f64(),
        String::from_utf8_lossy(&out.stderr).trim_end()
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(one_line(&out), format!("bank: {phase}: {STALL}"));
    lines(&out.stdout)
}

#[test]
fn a_frozen_backend_ends_the_create_phase_within_the_bound() {
    // Nothing committed, nothing printed.
    assert!(frozen_in("INSERT", "creating accounts").is_empty());
}

#[test]
fn a_frozen_backend_ends_the_transfer_within_the_bound() {
    // Everything committed was printed: the accounts, not the transfer.
    assert_eq!(frozen_in("UPDATE", "transferring funds").len(), 11);
}

#[test]
fn a_frozen_backend_ends_the_delete_phase_within_the_bound() {
    let stdout = frozen_in("DELETE", "deleting accounts");
    assert!(
        stdout.contains(&"Transfer complete.".to_owned()),
        "{stdout:#?}"
    );
    assert!(!stdout.iter().any(|l| l.starts_with("Deleted")));
}

#[test]
fn a_frozen_backend_ends_the_workload_with_its_report_so_far() {
    let db = TestDb::migrated();
    // Only the first transfer waits for the lock: the others go on, and
    // with 1,000 accounts they rarely touch the frozen one's two.
    let mut holder = db.conn();
    hold_at(
        &mut db.conn(),
        &mut holder,
        HoldAt::FirstStatement("UPDATE"),
    );
    let url = db.url_string();
    let began = Instant::now();
    let mut args = vec!["--database-url", &url];
    args.extend(FROZEN_LIMITS);
    args.extend([
        "workload",
        "--workers",
        "3",
        "--accounts",
        "1000",
        "--duration",
        "1",
        "--json",
    ]);
    let (child, _workdir) = spawn_bank(&[], &args);
    // One worker's backend frozen while it waits; the others go on once
    // the lock is free, until the duration ends.
    let frozen = Frozen::stop(backend_waiting_for_the_lock(&mut db.conn(), &db.name));
    drop(holder);
    let (out, took) = wait_ending(child, began, frozen);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(one_line(&out), format!("bank: transferring: {STALL}"));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|err| panic!("{err}: {}", String::from_utf8_lossy(&out.stdout)));
    eprintln!("frozen backend in the workload: ended after {took:?}, printed {report}");
    // The stuck transfer is in doubt: resumed, its backend may commit it.
    assert_eq!(report["in_doubt"], 1, "{report}");
    assert!(report["committed"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["invariant_ok"], serde_json::Value::Null, "{report}");
    assert_eq!(report["error"], format!("transferring: {STALL}"));
    // Whatever the resumed backend does, the money is all there.
    let mut watcher = db.conn();
    let total: i64 = scalar::<diesel::sql_types::BigInt, _>(
        &mut watcher,
        "(SELECT sum(balance)::INT8 FROM accounts)",
    )
    .unwrap();
    assert_eq!(report["total_before"], total);
}
