//! Behind a real PgBouncer (Debian's, which `./dev test` installs), in
//! transaction and in session pooling mode, with no flag of the app's: the
//! main job and an 8-worker workload run through it and keep the bank's
//! invariant. PgBouncer refuses to run as root, so it runs as the postgres
//! user, in a directory of its own, stopped when the test ends (or, should
//! the test process die, when the pipe it holds closes).

use std::fs;
use std::io::Write;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use diesel::sql_types::Text;

use crate::helpers::*;
use crate::main_job::{check_story, parse};

/// Where Debian installs it.
const PGBOUNCER: &str = "/usr/sbin/pgbouncer";

/// One PgBouncer in front of the suite's server.
struct Bouncer {
    port: u16,
    dir: PathBuf,
    child: Child,
    stop: Option<ChildStdin>,
}

impl Bouncer {
    /// Starts one in `mode` (`transaction` or `session`) on a free port,
    /// forwarding every database to the server of `db`.
    fn start(db: &TestDb, mode: &str) -> Self {
        let upstream = scalar::<Text, String>(&mut db.conn(), "current_setting('port')").unwrap();
        let dir = tempdir().keep();
        for _ in 0..5 {
            let port: u16 = rand::random_range(20_000..30_000);
            fs::write(dir.join("users.txt"), "\"postgres\" \"\"\n").unwrap();
            fs::write(
                dir.join("pgbouncer.ini"),
                format!(
                    "[databases]\n* = host=127.0.0.1 port={upstream}\n\
                     [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
                     unix_socket_dir =\nauth_type = trust\nauth_file = {users}\n\
                     pool_mode = {mode}\ndefault_pool_size = 20\n\
                     logfile = {log}\n",
                    users = dir.join("users.txt").display(),
                    log = dir.join("pgbouncer.log").display(),
                ),
            )
            .unwrap();
            run(Command::new("chown").args(["-R", "postgres:"]).arg(&dir));
            // PgBouncer runs until the pipe from this process closes: when
            // the Bouncer is dropped, or when this process exits.
            let script = format!(
                "{PGBOUNCER} {ini} & pid=$!; cat >/dev/null; kill $pid; wait $pid",
                ini = dir.join("pgbouncer.ini").display()
            );
            let mut child = if is_root() {
                let mut cmd = Command::new("runuser");
                cmd.args(["-u", "postgres", "--", "sh", "-c", &script]);
                cmd
            } else {
                let mut cmd = Command::new("sh");
                cmd.args(["-c", &script]);
                cmd
            }
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pgbouncer (./dev test installs it)");
            let stop = child.stdin.take();
            let began = Instant::now();
            while began.elapsed() < Duration::from_secs(10) {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Self {
                        port,
                        dir,
                        child,
                        stop,
                    };
                }
                if fs::read_to_string(dir.join("pgbouncer.log"))
                    .is_ok_and(|log| log.contains("Address already in use"))
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            drop(stop);
            let _ = child.wait();
        }
        panic!(
            "pgbouncer did not start: {}",
            fs::read_to_string(dir.join("pgbouncer.log")).unwrap_or_default()
        );
    }

    fn url(&self, db: &TestDb) -> String {
        format!(
            "postgresql://postgres@127.0.0.1:{}/{}?sslmode=disable",
            self.port, db.name
        )
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        if let Some(mut stop) = self.stop.take() {
            let _ = stop.flush();
        }
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// What the app says, once, when PgBouncer refuses the startup options that
/// carry its session timeouts.
const NO_OPTIONS: &str = "refused the startup options that set the session timeouts";
/// What the helper says, once, when a transaction-mode pooler moves a
/// connection between server sessions.
const POOLER: &str = "a transaction-mode pooler (PgBouncer?) gives this connection's transactions \
                      different server sessions";

fn the_main_job_and_a_workload_through(mode: &str) -> (String, serde_json::Value) {
    let db = TestDb::migrated();
    let bouncer = Bouncer::start(&db, mode);
    let (stderr, report) = through(&bouncer, &db, mode, &[]);
    if mode == "transaction" {
        // Said up front, no statement is ever named: nothing to detect.
        let (told, report) = through(&bouncer, &db, mode, &["--unnamed-statements"]);
        assert!(!told.contains(POOLER), "{told}");
        assert_eq!(report["retries_by_cause"]["other"], 0, "{report}");
    }
    (stderr, report)
}

fn through(
    bouncer: &Bouncer,
    db: &TestDb,
    mode: &str,
    flags: &[&str],
) -> (String, serde_json::Value) {
    let url = bouncer.url(db);

    let mut args = vec!["--database-url", &url];
    args.extend_from_slice(flags);
    let out = bank(&args);
    assert_ok(&out);
    let story = parse(&lines(&out.stdout), 100, 5);
    check_story(db, &story);
    db.exec("DELETE FROM accounts; DELETE FROM transfers");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(stderr.lines().count(), 1, "{mode}: {stderr}");
    assert!(stderr.contains(NO_OPTIONS), "{mode}: {stderr}");

    let other = TestDb::migrated();
    let args = workload_args(
        &bouncer.url(&other),
        flags,
        8,
        100,
        &["--duration", "5", "--json"],
    );
    let out = bank(&strs(&args));
    assert_ok(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["invariant_ok"], true, "{mode}: {report}");
    assert_eq!(report["failed"], 0, "{mode}: {report}");
    assert!(report["committed"].as_u64().unwrap() > 0, "{report}");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!(
        "pgbouncer {mode}: {} committed in 5 s, retries {}; stderr:\n{stderr}",
        report["committed"], report["retries_by_cause"]
    );
    assert_eq!(
        stderr.matches(NO_OPTIONS).count(),
        1,
        "{mode}: once, for the first connection: {stderr}"
    );
    (stderr, report)
}

#[test]
fn behind_pgbouncer_in_transaction_mode_statements_go_unnamed_and_nothing_breaks() {
    let (stderr, report) = the_main_job_and_a_workload_through("transaction");
    // Eight workers' named statements meet other sessions' within seconds:
    // the helper says so once, and retried those transactions.
    assert_eq!(stderr.matches(POOLER).count(), 1, "{stderr}");
    assert!(report["retries_by_cause"]["other"].as_u64().unwrap() >= 1);
    assert_eq!(stderr.lines().count(), 2, "{stderr}");
}

#[test]
fn behind_pgbouncer_in_session_mode_statements_stay_named() {
    let (stderr, _) = the_main_job_and_a_workload_through("session");
    assert!(!stderr.contains(POOLER), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}
