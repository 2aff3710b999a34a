//! Knobs for the crate's own tests (feature `testing`), not part of its API:
//! hidden from the docs, and free to change in any release. A clock that
//! never sleeps, a jitter of the test's choosing, and the savepoint
//! protocol on PostgreSQL (where it only adds round trips, but lets tests
//! play it).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

pub use crate::clock::Clock;
use crate::{Protocol, Retrier};

/// A clock whose `sleep` only records the delay and moves time forward.
#[derive(Debug)]
pub struct FakeClock {
    now: Mutex<Instant>,
    sleeps: Mutex<Vec<Duration>>,
}

impl FakeClock {
    /// A clock at the real now.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            now: Mutex::new(Instant::now()),
            sleeps: Mutex::new(Vec::new()),
        })
    }

    /// Every sleep asked of it, in order.
    pub fn sleeps(&self) -> Vec<Duration> {
        self.sleeps
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Moves time forward by `by`, as work that takes that long would.
    pub fn advance(&self, by: Duration) {
        *self.now.lock().unwrap_or_else(PoisonError::into_inner) += by;
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Instant {
        *self.now.lock().unwrap_or_else(PoisonError::into_inner)
    }
    fn sleep(&self, duration: Duration) {
        self.advance(duration);
        self.sleeps
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(duration);
    }
    #[cfg(feature = "async")]
    fn sleep_async(
        &self,
        duration: Duration,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        self.sleep(duration);
        Box::pin(std::future::ready(()))
    }
}

/// `retrier` with `clock` for its time.
pub fn with_clock(mut retrier: Retrier, clock: Arc<dyn Clock>) -> Retrier {
    retrier.set_clock(clock);
    retrier
}

/// `retrier` with `jitter` for its draws, which must be in `[0, 1)`.
pub fn with_jitter(mut retrier: Retrier, jitter: Arc<dyn Fn() -> f64 + Send + Sync>) -> Retrier {
    retrier.set_jitter(jitter);
    retrier
}

/// `retrier` framing transactions with `protocol` whatever the server; the
/// retry rules still follow the server.
pub fn with_protocol(mut retrier: Retrier, protocol: Protocol) -> Retrier {
    retrier.set_protocol(protocol);
    retrier
}

/// `budget` on `clock` for its floor's refill.
pub fn budget_on_clock(budget: crate::RetryBudget, clock: Arc<dyn Clock>) -> crate::RetryBudget {
    budget.on_clock(clock)
}
