//! Configuration: the command line, its validation, and the database URL
//! (parsed once, redacted whenever it is shown).

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::conninfo::ConnInfo;
use crate::retry::{Backoff, RetryPolicy};

/// The CockroachDB bank tutorial, in Rust with Diesel.
///
/// With no subcommand: create accounts, transfer between two of them, delete
/// a few, each step in a retried SERIALIZABLE transaction.
#[derive(Debug, Parser)]
#[command(name = "bank", version, about)]
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
    /// Threads running transfers, each with its own pooled connection.
    #[arg(long, value_name = "W", default_value = "4", value_parser = parse_usize, allow_negative_numbers = true)]
    pub workers: usize,

    /// Accounts to create and transfer between.
    #[arg(long, value_name = "A", default_value = "100", value_parser = parse_accounts, allow_negative_numbers = true)]
    pub accounts: u64,

    /// Stop after this many transfers in all.
    #[arg(long, value_name = "T", value_parser = parse_positive, allow_negative_numbers = true)]
    pub transfers: Option<u64>,

    /// Stop after this many seconds.
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
    pub duration: Option<Duration>,

    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,

    /// Seed the random generator.
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
}

/// The main job's sizes.
#[derive(Debug, Clone, Args)]
pub struct JobArgs {
    /// How many accounts to create.
    #[arg(long, value_name = "N", default_value = "100", value_parser = parse_accounts, allow_negative_numbers = true)]
    pub accounts: u64,

    /// How many of the new accounts to delete at the end.
    #[arg(long, value_name = "N", default_value = "5", value_parser = parse_positive, allow_negative_numbers = true)]
    pub delete: u64,

    /// Seed the random generator: the same seed gives the same ids, balances and choices.
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,

    /// Print one summary line instead of a line per created account (automatic above 1000 accounts).
    #[arg(short, long)]
    pub quiet: bool,

    /// Rows per multi-row INSERT when creating accounts (at most 32767).
    #[arg(long, value_name = "N", default_value_t = crate::bank::ROWS_PER_INSERT, value_parser = parse_rows_per_insert)]
    pub rows_per_insert: usize,

    /// Accounts created per transaction.
    #[arg(long, value_name = "N", default_value_t = crate::job::ROWS_PER_TRANSACTION, value_parser = parse_usize)]
    pub rows_per_transaction: usize,
}

impl JobArgs {
    /// Checks what single flags cannot check alone, before anything is written.
    ///
    /// # Errors
    /// A one-line message naming the bad values.
    pub fn validate(&self) -> Result<(), String> {
        if self.delete > self.accounts {
            return Err(format!(
                "--delete {} is more than --accounts {}; delete at most as many accounts as are created",
                self.delete, self.accounts
            ));
        }
        Ok(())
    }
}

/// The retry helper's budgets, shared by every command.
#[derive(Debug, Clone, Args)]
pub struct RetryArgs {
    /// Retries allowed after the first attempt of each transaction.
    #[arg(long, value_name = "N", global = true, default_value = "10", value_parser = parse_retries, allow_negative_numbers = true)]
    pub max_retries: u32,

    /// Give up on a transaction whose retries would start after this many seconds.
    #[arg(long, value_name = "SECONDS", global = true, default_value = "30", value_parser = parse_seconds)]
    pub tx_deadline: Duration,

    /// Ceiling of the first delayed retry's wait, in milliseconds; it doubles per retry.
    #[arg(long, value_name = "MS", global = true, default_value = "2", value_parser = parse_millis)]
    pub backoff_base_ms: Duration,

    /// No wait between retries exceeds this many milliseconds.
    #[arg(long, value_name = "MS", global = true, default_value = "500", value_parser = parse_millis)]
    pub backoff_cap_ms: Duration,

    /// Wait before the first retry too, instead of retrying at once.
    #[arg(long, global = true)]
    pub delay_first_retry: bool,

