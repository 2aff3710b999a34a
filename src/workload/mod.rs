//! The `workload` subcommand: random transfers from several threads through
//! the retry helper, measured (throughput, retries, latency percentiles) and
//! checked (the total balance must not change, no balance may go negative).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

use crate::bank::{self, Amount, BankError, Transfer};
use crate::create::{create_accounts, explain_repeated_seed};
use crate::db::asynch::AsyncPool;
use crate::db::PgPool;
use crate::plan::{Batches, Length, Settings};
use crate::teller::Teller;
use crate::watchdog::Watchdog;
use diesel_tx_retry::{Applied, Budget, Committed, Resolution, Retrier, TxError};

/// The largest amount one transfer moves; balances start below 1,000,000, so
/// transfers rarely find too little money.
const MAX_AMOUNT: i64 = 100;

mod report;
mod tally;
mod tasks;
mod threads;

pub use report::{GaveUpByBudget, Latency, Ledger, Report, Resolved, RetriesByCause};
use tally::{Attempts, Tally};

/// A workload that ran: its report, and the error that ended it early, if
/// one did (the report then says what happened until then).
#[derive(Debug)]
pub struct Finished {
    /// What happened.
    pub report: Report,
    /// The hard error that stopped the transfers, or the balance check.
    pub error: Option<anyhow::Error>,
}

