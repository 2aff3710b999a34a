//! The database connection: first contact (with readable errors), the r2d2
//! pool, the embedded migrations and the schema check; the connection
//! string and its policy in `url.rs` ([`DbUrl`]) and [`conninfo`].

pub mod asynch;
pub mod conninfo;
pub mod shape;
mod url;

pub use url::DbUrl;

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use diesel::connection::CacheSize;
use diesel::connection::InstrumentationEvent;
use diesel::dsl::sql;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, ManageConnection, Pool};
use diesel::sql_types::{Bool, Nullable, Text};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use diesel_tx_retry::{Lifespan, Server};
use rand::Rng;

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

/// The migrations in `migrations/`, compiled in for `bank migrate`.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// Connecting failed; the message is one line and never holds the password.
/// The driver's own error stays available as the source, but it is not part
/// of the message: libpq's text spans lines and may echo connection details.
#[derive(Debug, thiserror::Error)]
#[error("could not connect to {target}: {reason}")]
pub struct ConnectError {
    target: String,
    reason: String,
    #[source]
    source: diesel::ConnectionError,
}

/// Opens one connection, turning libpq's multi-line messages into one line
/// that says what to fix.
///
/// # Errors
/// [`ConnectError`].
pub fn establish(url: &DbUrl) -> Result<PgConnection, ConnectError> {
    PgConnection::establish(&url.for_libpq()).map_err(|source| ConnectError {
        target: url.redacted(),
        reason: explain_connection_error(&source.to_string(), url),
        source,
    })
}

/// Opens one connection to `plain` with the session timeouts of
/// [`DbUrl::with_session_timeouts`] in its startup options, and returns it
/// with the URL it used, for the pool. A pooler that refuses startup options
/// (PgBouncer does, unless `ignore_startup_parameters` lists `options`) gets
/// a second try without them and one warning: each transaction still bounds
/// its statements (`SET LOCAL statement_timeout`, in its `BEGIN`), and the
/// pooler ends the server side of a client it lost.
///
/// # Errors
/// [`ConnectError`].
pub fn establish_with_timeouts(
    plain: &DbUrl,
    timeout: Duration,
) -> Result<(PgConnection, DbUrl), ConnectError> {
    let url = plain.with_session_timeouts(timeout);
    let connected = match establish(&url) {
        Ok(conn) => (conn, url),
        Err(err) if refused_options(&err) && plain.options().is_none() => {
            tracing::warn!(
                "the server at {} refused the startup options that set the session timeouts \
                 (a pooler such as PgBouncer does); connecting without them: each transaction \
                 still bounds its statements",
                plain.redacted()
            );
            (establish(plain)?, plain.clone())
        }
        Err(err) => return Err(err),
    };
    // Said once the server answered: a run that cannot connect has one line
    // to say, why not.
    if let Some(line) = plain.unverified_remote(std::env::var("PGSSLMODE").ok().as_deref()) {
        tracing::warn!("{line}");
    }
    Ok(connected)
}

/// Whether a connect failed because the server (a pooler) refuses the
/// startup parameter `options`: PgBouncer's "unsupported startup parameter:
/// options", its only way of saying so.
fn refused_options(err: &ConnectError) -> bool {
    err.source
        .to_string()
        .contains("unsupported startup parameter: options")
}

