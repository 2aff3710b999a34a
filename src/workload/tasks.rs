//! The workload's workers as tokio tasks, on the async front end
//! (`--async`): any number of them on the runtime's few threads, each
//! transfer's call dropped at the request timeout if one is set.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{draw, record, seeded, Crew, Next};
use crate::bank;
use crate::db::asynch::AsyncPool;

/// Opens up to `workers` connections before the clock starts: how many
/// opened, and the refusal that stopped it short, if one did.
pub(super) fn connect(
    pool: &AsyncPool,
    runtime: &tokio::runtime::Runtime,
    workers: usize,
) -> (usize, Option<anyhow::Error>) {
    runtime.block_on(async {
        let mut warm = Vec::with_capacity(workers);
        while warm.len() < workers {
            match pool.get().await {
                Ok(conn) => warm.push(conn),
                Err(err) => return (warm.len(), Some(err.into())),
            }
        }
        (warm.len(), None)
    })
}

/// Runs one task per tally until the pace says stop; each task's hard
/// error, if it met one.
pub(super) fn run(
    pool: &AsyncPool,
    runtime: &tokio::runtime::Runtime,
    request_timeout: Option<Duration>,
    crew: &Crew<'_>,
) -> Vec<Option<anyhow::Error>> {
    runtime.block_on(async {
        let tasks: Vec<_> = (0..crew.tallies.len())
            .map(|worker| {
                let (pool, retrier, watchdog) =
                    (pool.clone(), crew.retrier.clone(), crew.watchdog.clone());
                let (ids, pace, tallies, seed) = (
                    crew.ids.clone(),
                    crew.pace.clone(),
                    crew.tallies.clone(),
                    crew.seed,
                );
                tokio::spawn(async move {
                    let mut rng = seeded(seed, worker as u64 + 1);
                    let tally = &tallies[worker];
                    while pace.another() {
                        let (key, from, to, amount) = draw(&mut rng, &ids);
                        let began = Instant::now();
                        let _watch = watchdog.watch("transferring", &retrier);
                        pace.in_flight.fetch_add(1, Ordering::Relaxed);
                        let call = retrier.build_transaction().run_idempotent_async(
                            &pool,
                            key,
                            async |conn, attempt| {
                                bank::asynch::transfer(conn, attempt, from, to, amount).await
                            },
                        );
                        let result = match request_timeout {
                            Some(limit) => tokio::time::timeout(limit, call).await.ok(),
                            None => Some(call.await),
                        };
                        pace.in_flight.fetch_sub(1, Ordering::Relaxed);
                        let Some(result) = result else {
                            // Dropped at the deadline: the helper rolled back
                            // or let its commit finish (the observer heard).
                            tally
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .cancelled += 1;
                            continue;
                        };
                        match record(tally, result, began) {
                            Next::Go => {}
                            Next::Quit => return None,
                            Next::Fail(err) => {
                                pace.stop.store(true, Ordering::Relaxed);
                                return Some(err);
                            }
                        }
                    }
                    None
                })
            })
            .collect();
        let mut errors = Vec::with_capacity(tasks.len());
        for task in tasks {
            errors.push(
                task.await
                    .unwrap_or_else(|_| Some(anyhow::anyhow!("a worker task panicked"))),
            );
        }
        // A transfer given up at its deadline may have left its commit to a
        // task of the helper's, which holds the connection until the commit
        // answers and the observer hears how it ended: wait for those
        // (within a statement's bound), so that the report counts them.
        let bound = crew
            .retrier
            .statement_timeout()
            .unwrap_or(Duration::from_secs(20));
        let until = Instant::now() + bound;
        while Instant::now() < until {
            let state = pool.state();
            if state.idle_connections >= state.connections {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        errors
    })
}
