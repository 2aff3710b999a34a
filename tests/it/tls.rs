//! Secure connections, tested the way CockroachDB Cloud is used: a private
//! PostgreSQL that accepts only TLS with scram-sha-256 passwords, a server
//! certificate signed by a CA made for the test, and an application user
//! that may only read and write `accounts`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::helpers::*;

const SENTINEL: &str = "Sentinel-tls-Pa55";
const ADMIN: &str = "postgres";

/// A throwaway TLS-only server with database `bank`, the schema from
/// dbinit.sql (run by the admin), and user `maxroach` set up as the README
/// says.
struct TlsServer {
    dir: PathBuf,
    port: u16,
    bin: PathBuf,
}

impl TlsServer {
    fn start() -> Self {
        let dir = tempdir().keep();
        let bin = pg_bindir();
        make_certificates(&dir);
        let data = dir.join("data");
        fs::write(dir.join("pw"), "admin-password\n").unwrap();
        run(Command::new("chown").args(["-R", "postgres:"]).arg(&dir));
        run(as_postgres(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                ADMIN,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-instructions",
            ])
            .arg(format!("--pwfile={}", dir.join("pw").display())));
        // Only TLS over TCP, but for one user who shows scram passwords
        // without TLS; the admin works through the Unix socket.
        fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\nhostssl all all ::1/128 scram-sha-256\n\
             hostnossl bank plainroach 127.0.0.1/32 scram-sha-256\n",
        )
        .unwrap();
        let conf = format!(
            "\nssl = on\nssl_cert_file = '{d}/server.crt'\nssl_key_file = '{d}/server.key'\n\
             listen_addresses = '127.0.0.1'\nunix_socket_directories = '{d}'\nfsync = off\n",
            d = dir.display()
        );
        let mut postgresql_conf = fs::read_to_string(data.join("postgresql.conf")).unwrap();
        postgresql_conf.push_str(&conf);
        fs::write(data.join("postgresql.conf"), postgresql_conf).unwrap();
        run(Command::new("chown").args(["-R", "postgres:"]).arg(&dir));
        // The server binds its port itself: a random one, and another if
        // that one is taken (a port probed free and then handed over could
        // be taken in between by a parallel test).
        let mut attempts = 0;
        let port = loop {
            attempts += 1;
            // Below the kernel's ephemeral range, so no client socket holds it.
            let port: u16 = rand::random_range(10_000..20_000);
            let started = as_postgres(&bin.join("pg_ctl"))
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(dir.join("log"))
                .args(["-w", "-t", "60", "-o", &format!("-p {port}"), "start"])
                .output()
                .expect("pg_ctl");
            if started.status.success() {
                break port;
            }
            let log = fs::read_to_string(dir.join("log")).unwrap_or_default();
            assert!(
                attempts < 5 && log.contains("could not bind"),
                "the TLS server did not start: {log}"
            );
        };
        let server = Self { dir, port, bin };
        server.admin_sql("postgres", "CREATE DATABASE bank");
        let out = run(Command::new("psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-f"])
            .arg(repo_root().join("dbinit.sql"))
            .arg(server.admin_conninfo("bank")));
        assert!(out.status.success());
        // The README's application user, verbatim.
        server.admin_sql(
            "bank",
            &format!(
                "CREATE USER maxroach WITH PASSWORD '{SENTINEL}';
                 GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE accounts TO maxroach;
                 CREATE USER nogrant WITH PASSWORD '{SENTINEL}';
                 CREATE USER plainroach WITH PASSWORD '{SENTINEL}';
                 GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE accounts TO plainroach;"
            ),
        );
        server
    }

    fn admin_conninfo(&self, database: &str) -> String {
        format!(
            "host={} port={} user={ADMIN} dbname={database}",
            self.dir.display(),
            self.port
        )
    }

    fn admin_sql(&self, database: &str, sql: &str) -> String {
        let out = run(Command::new("psql")
            .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .arg(self.admin_conninfo(database)));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn ca(&self) -> String {
        self.dir.join("ca.crt").display().to_string()
    }

    /// The application's URL: TLS verified against our CA, host `localhost`.
    fn url(&self) -> String {
        self.url_with(
            "localhost",
            SENTINEL,
            &format!("sslmode=verify-full&sslrootcert={}", self.ca()),
        )
    }

    fn url_with(&self, host: &str, password: &str, params: &str) -> String {
        format!(
            "postgresql://maxroach:{password}@{host}:{}/bank?{params}",
            self.port
        )
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "stop"])
            .output();
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// A CA, a server certificate it signed for `localhost` only, and a second
/// CA that signed nothing.
fn make_certificates(dir: &Path) {
    let openssl = |args: &[&str]| {
        run(Command::new("openssl").args(args).current_dir(dir));
    };
    for ca in ["ca", "other-ca"] {
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN=bank test {ca}"),
            "-keyout",
            &format!("{ca}.key"),
            "-out",
            &format!("{ca}.crt"),
        ]);
    }
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    fs::write(dir.join("san.ext"), "subjectAltName = DNS:localhost\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.crt",
    ]);
    // PostgreSQL refuses a key others can read.
    run(Command::new("chmod").arg("600").arg(dir.join("server.key")));
}

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
    let server = TlsServer::start();
    let out = bank(&["--database-url", &server.url()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(lines(&out.stdout).len(), 115);
    assert_eq!(
        server.admin_sql("bank", "SELECT count(*) FROM accounts"),
        "95"
    );
    // pg_hba.conf admits TCP connections only as hostssl, and the
    // sslmode=disable case below is refused: the job ran over TLS.

    let other_ca = server.dir.join("other-ca.crt").display().to_string();
    let cases = [
        (
            server.url_with(
                "localhost",
                SENTINEL,
                "sslmode=verify-full&sslrootcert=/nonexistent/ca.crt",
            ),
            "the CA certificate file /nonexistent/ca.crt does not exist",
        ),
        (
            server.url_with(
                "localhost",
                SENTINEL,
                &format!("sslmode=verify-full&sslrootcert={other_ca}"),
            ),
            "certificate could not be verified",
        ),
        (
            server.url_with(
                "127.0.0.1",
                SENTINEL,
                &format!("sslmode=verify-full&sslrootcert={}", server.ca()),
            ),
            "does not match the host name",
        ),
        (
            server.url_with("localhost", SENTINEL, "sslmode=disable"),
            "requires an encrypted connection",
        ),
        (
            server.url_with(
                "localhost",
                "wrong-password",
                &format!("sslmode=verify-full&sslrootcert={}", server.ca()),
            ),
            "password authentication failed",
        ),
    ];
    for (url, expected) in cases {
        assert_one_line_failure(&bank(&["--database-url", &url]), expected);
    }
}

#[test]
fn the_application_user_runs_the_job_but_may_not_change_the_schema() {
    let server = TlsServer::start();
    let url = server.url();
    let out = bank(&["--database-url", &url, "--accounts", "10", "--delete", "2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        server.admin_sql("bank", "SELECT count(*) FROM accounts"),
        "8"
    );

    // DDL is refused to it: migrations cannot create their bookkeeping table.
    let out = bank(&["--database-url", &url, "migrate"]);
    assert_one_line_failure(&out, "permission denied");
    let mut conn = bank::db::establish(&bank::config::DbUrl::parse(&url).unwrap()).unwrap();
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
    let server = TlsServer::start();
    let url = server.url().replace("maxroach:", "nogrant:");
    let out = bank(&["--database-url", &url]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim_end(),
        format!(
            "bank: user nogrant may not read and write table \"accounts\" in nogrant@localhost:{}/bank; \
             an admin can allow it with: GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE accounts TO nogrant",
            server.port
        )
    );
}

#[test]
fn no_password_reaches_any_output_at_any_verbosity() {
    let server = TlsServer::start();
    let (_reserved, closed) = refusing_port();
    let closed_url = format!("postgresql://maxroach:{SENTINEL}@127.0.0.1:{closed}/bank");
    let wrong_ca = server.url_with(
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
    for (url, working) in [(server.url(), true), (closed_url, false), (wrong_ca, false)] {
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
        format!("DATABASE_URL={}\n", server.url()),
    )
    .unwrap();
    let out = bank_cmd(dir.path()).args(["--help"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(SENTINEL),
        "--help shows the URL"
    );
}

/// The workload with 16 workers starts connections on r2d2's background
/// threads, which may still be inside libpq (and OpenSSL, which libpq uses
/// for TLS and for scram) when the process exits; OpenSSL's exit-time
/// cleanup then crashed it in about one run in four. Fifty clean exits.
fn fifty_workloads_exit_cleanly(url: &str) {
    for run in 1..=50 {
        let out = bank(&[
            "--database-url",
            url,
            "workload",
            "--workers",
            "16",
            "--accounts",
            "20",
            "--transfers",
            "10",
        ]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "run {run}: {:?} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_workload_over_tls_with_scram_exits_cleanly_fifty_times() {
    let server = TlsServer::start();
    fifty_workloads_exit_cleanly(&server.url());
}

#[test]
fn the_workload_with_scram_without_tls_exits_cleanly_fifty_times() {
    let server = TlsServer::start();
    let url = server
        .url_with("127.0.0.1", SENTINEL, "sslmode=disable")
        .replace("maxroach:", "plainroach:");
    fifty_workloads_exit_cleanly(&url);
}
