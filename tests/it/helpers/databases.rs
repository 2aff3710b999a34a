//! A fresh database per test on the server `DATABASE_URL` names (dropped
//! when the test passes, kept for debugging when it fails), and small
//! readers of it.

use bank::db::{self, DbUrl, PgPool};
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
