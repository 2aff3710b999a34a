//! The retrying transaction helper: Diesel's counterpart of cockroach-go's
//! `crdb.ExecuteTx` and sqlalchemy-cockroachdb's `run_transaction`.
//!
//! [`Retrier::run`] checks a connection out of the pool, begins a SERIALIZABLE
//! transaction, runs the unit of work, commits, and returns the value of the
//! attempt that committed. When something fails, one pure function,
//! [`decide`], picks the next [`Step`] from where the error came ([`Stage`]),
//! what it means ([`Class`]), the server, the protocol and the unit's
//! options. This table is that function; its unit tests check it row by row:
//!
//! | stage      | class           | server, protocol          | next step |
//! |------------|-----------------|---------------------------|-----------|
//! | any (but a commit on CockroachDB, below) | definite | any | fail |
//! | begin      | conflict        | any                       | restart |
//! | begin, statement | lost      | any                       | reconnect; fail if the connection is the caller's |
//! | begin, statement | other     | any                       | fail |
//! | statement  | conflict        | CockroachDB, savepoint    | rewind if the retry would not wait, else restart |
//! | statement  | conflict        | otherwise                 | restart |
//! | release    | conflict        | CockroachDB               | rewind if the retry would not wait, else restart |
//! | release    | conflict        | PostgreSQL                | restart |
//! | release    | lost            | any                       | ambiguous; if idempotent: reconnect |
//! | release    | other           | PostgreSQL                | fail |
//! | release    | other           | CockroachDB               | ambiguous; if idempotent: restart |
//! | commit     | any             | CockroachDB, savepoint    | committed |
//! | commit     | conflict        | otherwise                 | restart |
//! | commit     | lost, other     | otherwise                 | ambiguous; if idempotent: reconnect (lost) or restart (other) |
//!
//! The steps: **rewind** is `ROLLBACK TO SAVEPOINT cockroach_restart` and an
//! immediate retry inside the same transaction, which keeps its place in line
//! (the savepoint protocol's one advantage); **restart** rolls the whole
//! transaction back, waits the backoff, and begins again; **reconnect** drops
//! the connection (the server rolls back whatever it had open), waits, and
//! retries on a fresh one; **ambiguous** reports [`TxError::AmbiguousCommit`];
//! **fail** rolls back and returns the error; **committed** returns the value.
//! Any retry first checks the budgets ([`RetryPolicy`]) and gives up with
//! [`TxError::GaveUp`] when one ran out.
//!
//! The rules behind the rows:
//! - The helper never sleeps inside a transaction: a transaction left open
//!   during the wait would keep blocking the very transactions it conflicted
//!   with. Only an immediate retry rewinds.
//! - On CockroachDB a successful `RELEASE SAVEPOINT cockroach_restart` *is*
//!   the commit; the `COMMIT` after it only readies the session, so its error
//!   changes nothing (cockroach-go ignores it too). An error *at* that
//!   RELEASE, other than a conflict or a refusal, leaves the outcome unknown.
//!   <https://www.cockroachlabs.com/docs/stable/advanced-client-side-transaction-retries>
//! - On PostgreSQL a RELEASE commits nothing, and rolling back to a savepoint
//!   keeps the transaction's snapshot, which cannot clear a real
//!   serialization failure: there every conflict restarts. These rules follow
//!   the server, not the protocol, so that tests may force the savepoint
//!   protocol on PostgreSQL.
//! - A lost connection before the commit was sent is safe to retry: the
//!   server rolls back a transaction whose connection died. The savepoint
//!   protocol sends `RELEASE SAVEPOINT cockroach_restart; COMMIT` as one
//!   message (one round trip), so a connection lost there may have taken the
//!   COMMIT with it: ambiguous on either server.
//! - A panic in the unit rolls back, returns the connection idle, and goes on.
//!
//! To reuse the helper, copy this file: it needs `diesel` (features
//! `postgres`, `r2d2`), `r2d2`, `rand`, `thiserror` and `tracing`.

use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::connection::{AnsiTransactionManager, SimpleConnection, TransactionManager};
use diesel::dsl::sql;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, ManageConnection, Pool, PooledConnection};
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel::sql_types::Text;
use tracing::{debug, debug_span};

/// Which server answered: the retry rules differ between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    /// CockroachDB.
    CockroachDb,
    /// PostgreSQL, or anything else speaking its protocol.
    PostgreSql,
}

impl Server {
    /// Detects the server from `SELECT version()`.
    ///
    /// # Errors
    /// The query's error.
    pub fn detect(conn: &mut PgConnection) -> QueryResult<Self> {
        let version: String = diesel::select(sql::<Text>("version()")).get_result(conn)?;
        Ok(Self::from_version(&version))
    }

    /// The server that answers `SELECT version()` with `version`.
    pub fn from_version(version: &str) -> Self {
        if version.contains("CockroachDB") {
            Server::CockroachDb
        } else {
            Server::PostgreSql
        }
    }

