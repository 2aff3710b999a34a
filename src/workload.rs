//! The `workload` subcommand: random transfers from several threads through
//! the retry helper, measured (throughput, retries, latency percentiles) and
//! checked (the total balance must not change, no balance may go negative).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
use crate::retry::{Retrier, TxError, TxOptions};
use crate::watchdog;

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
    /// Retries across all transfers.
    pub retries: u64,
    /// Transfers that used up their retry budget.
    pub gave_up: u64,
    /// Transfers whose commit outcome is unknown (in doubt).
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
/// # Errors
/// Creating the accounts failed: there is nothing to report.
pub fn run(pool: &PgPool, retrier: &Retrier, settings: Settings) -> anyhow::Result<Finished> {
    let mut rng = seeded(settings.seed(), 0);
    let total = settings.accounts();
    let created = job::create_accounts(pool, retrier, &mut rng, total, Batches::default(), |_| {
        Ok(())
    })
    .map_err(|err| job::explain_repeated_seed(err, settings.seed()))?;
    let ids = created.ids;

    // Every worker's connection is opened before the clock starts, as
    // pgbench's "tps without initial connection time" does: the rate is
    // that of transfers, not of connecting. A connection that cannot be
    // had now is counted when its worker meets the same refusal.
    let warm: Vec<_> = (0..settings.workers())
        .map_while(|_| pool.get().ok())
        .collect();
    drop(warm);
    let taken = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let start = Instant::now();
    let outcomes: Vec<(Tally, Option<anyhow::Error>)> = thread::scope(|scope| {
        let workers: Vec<_> = (0..settings.workers())
            .map(|worker| {
                let (ids, taken, stop) = (&ids, &taken, &stop);
                scope.spawn(move || {
                    let mut rng = seeded(settings.seed(), worker as u64 + 1);
                    let (tally, error) = transfer_loop(
                        pool,
                        retrier,
                        ids,
                        settings.length(),
                        start,
                        taken,
                        stop,
                        &mut rng,
                    );
                    if error.is_some() {
                        // One worker hitting a hard error stops the others.
                        stop.store(true, Ordering::Relaxed);
                    }
                    (tally, error)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join().unwrap_or_else(|_| {
                    (
                        Tally::new(),
                        Some(anyhow::anyhow!("a worker thread panicked")),
                    )
                })
            })
            .collect()
    });
    let elapsed = start.elapsed();
    let mut tally = Tally::new();
    let mut error = None;
    for (outcome, failure) in outcomes {
        tally.merge(&outcome);
        error = error.or(failure);
    }
    let balances = pool
        .get()
        .context("checking the balances")
        .and_then(|mut conn| {
            bank::balance_summary(&mut conn, &ids).context("checking the balances")
        });
    let (total_after, negative_balances) = match balances {
        Ok((total, negative)) => (Some(total), Some(negative)),
        Err(err) => {
            error = error.or(Some(err));
            (None, None)
        }
    };
    let ms = |quantile: f64| tally.latency_us.value_at_quantile(quantile) as f64 / 1_000.0;
    let elapsed_s = elapsed.as_secs_f64();
    let report = Report {
        workers: settings.workers(),
        accounts: settings.accounts() as u64,
        committed: tally.committed,
        rejected: tally.rejected,
        retries: tally.retries,
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
        total_before: created.total_balance,
        total_after,
        negative_balances,
        invariant_ok: total_after
            .zip(negative_balances)
            .map(|(total, negative)| total == created.total_balance && negative == 0),
        error: error.as_ref().map(|err| format!("{err:#}")),
    };
    Ok(Finished { report, error })
}

impl Report {
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
             retries: {retries}, gave up: {gave_up}, ambiguous commits (in doubt): {ambiguous}, failed: {failed}\n\
             latency ms: p50 {p50:.3}, p95 {p95:.3}, p99 {p99:.3}, max {max:.3}\n\
             invariant: {invariant}",
            accounts = self.accounts,
            workers = self.workers,
            elapsed = self.elapsed_s,
            committed = self.committed,
            tps = self.transfers_per_s,
            rejected = self.rejected,
            retries = self.retries,
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
    retries: u64,
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
            retries: 0,
            gave_up: 0,
            ambiguous: 0,
            failed: 0,
            unconnected: 0,
            // 1 µs to an hour at 3 significant digits.
            latency_us: Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .expect("valid histogram bounds"),
        }
    }

    fn merge(&mut self, other: &Tally) {
        self.committed += other.committed;
        self.rejected += other.rejected;
        self.retries += other.retries;
        self.gave_up += other.gave_up;
        self.ambiguous += other.ambiguous;
        self.failed += other.failed;
        self.unconnected += other.unconnected;
        self.latency_us
            .add(&other.latency_us)
            .expect("histograms share their bounds");
    }
}

/// One worker: transfers until the length is reached, `stop` is set, or a
/// hard error, which it returns with the counts so far.
#[allow(clippy::too_many_arguments)]
fn transfer_loop(
    pool: &PgPool,
    retrier: &Retrier,
    ids: &[Uuid],
    length: Length,
    start: Instant,
    taken: &AtomicU64,
    stop: &AtomicBool,
    rng: &mut StdRng,
) -> (Tally, Option<anyhow::Error>) {
    let mut tally = Tally::new();
    loop {
        let more = match length {
            Length::Transfers(limit) => taken.fetch_add(1, Ordering::Relaxed) < limit,
            Length::Duration(limit) => start.elapsed() < limit,
        };
        if !more || stop.load(Ordering::Relaxed) {
            return (tally, None);
        }
        let from = rng.random_range(0..ids.len());
        let to = (from + rng.random_range(1..ids.len())) % ids.len();
        let (from, to) = (ids[from], ids[to]);
        let amount = Amount::Exactly(rng.random_range(1..=MAX_AMOUNT));
        let began = Instant::now();
        let _watch = watchdog::watch("transferring", retrier.worst_case());
        match retrier.run(pool, TxOptions::default(), |conn| {
            bank::transfer(conn, from, to, amount)
        }) {
            Ok(done) => {
                tally.committed += 1;
                tally.retries += u64::from(done.retries());
                let micros = u64::try_from(began.elapsed().as_micros()).unwrap_or(u64::MAX);
                tally.latency_us.saturating_record(micros.max(1));
            }
            Err(TxError::Failed(BankError::InsufficientFunds { .. })) => tally.rejected += 1,
            Err(TxError::GaveUp { attempts, .. }) => {
                tally.gave_up += 1;
                tally.retries += u64::from(attempts - 1);
            }
            Err(TxError::AmbiguousCommit { .. }) => tally.ambiguous += 1,
            // This worker has no connection to work with; the others go on.
            Err(TxError::Pool(err)) => {
                tracing::warn!(error = %err, "a worker could not get a connection and stopped");
                tally.unconnected += 1;
                return (tally, None);
            }
            Err(other) => {
                tally.failed += 1;
                return (
                    tally,
                    Some(anyhow::Error::from(other).context("transferring")),
                );
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
