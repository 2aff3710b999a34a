//! Test bed: a fresh database per test (dropped when the test passes, kept
//! for debugging when it fails), fault injection, a clock that never sleeps.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use assert_cmd::Command;
use bank::db::DbUrl;
use bank::db::{self, PgPool};
use diesel::dsl::sql;
use diesel::expression::SqlLiteral;
use diesel::prelude::*;
use diesel::query_dsl::LoadQuery;
use diesel::sql_types::{BigInt, Text};
use diesel_tx_retry::{Clock, Server, TxError};
use rand::Rng;

/// Two tests from one body taking the protocol: `NAME::restart` and
/// `NAME::savepoint`, so that a failure names its protocol.
macro_rules! for_each_protocol {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn restart() {
                super::$name(diesel_tx_retry::Protocol::Restart)
            }
            #[test]
            fn savepoint() {
                super::$name(diesel_tx_retry::Protocol::Savepoint)
            }
        }
    )*};
}
pub(crate) use for_each_protocol;

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
        let server = Server::detect(&mut conn).expect("detect server");
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

    /// Calls made so far to a fault installed by [`TestDb::install_faults`].
    pub fn fault_calls(&self, sequence: &str) -> i64 {
        scalar::<BigInt, i64>(
            &mut self.conn(),
            &format!("(SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {sequence})"),
        )
        .expect("read fault sequence")
    }

    /// Installs the test-only fault machinery (PL/pgSQL, PostgreSQL only):
    /// - `raise_error(code)`: raises SQLSTATE `code`; writes nothing, so it
    ///   also works in read-only transactions.
    /// - `fail_first(k, code)`: raises SQLSTATE `code` on its first `k` calls.
    ///   Its counter is a sequence because sequences ignore rollbacks, so the
    ///   count survives the retries it causes.
    /// - table `marks`: a row per committed unit of work; `at_commit(...)`
    ///   adds a deferred trigger on it that fires at COMMIT.
    fn install_faults(&self) {
        self.require_postgres("fault injection (PL/pgSQL, pg_terminate_backend)");
        self.exec(
            "CREATE SEQUENCE statement_faults;
             CREATE SEQUENCE commit_faults;
             CREATE TABLE marks (id SERIAL PRIMARY KEY, note TEXT NOT NULL DEFAULT '');
             CREATE FUNCTION fail_first(k INT8, code TEXT) RETURNS INT8 AS $$
             DECLARE n INT8 := nextval('statement_faults');
             BEGIN
                 IF n <= k THEN
                     RAISE EXCEPTION 'injected fault % of %', n, k USING ERRCODE = code;
                 END IF;
                 RETURN n;
             END $$ LANGUAGE plpgsql;
             CREATE FUNCTION raise_error(code TEXT) RETURNS INT8 AS $$
             BEGIN
                 RAISE EXCEPTION 'injected fault' USING ERRCODE = code;
             END $$ LANGUAGE plpgsql;
             CREATE FUNCTION commit_fault() RETURNS trigger AS $$
             DECLARE n INT8 := nextval('commit_faults');
             BEGIN
                 IF n <= TG_ARGV[0]::INT8 THEN
                     IF TG_ARGV[1] = 'terminate' THEN
                         PERFORM pg_terminate_backend(pg_backend_pid());
                     ELSE
                         RAISE EXCEPTION 'injected commit fault % of %', n, TG_ARGV[0]
                             USING ERRCODE = TG_ARGV[1];
                     END IF;
                 END IF;
                 RETURN NULL;
             END $$ LANGUAGE plpgsql;",
        );
    }

    /// Makes the first `k` commits that inserted into `marks` fail with
    /// `action`: a SQLSTATE, or `terminate` to kill the backend mid-commit.
    pub fn fail_commits(&self, k: u32, action: &str) {
        self.exec(&format!(
            "CREATE CONSTRAINT TRIGGER fail_at_commit AFTER INSERT ON marks
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
             EXECUTE FUNCTION commit_fault('{k}', '{action}')"
        ));
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
            Server::CockroachDb => format!("DROP DATABASE IF EXISTS {} CASCADE", self.name),
        };
        if let Ok(mut conn) = db::establish(&admin_url()) {
            let _ = diesel::sql_query(drop_sql).execute(&mut conn);
        }
    }
}

