//! [`Retrier`]: the retry loop that runs a unit of work in transactions
//! until one commits, a budget runs out, or the decision table says stop.

use std::borrow::Cow;
use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::Text;
use tracing::{debug, debug_span, warn};

/// `SHOW transaction_isolation`'s one row, on both servers.
#[derive(QueryableByName)]
struct ReportedIsolation {
    #[diesel(sql_type = Text)]
    transaction_isolation: String,
}

use crate::clock::{Clock, SystemClock};
#[cfg(feature = "r2d2")]
use crate::connections::Connections;
use crate::doubt::Verdict;
use crate::session::{open_transaction, Cause, Failure, Nowhere, OpenError, Session, Source};
use crate::{
    classify, commit_in_doubt, decide, failed_at_savepoint_commit, framing, AsDieselError, Attempt,
    Budget, Class, Committed, Context, Isolation, Observer, Outcome, Protocol, Resolution,
    RetryPolicy, Server, Situation, Stage, Step, TxError, TxOptions,
};

/// Runs units of work in retried transactions. Cheap to clone and share
/// between threads.
#[derive(Clone)]
pub struct Retrier {
    policy: RetryPolicy,
    server: Server,
    protocol: Protocol,
    isolation: Isolation,
    observer: Option<Arc<dyn Observer>>,
    clock: Arc<dyn Clock>,
    jitter: Arc<dyn Fn() -> f64 + Send + Sync>,
    begin: Arc<BeginCache>,
    /// Set once a READ COMMITTED transaction has asked the server which
    /// level it really runs (see [`Retrier::with_isolation`]).
    isolation_checked: Arc<AtomicBool>,
    /// Set once the helper has said that a transaction-mode pooler moves
    /// its connections between server sessions.
    pooler_told: Arc<AtomicBool>,
}

/// The `BEGIN` messages whose statement bound is the policy's own (the
/// deadline not yet nearer), built once per configuration instead of once
/// per attempt: formatting it was the helper's largest cost of its own, about
/// 1,300 instructions an attempt (bench/NOTES.md). Indexed by isolation and
/// read-only.
#[derive(Default)]
struct BeginCache([OnceLock<Box<str>>; 4]);

impl fmt::Debug for Retrier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retrier")
            .field("policy", &self.policy)
            .field("server", &self.server)
            .field("protocol", &self.protocol)
            .field("isolation", &self.isolation)
            .finish_non_exhaustive()
    }
}

impl Retrier {
    /// A helper for `server` (see [`Server::detect`]), with that server's
    /// protocol, the real clock and random jitter.
    pub fn new(policy: RetryPolicy, server: Server) -> Self {
        Self {
            policy: RetryPolicy {
                max_attempts: policy.max_attempts.max(1),
                ..policy
            },
            server,
            protocol: server.retry_protocol(),
            isolation: Isolation::Serializable,
            observer: None,
            clock: Arc::new(SystemClock),
            jitter: Arc::new(rand::random::<f64>),
            begin: Arc::default(),
            isolation_checked: Arc::default(),
            pooler_told: Arc::default(),
        }
    }

    /// Frames transactions with `BEGIN` ... `COMMIT` and restarts them on a
    /// conflict, on CockroachDB too (where the savepoint protocol is the
    /// default). The retry rules still follow the server.
    #[must_use]
    pub fn with_restart_protocol(mut self) -> Self {
        self.protocol = Protocol::Restart;
        self.begin = Arc::default();
        self
    }

    /// Runs every unit at `level` unless its [`TxOptions`] say otherwise
    /// (SERIALIZABLE by default).
    ///
    /// Under READ COMMITTED the transaction is framed with `BEGIN` ...
    /// `COMMIT` on every server ([`framing`]), a 40001 that reaches the client
    /// still restarts it after the backoff, and every read that a later
    /// write depends on must lock what it reads (`FOR UPDATE`), which only
    /// the unit can do. The first READ COMMITTED transaction also asks the
    /// server which level it runs (`SHOW transaction_isolation`, one round
    /// trip, once per helper): CockroachDB runs READ COMMITTED as
    /// SERIALIZABLE without a word when its cluster setting
    /// `sql.txn.read_committed_isolation.enabled` is off, and the helper then
    /// says so in one `tracing` warning, and goes on.
    #[must_use]
    pub fn with_isolation(mut self, level: Isolation) -> Self {
        self.isolation = level;
        self.isolation_checked = Arc::default();
        self
    }

