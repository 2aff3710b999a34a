//! The workload's workers as OS threads, on the blocking front end: each
//! keeps one pooled connection for its whole run, as each pgbench client
//! does.

use std::thread;

use diesel_tx_retry::Held;

use super::{draw, record, seeded, Crew, Next};
use crate::bank;
use crate::db::PgPool;

/// Opens up to `workers` connections before the clock starts: how many
/// opened, and the refusal that stopped it short, if one did.
pub(super) fn connect(pool: &PgPool, workers: usize) -> (usize, Option<anyhow::Error>) {
    let mut warm = Vec::with_capacity(workers);
    while warm.len() < workers {
        match pool.get() {
            Ok(conn) => warm.push(conn),
            Err(err) => return (warm.len(), Some(err.into())),
        }
    }
    (warm.len(), None)
}

/// Runs one thread per tally until the pace says stop; each thread's hard
/// error, if it met one.
pub(super) fn run(pool: &PgPool, crew: &Crew<'_>) -> Vec<Option<anyhow::Error>> {
    thread::scope(|scope| {
        let workers: Vec<_> = (0..crew.tallies.len())
            .map(|worker| scope.spawn(move || transfer_loop(pool, crew, worker)))
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Some(anyhow::anyhow!("a worker thread panicked")))
            })
            .collect()
    })
}

/// One worker: transfers until the pace says stop, or a hard error, which
/// it returns (and which stops the others).
fn transfer_loop(pool: &PgPool, crew: &Crew<'_>, worker: usize) -> Option<anyhow::Error> {
    let mut rng = seeded(crew.seed, worker as u64 + 1);
    let tally = &crew.tallies[worker];
    // One connection for this worker's whole run, replaced only when lost:
    // no pool lock shared by every worker on each transfer, and no
    // connection handed from thread to thread.
    let held = Held::new(pool);
    while crew.pace.another() {
        let (key, from, to, amount) = draw(&mut rng, crew.ids);
        let began = std::time::Instant::now();
        let _watch = crew.watchdog.watch("transferring", crew.retrier);
        crew.pace
            .in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let result =
            crew.retrier
                .build_transaction()
                .run_idempotent(&held, key, |conn, attempt| {
                    bank::transfer(conn, attempt, from, to, amount)
                });
        crew.pace
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        match record(tally, result, began) {
            Next::Go => {}
            Next::Quit => return None,
            Next::Fail(err) => {
                crew.pace
                    .stop
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                return Some(err);
            }
        }
    }
    None
}