    /// The retry protocol that works on this server.
    pub fn retry_protocol(self) -> Protocol {
        match self {
            Server::CockroachDb => Protocol::Savepoint,
            Server::PostgreSql => Protocol::Restart,
        }
    }
}

/// How a transaction is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `BEGIN` ... `COMMIT`; every retry is a new transaction.
    Restart,
    /// CockroachDB's client-side retry protocol: `SAVEPOINT cockroach_restart`
    /// after `BEGIN`, `ROLLBACK TO SAVEPOINT cockroach_restart` to retry at
    /// once in the same transaction, `RELEASE SAVEPOINT cockroach_restart` to
    /// commit. The transaction keeps its priority across rewinds, so it is
    /// not starved under contention.
    Savepoint,
}

/// Capped exponential backoff with full jitter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// The ceiling of the first delayed retry.
    pub base: Duration,
    /// No delay exceeds this.
    pub cap: Duration,
    /// Retry the first time without waiting: most conflicts are one-offs.
    pub first_retry_immediate: bool,
}

impl Backoff {
    /// The delay before retry number `retry` (1 for the first retry), given a
    /// jitter draw `unit` in `[0, 1)`: `unit * min(cap, base * 2^(n-1))`.
    /// Full jitter spreads competing clients apart; see
    /// <https://aws.amazon.com/blogs/architecture/exponential-backoff-and-jitter/>.
    pub fn delay(&self, retry: u32, unit: f64) -> Duration {
        let n = if self.first_retry_immediate {
            retry.saturating_sub(1)
        } else {
            retry
        };
        if n == 0 {
            return Duration::ZERO;
        }
        let factor = 1u32.checked_shl(n - 1).unwrap_or(u32::MAX);
        let ceiling = self.base.saturating_mul(factor).min(self.cap);
        ceiling.mul_f64(unit.clamp(0.0, 1.0))
    }
}

/// How long the helper keeps trying.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; at least 1.
    pub max_attempts: u32,
    /// Give up rather than start a retry that would begin after this much
    /// time since the first attempt began. No statement waits past it
    /// either: each attempt limits its statements to the time left.
    pub deadline: Option<Duration>,
    /// No statement of the unit waits longer than this (a lock held
    /// elsewhere, a slow query): the server cancels it.
    pub statement_timeout: Option<Duration>,
    /// The wait between attempts.
    pub backoff: Backoff,
}

impl Default for RetryPolicy {
    /// Ten retries within 30 seconds, no statement waiting more than 20
    /// seconds (nor past the deadline). The first retry goes at once: on
    /// PostgreSQL a 40001 from a row lock arrives after the winner committed,
    /// so the way is clear; on CockroachDB an immediate retry rewinds to the
    /// savepoint and keeps the transaction's place in line. Later retries
    /// wait up to 2 ms, doubling to 500 ms, so that clients that keep
    /// colliding spread apart (bench/RESULTS.md has what that costs).
    fn default() -> Self {
        Self {
            max_attempts: 11,
            deadline: Some(Duration::from_secs(30)),
            statement_timeout: Some(Duration::from_secs(20)),
            backoff: Backoff {
                base: Duration::from_millis(2),
                cap: Duration::from_millis(500),
                first_retry_immediate: true,
            },
        }
    }
}

/// Per-transaction options. They hold for every attempt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TxOptions {
    /// `BEGIN ... READ ONLY`.
    pub read_only: bool,
    /// The caller declares that applying the unit twice is harmless, so an
    /// ambiguous commit may be retried instead of reported.
    pub idempotent: bool,
}

/// Time as the helper sees it; tests swap in a clock that does not sleep.
pub trait Clock: Send + Sync {
    /// The current instant.
    fn now(&self) -> Instant;
    /// Wait for `duration`.
    fn sleep(&self, duration: Duration);
}

/// The real clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn sleep(&self, duration: Duration) {
        std::thread::sleep(duration);
    }
}

/// Lets the helper see the database error inside the unit of work's error type.
pub trait AsDieselError: From<DieselError> {
    /// The Diesel error this error carries, if any.
    fn as_diesel(&self) -> Option<&DieselError>;
}

impl AsDieselError for DieselError {
    fn as_diesel(&self) -> Option<&DieselError> {
        Some(self)
    }
}

/// Why the helper stopped retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// `max_attempts` were used.
    Attempts,
    /// The next retry would have started past the deadline.
    Deadline,
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Budget::Attempts => "retry limit reached",
            Budget::Deadline => "deadline reached",
        })
    }
}