/// Creates the accounts, runs the transfers, checks the invariant. A
/// transfer failing in a way that is neither a conflict nor a refusal (the
/// database went away, an account deleted under it) stops every worker; the
/// report then covers what happened until then, and [`Finished::error`]
/// says why it stopped.
///
/// If the server stops answering altogether (a frozen process; see
/// [`crate::watchdog`]), the watchdog ends the run: `last_words` then gets the
/// report so far, with the stall as its error, the transfers still waiting
/// counted as in doubt, and the balances unread.
///
/// # Errors
/// Creating the accounts failed: there is nothing to report.
pub fn run(
    pool: &PgPool,
    workers: Workers<'_>,
    retrier: &Retrier,
    watchdog: &Watchdog,
    settings: Settings,
    last_words: impl Fn(&Report) + Send + Sync + 'static,
) -> anyhow::Result<Finished> {
    let attempts = Arc::new(Attempts::default());
    let retrier = &retrier.clone().with_observer(attempts.clone());
    let mut rng = seeded(settings.seed(), 0);
    let total = settings.accounts();
    let teller = match workers {
        Workers::Threads => Teller::Blocking { pool, retrier },
        Workers::Tasks { pool, runtime, .. } => Teller::Async {
            pool,
            retrier,
            runtime,
        },
    };
    let created = create_accounts(
        &teller,
        watchdog,
        &mut rng,
        total,
        Batches::default(),
        |_| Ok(()),
    )
    .map_err(|err| explain_repeated_seed(err, settings.seed()))?;
    let ids = Arc::new(created.ids);
    let commits_before = attempts.committed();

    // Every worker's connection is opened before the clock starts, as
    // pgbench's "tps without initial connection time" does: the rate is
    // that of transfers, not of connecting. Workers whose connection the
    // server refused ("too many clients") do not start, and the report
    // counts them: waiting for each in turn would only repeat the refusal.
    let (connected, refusal) = match workers {
        Workers::Threads => threads::connect(pool, settings.workers()),
        Workers::Tasks { pool, runtime, .. } => tasks::connect(pool, runtime, settings.workers()),
    };
    if let Some(err) = &refusal {
        tracing::warn!(
            "{} of {} workers got no connection and do not run: {err}",
            settings.workers() - connected,
            settings.workers()
        );
    }
    // Each worker counts into its own tally (locked only by it, and by the
    // watchdog if it ever has to speak for a stalled run).
    let tallies: Arc<Vec<Mutex<Tally>>> =
        Arc::new((0..connected).map(|_| Mutex::new(Tally::new())).collect());
    let pace = Arc::new(Pace::new(settings.length()));
    // The process's CPU time, every thread, user and system: the client's
    // cost of the transfers, the figure bench/run sets beside pgbench's.
    let cpu_before = cpu_time::ProcessTime::try_now().ok();
    let total_before = created.total_balance;
    let _last_words = watchdog.last_words({
        let (tallies, pace) = (Arc::clone(&tallies), Arc::clone(&pace));
        let attempts = Arc::clone(&attempts);
        move |line| {
            let mut report = Report::new(
                &settings,
                &merged(&tallies).with_unconnected(settings.workers() - connected),
                &attempts,
                pace.start.elapsed(),
                total_before,
                None,
                None,
            );
            report.in_doubt += pace.in_flight.load(Ordering::Relaxed);
            report.error = Some(line.to_owned());
            last_words(&report);
        }
    });
    let crew = Crew {
        retrier,
        watchdog,
        ids: &ids,
        pace: &pace,
        tallies: &tallies,
        seed: settings.seed(),
    };
    let errors = match workers {
        Workers::Threads => threads::run(pool, &crew),
        Workers::Tasks {
            pool,
            runtime,
            request_timeout,
        } => tasks::run(pool, runtime, request_timeout, &crew),
    };
    let elapsed = pace.start.elapsed();
    let cpu = cpu_before
        .and_then(|before| before.try_elapsed().ok())
        .unwrap_or_default();
    let mut tally = merged(&tallies).with_unconnected(settings.workers() - connected);
    // What committed although its caller had given up on it: the observer
    // heard every commit, the workers only those they waited for.
    tally.cancelled_committed =
        (attempts.committed() - commits_before).saturating_sub(tally.committed);
    let mut error = errors.into_iter().flatten().next();
    if let (0, Some(err)) = (connected, refusal) {
        error = error.or(Some(err.context("no worker could connect")));
    }
    let checked = {
        let _watch = watchdog.watch("checking the balances", retrier);
        pool.get()
            .context("checking the balances")
            .and_then(|mut conn| Ok(bank::audit(&mut conn, &ids, &created.balances)?))
            .context("checking the balances")
    };
    let (balances, ledger) = match checked {
        Ok(audit) => (
            Some((audit.total, audit.negative)),
            Some(Ledger {
                rows: audit.ledger_rows,
                mismatched_accounts: audit.mismatched_accounts,
            }),
        ),
        Err(err) => {
            error = error.or(Some(err));
            (None, None)
        }
    };
    let mut report = Report::new(
        &settings,
        &tally,
        &attempts,
        elapsed,
        total_before,
        balances,
        ledger,
    );
    report.set_client_cpu(cpu);
    report.error = error.as_ref().map(crate::failure::error_line);
    Ok(Finished { report, error })
}

/// How the workers run.
#[derive(Clone, Copy)]
pub enum Workers<'a> {
    /// One OS thread each, on the blocking front end.
    Threads,
    /// One tokio task each, on `runtime` (`--async`), with connections from
    /// `pool`; each transfer's call is dropped after `request_timeout`, as
    /// a service drops a request past its deadline.
    Tasks {
        /// The async pool.
        pool: &'a AsyncPool,
        /// The runtime the tasks run on.
        runtime: &'a tokio::runtime::Runtime,
        /// When a transfer's call is given up.
        request_timeout: Option<Duration>,
    },
}

/// The counts of every worker, added up.
fn merged(tallies: &[Mutex<Tally>]) -> Tally {
    let mut total = Tally::new();
    for tally in tallies {
        total.merge(&tally.lock().unwrap_or_else(PoisonError::into_inner));
    }
    total
}

