//! What a run is asked to do, checked once: the main job's [`Plan`] and its
//! [`Batches`], the workload's [`Settings`]. None of them can be built out of
//! range, so the code that runs them checks nothing again.

use std::ops::RangeInclusive;
use std::time::Duration;

use crate::bank::{MAX_ROWS_PER_INSERT, ROWS_PER_INSERT};

/// Accounts one run may create: two for the transfer, and at most as many
/// ids as are sensible to keep in memory (16 bytes each, 1.6 GB at the top)
/// for the phases after creation.
pub const ACCOUNTS: RangeInclusive<u64> = 2..=100_000_000;

/// Accounts created per transaction by default. CockroachDB advises
/// keeping transactions small (a large one holds its intents longer,
/// conflicts more, and costs more to retry); past 10,000 rows bigger
/// transactions no longer save time here (bench/RESULTS.md has the sweep).
pub const ROWS_PER_TRANSACTION: usize = 10_000;

/// Rows per transaction at most: a batch is built in memory first.
pub const MAX_ROWS_PER_TRANSACTION: usize = 1_000_000;

/// Worker threads the workload may run, each with its own connection.
pub const WORKERS: RangeInclusive<u64> = 1..=1_024;

/// The counts a run is asked for, each with its range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    /// Accounts to create.
    Accounts,
    /// Accounts to delete at the end of the main job.
    Delete,
    /// Rows per multi-row `INSERT`.
    RowsPerInsert,
    /// Rows per transaction when creating accounts.
    RowsPerTransaction,
    /// The workload's workers.
    Workers,
    /// The workload's transfers in all.
    Transfers,
}

impl Count {
    /// What the plan calls it.
    pub fn name(self) -> &'static str {
        match self {
            Count::Accounts => "accounts",
            Count::Delete => "accounts to delete",
            Count::RowsPerInsert => "rows per insert",
            Count::RowsPerTransaction => "rows per transaction",
            Count::Workers => "workers",
            Count::Transfers => "transfers",
        }
    }
}

/// A count out of its range, in the plan's words; the command line puts
/// its flag's name in place of [`Count::name`] (`config`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{} {value} is out of range: {}", count.name(), self.rule())]
pub struct PlanError {
    /// Which count.
    pub count: Count,
    /// What was asked for.
    pub value: u64,
    /// The accounts the run creates (the bound of [`Count::Delete`]).
    created: u64,
}

impl PlanError {
    fn new(count: Count, value: u64) -> Self {
        Self {
            count,
            value,
            created: 0,
        }
    }

    /// The range, and why it is what it is.
    pub fn rule(&self) -> String {
        match self.count {
            Count::Accounts => format!(
                "it must be between {} (the transfer needs two accounts) and {} (every id is kept in memory)",
                ACCOUNTS.start(),
                ACCOUNTS.end()
            ),
            Count::Delete => format!(
                "it must be between 1 and the {} accounts created",
                self.created
            ),
            Count::RowsPerInsert => format!(
                "it must be between 1 and {MAX_ROWS_PER_INSERT} (each row binds 2 of the 65535 \
                 parameters a statement may have)"
            ),
            Count::RowsPerTransaction => format!(
                "it must be between 1 and {MAX_ROWS_PER_TRANSACTION} (a batch is built in memory)"
            ),
            Count::Workers => format!(
                "it must be between {} and {}",
                WORKERS.start(),
                WORKERS.end()
            ),
            Count::Transfers => "it must be at least 1".to_owned(),
        }
    }
}

/// `value` as a `usize` if it is within `range`.
fn within(value: u64, range: RangeInclusive<u64>, count: Count) -> Result<usize, PlanError> {
    range
        .contains(&value)
        .then(|| usize::try_from(value).ok())
        .flatten()
        .ok_or(PlanError::new(count, value))
}

/// How account creation is batched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batches {
    rows_per_insert: usize,
    rows_per_transaction: usize,
}

impl Batches {
    /// Rows per multi-row `INSERT` and rows per transaction.
    ///
    /// # Errors
    /// [`Count::RowsPerInsert`] or [`Count::RowsPerTransaction`] out of
    /// range.
    pub fn new(rows_per_insert: u64, rows_per_transaction: u64) -> Result<Self, PlanError> {
        Ok(Self {
            rows_per_insert: within(
                rows_per_insert,
                1..=MAX_ROWS_PER_INSERT as u64,
                Count::RowsPerInsert,
            )?,
            rows_per_transaction: within(
                rows_per_transaction,
                1..=MAX_ROWS_PER_TRANSACTION as u64,
                Count::RowsPerTransaction,
            )?,
        })
    }

    /// Rows per multi-row `INSERT`.
    pub fn rows_per_insert(&self) -> usize {
        self.rows_per_insert
    }

    /// Rows per transaction.
    pub fn rows_per_transaction(&self) -> usize {
        self.rows_per_transaction
    }
}

impl Default for Batches {
    fn default() -> Self {
        Self {
            rows_per_insert: ROWS_PER_INSERT,
            rows_per_transaction: ROWS_PER_TRANSACTION,
        }
    }
}

/// What the main job is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    accounts: usize,
    delete: usize,
    seed: Option<u64>,
    quiet: bool,
    batches: Batches,
}

