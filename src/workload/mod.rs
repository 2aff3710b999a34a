//! The `workload` subcommand: random transfers from several threads through
//! the retry helper, measured (throughput, retries, latency percentiles) and
//! checked (the total balance must not change, no balance may go negative).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Instant;

use anyhow::Context;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

use crate::bank::create::{create_accounts, explain_repeated_seed};
use crate::bank::{self, Amount, BankError};
use crate::db::PgPool;
use crate::plan::{Batches, Length, Settings};
use crate::watchdog::Watchdog;
use diesel_tx_retry::{Held, Resolution, Retrier, TxError};

/// The largest amount one transfer moves; balances start below 1,000,000, so
/// transfers rarely find too little money.
const MAX_AMOUNT: i64 = 100;

mod report;

use report::{Attempts, Tally};
pub use report::{Latency, Ledger, Report, Resolved, RetriesByCause};

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
    retrier: &Retrier,
    watchdog: &Watchdog,
    settings: Settings,
    last_words: impl Fn(&Report) + Send + Sync + 'static,
) -> anyhow::Result<Finished> {
    let attempts = Arc::new(Attempts::default());
    let retrier = &retrier.clone().with_observer(attempts.clone());
    let mut rng = seeded(settings.seed(), 0);
    let total = settings.accounts();
    let created = create_accounts(
        pool,
        retrier,
        watchdog,
        &mut rng,
        total,
        Batches::default(),
        |_| Ok(()),
    )
    .map_err(|err| explain_repeated_seed(err, settings.seed()))?;
    let ids = created.ids;

    // Every worker's connection is opened before the clock starts, as
    // pgbench's "tps without initial connection time" does: the rate is
    // that of transfers, not of connecting. Workers whose connection the
    // server refused ("too many clients") do not start, and the report
    // counts them: waiting for each in turn would only repeat the refusal.
    let mut warm = Vec::with_capacity(settings.workers());
    let mut refusal = None;
    while warm.len() < settings.workers() && refusal.is_none() {
        match pool.get() {
            Ok(conn) => warm.push(conn),
            Err(err) => refusal = Some(err),
        }
    }
    let connected = warm.len();
    drop(warm);
    if let Some(err) = &refusal {
        tracing::warn!(
            "{} of {} workers got no connection and do not run: {err}",
            settings.workers() - connected,
            settings.workers()
        );
    }
    let taken = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    // Each worker counts into its own tally (locked only by it, and by the
    // watchdog if it ever has to speak for a stalled run).
    let tallies: Arc<Vec<Mutex<Tally>>> =
        Arc::new((0..connected).map(|_| Mutex::new(Tally::new())).collect());
    let in_flight = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let cpu_before = process_cpu();
    let total_before = created.total_balance;
    let _last_words = watchdog.last_words({
        let (tallies, in_flight) = (Arc::clone(&tallies), Arc::clone(&in_flight));
        let attempts = Arc::clone(&attempts);
        move |line| {
            let mut report = Report::new(
                &settings,
                &merged(&tallies).with_unconnected(settings.workers() - connected),
                &attempts,
                start.elapsed(),
                total_before,
                None,
                None,
            );
            report.in_doubt += in_flight.load(Ordering::Relaxed);
            report.error = Some(line.to_owned());
            last_words(&report);
        }
    });
    let errors: Vec<Option<anyhow::Error>> = thread::scope(|scope| {
        let workers: Vec<_> = tallies
            .iter()
            .enumerate()
            .map(|(worker, tally)| {
                let (ids, taken, stop, in_flight) = (&ids, &taken, &stop, &*in_flight);
                scope.spawn(move || {
                    let mut rng = seeded(settings.seed(), worker as u64 + 1);
                    let error = transfer_loop(
                        pool,
                        retrier,
                        watchdog,
                        ids,
                        settings.length(),
                        Shared {
                            start,
                            taken,
                            stop,
                            in_flight,
                            tally,
                        },
                        &mut rng,
                    );
                    if error.is_some() {
                        // One worker hitting a hard error stops the others.
                        stop.store(true, Ordering::Relaxed);
                    }
                    error
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Some(anyhow::anyhow!("a worker thread panicked")))
            })
            .collect()
    });
    let elapsed = start.elapsed();
    let cpu = process_cpu().saturating_sub(cpu_before);
    let tally = merged(&tallies).with_unconnected(settings.workers() - connected);
    let mut error = errors.into_iter().flatten().next();
    if let (0, Some(err)) = (connected, refusal) {
        error = error.or(Some(
            anyhow::Error::from(err).context("no worker could connect"),
        ));
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
    report.error = error.as_ref().map(crate::app::error_line);
    Ok(Finished { report, error })
}

/// The counts of every worker, added up.
fn merged(tallies: &[Mutex<Tally>]) -> Tally {
    let mut total = Tally::new();
    for tally in tallies {
        total.merge(&tally.lock().unwrap_or_else(PoisonError::into_inner));
    }
    total
}

/// What a worker shares with the others and with the watchdog.
struct Shared<'a> {
    start: Instant,
    /// Transfers begun, when the length is a count.
    taken: &'a AtomicU64,
    /// Set when one worker meets a hard error.
    stop: &'a AtomicBool,
    /// Transfers under way, across workers.
    in_flight: &'a AtomicU64,
    /// This worker's counts.
    tally: &'a Mutex<Tally>,
}

/// One worker: transfers until the length is reached, `stop` is set, or a
/// hard error, which it returns.
fn transfer_loop(
    pool: &PgPool,
    retrier: &Retrier,
    watchdog: &Watchdog,
    ids: &[Uuid],
    length: Length,
    shared: Shared<'_>,
    rng: &mut StdRng,
) -> Option<anyhow::Error> {
    let Shared {
        start,
        taken,
        stop,
        in_flight,
        tally,
    } = shared;
    let count = |update: &dyn Fn(&mut Tally)| {
        update(&mut tally.lock().unwrap_or_else(PoisonError::into_inner));
    };
    // One connection for this worker's whole run, as each pgbench client
    // has, replaced only when lost: no pool lock shared by every worker on
    // each transfer, and no connection handed from thread to thread.
    let held = Held::new(pool);
    loop {
        let more = match length {
            Length::Transfers(limit) => taken.fetch_add(1, Ordering::Relaxed) < limit,
            Length::Duration(limit) => start.elapsed() < limit,
        };
        if !more || stop.load(Ordering::Relaxed) {
            return None;
        }
        let from = rng.random_range(0..ids.len());
        let to = (from + rng.random_range(1..ids.len())) % ids.len();
        let (from, to) = (ids[from], ids[to]);
        let amount = Amount::Exactly(rng.random_range(1..=MAX_AMOUNT));
        // The ledger key, drawn before the helper: it makes the transfer
        // idempotent, so a commit in doubt is retried and resolved.
        let key = uuid::Builder::from_random_bytes(rng.random()).into_uuid();
        let began = Instant::now();
        let _watch = watchdog.watch("transferring", retrier);
        in_flight.fetch_add(1, Ordering::Relaxed);
        let result = retrier
            .build_transaction()
            .run_idempotent(&held, key, |conn, attempt| {
                bank::transfer(conn, attempt, from, to, amount)
            });
        in_flight.fetch_sub(1, Ordering::Relaxed);
        match result {
            Ok(done) => count(&|t| {
                t.committed += 1;
                match done.doubt() {
                    Some(Resolution::AppliedEarlier) => t.resolved.applied_earlier += 1,
                    Some(Resolution::AppliedNow) => t.resolved.applied_on_retry += 1,
                    _ => {}
                }
                let micros = u64::try_from(began.elapsed().as_micros()).unwrap_or(u64::MAX);
                t.latency_us.saturating_record(micros.max(1));
            }),
            Err(TxError::Failed(BankError::InsufficientFunds { .. })) => {
                count(&|t| t.rejected += 1)
            }
            Err(TxError::GaveUp { .. }) => count(&|t| t.gave_up += 1),
            Err(TxError::AmbiguousCommit { .. }) => count(&|t| t.in_doubt += 1),
            // This worker has no connection to work with; the others go on.
            Err(TxError::NoConnection(err)) => {
                tracing::warn!(error = %err, "a worker could not get a connection and stopped");
                count(&|t| t.unconnected += 1);
                return None;
            }
            Err(other) => {
                count(&|t| t.failed += 1);
                return Some(anyhow::Error::from(other).context("transferring"));
            }
        }
    }
}

/// CPU time this process has used, every thread, user and system: the
/// client's cost of the transfers, the figure bench/run sets beside
/// pgbench's. The app's one `unsafe` call: std has no process CPU clock.
#[allow(unsafe_code)]
fn process_cpu() -> std::time::Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec it is given.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut now) };
    if rc != 0 {
        return std::time::Duration::ZERO;
    }
    std::time::Duration::new(
        u64::try_from(now.tv_sec).unwrap_or(0),
        u32::try_from(now.tv_nsec).unwrap_or(0),
    )
}

fn seeded(seed: Option<u64>, stream: u64) -> StdRng {
    match seed {
        Some(seed) => {
            StdRng::seed_from_u64(seed.wrapping_add(stream.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
        }
        None => StdRng::from_os_rng(),
    }
}
