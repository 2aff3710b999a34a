//! The `workload` subcommand: random transfers from several threads through
//! the retry helper, measured (throughput, retries, latency percentiles) and
//! checked (the total balance must not change, no balance may go negative).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Instant;

use anyhow::Context;
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use uuid::Uuid;

use crate::bank::{self, Amount, BankError};
use crate::db::PgPool;
use crate::job;
use crate::plan::{Batches, Length, Settings};
use crate::watchdog::Watchdog;
use diesel_tx_retry::{Attempt, Class, Observer, Outcome, Retrier, TxError, TxOptions};

/// The largest amount one transfer moves; balances start below 1,000,000, so
/// transfers rarely find too little money.
const MAX_AMOUNT: i64 = 100;

/// What happened, in the shape `--json` prints.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Worker threads.
    pub workers: usize,
    /// Accounts transferred between.
    pub accounts: u64,
    /// Transfers that committed.
    pub committed: u64,
    /// Transfers refused for insufficient funds (nothing to retry).
    pub rejected: u64,
    /// Retries across all transfers (as the helper's observer saw them).
    pub retries: u64,
    /// The retries by what caused them.
    pub retries_by_cause: RetriesByCause,
    /// Time spent backing off between attempts, in milliseconds, across all
    /// workers.
    pub backoff_ms: f64,
    /// Transfers that used up their retry budget.
    pub gave_up: u64,
    /// Transfers whose commit outcome is unknown (in doubt), including any
    /// still waiting for the server when a stall ended the run.
    pub ambiguous: u64,
    /// Transfers ended by a hard error (the one that stopped the run).
    pub failed: u64,
    /// Workers that could not get a connection (the server refused it, or
    /// none came within the pool's wait) and stopped.
    pub unconnected_workers: u64,
    /// Seconds the transfers ran.
    pub elapsed_s: f64,
    /// Committed transfers per second.
    pub transfers_per_s: f64,
    /// Latency of committed transfers, retries included.
    pub latency_ms: Latency,
    /// The sum of the accounts' balances before the transfers.
    pub total_before: i64,
    /// The sum after them, if it could be read.
    pub total_after: Option<i64>,
    /// Accounts with a negative balance afterwards, if they could be read.
    pub negative_balances: Option<i64>,
    /// Whether the total is unchanged and nothing is negative; `None` when
    /// the balances could not be read.
    pub invariant_ok: Option<bool>,
    /// What ended the run early, if anything did.
    pub error: Option<String>,
}

/// A workload that ran: its report, and the error that ended it early, if
/// one did (the report then says what happened until then).
#[derive(Debug)]
pub struct Finished {
    /// What happened.
    pub report: Report,
    /// The hard error that stopped the transfers, or the balance check.
    pub error: Option<anyhow::Error>,
}

/// Retries by their cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct RetriesByCause {
    /// Serialization failures (40001).
    pub conflict: u64,
    /// Connections lost before the commit, retried on a new one.
    pub connection_lost: u64,
    /// Anything else the helper retried (an idempotent commit in doubt).
    pub other: u64,
}

/// Counts the retries and the backoff of every attempt, as the retry
/// helper's observer: shared by the workers, one atomic add per retry.
#[derive(Debug, Default)]
struct Attempts {
    conflict: AtomicU64,
    connection_lost: AtomicU64,
    other: AtomicU64,
    backoff_us: AtomicU64,
}

