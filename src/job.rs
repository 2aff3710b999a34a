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
use crate::create::{create_accounts, explain_repeated_seed, Created, LIST_LIMIT};
use crate::models::Account;
use crate::plan::Plan;
use crate::teller::Teller;
use crate::watchdog::Watchdog;

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
    teller: &Teller<'_>,
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
    let created = create_accounts(teller, watchdog, &mut rng, total, plan.batches(), |rows| {
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
    })
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
    // The transfer's ledger key, drawn before the helper like the ids: a
    // retry after a commit in doubt finds it instead of moving money twice.
    let key = uuid::Builder::from_random_bytes(rng.random()).into_uuid();
    let watch = watchdog.watch("transferring funds", teller.retrier());
    let done = teller
        .transfer(key, from, to, Amount::HalfOfSource)
        .context("transferring funds")?;
    drop(watch);
    bank::log_doubt("transferring funds", done.doubt());
    retries += done.retries();
    let transfer = done.into_value().into_inner();
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
        let _watch = watchdog.watch("deleting accounts", teller.retrier());
        let done = teller.delete(batch).with_context(|| {
            format!(
                "deleting accounts ({} deleted and committed before this)",
                deleted.len()
            )
        })?;
        retries += done.retries();
        bank::log_doubt("deleting accounts", done.doubt());
        let batch_deleted = done.into_value().into_inner();
        if deleted.is_empty() {
            writeln!(out, "Deleting existing accounts...")?;
        }
        if list {
            for id in &batch_deleted {
                writeln!(out, "Deleted account {id}.")?;
            }
        }
        // What committed is on stdout before the next batch begins, so a
        // run that dies later still shows it.
        out.flush()?;
        deleted.extend(batch_deleted);
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