    /// The isolation level units run at unless they ask for another.
    pub fn isolation(&self) -> Isolation {
        self.isolation
    }

    /// Tells `observer` of every attempt (see [`Observer`]).
    #[must_use]
    pub fn with_observer(mut self, observer: Arc<dyn Observer>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// The policy in force.
    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }

    /// The protocol in use.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// Runs `unit` in a transaction on a connection from `connections` (an
    /// r2d2 pool, or a [`Held`](crate::Held) connection), retrying as the
    /// crate documentation describes; a connection lost before the commit is
    /// replaced by a new one from the pool. `unit` may run several times: it
    /// must have no side effects outside the database and must not commit
    /// or roll back itself.
    ///
    /// # Errors
    /// See [`TxError`]; only the committed attempt's value is ever returned.
    #[cfg(feature = "r2d2")]
    pub fn run<T, E, F, C>(
        &self,
        connections: &C,
        opts: TxOptions,
        mut unit: F,
    ) -> Result<Committed<T>, TxError<E>>
    where
        E: AsDieselError,
        F: FnMut(&mut PgConnection) -> Result<T, E>,
        C: Connections,
    {
        self.run_in(Session::pooled(connections), opts, |conn, _: &Context| {
            unit(conn)
        })
    }

    /// Like [`Retrier::run`], with a [`Context`] for the unit: which attempt
    /// it is, and whether an earlier attempt's commit is in doubt, which a
    /// unit declared idempotent resolves by looking for the key it drew
    /// before the call (the crate docs, "Commits in doubt").
    ///
    /// # Errors
    /// See [`TxError`].
    #[cfg(feature = "r2d2")]
    pub fn run_with<T, E, F, C>(
        &self,
        connections: &C,
        opts: TxOptions,
        unit: F,
    ) -> Result<Committed<T>, TxError<E>>
    where
        E: AsDieselError,
        F: FnMut(&mut PgConnection, &Context) -> Result<T, E>,
        C: Connections,
    {
        self.run_in(Session::pooled(connections), opts, unit)
    }

    /// Like [`Retrier::run`], on one connection the caller owns. A lost
    /// connection cannot be replaced here, so it ends the call with its error.
    ///
    /// # Errors
    /// See [`TxError`]; [`TxError::AlreadyInTransaction`] when `conn` is
    /// inside a transaction already.
    pub fn run_on<T, E, F>(
        &self,
        conn: &mut PgConnection,
        opts: TxOptions,
        mut unit: F,
    ) -> Result<Committed<T>, TxError<E>>
    where
        E: AsDieselError,
        F: FnMut(&mut PgConnection) -> Result<T, E>,
    {
        self.run_on_with(conn, opts, |conn, _: &Context| unit(conn))
    }

    /// Like [`Retrier::run_on`], with a [`Context`] for the unit (see
    /// [`Retrier::run_with`]).
    ///
    /// # Errors
    /// See [`Retrier::run_on`].
    pub fn run_on_with<T, E, F>(
        &self,
        conn: &mut PgConnection,
        opts: TxOptions,
        unit: F,
    ) -> Result<Committed<T>, TxError<E>>
    where
        E: AsDieselError,
        F: FnMut(&mut PgConnection, &Context) -> Result<T, E>,
    {
        // Refused before the session exists: its cleanup would roll back
        // the caller's own transaction.
        if open_transaction(conn) == Some(true) {
            return Err(TxError::AlreadyInTransaction);
        }
        self.run_in(Session::<Nowhere>::borrowed(conn), opts, unit)
    }

