//! The r2d2 pool the app runs its blocking transactions on: the manager
//! that opens connections (counted, explained, configured), and gives each
//! a lifetime with jitter.

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use diesel::connection::CacheSize;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, ManageConnection, Pool};
use diesel_tx_retry::Lifespan;
use rand::Rng;

use super::{establish, log_statements, DbUrl};

/// The r2d2 pool of Diesel connections the app runs its transactions on.
pub type PgPool = Pool<Manager>;

/// Diesel's connection manager, counting the connections being opened: r2d2
/// opens them on background threads, and a process that exits while one of
/// them is inside libpq crashes in the exit-time cleanup of the libraries
/// libpq uses (OpenSSL for TLS and scram, Kerberos for its GSSAPI probe;
/// issue #9). [`Connects::wait`] waits for the count to reach zero.
pub struct Manager {
    inner: ConnectionManager<PgConnection>,
    /// What `establish` connects to, for messages that say what failed.
    url: DbUrl,
    /// A connection opened before the pool, handed out first.
    first: Mutex<Option<PgConnection>>,
    statement_cache: bool,
    log_statements: bool,
    connects: Connects,
    /// Each connection is closed between transactions once it is this
    /// old, give or take a tenth.
    lifetime: Option<Duration>,
}

/// A pooled connection, and when it is due to be closed: its lifetime,
/// drawn when it opened within a tenth either way of the pool's, so that
/// connections opened together do not all reconnect together.
pub struct Aged {
    conn: PgConnection,
    due: Option<Instant>,
}

impl Aged {
    fn new(conn: PgConnection, lifetime: Option<Duration>) -> Self {
        let due = lifetime
            .map(|lifetime| Instant::now() + lifetime.mul_f64(rand::rng().random_range(0.9..=1.1)));
        Self { conn, due }
    }
}

impl std::ops::Deref for Aged {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        &self.conn
    }
}

impl std::ops::DerefMut for Aged {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.conn
    }
}

impl std::borrow::Borrow<PgConnection> for Aged {
    fn borrow(&self) -> &PgConnection {
        &self.conn
    }
}

impl std::borrow::BorrowMut<PgConnection> for Aged {
    fn borrow_mut(&mut self) -> &mut PgConnection {
        &mut self.conn
    }
}

impl Lifespan for Aged {
    fn expired(&self) -> bool {
        self.due.is_some_and(|due| Instant::now() >= due)
    }
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("statement_cache", &self.statement_cache)
            .finish_non_exhaustive()
    }
}

impl Manager {
    /// A manager for the connection string `url`.
    pub fn new(url: &DbUrl) -> Self {
        Self {
            inner: ConnectionManager::new(url.for_libpq()),
            url: url.clone(),
            first: Mutex::new(None),
            statement_cache: true,
            log_statements: false,
            connects: Connects::default(),
            lifetime: None,
        }
    }

    /// Closes each connection between transactions once it is `lifetime`
    /// old, give or take a tenth (drawn per connection).
    pub fn with_lifetime(self, lifetime: Duration) -> Self {
        Self {
            lifetime: Some(lifetime),
            ..self
        }
    }

    /// Counts the connections it opens in `connects`, which the process
    /// waits on before it exits.
    pub fn counted_in(self, connects: &Connects) -> Self {
        Self {
            connects: connects.clone(),
            ..self
        }
    }

    /// Logs every statement its connections run (see [`log_statements`]).
    pub fn logging_statements(self, on: bool) -> Self {
        Self {
            log_statements: on,
            ..self
        }
    }

    /// Hands out `conn` before opening any: the connection the app opened
    /// to check the server serves the pool too, which saves the round trips
    /// of a second one.
    pub fn with_first(self, conn: PgConnection) -> Self {
        Self {
            first: Mutex::new(Some(conn)),
            ..self
        }
    }

    /// Sends every statement unprepared. Diesel prepares a statement it can
    /// cache in a round trip of its own before running it; a job that runs
    /// each statement once saves that round trip (the workload, which runs
    /// the same few statements thousands of times, keeps the cache).
    pub fn without_statement_cache(self) -> Self {
        Self {
            statement_cache: false,
            ..self
        }
    }

    fn configure(&self, mut conn: PgConnection) -> PgConnection {
        if !self.statement_cache {
            conn.set_prepared_statement_cache_size(CacheSize::Disabled);
        }
        if self.log_statements {
            log_statements(&mut conn);
        }
        conn
    }
}

