//! [`Retrier`]: the helper a service builds once and shares, its options,
//! and its entry points (per-call options through [`TransactionBuilder`]).

use std::borrow::Cow;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::result::Error as DieselError;
use diesel::sql_types::Text;
use tracing::warn;

use crate::clock::{Clock, SystemClock};
use crate::core::{Plan, Verdict};
#[cfg(feature = "async")]
use crate::nonblocking::{AsyncKeyedUnit, AsyncSource, AsyncUnit};
use crate::{
    Applied, Backoff, Committed, Isolation, Keyed, Observer, Protocol, RetryBudget, Server, Source,
    TxError, UnitError,
};
#[cfg(feature = "async")]
use diesel_async::AsyncPgConnection;

/// `SHOW transaction_isolation`'s one row, on both servers.
#[derive(QueryableByName)]
pub(crate) struct ReportedIsolation {
    #[diesel(sql_type = Text)]
    pub(crate) transaction_isolation: String,
}

/// Runs units of work in retried transactions. Build one per server (or
/// per kind of work), share it: it is cheap to clone, and clones share what
/// it learns (the server, a pooler met). Options are set with the `with_`
/// methods; the defaults are ten retries within 30 seconds, no statement
/// waiting more than 20 seconds (nor past the deadline), [`Backoff::default`],
/// SERIALIZABLE, the savepoint protocol on CockroachDB.
///
/// ```no_run
/// use diesel::prelude::*;
/// use diesel::r2d2::{ConnectionManager, Pool};
/// use diesel_tx_retry::Retrier;
///
/// diesel::table! { accounts (id) { id -> Int8, balance -> Int8 } }
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = Pool::new(ConnectionManager::<PgConnection>::new(std::env::var("DATABASE_URL")?))?;
/// let retrier = Retrier::default();
/// let balance: i64 = retrier.transaction(&pool, |conn| {
///     diesel::update(accounts::table.find(1))
///         .set(accounts::balance.eq(accounts::balance - 10))
///         .returning(accounts::balance)
///         .get_result(conn)
/// })?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Retrier {
    max_attempts: u32,
    deadline: Option<Duration>,
    statement_timeout: Option<Duration>,
    backoff: Backoff,
    isolation: Isolation,
    protocol: Option<Protocol>,
    observer: Option<Arc<dyn Observer>>,
    retry_budget: Option<RetryBudget>,
    clock: Arc<dyn Clock>,
    jitter: Arc<dyn Fn() -> f64 + Send + Sync>,
    shared: Arc<Shared>,
}

/// What a helper learns as it goes, shared by its clones.
#[derive(Default)]
struct Shared {
    /// The server, told or detected on first use.
    server: OnceLock<Server>,
    /// The `BEGIN` messages whose statement bound is the policy's own (the
    /// deadline not yet nearer), built once instead of once per attempt:
    /// formatting it was the helper's largest cost of its own, about 1,300
    /// instructions an attempt (bench/NOTES.md). By protocol, isolation and
    /// read-only.
    begin: [OnceLock<Box<str>>; 8],
    /// The restart protocol's commit message whose statement bound is the
    /// policy's own, built once likewise.
    commit: OnceLock<Box<str>>,
    /// Set once a READ COMMITTED transaction asked the server which level it
    /// really runs.
    isolation_checked: AtomicBool,
    /// Set once the helper said that a transaction-mode pooler moves its
    /// connections between server sessions.
    pooler_told: AtomicBool,
}

impl Default for Retrier {
    fn default() -> Self {
        Self {
            max_attempts: 11,
            deadline: Some(Duration::from_secs(30)),
            statement_timeout: Some(Duration::from_secs(20)),
            backoff: Backoff::default(),
            isolation: Isolation::Serializable,
            protocol: None,
            observer: None,
            retry_budget: None,
            clock: Arc::new(SystemClock),
            jitter: Arc::new(rand::random::<f64>),
            shared: Arc::default(),
        }
    }
}

impl fmt::Debug for Retrier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retrier")
            .field("max_attempts", &self.max_attempts)
            .field("deadline", &self.deadline)
            .field("statement_timeout", &self.statement_timeout)
            .field("backoff", &self.backoff)
            .field("isolation", &self.isolation)
            .field("server", &self.server())
            .field("retry_budget", &self.retry_budget)
            .finish_non_exhaustive()
    }
}

impl Retrier {
    /// The defaults ([`Retrier::default`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// Attempts in all, the first included (at least 1; 11 by default).
    #[must_use]
    pub fn with_max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// Gives up rather than start a retry that would begin after `deadline`
    /// since the first attempt began (30 s by default). No statement waits
    /// past it either: each attempt bounds its statements by the time left.
    #[must_use]
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// No deadline: only the attempts bound a call.
    #[must_use]
    pub fn without_deadline(mut self) -> Self {
        self.deadline = None;
        self
    }

