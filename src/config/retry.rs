//! The flags every command shares: the retry helper's budgets and policy,
//! the pool's waits and lifetimes, the watchdog's slack.

use std::time::Duration;

use clap::{Args, ValueEnum};

use super::values::{in_range, parse_millis, parse_seconds};
use diesel_tx_retry::{Backoff, Isolation, Retrier, RetryBudget};

/// The pool's waits and lifetimes and the watchdog's slack, shared by
/// every command.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Wait at most this many seconds for a connection from the pool (a
    /// server restarting, or gone) before the transaction fails.
    #[arg(long, value_name = "SECONDS", global = true, default_value = "15", value_parser = parse_seconds, allow_negative_numbers = true)]
    pub pool_timeout: Duration,

    /// Close each pooled connection between transactions once it is this
    /// many seconds old, give or take a tenth (CockroachDB's advice: 5 to
    /// 30 minutes, with jitter, so that load rebalances across nodes and a
    /// drain finds no old connections).
    #[arg(long, value_name = "SECONDS", global = true, default_value = "300", value_parser = parse_seconds, allow_negative_numbers = true)]
    pub max_conn_lifetime: Duration,

    /// End the run this many seconds after a transaction outlived its
    /// deadline and one statement's wait: the server is not answering (a
    /// frozen process, a stalled disk).
    #[arg(long, value_name = "SECONDS", global = true, default_value = "5", value_parser = parse_seconds, allow_negative_numbers = true)]
    pub watchdog_slack: Duration,
}

/// The retry helper's budgets, shared by every command.
#[derive(Debug, Clone, Args)]
pub struct RetryArgs {
    /// Retries allowed after the first attempt of each transaction.
    #[arg(long, value_name = "N", global = true, default_value = "10", value_parser = clap::builder::TypedValueParser::map(in_range(0..=u64::from(u32::MAX - 1)), |n| u32::try_from(n).unwrap_or(u32::MAX - 1)), allow_negative_numbers = true)]
    pub max_retries: u32,

    /// No statement waits longer than this many seconds (a lock, a slow
    /// query), and no session the app lost stays open in a transaction
    /// longer: the server-side statement_timeout and
    /// idle_in_transaction_session_timeout, unless the URL's options set them.
    #[arg(long, value_name = "SECONDS", global = true, default_value = "20", value_parser = parse_seconds, allow_negative_numbers = true)]
    pub statement_timeout: Duration,

    /// Give up on a transaction whose retries would start after this many
    /// seconds; no statement of it waits past this either.
    #[arg(long, value_name = "SECONDS", global = true, default_value = "30", value_parser = parse_seconds, allow_negative_numbers = true)]
    pub tx_deadline: Duration,

    /// Ceiling of the first delayed retry's wait, in milliseconds; it doubles per retry.
    #[arg(long, value_name = "MS", global = true, default_value = "2", value_parser = parse_millis, allow_negative_numbers = true)]
    pub backoff_base_ms: Duration,

    /// No wait between retries exceeds this many milliseconds.
    #[arg(long, value_name = "MS", global = true, default_value = "500", value_parser = parse_millis, allow_negative_numbers = true)]
    pub backoff_cap_ms: Duration,

    /// Wait before the first retry too, instead of retrying at once.
    #[arg(long, global = true)]
    pub delay_first_retry: bool,

    /// The process's retry budget: retries may add RATIO times the load of
    /// first attempts (0.5: half again), plus 10 a second, across every
    /// transaction of the run; "off" leaves only each transaction's own
    /// limits. A retry the budget refuses gives the transaction up.
    #[arg(long, value_name = "RATIO", global = true, default_value = "0.5", value_parser = parse_retry_budget)]
    pub retry_budget: RetryBudgetChoice,

    /// Retry protocol: savepoint (CockroachDB's), restart (PostgreSQL's), or auto by server.
    #[arg(long, value_name = "PROTOCOL", global = true, default_value = "auto")]
    pub protocol: ProtocolChoice,

    /// Isolation level of every transaction: serializable (CockroachDB's
    /// default and advice), or read-committed (CockroachDB 24.1+, with its
    /// transfers' reads locking what they read).
    #[arg(
        long,
        value_name = "LEVEL",
        global = true,
        default_value = "serializable"
    )]
    pub isolation: IsolationChoice,
}

/// `--retry-budget`: a ratio, or off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RetryBudgetChoice {
    /// Retries may add this share of the first attempts' load.
    Ratio(f64),
    /// No process-wide budget.
    Off,
}

fn parse_retry_budget(text: &str) -> Result<RetryBudgetChoice, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("off") {
        return Ok(RetryBudgetChoice::Off);
    }
    match text.parse::<f64>() {
        Ok(ratio) if (0.0..=100.0).contains(&ratio) => Ok(RetryBudgetChoice::Ratio(ratio)),
        _ => Err("must be a ratio between 0 and 100, like 0.5, or off".into()),
    }
}

impl RetryArgs {
    /// The helper these flags describe, for a server not yet named.
    pub fn retrier(&self) -> Retrier {
        let backoff = Backoff::exponential(self.backoff_base_ms, self.backoff_cap_ms);
        let retrier = match self.retry_budget {
            RetryBudgetChoice::Ratio(ratio) => {
                Retrier::default().with_retry_budget(RetryBudget::new(ratio))
            }
            RetryBudgetChoice::Off => Retrier::default(),
        };
        retrier
            .with_max_attempts(self.max_retries.saturating_add(1))
            .with_deadline(self.tx_deadline)
            .with_statement_timeout(self.statement_timeout)
            .with_backoff(if self.delay_first_retry {
                backoff.delay_first_retry()
            } else {
                backoff
            })
            .with_isolation(self.isolation.into())
    }
}

/// `--isolation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IsolationChoice {
    /// SERIALIZABLE.
    Serializable,
    /// READ COMMITTED.
    ReadCommitted,
}

impl From<IsolationChoice> for Isolation {
    fn from(choice: IsolationChoice) -> Self {
        match choice {
            IsolationChoice::Serializable => Isolation::Serializable,
            IsolationChoice::ReadCommitted => Isolation::ReadCommitted,
        }
    }
}

/// `--protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProtocolChoice {
    /// Savepoint on CockroachDB, restart elsewhere.
    Auto,
    /// CockroachDB's `SAVEPOINT cockroach_restart` protocol.
    Savepoint,
    /// Roll back and begin again.
    Restart,
}
