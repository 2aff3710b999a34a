// TxError may grow variants in a minor release: a match needs a wildcard.
use diesel_tx_retry::TxError;

fn line(err: TxError<diesel::result::Error>) -> &'static str {
    match err {
        TxError::Failed(_) => "failed",
        TxError::GaveUp { .. } => "gave up",
        TxError::AmbiguousCommit { .. } => "in doubt",
        TxError::SwallowedError { .. } => "swallowed",
        TxError::HiddenDatabaseError(_) => "hidden",
        TxError::AlreadyInTransaction => "nested",
        TxError::NoConnection(_) => "no connection",
    }
}

fn main() {}