    /// The retry loop: one attempt, then the step [`decide`] picks. Every
    /// return drops the session, which rolls back whatever is still open.
    fn run_in<T, E, F, S>(
        &self,
        mut session: Session<'_, S>,
        opts: TxOptions,
        mut unit: F,
    ) -> Result<Committed<T>, TxError<E>>
    where
        E: AsDieselError,
        F: FnMut(&mut PgConnection, &Context) -> Result<T, E>,
        S: Source,
    {
        let start = self.clock.now();
        let isolation = opts.isolation_level().unwrap_or(self.isolation);
        let framed = framing(self.protocol, isolation);
        let mut attempts = 0;
        // A commit in doubt, and whether a unit has resolved it since: the
        // cause is kept for the error should no attempt resolve it.
        let mut doubt = Doubt::<E>::default();
        loop {
            attempts += 1;
            let span = debug_span!("tx_attempt", attempt = attempts, protocol = ?framed,
                isolation = isolation.sql(), retry_cause = tracing::field::Empty);
            let _entered = span.enter();
            let tell = |stage, cause, outcome| self.tell(attempts, start, stage, cause, outcome);
            let context = Context::new(attempts, doubt.open());
            let outcome = self.attempt(&mut session, opts, isolation, start, &context, &mut unit);
            doubt.heard(context.verdict());
            let (stage, error, value) = match outcome {
                Ok(value) => {
                    tell(None, None, Outcome::Committed);
                    return Ok(doubt.committed(value, attempts));
                }
                Err(Failure::At(stage, error, value)) => (stage, error, value),
                Err(Failure::NoConnection(err)) => {
                    tell(Some(Stage::Begin), None, Outcome::NoConnection);
                    return Err(match doubt.take_open_cause() {
                        Some(cause) => TxError::AmbiguousCommit { attempts, cause },
                        None => S::no_connection(err),
                    });
                }
                Err(Failure::Panicked(payload)) => {
                    tell(None, None, Outcome::Panicked);
                    drop(session); // rolls back, hands the connection back idle
                    panic::resume_unwind(payload);
                }
            };
            let class = error.as_diesel().map_or(Class::Other, classify);
            // The next attempt, on this connection or another, opens with
            // its statements unnamed (see `attempt`).
            if class == Class::StaleStatement && !self.pooler_told.swap(true, Ordering::Relaxed) {
                warn!(
                    "a transaction-mode pooler (PgBouncer?) gives this connection's transactions \
                     different server sessions ({}); its statements go unnamed from now on, and \
                     the transaction runs again",
                    Cause(&error)
                );
            }
            let (stage_, class_) = (Some(stage), Some(class));
            // The wait before the next attempt, should there be one.
            let delay = self.policy.backoff.delay(attempts, (self.jitter)());
            let situation = Situation {
                stage,
                class,
                server: self.server,
                protocol: self.protocol,
                isolation,
                idempotent: opts.is_idempotent(),
                in_doubt: doubt.open(),
                waits: !delay.is_zero(),
                replaceable: session.replaceable(),
            };
            let step = decide(&situation);
            span.record("retry_cause", tracing::field::display(Cause(&error)));
            match (step, value) {
                (Step::Committed, Some(value)) => {
                    tell(stage_, class_, Outcome::Committed);
                    return Ok(doubt.committed(value, attempts));
                }
                (Step::Ambiguous, _) => {
                    debug!(attempts, ?stage, "commit outcome unknown");
                    tell(stage_, class_, Outcome::Ambiguous);
                    return Err(TxError::AmbiguousCommit {
                        attempts,
                        cause: error,
                    });
                }
                // The unit returned Ok from a transaction an error had
                // aborted: its value is not to be returned.
                (Step::Fail, Some(_)) if class == Class::Aborted => {
                    tell(stage_, class_, Outcome::Failed);
                    return Err(TxError::SwallowedError { attempts });
                }
                // `Committed` comes only after a COMMIT, which only a
                // finished unit reaches; without a value, fail safe.
                (Step::Fail | Step::Committed, _) => {
                    tell(stage_, class_, Outcome::Failed);
                    return Err(TxError::Failed(error));
                }
                (Step::Rewind | Step::Restart | Step::Reconnect, _) => {}
            }
            let elapsed = self.clock.now().saturating_duration_since(start);
            let in_doubt_now = commit_in_doubt(&situation);
            if let Some(budget) = self.spent(attempts, elapsed + delay) {
                debug!(attempts, ?budget, "giving up");
                tell(stage_, class_, Outcome::GaveUp(budget));
                // The earlier attempt (or this one) may have committed:
                // never "gave up, nothing committed".
                if doubt.open() || in_doubt_now {
                    return Err(TxError::AmbiguousCommit {
                        attempts,
                        cause: error,
                    });
                }
                return Err(TxError::GaveUp {
                    attempts,
                    elapsed,
                    budget,
                    last: error,
                });
            }
            debug!(
                ?stage,
                ?step,
                sleep_ms = delay.as_secs_f64() * 1e3,
                in_doubt = in_doubt_now,
                "retrying transaction"
            );
            tell(stage_, class_, Outcome::Retry { step, delay });
            if in_doubt_now {
                doubt.opened(error);
            }
            match step {
                Step::Rewind => session.rewind(&self.rewind_sql(start)),
                Step::Reconnect => session.discard(),
                _ => session.rollback(),
            }
            // Never reached with a transaction open: a rewind does not wait,
            // and the other steps closed it just above.
            if !delay.is_zero() {
                self.clock.sleep(delay);
            }
        }
    }

