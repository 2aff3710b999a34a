//! The edge: turns the parsed command line into work, adds context to
//! failures, and renders them as one line.

use std::fmt;
use std::io::{self, Write};
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{bail, Context};

use crate::config::{Cli, Command, ProtocolChoice, WorkloadArgs};
use crate::db::DbUrl;
use crate::db::{self, AccountsTable, PgPool};
use crate::job;
use crate::plan::{Plan, Settings};
use crate::teller::Teller;
use crate::watchdog::Watchdog;
use crate::workload;
use diesel_tx_retry::{Retrier, Server};

/// Where results go: shared, so that the watchdog's thread can write the
/// workload's report so far if it has to end a stalled run. Each write
/// locks it for that write only.
pub type Output = Arc<Mutex<dyn Write + Send>>;

/// What the process gives the app besides the command line and the output.
#[derive(Debug, Clone, Default)]
pub struct Runtime {
    /// Ends a run whose server stopped answering ([`Watchdog::off`] by
    /// default).
    pub watchdog: Watchdog,
    /// Counts the connections the pools are opening, for the process to
    /// wait on before it exits.
    pub connects: db::Connects,
}

/// What the user asked for cannot be done as asked: a flag, `DATABASE_URL`
/// or `.env` is wrong. Nothing was written. The exit code is 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

fn usage(err: impl fmt::Display) -> anyhow::Error {
    UsageError(err.to_string()).into()
}

/// The exit code for a failure: 2 for a usage error, 1 for anything else.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    if err.chain().any(|cause| cause.is::<UsageError>()) {
        2
    } else {
        1
    }
}

/// The work the command line asks for, every argument checked.
enum Work {
    Migrate,
    Job(Plan),
    Workload(Settings, bool),
}

/// Runs what `cli` asks for, writing results to `out`.
///
/// # Errors
/// Anything that stops the command; render it with [`error_line`].
pub fn run(cli: &Cli, runtime: &Runtime, out: &Output) -> anyhow::Result<()> {
    // Every argument is checked before anything connects or writes.
    let work = match &cli.command {
        Some(Command::Migrate) => Work::Migrate,
        Some(Command::Workload(args)) => work_for(args)?,
        None => Work::Job(Plan::try_from(&cli.job).map_err(usage)?),
    };
    let url = database_url(cli)?;
    let mut labelled = Labelled(Shared(out));
    match work {
        Work::Migrate => migrate(cli, &url, &mut labelled),
        Work::Job(plan) => main_job(cli, runtime, &url, plan, &mut labelled),
        Work::Workload(settings, json) => workload(cli, runtime, &url, settings, json, out),
    }
}

fn work_for(args: &WorkloadArgs) -> anyhow::Result<Work> {
    let settings = Settings::try_from(args).map_err(usage)?;
    Ok(Work::Workload(settings, args.json))
}

/// One line for stderr: the context chain. Messages that mention the
/// database name it by [`DbUrl::redacted`], so no password is in them.
pub fn error_line(err: &anyhow::Error) -> String {
    let mut causes: Vec<String> = Vec::new();
    for cause in err.chain() {
        // A wrapper that shows its source's message (the bank's database
        // errors do, so that the retry helper finds them as their source)
        // is followed by that source: said once.
        let said = cause.to_string();
        if causes.last() != Some(&said) {
            causes.push(said);
        }
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

/// The shared output as a writer, locked for each call.
struct Shared<'a>(&'a Output);

impl Write for Shared<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .flush()
    }
}

/// Says what was being written when output fails (a closed pipe, a full
/// disk), instead of a bare "Broken pipe (os error 32)".
struct Labelled<W>(W);

impl<W: Write> Write for Labelled<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf).map_err(label)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush().map_err(label)
    }
}

fn label(err: io::Error) -> io::Error {
    io::Error::new(err.kind(), format!("writing the results to stdout: {err}"))
}

fn database_url(cli: &Cli) -> anyhow::Result<DbUrl> {
    let raw = cli.database_url.as_deref().ok_or_else(|| {
        usage("no database url; set DATABASE_URL (or put it in .env, see .env.example) or pass --database-url")
    })?;
    DbUrl::parse(raw).map_err(usage)
}