    /// Retry protocol: savepoint (CockroachDB's), restart (PostgreSQL's), or auto by server.
    #[arg(long, value_name = "PROTOCOL", global = true, default_value = "auto")]
    pub protocol: ProtocolChoice,
}

impl RetryArgs {
    /// The policy these flags describe.
    pub fn policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_retries.saturating_add(1),
            deadline: Some(self.tx_deadline),
            backoff: Backoff {
                base: self.backoff_base_ms,
                cap: self.backoff_cap_ms.max(self.backoff_base_ms),
                first_retry_immediate: !self.delay_first_retry,
            },
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

fn parse_positive(text: &str) -> Result<u64, String> {
    match text.trim().parse::<i128>() {
        Ok(n) if n < 1 => Err("must be at least 1".into()),
        Ok(n) => u64::try_from(n).map_err(|_| format!("must be at most {}", u64::MAX)),
        Err(_) => Err("must be a whole number, like 100".into()),
    }
}

fn parse_usize(text: &str) -> Result<usize, String> {
    let n = parse_positive(text)?;
    usize::try_from(n).map_err(|_| format!("must be at most {}", usize::MAX))
}

fn parse_rows_per_insert(text: &str) -> Result<usize, String> {
    match parse_usize(text)? {
        n if n > crate::bank::MAX_ROWS_PER_INSERT => Err(format!(
            "must be at most {}: each row binds 2 of the 65535 parameters a statement may have",
            crate::bank::MAX_ROWS_PER_INSERT
        )),
        n => Ok(n),
    }
}

fn parse_accounts(text: &str) -> Result<u64, String> {
    match parse_positive(text)? {
        1 => Err("must be at least 2, so that the transfer has two distinct accounts".into()),
        n => Ok(n),
    }
}

fn parse_retries(text: &str) -> Result<u32, String> {
    match text.trim().parse::<i128>() {
        Ok(n) if n < 0 => Err("must be 0 or more".into()),
        Ok(n) => u32::try_from(n).map_err(|_| format!("must be at most {}", u32::MAX - 1)),
        Err(_) => Err("must be a whole number, like 10".into()),
    }
}

fn parse_millis(text: &str) -> Result<Duration, String> {
    match text.trim().parse::<f64>() {
        Ok(ms) if ms.is_finite() && (0.0..=60_000.0).contains(&ms) => {
            Ok(Duration::from_secs_f64(ms / 1e3))
        }
        _ => Err("must be a number of milliseconds between 0 and 60000, like 2 or 0.5".into()),
    }
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    match text.trim().parse::<f64>() {
        Ok(s) if s.is_finite() && s > 0.0 && s <= 86_400.0 => Ok(Duration::from_secs_f64(s)),
        _ => Err("must be a number of seconds between 0 and 86400, like 30 or 0.5".into()),
    }
}

/// A database connection string that libpq parsed: a `postgresql://` or
/// `postgres://` URL, or keyword/value pairs (see [`crate::conninfo`]).
#[derive(Clone)]
pub struct DbUrl {
    info: ConnInfo,
}

impl std::fmt::Debug for DbUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DbUrl({})", self.redacted())
    }
}

