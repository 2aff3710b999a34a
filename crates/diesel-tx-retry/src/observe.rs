//! The observer of every attempt: how callers count retries by cause, time
//! spent backing off, commits in doubt and outcomes without parsing logs.

use std::time::Duration;

use crate::{Budget, Class, Stage, Step};

/// One attempt of one call, as it ended.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct Attempt {
    /// 1 for the first attempt of a call.
    pub number: u32,
    /// Time since the call's first attempt began.
    pub elapsed: Duration,
    /// Where the error came from, when there was one.
    pub stage: Option<Stage>,
    /// What the error meant, when there was one.
    pub cause: Option<Class>,
    /// What the helper did next.
    pub outcome: Outcome,
}

impl Attempt {
    /// An attempt as the helper reports it, for tests of an [`Observer`].
    pub fn new(
        number: u32,
        elapsed: Duration,
        stage: Option<Stage>,
        cause: Option<Class>,
        outcome: Outcome,
    ) -> Self {
        Self {
            number,
            elapsed,
            stage,
            cause,
            outcome,
        }
    }
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum Outcome {
    /// It committed; the call returns its value.
    Committed,
    /// Another attempt follows: a rewind, a restart or a reconnect, after
    /// `delay`.
    Retry {
        /// [`Step::Rewind`], [`Step::Restart`] or [`Step::Reconnect`].
        step: Step,
        /// The backoff before the next attempt.
        delay: Duration,
    },
    /// A retry was due but a budget had run out.
    GaveUp(Budget),
    /// The commit was sent and its outcome is unknown.
    Ambiguous,
    /// The error is not retryable; the call returns it.
    Failed,
    /// No connection could be had.
    NoConnection,
    /// The unit panicked; the panic goes on once the transaction is rolled
    /// back.
    Panicked,
}

/// Told of every attempt as it ends, on the caller's thread, before the
/// helper sleeps or returns. Keep it cheap: it runs inside the retry loop.
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use diesel_tx_retry::{Attempt, Observer, Outcome};
///
/// #[derive(Default)]
/// struct Retries(AtomicU64);
///
/// impl Observer for Retries {
///     fn attempt(&self, attempt: &Attempt) {
///         if matches!(attempt.outcome, Outcome::Retry { .. }) {
///             self.0.fetch_add(1, Ordering::Relaxed);
///         }
///     }
/// }
/// ```
pub trait Observer: Send + Sync {
    /// One attempt ended.
    fn attempt(&self, attempt: &Attempt);
}
