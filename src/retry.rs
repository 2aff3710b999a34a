//! The retrying transaction helper: Diesel's counterpart of cockroach-go's
//! `crdb.ExecuteTx` and sqlalchemy-cockroachdb's `run_transaction`.
//!
//! [`Retrier::run`] checks a connection out of the pool, begins a SERIALIZABLE
//! transaction, runs the unit of work, commits, and returns the value of the
//! attempt that committed. What happens when something fails depends on *when*:
//!
//! | failure                                      | what the helper does                         |
//! |----------------------------------------------|----------------------------------------------|
//! | 40001 before or at commit                    | roll back, back off, run the unit again      |
//! | connection lost before the commit was sent   | drop that connection, retry on a fresh one   |
//! | connection lost or 40003 *while* committing  | [`TxError::AmbiguousCommit`] (retry only if the unit is idempotent) |
//! | any other error                              | roll back, return it untouched               |
//! | a panic in the unit                          | roll back, return the connection idle, re-panic |
//!
//! CockroachDB's restart protocol ([`Protocol::Savepoint`]) keeps one
//! transaction open across retries, so that it keeps its place in line; on
//! PostgreSQL a serialization failure can only be cleared by a new transaction
//! ([`Protocol::Restart`]).

use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::connection::{AnsiTransactionManager, SimpleConnection, TransactionManager};
use diesel::r2d2::{ConnectionManager, Pool, PooledConnection};
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel::PgConnection;
use tracing::{debug, debug_span};

/// The r2d2 pool of Diesel connections that [`Retrier::run`] draws from.
pub type PgPool = Pool<ConnectionManager<PgConnection>>;

/// How a failed attempt is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Roll the whole transaction back and `BEGIN` again. PostgreSQL needs
    /// this: rolling back to a savepoint keeps the transaction's snapshot, so
    /// it cannot clear a serialization failure.
    Restart,
    /// CockroachDB's client-side retry protocol: `SAVEPOINT cockroach_restart`
    /// after `BEGIN`, `ROLLBACK TO SAVEPOINT cockroach_restart` on 40001,
    /// `RELEASE SAVEPOINT cockroach_restart` to commit. The transaction keeps
    /// its priority across retries, so it is not starved under contention.
    /// <https://www.cockroachlabs.com/docs/stable/advanced-client-side-transaction-retries>
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
    /// time since the first attempt began.
    pub deadline: Option<Duration>,
    /// The wait between attempts.
    pub backoff: Backoff,
}