/// libpq reports connection failures as text only, with no SQLSTATE, so this
/// is the one place that reads message text.
fn explain_connection_error(message: &str, url: &DbUrl) -> String {
    let first_line = message
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("unknown error");
    let has = |needle: &str| message.contains(needle);
    if has("Connection refused") {
        "connection refused; is the server running and listening on that host and port?".to_owned()
    } else if has("No route to host") || has("Network is unreachable") {
        "no route to the server; the network between here and the server is down, or the address is wrong"
            .to_owned()
    } else if has("the database system is starting up")
        || has("the database system is shutting down")
        || has("the database system is in recovery mode")
    {
        format!("{first_line}; the server is restarting, try again in a moment")
    } else if has("could not translate host name") || has("Name or service not known") {
        format!(
            "unknown host (tried {}); check the host name in the database url",
            url.hosts()
        )
    } else if has("timeout expired") {
        "timed out; check the host, the port and any firewall in between (connect_timeout in the url sets the limit)"
            .to_owned()
    } else if has("password authentication failed") {
        "password authentication failed; check the user and password in the database url".to_owned()
    } else if has("does not match host name") || has("does not match host") {
        "the server's certificate does not match the host name; connect with a host name listed in the certificate"
            .to_owned()
    } else if has("root certificate file") && has("does not exist") {
        format!(
            "the CA certificate file {} does not exist; point sslrootcert at the CA certificate that signed the server's",
            url.sslrootcert().unwrap_or("(the default ~/.postgresql/root.crt)")
        )
    } else if has("certificate verify failed") || has("root certificate file") {
        "the server's certificate could not be verified; point sslrootcert at the CA certificate that signed it"
            .to_owned()
    } else if has("no encryption") || (has("no pg_hba.conf entry") && has("SSL off")) {
        "the server requires an encrypted connection; use sslmode=verify-full (or require) in the database url"
            .to_owned()
    } else if has("server does not support SSL") {
        "the server does not support TLS but sslmode asks for it; use a TLS-enabled server or change sslmode"
            .to_owned()
    } else if has("unsupported startup parameter") {
        format!(
            "{first_line}; a pooler (PgBouncer) refuses startup parameters it does not know: remove it \
             from the database url, or list it in ignore_startup_parameters in pgbouncer.ini"
        )
    } else if has("does not exist") && has("database") {
        format!("{first_line}; create the database first or fix the name in the url")
    } else {
        first_line.to_owned()
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

/// Attempts at applying the migrations when other processes race to apply
/// them too; the waits between them add up to about 1.3 s at most.
const MIGRATION_ATTEMPTS: u32 = 8;

/// Applies the embedded migrations that are not applied yet and returns
/// their versions. Running it twice is a no-op.
///
/// Several processes may run it at once on a fresh database (replicas at
/// deploy time, or `diesel migration run` beside it). Two transactions
/// creating the same table collide (on PostgreSQL, a duplicate key in
/// `pg_type`; on CockroachDB, a retry error or "already exists"), and the
/// migration's version row is unique, so one process wins. The others
/// re-read what is still pending: nothing, when the winner applied it all;
/// otherwise they try again, up to `MIGRATION_ATTEMPTS` (8) times. A lock
/// would avoid the collision on PostgreSQL, but CockroachDB has no advisory
/// locks and diesel CLI would not take ours anyway.
///
/// # Errors
/// The last failure, when migrations are still pending after every attempt.
pub fn run_migrations(conn: &mut PgConnection) -> Result<Vec<String>, MigrationError> {
    // One at a time, so that what this run applied is known even when a
    // later one loses a race: several migrations, several transactions.
    let mut applied = Vec::new();
    let mut attempt = 0;
    loop {
        let err = match conn.pending_migrations(MIGRATIONS) {
            Ok(pending) if pending.is_empty() => return Ok(applied),
            Ok(_) => match conn.run_next_migration(MIGRATIONS) {
                Ok(version) => {
                    applied.push(version.to_string());
                    continue;
                }
                Err(err) => err,
            },
            Err(err) => err,
        };
        attempt += 1;
        let pending = conn.pending_migrations(MIGRATIONS).map(|p| p.len());
        tracing::debug!(attempt, ?pending, error = %err, "migration failed");
        if pending.is_ok_and(|n| n == 0) {
            return Ok(applied);
        }
        if attempt >= MIGRATION_ATTEMPTS {
            return Err(MigrationError(err));
        }
        // 10 ms doubling to 320 ms, jittered so that racers spread out.
        let ceiling = Duration::from_millis(10 << (attempt - 1).min(5));
        std::thread::sleep(ceiling.mul_f64(0.5 + rand::random::<f64>() / 2.0));
    }
}

/// A migration failed; the harness's error is the source.
#[derive(Debug, thiserror::Error)]
#[error("migration failed")]
pub struct MigrationError(#[source] Box<dyn std::error::Error + Send + Sync>);

/// The version of the migration that creates `accounts`, as
/// [`run_migrations`] reports it.
pub const ACCOUNTS_MIGRATION: &str = "20261121000000";

/// What the connected user finds of the `accounts` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountsTable {
    /// Not in the current schema.
    Missing,
    /// There, but the user may not read and write it (or may not read and
    /// add to the `transfers` ledger).
    NotAllowed,
    /// There and usable.
    Ready,
}

/// What the app learns before its first transaction, in one query (one
/// round trip): which server it is, and what the user finds of `accounts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspection {
    /// The server.
    pub server: Server,
    /// The `accounts` table.
    pub accounts: AccountsTable,
    /// Whether the `transfers` ledger is there (the second migration).
    pub ledger: bool,
    /// The `accounts` table as the catalog describes it, when it is there
    /// and was not made by the app's own DDL (which needs no comparing).
    pub shape: Option<shape::Shape>,
}

/// Learns what [`Inspection`] says, cheaply where it can: one query that
/// calls a few functions and looks up two constraints by their table
/// ([`inspect_quickly`]) answers when both tables are there, usable, and
/// were made by the app's own DDL; anything else gets the whole inspection
/// ([`inspect_fully`]), which a table made elsewhere needs to be compared
/// with what the app needs.
///
/// # Errors
/// The whole inspection's error.
pub fn inspect(conn: &mut PgConnection) -> QueryResult<Inspection> {
    match inspect_quickly(conn) {
        Ok(Some(inspection)) => Ok(inspection),
        // A table is missing (the query fails on its name), a privilege is,
        // or a table was made elsewhere: the whole inspection says which.
        Ok(None) | Err(_) => inspect_fully(conn),
    }
}

/// The start-up check of a set-up schema, in one query over no catalog
/// scan: the server, the user's privileges on both tables (by name), and
/// the constraints only the app's migrations and `dbinit.sql` create
/// (`balance_non_negative`, `amount_non_negative`), looked up by their
/// table: a table that has its constraint was made by the app's DDL, so its
/// shape needs no comparing. `Some` only when all of that holds.
///
/// The whole inspection reads `information_schema`, whose views cost about
/// 9 ms of PostgreSQL's time in a new session, against under 2 ms for this; on
/// CockroachDB both catalogs are virtual tables built for each query, and
/// `pg_constraint` looked up by `conrelid` is served by its virtual index
/// on the table id (cockroachdb/cockroach#47316), so only the two tables
/// concerned are described.
///
/// # Errors
/// The query's error: a table that does not exist fails `::regclass`.
pub fn inspect_quickly(conn: &mut PgConnection) -> QueryResult<Option<Inspection>> {
    let found = quick_check().get_result(conn)?;
    Ok(quick_inspection(found))
}

/// The quick check's query (see [`inspect_quickly`]): the server's version,
/// whether the user may use both tables, whether the app's DDL made them.
pub(crate) fn quick_check() -> diesel::dsl::select<(
    diesel::expression::SqlLiteral<Text>,
    diesel::expression::SqlLiteral<Bool>,
    diesel::expression::SqlLiteral<Bool>,
)> {
    diesel::select((
        sql::<Text>("version()"),
        sql::<Bool>(
            "has_table_privilege('accounts', 'SELECT') AND has_table_privilege('accounts', 'INSERT') \
             AND has_table_privilege('accounts', 'UPDATE') AND has_table_privilege('accounts', 'DELETE') \
             AND has_table_privilege('transfers', 'SELECT') AND has_table_privilege('transfers', 'INSERT')",
        ),
        sql::<Bool>(
            "EXISTS (SELECT 1 FROM pg_catalog.pg_constraint \
             WHERE conrelid = 'accounts'::regclass AND conname = 'balance_non_negative') \
             AND EXISTS (SELECT 1 FROM pg_catalog.pg_constraint \
             WHERE conrelid = 'transfers'::regclass AND conname = 'amount_non_negative')",
        ),
    ))
}

/// What the quick check's answer says: an inspection when all holds.
pub(crate) fn quick_inspection(
    (version, allowed, ours): (String, bool, bool),
) -> Option<Inspection> {
    (allowed && ours).then(|| Inspection {
        server: Server::from_version(&version),
        accounts: AccountsTable::Ready,
        ledger: true,
        shape: None,
    })
}

/// The whole inspection. `accounts` is looked for in `pg_class`, which
/// lists tables the user may not use (`information_schema` hides them,
/// which made a missing privilege look like a missing table).
///
/// # Errors
/// The query's error.
pub fn inspect_fully(conn: &mut PgConnection) -> QueryResult<Inspection> {
    type Catalog = (Option<String>, Option<String>, Option<String>);
    let (version, present, allowed, ledger, (columns, key, checks)): (
        String,
        bool,
        bool,
        bool,
        Catalog,
    ) = diesel::select((
        sql::<Text>("version()"),
        sql::<Bool>(
            "EXISTS (SELECT 1 FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relname = 'accounts' AND n.nspname = current_schema())",
        ),
        sql::<Bool>(
            "COALESCE((SELECT bool_and(has_table_privilege(c.oid, p)) \
             FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace, \
             unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE']) AS p \
             WHERE c.relname = 'accounts' AND n.nspname = current_schema()), false) \
             AND COALESCE((SELECT bool_and(has_table_privilege(c.oid, p)) \
             FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace, \
             unnest(ARRAY['SELECT', 'INSERT']) AS p \
             WHERE c.relname = 'transfers' AND n.nspname = current_schema()), true)",
        ),
        sql::<Bool>(
            "EXISTS (SELECT 1 FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relname = 'transfers' AND n.nspname = current_schema())",
        ),
        // The accounts table's shape, for shape::differences.
        (
            sql::<Nullable<Text>>(
                "(SELECT string_agg(column_name || ' ' || data_type || ' ' || is_nullable, ',' \
                 ORDER BY column_name) FROM information_schema.columns \
                 WHERE table_schema = current_schema() AND table_name = 'accounts')",
            ),
            sql::<Nullable<Text>>(
                "(SELECT string_agg(k.column_name, ',' ORDER BY k.ordinal_position) \
                 FROM information_schema.table_constraints t \
                 JOIN information_schema.key_column_usage k ON k.constraint_name = t.constraint_name \
                 AND k.table_schema = t.table_schema AND k.table_name = t.table_name \
                 WHERE t.table_schema = current_schema() AND t.table_name = 'accounts' \
                 AND t.constraint_type = 'PRIMARY KEY')",
            ),
            // The migration's own check is known by its name: reading a
            // clause (pg_get_constraintdef, which information_schema uses
            // too) waits for a lock on the table, and the inspection must
            // not wait behind a session holding it.
            sql::<Nullable<Text>>(
                "(SELECT string_agg(CASE WHEN c.conname = 'balance_non_negative' \
                 THEN 'balance >= 0' ELSE pg_get_constraintdef(c.oid) END, ' AND ') \
                 FROM pg_catalog.pg_constraint c \
                 JOIN pg_catalog.pg_class r ON r.oid = c.conrelid \
                 JOIN pg_catalog.pg_namespace n ON n.oid = r.relnamespace \
                 WHERE r.relname = 'accounts' AND n.nspname = current_schema() AND c.contype = 'c')",
            ),
        ),
    ))
    .get_result(conn)?;
    Ok(Inspection {
        server: Server::from_version(&version),
        accounts: match (present, allowed) {
            (false, _) => AccountsTable::Missing,
            (true, false) => AccountsTable::NotAllowed,
            (true, true) => AccountsTable::Ready,
        },
        ledger,
        shape: present.then(|| {
            shape::Shape::from_catalog(
                columns.as_deref().unwrap_or_default(),
                key.as_deref().unwrap_or_default(),
                checks.as_deref().unwrap_or_default(),
            )
        }),
    })
}

/// Rows of `accounts` whose balance is NULL (a table made elsewhere).
///
/// # Errors
/// The query's error.
pub fn null_balances(conn: &mut PgConnection) -> QueryResult<i64> {
    crate::schema::accounts::table
        .filter(crate::schema::accounts::balance.nullable().is_null())
        .count()
        .get_result(conn)
}

/// Logs every statement `conn` runs at debug level on target `bank::sql`.
/// Connection events are left out on purpose: they carry the URL, and with
/// it the password.
pub fn log_statements(conn: &mut PgConnection) {
    conn.set_instrumentation(|event: InstrumentationEvent<'_>| {
        if let InstrumentationEvent::StartQuery { query, .. } = event {
            tracing::debug!(target: "bank::sql", "{query}");
        }
    });
}
