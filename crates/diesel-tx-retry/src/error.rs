//! What the helper returns: the committed value ([`Committed`]) or why no
//! attempt committed ([`TxError`]).

use std::fmt;
use std::time::Duration;

use diesel::result::Error as DieselError;

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
    /// A unit declared idempotent is retried instead, and ends here only if
    /// the doubt could not be resolved: a budget ran out, or the retry
    /// failed, before the unit found out (`cause` is then the last error).
    #[error("commit result is ambiguous on attempt {attempts}: the transaction may or may not have been applied; check the data before retrying ({})", .cause.to_string().trim_end())]
    AmbiguousCommit {
        /// The attempt whose commit is in doubt.
        attempts: u32,
        /// What the driver reported.
        cause: E,
    },
    /// The unit returned `Ok`, but one of its statements had failed and
    /// aborted the transaction (it caught the error and went on), so the
    /// server did not commit it: PostgreSQL answers the `COMMIT` of an
    /// aborted transaction with `ROLLBACK` and no error. The unit's value is
    /// not returned, since what it describes was not committed.
    #[error("the unit of work returned Ok on attempt {attempts}, but a statement of its transaction had failed and aborted it, so nothing was committed; return the database error from the unit (with ?), or catch it inside a nested conn.transaction(..), which rolls back to a savepoint")]
    SwallowedError {
        /// The attempt whose transaction was aborted.
        attempts: u32,
    },
    /// The connection was already inside a transaction, which the helper
    /// cannot restart; run the helper outside any other transaction.
    #[error("the connection is already inside a transaction; call the retry helper outside any transaction")]
    AlreadyInTransaction,
    /// No connection could be checked out of the pool (within its
    /// checkout wait). Nothing was committed by the attempt that needed it.
    #[cfg(feature = "r2d2")]
    #[error("could not get a connection from the pool")]
    NoConnection(#[source] r2d2::Error),
}

/// The value of the attempt that committed, and how many attempts it took.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Committed<T> {
    /// What the committed attempt returned.
    pub value: T,
    /// Attempts made, the committed one included.
    pub attempts: u32,
    /// Whether an earlier attempt's commit was in doubt, and how that
    /// ended (see [`Context`](crate::Context)); `None` when none was.
    pub doubt: Option<crate::Resolution>,
}

impl<T> Committed<T> {
    /// Attempts beyond the first.
    pub fn retries(&self) -> u32 {
        self.attempts - 1
    }
}