/// What the helper returns when no attempt committed.
#[derive(Debug, thiserror::Error)]
pub enum TxError<E> {
    /// A non-retryable error, from the unit of work or the database, as it was.
    #[error(transparent)]
    Failed(E),
    /// Every attempt hit a retryable error until a budget ran out. Nothing was
    /// committed.
    #[error("transaction gave up after {attempts} attempts in {elapsed:.2?} ({budget}); last error: {last}")]
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// Time since the first attempt began.
        elapsed: Duration,
        /// The budget that ran out.
        budget: Budget,
        /// The last retryable error.
        last: E,
    },
    /// The commit was sent but its outcome is unknown (connection lost, or the
    /// server said 40003): the transaction may or may not have been applied.
    #[error("commit result is ambiguous on attempt {attempts}: the transaction may or may not have been applied; check the data before retrying ({})", .cause.to_string().trim_end())]
    AmbiguousCommit {
        /// The attempt whose commit is in doubt.
        attempts: u32,
        /// What the driver reported.
        cause: E,
    },
    /// The connection was already inside a transaction, which the helper
    /// cannot restart; run the helper outside any other transaction.
    #[error("the connection is already inside a transaction; call the retry helper outside any transaction")]
    AlreadyInTransaction,
    /// No connection could be checked out of the pool.
    #[error("could not get a connection from the pool")]
    Pool(#[source] r2d2::Error),
}

/// The value of the attempt that committed, and how many attempts it took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed<T> {
    /// What the committed attempt returned.
    pub value: T,
    /// Attempts made, the committed one included.
    pub attempts: u32,
}

impl<T> Committed<T> {
    /// Attempts beyond the first.
    pub fn retries(&self) -> u32 {
        self.attempts - 1
    }
}

/// Where in an attempt an error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// `BEGIN` (and `SAVEPOINT cockroach_restart`), or getting a connection.
    Begin,
    /// The unit of work.
    Statement,
    /// `RELEASE SAVEPOINT cockroach_restart`.
    Release,
    /// `COMMIT`.
    Commit,
}

/// What an error means for a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// SQLSTATE 40001: the transaction did not commit; run it again.
    Conflict,
    /// The connection is gone.
    ConnectionLost,
    /// The server refused the data (constraint, read-only): running the same
    /// unit again would fail the same way.
    Definite,
    /// Anything else, 40003 ("result is ambiguous") among them: Diesel has no
    /// kind for it.
    Other,
}

/// Classifies by Diesel's `DatabaseErrorKind`, which Diesel derives from the
/// SQLSTATE, never by message text.
pub fn classify(err: &DieselError) -> Class {
    match err {
        DieselError::DatabaseError(kind, _) => match kind {
            DatabaseErrorKind::SerializationFailure => Class::Conflict,
            DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand => {
                Class::ConnectionLost
            }
            DatabaseErrorKind::UniqueViolation
            | DatabaseErrorKind::ForeignKeyViolation
            | DatabaseErrorKind::NotNullViolation
            | DatabaseErrorKind::CheckViolation
            | DatabaseErrorKind::RestrictViolation
            | DatabaseErrorKind::ExclusionViolation
            | DatabaseErrorKind::ReadOnlyTransaction => Class::Definite,
            _ => Class::Other,
        },
        // Diesel's word for "this connection's state is lost": only a new
        // connection helps.
        DieselError::BrokenTransactionManager => Class::ConnectionLost,
        // A failed COMMIT that Diesel could not roll back either: the COMMIT's
        // own error says what happened to the transaction.
        DieselError::RollbackErrorOnCommit { commit_error, .. } => classify(commit_error),
        _ => Class::Other,
    }
}

/// What the helper does after a failure; the module docs describe each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Roll back to the restart savepoint and run the unit again at once.
    Rewind,
    /// Roll the transaction back, wait, begin again.
    Restart,
    /// Drop the connection, wait, run again on a fresh one.
    Reconnect,
    /// The transaction committed; return the unit's value.
    Committed,
    /// Report [`TxError::AmbiguousCommit`].
    Ambiguous,
    /// Roll back and return the error.
    Fail,
}

/// Everything the next step depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Situation {
    /// Where the error came from.
    pub stage: Stage,
    /// What the error means.
    pub class: Class,
    /// The server.
    pub server: Server,
    /// The protocol the transaction uses.
    pub protocol: Protocol,
    /// Whether the unit may be applied twice.
    pub idempotent: bool,
    /// Whether the next retry waits first (its backoff delay is not zero).
    pub waits: bool,
    /// Whether another connection can be had (a pool, not the caller's own).
    pub replaceable: bool,
}

/// The decision table of the module docs, as code.
pub fn decide(s: &Situation) -> Step {
    let cockroach = s.server == Server::CockroachDb;
    let savepoint = s.protocol == Protocol::Savepoint;
    // Where the commit happens: the RELEASE on CockroachDB with the
    // savepoint protocol, the COMMIT everywhere else.
    let commit_stage = if cockroach && savepoint {
        Stage::Release
    } else {
        Stage::Commit
    };
    if cockroach && savepoint && s.stage == Stage::Commit {
        return Step::Committed;
    }
    let reconnect_or = |otherwise| {
        if s.replaceable {
            Step::Reconnect
        } else {
            otherwise
        }
    };
    match s.class {
        Class::Definite => Step::Fail,
        Class::Conflict => {
            let can_rewind =
                cockroach && savepoint && matches!(s.stage, Stage::Statement | Stage::Release);
            if can_rewind && !s.waits {
                Step::Rewind
            } else {
                Step::Restart
            }
        }
        // The commit was sent and no verdict came back. With the savepoint
        // protocol the COMMIT travels with the RELEASE, so a connection lost
        // there is in doubt on PostgreSQL too.
        Class::ConnectionLost | Class::Other
            if s.stage == commit_stage
                || (s.stage == Stage::Release && s.class == Class::ConnectionLost) =>
        {
            match (s.idempotent, s.class) {
                (false, _) => Step::Ambiguous,
                (true, Class::ConnectionLost) => reconnect_or(Step::Ambiguous),
                (true, _) => Step::Restart,
            }
        }
        // Nothing was committed: the server drops a dead connection's
        // transaction.
        Class::ConnectionLost => reconnect_or(Step::Fail),
        Class::Other => Step::Fail,
    }
}