impl Observer for Attempts {
    fn attempt(&self, attempt: &Attempt) {
        if let Outcome::Retry { delay, .. } = attempt.outcome {
            let counter = match attempt.cause {
                Some(Class::Conflict) => &self.conflict,
                Some(Class::ConnectionLost) => &self.connection_lost,
                _ => &self.other,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            let micros = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
            self.backoff_us.fetch_add(micros, Ordering::Relaxed);
        }
    }
}

impl Attempts {
    fn by_cause(&self) -> RetriesByCause {
        RetriesByCause {
            conflict: self.conflict.load(Ordering::Relaxed),
            connection_lost: self.connection_lost.load(Ordering::Relaxed),
            other: self.other.load(Ordering::Relaxed),
        }
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Slowest.
    pub max: f64,
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
    let created = job::create_accounts(
        pool,
        retrier,
        watchdog,
        &mut rng,
        total,
        Batches::default(),
        |_| Ok(()),
    )
    .map_err(|err| job::explain_repeated_seed(err, settings.seed()))?;
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
            );
            report.ambiguous += in_flight.load(Ordering::Relaxed);
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
    let tally = merged(&tallies).with_unconnected(settings.workers() - connected);
    let mut error = errors.into_iter().flatten().next();
    if let (0, Some(err)) = (connected, refusal) {
        error = error.or(Some(
            anyhow::Error::from(err).context("no worker could connect"),
        ));
    }
    let balances = {
        let _watch = watchdog.watch("checking the balances", retrier.policy());
        pool.get()
            .context("checking the balances")
            .and_then(|mut conn| {
                bank::balance_summary(&mut conn, &ids).context("checking the balances")
            })
    };
    let balances = match balances {
        Ok(found) => Some(found),
        Err(err) => {
            error = error.or(Some(err));
            None
        }
    };
    let mut report = Report::new(
        &settings,
        &tally,
        &attempts,
        elapsed,
        total_before,
        balances,
    );
    report.error = error.as_ref().map(|err| format!("{err:#}"));
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

impl Report {
    /// The report of `tally`; `balances` is the total and the count of
    /// negative balances afterwards, when they could be read.
    fn new(
        settings: &Settings,
        tally: &Tally,
        attempts: &Attempts,
        elapsed: std::time::Duration,
        total_before: i64,
        balances: Option<(i64, i64)>,
    ) -> Self {
        let ms = |quantile: f64| tally.latency_us.value_at_quantile(quantile) as f64 / 1_000.0;
        let elapsed_s = elapsed.as_secs_f64();
        let by_cause = attempts.by_cause();
        Report {
            workers: settings.workers(),
            accounts: settings.accounts() as u64,
            committed: tally.committed,
            rejected: tally.rejected,
            retries: by_cause.conflict + by_cause.connection_lost + by_cause.other,
            retries_by_cause: by_cause,
            backoff_ms: attempts.backoff_us.load(Ordering::Relaxed) as f64 / 1_000.0,
            gave_up: tally.gave_up,
            ambiguous: tally.ambiguous,
            failed: tally.failed,
            unconnected_workers: tally.unconnected,
            elapsed_s,
            transfers_per_s: tally.committed as f64 / elapsed_s.max(f64::EPSILON),
            latency_ms: Latency {
                p50: ms(0.50),
                p95: ms(0.95),
                p99: ms(0.99),
                max: tally.latency_us.max() as f64 / 1_000.0,
            },
            total_before,
            total_after: balances.map(|(total, _)| total),
            negative_balances: balances.map(|(_, negative)| negative),
            invariant_ok: balances.map(|(total, negative)| total == total_before && negative == 0),
            error: None,
        }
    }

    /// The report as a few lines of text.
    pub fn to_text(&self) -> String {
        let invariant = match (self.invariant_ok, self.total_after, self.negative_balances) {
            (Some(ok), Some(after), Some(negative)) => format!(
                "total {} before, {after} after, {negative} negative balances: {}",
                self.total_before,
                if ok { "ok" } else { "BROKEN" }
            ),
            _ => "could not be checked (the balances could not be read)".to_owned(),
        };
        let mut text = format!(
            "Ran transfers between {accounts} accounts from {workers} workers for {elapsed:.2} s.\n\
             committed: {committed} ({tps:.1} transfers/s), rejected (insufficient funds): {rejected}\n\
             retries: {retries} ({conflict} conflicts, {lost} lost connections, {other} other; \
             {backoff:.1} ms backing off), gave up: {gave_up}, ambiguous commits (in doubt): {ambiguous}, failed: {failed}\n\
             latency ms: p50 {p50:.3}, p95 {p95:.3}, p99 {p99:.3}, max {max:.3}\n\
             invariant: {invariant}",
            accounts = self.accounts,
            workers = self.workers,
            elapsed = self.elapsed_s,
            committed = self.committed,
            tps = self.transfers_per_s,
            rejected = self.rejected,
            retries = self.retries,
            conflict = self.retries_by_cause.conflict,
            lost = self.retries_by_cause.connection_lost,
            other = self.retries_by_cause.other,
            backoff = self.backoff_ms,
            gave_up = self.gave_up,
            ambiguous = self.ambiguous,
            failed = self.failed,
            p50 = self.latency_ms.p50,
            p95 = self.latency_ms.p95,
            p99 = self.latency_ms.p99,
            max = self.latency_ms.max,
        );
        if self.unconnected_workers > 0 {
            text.push_str(&format!(
                "\nworkers that could not connect: {} of {}",
                self.unconnected_workers, self.workers
            ));
        }
        text
    }
}

/// One worker's counts; merged at the end so that workers share nothing hot.
struct Tally {
    committed: u64,
    rejected: u64,
    gave_up: u64,
    ambiguous: u64,
    failed: u64,
    unconnected: u64,
    latency_us: Histogram<u64>,
}

impl Tally {
    fn new() -> Self {
        Self {
            committed: 0,
            rejected: 0,
            gave_up: 0,
            ambiguous: 0,
            failed: 0,
            unconnected: 0,
            // 1 µs to an hour at 3 significant digits.
            latency_us: Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .expect("valid histogram bounds"),
        }
    }

