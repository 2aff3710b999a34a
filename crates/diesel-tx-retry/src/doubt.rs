//! Commits in doubt: what a unit is told when it runs again after one
//! ([`Context`]), and how the doubt ended ([`Resolution`]).

use std::cell::Cell;

/// What a unit knows of the call it runs in, given to units run through
/// [`Retrier::run_with`](crate::Retrier::run_with) and
/// [`Retrier::run_on_with`](crate::Retrier::run_on_with).
///
/// After a commit in doubt (the connection lost while `COMMIT` was in
/// flight, or 40003) the helper retries a unit declared idempotent
/// ([`TxOptions::idempotent`](crate::TxOptions::idempotent)); the retry sees
/// [`Context::in_doubt`] and should find out, with the key it drew before
/// the helper, whether the earlier attempt committed, and say so with
/// [`Context::applied_earlier`] or [`Context::not_applied_earlier`].
#[derive(Debug)]
pub struct Context {
    attempt: u32,
    in_doubt: bool,
    verdict: Cell<Option<Verdict>>,
}

/// What a unit found out about its earlier attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    AppliedEarlier,
    NotAppliedEarlier,
}

impl Context {
    /// The context of attempt `attempt`, after a commit in doubt or not: what
    /// the helper gives a unit, for calling one outside it (a test, a bare
    /// transaction).
    pub fn new(attempt: u32, in_doubt: bool) -> Self {
        Self {
            attempt,
            in_doubt,
            verdict: Cell::new(None),
        }
    }

    /// 1 for the first attempt of the call.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Whether an earlier attempt's commit is in doubt: it may have
    /// committed. The unit must then not apply its writes a second time
    /// (find them by their key first), and must not refuse for a reason its
    /// own earlier commit caused.
    pub fn in_doubt(&self) -> bool {
        self.in_doubt
    }

    /// The unit found what its earlier attempt wrote: that attempt
    /// committed, and this one applies nothing. The call then reports
    /// [`Resolution::AppliedEarlier`].
    pub fn applied_earlier(&self) {
        self.verdict.set(Some(Verdict::AppliedEarlier));
    }

    /// The unit established that its earlier attempt did not commit (its key
    /// is absent, read after waiting for whatever held its rows). The doubt
    /// is over: from here on, a failure is reported as it is, not as an
    /// ambiguous commit.
    pub fn not_applied_earlier(&self) {
        self.verdict.set(Some(Verdict::NotAppliedEarlier));
    }

    /// Whether the unit said its earlier attempt committed
    /// ([`Context::applied_earlier`]).
    pub fn found_applied_earlier(&self) -> bool {
        self.verdict.get() == Some(Verdict::AppliedEarlier)
    }

    pub(crate) fn verdict(&self) -> Option<Verdict> {
        self.verdict.get()
    }
}

/// How a commit in doubt ended, in a call that then committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// The unit found its earlier attempt's writes: that attempt had
    /// committed, and the retry applied nothing.
    AppliedEarlier,
    /// The retry applied the unit: its earlier attempt had not committed (or
    /// the unit did not say it found its writes).
    AppliedNow,
}