/// Runs units of work in retried transactions. Cheap to clone and share
/// between threads.
#[derive(Clone)]
pub struct Retrier {
    policy: RetryPolicy,
    server: Server,
    protocol: Protocol,
    clock: Arc<dyn Clock>,
    jitter: Arc<dyn Fn() -> f64 + Send + Sync>,
}

impl fmt::Debug for Retrier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retrier")
            .field("policy", &self.policy)
            .field("server", &self.server)
            .field("protocol", &self.protocol)
            .finish_non_exhaustive()
    }
}

impl Retrier {
    /// A helper for `server`, with that server's protocol, the real clock
    /// and random jitter.
    pub fn new(policy: RetryPolicy, server: Server) -> Self {
        Self {
            policy: RetryPolicy {
                max_attempts: policy.max_attempts.max(1),
                ..policy
            },
            server,
            protocol: server.retry_protocol(),
            clock: Arc::new(SystemClock),
            jitter: Arc::new(rand::random::<f64>),
        }
    }

    /// Frames transactions with `protocol` instead of the server's own. The
    /// retry rules still follow the server (see the module docs).
    pub fn with_protocol(mut self, protocol: Protocol) -> Self {
        self.protocol = protocol;
        self
    }

    /// Replaces the clock (tests use one that records sleeps instead).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Replaces the jitter source, which must return values in `[0, 1)`.
    pub fn with_jitter(mut self, jitter: Arc<dyn Fn() -> f64 + Send + Sync>) -> Self {
        self.jitter = jitter;
        self
    }

    /// The longest one call may take when the server answers at once: the
    /// deadline, then one statement's wait. `None` without a deadline. The
    /// app's watchdog adds a slack for the last answer to arrive; past that,
    /// the server is not answering (see `crate::watchdog`).
    pub fn worst_case(&self) -> Option<Duration> {
        let deadline = self.policy.deadline?;
        Some(deadline + self.policy.statement_timeout.unwrap_or(deadline))
    }

    /// The protocol in use.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// Runs `unit` in a transaction on a connection from `pool`, retrying as
    /// the module documentation describes. `unit` may run several times: it
    /// must have no side effects outside the database and must not commit or
    /// roll back itself.
    ///
    /// # Errors
    /// See [`TxError`]; only the committed attempt's value is ever returned.
    pub fn run<T, E, F, M>(
        &self,
        pool: &Pool<M>,
        opts: TxOptions,
        unit: F,
    ) -> Result<Committed<T>, TxError<E>>
    where
        E: AsDieselError,
        F: FnMut(&mut PgConnection) -> Result<T, E>,
        M: ManageConnection<Connection = PgConnection>,
    {
        self.run_in(Session::pooled(pool), opts, unit)
    }

    /// Like [`Retrier::run`], on one connection the caller owns. A lost
    /// connection cannot be replaced here, so it ends the call with its error.
    ///
    /// # Errors
    /// See [`TxError`].
    pub fn run_on<T, E, F>(
        &self,
        conn: &mut PgConnection,
        opts: TxOptions,
        unit: F,
    ) -> Result<Committed<T>, TxError<E>>
    where
        E: AsDieselError,
        F: FnMut(&mut PgConnection) -> Result<T, E>,
    {
        // Refused before the session exists: its cleanup would roll back
        // the caller's own transaction.
        if open_transaction(conn) == Some(true) {
            return Err(TxError::AlreadyInTransaction);
        }
        self.run_in(
            Session::<ConnectionManager<PgConnection>>::borrowed(conn),
            opts,
            unit,
        )
    }