impl Plan {
    /// Create `accounts` accounts, transfer between two, delete `delete`.
    ///
    /// # Errors
    /// [`Count::Accounts`] or [`Count::Delete`] out of range.
    pub fn new(accounts: u64, delete: u64, batches: Batches) -> Result<Self, PlanError> {
        let created = within(accounts, ACCOUNTS, Count::Accounts)?;
        let delete = within(delete, 1..=accounts, Count::Delete).map_err(|err| PlanError {
            created: accounts,
            ..err
        })?;
        Ok(Self {
            accounts: created,
            delete,
            seed: None,
            quiet: false,
            batches,
        })
    }

    /// The same plan with every random choice drawn from `seed`.
    pub fn seeded(self, seed: Option<u64>) -> Self {
        Self { seed, ..self }
    }

    /// The same plan, printing one summary line for the created accounts.
    pub fn quiet(self, quiet: bool) -> Self {
        Self { quiet, ..self }
    }

    /// Accounts to create, at least 2.
    pub fn accounts(&self) -> usize {
        self.accounts
    }

    /// Accounts to delete, at least 1 and at most [`Plan::accounts`].
    pub fn delete(&self) -> usize {
        self.delete
    }

    /// The seed, if any.
    pub fn seed(&self) -> Option<u64> {
        self.seed
    }

    /// Whether to print one summary line instead of a line per account.
    pub fn is_quiet(&self) -> bool {
        self.quiet
    }

    /// How creation is batched.
    pub fn batches(&self) -> Batches {
        self.batches
    }
}

/// When the workload stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Length {
    /// After this many transfers in all.
    Transfers(u64),
    /// After this long.
    Duration(Duration),
}

impl Length {
    /// After `transfers` transfers.
    ///
    /// # Errors
    /// [`Count::Transfers`] out of range (none).
    pub fn transfers(transfers: u64) -> Result<Self, PlanError> {
        if transfers == 0 {
            return Err(PlanError::new(Count::Transfers, transfers));
        }
        Ok(Length::Transfers(transfers))
    }
}

/// What the workload is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    workers: usize,
    accounts: usize,
    length: Length,
    seed: Option<u64>,
}

impl Settings {
    /// `workers` threads transferring among `accounts` accounts until
    /// `length` is reached.
    ///
    /// # Errors
    /// [`Count::Workers`] or [`Count::Accounts`] out of range.
    pub fn new(
        workers: u64,
        accounts: u64,
        length: Length,
        seed: Option<u64>,
    ) -> Result<Self, PlanError> {
        Ok(Self {
            workers: within(workers, WORKERS, Count::Workers)?,
            accounts: within(accounts, ACCOUNTS, Count::Accounts)?,
            length,
            seed,
        })
    }

    /// Threads, each with its own pooled connection.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Accounts to create and transfer between, at least 2.
    pub fn accounts(&self) -> usize {
        self.accounts
    }

    /// When to stop.
    pub fn length(&self) -> Length {
        self.length
    }

    /// Seed for the accounts and every worker's choices.
    pub fn seed(&self) -> Option<u64> {
        self.seed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(count: Count, value: u64) -> Result<(), PlanError> {
        Err(PlanError::new(count, value))
    }

    #[test]
    fn a_plan_refuses_every_value_out_of_range_naming_it() {
        let batches = Batches::default();
        let plan = |a, d| Plan::new(a, d, batches).map(drop);
        assert_eq!(plan(1, 1), out(Count::Accounts, 1));
        assert_eq!(plan(u64::MAX, 1), out(Count::Accounts, u64::MAX));
        let delete = |value| {
            Err(PlanError {
                count: Count::Delete,
                value,
                created: 10,
            })
        };
        assert_eq!(plan(10, 11), delete(11));
        assert_eq!(plan(10, 0), delete(0));
        let two = Plan::new(2, 2, batches).unwrap();
        assert_eq!((two.accounts(), two.delete()), (2, 2));
        assert!(plan(100_000_000, 5).is_ok());
        assert_eq!(plan(100_000_001, 5), out(Count::Accounts, 100_000_001));
    }

    #[test]
    fn batches_and_settings_refuse_values_out_of_range() {
        let batches = |i, t| Batches::new(i, t).map(drop);
        assert_eq!(batches(0, 1), out(Count::RowsPerInsert, 0));
        assert_eq!(batches(32_768, 1), out(Count::RowsPerInsert, 32_768));
        assert_eq!(batches(1, 0), out(Count::RowsPerTransaction, 0));
        assert!(batches(32_767, 1_000_000).is_ok());
        assert_eq!(Length::transfers(0).map(drop), out(Count::Transfers, 0));
        let length = Length::transfers(5).unwrap();
        let settings = |w, a| Settings::new(w, a, length, None).map(drop);
        assert_eq!(
            settings(5_000_000_000, 10),
            out(Count::Workers, 5_000_000_000)
        );
        assert_eq!(settings(0, 10), out(Count::Workers, 0));
        assert_eq!(settings(4, 1), out(Count::Accounts, 1));
    }

    #[test]
    fn messages_speak_of_the_plan_the_value_and_the_range() {
        assert_eq!(
            PlanError::new(Count::Accounts, 1).to_string(),
            "accounts 1 is out of range: it must be between 2 (the transfer needs two accounts) \
             and 100000000 (every id is kept in memory)"
        );
        assert_eq!(
            Plan::new(5, 6, Batches::default()).unwrap_err().to_string(),
            "accounts to delete 6 is out of range: it must be between 1 and the 5 accounts created"
        );
        assert_eq!(
            PlanError::new(Count::Workers, 5_000_000_000).to_string(),
            "workers 5000000000 is out of range: it must be between 1 and 1024"
        );
    }
}
