//! Configuration: the command line (low-level arguments, turned into
//! [`crate::plan`] types by `TryFrom`) and `.env`.

mod dotenv;
mod retry;
mod values;

use std::ffi::OsString;
use std::time::Duration;

use clap::error::ErrorKind;
use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::plan::{Batches, Count, Length, Plan, PlanError, Settings};
use values::{parse_request_timeout, parse_seconds, whole};

pub use dotenv::load_dotenv;
pub use retry::{IsolationChoice, ProtocolChoice, RetryArgs, RetryBudgetChoice, RunArgs};

/// The CockroachDB bank tutorial, in Rust with Diesel.
///
/// With no subcommand: create accounts, transfer between two of them, delete
/// a few, each step in a retried SERIALIZABLE transaction.
#[derive(Debug, Parser)]
#[command(
    name = "bank",
    version,
    about,
    after_help = "Exit status: 0 when everything was done; 2 when a flag, DATABASE_URL or .env \
                  is wrong (nothing was written); 1 when the work failed (connecting, the \
                  database, a transaction)."
)]
pub struct Cli {
    /// Where the database is, e.g. postgresql://root@127.0.0.1:26257/defaultdb?sslmode=disable
    /// (also read from DATABASE_URL and from a .env file).
    #[arg(
        long,
        env = "DATABASE_URL",
        global = true,
        hide_env_values = true,
        value_name = "URL"
    )]
    pub database_url: Option<String>,

    /// Log debug messages (statements, retries) to stderr; RUST_LOG overrides.
    #[arg(short, long, global = true)]
    pub verbose: bool,

    /// Send every statement unnamed, from the start: for a transaction-mode
    /// pooler (PgBouncer), which the app otherwise detects by itself at the
    /// first statement it breaks.
    #[arg(long, global = true)]
    pub unnamed_statements: bool,

    /// Run on the async front end (diesel-async on tokio, bb8 pools): the
    /// main job's three phases, or the workload's workers as tasks on a
    /// runtime of two threads. Connects without TLS (sslmode up to prefer).
    #[arg(long = "async", global = true)]
    pub asynchronous: bool,

    /// Retry budgets.
    #[command(flatten)]
    pub retry: RetryArgs,

    /// Pool waits and lifetimes, the watchdog's slack.
    #[command(flatten)]
    pub run: RunArgs,

    /// Main job sizes.
    #[command(flatten)]
    pub job: JobArgs,

    /// What to run instead of the main job.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Why the command line was refused.
#[derive(Debug)]
pub enum ArgsError {
    /// clap's own refusal, or its help and version text.
    Clap(clap::Error),
    /// A main-job flag given with a subcommand, which would ignore it.
    Misplaced(String),
}

impl ArgsError {
    /// Whether this is `--help` or `--version`, to print as clap does.
    pub fn is_help_or_version(&self) -> bool {
        matches!(self, ArgsError::Clap(err)
            if matches!(err.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion))
    }
}

impl std::fmt::Display for ArgsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ArgsError::Clap(err) => {
                // clap's report spans several lines; what is wrong comes
                // before the first blank line, the usage and tips after it.
                let text = err.render().to_string();
                let what: Vec<&str> = text
                    .lines()
                    .map(str::trim)
                    .take_while(|l| !l.is_empty())
                    .collect();
                let what = what.join(" ");
                write!(
                    f,
                    "{} (see bank --help)",
                    what.trim_start_matches("error: ")
                )
            }
            ArgsError::Misplaced(message) => f.write_str(message),
        }
    }
}

impl Cli {
    /// Parses `args` as clap does, and also refuses main-job flags given
    /// with a subcommand: clap would take them and the subcommand would
    /// silently ignore them.
    ///
    /// # Errors
    /// [`ArgsError`].
    pub fn parse_args<I, T>(args: I) -> Result<Self, ArgsError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let matches = Cli::command()
            .try_get_matches_from(args)
            .map_err(ArgsError::Clap)?;
        let cli = Cli::from_arg_matches(&matches).map_err(ArgsError::Clap)?;
        if let Some((name, _)) = matches.subcommand() {
            let given = JobArgs::ids()
                .into_iter()
                .find(|id| matches.value_source(id) == Some(ValueSource::CommandLine));
            if let Some(id) = given {
                let flag = format!("--{}", id.replace('_', "-"));
                let hint = match (name, id.as_str()) {
                    ("workload", "accounts" | "seed") => {
                        format!("give it after the subcommand: bank workload {flag} ...")
                    }
                    _ => "leave it out".to_owned(),
                };
                return Err(ArgsError::Misplaced(format!(
                    "{flag} is a flag of the main job and does nothing for `bank {name}`; {hint}"
                )));
            }
        }
        Ok(cli)
    }
}

