//! A fresh database per test (dropped when the test passes, kept for
//! debugging when it fails), on the server `DATABASE_URL` names, or on one
//! this test process starts for itself when none is named.

use std::net::SocketAddr;
use std::process::ChildStdin;
use std::sync::{Mutex, OnceLock};

use diesel::connection::SimpleConnection;
use diesel::dsl::sql;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel::sql_types::{BigInt, Text};
use rand::Rng;

use crate::cluster::Cluster;

/// The server every test database lives on: `DATABASE_URL` when it is set,
/// else a PostgreSQL started once for this test process (trust
/// authentication on 127.0.0.1, fsync off), stopped when the process exits.
pub fn server_url() -> String {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        return url;
    }
    static OWN: OnceLock<(String, Mutex<ChildStdin>)> = OnceLock::new();
    let (url, _) = OWN.get_or_init(|| {
        let cluster = Cluster::trusting();
        cluster.configure(
            "listen_addresses = '127.0.0.1'\nfsync = off\nsynchronous_commit = off\n\
             full_page_writes = off\nmax_connections = 200",
            "local all all trust\nhost all all 127.0.0.1/32 trust\n",
        );
        let port = cluster.start_on_some_port();
        let url = format!("postgresql://postgres@127.0.0.1:{port}/postgres");
        (url, Mutex::new(cluster.stop_when_this_process_exits()))
    });
    url.clone()
}

/// `url` with its database replaced by `name`.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let authority_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_end..].find('/') {
        Some(slash) => &base[..authority_end + slash],
        None => base,
    };
    format!("{base}/{name}{query}")
}

/// One test's database.
pub struct Database {
    /// Its name, `bank_test_` and 16 hex digits.
    pub name: String,
    /// A `postgresql://` URL to it.
    pub url: String,
    cockroach: bool,
}

impl Database {
    /// A new, empty database.
    pub fn create() -> Self {
        let admin = server_url();
        let name = format!("bank_test_{:016x}", rand::rng().random::<u64>());
        let mut conn = PgConnection::establish(&admin).expect("connect to the test server");
        let version: String = diesel::select(sql::<Text>("version()"))
            .get_result(&mut conn)
            .expect("version()");
        conn.batch_execute(&format!("CREATE DATABASE {name}"))
            .expect("create database");
        Self {
            url: with_database(&admin, &name),
            name,
            cockroach: version.contains("CockroachDB"),
        }
    }

    /// Whether the server is CockroachDB.
    pub fn is_cockroach(&self) -> bool {
        self.cockroach
    }

    /// A new connection to it.
    pub fn conn(&self) -> PgConnection {
        PgConnection::establish(&self.url).expect("connect to the test database")
    }

    /// A pool of `size` connections to it, that checks nothing on checkout.
    pub fn pool(&self, size: u32) -> Pool<ConnectionManager<PgConnection>> {
        Pool::builder()
            .max_size(size)
            .min_idle(Some(0))
            .test_on_check_out(false)
            .build(ConnectionManager::new(&self.url))
            .expect("pool")
    }

    /// Runs SQL (DDL, fault injection), which must succeed.
    pub fn exec(&self, sql: &str) {
        self.conn().batch_execute(sql).expect(sql);
    }

    /// The rows of `table`.
    pub fn count(&self, table: &str) -> i64 {
        diesel::select(sql::<BigInt>(&format!("(SELECT count(*) FROM {table})")))
            .get_result(&mut self.conn())
            .expect("count")
    }

    /// The server's TCP address, for a proxy in front of it.
    pub fn tcp_addr(&self) -> SocketAddr {
        let port: String = diesel::select(sql::<Text>("current_setting('port')"))
            .get_result(&mut self.conn())
            .expect("port");
        format!("127.0.0.1:{port}").parse().expect("an address")
    }

    /// A URL to it through a proxy listening on `port` on 127.0.0.1,
    /// without TLS (which a proxy could not read).
    pub fn url_via(&self, port: u16) -> String {
        format!(
            "postgresql://postgres@127.0.0.1:{port}/{}?sslmode=disable",
            self.name
        )
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept database {} of a failed test for debugging", self.name);
            return;
        }
        let drop_sql = if self.cockroach {
            format!("DROP DATABASE IF EXISTS {} CASCADE", self.name)
        } else {
            format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)
        };
        if let Ok(mut conn) = PgConnection::establish(&server_url()) {
            let _ = conn.batch_execute(&drop_sql);
        }
    }
}
