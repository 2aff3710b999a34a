//! Secure connections, tested the way CockroachDB Cloud is used: a private
//! PostgreSQL that accepts only TLS with scram-sha-256 passwords, a server
//! certificate signed by a CA made for the test, and an application user
//! that may only read and write `accounts`.
//!
//! One such server serves every test here (started by the first, its
//! certificates made once); each test gets a database of its own.

use std::fs;
use std::net::SocketAddr;
use std::process::Output;
use std::time::Duration;

mod asynchronous;
mod fixture;

use crate::helpers::*;
use fixture::{misconfigurations, TlsDb, SENTINEL};
use testbed::proxy::Proxy;

fn assert_one_line_failure(out: &Output, expected: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(stderr.lines().count(), 1, "not one line:\n{stderr}");
    assert!(
        stderr.contains(expected),
        "expected '{expected}' in: {stderr}"
    );
    assert!(!stderr.contains(SENTINEL), "password leaked: {stderr}");
}

#[test]
fn verified_tls_works_and_each_misconfiguration_is_one_clear_line() {
    let db = TlsDb::new();
    let out = bank(&["--database-url", &db.url()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(lines(&out.stdout).len(), 115);
    assert_eq!(db.admin_sql("SELECT count(*) FROM accounts"), "95");
    // pg_hba.conf admits TCP connections only as hostssl, and the
    // sslmode=disable case below is refused: the job ran over TLS.

    for (url, expected) in misconfigurations(&db) {
        assert_one_line_failure(&bank(&["--database-url", &url]), expected);
    }
}

#[test]
fn the_application_user_runs_the_job_but_may_not_change_the_schema() {
    let db = TlsDb::new();
    let url = db.url();
    let out = bank(&["--database-url", &url, "--accounts", "10", "--delete", "2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(db.admin_sql("SELECT count(*) FROM accounts"), "8");

    // DDL is refused to it: migrations cannot create their bookkeeping table.
    let out = bank(&["--database-url", &url, "migrate"]);
    assert_one_line_failure(&out, "permission denied");
    let mut conn = bank::db::establish(&bank::db::DbUrl::parse(&url).unwrap()).unwrap();
    for ddl in [
        "CREATE TABLE sneaky (id INT8)",
        "DROP TABLE accounts",
        "ALTER TABLE accounts ADD COLUMN note TEXT",
    ] {
        let result = diesel::connection::SimpleConnection::batch_execute(&mut conn, ddl);
        let err = result.expect_err(ddl).to_string();
        assert!(
            err.contains("permission denied") || err.contains("must be owner"),
            "{ddl}: {err}"
        );
    }
}

#[test]
fn a_user_without_privileges_is_told_so_and_shown_the_grant() {
    let db = TlsDb::new();
    let url = db.url().replace("maxroach:", "nogrant:");
    let out = bank(&["--database-url", &url]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim_end(),
        format!(
            "bank: user nogrant may not read and write table \"accounts\" (and add to \"transfers\") in nogrant@localhost:{}/{}; \
             an admin can allow it with: GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE accounts TO nogrant; \
             GRANT SELECT, INSERT ON TABLE transfers TO nogrant",
            db.server.port, db.name
        )
    );
}

#[test]
fn no_password_reaches_any_output_at_any_verbosity() {
    let db = TlsDb::new();
    let (_reserved, closed) = refusing_port();
    let closed_url = format!("postgresql://maxroach:{SENTINEL}@127.0.0.1:{closed}/bank");
    let wrong_ca = db.url_with(
        "localhost",
        SENTINEL,
        "sslmode=verify-full&sslrootcert=/nonexistent/ca.crt",
    );
    let commands: [&[&str]; 4] = [
        &[],
        &["migrate"],
        &[
            "workload",
            "--workers",
            "2",
            "--accounts",
            "4",
            "--transfers",
            "20",
        ],
        &["--accounts", "3", "--delete", "1"],
    ];
    for (url, working) in [(db.url(), true), (closed_url, false), (wrong_ca, false)] {
        for command in commands {
            for verbose in [false, true] {
                let workdir = tempdir();
                let mut cmd = bank_cmd(workdir.path());
                cmd.args(["--database-url", &url]).args(command);
                if verbose {
                    cmd.arg("-v");
                }
                let out = cmd.output().unwrap();
                let all = format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                assert!(
                    !all.contains(SENTINEL),
                    "password in the output of {command:?}:\n{all}"
                );
                assert!(
                    !all.contains(&url),
                    "full connection string in the output of {command:?}:\n{all}"
                );
                // The application user may not create the schema; every
                // other command works against the working server.
                let should_succeed = working && command != ["migrate"];
                assert_eq!(
                    out.status.success(),
                    should_succeed,
                    "{command:?} (working server: {working}):\n{all}"
                );
            }
        }
    }
    // Also through the environment and .env, where clap could echo it.
    let dir = tempdir();
    fs::write(
        dir.path().join(".env"),
        format!("DATABASE_URL={}\n", db.url()),
    )
    .unwrap();
    let out = bank_cmd(dir.path()).args(["--help"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(SENTINEL),
        "--help shows the URL"
    );
}

/// r2d2 opens a pool's connections on background threads. A process that
/// exited while one of them was inside libpq (and OpenSSL, which libpq uses
/// for TLS and for scram) crashed in OpenSSL's exit-time cleanup, in about
/// one run in four with 16 workers (issue #9). This makes that moment
/// certain instead of likely: a proxy carries the first connection at once
/// and stalls every later one for 1.5 s, so the second worker's checkout
/// gives up after `--pool-timeout 0.5` while its connect is still inside
/// libpq; the one connected worker finishes, and the process must wait for
/// that connect before it exits, and exit 0. (With the wait removed, the
/// flight count below fails every run.)
fn exits_cleanly_with_a_connect_in_flight(db: &TlsDb, user: &str, host: &str, params: &str) {
    let upstream: SocketAddr = format!("127.0.0.1:{}", db.server.port).parse().unwrap();
    for run in 1..=3 {
        let proxy = Proxy::stalling(upstream, Duration::from_millis(1500)).unwrap();
        let url = db
            .url_on(host, proxy.port(), SENTINEL, params)
            .replace("maxroach:", &format!("{user}:"));
        let args = workload_args(
            &url,
            &["--pool-timeout", "0.5"],
            2,
            4,
            &["--transfers", "10"],
        );
        let out = bank(&strs(&args));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(0),
            "run {run}: {:?} {stderr}",
            out.status
        );
        // The cause, not just the outcome: a worker went without, and the
        // process waited for the connect still under way when it was done.
        assert!(
            stderr.contains("1 of 2 workers got no connection and do not run"),
            "run {run}: {stderr}"
        );
        // The stalled connect went on talking to the server after the
        // stall, so the process was still there: it waited, rather than
        // exit with the connect inside libpq. (A process that did not wait
        // leaves one flight, sent before it died, on that connection.)
        let flights = proxy
            .round_trips()
            .iter()
            .filter(|rt| rt.connection == 1)
            .count();
        assert!(
            flights >= 2,
            "run {run}: the stalled connect was abandoned at exit ({flights} flights): {stderr}"
        );
        assert!(!stderr.contains(SENTINEL), "run {run}: {stderr}");
    }
}

#[test]
fn the_workload_over_tls_with_scram_exits_cleanly_with_a_connect_in_flight() {
    let db = TlsDb::new();
    let params = format!("sslmode=verify-full&sslrootcert={}", db.server.ca());
    exits_cleanly_with_a_connect_in_flight(&db, "maxroach", "localhost", &params);
}

#[test]
fn the_workload_with_scram_without_tls_exits_cleanly_with_a_connect_in_flight() {
    let db = TlsDb::new();
    exits_cleanly_with_a_connect_in_flight(&db, "plainroach", "127.0.0.1", "sslmode=disable");
}