    /// No statement of a unit waits longer than `timeout` (a lock held
    /// elsewhere, a slow query): the server cancels it (20 s by default).
    #[must_use]
    pub fn with_statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = Some(timeout);
        // The messages built with the old bound are not this helper's.
        self.shared = Arc::new(self.shared.forked());
        self
    }

    /// No statement bound but the deadline's.
    #[must_use]
    pub fn without_statement_timeout(mut self) -> Self {
        self.statement_timeout = None;
        self.shared = Arc::new(self.shared.forked());
        self
    }

    /// The wait between attempts ([`Backoff::default`] by default).
    #[must_use]
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Runs every unit at `level` unless the call asks otherwise
    /// ([`TransactionBuilder::isolation`]); SERIALIZABLE by default.
    ///
    /// Under READ COMMITTED the transaction is framed with `BEGIN` ...
    /// `COMMIT` on every server, a 40001 that reaches the client still
    /// restarts it after the backoff, and every read that a later write
    /// depends on must lock what it reads (`FOR UPDATE`), which only the
    /// unit can do. The first READ COMMITTED transaction also asks the
    /// server which level it runs (`SHOW transaction_isolation`, one round
    /// trip, once per helper): CockroachDB runs READ COMMITTED as
    /// SERIALIZABLE without a word when its cluster setting
    /// `sql.txn.read_committed_isolation.enabled` is off, and the helper then
    /// says so in one `tracing` warning, and goes on.
    #[must_use]
    pub fn with_isolation(mut self, level: Isolation) -> Self {
        self.isolation = level;
        self
    }

    /// Pays for every retry from `budget`, which any number of helpers may
    /// share (clones share it): a retry it refuses ends the call as given
    /// up ([`Budget::Retries`](crate::Budget::Retries)). None by default.
    #[must_use]
    pub fn with_retry_budget(mut self, budget: RetryBudget) -> Self {
        self.retry_budget = Some(budget);
        self
    }

    /// No shared retry budget: only each call's own bound its retries.
    #[must_use]
    pub fn without_retry_budget(mut self) -> Self {
        self.retry_budget = None;
        self
    }

    /// The shared retry budget, if the helper has one.
    pub fn retry_budget(&self) -> Option<&RetryBudget> {
        self.retry_budget.as_ref()
    }

    /// Tells `observer` of every attempt (see [`Observer`]).
    #[must_use]
    pub fn with_observer(mut self, observer: Arc<dyn Observer>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Frames transactions with `BEGIN` ... `COMMIT` and restarts them on a
    /// conflict, on CockroachDB too (where the savepoint protocol is the
    /// default). The retry rules still follow the server.
    #[must_use]
    pub fn with_restart_protocol(mut self) -> Self {
        self.protocol = Some(Protocol::Restart);
        self.shared = Arc::new(self.shared.forked());
        self
    }

    /// Tells the helper which server it talks to, which it would otherwise
    /// learn with a `SELECT version()` on first use (one round trip, once).
    #[must_use]
    pub fn for_server(self, server: Server) -> Self {
        let shared = self.shared.forked();
        let _ = shared.server.set(server);
        Self {
            shared: Arc::new(shared),
            ..self
        }
    }

    /// The server, once known.
    pub fn server(&self) -> Option<Server> {
        self.shared.server.get().copied()
    }

    /// The protocol that frames SERIALIZABLE transactions, once the server
    /// is known.
    pub fn protocol(&self) -> Option<Protocol> {
        self.server()
            .map(|server| self.protocol.unwrap_or(server.retry_protocol()))
    }

    /// Attempts in all, the first included.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The deadline of a call, if any.
    pub fn deadline(&self) -> Option<Duration> {
        self.deadline
    }

    /// The bound of a statement, if any (besides the deadline).
    pub fn statement_timeout(&self) -> Option<Duration> {
        self.statement_timeout
    }

    /// The wait between attempts.
    pub fn backoff(&self) -> Backoff {
        self.backoff
    }

    /// The isolation level units run at unless a call asks for another.
    pub fn isolation(&self) -> Isolation {
        self.isolation
    }

    /// Runs `unit` in a transaction on a connection from `source` (`&pool`,
    /// `&held`, or `&mut conn`), again after each conflict, and returns the
    /// value of the attempt that committed, as Diesel's
    /// `Connection::transaction` does. `unit` may run several times: it must
    /// have no side effects outside the database, and must not commit or
    /// roll back itself. It is never run again after a commit whose outcome
    /// is unknown ([`TxError::AmbiguousCommit`]); for that, give it a key
    /// ([`Retrier::idempotent_transaction`]).
    ///
    /// ```no_run
    /// # use diesel::prelude::*;
    /// # use diesel_tx_retry::Retrier;
    /// # fn demo(conn: &mut PgConnection) -> Result<(), Box<dyn std::error::Error>> {
    /// // On a connection of the caller's own: a lost one ends the call.
    /// let rows = Retrier::default().transaction(conn, |conn| {
    ///     diesel::sql_query("UPDATE counters SET n = n + 1").execute(conn)
    /// })?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`TxError`]: only the committed attempt's value is ever returned.
    pub fn transaction<S, T, E, M, F>(&self, source: S, unit: F) -> Result<T, TxError<E>>
    where
        S: Source,
        E: UnitError<M>,
        F: FnMut(&mut PgConnection) -> Result<T, E>,
    {
        self.build_transaction()
            .run(source, unit)
            .map(Committed::into_value)
    }

    /// Runs an idempotent unit: one that writes its change under `key`, a
    /// key the caller drew *before* the call (an id, an idempotency key)
    /// and that a unique constraint keeps single. After a commit whose
    /// outcome is unknown it runs again, told so ([`Keyed::in_doubt`]), and
    /// says what it found: [`Applied::Earlier`] when its key is there (the
    /// earlier attempt committed; apply nothing), [`Applied::Now`] when it
    /// applied the change. The call returns that verdict with the value.
    ///
    /// ```no_run
    /// # use diesel::prelude::*;
    /// # use diesel::r2d2::{ConnectionManager, Pool};
    /// use diesel_tx_retry::{Applied, Keyed, Retrier};
    /// use uuid::Uuid;
    /// # diesel::table! { orders (id) { id -> Uuid, item -> Text } }
    ///
    /// /// Places the order `attempt.key()`, unless an earlier attempt did.
    /// fn place(conn: &mut PgConnection, attempt: &Keyed<'_, Uuid>) -> QueryResult<Applied<()>> {
    ///     if attempt.in_doubt() && orders::table.find(attempt.key()).execute(conn)? == 1 {
    ///         return Ok(Applied::Earlier(()));
    ///     }
    ///     diesel::insert_into(orders::table)
    ///         .values((orders::id.eq(attempt.key()), orders::item.eq("tea")))
    ///         .execute(conn)?;
    ///     Ok(Applied::Now(()))
    /// }
    ///
    /// # fn demo(pool: &Pool<ConnectionManager<PgConnection>>) -> Result<(), Box<dyn std::error::Error>> {
    /// // The key is drawn before the call: every attempt writes the same.
    /// let placed = Retrier::default().idempotent_transaction(pool, Uuid::new_v4(), place)?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`TxError`]; after a commit in doubt, never "nothing committed": a
    /// failure before the unit said what it found is
    /// [`TxError::AmbiguousCommit`].
    pub fn idempotent_transaction<S, K, T, E, M, F>(
        &self,
        source: S,
        key: K,
        unit: F,
    ) -> Result<Applied<T>, TxError<E>>
    where
        S: Source,
        E: UnitError<M>,
        F: FnMut(&mut PgConnection, &Keyed<'_, K>) -> Result<Applied<T>, E>,
    {
        self.build_transaction()
            .run_idempotent(source, key, unit)
            .map(Committed::into_value)
    }

    /// Options for one call (read-only, another isolation level), and the
    /// entry points that report how the call went ([`Committed`]).
    pub fn build_transaction(&self) -> TransactionBuilder<'_> {
        TransactionBuilder {
            retrier: self,
            isolation: None,
            read_only: false,
        }
    }

    pub(crate) fn clock(&self) -> &dyn Clock {
        &*self.clock
    }

    /// The clock, shared (for a task that outlives a call).
    #[cfg(feature = "async")]
    pub(crate) fn clock_arc(&self) -> Arc<dyn Clock> {
        Arc::clone(&self.clock)
    }

    /// The observer, shared (for a task that outlives a call).
    #[cfg(feature = "async")]
    pub(crate) fn observer_arc(&self) -> Option<Arc<dyn Observer>> {
        self.observer.clone()
    }

    pub(crate) fn observer(&self) -> Option<&dyn Observer> {
        self.observer.as_deref()
    }

    /// The wait before the retry that follows attempt `attempts`, drawn now.
    pub(crate) fn backoff_for(&self, attempts: u32) -> Duration {
        self.backoff.delay(attempts, (self.jitter)())
    }

    /// The server: known, or asked of `conn` now (and remembered).
    pub(crate) fn server_on(&self, conn: &mut PgConnection) -> QueryResult<Server> {
        if let Some(server) = self.server() {
            return Ok(server);
        }
        let version: String =
            diesel::select(diesel::dsl::sql::<Text>("version()")).get_result(conn)?;
        Ok(self.remember_server(&version))
    }

    /// The server whose `version()` is `version`, remembered.
    pub(crate) fn remember_server(&self, version: &str) -> Server {
        *self
            .shared
            .server
            .get_or_init(|| Server::from_version(version))
    }

    /// The plan of a call to a `server`.
    fn plan(&self, server: Server, isolation: Option<Isolation>, read_only: bool) -> Plan {
        Plan {
            server,
            protocol: self.protocol.unwrap_or(server.retry_protocol()),
            isolation: isolation.unwrap_or(self.isolation),
            read_only,
            idempotent: false,
            replaceable: true,
        }
    }

    /// The plan of an async call, once its server is known.
    #[cfg(feature = "async")]
    fn plan_for(
        &self,
        isolation: Option<Isolation>,
        read_only: bool,
        idempotent: bool,
    ) -> impl FnOnce(Server, bool) -> Plan + Send + '_ {
        move |server, replaceable| Plan {
            replaceable,
            idempotent,
            ..self.plan(server, isolation, read_only)
        }
    }

    /// The bound of the next statement: the policy's, or the time left
    /// before the deadline where that is nearer (then `true`).
    fn statement_limit(&self, start: Instant) -> (Option<Duration>, bool) {
        let left = self.deadline.map(|deadline| {
            deadline.saturating_sub(self.clock.now().saturating_duration_since(start))
        });
        match (self.statement_timeout, left) {
            (Some(bound), Some(left)) if left < bound => (Some(left), true),
            (None, Some(left)) => (Some(left), true),
            (bound, _) => (bound, false),
        }
    }

    /// The statements that begin an attempt, sent as one message (one round
    /// trip): the isolation level, said explicitly so that a server
    /// configured otherwise cannot weaken it; a statement timeout no longer
    /// than the time left before the deadline, so that no blocked statement
    /// outlives it by more than its own wait; and, with the savepoint
    /// protocol, the restart savepoint, after the timeout so that a rewind
    /// keeps it.
    pub(crate) fn begin_sql(&self, plan: &Plan, start: Instant) -> Cow<'_, str> {
        let (limit, nearer) = self.statement_limit(start);
        if nearer {
            return Cow::Owned(format_begin(plan, limit));
        }
        let slot = 4 * usize::from(plan.framing() == Protocol::Savepoint)
            + 2 * usize::from(plan.isolation != Isolation::Serializable)
            + usize::from(plan.read_only);
        Cow::Borrowed(self.shared.begin[slot].get_or_init(|| format_begin(plan, limit).into()))
    }

    /// The commit message. With the savepoint protocol, `RELEASE SAVEPOINT
    /// cockroach_restart; COMMIT`: in an aborted transaction the RELEASE
    /// fails (25P02). With the restart protocol a plain `COMMIT` would not:
    /// PostgreSQL answers the `COMMIT` of an aborted transaction with the tag
    /// `ROLLBACK` and no error, and Diesel reads no tag. So a statement goes
    /// first in the same message, which fails with 25P02 there and keeps
    /// the `COMMIT` from running: the statement bound again, for the time
    /// left (so the commit, too, ends by the deadline; cheaper than a
    /// `SELECT`, whose row libpq must build), or, with no bound at all,
    /// `SELECT 1` (which leaves a session's own `statement_timeout` alone).
    pub(crate) fn commit_sql(&self, plan: &Plan, start: Instant) -> Cow<'_, str> {
        if plan.framing() == Protocol::Savepoint {
            return Cow::Borrowed("RELEASE SAVEPOINT cockroach_restart; COMMIT");
        }
        let format = |limit: Duration| {
            format!(
                "SET LOCAL statement_timeout = {}; COMMIT",
                limit.as_millis().max(1)
            )
        };
        match self.statement_limit(start) {
            (None, _) => Cow::Borrowed("SELECT 1; COMMIT"),
            (Some(limit), true) => Cow::Owned(format(limit)),
            (Some(limit), false) => {
                Cow::Borrowed(self.shared.commit.get_or_init(|| format(limit).into()))
            }
        }
    }

    /// The statements that rewind an attempt, sent as one message: back to
    /// the restart savepoint, then the statement bound again, for the time
    /// left. CockroachDB's docs say a `ROLLBACK TO SAVEPOINT` rolls back
    /// what `SET LOCAL` set (the set-vars page), which would leave the
    /// retry unbounded; and the time left is shorter now anyway.
    pub(crate) fn rewind_sql(&self, start: Instant) -> String {
        let mut sql = String::from("ROLLBACK TO SAVEPOINT cockroach_restart");
        if let Some(limit) = self.statement_limit(start).0 {
            sql.push_str(&format!(
                "; SET LOCAL statement_timeout = {}",
                limit.as_millis().max(1)
            ));
        }
        sql
    }

    /// Once per helper, in its first READ COMMITTED transaction: asks the
    /// server which level it runs, and warns if it is a stronger one. A
    /// round trip of its own, because Diesel's simple-query call (which
    /// sends the `BEGIN` message) returns no rows.
    pub(crate) fn check_isolation(
        &self,
        conn: &mut PgConnection,
        asked: Isolation,
    ) -> QueryResult<()> {
        if !self.isolation_check_due(asked) {
            return Ok(());
        }
        let reported = diesel::sql_query("SHOW transaction_isolation")
            .get_result::<ReportedIsolation>(conn)?
            .transaction_isolation;
        self.isolation_reported(asked, &reported);
        Ok(())
    }

    /// Whether this transaction, at `asked`, is the one that asks the server
    /// which level it runs.
    pub(crate) fn isolation_check_due(&self, asked: Isolation) -> bool {
        asked != Isolation::Serializable && !self.shared.isolation_checked.load(Ordering::Relaxed)
    }

    /// The server said it runs `reported` where `asked` was asked for: a
    /// warning if that is a stronger level.
    pub(crate) fn isolation_reported(&self, asked: Isolation, reported: &str) {
        self.shared.isolation_checked.store(true, Ordering::Relaxed);
        if let Some(level) = asked.upgraded_to(reported) {
            warn!(
                "{asked} was asked for, but the server runs the transaction as {level}: on \
                 CockroachDB, enable it with SET CLUSTER SETTING \
                 sql.txn.read_committed_isolation.enabled = true (v24.1 and v24.2 also need an \
                 enterprise licence); going on at {level}",
            );
        }
    }

    /// Whether a transaction-mode pooler was met: connections then stop
    /// naming their statements.
    pub(crate) fn pooler_seen(&self) -> bool {
        self.shared.pooler_told.load(Ordering::Relaxed)
    }

    /// A transaction-mode pooler was met (`err`): said once.
    pub(crate) fn pooler_met(&self, err: &DieselError) {
        if !self.shared.pooler_told.swap(true, Ordering::Relaxed) {
            warn!(
                "a transaction-mode pooler (PgBouncer?) gives this connection's transactions \
                 different server sessions ({err}); its statements go unnamed from now on, and \
                 the transaction runs again",
            );
        }
    }
}