    /// The retry loop: one attempt, then the step [`decide`] picks.
    fn run_in<T, E, F, M>(
        &self,
        mut session: Session<'_, M>,
        opts: TxOptions,
        mut unit: F,
    ) -> Result<Committed<T>, TxError<E>>
    where
        E: AsDieselError,
        F: FnMut(&mut PgConnection) -> Result<T, E>,
        M: ManageConnection<Connection = PgConnection>,
    {
        let start = self.clock.now();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let span = debug_span!(
                "tx_attempt",
                attempt = attempts,
                protocol = ?self.protocol,
                retry_cause = tracing::field::Empty
            );
            let _entered = span.enter();
            let (stage, error, value) = match self.attempt(&mut session, opts, start, &mut unit) {
                Ok(value) => return Ok(Committed { value, attempts }),
                Err(Failure::At(stage, error, value)) => (stage, error, value),
                Err(Failure::Pool(err)) => return Err(TxError::Pool(err)),
                Err(Failure::Panicked(payload)) => {
                    // Dropping the session rolls back and hands the
                    // connection back idle; then the panic goes on.
                    drop(session);
                    panic::resume_unwind(payload);
                }
            };
            // The wait before the next attempt, should there be one.
            let delay = self.policy.backoff.delay(attempts, (self.jitter)());
            let step = decide(&Situation {
                stage,
                class: error.as_diesel().map_or(Class::Other, classify),
                server: self.server,
                protocol: self.protocol,
                idempotent: opts.idempotent,
                waits: !delay.is_zero(),
                replaceable: session.replaceable(),
            });
            span.record("retry_cause", tracing::field::display(Cause(&error)));
            // Every return below drops the session, which rolls back
            // whatever is still open.
            match (step, value) {
                (Step::Committed, Some(value)) => return Ok(Committed { value, attempts }),
                (Step::Ambiguous, _) => {
                    debug!(attempts, ?stage, "commit outcome unknown");
                    return Err(TxError::AmbiguousCommit {
                        attempts,
                        cause: error,
                    });
                }
                // `Committed` comes only after a COMMIT, which only a
                // finished unit reaches; without a value, fail safe.
                (Step::Fail | Step::Committed, _) => return Err(TxError::Failed(error)),
                (Step::Rewind | Step::Restart | Step::Reconnect, _) => {}
            }
            let elapsed = self.clock.now().saturating_duration_since(start);
            let budget = if attempts >= self.policy.max_attempts {
                Some(Budget::Attempts)
            } else if self
                .policy
                .deadline
                .is_some_and(|deadline| elapsed + delay >= deadline)
            {
                Some(Budget::Deadline)
            } else {
                None
            };
            if let Some(budget) = budget {
                debug!(attempts, ?budget, "giving up");
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
                "retrying transaction"
            );
            match step {
                Step::Rewind => session.rewind(),
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

    /// The statements that begin an attempt, sent as one message (one round
    /// trip): SERIALIZABLE, which is CockroachDB's default and what makes
    /// PostgreSQL detect the anomalies a bank must not have, said explicitly
    /// so that a server configured otherwise cannot weaken it; a statement
    /// timeout no longer than the time left before the deadline, so that no
    /// blocked statement outlives it by more than its own wait; and, with
    /// the savepoint protocol, the restart savepoint, after the timeout so
    /// that a rewind keeps it.
    fn begin_sql(&self, opts: TxOptions, start: Instant) -> String {
        let mut sql = String::from("BEGIN ISOLATION LEVEL SERIALIZABLE");
        if opts.read_only {
            sql.push_str(", READ ONLY");
        }
        let left = self.policy.deadline.map(|deadline| {
            deadline.saturating_sub(self.clock.now().saturating_duration_since(start))
        });
        let limit = match (self.policy.statement_timeout, left) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(limit) = limit {
            // 0 would mean no limit at all.
            let ms = limit.as_millis().max(1);
            sql.push_str(&format!("; SET LOCAL statement_timeout = {ms}"));
        }
        if self.protocol == Protocol::Savepoint {
            sql.push_str("; SAVEPOINT cockroach_restart");
        }
        sql
    }

    /// One attempt: begin (unless a rewound transaction is still open), run
    /// the unit, commit.
    fn attempt<T, E, F, M>(
        &self,
        session: &mut Session<'_, M>,
        opts: TxOptions,
        start: Instant,
        unit: &mut F,
    ) -> Result<T, Failure<T, E>>
    where
        E: AsDieselError,
        F: FnMut(&mut PgConnection) -> Result<T, E>,
        M: ManageConnection<Connection = PgConnection>,
    {
        let begin = self.begin_sql(opts, start);
        let conn = session.open(&begin).map_err(|err| match err {
            OpenError::Pool(err) => Failure::Pool(err),
            OpenError::Database(err) => Failure::At(Stage::Begin, E::from(err), None),
        })?;
        let value = match panic::catch_unwind(AssertUnwindSafe(|| unit(&mut *conn))) {
            Ok(Ok(value)) => value,
            Ok(Err(err)) => return Err(Failure::At(Stage::Statement, err, None)),
            Err(payload) => return Err(Failure::Panicked(payload)),
        };
        if self.protocol == Protocol::Savepoint {
            // One message, one round trip. The server stops at the first
            // statement that fails: if the transaction is still open, that
            // was the RELEASE; if it is closed, the COMMIT; if the
            // connection is gone, nobody knows, and the commit was sent:
            // that counts as the RELEASE, which the table makes ambiguous.
            return match conn.batch_execute("RELEASE SAVEPOINT cockroach_restart; COMMIT") {
                Ok(()) => Ok(value),
                Err(err) => {
                    let stage = match open_transaction(conn) {
                        Some(false) => Stage::Commit,
                        Some(true) | None => Stage::Release,
                    };
                    Err(Failure::At(stage, E::from(err), Some(value)))
                }
            };
        }
        match AnsiTransactionManager::commit_transaction(conn) {
            Ok(()) => Ok(value),
            Err(err) => Err(Failure::At(Stage::Commit, E::from(err), Some(value))),
        }
    }
}

/// How an attempt ended when it did not commit.
enum Failure<T, E> {
    /// An error at a stage, with the unit's value if the unit had finished.
    At(Stage, E, Option<T>),
    /// No connection could be had.
    Pool(r2d2::Error),
    /// The unit panicked.
    Panicked(Box<dyn std::any::Any + Send + 'static>),
}

enum OpenError {
    Pool(r2d2::Error),
    Database(DieselError),
}

/// The connection attempts run on. Whether a transaction is open on it is
/// read from Diesel's own transaction manager, which lives inside the
/// connection, so the two cannot disagree; and the connection is only ever
/// replaced with no transaction open.
struct Session<'a, M: ManageConnection<Connection = PgConnection>> {
    pool: Option<&'a Pool<M>>,
    conn: Option<Handle<'a, M>>,
}

enum Handle<'a, M: ManageConnection<Connection = PgConnection>> {
    Pooled(PooledConnection<M>),
    Borrowed(&'a mut PgConnection),
}

impl<M: ManageConnection<Connection = PgConnection>> Handle<'_, M> {
    fn get(&mut self) -> &mut PgConnection {
        match self {
            Handle::Pooled(conn) => conn,
            Handle::Borrowed(conn) => conn,
        }
    }
}

/// What Diesel knows of the connection's transaction: `Some(true)` when one
/// is open, `None` when Diesel gave up on the connection's state.
fn open_transaction(conn: &mut PgConnection) -> Option<bool> {
    AnsiTransactionManager::transaction_manager_status_mut(conn)
        .transaction_depth()
        .ok()
        .map(|depth| depth.is_some())
}

impl<'a, M: ManageConnection<Connection = PgConnection>> Session<'a, M> {
    fn pooled(pool: &'a Pool<M>) -> Self {
        Self {
            pool: Some(pool),
            conn: None,
        }
    }

