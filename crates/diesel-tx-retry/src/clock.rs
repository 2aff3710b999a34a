//! Time as the helper sees it: the real clock, or a test's
//! (`internal::FakeClock`).

use std::time::{Duration, Instant};

/// Time as the helper sees it; the crate's tests swap in a clock that does
/// not sleep.
pub trait Clock: Send + Sync {
    /// The current instant.
    fn now(&self) -> Instant;
    /// Wait for `duration`.
    fn sleep(&self, duration: Duration);
    /// Wait for `duration` without blocking the thread: on tokio's timer.
    #[cfg(feature = "async")]
    fn sleep_async(
        &self,
        duration: Duration,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(tokio::time::sleep(duration))
    }
}

/// The real clock.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn sleep(&self, duration: Duration) {
        std::thread::sleep(duration);
    }
}