/// The kind of the database error a helper call returned untouched, if any.
pub fn failed_kind<T>(
    result: &Result<T, TxError<diesel::result::Error>>,
) -> Option<diesel::result::DatabaseErrorKind> {
    match result {
        Err(TxError::Failed(diesel::result::Error::DatabaseError(kind, _))) => Some(*kind),
        _ => None,
    }
}

/// Inserts a mark, through the unit of work's own connection.
pub fn mark(conn: &mut PgConnection, note: &str) -> QueryResult<()> {
    diesel::sql_query("INSERT INTO marks (note) VALUES ($1)")
        .bind::<Text, _>(note)
        .execute(conn)
        .map(drop)
}

/// Calls `fail_first(k, code)`.
pub fn fail_first(conn: &mut PgConnection, k: u32, code: &str) -> QueryResult<()> {
    diesel::sql_query("SELECT fail_first($1, $2)")
        .bind::<BigInt, _>(i64::from(k))
        .bind::<Text, _>(code)
        .execute(conn)
        .map(drop)
}

/// The backend pid of a connection.
pub fn backend_pid(conn: &mut PgConnection) -> i32 {
    scalar::<diesel::sql_types::Integer, i32>(conn, "pg_backend_pid()").expect("pg_backend_pid")
}

/// A clock whose `sleep` only records the delay and moves time forward.
#[derive(Debug)]
pub struct FakeClock {
    now: Mutex<Instant>,
    pub sleeps: Mutex<Vec<Duration>>,
}

impl FakeClock {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            now: Mutex::new(Instant::now()),
            sleeps: Mutex::new(Vec::new()),
        })
    }
    pub fn sleeps(&self) -> Vec<Duration> {
        self.sleeps.lock().unwrap().clone()
    }
    /// Moves time forward by `by`, as work that takes that long would.
    pub fn advance(&self, by: Duration) {
        *self.now.lock().unwrap() += by;
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Instant {
        *self.now.lock().unwrap()
    }
    fn sleep(&self, duration: Duration) {
        *self.now.lock().unwrap() += duration;
        self.sleeps.lock().unwrap().push(duration);
    }
}

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

/// An empty directory, removed when the value is dropped.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("bank-test-")
        .tempdir()
        .expect("temp dir")
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

/// Calls `raise_error(code)`.
pub fn raise_error(conn: &mut PgConnection, code: &str) -> QueryResult<()> {
    diesel::sql_query("SELECT raise_error($1)")
        .bind::<Text, _>(code)
        .execute(conn)
        .map(drop)
}

/// Whether the tests run as root.
pub fn is_root() -> bool {
    // `id -u` rather than libc: the test needs nothing unsafe.
    let uid = std::process::Command::new("id")
        .arg("-u")
        .output()
        .expect("id -u");
    String::from_utf8_lossy(&uid.stdout).trim() == "0"
}

/// Runs a server tool as the postgres user when we are root (initdb and
/// postgres refuse to run as root).
pub fn as_postgres(program: &Path) -> std::process::Command {
    if is_root() {
        let mut cmd = std::process::Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program);
        cmd
    } else {
        std::process::Command::new(program)
    }
}

pub fn run(cmd: &mut std::process::Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn pg_bindir() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries under /usr/lib/postgresql (./dev installs them)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    dirs.sort_by_key(|p| {
        p.to_string_lossy()
            .split('/')
            .nth(4)
            .and_then(|v| v.parse::<u32>().ok())
    });
    dirs.pop().expect("an initdb")
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

/// The main job in-process through `retrier`, unwatched, its output thrown
/// away (for tests that look at the statements it sends).
pub fn run_job_quietly(pool: &PgPool, retrier: &diesel_tx_retry::Retrier, plan: bank::plan::Plan) {
    bank::job::run(
        pool,
        retrier,
        &bank::watchdog::Watchdog::off(),
        plan,
        &mut Vec::new(),
    )
    .expect("the main job");
}