impl DbUrl {
    /// Parses and checks the string without ever echoing it (it may hold a
    /// password).
    ///
    /// # Errors
    /// A one-line message saying what is wrong and what the string should
    /// look like.
    pub fn parse(raw: &str) -> Result<Self, String> {
        const SHAPE: &str = "expected postgresql://USER[:PASSWORD]@HOST[:PORT][,HOST[:PORT]...]/DATABASE[?sslmode=...] \
             or key=value pairs such as host=HOST dbname=DATABASE";
        let raw = raw.trim();
        if raw.is_empty() {
            return Err(format!("the database url is empty; {SHAPE}"));
        }
        // libpq reads anything that is not one of its two URL schemes as
        // keyword/value pairs, which would make a wrong scheme a puzzling
        // "missing =".
        if let Some((scheme, _)) = raw.split_once("://") {
            let is_scheme = !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c));
            if is_scheme && !matches!(scheme, "postgres" | "postgresql") {
                return Err(format!(
                    "the database url has scheme '{scheme}', which is not a PostgreSQL wire-protocol url; {SHAPE}"
                ));
            }
        }
        let info = ConnInfo::parse(raw)
            .map_err(|err| format!("the database url is malformed ({err}); {SHAPE}"))?;
        Ok(Self { info })
    }

    /// The string handed to libpq: the user's options, plus an
    /// `application_name` (so the app shows up in CockroachDB's console and
    /// `pg_stat_activity`, as in the tutorial) and a `connect_timeout` (so
    /// an unreachable host fails instead of hanging), unless the user set
    /// them.
    pub fn for_libpq(&self) -> String {
        let mut info = self.info.clone();
        for (key, value) in [
            ("application_name", "docs_simplecrud_diesel"),
            ("connect_timeout", "10"),
        ] {
            if info.get(key).is_none() {
                info = info.with(key, value);
            }
        }
        info.to_libpq()
    }

    /// `user@host:port,.../database`, for messages: never the password or
    /// any other option.
    pub fn redacted(&self) -> String {
        self.info.redacted()
    }

    /// The hosts libpq tries, as written, for messages.
    pub fn hosts(&self) -> String {
        self.info.hosts().join(", ")
    }

    /// The `sslrootcert` file, if one is named.
    pub fn sslrootcert(&self) -> Option<&str> {
        self.info.get("sslrootcert")
    }

    /// The user to connect as, if one is named.
    pub fn user(&self) -> Option<&str> {
        self.info.get("user")
    }

    /// The same connection string with option `key` set to `value`.
    pub fn with_param(&self, key: &str, value: &str) -> Self {
        Self {
            info: self.info.with(key, value),
        }
    }

    /// The same connection string pointing at another database (tests
    /// create one each).
    pub fn with_database(&self, name: &str) -> Self {
        self.with_param("dbname", name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_drops_the_password_and_query() {
        let url = DbUrl::parse("postgresql://max:s3cret@db.example:26257/bank?sslmode=verify-full")
            .unwrap();
        assert_eq!(url.redacted(), "max@db.example:26257/bank");
        assert!(url.for_libpq().contains("password='s3cret'"));
        assert!(!format!("{url:?}").contains("s3cret"));
    }

    #[test]
    fn libpq_url_gets_application_name_and_timeout_once() {
        let url = DbUrl::parse("postgresql://root@h:1/d?application_name=mine").unwrap();
        let libpq = url.for_libpq();
        assert!(libpq.contains("application_name='mine'"));
        assert!(!libpq.contains("docs_simplecrud_diesel"));
        assert!(libpq.contains("connect_timeout='10'"));
    }

    #[test]
    fn bad_urls_get_one_line_that_hides_them() {
        for bad in [
            "",
            "not a url",
            "mysql://u:pw@h/d",
            "postgresql://u:pw@h/d%zz",
        ] {
            let err = DbUrl::parse(bad).unwrap_err();
            assert!(!err.contains('\n'), "{err}");
            assert!(err.contains("expected postgresql://"), "{err}");
            assert!(!err.contains("pw@"), "{err}");
        }
    }

    #[test]
    fn the_command_line_defaults_are_the_library_defaults() {
        let cli = Cli::try_parse_from(["bank"]).unwrap();
        assert_eq!(cli.retry.policy(), RetryPolicy::default());
    }

    #[test]
    fn counts_reject_zero_negative_and_words() {
        assert_eq!(parse_positive("0").unwrap_err(), "must be at least 1");
        assert_eq!(parse_positive("-3").unwrap_err(), "must be at least 1");
        assert!(parse_positive("ten").is_err());
        assert!(parse_accounts("1")
            .unwrap_err()
            .contains("two distinct accounts"));
        assert_eq!(parse_accounts("1000000"), Ok(1_000_000));
    }
}