/// Subcommands besides the main job.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or update the schema by applying the embedded migrations
    /// (the same ones `diesel migration run` applies).
    Migrate,
    /// Create accounts, then run random transfers between them from several
    /// threads and report throughput, retries and latency.
    Workload(WorkloadArgs),
}

/// `bank workload`.
#[derive(Debug, Clone, Args)]
#[command(group(clap::ArgGroup::new("length").required(true).args(["transfers", "duration"])))]
pub struct WorkloadArgs {
    /// Threads running transfers, each with its own pooled connection (1 to 1024).
    #[arg(long, value_name = "W", default_value = "4", value_parser = whole(), allow_negative_numbers = true)]
    pub workers: u64,

    /// Accounts to create and transfer between (2 to 100000000).
    #[arg(long, value_name = "A", default_value = "100", value_parser = whole(), allow_negative_numbers = true)]
    pub accounts: u64,

    /// Stop after this many transfers in all (at least 1).
    #[arg(long, value_name = "T", value_parser = whole(), allow_negative_numbers = true)]
    pub transfers: Option<u64>,

    /// Stop after this many seconds.
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds, allow_negative_numbers = true)]
    pub duration: Option<Duration>,

    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,

    /// Seed the random generator.
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,

    /// Serve the retry helper's metrics in Prometheus's text format at
    /// http://ADDR/metrics while the run lasts (port 0 picks a free one,
    /// logged on stderr).
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// With --async: give a transfer up after MS milliseconds, dropping its
    /// call as a service drops a request past its deadline; the report
    /// counts it as cancelled.
    #[arg(long, value_name = "MS", value_parser = parse_request_timeout, allow_negative_numbers = true)]
    pub request_timeout: Option<Duration>,
}

/// A count the plan refused, in the command line's words: its flag in
/// place of the plan's name for it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--{} {} is out of range: {}", flag(self.0.count), self.0.value, self.0.rule())]
pub struct FlagError(pub PlanError);

/// The flag that sets `count`.
fn flag(count: Count) -> &'static str {
    match count {
        Count::Accounts => "accounts",
        Count::Delete => "delete",
        Count::RowsPerInsert => "rows-per-insert",
        Count::RowsPerTransaction => "rows-per-transaction",
        Count::Workers => "workers",
        Count::Transfers => "transfers",
    }
}

impl TryFrom<&WorkloadArgs> for Settings {
    type Error = FlagError;

    fn try_from(args: &WorkloadArgs) -> Result<Self, FlagError> {
        // clap requires exactly one of the two.
        let length = match (args.transfers, args.duration) {
            (Some(transfers), _) => Length::transfers(transfers).map_err(FlagError)?,
            (None, duration) => Length::Duration(duration.unwrap_or_default()),
        };
        Settings::new(args.workers, args.accounts, length, args.seed).map_err(FlagError)
    }
}

/// The main job's sizes: low-level arguments, checked when they become a
/// [`Plan`].
#[derive(Debug, Clone, Args)]
pub struct JobArgs {
    /// How many accounts to create (2, for the transfer, to 100000000: every id is kept in memory).
    #[arg(long, value_name = "N", default_value = "100", value_parser = whole(), allow_negative_numbers = true)]
    pub accounts: u64,

    /// How many of the new accounts to delete at the end (1 to --accounts).
    #[arg(long, value_name = "N", default_value = "5", value_parser = whole(), allow_negative_numbers = true)]
    pub delete: u64,

    /// Seed the random generator: the same seed gives the same ids, balances and choices.
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,

    /// Print one summary line instead of a line per created account (automatic above 1000 accounts).
    #[arg(short, long)]
    pub quiet: bool,

    /// Rows per multi-row INSERT when creating accounts (1 to 32767: each row binds 2 of a statement's 65535 parameters).
    #[arg(long, value_name = "N", default_value_t = crate::bank::ROWS_PER_INSERT as u64, value_parser = whole(), allow_negative_numbers = true)]
    pub rows_per_insert: u64,

    /// Accounts created per transaction (1 to 1000000: a batch is built in memory).
    #[arg(long, value_name = "N", default_value_t = crate::plan::ROWS_PER_TRANSACTION as u64, value_parser = whole(), allow_negative_numbers = true)]
    pub rows_per_transaction: u64,
}

impl JobArgs {
    /// The flags' ids, to tell whether any was given on the command line:
    /// read from clap's own definition, so that a new flag is never left
    /// out.
    pub fn ids() -> Vec<String> {
        JobArgs::augment_args(clap::Command::new("job"))
            .get_arguments()
            .map(|arg| arg.get_id().to_string())
            .collect()
    }
}

impl TryFrom<&JobArgs> for Plan {
    type Error = FlagError;