impl Shared {
    /// What a helper with other options starts from: the server it knows,
    /// and nothing built for the old options.
    fn forked(&self) -> Self {
        let shared = Self::default();
        if let Some(server) = self.server.get() {
            let _ = shared.server.set(*server);
        }
        shared
    }
}

/// The `BEGIN` message of [`format_begin`], for a front end that sends it
/// without waiting for its answer (the async one, which pipelines it with
/// the unit's first statement): a bare `BEGIN`, then the options as `SET
/// TRANSACTION`, in the same message.
///
/// Why: in PostgreSQL a `BEGIN` whose options fail (SERIALIZABLE on a hot
/// standby) returns the session to idle ("we assume that the user will
/// interpret the error as meaning the BEGIN failed to get him into a
/// transaction block", `AbortCurrentTransaction` in xact.c), and a
/// statement already on its way behind it would run on its own, outside
/// any transaction. A bare `BEGIN` fails only with the connection; once it
/// ran, any failure after it aborts the block, and every statement behind
/// it fails with 25P02 until the rollback. Both servers take `SET
/// TRANSACTION` right after `BEGIN` (CockroachDB's docs: "after you BEGIN
/// it but before executing the first statement that manipulates a
/// database").
#[cfg(feature = "async")]
pub(crate) fn pipelinable_begin(begin: &str) -> Cow<'_, str> {
    match begin.strip_prefix("BEGIN ISOLATION LEVEL ") {
        Some(rest) => Cow::Owned(format!("BEGIN; SET TRANSACTION ISOLATION LEVEL {rest}")),
        None => Cow::Borrowed(begin),
    }
}

