//! A Jepsen-style bank test: concurrent transfers from this process while a
//! fault thread, one fault at a time, at random: terminates a backend,
//! partitions the network, restarts the server (`immediate` or `fast`), or
//! freezes a backend (SIGSTOP, then SIGCONT). The server is private and in
//! a network namespace of its own (see `netns`); the workers' connections
//! are opened from the client namespace.
//!
//! Every transfer writes its row in the product's ledger (`transfers`, keyed
//! by the id drawn before the helper) in its own transaction, and is
//! declared idempotent, so a commit in doubt is retried and resolved by that
//! key. Afterwards each transfer is placed by the ledger: committed or failed
//! before commit; none may be left in doubt. The balances must equal the
//! initial ones plus exactly the ledger's transfers.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::os::fd::AsFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use bank::bank::{insert_accounts, transfer, Amount, BankError};
use bank::db;
use bank::models::Account;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{ManageConnection, Pool};
use diesel::sql_types::{Integer, Text};
use diesel_tx_retry::{Applied, Retrier, Server, TxError};
use rand::seq::SliceRandom;
use rand::Rng;
use uuid::Uuid;

use super::netns::NsServer;

const ACCOUNTS: usize = 5;
const INITIAL: i64 = 10_000;
const WORKERS: usize = 6;
const RUN_FOR: Duration = Duration::from_secs(12);
const MAX_FAULTS: u32 = 60;
const VICTIM: &str = "bank_jepsen_victim";

/// Opens the pool's connections from inside a network namespace: r2d2
/// connects on threads of its own, and each moves itself there first (a
/// network namespace belongs to a thread; the sockets it opens stay in it).
struct InNamespace {
    inner: db::Manager,
    namespace: File,
}

impl ManageConnection for InNamespace {
    type Connection = db::Aged;
    type Error = diesel::r2d2::Error;

    fn connect(&self) -> Result<db::Aged, Self::Error> {
        rustix::thread::move_into_link_name_space(
            self.namespace.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .expect("enter the client namespace");
        self.inner.connect()
    }

    fn is_valid(&self, conn: &mut db::Aged) -> Result<(), Self::Error> {
        self.inner.is_valid(conn)
    }

    fn has_broken(&self, conn: &mut db::Aged) -> bool {
        self.inner.has_broken(conn)
    }
}

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
    /// Why each of them stayed in doubt.
    ambiguous_causes: Vec<String>,
    /// Committed after a commit in doubt, by how the retry resolved it.
    applied_earlier: u32,
    applied_on_retry: u32,
    /// The failed ones by what ended them.
    failures: BTreeMap<String, u32>,
}

/// What ended a failed transfer: the error's kind and, for the database's
/// own errors, its message without the details that vary.
fn kind(err: &TxError<BankError>) -> String {
    match err {
        TxError::Failed(BankError::InsufficientFunds { .. }) => "insufficient funds".to_owned(),
        TxError::Failed(other) => format!("failed: {other}"),
        TxError::GaveUp { .. } => "gave up".to_owned(),
        TxError::NoConnection(_) => "no connection".to_owned(),
        other => other.to_string(),
    }
}

#[derive(QueryableByName)]
struct Pid {
    #[diesel(sql_type = Integer)]
    pid: i32,
}

/// The faults, one at a time; each is over (the link mended, the backend
/// resumed, the server back) before the next begins.
#[derive(Debug, Default)]
struct Faults {
    kills: u32,
    partitions: u32,
    restarts: u32,
    freezes: u32,
}

impl Faults {
    fn total(&self) -> u32 {
        self.kills + self.partitions + self.restarts + self.freezes
    }
}

/// A random backend of the workers', if any is connected.
fn victim(server: &NsServer, rng: &mut impl Rng) -> Option<i32> {
    // A new admin connection each time: a restart ends the previous one.
    let mut admin = server.admin("bank");
    let pids: Vec<Pid> = diesel::sql_query(
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND datname = current_database()",
    )
    .bind::<Text, _>(VICTIM)
    .load(&mut admin)
    .unwrap();
    (!pids.is_empty()).then(|| pids[rng.random_range(0..pids.len())].pid)
}

fn signal(which: &str, pid: i32) {
    // The backend may have ended by itself in between: no assert.
    let _ = Command::new("kill")
        .args([which, &pid.to_string()])
        .status();
}

