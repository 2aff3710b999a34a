//! A retry budget shared by any number of helpers ([`RetryBudget`]), in
//! the style of Finagle's `RetryBudget` and gRPC's retry throttling: retries
//! may add at most a fixed share to the load of first attempts, plus a
//! small floor, so that a server in trouble is not buried under retries.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use crate::clock::{Clock, SystemClock};

/// Tokens every first attempt deposits and every retry withdraws, shared by
/// whoever holds a clone (share one per process, or per server). A retry
/// costs one token, a retry on a new connection [`RetryBudget::RECONNECT_COST`]
/// (a connection costs the server more than a transaction); every first
/// attempt deposits `ratio` tokens, so retries add at most `ratio` times
/// the first attempts' load. Deposits are kept up to a cap (by default ten
/// seconds of `floor` retries or 100 tokens, whichever is more), so that a
/// quiet hour does not pay for a storm; the budget starts full, so that a
/// process's first burst of conflicts is not refused for want of history
/// (and a refusal, which returns at once, does not turn a caller that
/// tries again at once into a busy loop that conflicts more). Beside that, `floor` retries a
/// second are always allowed, so that a helper with little traffic still
/// retries its rare conflicts.
///
/// A retry the budget refuses ends the call as given up
/// ([`TxError::GaveUp`](crate::TxError::GaveUp) with
/// [`Budget::Retries`](crate::Budget::Retries)), and the observer is told
/// so. A call whose commit is in doubt is never refused: its doubt is
/// resolved, whatever the budget says.
///
/// ```
/// use diesel_tx_retry::{Retrier, RetryBudget};
///
/// // Retries may add half the load of first attempts, plus 10 a second,
/// // across both helpers.
/// let budget = RetryBudget::new(0.5);
/// let transfers = Retrier::default().with_retry_budget(budget.clone());
/// let reports = Retrier::default().with_retry_budget(budget);
/// ```
#[derive(Clone)]
pub struct RetryBudget {
    shared: Arc<Shared>,
}

struct Shared {
    ratio: f64,
    floor: f64,
    /// The cap asked for, if one was.
    cap_set: Option<f64>,
    cap: f64,
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// Tokens deposited by first attempts, not yet withdrawn.
    tokens: f64,
    /// The floor's own tokens: refilled at `floor` a second, up to `floor`.
    floor_tokens: f64,
    refilled: Instant,
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("RetryBudget")
            .field("ratio", &self.shared.ratio)
            .field("floor", &self.shared.floor)
            .field("cap", &self.shared.cap)
            .field("tokens", &state.tokens)
            .finish()
    }
}

impl RetryBudget {
    /// What a retry on a new connection costs, in tokens.
    pub const RECONNECT_COST: f64 = 2.0;

    /// Retries may add `ratio` times the load of first attempts (0.2: a
    /// fifth more), plus 10 a second. A `ratio` below 0 counts as 0.
    pub fn new(ratio: f64) -> Self {
        Self::build(ratio.max(0.0), 10.0, None, Arc::new(SystemClock))
    }

    /// The same, with `per_second` retries always allowed (10 by default).
    #[must_use]
    pub fn with_floor(self, per_second: f64) -> Self {
        let (ratio, cap) = (self.shared.ratio, self.shared.cap_set);
        Self::build(
            ratio,
            per_second.max(0.0),
            cap,
            Arc::clone(&self.shared.clock),
        )
    }

    /// The same, keeping at most `tokens` deposited.
    #[must_use]
    pub fn with_cap(self, tokens: f64) -> Self {
        let (ratio, floor) = (self.shared.ratio, self.shared.floor);
        Self::build(
            ratio,
            floor,
            Some(tokens.max(0.0)),
            Arc::clone(&self.shared.clock),
        )
    }

    /// The share of first attempts' load retries may add.
    pub fn ratio(&self) -> f64 {
        self.shared.ratio
    }

    /// The retries a second always allowed.
    pub fn floor(&self) -> f64 {
        self.shared.floor
    }

    /// The tokens deposited and not withdrawn, now.
    pub fn tokens(&self) -> f64 {
        self.lock().tokens
    }