fn format_begin(plan: &Plan, limit: Option<Duration>) -> String {
    let mut sql = format!("BEGIN ISOLATION LEVEL {}", plan.isolation.sql());
    if plan.read_only {
        sql.push_str(", READ ONLY");
    }
    if let Some(limit) = limit {
        // 0 would mean no limit at all.
        let ms = limit.as_millis().max(1);
        sql.push_str(&format!("; SET LOCAL statement_timeout = {ms}"));
    }
    if plan.framing() == Protocol::Savepoint {
        sql.push_str("; SAVEPOINT cockroach_restart");
    }
    sql
}

/// One call's options, from [`Retrier::build_transaction`], in the shape of
/// Diesel's own `conn.build_transaction()`; its entry points report how the
/// call went ([`Committed`]: the attempts, how a doubt ended).
///
/// ```no_run
/// # use diesel::prelude::*;
/// # use diesel::r2d2::{ConnectionManager, Pool};
/// use diesel_tx_retry::{Isolation, Retrier};
/// # fn demo(pool: &Pool<ConnectionManager<PgConnection>>) -> Result<(), Box<dyn std::error::Error>> {
/// let done = Retrier::default()
///     .build_transaction()
///     .read_only()
///     .isolation(Isolation::ReadCommitted)
///     .run(pool, |conn| diesel::sql_query("SELECT 1").execute(conn))?;
/// println!("{} rows in {} attempt(s)", done.value(), done.attempts());
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy)]
#[must_use = "a transaction builder does nothing until run"]
pub struct TransactionBuilder<'r> {
    retrier: &'r Retrier,
    isolation: Option<Isolation>,
    read_only: bool,
}

