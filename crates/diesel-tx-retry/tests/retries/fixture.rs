//! What every test here starts from: a database (with the fault machinery
//! of `testbed::faults` when it asks), a helper that never sleeps for real,
//! and small readers of the session's state.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use diesel::dsl::sql;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel::sql_types::{BigInt, Text};
use diesel_tx_retry::internal::{self, FakeClock};
use diesel_tx_retry::{
    Attempt, Backoff, Cause, Observer, Outcome, Protocol, Retrier, Server, TxError,
};
use testbed::proxy::Proxy;
use testbed::Database;

pub use testbed::faults::{backend_pid, fail_first, mark, raise_error};

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

/// A new database with the fault machinery installed (PostgreSQL only).
pub fn with_faults() -> Database {
    let db = Database::create();
    assert!(
        !db.is_cockroach(),
        "fault injection needs PostgreSQL (PL/pgSQL, pg_terminate_backend)"
    );
    testbed::faults::install(&mut db.conn());
    db
}

/// A helper under `server`'s rules framing with `protocol`, with at most
/// `max_attempts` attempts and no deadline, backing off 10, 20, 40 ms...
/// (up to 100), always the full delay, on a clock that never sleeps.
pub fn retrier(server: Server, protocol: Protocol, max_attempts: u32) -> (Retrier, Arc<FakeClock>) {
    let clock = FakeClock::new();
    let retrier = Retrier::default()
        .for_server(server)
        .with_max_attempts(max_attempts)
        .without_deadline()
        .without_statement_timeout()
        .with_backoff(
            Backoff::exponential(Duration::from_millis(10), Duration::from_millis(100))
                .delay_first_retry(),
        );
    let retrier = internal::with_protocol(retrier, protocol);
    let retrier = internal::with_clock(retrier, clock.clone());
    let retrier = internal::with_jitter(retrier, Arc::new(|| 1.0));
    (retrier, clock)
}

/// [`retrier`] under PostgreSQL's rules with 10 attempts.
pub fn on_postgres(protocol: Protocol) -> (Retrier, Arc<FakeClock>) {
    retrier(Server::PostgreSql, protocol, 10)
}

/// A pool of one connection to `db` through `proxy`, not tested on
/// checkout (a test counts the proxy's connections and messages).
pub fn pool_via(db: &Database, proxy: &Proxy) -> Pool<ConnectionManager<PgConnection>> {
    Pool::builder()
        .max_size(1)
        .test_on_check_out(false)
        .build(ConnectionManager::new(db.url_via(proxy.port())))
        .unwrap()
}

/// The value of one SQL expression of type BIGINT.
pub fn bigint(conn: &mut PgConnection, expr: &str) -> QueryResult<i64> {
    diesel::select(sql::<BigInt>(expr)).get_result(conn)
}

/// A setting of the session (`transaction_isolation`, ...).
pub fn setting(conn: &mut PgConnection, name: &str) -> QueryResult<String> {
    diesel::select(sql::<Text>(&format!("current_setting('{name}')"))).get_result(conn)
}

/// The transaction's id.
pub fn txid(conn: &mut PgConnection) -> QueryResult<i64> {
    bigint(conn, "txid_current()")
}

/// Sessions of `db` left inside a transaction, seen from `watcher`.
pub fn open_transactions(db: &Database, watcher: &mut PgConnection) -> i64 {
    bigint(
        watcher,
        &format!(
            "(SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' \
             AND pid <> pg_backend_pid() AND xact_start IS NOT NULL)",
            db.name
        ),
    )
    .unwrap()
}

/// The kind of the database error a call returned untouched, if any.
pub fn failed_kind<T>(result: &Result<T, TxError<DieselError>>) -> Option<DatabaseErrorKind> {
    match result {
        Err(TxError::Failed(DieselError::DatabaseError(kind, _))) => Some(*kind),
        _ => None,
    }
}

/// A tokio runtime of two worker threads, as a service on a small machine
/// runs.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Every attempt the observer was told of: (number, cause, outcome).
#[derive(Default)]
pub struct Seen(pub Mutex<Vec<(u32, Option<Cause>, Outcome)>>);

impl Observer for Seen {
    fn attempt(&self, attempt: &Attempt) {
        self.0
            .lock()
            .unwrap()
            .push((attempt.number(), attempt.cause(), attempt.outcome()));
    }
}

impl Seen {
    /// The outcomes alone, in order.
    pub fn outcomes(&self) -> Vec<Outcome> {
        self.0.lock().unwrap().iter().map(|s| s.2).collect()
    }
}