impl Default for RetryPolicy {
    /// Ten retries within 30 seconds; the first retry at once (on PostgreSQL
    /// a 40001 from a row lock arrives after the winner committed, so the
    /// way is clear), then up to 2 ms doubling to 500 ms. bench/RESULTS.md
    /// has what the backoff costs and buys.
    fn default() -> Self {
        Self {
            max_attempts: 11,
            deadline: Some(Duration::from_secs(30)),
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
    #[error("commit result is ambiguous on attempt {attempts}: the transaction may or may not have been applied; check the data before retrying ({cause})")]
    AmbiguousCommit {
        /// The attempt whose commit is in doubt.
        attempts: u32,
        /// What the driver reported.
        cause: DieselError,
    },
    /// The connection was already inside a transaction, which the helper
    /// cannot restart; run the helper outside any other transaction.
    #[error("the connection is already inside a transaction; call the retry helper outside any transaction")]
    AlreadyInTransaction,
    /// No connection could be checked out of the pool.
    #[error("could not get a connection from the pool: {0}")]
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

/// Runs units of work in retried transactions. Cheap to clone and share
/// between threads.
#[derive(Clone)]
pub struct Retrier {
    policy: RetryPolicy,
    protocol: Protocol,
    clock: Arc<dyn Clock>,
    jitter: Arc<dyn Fn() -> f64 + Send + Sync>,
}

impl fmt::Debug for Retrier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retrier")
            .field("policy", &self.policy)
            .field("protocol", &self.protocol)
            .finish_non_exhaustive()
    }
}

impl Retrier {
    /// A helper with the real clock and random jitter.
    pub fn new(policy: RetryPolicy, protocol: Protocol) -> Self {
        Self {
            policy: RetryPolicy {
                max_attempts: policy.max_attempts.max(1),
                ..policy
            },
            protocol,
            clock: Arc::new(SystemClock),
            jitter: Arc::new(rand::random::<f64>),
        }
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
    pub fn run<T, E, F>(
        &self,
        pool: &PgPool,
        opts: TxOptions,
        unit: F,
    ) -> Result<Committed<T>, TxError<E>>
    where
        E: AsDieselError,
        F: FnMut(&mut PgConnection) -> Result<T, E>,
    {
        self.run_loop(
            PoolCheckout {
                pool,
                current: None,
            },
            opts,
            unit,
        )
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
        self.run_loop(SingleCheckout { conn, lost: false }, opts, unit)
    }

    fn run_loop<T, E, F, C>(
        &self,
        mut checkout: C,
        opts: TxOptions,
        mut unit: F,
    ) -> Result<Committed<T>, TxError<E>>
    where
        E: AsDieselError,
        F: FnMut(&mut PgConnection) -> Result<T, E>,
        C: Checkout,
    {
        let start = self.clock.now();
        let mut tx = TxState::Closed;
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
            let cause = match self.attempt(&mut checkout, &mut tx, opts, attempts, &mut unit) {
                Ok(value) => return Ok(Committed { value, attempts }),
                Err(Outcome::Fatal(err)) => return Err(err),
                Err(Outcome::Panicked(payload)) => {
                    // The unit was rolled back; hand the connection back to
                    // the pool idle before the panic goes on.
                    drop(checkout);
                    panic::resume_unwind(payload);
                }
                Err(Outcome::Retry(cause)) => cause,
            };
            span.record(
                "retry_cause",
                tracing::field::display(DisplayCause(cause.as_diesel())),
            );
            let elapsed = self.clock.now().saturating_duration_since(start);
            let delay = self.policy.backoff.delay(attempts, (self.jitter)());
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
                // The savepoint protocol leaves the transaction open between
                // attempts; close it so the connection is not handed back
                // (to the pool, or to the caller of `run_on`) mid-transaction.
                if tx == TxState::Open {
                    if let Ok(conn) = checkout.conn() {
                        rollback(conn);
                    }
                }
                return Err(give_up(attempts, elapsed, budget, cause));
            }
            debug!(sleep_ms = delay.as_secs_f64() * 1e3, "retrying transaction");
            self.clock.sleep(delay);
        }
    }

    /// One attempt: begin (unless a restart savepoint is still open), run the
    /// unit, commit. Leaves `tx` saying whether a transaction is still open.
    fn attempt<T, E, F, C>(
        &self,
        checkout: &mut C,
        tx: &mut TxState,
        opts: TxOptions,
        attempts: u32,
        unit: &mut F,
    ) -> Result<T, Outcome<E>>
    where
        E: AsDieselError,
        F: FnMut(&mut PgConnection) -> Result<T, E>,
        C: Checkout,
    {
        let conn = checkout
            .conn()
            .map_err(|err| Outcome::Fatal(TxError::Pool(err)))?;
        if *tx == TxState::Closed {
            if let Err(err) = self.begin(conn, opts) {
                if matches!(err, DieselError::AlreadyInTransaction) {
                    return Err(Outcome::Fatal(TxError::AlreadyInTransaction));
                }
                return Err(self.before_commit(checkout, tx, E::from(err)));
            }
            *tx = TxState::Open;
        }
        let value = match panic::catch_unwind(AssertUnwindSafe(|| unit(&mut *conn))) {
            Ok(Ok(value)) => value,
            Ok(Err(err)) => return Err(self.before_commit(checkout, tx, err)),
            Err(payload) => {
                rollback(conn);
                *tx = TxState::Closed;
                return Err(Outcome::Panicked(payload));
            }
        };
        match self.commit(conn, tx) {
            Ok(()) => Ok(value),
            Err(CommitError::Conflict(err)) => Err(Outcome::Retry(E::from(err))),
            Err(CommitError::Definite(err)) => Err(Outcome::Fatal(TxError::Failed(E::from(err)))),
            Err(CommitError::Ambiguous(err)) => {
                let lost = classify(&err) == Class::ConnectionLost;
                if lost {
                    checkout.discard();
                }
                if opts.idempotent && (!lost || checkout.can_replace()) {
                    debug!(cause = %err, "commit ambiguous; retrying the idempotent unit");
                    Err(Outcome::Retry(E::from(err)))
                } else {
                    Err(Outcome::Fatal(TxError::AmbiguousCommit {
                        attempts,
                        cause: err,
                    }))
                }
            }
        }
    }