    fn borrowed(conn: &'a mut PgConnection) -> Self {
        Self {
            pool: None,
            conn: Some(Handle::Borrowed(conn)),
        }
    }

    fn replaceable(&self) -> bool {
        self.pool.is_some()
    }

    /// The connection with a transaction open on it: the one a rewind left
    /// open, or a new one begun here (on a fresh connection if needed).
    fn open(&mut self, begin: &str) -> Result<&mut PgConnection, OpenError> {
        let handle = match (self.conn.take(), self.pool) {
            (Some(handle), _) => handle,
            (None, Some(pool)) => Handle::Pooled(pool.get().map_err(OpenError::Pool)?),
            // The caller's connection was lost earlier.
            (None, None) => return Err(OpenError::Database(DieselError::BrokenTransactionManager)),
        };
        let conn = self.conn.insert(handle).get();
        if open_transaction(conn) == Some(true) {
            return Ok(conn);
        }
        AnsiTransactionManager::begin_transaction_sql(conn, begin).map_err(OpenError::Database)?;
        Ok(conn)
    }

    /// `ROLLBACK TO SAVEPOINT cockroach_restart`, or a full rollback if that
    /// fails.
    fn rewind(&mut self) {
        let rewound = self.conn.as_mut().is_some_and(|handle| {
            handle
                .get()
                .batch_execute("ROLLBACK TO SAVEPOINT cockroach_restart")
                .is_ok()
        });
        if !rewound {
            self.rollback();
        }
    }

    /// Rolls back whatever Diesel knows to be open. A connection that cannot
    /// roll back, or whose state Diesel lost, is discarded.
    fn rollback(&mut self) {
        let Some(handle) = self.conn.as_mut() else {
            return;
        };
        let conn = handle.get();
        let healthy = match open_transaction(conn) {
            Some(true) => AnsiTransactionManager::rollback_transaction(conn)
                .map_err(|err| debug!(error = %err, "rollback failed"))
                .is_ok(),
            Some(false) => true,
            None => false,
        };
        if !healthy {
            self.discard();
        }
    }

    /// Forgets the connection. Diesel marks a connection whose socket died
    /// as broken, and r2d2 closes broken connections instead of pooling them.
    fn discard(&mut self) {
        self.conn = None;
    }
}

impl<M: ManageConnection<Connection = PgConnection>> Drop for Session<'_, M> {
    /// No connection leaves the helper inside a transaction.
    fn drop(&mut self) {
        self.rollback();
    }
}

struct Cause<'a, E>(&'a E);