    fn with_unconnected(mut self, workers: usize) -> Self {
        self.unconnected += workers as u64;
        self
    }

    fn merge(&mut self, other: &Tally) {
        self.committed += other.committed;
        self.rejected += other.rejected;
        self.gave_up += other.gave_up;
        self.ambiguous += other.ambiguous;
        self.failed += other.failed;
        self.unconnected += other.unconnected;
        self.latency_us
            .add(&other.latency_us)
            .expect("histograms share their bounds");
    }
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
        let began = Instant::now();
        let _watch = watchdog.watch("transferring", retrier.policy());
        in_flight.fetch_add(1, Ordering::Relaxed);
        let result = retrier.run(pool, TxOptions::default(), |conn| {
            bank::transfer(conn, from, to, amount)
        });
        in_flight.fetch_sub(1, Ordering::Relaxed);
        match result {
            Ok(_) => count(&|t| {
                t.committed += 1;
                let micros = u64::try_from(began.elapsed().as_micros()).unwrap_or(u64::MAX);
                t.latency_us.saturating_record(micros.max(1));
            }),
            Err(TxError::Failed(BankError::InsufficientFunds { .. })) => {
                count(&|t| t.rejected += 1)
            }
            Err(TxError::GaveUp { .. }) => count(&|t| t.gave_up += 1),
            Err(TxError::AmbiguousCommit { .. }) => count(&|t| t.ambiguous += 1),
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

fn seeded(seed: Option<u64>, stream: u64) -> StdRng {
    match seed {
        Some(seed) => {
            StdRng::seed_from_u64(seed.wrapping_add(stream.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
        }
        None => StdRng::from_os_rng(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_report_counts_workers_that_could_not_connect_and_unread_balances() {
        let settings = Settings::new(4, 10, Length::Transfers(5), None).unwrap();
        let mut tally = Tally::new().with_unconnected(1);
        tally.committed = 5;
        let report = Report::new(
            &settings,
            &tally,
            &Attempts::default(),
            std::time::Duration::from_secs(1),
            100,
            None,
        );
        let text = report.to_text();
        assert!(
            text.ends_with(
                "invariant: could not be checked (the balances could not be read)\n\
                 workers that could not connect: 1 of 4"
            ),
            "{text}"
        );
        assert_eq!(report.invariant_ok, None);
        let report = Report::new(
            &settings,
            &Tally::new(),
            &Attempts::default(),
            std::time::Duration::from_secs(1),
            100,
            Some((100, 0)),
        );
        assert_eq!(report.invariant_ok, Some(true));
        assert!(!report.to_text().contains("could not connect"));
    }

    #[test]
    fn the_observer_counts_retries_by_cause_and_their_backoff() {
        let attempts = Attempts::default();
        let ms = std::time::Duration::from_millis;
        for (cause, outcome) in [
            (
                Class::Conflict,
                Outcome::Retry {
                    step: diesel_tx_retry::Step::Restart,
                    delay: ms(2),
                },
            ),
            (
                Class::Conflict,
                Outcome::Retry {
                    step: diesel_tx_retry::Step::Restart,
                    delay: ms(0),
                },
            ),
            (
                Class::ConnectionLost,
                Outcome::Retry {
                    step: diesel_tx_retry::Step::Reconnect,
                    delay: ms(3),
                },
            ),
            (
                Class::Conflict,
                Outcome::GaveUp(diesel_tx_retry::Budget::Attempts),
            ),
        ] {
            attempts.attempt(&attempt(cause, outcome));
        }
        assert_eq!(
            attempts.by_cause(),
            RetriesByCause {
                conflict: 2,
                connection_lost: 1,
                other: 0
            }
        );
        let settings = Settings::new(1, 2, Length::Transfers(1), None).unwrap();
        let report = Report::new(&settings, &Tally::new(), &attempts, ms(10), 0, None);
        assert_eq!((report.retries, report.backoff_ms), (3, 5.0));
    }

    /// An attempt as the helper would report it.
    fn attempt(cause: Class, outcome: Outcome) -> Attempt {
        Attempt::new(
            2,
            std::time::Duration::ZERO,
            Some(diesel_tx_retry::Stage::Statement),
            Some(cause),
            outcome,
        )
    }
}
