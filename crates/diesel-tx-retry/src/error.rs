//! What a call returns when no attempt committed ([`TxError`]), what a
//! reported call returns when one did ([`Committed`]), and how the helper
//! finds the database error inside a unit's own error type ([`UnitError`]).

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use diesel::result::Error as DieselError;

/// An error type a unit of work may return: any type that a
/// `diesel::result::Error` converts into (the helper's own statements fail
/// with those), and in which the helper can find that error again, to tell a
/// conflict to retry from a refusal. Implemented for you:
///
/// - every `std::error::Error + From<diesel::result::Error>`: the helper
///   looks at the error itself, then down its `source()` chain, for a
///   `diesel::result::Error` (`diesel::result::Error` itself, a `thiserror`
///   enum with a `#[from]` variant);
/// - `anyhow::Error` (feature `anyhow`, on by default): down its chain;
/// - `Box<dyn std::error::Error + Send + Sync>`: down its chain.
///
/// `M` only tells these apart; the compiler infers it.
///
/// **When no database error is found** in a unit's error, the error is the
/// unit's own ("insufficient funds"): it is not retried, and the call
/// returns it ([`TxError::Failed`]), or, after a commit in doubt, reports
/// the doubt ([`TxError::AmbiguousCommit`]). Unless the type *hides* the
/// database errors it carries, which the helper checks by converting one
/// into it: a `thiserror` variant marked `#[error(transparent)]` forwards
/// `source()` past the `diesel::result::Error` it holds, so neither a
/// conflict nor a refusal could be seen. Such a type ends every failed call
/// with [`TxError::HiddenDatabaseError`], which says how to fix it, rather
/// than silently never retrying.
pub trait UnitError<M>: From<DieselError> + Send + 'static {
    /// The database error this error carries, if any.
    fn diesel_error(&self) -> Option<&DieselError>;
}

/// Markers that tell the implementations of [`UnitError`] apart; never
/// written by hand.
pub mod via {
    /// A `std::error::Error`, searched down its `source()` chain.
    #[derive(Debug)]
    pub enum SourceChain {}
    /// An `anyhow::Error`, searched down its chain.
    #[derive(Debug)]
    pub enum Anyhow {}
    /// A boxed error, searched down its chain.
    #[derive(Debug)]
    pub enum Boxed {}
}

/// The first `diesel::result::Error` of a chain of errors.
fn diesel_in<'e>(err: &'e (dyn StdError + 'static)) -> Option<&'e DieselError> {
    let mut next = Some(err);
    while let Some(err) = next {
        if let Some(found) = err.downcast_ref::<DieselError>() {
            return Some(found);
        }
        next = err.source();
    }
    None
}

impl<E> UnitError<via::SourceChain> for E
where
    E: StdError + From<DieselError> + Send + 'static,
{
    fn diesel_error(&self) -> Option<&DieselError> {
        diesel_in(self)
    }
}

#[cfg(feature = "anyhow")]
impl UnitError<via::Anyhow> for anyhow::Error {
    fn diesel_error(&self) -> Option<&DieselError> {
        self.chain()
            .find_map(|err| err.downcast_ref::<DieselError>())
    }
}

impl UnitError<via::Boxed> for Box<dyn StdError + Send + Sync> {
    fn diesel_error(&self) -> Option<&DieselError> {
        diesel_in(&**self)
    }
}

/// What the helper found in a unit's error.
pub(crate) enum Found<'e> {
    /// A database error.
    Database(&'e DieselError),
    /// None: the unit's own error.
    Domain,
    /// None, and the type hides the database errors it carries.
    Hidden,
}

/// Looks for the database error in `err`; when there is none, checks
/// whether its type would have shown one (a cheap conversion of a unit
/// variant of Diesel's error, on the failure path only).
pub(crate) fn find<E: UnitError<M>, M>(err: &E) -> Found<'_> {
    if let Some(found) = err.diesel_error() {
        return Found::Database(found);
    }
    if E::from(DieselError::NotInTransaction)
        .diesel_error()
        .is_some()
    {
        Found::Domain
    } else {
        Found::Hidden
    }
}

/// Why the helper stopped retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Budget {
    /// The attempts allowed were used.
    Attempts,
    /// The next retry would have started past the deadline.
    Deadline,
    /// The shared retry budget ([`RetryBudget`](crate::RetryBudget)) had no
    /// tokens left for the retry.
    Retries,
}

impl fmt::Display for Budget {
    /// `attempts`, `deadline` or `retry_budget`, the label metrics use.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Budget::Attempts => "attempts",
            Budget::Deadline => "deadline",
            Budget::Retries => "retry_budget",
        })
    }
}

impl Budget {
    /// The reason as a sentence says it.
    fn reason(self) -> &'static str {
        match self {
            Budget::Attempts => "retry limit reached",
            Budget::Deadline => "deadline reached",
            Budget::Retries => "the shared retry budget was spent",
        }
    }
}

