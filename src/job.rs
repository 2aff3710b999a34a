//! The main job, the tutorial's `main.py`: create accounts, transfer between
//! two of them, delete a few. Each phase runs in the retry helper and prints
//! only after its transaction committed, from what the committed attempt
//! returned.

use std::io::Write;

use anyhow::{anyhow, Context};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

use crate::bank::{self, Amount, Transfer};
use crate::db::PgPool;
use crate::models::Account;
use crate::plan::{Batches, Plan};
use crate::watchdog::Watchdog;
use diesel_tx_retry::{Retrier, TxOptions};

/// Up to this many accounts, each one gets its line as in the tutorial;
/// beyond it (or with `--quiet`) one summary line stands for them.
pub const LIST_LIMIT: usize = 1_000;

/// Accounts created and committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    /// Their ids, in creation order: 16 bytes an account is all the later
    /// phases need, even at millions of accounts.
    pub ids: Vec<Uuid>,
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
    pool: &PgPool,
    retrier: &Retrier,
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
        // same ones and what is printed matches the database.
        let _watch = watchdog.watch("creating accounts", retrier.policy());
        let done = retrier
            .run(pool, TxOptions::default(), |conn| {
                bank::insert_accounts(conn, &rows, batches.rows_per_insert())
            })
            .with_context(|| {
                format!(
                    "creating accounts ({} created and committed before this)",
                    created.ids.len()
                )
            })?;
        created.retries += done.retries();
        on_commit(&rows)?;
        created.total_balance += rows.iter().map(|a| a.balance).sum::<i64>();
        created.ids.extend(rows.iter().map(|a| a.id));
        progress.inc(rows.len() as u64);
    }
    progress.finish_and_clear();
    Ok(created)
}

/// What the main job did, for callers that check it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The accounts created.
    pub created: Created,
    /// The transfer as committed.
    pub transfer: Transfer,
    /// The ids deleted.
    pub deleted: Vec<Uuid>,
    /// Retries across all transactions.
    pub retries: u32,
}

/// Runs the three phases, writing the tutorial's lines to `out`.
///
/// # Errors
/// The first phase that fails, with context saying which.
pub fn run(
    pool: &PgPool,
    retrier: &Retrier,
    watchdog: &Watchdog,
    plan: Plan,
    out: &mut dyn Write,
) -> anyhow::Result<Report> {
    let mut rng = match plan.seed() {
        Some(seed) => StdRng::seed_from_u64(seed),
        None => StdRng::from_os_rng(),
    };
    let total = plan.accounts();
    let list = !plan.is_quiet() && total <= LIST_LIMIT;
    let mut header = false;
    let created = create_accounts(
        pool,
        retrier,
        watchdog,
        &mut rng,
        total,
        plan.batches(),
        |rows| {
            if !header {
                header = true;
                writeln!(out, "Creating new accounts...")?;
            }
            if list {
                for account in rows {
                    writeln!(
                        out,
                        "Created new account with id {} and balance {}.",
                        account.id, account.balance
                    )?;
                }
            }
            // What committed is on stdout before the next batch begins.
            out.flush()
        },
    )
    .map_err(|err| explain_repeated_seed(err, plan.seed()))?;
    if !list {
        writeln!(
            out,
            "Created {total} new accounts with balances totalling {}.",
            created.total_balance
        )?;
    }
    let mut retries = created.retries;

    let from = rng.random_range(0..total);
    let to = (from + rng.random_range(1..total)) % total;
    let (from, to) = (created.ids[from], created.ids[to]);
    let watch = watchdog.watch("transferring funds", retrier.policy());
    let done = retrier
        .run(pool, TxOptions::default(), |conn| {
            bank::transfer(conn, from, to, Amount::HalfOfSource)
        })
        .context("transferring funds")?;
    drop(watch);
    retries += done.retries();
    let transfer = done.value;
    writeln!(out, "Random account balances:")?;
    account_line(out, &transfer.from)?;
    account_line(out, &transfer.to)?;
    writeln!(
        out,
        "Transferring {} from account {} to account {}...",
        transfer.amount, from, to
    )?;
    writeln!(out, "Transfer complete.")?;
    writeln!(out, "New balances:")?;
    account_line(out, &transfer.from_after)?;
    account_line(out, &transfer.to_after)?;
    out.flush()?;

    let doomed: Vec<Uuid> = rand::seq::index::sample(&mut rng, total, plan.delete())
        .into_iter()
        .map(|i| created.ids[i])
        .collect();
    let list = !plan.is_quiet() && doomed.len() <= LIST_LIMIT;
    let mut deleted = Vec::with_capacity(doomed.len());
    // In batches, one transaction each, as creation goes: a transaction that
    // held every row lock at once would block everything else for as long.
    for batch in doomed.chunks(plan.batches().rows_per_transaction()) {
        let _watch = watchdog.watch("deleting accounts", retrier.policy());
        let done = retrier
            .run(pool, TxOptions::default(), |conn| {
                bank::delete_accounts(conn, batch)
            })
            .with_context(|| {
                format!(
                    "deleting accounts ({} deleted and committed before this)",
                    deleted.len()
                )
            })?;
        retries += done.retries();
        if deleted.is_empty() {
            writeln!(out, "Deleting existing accounts...")?;
        }
        if list {
            for id in &done.value {
                writeln!(out, "Deleted account {id}.")?;
            }
        }
        // What committed is on stdout before the next batch begins, so a
        // run that dies later still shows it.
        out.flush()?;
        deleted.extend(done.value);
    }
    if !list {
        writeln!(out, "Deleted {} accounts.", deleted.len())?;
    }
    out.flush()?;

    Ok(Report {
        created,
        transfer,
        deleted,
        retries,
    })
}

fn account_line(out: &mut dyn Write, account: &Account) -> std::io::Result<()> {
    writeln!(out, "Account {}: {}", account.id, account.balance)
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
pub(crate) fn explain_repeated_seed(err: anyhow::Error, seed: Option<u64>) -> anyhow::Error {
    use diesel::result::{DatabaseErrorKind, Error as DieselError};
    use diesel_tx_retry::TxError;
    let duplicate = err.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<TxError<DieselError>>(),
            Some(TxError::Failed(DieselError::DatabaseError(
                DatabaseErrorKind::UniqueViolation,
                _
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