    fn begin(&self, conn: &mut PgConnection, opts: TxOptions) -> Result<(), DieselError> {
        // SERIALIZABLE is CockroachDB's default and what makes PostgreSQL
        // detect the anomalies a bank must not have; say it explicitly so a
        // server configured otherwise cannot weaken it. Every restart reuses
        // this statement, so the options hold for every attempt.
        let sql = if opts.read_only {
            "BEGIN ISOLATION LEVEL SERIALIZABLE, READ ONLY"
        } else {
            "BEGIN ISOLATION LEVEL SERIALIZABLE"
        };
        AnsiTransactionManager::begin_transaction_sql(conn, sql)?;
        if self.protocol == Protocol::Savepoint {
            if let Err(err) = conn.batch_execute("SAVEPOINT cockroach_restart") {
                rollback(conn);
                return Err(err);
            }
        }
        Ok(())
    }

    /// Decides what an error raised before the commit means for the attempt.
    fn before_commit<E: AsDieselError, C: Checkout>(
        &self,
        checkout: &mut C,
        tx: &mut TxState,
        err: E,
    ) -> Outcome<E> {
        match err.as_diesel().map_or(Class::Other, classify) {
            Class::Conflict => {
                let conn = match checkout.conn() {
                    Ok(conn) => conn,
                    Err(err) => return Outcome::Fatal(TxError::Pool(err)),
                };
                // With the savepoint protocol the transaction stays open and
                // keeps its place in line; if that fails, start over.
                let rewound = self.protocol == Protocol::Savepoint
                    && *tx == TxState::Open
                    && conn
                        .batch_execute("ROLLBACK TO SAVEPOINT cockroach_restart")
                        .is_ok();
                if rewound {
                    return Outcome::Retry(err);
                }
                rollback(conn);
                *tx = TxState::Closed;
                Outcome::Retry(err)
            }
            // The commit was never sent, so the server rolls the transaction
            // back when the connection dies: retrying cannot apply it twice.
            Class::ConnectionLost => {
                *tx = TxState::Closed;
                checkout.discard();
                if checkout.can_replace() {
                    Outcome::Retry(err)
                } else {
                    Outcome::Fatal(TxError::Failed(err))
                }
            }
            Class::Definite | Class::Other => {
                if let Ok(conn) = checkout.conn() {
                    rollback(conn);
                }
                *tx = TxState::Closed;
                Outcome::Fatal(TxError::Failed(err))
            }
        }
    }

    fn commit(&self, conn: &mut PgConnection, tx: &mut TxState) -> Result<(), CommitError> {
        if self.protocol == Protocol::Savepoint {
            // On CockroachDB this RELEASE is the commit; on PostgreSQL it only
            // ends the savepoint and the COMMIT below does the work.
            if let Err(err) = conn.batch_execute("RELEASE SAVEPOINT cockroach_restart") {
                return Err(match classify(&err) {
                    Class::Conflict => {
                        if conn
                            .batch_execute("ROLLBACK TO SAVEPOINT cockroach_restart")
                            .is_err()
                        {
                            rollback(conn);
                            *tx = TxState::Closed;
                        }
                        CommitError::Conflict(err)
                    }
                    Class::Definite => {
                        rollback(conn);
                        *tx = TxState::Closed;
                        CommitError::Definite(err)
                    }
                    Class::ConnectionLost | Class::Other => {
                        rollback(conn);
                        *tx = TxState::Closed;
                        CommitError::Ambiguous(err)
                    }
                });
            }
        }
        let result = AnsiTransactionManager::commit_transaction(conn);
        // A failed COMMIT ends the transaction too (or the connection is gone).
        *tx = TxState::Closed;
        result.map_err(|err| match classify(&err) {
            // 40001 and constraint violations at COMMIT are the server saying
            // "not committed": the first is retried, the second reported.
            Class::Conflict => CommitError::Conflict(err),
            Class::Definite => CommitError::Definite(err),
            // Anything else (lost connection, 40003, shutdown) leaves the
            // outcome unknown: retrying blindly could apply a transfer twice.
            Class::ConnectionLost | Class::Other => {
                rollback(conn);
                CommitError::Ambiguous(err)
            }
        })
    }
}

