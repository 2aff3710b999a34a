//! The wait between attempts ([`Backoff`]) and the isolation level a
//! transaction asks for ([`Isolation`]).

use std::time::Duration;

/// Capped exponential backoff with full jitter: the wait before retry `n`
/// is a uniform draw below `min(cap, base * 2^(n-1))`, so that clients that
/// keep colliding spread apart
/// (<https://aws.amazon.com/blogs/architecture/exponential-backoff-and-jitter/>).
///
/// The default retries the first time at once, then waits up to 2 ms,
/// doubling to 500 ms: on PostgreSQL a 40001 from a row lock arrives after
/// the winner committed, so the way is clear; on CockroachDB an immediate
/// retry rewinds to the savepoint and keeps the transaction's place in line.
///
/// ```
/// use std::time::Duration;
/// use diesel_tx_retry::Backoff;
///
/// let backoff = Backoff::default();
/// // The first retry goes at once; the second waits up to 2 ms.
/// assert_eq!(backoff.delay(1, 0.99), Duration::ZERO);
/// assert_eq!(backoff.delay(2, 0.5), Duration::from_millis(1));
///
/// let slow = Backoff::exponential(Duration::from_millis(10), Duration::from_secs(1))
///     .delay_first_retry();
/// assert_eq!(slow.delay(1, 0.5), Duration::from_millis(5));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    first_retry_immediate: bool,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(2),
            cap: Duration::from_millis(500),
            first_retry_immediate: true,
        }
    }
}

impl Backoff {
    /// Waits of up to `base` for the first delayed retry, doubling up to
    /// `cap` (which is raised to `base` if lower); the first retry goes at
    /// once unless [`Backoff::delay_first_retry`].
    pub fn exponential(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap: cap.max(base),
            first_retry_immediate: true,
        }
    }

    /// No wait at all between attempts.
    pub fn none() -> Self {
        Self::exponential(Duration::ZERO, Duration::ZERO)
    }

    /// Waits before the first retry too.
    #[must_use]
    pub fn delay_first_retry(self) -> Self {
        Self {
            first_retry_immediate: false,
            ..self
        }
    }

    /// The delay before retry number `retry` (1 for the first retry), given a
    /// jitter draw `unit` in `[0, 1)`.
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

/// The isolation level a transaction asks for in its `BEGIN`.
///
/// SERIALIZABLE is the default and CockroachDB's advice: "if your workload
/// is already running well under SERIALIZABLE isolation, Cockroach Labs does
/// not recommend changing to READ COMMITTED isolation unless there is a
/// specific need" (<https://www.cockroachlabs.com/docs/stable/read-committed>).
/// Under READ COMMITTED every read that a later write depends on must be a
/// locking read (`SELECT ... FOR UPDATE`), or concurrent transactions lose
/// each other's updates; the crate docs say what else changes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Isolation {
    /// `SERIALIZABLE`: no anomalies; conflicts surface as 40001 and are
    /// retried.
    #[default]
    Serializable,
    /// `READ COMMITTED`: each statement sees what committed before it began
    /// (CockroachDB 24.1+, PostgreSQL). Fewer retries, more care.
    ReadCommitted,
}

impl Isolation {
    /// The level as SQL says it (`ISOLATION LEVEL ...`).
    pub(crate) fn sql(self) -> &'static str {
        match self {
            Isolation::Serializable => "SERIALIZABLE",
            Isolation::ReadCommitted => "READ COMMITTED",
        }
    }

    /// Whether a transaction that asked for this level runs at a stronger
    /// one, going by `reported`, what `SHOW transaction_isolation` answered
    /// inside it (`serializable`, `read committed`; case and spacing as the
    /// server likes). CockroachDB runs READ COMMITTED as SERIALIZABLE without
    /// a word when `sql.txn.read_committed_isolation.enabled` is off (and, in
    /// v24.1 and v24.2, without an enterprise licence).
    pub(crate) fn upgraded_to(self, reported: &str) -> Option<Isolation> {
        let reported = reported
            .trim()
            .to_ascii_lowercase()
            .replace(['_', '-'], " ");
        match (self, reported.as_str()) {
            (Isolation::ReadCommitted, "serializable") => Some(Isolation::Serializable),
            _ => None,
        }
    }
}

impl std::fmt::Display for Isolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.sql())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backoff(first_retry_immediate: bool) -> Backoff {
        let b = Backoff::exponential(Duration::from_millis(10), Duration::from_millis(100));
        if first_retry_immediate {
            b
        } else {
            b.delay_first_retry()
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
    fn a_cap_below_the_base_is_the_base_and_none_never_waits() {
        let b = Backoff::exponential(Duration::from_millis(10), Duration::from_millis(1));
        assert_eq!(b.delay(5, 1.0), Duration::from_millis(10));
        assert_eq!(Backoff::none().delay(7, 1.0), Duration::ZERO);
    }

    #[test]
    fn only_read_committed_run_as_serializable_is_an_upgrade() {
        use Isolation::*;
        assert_eq!(
            ReadCommitted.upgraded_to("serializable"),
            Some(Serializable)
        );
        assert_eq!(
            ReadCommitted.upgraded_to(" SERIALIZABLE\n"),
            Some(Serializable)
        );
        assert_eq!(ReadCommitted.upgraded_to("read committed"), None);
        assert_eq!(ReadCommitted.upgraded_to("READ_COMMITTED"), None);
        assert_eq!(Serializable.upgraded_to("serializable"), None);
        // A weaker level than asked is not an upgrade (nor a case the
        // helper can fix); CockroachDB never does it.
        assert_eq!(Serializable.upgraded_to("read committed"), None);
    }

    #[test]
    fn huge_retry_numbers_stay_at_the_cap() {
        assert_eq!(
            backoff(false).delay(u32::MAX, 1.0),
            Duration::from_millis(100)
        );
    }
}