fn migrate(cli: &Cli, url: &DbUrl, out: &mut dyn Write) -> anyhow::Result<()> {
    let (mut conn, _) = db::establish_with_timeouts(url, cli.retry.statement_timeout)?;
    if cli.verbose {
        db::log_statements(&mut conn);
    }
    // What was there before: the accounts migration creates the table only
    // where none exists, so on a table made elsewhere it applies nothing to
    // it, and must not be reported as if it had.
    let before = db::inspect_fully(&mut conn).context("asking the server what it is")?;
    let applied = db::run_migrations(&mut conn)?;
    let mut blocked = None;
    if applied.is_empty() {
        let found = before
            .shape
            .as_ref()
            .map(|shape| (db::shape::differences(shape), shape))
            .filter(|(found, _)| !found.is_empty());
        match found {
            None => writeln!(out, "Schema is up to date.")?,
            Some((found, shape)) => {
                let line = db::shape::describe(&found, null_balances(&mut conn, shape));
                writeln!(out, "Schema is up to date, but {line}.")?;
                if found.iter().any(|d| d.blocking) {
                    blocked = Some(line);
                }
            }
        }
    }
    for version in applied {
        match &before.shape {
            Some(shape) if version == db::ACCOUNTS_MIGRATION => {
                let found = db::shape::differences(shape);
                if found.is_empty() {
                    writeln!(
                        out,
                        "Applied migration {version}: kept the existing table \"accounts\", made \
                         elsewhere, which is what the app needs."
                    )?;
                } else {
                    let nulls = null_balances(&mut conn, shape);
                    let line = db::shape::describe(&found, nulls);
                    writeln!(
                        out,
                        "Applied migration {version}: kept the existing table \"accounts\", made \
                         elsewhere (the migration creates it only where none exists); {line}."
                    )?;
                    if found.iter().any(|d| d.blocking) {
                        blocked = Some(line);
                    }
                }
            }
            _ => writeln!(out, "Applied migration {version}.")?,
        }
    }
    if let Some(line) = blocked {
        bail!("{line}; the app cannot run on it until then");
    }
    Ok(())
}

fn main_job(
    cli: &Cli,
    runtime: &Runtime,
    url: &DbUrl,
    plan: Plan,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    // Statements that run once go unprepared (preparing costs a round trip
    // of its own); but when the same INSERT repeats, as in a bulk run,
    // preparing it once saves the server parsing and planning it each time.
    let repeats = plan.accounts() > plan.batches().rows_per_insert();
    let report = match front_end(cli, url)? {
        Some(tokio) => {
            let (retrier, pool, _) = prepare_async(cli, runtime, &tokio, url, 1)?;
            let teller = Teller::Async {
                pool: &pool,
                retrier: &retrier,
                runtime: &tokio,
            };
            job::run(&teller, &runtime.watchdog, plan, out)?
        }
        None => {
            let (retrier, pool, _) = prepare(cli, runtime, url, 1, repeats)?;
            let teller = Teller::Blocking {
                pool: &pool,
                retrier: &retrier,
            };
            job::run(&teller, &runtime.watchdog, plan, out)?
        }
    };
    tracing::debug!(retries = report.retries, "main job done");
    Ok(())
}