    /// The budget that forbids a retry that would begin `at` after the
    /// first attempt began, having made `attempts` already.
    fn spent(&self, attempts: u32, at: Duration) -> Option<Budget> {
        if attempts >= self.policy.max_attempts {
            Some(Budget::Attempts)
        } else if self.policy.deadline.is_some_and(|deadline| at >= deadline) {
            Some(Budget::Deadline)
        } else {
            None
        }
    }

    /// Tells the observer, if any, how attempt `number` ended.
    fn tell(
        &self,
        number: u32,
        start: Instant,
        stage: Option<Stage>,
        cause: Option<Class>,
        outcome: Outcome,
    ) {
        if let Some(observer) = &self.observer {
            observer.attempt(&Attempt {
                number,
                elapsed: self.clock.now().saturating_duration_since(start),
                stage,
                cause,
                outcome,
            });
        }
    }

    /// The statements that begin an attempt, sent as one message (one round
    /// trip): SERIALIZABLE, which is CockroachDB's default and what makes
    /// PostgreSQL detect the anomalies a bank must not have, said explicitly
    /// so that a server configured otherwise cannot weaken it; a statement
    /// timeout no longer than the time left before the deadline, so that no
    /// blocked statement outlives it by more than its own wait; and, with
    /// the savepoint protocol, the restart savepoint, after the timeout so
    /// that a rewind keeps it.
    fn begin_sql(&self, opts: TxOptions, isolation: Isolation, start: Instant) -> Cow<'_, str> {
        let (limit, nearer) = self.statement_limit(start);
        if nearer {
            return Cow::Owned(self.format_begin(opts, isolation, limit));
        }
        let slot = 2 * usize::from(isolation != Isolation::Serializable)
            + usize::from(opts.is_read_only());
        Cow::Borrowed(
            self.begin.0[slot]
                .get_or_init(|| self.format_begin(opts, isolation, limit).into_boxed_str()),
        )
    }

    /// The statements that rewind an attempt, sent as one message: back to
    /// the restart savepoint, then the statement bound again, for the time
    /// left. CockroachDB's docs say a `ROLLBACK TO SAVEPOINT` rolls back
    /// what `SET LOCAL` set (the set-vars page), which would leave the
    /// retry unbounded; and the time left is shorter now anyway.
    fn rewind_sql(&self, start: Instant) -> String {
        let mut sql = String::from("ROLLBACK TO SAVEPOINT cockroach_restart");
        if let Some(limit) = self.statement_limit(start).0 {
            sql.push_str(&format!(
                "; SET LOCAL statement_timeout = {}",
                limit.as_millis().max(1)
            ));
        }
        sql
    }

    /// The bound of the next statement: the policy's, or the time left
    /// before the deadline where that is nearer (then `true`).
    fn statement_limit(&self, start: Instant) -> (Option<Duration>, bool) {
        let left = self.policy.deadline.map(|deadline| {
            deadline.saturating_sub(self.clock.now().saturating_duration_since(start))
        });
        match (self.policy.statement_timeout, left) {
            (Some(bound), Some(left)) if left < bound => (Some(left), true),
            (None, Some(left)) => (Some(left), true),
            (bound, _) => (bound, false),
        }
    }

    fn format_begin(
        &self,
        opts: TxOptions,
        isolation: Isolation,
        limit: Option<Duration>,
    ) -> String {
        let mut sql = format!("BEGIN ISOLATION LEVEL {}", isolation.sql());
        if opts.is_read_only() {
            sql.push_str(", READ ONLY");
        }
        if let Some(limit) = limit {
            // 0 would mean no limit at all.
            let ms = limit.as_millis().max(1);
            sql.push_str(&format!("; SET LOCAL statement_timeout = {ms}"));
        }
        if framing(self.protocol, isolation) == Protocol::Savepoint {
            sql.push_str("; SAVEPOINT cockroach_restart");
        }
        sql
    }

    /// Once per helper, in its first READ COMMITTED transaction: asks the
    /// server which level it runs, and warns if it is a stronger one. A
    /// round trip of its own, because Diesel's simple-query call (which
    /// sends the `BEGIN` message) returns no rows.
    fn check_isolation(&self, conn: &mut PgConnection, asked: Isolation) -> QueryResult<()> {
        if asked == Isolation::Serializable || self.isolation_checked.load(Ordering::Relaxed) {
            return Ok(());
        }
        let reported = diesel::sql_query("SHOW transaction_isolation")
            .get_result::<ReportedIsolation>(conn)?
            .transaction_isolation;
        self.isolation_checked.store(true, Ordering::Relaxed);
        if let Some(level) = asked.upgraded_to(&reported) {
            warn!(
                "{} was asked for, but the server runs the transaction as {}: on CockroachDB, \
                 enable it with SET CLUSTER SETTING sql.txn.read_committed_isolation.enabled = true \
                 (v24.1 and v24.2 also need an enterprise licence); going on at {}",
                asked.sql(),
                level.sql(),
                level.sql()
            );
        }
        Ok(())
    }

    /// One attempt: begin (unless a rewound transaction is still open), run
    /// the unit, commit.
    fn attempt<T, E, F, S>(
        &self,
        session: &mut Session<'_, S>,
        opts: TxOptions,
        isolation: Isolation,
        start: Instant,
        context: &Context,
        unit: &mut F,
    ) -> Result<T, Failure<T, E, S::Error>>
    where
        E: AsDieselError,
        F: FnMut(&mut PgConnection, &Context) -> Result<T, E>,
        S: Source,
    {
        let begin = self.begin_sql(opts, isolation, start);
        let conn = session.open(&begin).map_err(|err| match err {
            OpenError::NoConnection(err) => Failure::NoConnection(err),
            OpenError::Database(err) => Failure::At(Stage::Begin, E::from(err), None),
        })?;
        // Once one connection met a transaction-mode pooler, every other
        // one of the same helper stops naming its statements before it meets
        // one of another connection's (same name, other statement). The
        // BEGIN message is a simple query, never a named statement.
        if self.pooler_told.load(Ordering::Relaxed) {
            use diesel::connection::CacheSize;
            conn.set_prepared_statement_cache_size(CacheSize::Disabled);
        }
        self.check_isolation(conn, isolation)
            .map_err(|err| Failure::At(Stage::Begin, E::from(err), None))?;
        let framed = framing(self.protocol, isolation);
        let value = match panic::catch_unwind(AssertUnwindSafe(|| unit(&mut *conn, context))) {
            Ok(Ok(value)) => value,
            Ok(Err(err)) => return Err(Failure::At(Stage::Statement, err, None)),
            Err(payload) => return Err(Failure::Panicked(payload)),
        };
        if framed == Protocol::Savepoint {
            // One message, one round trip. The server stops at the first
            // statement that fails; which one that was is the RELEASE on
            // CockroachDB, and what libpq says on PostgreSQL
            // (`failed_at_savepoint_commit`). A RELEASE in a transaction the
            // unit let abort fails with 25P02: nothing committed.
            return match conn.batch_execute("RELEASE SAVEPOINT cockroach_restart; COMMIT") {
                Ok(()) => Ok(value),
                Err(err) => {
                    let stage = failed_at_savepoint_commit(self.server, open_transaction(conn));
                    Err(Failure::At(stage, E::from(err), Some(value)))
                }
            };
        }
        // `SELECT 1` first, in the same message: in a transaction that a
        // statement's error aborted (the unit caught the error and returned
        // Ok), PostgreSQL answers a plain COMMIT with the tag ROLLBACK and
        // no error, and nothing would tell the commit from a rollback here.
        // The SELECT fails there with 25P02 instead, and the COMMIT is never
        // run. Any other error of the message is the COMMIT's, or the
        // connection's, which may have taken the COMMIT with it.
        match conn.batch_execute("SELECT 1; COMMIT") {
            Ok(()) => Ok(value),
            Err(err) => Err(Failure::At(Stage::Commit, E::from(err), Some(value))),
        }
    }
}

