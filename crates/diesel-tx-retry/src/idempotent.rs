//! Idempotent units: the key the caller drew before the call, what each
//! attempt is told ([`Keyed`]), and the verdict the unit returns
//! ([`Applied`]).

use std::sync::atomic::{AtomicBool, Ordering};

/// What an idempotent unit's attempt found: it applied its change now, or an
/// earlier attempt (one whose commit was in doubt, or an earlier call) had
/// applied it already, and this attempt applied nothing. The unit returns
/// one of these; the call returns it too.
///
/// ```
/// use diesel_tx_retry::Applied;
///
/// let done = Applied::Earlier(7);
/// assert!(done.was_earlier());
/// assert_eq!(done.into_inner(), 7);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Applied<T> {
    /// This attempt applied the change.
    Now(T),
    /// The change was there already, under the unit's key: this attempt
    /// applied nothing.
    Earlier(T),
}

impl<T> Applied<T> {
    /// The value, however it was applied.
    pub fn into_inner(self) -> T {
        match self {
            Applied::Now(value) | Applied::Earlier(value) => value,
        }
    }

    /// The value, however it was applied.
    pub fn value(&self) -> &T {
        match self {
            Applied::Now(value) | Applied::Earlier(value) => value,
        }
    }

    /// Whether the change was applied earlier, not by this attempt.
    pub fn was_earlier(&self) -> bool {
        matches!(self, Applied::Earlier(_))
    }

    /// The same verdict over a value mapped by `f`.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Applied<U> {
        match self {
            Applied::Now(value) => Applied::Now(f(value)),
            Applied::Earlier(value) => Applied::Earlier(f(value)),
        }
    }
}

/// What an idempotent unit is told on each attempt: the key it writes its
/// change under (drawn by the caller before the call, so every attempt has
/// the same), and whether an earlier attempt's commit is in doubt.
///
/// After a commit in doubt (the connection lost while `COMMIT` was in
/// flight, or 40003) the earlier attempt may have committed. The unit must
/// then look for its key before writing, and return [`Applied::Earlier`] if
/// it is there; writing the key under a unique constraint is what makes that
/// safe (the crate docs, "Commits in doubt").
#[derive(Debug)]
pub struct Keyed<'a, K: ?Sized> {
    pub(crate) key: &'a K,
    pub(crate) attempt: u32,
    pub(crate) in_doubt: bool,
    /// Set by [`Keyed::not_applied_earlier`]; atomic so that `&Keyed` is
    /// `Send` in an async unit.
    pub(crate) settled: AtomicBool,
}

impl<'a, K: ?Sized> Keyed<'a, K> {
    /// A first attempt under `key`, with nothing in doubt: for running an
    /// idempotent unit outside the helper (in Diesel's own transaction, or
    /// in a test of the unit).
    ///
    /// ```
    /// let key = 7;
    /// let attempt = diesel_tx_retry::Keyed::new(&key);
    /// assert_eq!((*attempt.key(), attempt.attempt(), attempt.in_doubt()), (7, 1, false));
    /// ```
    pub fn new(key: &'a K) -> Self {
        Self {
            key,
            attempt: 1,
            in_doubt: false,
            settled: AtomicBool::new(false),
        }
    }

    /// The unit's key.
    pub fn key(&self) -> &'a K {
        self.key
    }

    /// 1 for the first attempt of the call.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Whether an earlier attempt's commit is in doubt: it may have
    /// committed, so look for the key before writing.
    pub fn in_doubt(&self) -> bool {
        self.in_doubt
    }

    /// Says the doubt is over: the unit found its key absent *and* no
    /// earlier attempt can still commit it (it claimed the key, say, with
    /// an insert that waited for any transaction holding it). An error the
    /// unit returns after this (a refusal, "insufficient funds") is then
    /// reported as what it is, [`TxError::Failed`](crate::TxError::Failed),
    /// instead of [`TxError::AmbiguousCommit`](crate::TxError::AmbiguousCommit):
    /// the earlier attempt is known not to have committed. Not needed on
    /// the way to `Ok`, whose [`Applied`] says the same; a no-op when no
    /// commit is in doubt.
    pub fn not_applied_earlier(&self) {
        if self.in_doubt {
            self.settled.store(true, Ordering::Relaxed);
        }
    }
}