impl<'r> TransactionBuilder<'r> {
    /// `BEGIN ... READ ONLY`: the server refuses writes.
    pub fn read_only(self) -> Self {
        Self {
            read_only: true,
            ..self
        }
    }

    /// This call at `level`, instead of the helper's own
    /// ([`Retrier::with_isolation`]).
    pub fn isolation(self, level: Isolation) -> Self {
        Self {
            isolation: Some(level),
            ..self
        }
    }

    /// Like [`Retrier::transaction`], with this call's options, reporting
    /// how it went.
    ///
    /// # Errors
    /// See [`Retrier::transaction`].
    pub fn run<S, T, E, M, F>(self, source: S, mut unit: F) -> Result<Committed<T>, TxError<E>>
    where
        S: Source,
        E: UnitError<M>,
        F: FnMut(&mut PgConnection) -> Result<T, E>,
    {
        let Self {
            retrier,
            isolation,
            read_only,
        } = self;
        crate::blocking::run(
            retrier,
            |server, replaceable| Plan {
                replaceable,
                ..retrier.plan(server, isolation, read_only)
            },
            source,
            |conn, _, _| {
                unit(conn)
                    .map(|value| (value, Verdict::Plain))
                    .map_err(|err| (err, false))
            },
        )
    }

    /// Like [`Retrier::idempotent_transaction`], with this call's options,
    /// reporting how it went.
    ///
    /// # Errors
    /// See [`Retrier::idempotent_transaction`].
    pub fn run_idempotent<S, K, T, E, M, F>(
        self,
        source: S,
        key: K,
        mut unit: F,
    ) -> Result<Committed<Applied<T>>, TxError<E>>
    where
        S: Source,
        E: UnitError<M>,
        F: FnMut(&mut PgConnection, &Keyed<'_, K>) -> Result<Applied<T>, E>,
    {
        let Self {
            retrier,
            isolation,
            read_only,
        } = self;
        crate::blocking::run(
            retrier,
            |server, replaceable| Plan {
                replaceable,
                idempotent: true,
                ..retrier.plan(server, isolation, read_only)
            },
            source,
            |conn, attempt, in_doubt| {
                let keyed = Keyed {
                    key: &key,
                    attempt,
                    in_doubt,
                    settled: AtomicBool::new(false),
                };
                unit(conn, &keyed)
                    .map(|applied| {
                        let verdict = if applied.was_earlier() {
                            Verdict::AppliedEarlier
                        } else {
                            Verdict::AppliedNow
                        };
                        (applied, verdict)
                    })
                    .map_err(|err| (err, AtomicBool::load(&keyed.settled, Ordering::Relaxed)))
            },
        )
    }
}

/// The async entry points (feature `async`): the same calls on
/// diesel-async's `AsyncPgConnection`, on tokio.
#[cfg(feature = "async")]
#[cfg_attr(docsrs, doc(cfg(feature = "async")))]
impl Retrier {
    /// [`Retrier::transaction`] for an async unit: `async |conn| ...` on a
    /// connection from `source` (a bb8 pool), with the same guarantees, the
    /// backoff on tokio's timer. Cancel-safe: dropping the returned future
    /// (a request deadline, a `select!`) never leaves a transaction open on
    /// a pooled connection, and a commit already sent still has its outcome
    /// told to the observer. The future is `Send` when the unit's is, so it
    /// runs inside `tokio::spawn` and a web framework's handler.
    ///
    /// ```no_run
    /// use diesel_async::pooled_connection::{bb8::Pool, AsyncDieselConnectionManager};
    /// use diesel_async::{AsyncPgConnection, RunQueryDsl};
    /// use diesel_tx_retry::Retrier;
    ///
    /// # async fn demo(url: &str) -> Result<(), Box<dyn std::error::Error>> {
    /// let pool = Pool::builder()
    ///     .build(AsyncDieselConnectionManager::<AsyncPgConnection>::new(url))
    ///     .await?;
    /// let retrier = Retrier::default();
    /// let bumped = retrier
    ///     .transaction_async(&pool, async |conn: &mut AsyncPgConnection| {
    ///         diesel::sql_query("UPDATE counters SET n = n + 1").execute(conn).await
    ///     })
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`TxError`], as [`Retrier::transaction`].
    pub async fn transaction_async<S, T, E, M, F>(
        &self,
        source: S,
        unit: F,
    ) -> Result<T, TxError<E>>
    where
        S: AsyncSource,
        T: Send,
        E: UnitError<M>,
        for<'r> F: AsyncFnMut(&'r mut AsyncPgConnection) -> Result<T, E>
            + AsyncUnit<&'r mut AsyncPgConnection, Result<T, E>, Fut: Send>
            + Send,
    {
        self.build_transaction()
            .run_async(source, unit)
            .await
            .map(Committed::into_value)
    }

    /// [`Retrier::idempotent_transaction`] for an async unit:
    /// `async |conn, attempt| ...`, with the key in `attempt`.
    ///
    /// # Errors
    /// [`TxError`], as [`Retrier::idempotent_transaction`].
    pub async fn idempotent_transaction_async<S, K, T, E, M, F>(
        &self,
        source: S,
        key: K,
        unit: F,
    ) -> Result<Applied<T>, TxError<E>>
    where
        S: AsyncSource,
        K: Send + Sync,
        T: Send,
        E: UnitError<M>,
        for<'r, 'k, 'q> F: AsyncFnMut(&'r mut AsyncPgConnection, &'k Keyed<'q, K>) -> Result<Applied<T>, E>
            + AsyncKeyedUnit<
                &'r mut AsyncPgConnection,
                &'k Keyed<'q, K>,
                Result<Applied<T>, E>,
                Fut: Send,
            > + Send,
    {
        self.build_transaction()
            .run_idempotent_async(source, key, unit)
            .await
            .map(Committed::into_value)
    }
}