/// Connections being opened, counted by the pools' managers, so that the
/// process can wait for them before it exits. Clones share the count.
#[derive(Debug, Clone, Default)]
pub struct Connects(Arc<(Mutex<usize>, Condvar)>);

impl Connects {
    fn start(&self) -> Connecting<'_> {
        *self.0 .0.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        Connecting(self)
    }

    /// Waits until no connection is being opened, for at most `limit`, and
    /// says whether that happened. Call it after every pool is dropped and
    /// before the process exits: r2d2's queued connects do nothing once
    /// their pool is gone, so only those already inside libpq remain, and
    /// each of those ends within `connect_timeout`.
    pub fn wait(&self, limit: Duration) -> bool {
        let (count, done) = &*self.0;
        let connecting = count.lock().unwrap_or_else(PoisonError::into_inner);
        if *connecting > 0 {
            tracing::debug!(
                connecting = *connecting,
                "waiting for connections being opened"
            );
        }
        let (connecting, _) = done
            .wait_timeout_while(connecting, limit, |n| *n > 0)
            .unwrap_or_else(PoisonError::into_inner);
        *connecting == 0
    }
}

/// One connection being opened; dropping it counts the attempt as done.
struct Connecting<'a>(&'a Connects);

impl Drop for Connecting<'_> {
    fn drop(&mut self) {
        let (count, done) = &*self.0 .0;
        *count.lock().unwrap_or_else(PoisonError::into_inner) -= 1;
        done.notify_all();
    }
}

impl ManageConnection for Manager {
    type Connection = Aged;
    type Error = diesel::r2d2::Error;

    fn connect(&self) -> Result<Aged, Self::Error> {
        self.open().map(|conn| Aged::new(conn, self.lifetime))
    }

    fn is_valid(&self, conn: &mut Aged) -> Result<(), Self::Error> {
        self.inner.is_valid(&mut conn.conn)
    }

    /// Broken in Diesel's eyes, or due: r2d2 closes it instead of pooling
    /// it, when it comes back from a transaction.
    fn has_broken(&self, conn: &mut Aged) -> bool {
        conn.expired() || self.inner.has_broken(&mut conn.conn)
    }
}

impl Manager {
    fn open(&self) -> Result<PgConnection, diesel::r2d2::Error> {
        let first = self
            .first
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(conn) = first {
            return Ok(self.configure(conn));
        }
        let _connecting = self.connects.start();
        // `establish`, not the inner manager: its error says in one line
        // what failed and what to check, and r2d2 reports the last one when
        // a checkout times out.
        establish(&self.url)
            .map(|conn| self.configure(conn))
            .map_err(|err| {
                diesel::r2d2::Error::ConnectionError(diesel::ConnectionError::BadConnection(
                    err.to_string(),
                ))
            })
    }
}

/// How long a checkout waits for a connection by default (`--pool-timeout`):
/// long enough for a reconnect to ride out a server restart, short enough
/// that a server gone for good ends the run.
pub const POOL_CHECKOUT_WAIT: Duration = Duration::from_secs(15);

/// Builds the pool, with the default checkout wait. `establish` should have
/// succeeded first, so that a bad URL is reported with its real cause
/// rather than as a pool timeout.
pub fn pool(url: &DbUrl, max_size: u32) -> Result<PgPool, r2d2::Error> {
    pool_of(Manager::new(url), max_size, POOL_CHECKOUT_WAIT)
}

/// Builds a pool over `manager` whose checkouts wait `checkout_wait` at the
/// most (see [`pool`]).
pub fn pool_of(
    manager: Manager,
    max_size: u32,
    checkout_wait: Duration,
) -> Result<PgPool, r2d2::Error> {
    Pool::builder()
        .max_size(max_size)
        .min_idle(Some(0))
        // The retry helper already replaces a connection that turns out dead
        // before the commit, so a `SELECT 1` round trip on every checkout
        // would only slow every transaction down.
        .test_on_check_out(false)
        // Load balancers (and CockroachDB Cloud's) cut idle connections, and
        // nodes get drained: close idle connections well before a typical
        // five-minute cut, and recycle every connection so that traffic
        // rebalances across nodes.
        .idle_timeout(Some(Duration::from_secs(60)))
        // The lifetime is the manager's own (with jitter, see [`Aged`]).
        .max_lifetime(None)
        .connection_timeout(checkout_wait)
        .error_handler(Box::new(r2d2::NopErrorHandler))
        .build(manager)
}