/// A call's commits in doubt: whether one is open (unresolved), with the
/// error that opened it, and whether a unit found its earlier writes.
struct Doubt<E> {
    /// The cause of the doubt still open.
    open: Option<E>,
    /// Whether any commit of the call was in doubt.
    ever: bool,
    /// Whether a unit said its earlier attempt had committed.
    applied_earlier: bool,
}

impl<E> Default for Doubt<E> {
    fn default() -> Self {
        Self {
            open: None,
            ever: false,
            applied_earlier: false,
        }
    }
}

impl<E> Doubt<E> {
    fn open(&self) -> bool {
        self.open.is_some()
    }

    fn opened(&mut self, cause: E) {
        self.open = Some(cause);
        self.ever = true;
    }

    /// What the unit said of its earlier attempt, if anything: either way
    /// the doubt is resolved.
    fn heard(&mut self, verdict: Option<Verdict>) {
        match verdict {
            Some(Verdict::AppliedEarlier) => {
                self.applied_earlier = true;
                self.open = None;
            }
            Some(Verdict::NotAppliedEarlier) => self.open = None,
            None => {}
        }
    }

    fn take_open_cause(&mut self) -> Option<E> {
        self.open.take()
    }

    fn committed<T>(&self, value: T, attempts: u32) -> Committed<T> {
        let doubt = self.ever.then_some(if self.applied_earlier {
            Resolution::AppliedEarlier
        } else {
            Resolution::AppliedNow
        });
        if let Some(resolution) = doubt {
            debug!(?resolution, attempts, "the commit in doubt was resolved");
        }
        Committed {
            value,
            attempts,
            doubt,
        }
    }
}

