//! What the workload counts as it runs: each worker's [`Tally`], merged at
//! the end, and the retry helper's observer ([`Attempts`]), shared.

use std::sync::atomic::{AtomicU64, Ordering};

use hdrhistogram::Histogram;

use super::report::{GaveUpByBudget, Resolved, RetriesByCause};
use diesel_tx_retry::{Attempt, Cause, Observer, Outcome};

/// Counts the retries and the backoff of every attempt, as the retry
/// helper's observer: shared by the workers, one atomic add per retry.
#[derive(Debug, Default)]
pub(super) struct Attempts {
    committed: AtomicU64,
    conflict: AtomicU64,
    connection_lost: AtomicU64,
    other: AtomicU64,
    pub(super) backoff_us: AtomicU64,
}

impl Observer for Attempts {
    fn attempt(&self, attempt: &Attempt) {
        if attempt.outcome().is_retry() {
            self.retried(attempt.cause(), attempt.backoff());
        } else if attempt.outcome() == Outcome::Committed {
            self.committed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Attempts {
    /// A retry for `cause`, after `backoff`.
    pub(super) fn retried(&self, cause: Option<Cause>, backoff: std::time::Duration) {
        let counter = match cause {
            Some(Cause::Conflict) => &self.conflict,
            Some(Cause::ConnectionLost) => &self.connection_lost,
            _ => &self.other,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(backoff.as_micros()).unwrap_or(u64::MAX);
        self.backoff_us.fetch_add(micros, Ordering::Relaxed);
    }

    /// Calls that committed, as the helper told (a call dropped while its
    /// commit was in flight included).
    pub(super) fn committed(&self) -> u64 {
        self.committed.load(Ordering::Relaxed)
    }

    pub(super) fn by_cause(&self) -> RetriesByCause {
        RetriesByCause {
            conflict: self.conflict.load(Ordering::Relaxed),
            connection_lost: self.connection_lost.load(Ordering::Relaxed),
            other: self.other.load(Ordering::Relaxed),
        }
    }
}

/// One worker's counts; merged at the end so that workers share nothing hot.
pub(super) struct Tally {
    pub(super) committed: u64,
    pub(super) rejected: u64,
    pub(super) gave_up_by: GaveUpByBudget,
    pub(super) in_doubt: u64,
    pub(super) resolved: Resolved,
    pub(super) failed: u64,
    pub(super) cancelled: u64,
    /// Filled in at the end, from the observer.
    pub(super) cancelled_committed: u64,
    pub(super) unconnected: u64,
    pub(super) latency_us: Histogram<u64>,
}

impl Tally {
    pub(super) fn new() -> Self {
        Self {
            committed: 0,
            rejected: 0,
            gave_up_by: GaveUpByBudget::default(),
            in_doubt: 0,
            resolved: Resolved::default(),
            failed: 0,
            cancelled: 0,
            cancelled_committed: 0,
            unconnected: 0,
            // 1 µs to an hour at 3 significant digits.
            latency_us: Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .expect("valid histogram bounds"),
        }
    }

    pub(super) fn with_unconnected(mut self, workers: usize) -> Self {
        self.unconnected += workers as u64;
        self
    }

    pub(super) fn merge(&mut self, other: &Tally) {
        self.committed += other.committed;
        self.rejected += other.rejected;
        self.gave_up_by.attempts += other.gave_up_by.attempts;
        self.gave_up_by.deadline += other.gave_up_by.deadline;
        self.gave_up_by.retry_budget += other.gave_up_by.retry_budget;
        self.in_doubt += other.in_doubt;
        self.resolved.applied_earlier += other.resolved.applied_earlier;
        self.resolved.applied_on_retry += other.resolved.applied_on_retry;
        self.failed += other.failed;
        self.cancelled += other.cancelled;
        self.cancelled_committed += other.cancelled_committed;
        self.unconnected += other.unconnected;
        self.latency_us
            .add(&other.latency_us)
            .expect("histograms share their bounds");
    }
}