fn workload(
    cli: &Cli,
    runtime: &Runtime,
    url: &DbUrl,
    settings: Settings,
    json: bool,
    output: &Output,
) -> anyhow::Result<()> {
    let workers = u32::try_from(settings.workers()).context("--workers is too large")?;
    let front = front_end(cli, url)?;
    let request_timeout = match (&cli.command, &front) {
        (Some(Command::Workload(args)), None) if args.request_timeout.is_some() => {
            return Err(usage(
                "--request-timeout drops a transfer's async call, and needs --async; add --async, or drop it",
            ))
        }
        (Some(Command::Workload(args)), _) => args.request_timeout,
        _ => None,
    };
    // With --async the transfers have a pool of their own, and a blocking
    // one (which connects only when asked) reads the balances at the end.
    let (retrier, pool, async_connections) = match &front {
        Some(tokio) => {
            let (retrier, async_connections, url) =
                prepare_async(cli, runtime, tokio, url, workers)?;
            let manager = db::Manager::new(&url).with_lifetime(cli.retry.max_conn_lifetime);
            let blocking = db::pool_of(manager, 1, cli.retry.pool_timeout)
                .context("building the connection pool")?;
            (retrier, blocking, Some(async_connections))
        }
        None => {
            let (retrier, pool, _) = prepare(cli, runtime, url, workers, true)?;
            (retrier, pool, None)
        }
    };
    let workers = match (&front, &async_connections) {
        (Some(tokio), Some(pool)) => workload::Workers::Tasks {
            pool,
            runtime: tokio,
            request_timeout,
        },
        _ => workload::Workers::Threads,
    };
    // If the watchdog has to end the run, the report so far goes to the
    // output from the watchdog's thread (this one is the one waiting),
    // before its line.
    let last_words = {
        let output = Arc::clone(output);
        move |report: &workload::Report| {
            let mut out = output.lock().unwrap_or_else(PoisonError::into_inner);
            let _ = writeln!(out, "{}", render(report, json)).and_then(|()| out.flush());
        }
    };
    // Before the first transaction, so that every call is counted.
    let _exporter = match &cli.command {
        Some(Command::Workload(WorkloadArgs {
            metrics_addr: Some(addr),
            ..
        })) => Some(crate::exporter::Exporter::start(*addr)?),
        _ => None,
    };
    let finished = workload::run(
        &pool,
        workers,
        &retrier,
        &runtime.watchdog,
        settings,
        last_words,
    )?;
    let mut out = Labelled(Shared(output));
    let report = &finished.report;
    // The report first, even when the run was cut short: what happened
    // until then is worth as much as why it stopped.
    writeln!(out, "{}", render(report, json))?;
    out.flush()?;
    if let Some(err) = finished.error {
        return Err(err);
    }
    if let (Some(false), Some(after), Some(negative)) = (
        report.invariant_ok,
        report.total_after,
        report.negative_balances,
    ) {
        let ledger = report.ledger.map_or_else(
            || "the ledger unread".to_owned(),
            |l| {
                format!(
                    "{} ledger rows for {} committed transfers, {} accounts off the ledger",
                    l.rows, report.committed, l.mismatched_accounts
                )
            },
        );
        bail!(
            "invariant broken: total balance {} before and {after} after, {negative} negative balances, {ledger}",
            report.total_before
        );
    }
    Ok(())
}

/// The report as `--json` or as text.
fn render(report: &workload::Report, json: bool) -> String {
    if json {
        // A struct of numbers, options and strings always serializes.
        serde_json::to_string(report).unwrap_or_else(|err| format!("{{\"error\":\"{err}\"}}"))
    } else {
        report.to_text()
    }
}

/// Connects (so a bad URL gets its real reason), learns the server and the
/// state of the schema in one query, and builds the helper and a pool of
/// `pool_size` whose first connection is this one. The main job runs its
/// statements once each, so they go unprepared (`cached` false).
fn prepare(
    cli: &Cli,
    runtime: &Runtime,
    url: &DbUrl,
    pool_size: u32,
    cached: bool,
) -> anyhow::Result<(Retrier, PgPool, DbUrl)> {
    let (mut conn, url) = db::establish_with_timeouts(url, cli.retry.statement_timeout)?;
    let url = &url;
    if cli.verbose {
        db::log_statements(&mut conn);
    }
    let inspection = db::inspect(&mut conn).context("asking the server what it is")?;
    let retrier = retrier(cli, inspection.server)?;
    match inspection.accounts {
        AccountsTable::Ready if !inspection.ledger => bail!(
            "table \"transfers\" (the ledger, the schema's second migration) does not exist in {}; \
             add it with `diesel migration run`, `cockroach sql --url \"$DATABASE_URL\" < dbinit.sql` \
             (psql \"$DATABASE_URL\" -f dbinit.sql on PostgreSQL), or `bank migrate`",
            url.redacted()
        ),
        AccountsTable::Ready => {
            if let Some(shape) = &inspection.shape {
                let found = db::shape::differences(shape);
                if !found.is_empty() {
                    let line = db::shape::describe(&found, null_balances(&mut conn, shape));
                    if found.iter().any(|d| d.blocking) {
                        bail!("{line}; the app cannot run on it until then");
                    }
                    // It can run: the check and the NOT NULL guard data the
                    // app never writes (negative balances, NULLs).
                    tracing::warn!("{line}");
                }
            }
        }
        AccountsTable::Missing => bail!(
            "table \"accounts\" does not exist in {}; create it with `diesel migration run`, \
             `cockroach sql --url \"$DATABASE_URL\" < dbinit.sql` (psql \"$DATABASE_URL\" -f dbinit.sql on PostgreSQL), \
             or `bank migrate`",
            url.redacted()
        ),
        AccountsTable::NotAllowed => {
            let user = url.user().unwrap_or("the connecting user");
            bail!(
                "user {user} may not read and write table \"accounts\" (and add to \"transfers\") in {}; \
                 an admin can allow it with: GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE accounts TO {user}; \
                 GRANT SELECT, INSERT ON TABLE transfers TO {user}",
                url.redacted()
            )
        }
    }
    tracing::debug!(server = ?inspection.server, protocol = ?retrier.protocol(), target = %url.redacted(), "connected");
    let manager = db::Manager::new(url)
        .with_lifetime(cli.retry.max_conn_lifetime)
        .with_first(conn)
        .counted_in(&runtime.connects)
        .logging_statements(cli.verbose);
    let manager = if cached && !cli.unnamed_statements {
        manager
    } else {
        manager.without_statement_cache()
    };
    let pool = db::pool_of(manager, pool_size, cli.retry.pool_timeout)
        .context("building the connection pool")?;
    Ok((retrier, pool, url.clone()))
}