    fn build(ratio: f64, floor: f64, cap_set: Option<f64>, clock: Arc<dyn Clock>) -> Self {
        let cap = cap_set.unwrap_or((floor * 10.0).max(100.0));
        let refilled = clock.now();
        Self {
            shared: Arc::new(Shared {
                ratio,
                floor,
                cap_set,
                cap,
                clock,
                // Full at first, as gRPC's throttle starts: a process's
                // first burst of conflicts is not refused for want of
                // history.
                state: Mutex::new(State {
                    tokens: cap,
                    floor_tokens: floor,
                    refilled,
                }),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A first attempt began: deposit.
    pub(crate) fn deposit(&self) {
        let mut state = self.lock();
        state.tokens = (state.tokens + self.shared.ratio).min(self.shared.cap);
    }

    /// A retry that costs `cost` tokens is due: whether the budget allows
    /// it (and then it is paid for), from the floor first.
    pub(crate) fn withdraw(&self, cost: f64) -> bool {
        let now = self.shared.clock.now();
        let mut state = self.lock();
        let elapsed = now.saturating_duration_since(state.refilled).as_secs_f64();
        state.refilled = now;
        state.floor_tokens =
            (state.floor_tokens + elapsed * self.shared.floor).min(self.shared.floor);
        // Tokens are sums of fractions (ten deposits of 0.2 make
        // 1.9999999999999998): a hair's breadth counts as there.
        const HAIR: f64 = 1e-9;
        if state.floor_tokens + HAIR >= cost {
            state.floor_tokens = (state.floor_tokens - cost).max(0.0);
            true
        } else if state.tokens + HAIR >= cost {
            state.tokens = (state.tokens - cost).max(0.0);
            true
        } else {
            false
        }
    }

    /// The same budget with no tokens yet (the crate's unit tests).
    #[cfg(test)]
    pub(crate) fn emptied(self) -> Self {
        self.lock().tokens = 0.0;
        self
    }

    /// The same budget on another clock (the crate's tests).
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn on_clock(self, clock: Arc<dyn Clock>) -> Self {
        let (ratio, floor, cap) = (self.shared.ratio, self.shared.floor, self.shared.cap_set);
        Self::build(ratio, floor, cap, clock)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::internal::FakeClock;

    fn budget(ratio: f64, floor: f64) -> (RetryBudget, Arc<FakeClock>) {
        let clock = FakeClock::new();
        let budget = RetryBudget::new(ratio)
            .with_floor(floor)
            .on_clock(clock.clone())
            .emptied();
        (budget, clock)
    }

    #[test]
    fn first_attempts_pay_for_a_share_of_retries() {
        // No floor: only deposits pay. Ten first attempts at 0.2 pay for two
        // retries, not three.
        let (budget, _) = budget(0.2, 0.0);
        for _ in 0..10 {
            budget.deposit();
        }
        assert!(budget.withdraw(1.0));
        assert!(budget.withdraw(1.0));
        assert!(!budget.withdraw(1.0));
    }

    #[test]
    fn a_reconnect_costs_more_than_a_retry() {
        let (budget, _) = budget(1.0, 0.0);
        budget.deposit();
        assert!(
            !budget.withdraw(RetryBudget::RECONNECT_COST),
            "one token, a reconnect costs two"
        );
        assert!(budget.withdraw(1.0));
    }

    #[test]
    fn the_floor_allows_its_retries_a_second_without_deposits() {
        let (budget, clock) = budget(0.0, 5.0);
        for _ in 0..5 {
            assert!(budget.withdraw(1.0));
        }
        assert!(!budget.withdraw(1.0), "the floor is spent for this second");
        clock.advance(Duration::from_millis(400));
        assert!(budget.withdraw(1.0), "0.4 s refill two tokens");
        assert!(budget.withdraw(1.0));
        assert!(!budget.withdraw(1.0));
        // Idle for a minute: the floor refills to one second's worth, no more.
        clock.advance(Duration::from_secs(60));
        for _ in 0..5 {
            assert!(budget.withdraw(1.0));
        }
        assert!(!budget.withdraw(1.0));
    }

    #[test]
    fn deposits_are_kept_up_to_the_cap() {
        let (budget, _) = budget(1.0, 0.0);
        let budget = budget.with_cap(3.0).emptied();
        for _ in 0..100 {
            budget.deposit();
        }
        assert_eq!(budget.tokens(), 3.0);
    }

    #[test]
    fn clones_share_one_budget() {
        let (budget, _) = budget(1.0, 0.0);
        let other = budget.clone();
        budget.deposit();
        assert!(other.withdraw(1.0));
        assert!(!budget.withdraw(1.0));
    }

    #[test]
    fn a_new_budget_starts_full() {
        let budget = RetryBudget::new(0.1).with_floor(0.0).with_cap(5.0);
        assert_eq!(budget.tokens(), 5.0);
        for _ in 0..5 {
            assert!(budget.withdraw(1.0));
        }
        assert!(!budget.withdraw(1.0));
    }

    #[test]
    fn the_default_cap_is_ten_seconds_of_floor_or_100_tokens() {
        assert_eq!(RetryBudget::new(0.5).shared.cap, 100.0);
        assert_eq!(RetryBudget::new(0.5).with_floor(50.0).shared.cap, 500.0);
    }
}
