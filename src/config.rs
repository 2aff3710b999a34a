//! Configuration: the command line (low-level arguments, turned into
//! [`crate::plan`] types by `TryFrom`) and `.env`.

use std::ops::RangeInclusive;
use std::time::Duration;

use std::ffi::OsString;
use std::path::PathBuf;

use clap::error::ErrorKind;
use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

use crate::plan::{Batches, Length, Plan, PlanError, Settings};
use diesel_tx_retry::{Backoff, Isolation, Retrier, RetryBudget};

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
            let given = JobArgs::IDS
                .iter()
                .find(|id| matches.value_source(id) == Some(ValueSource::CommandLine));
            if let Some(id) = given {
                let flag = format!("--{}", id.replace('_', "-"));
                let hint = match (name, *id) {
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

/// Loads the nearest `.env` (in this directory or a parent) into the
/// environment, without overriding what is already set. A malformed file is
/// reported by line and column, never by content: it may hold a password.
///
/// # Errors
/// One line naming the file, the line and what is wrong.
pub fn load_dotenv() -> Result<(), String> {
    let Some(path) = find_dotenv() else {
        return Ok(());
    };
    let shown = path.display();
    match dotenvy::from_path(&path) {
        Ok(()) => Ok(()),
        Err(dotenvy::Error::LineParse(rest, index)) => {
            let content = std::fs::read_to_string(&path).unwrap_or_default();
            let (line, column, what) = locate(&content, &rest, index);
            Err(format!(
                "could not read {shown}: line {line}, column {column}: {what}; fix or remove the file"
            ))
        }
        Err(dotenvy::Error::Io(err)) => Err(format!("could not read {shown}: {err}")),
        Err(_) => Err(format!(
            "could not read {shown}: it is not valid UTF-8 text; fix or remove the file"
        )),
    }
}

fn find_dotenv() -> Option<PathBuf> {
    let start = std::env::current_dir().ok()?;
    start
        .ancestors()
        .map(|dir| dir.join(".env"))
        .find(|path| path.is_file())
}

/// Where dotenvy's parse error is in the file, and what it means, from the
/// rest of the file it quotes (never shown) and the position in it.
fn locate(content: &str, rest: &str, index: usize) -> (usize, usize, &'static str) {
    let start = content
        .match_indices(rest)
        .map(|(at, _)| at)
        .find(|at| *at == 0 || content[..*at].ends_with('\n'))
        .unwrap_or(0);
    let line_of = |offset: usize| content[..offset].matches('\n').count() + 1;
    let column_of = |offset: usize| {
        content[..offset]
            .rsplit('\n')
            .next()
            .map_or(0, |l| l.chars().count())
            + 1
    };
    match rest.char_indices().nth(index) {
        Some((at, _)) => (
            line_of(start + at),
            column_of(start + at),
            "expected NAME=value (a name of letters, digits and underscores)",
        ),
        // The parser ran off the end of the file: a quote never closed.
        None => {
            let first_line = rest.lines().next().unwrap_or_default();
            let quote = first_line.find(['"', '\'']).unwrap_or(0);
            (
                line_of(start),
                column_of(start + quote),
                "this quote is never closed",
            )
        }
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
    #[arg(long, value_name = "W", default_value = "4", value_parser = in_range(crate::plan::WORKERS), allow_negative_numbers = true)]
    pub workers: u64,

    /// Accounts to create and transfer between (2 to 100000000).
    #[arg(long, value_name = "A", default_value = "100", value_parser = in_range(crate::plan::ACCOUNTS), allow_negative_numbers = true)]
    pub accounts: u64,

    /// Stop after this many transfers in all (at least 1).
    #[arg(long, value_name = "T", value_parser = in_range(1..=u64::MAX), allow_negative_numbers = true)]
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

impl TryFrom<&WorkloadArgs> for Settings {
    type Error = PlanError;

    fn try_from(args: &WorkloadArgs) -> Result<Self, PlanError> {
        // clap requires exactly one of the two.
        let length = match (args.transfers, args.duration) {
            (Some(transfers), _) => Length::transfers(i128::from(transfers))?,
            (None, duration) => Length::Duration(duration.unwrap_or_default()),
        };
        Settings::new(
            i128::from(args.workers),
            i128::from(args.accounts),
            length,
            args.seed,
        )
    }
}

/// The main job's sizes: low-level arguments, checked when they become a
/// [`Plan`].
#[derive(Debug, Clone, Args)]
pub struct JobArgs {
    /// How many accounts to create (2, for the transfer, to 100000000: every id is kept in memory).
    #[arg(long, value_name = "N", default_value = "100", value_parser = in_range(crate::plan::ACCOUNTS), allow_negative_numbers = true)]
    pub accounts: u64,

    /// How many of the new accounts to delete at the end (1 to --accounts).
    #[arg(long, value_name = "N", default_value = "5", value_parser = in_range(1..=*crate::plan::ACCOUNTS.end()), allow_negative_numbers = true)]
    pub delete: u64,

    /// Seed the random generator: the same seed gives the same ids, balances and choices.
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,

    /// Print one summary line instead of a line per created account (automatic above 1000 accounts).
    #[arg(short, long)]
    pub quiet: bool,

    /// Rows per multi-row INSERT when creating accounts (1 to 32767: each row binds 2 of a statement's 65535 parameters).
    #[arg(long, value_name = "N", default_value_t = crate::bank::ROWS_PER_INSERT as u64, value_parser = in_range(1..=crate::bank::MAX_ROWS_PER_INSERT as u64), allow_negative_numbers = true)]
    pub rows_per_insert: u64,

    /// Accounts created per transaction (1 to 1000000: a batch is built in memory).
    #[arg(long, value_name = "N", default_value_t = crate::plan::ROWS_PER_TRANSACTION as u64, value_parser = in_range(1..=crate::plan::MAX_ROWS_PER_TRANSACTION as u64), allow_negative_numbers = true)]
    pub rows_per_transaction: u64,
}

impl JobArgs {
    /// The flags' ids, to tell whether any was given on the command line.
    pub const IDS: [&'static str; 6] = [
        "accounts",
        "delete",
        "seed",
        "quiet",
        "rows_per_insert",
        "rows_per_transaction",
    ];
}

impl TryFrom<&JobArgs> for Plan {
    type Error = PlanError;

    fn try_from(args: &JobArgs) -> Result<Self, PlanError> {
        let batches = Batches::new(
            i128::from(args.rows_per_insert),
            i128::from(args.rows_per_transaction),
        )?;
        Ok(
            Plan::new(i128::from(args.accounts), i128::from(args.delete), batches)?
                .seeded(args.seed)
                .quiet(args.quiet),
        )
    }
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

/// clap's own range check for a whole number within `range` (one of the
/// plan's ranges, so that the flag and the library agree), after a check
/// that the text is a whole number that fits: clap's own word for `-5` or
/// `many` would be Rust's "invalid digit found in string".
fn in_range(range: RangeInclusive<u64>) -> Whole {
    let parser = clap::value_parser!(u64).range(*range.start()..=*range.end());
    Whole { range, parser }
}

/// See [`in_range`].
#[derive(Clone)]
struct Whole {
    range: RangeInclusive<u64>,
    parser: clap::builder::RangedU64ValueParser<u64>,
}

impl clap::builder::TypedValueParser for Whole {
    type Value = u64;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<u64, clap::Error> {
        let text = value.to_string_lossy();
        let whole = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
        if whole && text.parse::<u64>().is_ok() {
            return self.parser.parse_ref(cmd, arg, value);
        }
        let what = match (self.range.start(), self.range.end()) {
            (start, &u64::MAX) => format!("must be a whole number of at least {start}"),
            (start, end) => format!("must be a whole number from {start} to {end}"),
        };
        let flag = arg.map_or_else(String::new, |arg| format!(" for '{arg}'"));
        Err(clap::Error::raw(
            ErrorKind::ValueValidation,
            format!("invalid value '{text}'{flag}: {what}\n"),
        )
        .with_cmd(cmd))
    }
}

/// A duration written the way people write one (`500ms`, `30s`, `1m 30s`,
/// parsed by humantime), or a plain number of `unit`s, as before.
fn parse_duration(text: &str, unit: Duration) -> Option<Duration> {
    let text = text.trim();
    match text.parse::<f64>() {
        // try_from: a huge number is out of range, not a panic.
        Ok(n) => Duration::try_from_secs_f64(unit.as_secs_f64() * n).ok(),
        Err(_) => humantime::parse_duration(text).ok(),
    }
}

fn parse_millis(text: &str) -> Result<Duration, String> {
    match parse_duration(text, Duration::from_millis(1)) {
        Some(d) if d <= Duration::from_secs(60) => Ok(d),
        _ => Err("must be between 0 and 60000 milliseconds, like 2, 0.5 or 2ms".into()),
    }
}

fn parse_request_timeout(text: &str) -> Result<Duration, String> {
    match parse_duration(text, Duration::from_millis(1)) {
        Some(d) if !d.is_zero() && d <= Duration::from_secs(3_600) => Ok(d),
        _ => Err("must be more than 0 and at most 3600000 milliseconds, like 50, 2.5 or 1s".into()),
    }
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    match parse_duration(text, Duration::from_secs(1)) {
        Some(d) if !d.is_zero() && d <= Duration::from_secs(86_400) => Ok(d),
        _ => {
            Err("must be more than 0 and at most 86400 seconds, like 30, 0.5, 30s or 500ms".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_defaults_are_the_library_defaults() {
        let cli = Cli::try_parse_from(["bank"]).unwrap();
        let (ours, theirs) = (cli.retry.retrier(), Retrier::default());
        assert_eq!(ours.max_attempts(), theirs.max_attempts());
        assert_eq!(ours.deadline(), theirs.deadline());
        assert_eq!(ours.statement_timeout(), theirs.statement_timeout());
        assert_eq!(ours.backoff(), theirs.backoff());
        assert_eq!(ours.isolation(), theirs.isolation());
        assert_eq!(cli.retry.pool_timeout, crate::db::POOL_CHECKOUT_WAIT);
        assert_eq!(cli.retry.watchdog_slack, crate::watchdog::DEFAULT_SLACK);
    }

    #[test]
    fn numbers_are_range_checked_by_clap_and_the_delete_count_by_the_plan() {
        for (args, expected) in [
            (
                &["bank", "--accounts", "1"][..],
                "1 is not in 2..=100000000",
            ),
            (
                &["bank", "--accounts", "-3"][..],
                "invalid value '-3' for '--accounts <N>'",
            ),
            (
                &["bank", "--rows-per-insert", "32768"][..],
                "32768 is not in 1..=32767",
            ),
            (
                &["bank", "workload", "--workers", "0", "--transfers", "1"][..],
                "0 is not in 1..=1024",
            ),
            (
                &["bank", "--max-retries", "4294967295"][..],
                "4294967295 is not in 0..=4294967294",
            ),
            (&["bank", "--tx-deadline", "-5"][..], "must be more than 0"),
        ] {
            let err = Cli::try_parse_from(args).unwrap_err().to_string();
            assert!(err.contains(expected), "{args:?}: {err}");
        }
        let cli = Cli::try_parse_from(["bank", "--accounts", "5", "--delete", "6"]).unwrap();
        assert_eq!(
            Plan::try_from(&cli.job),
            Err(PlanError::Delete {
                delete: 6,
                accounts: 5
            })
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