#[cfg(feature = "async")]
#[cfg_attr(docsrs, doc(cfg(feature = "async")))]
impl TransactionBuilder<'_> {
    /// [`TransactionBuilder::run`] for an async unit
    /// ([`Retrier::transaction_async`]).
    ///
    /// # Errors
    /// See [`Retrier::transaction`].
    pub async fn run_async<S, T, E, M, F>(
        self,
        source: S,
        unit: F,
    ) -> Result<Committed<T>, TxError<E>>
    where
        S: AsyncSource,
        T: Send,
        E: UnitError<M>,
        for<'r> F: AsyncFnMut(&'r mut AsyncPgConnection) -> Result<T, E>
            + AsyncUnit<&'r mut AsyncPgConnection, Result<T, E>, Fut: Send>
            + Send,
    {
        let Self {
            retrier,
            isolation,
            read_only,
        } = self;
        let plan = retrier.plan_for(isolation, read_only, false);
        crate::nonblocking::run(retrier, plan, source, crate::nonblocking::Plain(unit)).await
    }

    /// [`TransactionBuilder::run_idempotent`] for an async unit
    /// ([`Retrier::idempotent_transaction_async`]).
    ///
    /// # Errors
    /// See [`Retrier::idempotent_transaction`].
    pub async fn run_idempotent_async<S, K, T, E, M, F>(
        self,
        source: S,
        key: K,
        unit: F,
    ) -> Result<Committed<Applied<T>>, TxError<E>>
    where
        S: AsyncSource,
        K: Send + Sync,
        T: Send,
        E: UnitError<M>,
        for<'r, 'k, 'q> F: AsyncFnMut(&'r mut AsyncPgConnection, &'k Keyed<'q, K>) -> Result<Applied<T>, E>
            + AsyncKeyedUnit<
                &'r mut AsyncPgConnection,
                &'k Keyed<'q, K>,
                Result<Applied<T>, E>,
                Fut: Send,
            > + Send,
    {
        let Self {
            retrier,
            isolation,
            read_only,
        } = self;
        let plan = retrier.plan_for(isolation, read_only, true);
        let unit = crate::nonblocking::KeyedRun { unit, key };
        crate::nonblocking::run(retrier, plan, source, unit).await
    }
}

