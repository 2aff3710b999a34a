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

/// A value out of range. The messages name the flag, since a command line
/// is where these values come from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// `--accounts`.
    #[error(
        "--accounts {0} is out of range: it must be between {min} (the transfer needs two accounts) \
         and {max} (every id is kept in memory)",
        min = ACCOUNTS.start(),
        max = ACCOUNTS.end()
    )]
    Accounts(i128),
    /// `--delete`.
    #[error("--delete {delete} is out of range: it must be between 1 and the {accounts} accounts created")]
    Delete {
        /// What was asked for.
        delete: i128,
        /// The accounts the run creates.
        accounts: u64,
    },
    /// `--rows-per-insert`.
    #[error(
        "--rows-per-insert {0} is out of range: it must be between 1 and {MAX_ROWS_PER_INSERT} \
         (each row binds 2 of the 65535 parameters a statement may have)"
    )]
    RowsPerInsert(i128),
    /// `--rows-per-transaction`.
    #[error(
        "--rows-per-transaction {0} is out of range: it must be between 1 and \
         {MAX_ROWS_PER_TRANSACTION} (a batch is built in memory)"
    )]
    RowsPerTransaction(i128),
    /// `--workers`.
    #[error(
        "--workers {0} is out of range: it must be between {min} and {max}",
        min = WORKERS.start(),
        max = WORKERS.end()
    )]
    Workers(i128),
    /// `--transfers`.
    #[error("--transfers {0} is out of range: it must be at least 1")]
    Transfers(i128),
}

/// Checks `value` against `range`, or says which flag is wrong and how.
fn within(
    value: i128,
    range: RangeInclusive<u64>,
    error: impl Fn(i128) -> PlanError,
) -> Result<u64, PlanError> {
    u64::try_from(value)
        .ok()
        .filter(|v| range.contains(v))
        .ok_or_else(|| error(value))
}

fn to_usize(value: u64, original: i128, error: fn(i128) -> PlanError) -> Result<usize, PlanError> {
    usize::try_from(value).map_err(|_| error(original))
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
    /// [`PlanError::RowsPerInsert`] or [`PlanError::RowsPerTransaction`].
    pub fn new(rows_per_insert: i128, rows_per_transaction: i128) -> Result<Self, PlanError> {
        let max_insert = MAX_ROWS_PER_INSERT as u64;
        let max_tx = MAX_ROWS_PER_TRANSACTION as u64;
        let insert = within(rows_per_insert, 1..=max_insert, PlanError::RowsPerInsert)?;
        let tx = within(
            rows_per_transaction,
            1..=max_tx,
            PlanError::RowsPerTransaction,
        )?;
        Ok(Self {
            rows_per_insert: to_usize(insert, rows_per_insert, PlanError::RowsPerInsert)?,
            rows_per_transaction: to_usize(
                tx,
                rows_per_transaction,
                PlanError::RowsPerTransaction,
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
    /// [`PlanError::Accounts`] or [`PlanError::Delete`].
    pub fn new(accounts: i128, delete: i128, batches: Batches) -> Result<Self, PlanError> {
        let created = within(accounts, ACCOUNTS, PlanError::Accounts)?;
        let doomed = within(delete, 1..=created, |delete| PlanError::Delete {
            delete,
            accounts: created,
        })?;
        Ok(Self {
            accounts: to_usize(created, accounts, PlanError::Accounts)?,
            // At most `accounts`, which fits.
            delete: to_usize(doomed, accounts, PlanError::Accounts)?,
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
    /// [`PlanError::Transfers`].
    pub fn transfers(transfers: i128) -> Result<Self, PlanError> {
        within(transfers, 1..=u64::MAX, PlanError::Transfers).map(Length::Transfers)
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
    /// [`PlanError::Workers`] or [`PlanError::Accounts`].
    pub fn new(
        workers: i128,
        accounts: i128,
        length: Length,
        seed: Option<u64>,
    ) -> Result<Self, PlanError> {
        let threads = within(workers, WORKERS, PlanError::Workers)?;
        let created = within(accounts, ACCOUNTS, PlanError::Accounts)?;
        Ok(Self {
            workers: to_usize(threads, workers, PlanError::Workers)?,
            accounts: to_usize(created, accounts, PlanError::Accounts)?,
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

    #[test]
    fn a_plan_refuses_every_value_out_of_range_naming_it() {
        let batches = Batches::default();
        assert_eq!(Plan::new(1, 1, batches), Err(PlanError::Accounts(1)));
        assert_eq!(Plan::new(-3, 1, batches), Err(PlanError::Accounts(-3)));
        let huge = i128::from(u64::MAX);
        assert_eq!(Plan::new(huge, 1, batches), Err(PlanError::Accounts(huge)));
        assert_eq!(
            Plan::new(10, 11, batches),
            Err(PlanError::Delete {
                delete: 11,
                accounts: 10
            })
        );
        assert_eq!(
            Plan::new(10, 0, batches),
            Err(PlanError::Delete {
                delete: 0,
                accounts: 10
            })
        );
        let plan = Plan::new(2, 2, batches).unwrap();
        assert_eq!((plan.accounts(), plan.delete()), (2, 2));
        assert!(Plan::new(100_000_000, 5, batches).is_ok());
        assert_eq!(
            Plan::new(100_000_001, 5, batches),
            Err(PlanError::Accounts(100_000_001))
        );
    }

    #[test]
    fn batches_and_settings_refuse_values_out_of_range() {
        assert_eq!(Batches::new(0, 1), Err(PlanError::RowsPerInsert(0)));
        assert_eq!(
            Batches::new(32_768, 1),
            Err(PlanError::RowsPerInsert(32_768))
        );
        assert_eq!(Batches::new(1, -1), Err(PlanError::RowsPerTransaction(-1)));
        assert!(Batches::new(32_767, 1_000_000).is_ok());
        let length = Length::transfers(5).unwrap();
        assert_eq!(Length::transfers(0), Err(PlanError::Transfers(0)));
        assert_eq!(
            Settings::new(5_000_000_000, 10, length, None),
            Err(PlanError::Workers(5_000_000_000))
        );
        assert_eq!(
            Settings::new(0, 10, length, None),
            Err(PlanError::Workers(0))
        );
        assert_eq!(
            Settings::new(4, 1, length, None),
            Err(PlanError::Accounts(1))
        );
    }

    #[test]
    fn messages_name_the_flag_the_value_and_the_range() {
        assert_eq!(
            PlanError::Accounts(-3).to_string(),
            "--accounts -3 is out of range: it must be between 2 (the transfer needs two accounts) \
             and 100000000 (every id is kept in memory)"
        );
        assert_eq!(
            PlanError::Workers(5_000_000_000).to_string(),
            "--workers 5000000000 is out of range: it must be between 1 and 1024"
        );
    }
}