    fn try_from(args: &JobArgs) -> Result<Self, FlagError> {
        let batches =
            Batches::new(args.rows_per_insert, args.rows_per_transaction).map_err(FlagError)?;
        Ok(Plan::new(args.accounts, args.delete, batches)
            .map_err(FlagError)?
            .seeded(args.seed)
            .quiet(args.quiet))
    }
}

#[cfg(test)]
mod tests {
    use super::values::parse_millis;
    use super::*;
    use diesel_tx_retry::Retrier;

    #[test]
    fn the_command_line_defaults_are_the_library_defaults() {
        let cli = Cli::try_parse_from(["bank"]).unwrap();
        let (ours, theirs) = (cli.retry.retrier(), Retrier::default());
        assert_eq!(ours.max_attempts(), theirs.max_attempts());
        assert_eq!(ours.deadline(), theirs.deadline());
        assert_eq!(ours.statement_timeout(), theirs.statement_timeout());
        assert_eq!(ours.backoff(), theirs.backoff());
        assert_eq!(ours.isolation(), theirs.isolation());
        assert_eq!(cli.run.pool_timeout, crate::db::POOL_CHECKOUT_WAIT);
        assert_eq!(cli.run.watchdog_slack, crate::watchdog::DEFAULT_SLACK);
    }

    #[test]
    fn clap_reads_whole_numbers_and_the_plan_checks_their_ranges_in_the_flags_words() {
        for (args, expected) in [
            (
                &["bank", "--accounts", "-3"][..],
                "invalid value '-3' for '--accounts <N>': must be a whole number",
            ),
            (
                &["bank", "--accounts", "18446744073709551616"][..],
                "must be a whole number below 18446744073709551616",
            ),
            // The retry helper's own settings keep clap's range check.
            (
                &["bank", "--max-retries", "4294967295"][..],
                "4294967295 is not in 0..=4294967294",
            ),
            (&["bank", "--tx-deadline", "-5"][..], "must be more than 0"),
        ] {
            let err = Cli::try_parse_from(args).unwrap_err().to_string();
            assert!(err.contains(expected), "{args:?}: {err}");
        }
        let plan = |args: &[&str]| {
            let cli = Cli::try_parse_from(args).unwrap();
            Plan::try_from(&cli.job)
                .map(drop)
                .map_err(|e| e.to_string())
        };
        assert_eq!(
            plan(&["bank", "--accounts", "1"]),
            Err("--accounts 1 is out of range: it must be between 2 (the transfer needs two accounts) \
                 and 100000000 (every id is kept in memory)"
                .to_owned())
        );
        assert_eq!(
            plan(&["bank", "--rows-per-insert", "32768"]),
            Err("--rows-per-insert 32768 is out of range: it must be between 1 and 32767 (each row \
                 binds 2 of the 65535 parameters a statement may have)"
                .to_owned())
        );
        assert_eq!(
            plan(&["bank", "--accounts", "5", "--delete", "6"]),
            Err(
                "--delete 6 is out of range: it must be between 1 and the 5 accounts created"
                    .to_owned()
            )
        );
        let cli = Cli::try_parse_from(["bank", "workload", "--workers", "0", "--transfers", "1"])
            .unwrap();
        let Some(Command::Workload(args)) = &cli.command else {
            panic!("not the workload")
        };
        assert_eq!(
            Settings::try_from(args)
                .map(drop)
                .map_err(|e| e.to_string()),
            Err("--workers 0 is out of range: it must be between 1 and 1024".to_owned())
        );
    }

    #[test]
    fn durations_are_plain_numbers_of_their_unit_or_human_ones() {
        let secs = Duration::from_secs;
        let ms = Duration::from_millis;
        assert_eq!(parse_seconds("30"), Ok(secs(30)));
        assert_eq!(parse_seconds("0.5"), Ok(ms(500)));
        assert_eq!(parse_seconds("30s"), Ok(secs(30)));
        assert_eq!(parse_seconds("500ms"), Ok(ms(500)));
        assert_eq!(parse_seconds("1m 30s"), Ok(secs(90)));
        assert_eq!(parse_millis("2"), Ok(ms(2)));
        assert_eq!(parse_millis("2ms"), Ok(ms(2)));
        assert_eq!(parse_millis("1s"), Ok(secs(1)));
        for bad in [
            "0",
            "0s",
            "-1",
            "2 days",
            "soon",
            "NaN",
            "inf",
            "18446744073709551616",
        ] {
            assert!(parse_seconds(bad).is_err(), "{bad}");
        }
        assert!(parse_millis("61s").is_err());
        let cli = Cli::try_parse_from([
            "bank",
            "--tx-deadline",
            "45s",
            "--statement-timeout",
            "1500ms",
        ])
        .unwrap();
        assert_eq!(cli.retry.tx_deadline, secs(45));
        assert_eq!(cli.retry.statement_timeout, ms(1500));
    }
}
