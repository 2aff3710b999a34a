//! The main job, the tutorial's `main.py`: create accounts, transfer between
//! two of them, delete a few. Each phase runs in the retry helper and prints
//! only after its transaction committed, from what the committed attempt
//! returned.

use std::io::Write;

use anyhow::Context;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

use crate::bank::{self, Amount, Transfer};
use crate::models::Account;
use crate::retry::{PgPool, Retrier, TxOptions};

/// Accounts created per transaction. CockroachDB advises keeping
/// transactions small (large ones hold intents longer and are retried more
/// expensively); see bench/RESULTS.md for how this size was chosen.
pub const ROWS_PER_TRANSACTION: usize = 10_000;

/// Up to this many accounts, each one gets its line as in the tutorial;
/// beyond it, one summary line stands for them.
pub const LIST_LIMIT: u64 = 1_000;

/// What the main job is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Accounts to create, at least 2.
    pub accounts: u64,
    /// Accounts to delete, at most `accounts`.
    pub delete: u64,
    /// Seed for every random choice.
    pub seed: Option<u64>,
}

/// What the main job did, for callers that check it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Every account created, as committed.
    pub created: Vec<Account>,
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
    plan: Plan,
    out: &mut dyn Write,
) -> anyhow::Result<Report> {
    let mut rng = match plan.seed {
        Some(seed) => StdRng::seed_from_u64(seed),
        None => StdRng::from_os_rng(),
    };
    let total = usize::try_from(plan.accounts)
        .context("--accounts does not fit in memory on this machine")?;
    let mut retries = 0;

    let mut created = Vec::with_capacity(total);
    let mut sum: i64 = 0;
    while created.len() < total {
        let rows: Vec<Account> = (0..ROWS_PER_TRANSACTION.min(total - created.len()))
            .map(|_| new_account(&mut rng))
            .collect();
        // The rows are drawn before the transaction, so a retry inserts the
        // same ones and the printed story matches the database.
        let done = retrier
            .run(pool, TxOptions::default(), |conn| {
                bank::insert_accounts(conn, &rows)
            })
            .context("creating accounts")?;
        retries += done.retries();
        if created.is_empty() {
            writeln!(out, "Creating new accounts...")?;
        }
        if plan.accounts <= LIST_LIMIT {
            for account in &rows {
                writeln!(
                    out,
                    "Created new account with id {} and balance {}.",
                    account.id, account.balance
                )?;
            }
        }
        sum += rows.iter().map(|a| a.balance).sum::<i64>();
        created.extend(rows);
    }
    if plan.accounts > LIST_LIMIT {
        writeln!(
            out,
            "Created {total} new accounts with balances totalling {sum}."
        )?;
    }

    let from = rng.random_range(0..total);
    let to = (from + rng.random_range(1..total)) % total;
    let (from, to) = (created[from].id, created[to].id);
    let done = retrier
        .run(pool, TxOptions::default(), |conn| {
            bank::transfer(conn, from, to, Amount::HalfOfSource)
        })
        .context("transferring funds")?;
    retries += done.retries();
    let transfer = done.value;
    writeln!(out, "Random account balances:")?;
    writeln!(
        out,
        "Account {}: {}",
        transfer.from.id, transfer.from.balance
    )?;
    writeln!(out, "Account {}: {}", transfer.to.id, transfer.to.balance)?;
    writeln!(
        out,
        "Transferring {} from account {} to account {}...",
        transfer.amount, from, to
    )?;
    writeln!(out, "Transfer complete.")?;
    writeln!(out, "New balances:")?;
    writeln!(
        out,
        "Account {}: {}",
        transfer.from_after.id, transfer.from_after.balance
    )?;
    writeln!(
        out,
        "Account {}: {}",
        transfer.to_after.id, transfer.to_after.balance
    )?;

    let doomed: Vec<Uuid> =
        rand::seq::index::sample(&mut rng, total, usize::try_from(plan.delete)?)
            .into_iter()
            .map(|i| created[i].id)
            .collect();
    let done = retrier
        .run(pool, TxOptions::default(), |conn| {
            bank::delete_accounts(conn, &doomed)
        })
        .context("deleting accounts")?;
    retries += done.retries();
    writeln!(out, "Deleting existing accounts...")?;
    for id in &done.value {
        writeln!(out, "Deleted account {id}.")?;
    }
    out.flush()?;

    Ok(Report {
        created,
        transfer,
        deleted: done.value,
        retries,
    })
}

/// A random v4 id and a balance of `floor(random * 1_000_000)`, which is a
/// uniform whole number below 1,000,000.
fn new_account(rng: &mut StdRng) -> Account {
    Account {
        id: uuid::Builder::from_random_bytes(rng.random()).into_uuid(),
        balance: rng.random_range(0..1_000_000),
    }
}
