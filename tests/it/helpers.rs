//! Test bed: a fresh database per test (dropped when the test passes, kept
//! for debugging when it fails), fault injection, a clock that never sleeps.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use assert_cmd::Command;
use bank::db::DbUrl;
use bank::db::{self, PgPool};
use diesel::dsl::sql;
use diesel::expression::SqlLiteral;
use diesel::prelude::*;
use diesel::query_dsl::LoadQuery;
use diesel::sql_types::{BigInt, Text};
use diesel_tx_retry::Server;
use rand::Rng;

/// The value of one SQL expression, e.g.
/// `scalar::<BigInt, i64>(conn, "(SELECT count(*) FROM marks)")`.
pub fn scalar<ST, T>(conn: &mut PgConnection, expr: &str) -> QueryResult<T>
where
    ST: diesel::sql_types::SqlType + diesel::sql_types::SingleValue + 'static,
    diesel::dsl::select<SqlLiteral<ST>>: for<'a> LoadQuery<'a, PgConnection, T>,
{
    diesel::select(sql::<ST>(expr)).get_result(conn)
}

/// The server every test database lives on: `DATABASE_URL`, which `./dev test`
/// points at a throwaway server when the caller did not set it.
pub fn admin_url() -> DbUrl {
    let raw = std::env::var("DATABASE_URL")
        .expect("DATABASE_URL is not set; run the tests with ./dev test, which starts a database");
    DbUrl::parse(&raw).expect("DATABASE_URL does not parse")
}

/// The server `conn` is connected to, as the helper would find it.
pub fn detect(conn: &mut PgConnection) -> Server {
    let version: String = scalar::<Text, _>(conn, "version()").expect("ask the server its version");
    Server::from_version(&version)
}

pub struct TestDb {
    pub name: String,
    pub url: DbUrl,
    pub server: Server,
}

impl TestDb {
    /// A new, empty database.
    pub fn empty() -> Self {
        let admin = admin_url();
        let name = format!("bank_test_{:016x}", rand::rng().random::<u64>());
        let mut conn = db::establish(&admin).expect("connect to DATABASE_URL");
        let server = detect(&mut conn);
        diesel::sql_query(format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .expect("create database");
        let url = admin.with_database(&name);
        Self { name, url, server }
    }

    /// A new database with the embedded migrations applied.
    pub fn migrated() -> Self {
        let test_db = Self::empty();
        db::run_migrations(&mut test_db.conn()).expect("migrate");
        test_db
    }

    /// A migrated database with the fault machinery of
    /// [`TestDb::install_faults`] (PostgreSQL only).
    pub fn with_faults() -> Self {
        let test_db = Self::migrated();
        test_db.install_faults();
        test_db
    }

    pub fn conn(&self) -> PgConnection {
        db::establish(&self.url).expect("connect to the test database")
    }

    pub fn pool(&self, size: u32) -> PgPool {
        db::pool(&self.url, size).expect("pool")
    }

    /// The test database's URL, as a user hands it to the binary or to
    /// diesel CLI: `DATABASE_URL` (a URL) with the database name replaced.
    pub fn url_string(&self) -> String {
        let raw = std::env::var("DATABASE_URL").expect("DATABASE_URL");
        let (base, query) = match raw.split_once('?') {
            Some((base, query)) => (base, format!("?{query}")),
            None => (raw.as_str(), String::new()),
        };
        let authority_end = base.find("://").map_or(0, |i| i + 3);
        let base = match base[authority_end..].find('/') {
            Some(slash) => &base[..authority_end + slash],
            None => base,
        };
        format!("{base}/{}{query}", self.name)
    }

    /// The test server's TCP address, for a proxy in front of it.
    pub fn tcp_addr(&self) -> std::net::SocketAddr {
        let port =
            scalar::<Text, String>(&mut self.conn(), "current_setting('port')").expect("port");
        format!("127.0.0.1:{port}").parse().expect("an address")
    }

    /// The test database's URL through a proxy listening on `port` on
    /// 127.0.0.1, without TLS (which a proxy could not read).
    pub fn url_via(&self, port: u16) -> String {
        format!(
            "postgresql://postgres@127.0.0.1:{port}/{}?sslmode=disable",
            self.name
        )
    }

    /// Every account, as `(id, balance)` sorted by id.
    pub fn accounts(&self) -> Vec<(uuid::Uuid, i64)> {
        use bank::schema::accounts::dsl::*;
        accounts
            .select((id, balance))
            .order(id)
            .load(&mut self.conn())
            .expect("read accounts")
    }

    /// Fails the test with a clear reason when the server is not PostgreSQL.
    pub fn require_postgres(&self, what: &str) {
        assert_eq!(
            self.server,
            Server::PostgreSql,
            "{what} needs PostgreSQL; run the suite with DATABASE_URL pointing at a PostgreSQL server"
        );
    }

    /// Runs SQL (DDL for fault injection, mostly).
    pub fn exec(&self, sql: &str) {
        diesel::connection::SimpleConnection::batch_execute(&mut self.conn(), sql).expect(sql);
    }

    pub fn count(&self, table: &str) -> i64 {
        scalar::<BigInt, i64>(&mut self.conn(), &format!("(SELECT count(*) FROM {table})"))
            .expect("count")
    }

    /// Installs the test-only fault machinery (`testbed::faults`,
    /// PL/pgSQL, PostgreSQL only).
    fn install_faults(&self) {
        self.require_postgres("fault injection (PL/pgSQL, pg_terminate_backend)");
        testbed::faults::install(&mut self.conn());
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept database {} of a failed test for debugging", self.name);
            return;
        }
        let drop_sql = match self.server {
            Server::PostgreSql => format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            _ => format!("DROP DATABASE IF EXISTS {} CASCADE", self.name),
        };
        if let Ok(mut conn) = db::establish(&admin_url()) {
            let _ = diesel::sql_query(drop_sql).execute(&mut conn);
        }
    }
}

