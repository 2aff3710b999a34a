//! How long the helper keeps trying ([`RetryPolicy`], [`Backoff`]) and what
//! each unit asks of its transaction ([`TxOptions`]).

use std::time::Duration;

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
    ///
    /// ```
    /// use std::time::Duration;
    /// use diesel_tx_retry::RetryPolicy;
    /// let backoff = RetryPolicy::default().backoff;
    /// // The first retry goes at once; the second waits up to 2 ms.
    /// assert_eq!(backoff.delay(1, 0.99), Duration::ZERO);
    /// assert_eq!(backoff.delay(2, 0.5), Duration::from_millis(1));
    /// ```
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
    pub fn sql(self) -> &'static str {
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
    pub fn upgraded_to(self, reported: &str) -> Option<Isolation> {
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

/// Per-unit options; they hold for every attempt. Built from
/// [`TxOptions::default`] (a read-write, non-idempotent transaction at the
/// helper's isolation level) with the methods below, so that options can be
/// added without breaking callers.
///
/// ```
/// use diesel_tx_retry::{Isolation, TxOptions};
/// let opts = TxOptions::default().idempotent().isolation(Isolation::ReadCommitted);
/// assert!(opts.is_idempotent() && !opts.is_read_only());
/// assert_eq!(opts.isolation_level(), Some(Isolation::ReadCommitted));
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TxOptions {
    read_only: bool,
    idempotent: bool,
    isolation: Option<Isolation>,
}

impl TxOptions {
    /// Runs this unit at `level` instead of the helper's own level
    /// ([`Retrier::with_isolation`](crate::Retrier::with_isolation)).
    #[must_use]
    pub fn isolation(self, level: Isolation) -> Self {
        Self {
            isolation: Some(level),
            ..self
        }
    }

    /// The level this unit asked for, if it asked for one.
    pub fn isolation_level(&self) -> Option<Isolation> {
        self.isolation
    }

    /// `BEGIN ... READ ONLY`: the server refuses writes.
    #[must_use]
    pub fn read_only(self) -> Self {
        Self {
            read_only: true,
            ..self
        }
    }

    /// The caller declares that applying the unit twice is harmless, so a
    /// commit in doubt may be retried instead of reported.
    #[must_use]
    pub fn idempotent(self) -> Self {
        Self {
            idempotent: true,
            ..self
        }
    }

    /// Whether the transaction is read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Whether the unit was declared idempotent.
    pub fn is_idempotent(&self) -> bool {
        self.idempotent
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
    fn a_unit_keeps_the_helpers_level_unless_it_asks() {
        assert_eq!(TxOptions::default().isolation_level(), None);
        let opts = TxOptions::default()
            .read_only()
            .isolation(Isolation::ReadCommitted);
        assert!(opts.is_read_only());
        assert_eq!(opts.isolation_level(), Some(Isolation::ReadCommitted));
        assert_eq!(Isolation::default(), Isolation::Serializable);
        assert_eq!(Isolation::ReadCommitted.sql(), "READ COMMITTED");
    }

    #[test]
    fn huge_retry_numbers_stay_at_the_cap() {
        assert_eq!(
            backoff(false).delay(u32::MAX, 1.0),
            Duration::from_millis(100)
        );
    }
}