/// The runtime of the async front end, when `--async` asks for it: two
/// worker threads. Its connection string is checked first, before anything
/// connects.
fn front_end(cli: &Cli, url: &DbUrl) -> anyhow::Result<Option<tokio::runtime::Runtime>> {
    if !cli.asynchronous {
        return Ok(None);
    }
    db::asynch::tokio_config(url).map_err(usage)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bank-async")
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    Ok(Some(runtime))
}

/// [`prepare`] for the async front end: the retrier and a pool of `size`
/// async connections, the session timeouts in their startup options. The
/// quick start-up check runs on the async pool's first connection, so a
/// set-up schema costs no other connection; anything it does not settle
/// (no connection, a missing table, a pooler refusing the startup options)
/// goes through the blocking start-up, which says what is wrong in the
/// app's words, and whose connection string the async pool then uses.
fn prepare_async(
    cli: &Cli,
    runtime: &Runtime,
    tokio: &tokio::runtime::Runtime,
    url: &DbUrl,
    size: u32,
) -> anyhow::Result<(Retrier, db::asynch::AsyncPool, DbUrl)> {
    let timed = url.with_session_timeouts(cli.retry.statement_timeout);
    let pool = async_pool(cli, tokio, &timed, size)?;
    if let Some(inspection) = tokio.block_on(db::asynch::inspect_quickly(&pool)) {
        if let Some(line) = url.unverified_remote(std::env::var("PGSSLMODE").ok().as_deref()) {
            tracing::warn!("{line}");
        }
        tracing::debug!(server = ?inspection.server, target = %url.redacted(), "connected (async)");
        return Ok((retrier(cli, inspection.server)?, pool, timed));
    }
    drop(pool);
    let (retrier, _, url) = prepare(cli, runtime, url, 1, false)?;
    let pool = async_pool(cli, tokio, &url, size)?;
    Ok((retrier, pool, url))
}

/// The async front end's pool of `size` connections to `url` (with the
/// session timeouts [`prepare`] added).
fn async_pool(
    cli: &Cli,
    tokio: &tokio::runtime::Runtime,
    url: &DbUrl,
    size: u32,
) -> anyhow::Result<db::asynch::AsyncPool> {
    // bb8 starts its reaper (idle and lifetime limits) on the runtime.
    let _inside = tokio.enter();
    db::asynch::async_pool(
        url,
        size,
        cli.retry.pool_timeout,
        cli.retry.max_conn_lifetime,
    )
    .map_err(usage)
}

/// Rows with a NULL balance, asked only of a table whose balance may be
/// NULL; `None` if the count could not be read.
fn null_balances(conn: &mut diesel::PgConnection, shape: &db::shape::Shape) -> Option<i64> {
    let nullable = shape
        .columns
        .iter()
        .any(|c| c.name == "balance" && c.nullable);
    nullable.then(|| db::null_balances(conn).ok()).flatten()
}

fn retrier(cli: &Cli, server: Server) -> anyhow::Result<Retrier> {
    let retrier = cli.retry.retrier().for_server(server);
    match (cli.retry.protocol, server) {
        (ProtocolChoice::Restart, _) => Ok(retrier.with_restart_protocol()),
        // On PostgreSQL a rollback to a savepoint keeps the snapshot that
        // conflicted, so the protocol would only add round trips.
        (ProtocolChoice::Savepoint, Server::PostgreSql) => Err(usage(
            "--protocol savepoint needs CockroachDB, and this server is PostgreSQL; \
             use --protocol restart or auto",
        )),
        _ => Ok(retrier),
    }
}