pub use testbed::faults::backend_pid;
pub use testbed::process::{is_root, run, tempdir};

/// Runs diesel CLI with `args` on `url` and the migrations in `migrations`,
/// from an empty directory, so that it finds no diesel.toml and leaves
/// src/schema.rs alone.
pub fn run_diesel_cli(url: &str, migrations: &Path, args: &[&str]) -> Output {
    let workdir = tempdir();
    std::process::Command::new("diesel")
        .args(args)
        .arg("--database-url")
        .arg(url)
        .arg("--migration-dir")
        .arg(migrations)
        .current_dir(workdir.path())
        .output()
        .expect("diesel CLI on PATH (./dev test installs it)")
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `bank` binary, run from an empty directory (so no developer's .env
/// leaks in) and without DATABASE_URL in its environment.
pub fn bank_cmd(workdir: &Path) -> Command {
    let mut cmd = Command::cargo_bin("bank").expect("bank binary");
    cmd.current_dir(workdir)
        .env_remove("DATABASE_URL")
        .env_remove("RUST_LOG");
    cmd
}

/// Runs the binary (as [`bank_cmd`] sets it up) with `args`.
pub fn bank(args: &[&str]) -> Output {
    let dir = tempdir();
    bank_cmd(dir.path()).args(args).output().expect("run bank")
}

/// Asserts that a run succeeded, showing its stderr when it did not.
pub fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "bank failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A port on 127.0.0.1 that refuses connections, reserved for as long as the
/// returned socket lives: bound, never listening, so no other test can take
/// it in the meantime.
pub fn refusing_port() -> (socket2::Socket, u16) {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().expect("address");
    socket.bind(&any.into()).expect("bind");
    let port = socket
        .local_addr()
        .expect("local address")
        .as_socket()
        .expect("an IP socket")
        .port();
    (socket, port)
}

/// Output as text, split in lines.
pub fn lines(bytes: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The one line a failed run printed on stderr, which must be one line.
pub fn one_line(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr}");
    stderr.trim_end().to_owned()
}

/// The accounts a run printed as created ("Created new account with id ..."
/// lines), with their balances, sorted by id.
pub fn printed_accounts(stdout: &[String]) -> Vec<(uuid::Uuid, i64)> {
    let mut printed: Vec<(uuid::Uuid, i64)> = stdout
        .iter()
        .filter_map(|line| line.strip_prefix("Created new account with id "))
        .map(|rest| {
            let (id, balance) = rest.split_once(" and balance ").expect("an account line");
            (
                id.parse().expect("an id"),
                balance.trim_end_matches('.').parse().expect("a balance"),
            )
        })
        .collect();
    printed.sort();
    printed
}

/// The `bank` binary with `args`, started from an empty directory with its
/// output piped; `prefix` runs it through another program first (`ip netns
/// exec NS`). Keep the directory for as long as the child runs.
pub fn spawn_bank(prefix: &[&str], args: &[&str]) -> (std::process::Child, tempfile::TempDir) {
    let workdir = tempdir();
    let bank = env!("CARGO_BIN_EXE_bank");
    let mut cmd = match prefix.split_first() {
        Some((program, rest)) => {
            let mut cmd = std::process::Command::new(program);
            cmd.args(rest).arg(bank);
            cmd
        }
        None => std::process::Command::new(bank),
    };
    let child = cmd
        .args(args)
        .current_dir(workdir.path())
        .env_remove("DATABASE_URL")
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start bank");
    (child, workdir)
}

/// Waits for `child` to end by itself, `bound` after `began` at the most
/// (then kills it), calling `tick` every 20 ms meanwhile; returns its
/// output, how long it ran since `began`, and whether it ended by itself.
pub fn wait_bounded_with(
    mut child: std::process::Child,
    began: Instant,
    bound: Duration,
    mut tick: impl FnMut(),
) -> (Output, Duration, bool) {
    let mut ended = false;
    while began.elapsed() < bound {
        if child.try_wait().expect("try_wait").is_some() {
            ended = true;
            break;
        }
        tick();
        std::thread::sleep(Duration::from_millis(20));
    }
    if !ended {
        let _ = child.kill();
    }
    let took = began.elapsed();
    (
        child.wait_with_output().expect("the child's output"),
        took,
        ended,
    )
}

/// [`wait_bounded_with`] with nothing to do meanwhile.
pub fn wait_bounded(
    child: std::process::Child,
    began: Instant,
    bound: Duration,
) -> (Output, Duration, bool) {
    wait_bounded_with(child, began, bound, || {})
}

/// The advisory lock the lock-holding trigger waits for.
pub const HELD_LOCK: i64 = 4242;

/// Where the lock-holding trigger holds a statement of the app's.
#[derive(Clone, Copy)]
pub enum HoldAt {
    /// Before the statement (`INSERT`, `UPDATE` or `DELETE` on accounts).
    Statement(&'static str),
    /// Only the first such statement of the database's life.
    FirstStatement(&'static str),
    /// At the COMMIT of the transaction that ran it (a deferred trigger).
    Commit(&'static str),
}

/// Installs the trigger that makes the chosen statement (or COMMIT) wait
/// for advisory lock [`HELD_LOCK`], and takes that lock on `holder`, which
/// keeps it until it is dropped or unlocks it. The harness then sees the
/// app's backend waiting ([`backend_waiting_for_the_lock`]) and acts at
/// that moment, without sleeping to synchronise.
pub fn hold_at(admin: &mut PgConnection, holder: &mut PgConnection, at: HoldAt) {
    use diesel::connection::SimpleConnection;
    let wait = format!("PERFORM pg_advisory_xact_lock({HELD_LOCK});");
    let (body, trigger) = match at {
        HoldAt::Statement(op) => (
            wait,
            format!("CREATE TRIGGER wait_for_lock BEFORE {op} ON accounts FOR EACH STATEMENT"),
        ),
        HoldAt::FirstStatement(op) => (
            format!("IF nextval('held_statements') = 1 THEN {wait} END IF;"),
            format!("CREATE TRIGGER wait_for_lock BEFORE {op} ON accounts FOR EACH STATEMENT"),
        ),
        HoldAt::Commit(op) => (
            wait,
            format!(
                "CREATE CONSTRAINT TRIGGER wait_for_lock AFTER {op} ON accounts \
                 DEFERRABLE INITIALLY DEFERRED FOR EACH ROW"
            ),
        ),
    };
    admin
        .batch_execute(&format!(
            "CREATE SEQUENCE held_statements;
             CREATE FUNCTION wait_for_lock() RETURNS trigger AS $$
             BEGIN {body} RETURN NULL; END $$ LANGUAGE plpgsql;
             {trigger} EXECUTE FUNCTION wait_for_lock()"
        ))
        .expect("install the lock-holding trigger");
    holder
        .batch_execute(&format!("SELECT pg_advisory_lock({HELD_LOCK})"))
        .expect("take the lock");
}

/// The pid of a backend of database `datname` waiting for [`HELD_LOCK`],
/// looked for at most 400 times, 50 ms apart.
pub fn backend_waiting_for_the_lock(watcher: &mut PgConnection, datname: &str) -> i32 {
    for _ in 0..400 {
        let pid: Option<i32> =
            scalar::<diesel::sql_types::Nullable<diesel::sql_types::Integer>, _>(
                watcher,
                &format!(
                    "(SELECT pid FROM pg_stat_activity WHERE datname = '{datname}' \
                 AND wait_event_type = 'Lock' AND wait_event = 'advisory' LIMIT 1)"
                ),
            )
            .expect("read pg_stat_activity");
        if let Some(pid) = pid {
            return pid;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no backend of {datname} ever waited for the lock");
}

/// The binary's arguments for the main job on `url` with `accounts`
/// accounts and `delete` deletions, then `extra`.
pub fn job_args(url: &str, accounts: u32, delete: u32, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["--database-url", url, "--accounts"]
        .map(String::from)
        .into();
    args.extend([accounts.to_string(), "--delete".into(), delete.to_string()]);
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// The binary's arguments for `workload` on `url`: the global flags
/// `before`, then `--workers W --accounts A`, then `after` (a length:
/// `--transfers N` or `--duration S`, and more).
pub fn workload_args(
    url: &str,
    before: &[&str],
    workers: u32,
    accounts: u32,
    after: &[&str],
) -> Vec<String> {
    let mut args = vec!["--database-url".to_owned(), url.to_owned()];
    args.extend(before.iter().map(|a| a.to_string()));
    args.extend([
        "workload".into(),
        "--workers".into(),
        workers.to_string(),
        "--accounts".into(),
        accounts.to_string(),
    ]);
    args.extend(after.iter().map(|a| a.to_string()));
    args
}

/// `args` as the `&str`s the runners take.
pub fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}