/// What the helper returns when no attempt committed, or when it cannot say
/// whether one did.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TxError<E> {
    /// A non-retryable error, from the unit of work or the database, as it
    /// was. Nothing was committed.
    #[error(transparent)]
    Failed(E),
    /// Every attempt hit a retryable error until a budget ran out. Nothing was
    /// committed.
    #[error("transaction gave up after {attempts} attempts in {elapsed:.2?} ({}); last error: {last}", .budget.reason())]
    #[non_exhaustive]
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// Time since the first attempt began.
        elapsed: Duration,
        /// The budget that ran out.
        budget: Budget,
        /// The last retryable error.
        last: E,
    },
    /// The commit was sent but its outcome is unknown (connection lost, or the
    /// server said 40003): the transaction may or may not have been applied.
    /// An idempotent unit ([`Retrier::idempotent_transaction`](crate::Retrier::idempotent_transaction))
    /// is retried instead, and ends here only if the doubt could not be
    /// resolved: a budget ran out, or the retry failed, before the unit
    /// found out (`cause` is then the last error).
    #[error("commit result is ambiguous on attempt {attempts}: the transaction may or may not have been applied; check the data before retrying ({})", .cause.to_string().trim_end())]
    #[non_exhaustive]
    AmbiguousCommit {
        /// The attempt whose commit is in doubt.
        attempts: u32,
        /// What the driver reported.
        cause: E,
    },
    /// The unit returned `Ok`, but one of its statements had failed and
    /// aborted the transaction (it caught the error and went on), so the
    /// server did not commit it: PostgreSQL answers the `COMMIT` of an
    /// aborted transaction with `ROLLBACK` and no error. The unit's value is
    /// not returned, since what it describes was not committed.
    #[error("the unit of work returned Ok on attempt {attempts}, but a statement of its transaction had failed and aborted it, so nothing was committed; return the database error from the unit (with ?), or catch it inside a nested conn.transaction(..), which rolls back to a savepoint")]
    #[non_exhaustive]
    SwallowedError {
        /// The attempt whose transaction was aborted.
        attempts: u32,
    },
    /// The unit's error type carries a `diesel::result::Error` but does not
    /// show it (see [`UnitError`]), so the helper cannot tell a conflict to
    /// retry from a refusal. Nothing was committed, unless a commit was in
    /// doubt before (then the call ends in [`TxError::AmbiguousCommit`]).
    #[error("{0} (the unit's error type {type_name} does not show the helper the diesel::result::Error inside it, so a conflict cannot be told from a refusal: give that variant a message of its own, #[error(\"{{0}}\")], instead of #[error(transparent)], or return diesel::result::Error)", type_name = std::any::type_name::<E>())]
    HiddenDatabaseError(E),
    /// The connection was already inside a transaction, which the helper
    /// cannot restart; run the helper outside any other transaction.
    #[error("the connection is already inside a transaction; call the retry helper outside any transaction")]
    AlreadyInTransaction,
    /// No connection could be had (a pool's checkout timed out). Nothing
    /// was committed by the attempt that needed it. While an idempotent
    /// call's commit is in doubt, a failed checkout is retried instead,
    /// within the attempts and the deadline; if they run out first, the
    /// call ends in [`TxError::AmbiguousCommit`].
    #[error("could not get a connection from the pool")]
    NoConnection(#[source] Box<dyn StdError + Send + Sync>),
}

/// What a reported call returns ([`TransactionBuilder::run`](crate::TransactionBuilder::run)):
/// the value of the attempt that committed, how many attempts it took, and
/// how a commit in doubt ended, if one was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed<T> {
    value: T,
    attempts: u32,
    doubt: Option<crate::Resolution>,
}

impl<T> Committed<T> {
    pub(crate) fn new(value: T, attempts: u32, doubt: Option<crate::Resolution>) -> Self {
        Self {
            value,
            attempts,
            doubt,
        }
    }

    /// What the committed attempt returned.
    pub fn value(&self) -> &T {
        &self.value
    }

    /// What the committed attempt returned, owned.
    pub fn into_value(self) -> T {
        self.value
    }

    /// Attempts made, the committed one included.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Attempts beyond the first.
    pub fn retries(&self) -> u32 {
        self.attempts - 1
    }

    /// How a commit in doubt of an earlier attempt ended; `None` when none
    /// was in doubt.
    pub fn doubt(&self) -> Option<crate::Resolution> {
        self.doubt
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::result::DatabaseErrorKind;

    fn conflict() -> DieselError {
        DieselError::DatabaseError(
            DatabaseErrorKind::SerializationFailure,
            Box::new("could not serialize access".to_owned()),
        )
    }

    #[derive(Debug, thiserror::Error)]
    enum Shown {
        #[error("database: {0}")]
        Database(#[from] DieselError),
        #[error("insufficient funds")]
        Funds,
    }

    #[derive(Debug, thiserror::Error)]
    enum Hidden {
        #[error(transparent)]
        Database(#[from] DieselError),
        #[error("insufficient funds")]
        Funds,
    }

    #[test]
    fn the_database_error_is_found_through_from_and_the_source_chain() {
        assert!(matches!(find(&conflict()), Found::Database(_)));
        assert!(matches!(find(&Shown::from(conflict())), Found::Database(_)));
        assert!(matches!(find(&Shown::Funds), Found::Domain));
        let boxed: Box<dyn StdError + Send + Sync> = Box::new(conflict());
        assert!(matches!(find(&boxed), Found::Database(_)));
    }

    #[cfg(feature = "anyhow")]
    #[test]
    fn anyhow_errors_are_searched_down_their_chain() {
        let err = anyhow::Error::from(conflict()).context("moving money");
        assert!(matches!(find(&err), Found::Database(_)));
        assert!(matches!(
            find(&anyhow::anyhow!("no such account")),
            Found::Domain
        ));
    }

    #[test]
    fn a_type_that_hides_its_database_error_is_told_from_a_domain_error() {
        assert!(matches!(find(&Hidden::from(conflict())), Found::Hidden));
        assert!(matches!(find(&Hidden::Funds), Found::Hidden));
        let err: TxError<Hidden> = TxError::HiddenDatabaseError(Hidden::Funds);
        let line = err.to_string();
        assert!(
            line.starts_with("insufficient funds (the unit's error type "),
            "{line}"
        );
        assert!(line.contains("Hidden does not show the helper"), "{line}");
        assert!(line.contains("#[error(\"{0}\")]"), "{line}");
    }
}