#[cfg(feature = "testing")]
impl Retrier {
    /// Frames transactions with `protocol` whatever the server; the retry
    /// rules still follow the server. For tests that play CockroachDB's
    /// savepoint protocol on PostgreSQL, where it only adds round trips.
    #[must_use]
    pub fn with_protocol(mut self, protocol: Protocol) -> Self {
        self.protocol = protocol;
        self.begin = Arc::default();
        self
    }

    /// Replaces the clock (tests use one that records sleeps instead).
    #[must_use]
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Replaces the jitter source, which must return values in `[0, 1)`.
    #[must_use]
    pub fn with_jitter(mut self, jitter: Arc<dyn Fn() -> f64 + Send + Sync>) -> Self {
        self.jitter = jitter;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A clock that says whatever instant the test sets.
    struct SetClock(Mutex<Instant>);

    impl Clock for SetClock {
        fn now(&self) -> Instant {
            *self.0.lock().unwrap()
        }
        fn sleep(&self, _: Duration) {}
    }

    fn retrier(deadline: Option<u64>, bound: Option<u64>, clock: Arc<SetClock>) -> Retrier {
        let mut retrier = Retrier::new(
            RetryPolicy {
                deadline: deadline.map(Duration::from_secs),
                statement_timeout: bound.map(Duration::from_secs),
                ..RetryPolicy::default()
            },
            Server::PostgreSql,
        );
        retrier.clock = clock;
        retrier
    }

    #[test]
    fn the_policys_bound_is_built_once_and_reused() {
        let start = Instant::now();
        let clock = Arc::new(SetClock(Mutex::new(start)));
        let r = retrier(Some(30), Some(20), clock.clone());
        let first = r.begin_sql(TxOptions::default(), Isolation::Serializable, start);
        assert_eq!(
            first,
            "BEGIN ISOLATION LEVEL SERIALIZABLE; SET LOCAL statement_timeout = 20000"
        );
        *clock.0.lock().unwrap() = start + Duration::from_secs(10);
        let again = r.begin_sql(TxOptions::default(), Isolation::Serializable, start);
        assert!(
            matches!((&first, &again), (Cow::Borrowed(a), Cow::Borrowed(b)) if std::ptr::eq(*a, *b))
        );
        assert_eq!(
            r.begin_sql(
                TxOptions::default().read_only(),
                Isolation::Serializable,
                start
            ),
            "BEGIN ISOLATION LEVEL SERIALIZABLE, READ ONLY; SET LOCAL statement_timeout = 20000"
        );
    }

    #[test]
    fn a_nearer_deadline_bounds_the_statement_instead() {
        let start = Instant::now();
        let clock = Arc::new(SetClock(Mutex::new(start + Duration::from_millis(12_500))));
        let r = retrier(Some(30), Some(20), clock.clone());
        assert_eq!(
            r.begin_sql(TxOptions::default(), Isolation::Serializable, start),
            "BEGIN ISOLATION LEVEL SERIALIZABLE; SET LOCAL statement_timeout = 17500"
        );
        // Past the deadline the bound is 1 ms, never 0 (which means none).
        *clock.0.lock().unwrap() = start + Duration::from_secs(31);
        assert_eq!(
            r.begin_sql(TxOptions::default(), Isolation::Serializable, start),
            "BEGIN ISOLATION LEVEL SERIALIZABLE; SET LOCAL statement_timeout = 1"
        );
        // Then the policy's own bound again: the cache did not keep these.
        *clock.0.lock().unwrap() = start;
        assert_eq!(
            r.begin_sql(TxOptions::default(), Isolation::Serializable, start),
            "BEGIN ISOLATION LEVEL SERIALIZABLE; SET LOCAL statement_timeout = 20000"
        );
    }

    #[test]
    fn a_deadline_alone_bounds_every_statement_by_the_time_left() {
        let start = Instant::now();
        let clock = Arc::new(SetClock(Mutex::new(start + Duration::from_secs(4))));
        let r = retrier(Some(30), None, clock);
        assert_eq!(
            r.begin_sql(TxOptions::default(), Isolation::Serializable, start),
            "BEGIN ISOLATION LEVEL SERIALIZABLE; SET LOCAL statement_timeout = 26000"
        );
        let unbounded = retrier(None, None, Arc::new(SetClock(Mutex::new(start))));
        assert_eq!(
            unbounded.begin_sql(TxOptions::default(), Isolation::Serializable, start),
            "BEGIN ISOLATION LEVEL SERIALIZABLE"
        );
    }

    #[test]
    fn read_committed_begins_so_and_never_with_the_savepoint() {
        let start = Instant::now();
        let clock = Arc::new(SetClock(Mutex::new(start)));
        let mut r = retrier(None, Some(5), clock);
        r.protocol = Protocol::Savepoint;
        let rc = Isolation::ReadCommitted;
        assert_eq!(
            r.begin_sql(TxOptions::default(), rc, start),
            "BEGIN ISOLATION LEVEL READ COMMITTED; SET LOCAL statement_timeout = 5000"
        );
        assert_eq!(
            r.begin_sql(TxOptions::default().read_only(), rc, start),
            "BEGIN ISOLATION LEVEL READ COMMITTED, READ ONLY; SET LOCAL statement_timeout = 5000"
        );
        // The two levels' messages live side by side in the cache.
        assert_eq!(
            r.begin_sql(TxOptions::default(), Isolation::Serializable, start),
            "BEGIN ISOLATION LEVEL SERIALIZABLE; SET LOCAL statement_timeout = 5000; SAVEPOINT cockroach_restart"
        );
        let r = r.with_isolation(rc);
        assert_eq!(r.isolation(), rc);
    }

    #[test]
    fn changing_the_protocol_rebuilds_the_message() {
        let start = Instant::now();
        let clock = Arc::new(SetClock(Mutex::new(start)));
        let mut r = retrier(None, Some(5), clock);
        r.protocol = Protocol::Savepoint;
        r.begin = Arc::default();
        assert_eq!(
            r.begin_sql(TxOptions::default(), Isolation::Serializable, start),
            "BEGIN ISOLATION LEVEL SERIALIZABLE; SET LOCAL statement_timeout = 5000; SAVEPOINT cockroach_restart"
        );
        let r = r.with_restart_protocol();
        assert_eq!(
            r.begin_sql(TxOptions::default(), Isolation::Serializable, start),
            "BEGIN ISOLATION LEVEL SERIALIZABLE; SET LOCAL statement_timeout = 5000"
        );
    }
}
