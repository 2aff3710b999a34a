//! A Jepsen-style bank test: concurrent transfers while a fault thread
//! terminates random backends. Every transfer also writes a log row in its
//! own transaction, so afterwards each one can be placed: committed, failed
//! before commit, or ambiguous (and then: applied or not). The balances must
//! equal the initial ones plus exactly the applied transfers.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use bank::bank::{insert_accounts, transfer, Amount, BankError};
use bank::db;
use bank::models::Account;
use bank::retry::{Retrier, RetryPolicy, TxError, TxOptions};
use diesel::prelude::*;
use diesel::sql_types::{Integer, Text};
use rand::Rng;
use uuid::Uuid;

use crate::helpers::*;

const ACCOUNTS: usize = 5;
const INITIAL: i64 = 10_000;
const WORKERS: usize = 6;
const RUN_FOR: Duration = Duration::from_secs(3);
const MAX_KILLS: u32 = 60;
const VICTIM: &str = "bank_jepsen_victim";

#[derive(Debug, Clone, Copy)]
struct Planned {
    id: Uuid,
    from: Uuid,
    to: Uuid,
    amount: i64,
}

#[derive(Default)]
struct Outcomes {
    committed: Vec<Planned>,
    failed: Vec<Planned>,
    ambiguous: Vec<Planned>,
}

#[derive(QueryableByName)]
struct Pid {
    #[diesel(sql_type = Integer)]
    pid: i32,
}

