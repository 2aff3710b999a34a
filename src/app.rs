//! The edge: turns the parsed command line into work, wires each command to
//! its connections and front end, and hands failures to [`crate::failure`].

use std::io::Write;
use std::sync::{Arc, PoisonError};

use anyhow::{bail, Context};

use crate::config::{Cli, Command, ProtocolChoice, WorkloadArgs};
use crate::db::prepare::{prepare, prepare_async, Setup};
use crate::db::{self, DbUrl};
use crate::failure::usage;
use crate::output::{Labelled, Output, Shared};
use crate::plan::{Plan, Settings};
use crate::teller::Teller;
use crate::watchdog::Watchdog;
use crate::{job, migrate, workload};
use diesel_tx_retry::{Retrier, Server};

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

/// The work the command line asks for, every argument checked.
enum Work<'a> {
    Migrate,
    Job(Plan),
    Workload(Settings, &'a WorkloadArgs),
}

/// Runs what `cli` asks for, writing results to `out`.
///
/// # Errors
/// Anything that stops the command; render it with
/// [`crate::failure::error_line`].
pub fn run(cli: &Cli, runtime: &Runtime, out: &Output) -> anyhow::Result<()> {
    // Every argument is checked before anything connects or writes.
    let work = match &cli.command {
        Some(Command::Migrate) => Work::Migrate,
        Some(Command::Workload(args)) => {
            Work::Workload(Settings::try_from(args).map_err(usage)?, args)
        }
        None => Work::Job(Plan::try_from(&cli.job).map_err(usage)?),
    };
    let raw = cli.database_url.as_deref().ok_or_else(|| {
        usage("no database url; set DATABASE_URL (or put it in .env, see .env.example) or pass --database-url")
    })?;
    let url = DbUrl::parse(raw).map_err(usage)?;
    let mut labelled = Labelled(Shared(out));
    match work {
        Work::Migrate => migrate::run(
            &url,
            cli.retry.statement_timeout,
            cli.verbose,
            &mut labelled,
        ),
        Work::Job(plan) => main_job(cli, runtime, &url, plan, &mut labelled),
        Work::Workload(settings, args) => workload(cli, runtime, &url, settings, args, out),
    }
}

fn main_job(
    cli: &Cli,
    runtime: &Runtime,
    url: &DbUrl,
    plan: Plan,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let setup = setup(cli, runtime);
    let report = match front_end(cli, url)? {
        Some(tokio) => {
            let (retrier, pool, _) = prepare_async(&setup, &tokio, url, 1, |s| retrier(cli, s))?;
            let teller = Teller::Async {
                pool: &pool,
                retrier: &retrier,
                runtime: &tokio,
            };
            job::run(&teller, &runtime.watchdog, plan, out)?
        }
        None => {
            // Statements that run once go unprepared (preparing costs a round
            // trip of its own); but when the same INSERT repeats, as in a
            // bulk run, preparing it once saves the server parsing it again.
            let repeats = plan.accounts() > plan.batches().rows_per_insert();
            let (retrier, pool, _) = prepare(&setup, url, 1, repeats, |s| retrier(cli, s))?;
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
    args: &WorkloadArgs,
    output: &Output,
) -> anyhow::Result<()> {
    let workers = u32::try_from(settings.workers()).context("--workers is too large")?;
    let front = front_end(cli, url)?;
    if front.is_none() && args.request_timeout.is_some() {
        return Err(usage(
            "--request-timeout drops a transfer's async call, and needs --async; add --async, or drop it",
        ));
    }
    let setup = setup(cli, runtime);
    // With --async the transfers have a pool of their own, and a blocking
    // one (which connects only when asked) reads the balances at the end.
    let (retrier, pool, tasks) = match &front {
        Some(tokio) => {
            let (retrier, tasks, url) =
                prepare_async(&setup, tokio, url, workers, |s| retrier(cli, s))?;
            let manager = db::Manager::new(&url).with_lifetime(setup.lifetime);
            let blocking = db::pool_of(manager, 1, setup.pool_timeout)
                .context("building the connection pool")?;
            (retrier, blocking, Some((tokio, tasks)))
        }
        None => {
            let (retrier, pool, _) = prepare(&setup, url, workers, true, |s| retrier(cli, s))?;
            (retrier, pool, None)
        }
    };
    let workers = match &tasks {
        Some((tokio, pool)) => workload::Workers::Tasks {
            pool,
            runtime: tokio,
            request_timeout: args.request_timeout,
        },
        None => workload::Workers::Threads,
    };
    // If the watchdog has to end the run, the report so far goes to the
    // output from the watchdog's thread (this one is the one waiting),
    // before its line.
    let json = args.json;
    let last_words = {
        let output = Arc::clone(output);
        move |report: &workload::Report| {
            let mut out = output.lock().unwrap_or_else(PoisonError::into_inner);
            let _ = writeln!(out, "{}", report.render(json)).and_then(|()| out.flush());
        }
    };
    // Before the first transaction, so that every call is counted.
    let _exporter = match args.metrics_addr {
        Some(addr) => Some(crate::exporter::Exporter::start(addr)?),
        None => None,
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
    // The report first, even when the run was cut short: what happened
    // until then is worth as much as why it stopped.
    writeln!(out, "{}", finished.report.render(json))?;
    out.flush()?;
    if let Some(err) = finished.error {
        return Err(err);
    }
    if let Some(broken) = finished.report.broken_invariant() {
        bail!("{broken}");
    }
    Ok(())
}

/// How the run's connections are set up, from the flags.
fn setup(cli: &Cli, runtime: &Runtime) -> Setup {
    Setup {
        statement_timeout: cli.retry.statement_timeout,
        pool_timeout: cli.run.pool_timeout,
        lifetime: cli.run.max_conn_lifetime,
        verbose: cli.verbose,
        unnamed_statements: cli.unnamed_statements,
        connects: runtime.connects.clone(),
    }
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

/// The retry helper the flags describe, for `server`.
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