/// Knobs for the crate's own tests, in `crate::internal`.
#[cfg(any(test, feature = "testing"))]
impl Retrier {
    pub(crate) fn set_protocol(&mut self, protocol: Protocol) {
        self.protocol = Some(protocol);
        self.shared = Arc::new(self.shared.forked());
    }

    pub(crate) fn set_clock(&mut self, clock: Arc<dyn Clock>) {
        self.clock = clock;
    }

    pub(crate) fn set_jitter(&mut self, jitter: Arc<dyn Fn() -> f64 + Send + Sync>) {
        self.jitter = jitter;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::internal::FakeClock;

    fn plan(protocol: Protocol, isolation: Isolation, read_only: bool) -> Plan {
        Plan {
            server: Server::PostgreSql,
            protocol,
            isolation,
            read_only,
            idempotent: false,
            replaceable: true,
        }
    }

    fn retrier(deadline: Option<u64>, bound: Option<u64>, clock: &Arc<FakeClock>) -> Retrier {
        let mut r = Retrier {
            deadline: deadline.map(Duration::from_secs),
            statement_timeout: bound.map(Duration::from_secs),
            ..Retrier::default()
        };
        r.set_clock(clock.clone());
        r
    }

    const SER: Isolation = Isolation::Serializable;

    #[test]
    fn the_policys_bound_is_built_once_and_reused() {
        let clock = FakeClock::new();
        let start = clock.now();
        let r = retrier(Some(30), Some(20), &clock);
        let p = plan(Protocol::Restart, SER, false);
        let first = r.begin_sql(&p, start);
        assert_eq!(
            first,
            "BEGIN ISOLATION LEVEL SERIALIZABLE; SET LOCAL statement_timeout = 20000"
        );
        clock.advance(Duration::from_secs(10));
        let again = r.begin_sql(&p, start);
        assert!(
            matches!((&first, &again), (Cow::Borrowed(a), Cow::Borrowed(b)) if std::ptr::eq(*a, *b))
        );
        assert_eq!(
            r.begin_sql(&plan(Protocol::Restart, SER, true), start),
            "BEGIN ISOLATION LEVEL SERIALIZABLE, READ ONLY; SET LOCAL statement_timeout = 20000"
        );
    }

    #[cfg(feature = "async")]
    #[test]
    fn a_pipelined_begin_opens_the_block_bare_and_sets_its_options_after() {
        let clock = FakeClock::new();
        let start = clock.now();
        let r = retrier(Some(30), Some(20), &clock);
        let cases = [
            (
                plan(Protocol::Restart, SER, false),
                "BEGIN; SET TRANSACTION ISOLATION LEVEL SERIALIZABLE; SET LOCAL statement_timeout = 20000",
            ),
            (
                plan(Protocol::Restart, SER, true),
                "BEGIN; SET TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY; SET LOCAL statement_timeout = 20000",
            ),
            (
                plan(Protocol::Savepoint, SER, false),
                "BEGIN; SET TRANSACTION ISOLATION LEVEL SERIALIZABLE; SET LOCAL statement_timeout = 20000; \
                 SAVEPOINT cockroach_restart",
            ),
        ];
        for (plan, expected) in cases {
            assert_eq!(pipelinable_begin(&r.begin_sql(&plan, start)), expected);
        }
        let unbounded = retrier(None, None, &clock);
        assert_eq!(
            pipelinable_begin(&unbounded.begin_sql(&plan(Protocol::Restart, SER, false), start)),
            "BEGIN; SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"
        );
    }

    #[test]
    fn the_commit_message_finds_an_aborted_transaction_out_and_bounds_the_commit() {
        let clock = FakeClock::new();
        let start = clock.now();
        let r = retrier(Some(30), Some(20), &clock);
        let restart = plan(Protocol::Restart, SER, false);
        // The policy's bound: built once.
        let first = r.commit_sql(&restart, start);
        assert_eq!(first, "SET LOCAL statement_timeout = 20000; COMMIT");
        let again = r.commit_sql(&restart, start);
        assert!(
            matches!((&first, &again), (Cow::Borrowed(a), Cow::Borrowed(b)) if std::ptr::eq(*a, *b))
        );
        // The deadline nearer: the time left.
        clock.advance(Duration::from_millis(22_500));
        assert_eq!(
            r.commit_sql(&restart, start),
            "SET LOCAL statement_timeout = 7500; COMMIT"
        );
        // No bound at all: a SELECT, which leaves the session's own alone.
        let unbounded = retrier(None, None, &clock);
        assert_eq!(unbounded.commit_sql(&restart, start), "SELECT 1; COMMIT");
        // The savepoint protocol's RELEASE fails in an aborted transaction.
        assert_eq!(
            r.commit_sql(&plan(Protocol::Savepoint, SER, false), start),
            "RELEASE SAVEPOINT cockroach_restart; COMMIT"
        );
        // READ COMMITTED is framed BEGIN ... COMMIT on every server.
        assert_eq!(
            r.commit_sql(
                &plan(Protocol::Savepoint, Isolation::ReadCommitted, false),
                start
            ),
            "SET LOCAL statement_timeout = 7500; COMMIT"
        );
    }

    #[test]
    fn a_clone_given_another_bound_builds_its_own_messages() {
        let clock = FakeClock::new();
        let start = clock.now();
        let r = retrier(None, Some(20), &clock);
        let p = plan(Protocol::Restart, SER, false);
        assert_eq!(
            r.commit_sql(&p, start),
            "SET LOCAL statement_timeout = 20000; COMMIT"
        );
        assert!(r.begin_sql(&p, start).ends_with("= 20000"));
        let other = r.clone().with_statement_timeout(Duration::from_secs(5));
        assert_eq!(
            other.commit_sql(&p, start),
            "SET LOCAL statement_timeout = 5000; COMMIT"
        );
        assert!(other.begin_sql(&p, start).ends_with("= 5000"));
        let none = r.clone().without_statement_timeout();
        assert_eq!(
            none.begin_sql(&p, start),
            "BEGIN ISOLATION LEVEL SERIALIZABLE"
        );
        // The original keeps its own.
        assert_eq!(
            r.commit_sql(&p, start),
            "SET LOCAL statement_timeout = 20000; COMMIT"
        );
    }

    #[test]
    fn a_nearer_deadline_bounds_the_statement_instead() {
        let clock = FakeClock::new();
        let start = clock.now();
        clock.advance(Duration::from_millis(12_500));
        let r = retrier(Some(30), Some(20), &clock);
        let p = plan(Protocol::Restart, SER, false);
        assert_eq!(
            r.begin_sql(&p, start),
            "BEGIN ISOLATION LEVEL SERIALIZABLE; SET LOCAL statement_timeout = 17500"
        );
        assert_eq!(
            r.rewind_sql(start),
            "ROLLBACK TO SAVEPOINT cockroach_restart; SET LOCAL statement_timeout = 17500"
        );
        // Past the deadline the bound is 1 ms, never 0 (which means none).
        clock.advance(Duration::from_secs(20));
        assert_eq!(
            r.begin_sql(&p, start),
            "BEGIN ISOLATION LEVEL SERIALIZABLE; SET LOCAL statement_timeout = 1"
        );
    }

    #[test]
    fn a_deadline_alone_bounds_every_statement_by_the_time_left() {
        let clock = FakeClock::new();
        let start = clock.now();
        clock.advance(Duration::from_secs(4));
        let r = retrier(Some(30), None, &clock);
        let p = plan(Protocol::Restart, SER, false);
        assert_eq!(
            r.begin_sql(&p, start),
            "BEGIN ISOLATION LEVEL SERIALIZABLE; SET LOCAL statement_timeout = 26000"
        );
        let unbounded = retrier(None, None, &clock);
        assert_eq!(
            unbounded.begin_sql(&p, start),
            "BEGIN ISOLATION LEVEL SERIALIZABLE"
        );
        assert_eq!(
            unbounded.rewind_sql(start),
            "ROLLBACK TO SAVEPOINT cockroach_restart"
        );
    }

    #[test]
    fn read_committed_begins_so_and_never_with_the_savepoint() {
        let clock = FakeClock::new();
        let start = clock.now();
        let r = retrier(None, Some(5), &clock);
        let rc = Isolation::ReadCommitted;
        assert_eq!(
            r.begin_sql(&plan(Protocol::Savepoint, rc, false), start),
            "BEGIN ISOLATION LEVEL READ COMMITTED; SET LOCAL statement_timeout = 5000"
        );
        assert_eq!(
            r.begin_sql(&plan(Protocol::Savepoint, rc, true), start),
            "BEGIN ISOLATION LEVEL READ COMMITTED, READ ONLY; SET LOCAL statement_timeout = 5000"
        );
        // The messages live side by side in the cache.
        assert_eq!(
            r.begin_sql(&plan(Protocol::Savepoint, SER, false), start),
            "BEGIN ISOLATION LEVEL SERIALIZABLE; SET LOCAL statement_timeout = 5000; SAVEPOINT cockroach_restart"
        );
        assert_eq!(
            r.begin_sql(&plan(Protocol::Restart, SER, false), start),
            "BEGIN ISOLATION LEVEL SERIALIZABLE; SET LOCAL statement_timeout = 5000"
        );
    }

    #[test]
    fn options_are_kept_and_clones_share_what_they_learn() {
        let r = Retrier::default()
            .with_max_attempts(0)
            .with_deadline(Duration::from_secs(3))
            .without_statement_timeout()
            .for_server(Server::CockroachDb);
        assert_eq!(r.max_attempts(), 1, "at least one attempt");
        assert_eq!(r.deadline(), Some(Duration::from_secs(3)));
        assert_eq!(r.statement_timeout(), None);
        assert_eq!(r.protocol(), Some(Protocol::Savepoint));
        assert_eq!(
            r.clone().with_restart_protocol().protocol(),
            Some(Protocol::Restart)
        );
        let unknown = Retrier::default();
        let clone = unknown.clone();
        let _ = unknown.shared.server.set(Server::PostgreSql);
        assert_eq!(clone.server(), Some(Server::PostgreSql));
    }
}