/// Fault `which` (0 to 3), over when this returns.
fn inject(server: &NsServer, which: usize, faults: &mut Faults, rng: &mut impl Rng) {
    match which {
        0 => {
            if let Some(pid) = victim(server, rng) {
                let mut admin = server.admin("bank");
                diesel::sql_query("SELECT pg_terminate_backend($1)")
                    .bind::<Integer, _>(pid)
                    .execute(&mut admin)
                    .unwrap();
                faults.kills += 1;
            }
        }
        1 => {
            // From shorter than the clients' dead-peer detection (a
            // pause) to longer (lost connections, reconnects refused).
            server.cut();
            thread::sleep(Duration::from_millis(rng.random_range(500..5_000)));
            server.mend();
            faults.partitions += 1;
        }
        2 => {
            server.restart(if rng.random_bool(0.5) {
                "immediate"
            } else {
                "fast"
            });
            faults.restarts += 1;
        }
        _ => {
            if let Some(pid) = victim(server, rng) {
                signal("-STOP", pid);
                thread::sleep(Duration::from_millis(rng.random_range(200..3_000)));
                signal("-CONT", pid);
                faults.freezes += 1;
            }
        }
    }
}

#[test]
fn transfers_survive_kills_partitions_restarts_and_freezes() {
    let server = NsServer::start();
    let mut admin = server.admin("bank");
    admin
        .batch_execute(
            "-- A commit that takes a few milliseconds, so that some faults land
             -- while COMMIT is in flight and commits in doubt are exercised.
             CREATE FUNCTION slow_commit() RETURNS trigger AS $$
             BEGIN PERFORM pg_sleep(0.003); RETURN NULL; END $$ LANGUAGE plpgsql;
             CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON transfers
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()",
        )
        .unwrap();
    let accounts: Vec<Account> = (0..ACCOUNTS)
        .map(|_| Account {
            id: Uuid::new_v4(),
            balance: INITIAL,
        })
        .collect();
    insert_accounts(&mut admin, &accounts, bank::bank::ROWS_PER_INSERT).unwrap();
    drop(admin);

    // The workers' connections: named for the fault thread, with the
    // server's session timeouts short (a session lost to a partition frees
    // its locks within 2 s) and the clients' dead-peer detection short
    // (keepalives after 1 s idle, data unacknowledged for 3 s).
    let url = server
        .client_db_url()
        .with_param("application_name", VICTIM)
        .with_param("keepalives_idle", "1")
        .with_param("keepalives_interval", "1")
        .with_param("keepalives_count", "2")
        .with_param("tcp_user_timeout", "3000")
        .with_param("connect_timeout", "3")
        .with_session_timeouts(Duration::from_secs(2));
    let namespace = File::open(format!("/run/netns/{}", server.client_ns)).unwrap();
    let pool = Pool::builder()
        .max_size(WORKERS as u32)
        .min_idle(Some(0))
        .test_on_check_out(false)
        .connection_timeout(Duration::from_secs(10))
        .build(InNamespace {
            inner: db::Manager::new(&url),
            namespace,
        })
        .unwrap();
    // The deadline outlasts the longest outage the fault thread makes, so
    // that every commit in doubt can be resolved: a partition of up to 5 s
    // right before a restart, then r2d2's pause between failed connects
    // (up to half its 10 s checkout timeout), then a checkout. An in-doubt
    // call that gets no connection asks again until then.
    let retrier = Retrier::default()
        .for_server(Server::PostgreSql)
        .with_max_attempts(30)
        .with_deadline(Duration::from_secs(45))
        .with_statement_timeout(Duration::from_secs(2));
    let outcomes = Mutex::new(Outcomes::default());
    let retries = AtomicU32::new(0);
    let faults = Mutex::new(Faults::default());
    let stop = AtomicBool::new(false);
    let until = Instant::now() + RUN_FOR;

    thread::scope(|scope| {
        scope.spawn(|| {
            let mut rng = rand::rng();
            let mut done = Faults::default();
            // Rounds of the four kinds in a random order: mixed at random,
            // and every kind in every run.
            let mut order = Vec::new();
            while !stop.load(Ordering::Relaxed) && done.total() < MAX_FAULTS {
                if order.is_empty() {
                    order = vec![0, 1, 2, 3];
                    order.shuffle(&mut rng);
                }
                // Random moments: the pause is what makes them random, not
                // a synchronisation.
                thread::sleep(Duration::from_millis(rng.random_range(0..300)));
                inject(&server, order.pop().unwrap(), &mut done, &mut rng);
            }
            *faults.lock().unwrap() = done;
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
                        let result = retrier.build_transaction().run_idempotent(
                            &pool,
                            planned.id,
                            |conn, attempt| {
                                transfer(
                                    conn,
                                    attempt,
                                    planned.from,
                                    planned.to,
                                    Amount::Exactly(planned.amount),
                                )
                            },
                        );
                        let mut outcomes = outcomes.lock().unwrap();
                        match result {
                            Ok(done) => {
                                retries.fetch_add(done.retries(), Ordering::Relaxed);
                                match (done.value(), done.doubt().is_some()) {
                                    (Applied::Earlier(_), _) => outcomes.applied_earlier += 1,
                                    (Applied::Now(_), true) => outcomes.applied_on_retry += 1,
                                    _ => {}
                                }
                                // An earlier attempt's amount is the one planned.
                                assert_eq!(done.value().value().amount, planned.amount);
                                outcomes.committed.push(planned);
                            }
                            Err(err @ TxError::AmbiguousCommit { .. }) => {
                                outcomes.ambiguous_causes.push(err.to_string());
                                outcomes.ambiguous.push(planned)
                            }
                            // Every other error is definite: refused for
                            // funds, a statement timed out, retries used up,
                            // no connection to be had. None may have applied.
                            Err(other) => {
                                *outcomes.failures.entry(kind(&other)).or_default() += 1;
                                outcomes.failed.push(planned)
                            }
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
    drop(pool);
    let mut check = server.admin("bank");

    let outcomes = outcomes.into_inner().unwrap();
    let logged: HashSet<Uuid> = {
        use diesel::dsl::sql;
        diesel::select(sql::<diesel::sql_types::Array<diesel::sql_types::Uuid>>(
            "COALESCE((SELECT array_agg(id) FROM transfers), '{}')",
        ))
        .get_result::<Vec<Uuid>>(&mut check)
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
        "the ledger holds exactly the committed (and any applied ambiguous) transfers"
    );

    let mut expected: BTreeMap<Uuid, i64> = accounts.iter().map(|a| (a.id, INITIAL)).collect();
    for t in outcomes.committed.iter().chain(&applied_ambiguous) {
        *expected.get_mut(&t.from).unwrap() -= t.amount;
        *expected.get_mut(&t.to).unwrap() += t.amount;
    }
    let actual: BTreeMap<Uuid, i64> = {
        use bank::schema::accounts::dsl::*;
        accounts
            .select((id, balance))
            .load::<(Uuid, i64)>(&mut check)
            .unwrap()
            .into_iter()
            .collect()
    };
    assert_eq!(
        actual, expected,
        "each applied transfer moved its money exactly once"
    );
    assert_eq!(actual.values().sum::<i64>(), INITIAL * ACCOUNTS as i64);
    assert!(actual.values().all(|b| *b >= 0));

    let faults = faults.into_inner().unwrap();
    eprintln!(
        "jepsen: {} transfers: {} committed ({} after a commit in doubt: {} applied earlier, {} on retry), \
         {} failed before commit {:?}, {} in doubt ({} applied); \
         {} retries; faults: {} backends killed, {} partitions, {} restarts, {} freezes",
        outcomes.committed.len() + outcomes.failed.len() + outcomes.ambiguous.len(),
        outcomes.committed.len(),
        outcomes.applied_earlier + outcomes.applied_on_retry,
        outcomes.applied_earlier,
        outcomes.applied_on_retry,
        outcomes.failed.len(),
        outcomes.failures,
        outcomes.ambiguous.len(),
        applied_ambiguous.len(),
        retries.into_inner(),
        faults.kills,
        faults.partitions,
        faults.restarts,
        faults.freezes,
    );
    assert!(
        faults.partitions > 0 && faults.restarts > 0,
        "the fault thread must have injected faults: {faults:?}"
    );
    assert!(!outcomes.committed.is_empty());
    assert_eq!(
        outcomes.ambiguous.len(),
        0,
        "every commit in doubt was resolved by its key: {:?} {:?}",
        outcomes.ambiguous,
        outcomes.ambiguous_causes
    );
}