impl<E: AsDieselError> fmt::Display for Cause<'_, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_diesel() {
            Some(err) => write!(f, "{err}"),
            None => f.write_str("(not a database error)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backoff(first_retry_immediate: bool) -> Backoff {
        Backoff {
            base: Duration::from_millis(10),
            cap: Duration::from_millis(100),
            first_retry_immediate,
        }
    }

    #[test]
    fn delays_double_from_the_base_until_the_cap() {
        let b = backoff(false);
        let delays: Vec<_> = (1..=6).map(|n| b.delay(n, 1.0)).collect();
        let ms = |v: u64| Duration::from_millis(v);
        assert_eq!(
            delays,
            vec![ms(10), ms(20), ms(40), ms(80), ms(100), ms(100)]
        );
    }

    #[test]
    fn jitter_scales_the_ceiling() {
        let b = backoff(false);
        assert_eq!(b.delay(3, 0.5), Duration::from_millis(20));
        assert_eq!(b.delay(3, 0.0), Duration::ZERO);
    }

    #[test]
    fn an_immediate_first_retry_shifts_the_sequence() {
        let b = backoff(true);
        assert_eq!(b.delay(1, 1.0), Duration::ZERO);
        assert_eq!(b.delay(2, 1.0), Duration::from_millis(10));
        assert_eq!(b.delay(3, 1.0), Duration::from_millis(20));
    }

    #[test]
    fn huge_retry_numbers_stay_at_the_cap() {
        assert_eq!(
            backoff(false).delay(u32::MAX, 1.0),
            Duration::from_millis(100)
        );
    }

    #[test]
    fn serialization_failures_are_conflicts_and_constraints_are_definite() {
        let err = |kind| DieselError::DatabaseError(kind, Box::new(String::from("x")));
        assert_eq!(
            classify(&err(DatabaseErrorKind::SerializationFailure)),
            Class::Conflict
        );
        assert_eq!(
            classify(&err(DatabaseErrorKind::ClosedConnection)),
            Class::ConnectionLost
        );
        assert_eq!(
            classify(&DieselError::BrokenTransactionManager),
            Class::ConnectionLost
        );
        assert_eq!(
            classify(&err(DatabaseErrorKind::CheckViolation)),
            Class::Definite
        );
        assert_eq!(
            classify(&err(DatabaseErrorKind::ReadOnlyTransaction)),
            Class::Definite
        );
        assert_eq!(classify(&err(DatabaseErrorKind::Unknown)), Class::Other);
        assert_eq!(classify(&DieselError::NotFound), Class::Other);
    }

    // The decision table, row by row. Each row is checked for every
    // combination of the inputs it leaves open.

    const STAGES: [Stage; 4] = [
        Stage::Begin,
        Stage::Statement,
        Stage::Release,
        Stage::Commit,
    ];
    const CLASSES: [Class; 4] = [
        Class::Conflict,
        Class::ConnectionLost,
        Class::Definite,
        Class::Other,
    ];
    const CRDB: (Server, Protocol) = (Server::CockroachDb, Protocol::Savepoint);
    const CRDB_RESTART: (Server, Protocol) = (Server::CockroachDb, Protocol::Restart);
    const PG: (Server, Protocol) = (Server::PostgreSql, Protocol::Restart);
    const PG_SAVEPOINT: (Server, Protocol) = (Server::PostgreSql, Protocol::Savepoint);
    const SETUPS: [(Server, Protocol); 4] = [CRDB, CRDB_RESTART, PG, PG_SAVEPOINT];

    /// Every situation with these stages, classes and setups, in every
    /// combination of the three flags.
    fn situations(
        stages: &[Stage],
        classes: &[Class],
        setups: &[(Server, Protocol)],
    ) -> Vec<Situation> {
        let mut all = Vec::new();
        for &stage in stages {
            for &class in classes {
                for &(server, protocol) in setups {
                    for flags in 0..8u8 {
                        all.push(Situation {
                            stage,
                            class,
                            server,
                            protocol,
                            idempotent: flags & 1 != 0,
                            waits: flags & 2 != 0,
                            replaceable: flags & 4 != 0,
                        });
                    }
                }
            }
        }
        all
    }

    fn reconnect_or_fail(s: &Situation) -> Step {
        if s.replaceable {
            Step::Reconnect
        } else {
            Step::Fail
        }
    }

    fn rewind_unless_waiting(s: &Situation) -> Step {
        if s.waits {
            Step::Restart
        } else {
            Step::Rewind
        }
    }

    fn ambiguous_unless_idempotent(s: &Situation) -> Step {
        match (s.idempotent, s.class, s.replaceable) {
            (false, _, _) => Step::Ambiguous,
            (true, Class::ConnectionLost, true) => Step::Reconnect,
            (true, Class::ConnectionLost, false) => Step::Ambiguous,
            (true, _, _) => Step::Restart,
        }
    }

    struct Row {
        stages: &'static [Stage],
        classes: &'static [Class],
        setups: &'static [(Server, Protocol)],
        expect: fn(&Situation) -> Step,
    }

    /// The module docs' table in the same order, one entry a row; the first
    /// row is split in two to leave out a commit on CockroachDB, which the
    /// "committed" row covers.
    const ROWS: [Row; 15] = [
        Row {
            stages: &STAGES,
            classes: &[Class::Definite],
            setups: &[CRDB_RESTART, PG, PG_SAVEPOINT],
            expect: |_| Step::Fail,
        },
        // (the same row on CockroachDB, where the RELEASE was the commit)
        Row {
            stages: &[Stage::Begin, Stage::Statement, Stage::Release],
            classes: &[Class::Definite],
            setups: &[CRDB],
            expect: |_| Step::Fail,
        },
        Row {
            stages: &[Stage::Begin],
            classes: &[Class::Conflict],
            setups: &SETUPS,
            expect: |_| Step::Restart,
        },
        Row {
            stages: &[Stage::Begin, Stage::Statement],
            classes: &[Class::ConnectionLost],
            setups: &SETUPS,
            expect: reconnect_or_fail,
        },
        Row {
            stages: &[Stage::Begin, Stage::Statement],
            classes: &[Class::Other],
            setups: &SETUPS,
            expect: |_| Step::Fail,
        },
        Row {
            stages: &[Stage::Statement],
            classes: &[Class::Conflict],
            setups: &[CRDB],
            expect: rewind_unless_waiting,
        },
        Row {
            stages: &[Stage::Statement],
            classes: &[Class::Conflict],
            setups: &[CRDB_RESTART, PG, PG_SAVEPOINT],
            expect: |_| Step::Restart,
        },
        Row {
            stages: &[Stage::Release],
            classes: &[Class::Conflict],
            setups: &[CRDB],
            expect: rewind_unless_waiting,
        },
        Row {
            stages: &[Stage::Release],
            classes: &[Class::Conflict],
            setups: &[PG_SAVEPOINT],
            expect: |_| Step::Restart,
        },
        Row {
            stages: &[Stage::Release],
            classes: &[Class::ConnectionLost],
            setups: &[CRDB, PG_SAVEPOINT],
            expect: ambiguous_unless_idempotent,
        },
        Row {
            stages: &[Stage::Release],
            classes: &[Class::Other],
            setups: &[PG_SAVEPOINT],
            expect: |_| Step::Fail,
        },
        Row {
            stages: &[Stage::Release],
            classes: &[Class::Other],
            setups: &[CRDB],
            expect: ambiguous_unless_idempotent,
        },
        Row {
            stages: &[Stage::Commit],
            classes: &CLASSES,
            setups: &[CRDB],
            expect: |_| Step::Committed,
        },
        Row {
            stages: &[Stage::Commit],
            classes: &[Class::Conflict],
            setups: &[CRDB_RESTART, PG, PG_SAVEPOINT],
            expect: |_| Step::Restart,
        },
        Row {
            stages: &[Stage::Commit],
            classes: &[Class::ConnectionLost, Class::Other],
            setups: &[CRDB_RESTART, PG, PG_SAVEPOINT],
            expect: ambiguous_unless_idempotent,
        },
    ];

    /// A RELEASE is only sent with the savepoint protocol.
    fn possible(s: &Situation) -> bool {
        s.stage != Stage::Release || s.protocol == Protocol::Savepoint
    }

    fn all_rows() -> impl Iterator<Item = (usize, &'static Row)> {
        ROWS.iter().enumerate()
    }

    #[test]
    fn every_row_of_the_table_holds_for_every_situation_it_covers() {
        for (number, row) in all_rows() {
            let covered: Vec<Situation> = situations(row.stages, row.classes, row.setups)
                .into_iter()
                .filter(possible)
                .collect();
            assert!(!covered.is_empty(), "row {} covers nothing", number + 1);
            for s in covered {
                assert_eq!(decide(&s), (row.expect)(&s), "row {}: {s:?}", number + 1);
            }
        }
    }

    #[test]
    fn the_rows_cover_every_situation_exactly_once() {
        for s in situations(&STAGES, &CLASSES, &SETUPS)
            .into_iter()
            .filter(possible)
        {
            let rows: Vec<usize> = all_rows()
                .filter(|(_, row)| {
                    row.stages.contains(&s.stage)
                        && row.classes.contains(&s.class)
                        && row.setups.contains(&(s.server, s.protocol))
                })
                .map(|(number, _)| number + 1)
                .collect();
            assert_eq!(rows.len(), 1, "{s:?} is covered by rows {rows:?}");
        }
    }

    #[test]
    fn no_step_breaks_the_rules_behind_the_table() {
        for s in situations(&STAGES, &CLASSES, &SETUPS) {
            let step = decide(&s);
            if step == Step::Rewind {
                assert!((s.server, s.protocol) == CRDB && !s.waits, "{s:?}");
            }
            if step == Step::Reconnect {
                assert!(s.replaceable, "{s:?}");
            }
            if step == Step::Committed {
                assert!(s.stage == Stage::Commit && (s.server, s.protocol) == CRDB);
            }
            if step == Step::Ambiguous {
                // Only where the commit was sent: the COMMIT, or the
                // RELEASE that carries it.
                assert!(matches!(s.stage, Stage::Release | Stage::Commit), "{s:?}");
            }
        }
    }
}
