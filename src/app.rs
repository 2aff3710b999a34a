//! The edge: turns the parsed command line into work, adds context to
//! failures, and renders them as one line without secrets.

use std::io::Write;

use anyhow::{anyhow, bail, Context};

use crate::config::{Cli, Command, DbUrl, ProtocolChoice, WorkloadArgs};
use crate::db::{self, PgPool};
use crate::job::{self, Batches, Plan};
use crate::retry::{Protocol, Retrier, Server};
use crate::workload::{self, Length, Settings};

/// Runs what `cli` asks for, writing results to `out`.
///
/// # Errors
/// Anything that stops the command; render it with [`error_line`].
pub fn run(cli: &Cli, out: &mut dyn Write) -> anyhow::Result<()> {
    // Every argument is checked before anything connects or writes.
    if cli.command.is_none() {
        cli.job.validate().map_err(anyhow::Error::msg)?;
    }
    let url = database_url(cli)?;
    match cli.command {
        Some(Command::Migrate) => migrate(&url, out),
        Some(Command::Workload(ref args)) => workload(cli, args, &url, out),
        None => main_job(cli, &url, out),
    }
}

/// One line for stderr: the context chain. Messages that mention the
/// database name it by [`DbUrl::redacted`], so no password is in them.
pub fn error_line(err: &anyhow::Error) -> String {
    let mut causes = Vec::new();
    for cause in err.chain() {
        causes.push(cause.to_string());
        // A connection error already says, explained, what its source said.
        if cause.is::<db::ConnectError>() {
            break;
        }
    }
    causes
        .join(": ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

fn database_url(cli: &Cli) -> anyhow::Result<DbUrl> {
    let raw = cli.database_url.as_deref().ok_or_else(|| {
        anyhow!("no database url; set DATABASE_URL (or put it in .env, see .env.example) or pass --database-url")
    })?;
    DbUrl::parse(raw).map_err(anyhow::Error::msg)
}

fn migrate(url: &DbUrl, out: &mut dyn Write) -> anyhow::Result<()> {
    let mut conn = db::establish(url)?;
    let applied = db::run_migrations(&mut conn)?;
    if applied.is_empty() {
        writeln!(out, "Schema is up to date.")?;
    }
    for version in applied {
        writeln!(out, "Applied migration {version}.")?;
    }
    Ok(())
}

fn main_job(cli: &Cli, url: &DbUrl, out: &mut dyn Write) -> anyhow::Result<()> {
    let (retrier, pool) = prepare(cli, url, 2)?;
    let plan = Plan {
        accounts: cli.job.accounts,
        delete: cli.job.delete,
        seed: cli.job.seed,
        quiet: cli.job.quiet,
        batches: Batches {
            rows_per_insert: cli.job.rows_per_insert,
            rows_per_transaction: cli.job.rows_per_transaction,
        },
    };
    let report = job::run(&pool, &retrier, plan, out)?;
    tracing::debug!(retries = report.retries, "main job done");
    Ok(())
}

fn workload(
    cli: &Cli,
    args: &WorkloadArgs,
    url: &DbUrl,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let workers = u32::try_from(args.workers).context("--workers is too large")?;
    let (retrier, pool) = prepare(cli, url, workers)?;
    let length = match (args.transfers, args.duration) {
        (Some(transfers), _) => Length::Transfers(transfers),
        (None, Some(duration)) => Length::Duration(duration),
        (None, None) => bail!("pass --transfers N or --duration SECONDS"),
    };
    let settings = Settings {
        workers: args.workers,
        accounts: args.accounts,
        length,
        seed: args.seed,
    };
    let report = workload::run(&pool, &retrier, settings)?;
    if args.json {
        writeln!(out, "{}", serde_json::to_string(&report)?)?;
    } else {
        writeln!(out, "{}", report.to_text())?;
    }
    if !report.invariant_ok {
        bail!(
            "invariant broken: total balance {} before and {} after, {} negative balances",
            report.total_before,
            report.total_after,
            report.negative_balances
        );
    }
    Ok(())
}

/// Connects once (so a bad URL gets its real reason), detects the server,
/// checks the schema, and builds the helper and a pool of `pool_size`.
fn prepare(cli: &Cli, url: &DbUrl, pool_size: u32) -> anyhow::Result<(Retrier, PgPool)> {
    let mut conn = db::establish(url)?;
    let server = Server::detect(&mut conn).context("asking the server for its version")?;
    if !db::accounts_table_exists(&mut conn).context("looking for the accounts table")? {
        bail!(
            "table \"accounts\" does not exist in {}; create it with `diesel migration run`, \
             `cockroach sql --url \"$DATABASE_URL\" < dbinit.sql` (psql \"$DATABASE_URL\" -f dbinit.sql on PostgreSQL), \
             or `bank migrate`",
            url.redacted()
        );
    }
    drop(conn);
    let retrier = retrier(cli, server)?;
    tracing::debug!(?server, protocol = ?retrier.protocol(), target = %url.redacted(), "connected");
    let pool = db::pool(url, pool_size).context("building the connection pool")?;
    Ok((retrier, pool))
}

fn retrier(cli: &Cli, server: Server) -> anyhow::Result<Retrier> {
    let protocol = match (cli.retry.protocol, server) {
        (ProtocolChoice::Auto, _) => server.retry_protocol(),
        // On PostgreSQL a rollback to a savepoint keeps the snapshot that
        // conflicted, so the protocol would only add round trips; the library
        // still allows it, for tests.
        (ProtocolChoice::Savepoint, Server::PostgreSql) => bail!(
            "--protocol savepoint needs CockroachDB, and this server is PostgreSQL; \
             use --protocol restart or auto"
        ),
        (ProtocolChoice::Savepoint, Server::CockroachDb) => Protocol::Savepoint,
        (ProtocolChoice::Restart, _) => Protocol::Restart,
    };
    Ok(Retrier::new(cli.retry.policy(), server).with_protocol(protocol))
}
