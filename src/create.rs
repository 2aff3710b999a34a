//! Creating accounts in batches, one retried transaction each, with a
//! progress bar for large runs: what the main job and the workload both do
//! first.

use anyhow::{anyhow, Context};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::Rng;
use uuid::Uuid;

use crate::models::Account;
use crate::plan::Batches;
use crate::teller::Teller;
use crate::watchdog::Watchdog;

/// Up to this many accounts, each one gets its line as in the tutorial;
/// beyond it (or with `--quiet`) one summary line stands for them.
pub const LIST_LIMIT: usize = 1_000;

/// Accounts created and committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    /// Their ids, in creation order: 16 bytes an account is all the later
    /// phases need, even at millions of accounts.
    pub ids: Vec<Uuid>,
    /// Their initial balances, in the same order.
    pub balances: Vec<i64>,
    /// The sum of their initial balances.
    pub total_balance: i64,
    /// Retries across the creating transactions.
    pub retries: u32,
}

/// Creates `total` accounts, one retried transaction per batch, and calls
/// `on_commit` with each batch once it committed. Shows a progress bar on
/// stderr for large runs when stderr is a terminal.
///
/// # Errors
/// The first batch that fails, or `on_commit`'s error.
pub fn create_accounts(
    teller: &Teller<'_>,
    watchdog: &Watchdog,
    rng: &mut StdRng,
    total: usize,
    batches: Batches,
    mut on_commit: impl FnMut(&[Account]) -> std::io::Result<()>,
) -> anyhow::Result<Created> {
    let progress = if total > LIST_LIMIT {
        ProgressBar::new(total as u64)
    } else {
        ProgressBar::hidden()
    };
    progress.set_style(
        ProgressStyle::with_template(
            "{msg} {wide_bar} {human_pos}/{human_len} accounts, eta {eta}",
        )
        .expect("the template is valid"),
    );
    progress.set_message("creating");
    let mut created = Created {
        ids: Vec::with_capacity(total),
        balances: Vec::with_capacity(total),
        total_balance: 0,
        retries: 0,
    };
    while created.ids.len() < total {
        let rows: Vec<Account> = (0..batches
            .rows_per_transaction()
            .min(total - created.ids.len()))
            .map(|_| new_account(rng))
            .collect();
        // The rows are drawn before the transaction, so a retry inserts the
        // same ones and what is printed matches the database; their ids make
        // the batch idempotent: a retry after a commit in doubt meets the
        // rows the earlier attempt committed instead of inserting them again.
        // The first attempt inserts plainly, so that a repeated --seed is a
        // definite duplicate, as it should be.
        let _watch = watchdog.watch("creating accounts", teller.retrier());
        let done = teller
            .create(&rows, batches.rows_per_insert())
            .with_context(|| {
                format!(
                    "creating accounts ({} created and committed before this)",
                    created.ids.len()
                )
            })?;
        created.retries += done.retries();
        crate::bank::log_doubt("creating accounts", done.doubt());
        on_commit(&rows)?;
        created.total_balance += rows.iter().map(|a| a.balance).sum::<i64>();
        created.ids.extend(rows.iter().map(|a| a.id));
        created.balances.extend(rows.iter().map(|a| a.balance));
        progress.inc(rows.len() as u64);
    }
    progress.finish_and_clear();
    Ok(created)
}

/// A random v4 id and a balance of `floor(random * 1_000_000)`, which is a
/// uniform whole number below 1,000,000.
fn new_account(rng: &mut StdRng) -> Account {
    Account {
        id: uuid::Builder::from_random_bytes(rng.random()).into_uuid(),
        balance: rng.random_range(0..1_000_000),
    }
}

/// A clearer error for a seeded run whose ids are already in the table.
pub fn explain_repeated_seed(err: anyhow::Error, seed: Option<u64>) -> anyhow::Error {
    use diesel::result::{DatabaseErrorKind, Error as DieselError};
    use diesel_tx_retry::TxError;
    let duplicate = err.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<TxError<crate::bank::BankError>>(),
            Some(TxError::Failed(crate::bank::BankError::Database(
                DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, _)
            )))
        )
    });
    match seed {
        Some(seed) if duplicate => anyhow!(
            "creating accounts: the accounts of --seed {seed} are already in the table \
             (the same seed gives the same ids); use another seed, or none"
        ),
        _ => err,
    }
}