fn give_up<E>(attempts: u32, elapsed: Duration, budget: Budget, last: E) -> TxError<E> {
    debug!(attempts, ?budget, "giving up");
    TxError::GaveUp {
        attempts,
        elapsed,
        budget,
        last,
    }
}

/// Whether Diesel gave up on this connection's transaction state.
fn is_broken(conn: &mut PgConnection) -> bool {
    AnsiTransactionManager::transaction_manager_status_mut(conn)
        .transaction_depth()
        .is_err()
}

/// Rolls back whatever Diesel knows to be open; a failure only means the
/// connection is gone, and the pool discards broken connections.
fn rollback(conn: &mut PgConnection) {
    let open = matches!(
        AnsiTransactionManager::transaction_manager_status_mut(conn).transaction_depth(),
        Ok(Some(_))
    );
    if open {
        if let Err(err) = AnsiTransactionManager::rollback_transaction(conn) {
            debug!(error = %err, "rollback failed");
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TxState {
    Closed,
    /// A transaction (and, with the savepoint protocol, its restart
    /// savepoint) is open on the current connection.
    Open,
}

enum Outcome<E> {
    Retry(E),
    Fatal(TxError<E>),
    Panicked(Box<dyn std::any::Any + Send + 'static>),
}

enum CommitError {
    Conflict(DieselError),
    Definite(DieselError),
    Ambiguous(DieselError),
}

/// What an error means for a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// SQLSTATE 40001: the transaction did not commit; run it again.
    Conflict,
    /// The connection is gone.
    ConnectionLost,
    /// The server refused the data (constraint, read-only): retrying the same
    /// unit would fail the same way.
    Definite,
    /// Anything else.
    Other,
}

/// Classifies by Diesel's `DatabaseErrorKind`, which Diesel derives from the
/// SQLSTATE, never by message text.
pub(crate) fn classify(err: &DieselError) -> Class {
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
        _ => Class::Other,
    }
}

struct DisplayCause<'a>(Option<&'a DieselError>);

impl fmt::Display for DisplayCause<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(err) => write!(f, "{err}"),
            None => f.write_str("(not a database error)"),
        }
    }
}

/// Where attempts get their connection.
trait Checkout {
    fn conn(&mut self) -> Result<&mut PgConnection, r2d2::Error>;
    /// Forget the current connection: it is broken.
    fn discard(&mut self);
    /// Whether another connection can be had after `discard`.
    fn can_replace(&self) -> bool;
}

struct PoolCheckout<'p> {
    pool: &'p PgPool,
    current: Option<PooledConnection<ConnectionManager<PgConnection>>>,
}

impl Checkout for PoolCheckout<'_> {
    fn conn(&mut self) -> Result<&mut PgConnection, r2d2::Error> {
        // A failed rollback (its backend was killed, say) leaves Diesel's
        // transaction manager broken; such a connection is no use to retry on.
        if self.current.as_deref_mut().is_some_and(is_broken) {
            self.discard();
        }
        if self.current.is_none() {
            self.current = Some(self.pool.get()?);
        }
        Ok(self.current.as_deref_mut().expect("checked out just above"))
    }
    fn discard(&mut self) {
        // Diesel marks a connection whose socket died as broken, and r2d2
        // closes broken connections instead of returning them to the pool.
        self.current = None;
    }
    fn can_replace(&self) -> bool {
        true
    }
}

struct SingleCheckout<'c> {
    conn: &'c mut PgConnection,
    lost: bool,
}

impl Checkout for SingleCheckout<'_> {
    fn conn(&mut self) -> Result<&mut PgConnection, r2d2::Error> {
        Ok(self.conn)
    }
    fn discard(&mut self) {
        self.lost = true;
    }
    fn can_replace(&self) -> bool {
        !self.lost
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
            classify(&err(DatabaseErrorKind::CheckViolation)),
            Class::Definite
        );
        assert_eq!(classify(&err(DatabaseErrorKind::Unknown)), Class::Other);
        assert_eq!(classify(&DieselError::NotFound), Class::Other);
    }
}
