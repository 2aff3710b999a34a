//! The observer of every attempt: how callers count retries by cause, time
//! spent backing off, commits in doubt and outcomes without parsing logs.
//! Causes, outcomes and resolutions are `Display + Hash`, so they serve as
//! metric labels as they are.

use std::fmt;
use std::time::Duration;

use crate::decide::Class;
use crate::Budget;

/// What an attempt's error meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Cause {
    /// A serialization failure (40001) or a deadlock (40P01).
    Conflict,
    /// The connection was lost, or the server ended the session (a restart,
    /// a node that drains).
    ConnectionLost,
    /// A transaction-mode pooler gave the connection another server session
    /// (a named statement missing or already there).
    StaleStatement,
    /// The transaction had been aborted by an error the unit swallowed.
    Aborted,
    /// The database refused the data (a constraint, a read-only
    /// transaction).
    Refused,
    /// Any other database error.
    Database,
    /// Not a database error: the unit's own.
    Domain,
}

impl Cause {
    pub(crate) fn of(class: Class) -> Self {
        match class {
            Class::Conflict => Cause::Conflict,
            Class::ConnectionLost => Cause::ConnectionLost,
            Class::StaleStatement => Cause::StaleStatement,
            Class::Aborted => Cause::Aborted,
            Class::Definite => Cause::Refused,
            Class::Other => Cause::Database,
            Class::Domain => Cause::Domain,
        }
    }

    /// Whether the error came from the database, not from the unit itself.
    pub fn is_database_error(self) -> bool {
        self != Cause::Domain
    }
}

impl fmt::Display for Cause {
    /// `conflict`, `connection_lost`, `stale_statement`, `aborted`,
    /// `refused`, `database`, `domain`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Cause::Conflict => "conflict",
            Cause::ConnectionLost => "connection_lost",
            Cause::StaleStatement => "stale_statement",
            Cause::Aborted => "aborted",
            Cause::Refused => "refused",
            Cause::Database => "database",
            Cause::Domain => "domain",
        })
    }
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// It committed; the call returns its value.
    Committed,
    /// Another attempt follows at once, in the same transaction, rolled back
    /// to its savepoint (CockroachDB).
    Rewound,
    /// Another attempt follows in a new transaction, after the backoff.
    Restarted,
    /// Another attempt follows on a new connection, after the backoff.
    Reconnected,
    /// A retry was due but a budget had run out ([`Attempt::budget`]).
    GaveUp,
    /// The commit was sent and its outcome is unknown.
    Ambiguous,
    /// The error is not retryable; the call returns it.
    Failed,
    /// The unit returned `Ok` from a transaction an error had aborted.
    Swallowed,
    /// No connection could be had.
    NoConnection,
    /// The unit panicked; the panic goes on once the transaction is rolled
    /// back.
    Panicked,
    /// The caller dropped the call's future (a request deadline, a
    /// `select!`) before it ended: nothing committed, or, when the commit
    /// was in flight, see [`Outcome::Committed`] or [`Outcome::Ambiguous`]
    /// instead, which the async front end reports once the commit answers.
    Cancelled,
}

impl Outcome {
    /// Whether another attempt follows.
    pub fn is_retry(self) -> bool {
        matches!(
            self,
            Outcome::Rewound | Outcome::Restarted | Outcome::Reconnected
        )
    }
}

impl fmt::Display for Outcome {
    /// `committed`, `rewound`, `restarted`, `reconnected`, `gave_up`,
    /// `ambiguous`, `failed`, `swallowed`, `no_connection`, `panicked`,
    /// `cancelled`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::Committed => "committed",
            Outcome::Rewound => "rewound",
            Outcome::Restarted => "restarted",
            Outcome::Reconnected => "reconnected",
            Outcome::GaveUp => "gave_up",
            Outcome::Ambiguous => "ambiguous",
            Outcome::Failed => "failed",
            Outcome::Swallowed => "swallowed",
            Outcome::NoConnection => "no_connection",
            Outcome::Panicked => "panicked",
            Outcome::Cancelled => "cancelled",
        })
    }
}

/// How a commit in doubt ended, in a call that then committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Resolution {
    /// The unit found its earlier attempt's writes: that attempt had
    /// committed, and the retry applied nothing.
    AppliedEarlier,
    /// The retry applied the unit: its earlier attempt had not committed.
    AppliedNow,
}

impl Resolution {
    /// The label, as `Display` writes it.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Resolution::AppliedEarlier => "applied_earlier",
            Resolution::AppliedNow => "applied_now",
        }
    }
}

impl fmt::Display for Resolution {
    /// `applied_earlier` or `applied_now`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// One attempt of one call, as it ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Attempt {
    pub(crate) number: u32,
    pub(crate) elapsed: Duration,
    pub(crate) cause: Option<Cause>,
    pub(crate) outcome: Outcome,
    pub(crate) backoff: Duration,
    pub(crate) budget: Option<Budget>,
    pub(crate) resolution: Option<Resolution>,
}

impl Attempt {
    /// 1 for the first attempt of a call.
    pub fn number(&self) -> u32 {
        self.number
    }

    /// Time since the call's first attempt began.
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }

    /// What the error meant, when there was one.
    pub fn cause(&self) -> Option<Cause> {
        self.cause
    }

    /// How the attempt ended.
    pub fn outcome(&self) -> Outcome {
        self.outcome
    }

    /// The wait before the next attempt (zero when none follows, or it
    /// follows at once).
    pub fn backoff(&self) -> Duration {
        self.backoff
    }

    /// The budget that ran out, when the outcome is [`Outcome::GaveUp`].
    pub fn budget(&self) -> Option<Budget> {
        self.budget
    }

    /// How a commit in doubt of an earlier attempt ended, on the attempt
    /// that committed after it.
    pub fn resolution(&self) -> Option<Resolution> {
        self.resolution
    }
}

/// Told of every attempt as it ends, on the caller's thread (or task),
/// before the helper waits or returns. Keep it cheap: it runs inside the
/// retry loop.
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use diesel_tx_retry::{Attempt, Observer};
///
/// #[derive(Default)]
/// struct Retries(AtomicU64);
///
/// impl Observer for Retries {
///     fn attempt(&self, attempt: &Attempt) {
///         if attempt.outcome().is_retry() {
///             self.0.fetch_add(1, Ordering::Relaxed);
///         }
///     }
/// }
/// ```
pub trait Observer: Send + Sync {
    /// One attempt ended.
    fn attempt(&self, attempt: &Attempt);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_lowercase_words() {
        assert_eq!(Cause::ConnectionLost.to_string(), "connection_lost");
        assert_eq!(Outcome::GaveUp.to_string(), "gave_up");
        assert_eq!(Resolution::AppliedEarlier.to_string(), "applied_earlier");
        assert!(!Cause::Domain.is_database_error());
        assert!(Cause::Conflict.is_database_error());
        assert!(Outcome::Rewound.is_retry() && !Outcome::Failed.is_retry());
    }
}