/// What the workers share: the helper, the watchdog, the accounts, the pace
/// and a tally each.
struct Crew<'a> {
    retrier: &'a Retrier,
    watchdog: &'a Watchdog,
    ids: &'a Arc<Vec<Uuid>>,
    pace: &'a Arc<Pace>,
    tallies: &'a Arc<Vec<Mutex<Tally>>>,
    seed: Option<u64>,
}

/// When the run ends, and what is under way.
struct Pace {
    start: Instant,
    length: Length,
    /// Transfers begun, when the length is a count.
    taken: AtomicU64,
    /// Set when one worker meets a hard error.
    stop: AtomicBool,
    /// Transfers under way, across workers.
    in_flight: AtomicU64,
}

impl Pace {
    fn new(length: Length) -> Self {
        Self {
            start: Instant::now(),
            length,
            taken: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            in_flight: AtomicU64::new(0),
        }
    }

    /// Whether a worker starts another transfer.
    fn another(&self) -> bool {
        let more = match self.length {
            Length::Transfers(limit) => self.taken.fetch_add(1, Ordering::Relaxed) < limit,
            Length::Duration(limit) => self.start.elapsed() < limit,
        };
        more && !self.stop.load(Ordering::Relaxed)
    }
}

/// A transfer's accounts, amount and ledger key, drawn before the helper:
/// the key makes the transfer idempotent, so a commit in doubt is retried
/// and resolved.
fn draw(rng: &mut StdRng, ids: &[Uuid]) -> (Uuid, Uuid, Uuid, Amount) {
    let from = rng.random_range(0..ids.len());
    let to = (from + rng.random_range(1..ids.len())) % ids.len();
    let amount = Amount::Exactly(rng.random_range(1..=MAX_AMOUNT));
    let key = uuid::Builder::from_random_bytes(rng.random()).into_uuid();
    (key, ids[from], ids[to], amount)
}

/// What a worker does after a transfer.
enum Next {
    /// Another transfer.
    Go,
    /// Stop: this worker has no connection to work with; the others go on.
    Quit,
    /// Stop everyone: a hard error.
    Fail(anyhow::Error),
}

/// Counts a transfer's `result` into `tally`; `began` is when its call
/// began.
fn record(
    tally: &Mutex<Tally>,
    result: Result<Committed<Applied<Transfer>>, TxError<BankError>>,
    began: Instant,
) -> Next {
    let mut t = tally.lock().unwrap_or_else(PoisonError::into_inner);
    match result {
        Ok(done) => {
            t.committed += 1;
            match done.doubt() {
                Some(Resolution::AppliedEarlier) => t.resolved.applied_earlier += 1,
                Some(Resolution::AppliedNow) => t.resolved.applied_on_retry += 1,
                _ => {}
            }
            let micros = u64::try_from(began.elapsed().as_micros()).unwrap_or(u64::MAX);
            t.latency_us.saturating_record(micros.max(1));
            Next::Go
        }
        Err(TxError::Failed(BankError::InsufficientFunds { .. })) => {
            t.rejected += 1;
            Next::Go
        }
        Err(TxError::GaveUp { budget, .. }) => {
            match budget {
                Budget::Retries => t.gave_up_by.retry_budget += 1,
                Budget::Deadline => t.gave_up_by.deadline += 1,
                _ => t.gave_up_by.attempts += 1,
            }
            Next::Go
        }
        Err(TxError::AmbiguousCommit { .. }) => {
            t.in_doubt += 1;
            Next::Go
        }
        Err(TxError::NoConnection(err)) => {
            tracing::warn!(error = %err, "a worker could not get a connection and stopped");
            t.unconnected += 1;
            Next::Quit
        }
        Err(other) => {
            t.failed += 1;
            Next::Fail(anyhow::Error::from(other).context("transferring"))
        }
    }
}

fn seeded(seed: Option<u64>, stream: u64) -> StdRng {
    match seed {
        Some(seed) => {
            StdRng::seed_from_u64(seed.wrapping_add(stream.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
        }
        None => StdRng::from_os_rng(),
    }
}