#[test]
fn transfers_survive_backends_killed_at_random_moments() {
    let db = TestDb::migrated();
    db.require_postgres(
        "the bank test's fault thread (pg_terminate_backend) and slow commits (PL/pgSQL)",
    );
    db.exec("CREATE TABLE transfer_log (id UUID PRIMARY KEY, from_id UUID NOT NULL, to_id UUID NOT NULL, amount INT8 NOT NULL)");
    // A commit that takes a few milliseconds, so that some kills land while
    // COMMIT is in flight and the ambiguous path is exercised for real.
    db.exec(
        "CREATE FUNCTION slow_commit() RETURNS trigger AS $$
         BEGIN PERFORM pg_sleep(0.003); RETURN NULL; END $$ LANGUAGE plpgsql;
         CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON transfer_log
         DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()",
    );
    let accounts: Vec<Account> = (0..ACCOUNTS)
        .map(|_| Account {
            id: Uuid::new_v4(),
            balance: INITIAL,
        })
        .collect();
    insert_accounts(&mut db.conn(), &accounts, bank::bank::ROWS_PER_INSERT).unwrap();

    // The workers' connections carry an application_name the killer looks for.
    let pool = db::pool(
        &db.url.with_param("application_name", VICTIM),
        WORKERS as u32,
    )
    .unwrap();
    let retrier = Retrier::new(
        RetryPolicy {
            max_attempts: 30,
            deadline: Some(Duration::from_secs(20)),
            ..RetryPolicy::default()
        },
        db.server,
    );
    let outcomes = Mutex::new(Outcomes::default());
    let retries = AtomicU32::new(0);
    let kills = AtomicU32::new(0);
    let stop = AtomicBool::new(false);
    let until = Instant::now() + RUN_FOR;

    thread::scope(|scope| {
        scope.spawn(|| {
            let mut killer = db.conn();
            let mut rng = rand::rng();
            while !stop.load(Ordering::Relaxed) && kills.load(Ordering::Relaxed) < MAX_KILLS {
                // Random moments: the pause is what makes them random, not
                // a synchronisation.
                thread::sleep(Duration::from_millis(rng.random_range(0..40)));
                let pids: Vec<Pid> = diesel::sql_query(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND datname = current_database()",
                )
                .bind::<Text, _>(VICTIM)
                .load(&mut killer)
                .unwrap();
                if pids.is_empty() {
                    continue;
                }
                let pid = pids[rng.random_range(0..pids.len())].pid;
                diesel::sql_query("SELECT pg_terminate_backend($1)").bind::<Integer, _>(pid).execute(&mut killer).unwrap();
                kills.fetch_add(1, Ordering::Relaxed);
            }
        });
        let workers: Vec<_> = (0..WORKERS)
            .map(|_| {
                scope.spawn(|| {
                    let mut rng = rand::rng();
                    while Instant::now() < until {
                        let from = rng.random_range(0..ACCOUNTS);
                        let to = (from + rng.random_range(1..ACCOUNTS)) % ACCOUNTS;
                        let planned = Planned {
                            id: Uuid::new_v4(),
                            from: accounts[from].id,
                            to: accounts[to].id,
                            amount: rng.random_range(1..=500),
                        };
                        let result = retrier.run(&pool, TxOptions::default(), |conn| {
                            transfer(
                                conn,
                                planned.from,
                                planned.to,
                                Amount::Exactly(planned.amount),
                            )?;
                            diesel::sql_query("INSERT INTO transfer_log VALUES ($1, $2, $3, $4)")
                                .bind::<diesel::sql_types::Uuid, _>(planned.id)
                                .bind::<diesel::sql_types::Uuid, _>(planned.from)
                                .bind::<diesel::sql_types::Uuid, _>(planned.to)
                                .bind::<diesel::sql_types::BigInt, _>(planned.amount)
                                .execute(conn)?;
                            Ok::<_, BankError>(())
                        });
                        let mut outcomes = outcomes.lock().unwrap();
                        match result {
                            Ok(done) => {
                                retries.fetch_add(done.retries(), Ordering::Relaxed);
                                outcomes.committed.push(planned);
                            }
                            Err(TxError::AmbiguousCommit { .. }) => {
                                outcomes.ambiguous.push(planned)
                            }
                            Err(TxError::Failed(BankError::InsufficientFunds { .. })) => {
                                outcomes.failed.push(planned)
                            }
                            Err(other) => panic!("unexpected failure: {other}"),
                        }
                    }
                })
            })
            .collect();
        // Stop the fault thread before looking at how the workers ended, so
        // a failing worker cannot leave it running.
        let results: Vec<_> = workers.into_iter().map(|w| w.join()).collect();
        stop.store(true, Ordering::Relaxed);
        for result in results {
            if let Err(panic) = result {
                std::panic::resume_unwind(panic);
            }
        }
    });

    let outcomes = outcomes.into_inner().unwrap();
    let logged: HashSet<Uuid> = {
        use diesel::dsl::sql;
        diesel::select(sql::<diesel::sql_types::Array<diesel::sql_types::Uuid>>(
            "COALESCE((SELECT array_agg(id) FROM transfer_log), '{}')",
        ))
        .get_result::<Vec<Uuid>>(&mut db.conn())
        .unwrap()
        .into_iter()
        .collect()
    };
    for t in &outcomes.committed {
        assert!(
            logged.contains(&t.id),
            "committed transfer {t:?} is missing"
        );
    }
    for t in &outcomes.failed {
        assert!(!logged.contains(&t.id), "failed transfer {t:?} was applied");
    }
    let applied_ambiguous: Vec<Planned> = outcomes
        .ambiguous
        .iter()
        .copied()
        .filter(|t| logged.contains(&t.id))
        .collect();
    assert_eq!(
        logged.len(),
        outcomes.committed.len() + applied_ambiguous.len(),
        "the log holds exactly the committed and the applied ambiguous transfers"
    );

    let mut expected: BTreeMap<Uuid, i64> = accounts.iter().map(|a| (a.id, INITIAL)).collect();
    for t in outcomes.committed.iter().chain(&applied_ambiguous) {
        *expected.get_mut(&t.from).unwrap() -= t.amount;
        *expected.get_mut(&t.to).unwrap() += t.amount;
    }
    let actual: BTreeMap<Uuid, i64> = db.accounts().into_iter().collect();
    assert_eq!(
        actual, expected,
        "each applied transfer moved its money exactly once"
    );
    assert_eq!(actual.values().sum::<i64>(), INITIAL * ACCOUNTS as i64);
    assert!(actual.values().all(|b| *b >= 0));

    let kills = kills.into_inner();
    eprintln!(
        "jepsen: {} transfers: {} committed, {} failed before commit, {} ambiguous ({} applied); {} retries; {} backends killed",
        outcomes.committed.len() + outcomes.failed.len() + outcomes.ambiguous.len(),
        outcomes.committed.len(),
        outcomes.failed.len(),
        outcomes.ambiguous.len(),
        applied_ambiguous.len(),
        retries.into_inner(),
        kills,
    );
    assert!(kills > 0, "the fault thread must have killed backends");
    assert!(!outcomes.committed.is_empty());
}
