//! The bank's operations: pure units of work on a connection that return
//! what they did and print nothing, so the retry helper can run them again.

mod accounts;
pub mod asynch;
mod audit;
mod transfer;

use uuid::Uuid;

use crate::models::Account;
use diesel_tx_retry::Resolution;

pub use accounts::{create_batch, delete_accounts, insert_accounts, insert_accounts_resolving};
pub use audit::{audit, Audit};
pub use transfer::transfer;
pub(crate) use transfer::{applied_earlier, MoveFunds};

/// Rows per multi-row `INSERT` by default: past a few thousand rows larger
/// statements stop saving time (bench/RESULTS.md has the sweep).
pub const ROWS_PER_INSERT: usize = 2_000;

/// Each row binds two parameters and the protocol allows 65,535 per
/// statement.
pub const MAX_ROWS_PER_INSERT: usize = 65_535 / 2;

/// Ids bound by one statement at most: a statement that names more (a
/// delete batch, the balance check of a million accounts) is sent as
/// several. CockroachDB refuses any client message over
/// `sql.conn.max_read_buffer_message_size`, 16 MiB by default
/// (cockroachdb/cockroach#63782), and ids travel in one array parameter of
/// 20 bytes each (16 for the UUID, 4 for its length): 50,000 of them are
/// about 1 MB, whatever `--accounts` or `--rows-per-transaction` says.
pub const IDS_PER_STATEMENT: usize = 50_000;

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BankError {
    /// An account the operation needs is not there.
    #[error("account {0} does not exist")]
    AccountNotFound(Uuid),
    /// The source account cannot cover the amount.
    #[error("account {id} holds {balance}, less than the {amount} to transfer")]
    InsufficientFunds {
        /// The source account.
        id: Uuid,
        /// Its balance.
        balance: i64,
        /// The amount asked for.
        amount: i64,
    },
    /// A transfer needs two different accounts.
    #[error("cannot transfer from account {0} to itself")]
    SameAccount(Uuid),
    /// A fixed amount must move something, and forwards.
    #[error("cannot transfer {0}: the amount must be at least 1")]
    NotPositive(i64),
    /// Rows with this run's ids are in the table with other balances: not
    /// this run's earlier attempt, someone else's rows.
    #[error("accounts with this run's ids exist with other balances (account {0}); use another seed, or none")]
    NotOurs(Uuid),
    /// The database refused or failed. Its own message, and its source, so
    /// that the retry helper finds it (a transparent variant would hide
    /// it).
    #[error("{0}")]
    Database(#[from] diesel::result::Error),
}

/// Says at debug level (`-v`) how a commit in doubt of `phase` ended.
pub fn log_doubt(phase: &str, doubt: Option<Resolution>) {
    match doubt {
        Some(Resolution::AppliedEarlier) => tracing::debug!(
            "{phase}: the commit was in doubt; the retry found it applied by the earlier attempt"
        ),
        Some(Resolution::AppliedNow) => tracing::debug!(
            "{phase}: the commit was in doubt; the earlier attempt had not applied it, the retry did"
        ),
        _ => {}
    }
}

/// How much a transfer moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Amount {
    /// `floor(source balance / 2)`, read inside the transaction, as the tutorial does.
    HalfOfSource,
    /// A fixed amount, at least 1 ([`transfer`] refuses others).
    Exactly(i64),
}

/// A committed transfer, as the transaction saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transfer {
    /// Its key in the ledger, drawn before the transaction.
    pub key: Uuid,
    /// The source before the transfer.
    pub from: Account,
    /// The destination before the transfer.
    pub to: Account,
    /// What moved.
    pub amount: i64,
    /// The source after the transfer.
    pub from_after: Account,
    /// The destination after the transfer.
    pub to_after: Account,
}
