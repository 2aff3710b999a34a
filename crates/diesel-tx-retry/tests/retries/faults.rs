//! The helper against faults the server makes itself (PL/pgSQL errors,
//! `pg_terminate_backend`), each test once per protocol where it matters.

use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel_tx_retry::internal::{self, Clock, FakeClock};
use diesel_tx_retry::{Applied, Budget, Held, Protocol, Retrier, Server, TxError};
use testbed::Database;

use crate::fixture::*;

fn a_40001_on_the_first_k_attempts_is_retried_k_times_and_commits_once(protocol: Protocol) {
    let db = with_faults();
    let (retrier, clock) = on_postgres(protocol);
    let mut runs = 0;
    let done = retrier
        .build_transaction()
        .run(&db.pool(1), |conn| {
            runs += 1;
            mark(conn, "before the fault")?;
            fail_first(conn, 3, "40001")?;
            Ok::<_, DieselError>(runs)
        })
        .unwrap();
    assert_eq!((*done.value(), done.attempts(), done.doubt()), (4, 4, None));
    assert_eq!(db.count("marks"), 1, "only the committed attempt's write");
    let ms = Duration::from_millis;
    assert_eq!(clock.sleeps(), vec![ms(10), ms(20), ms(40)]);
}

/// A clock that, asked to sleep, first counts from a connection of its own
/// the transactions open in the test database, then records the sleep.
struct WatchingClock {
    db_name: String,
    watcher: Mutex<PgConnection>,
    now: Mutex<Instant>,
    seen_while_sleeping: Mutex<Vec<i64>>,
}

impl WatchingClock {
    fn new(db: &Database) -> Arc<Self> {
        Arc::new(Self {
            db_name: db.name.clone(),
            watcher: Mutex::new(db.conn()),
            now: Mutex::new(Instant::now()),
            seen_while_sleeping: Mutex::new(Vec::new()),
        })
    }

    /// Other sessions of this database with a transaction open: PostgreSQL
    /// updates `pg_stat_activity` before it answers a ROLLBACK or COMMIT.
    fn open_transactions(&self) -> i64 {
        bigint(
            &mut self.watcher.lock().unwrap(),
            &format!(
                "(SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' \
                 AND pid <> pg_backend_pid() AND xact_start IS NOT NULL)",
                self.db_name
            ),
        )
        .unwrap()
    }
}

impl Clock for WatchingClock {
    fn now(&self) -> Instant {
        *self.now.lock().unwrap()
    }
    fn sleep(&self, duration: Duration) {
        let open = self.open_transactions();
        self.seen_while_sleeping.lock().unwrap().push(open);
        *self.now.lock().unwrap() += duration;
    }
}

/// Runs a unit that conflicts on its first three attempts and returns how
/// many transactions the clock saw open during each attempt and each sleep.
fn watch_retries(db: &Database, retrier: Retrier) -> (Vec<i64>, Vec<i64>) {
    let clock = WatchingClock::new(db);
    let retrier = internal::with_clock(retrier, clock.clone());
    let mut during_attempts = Vec::new();
    retrier
        .transaction(&db.pool(1), |conn| {
            mark(conn, "x")?;
            during_attempts.push(clock.open_transactions());
            fail_first(conn, 3, "40001")
        })
        .unwrap();
    let during_sleeps = clock.seen_while_sleeping.lock().unwrap().clone();
    (during_attempts, during_sleeps)
}

fn no_transaction_is_open_while_the_helper_sleeps(protocol: Protocol) {
    let db = with_faults();
    let (retrier, _) = on_postgres(protocol);
    let (during_attempts, during_sleeps) = watch_retries(&db, retrier);
    // The probe does see the helper's transaction while a unit runs.
    assert_eq!(during_attempts, vec![1, 1, 1, 1]);
    assert_eq!(during_sleeps, vec![0, 0, 0]);
    assert_eq!(db.count("marks"), 1);
}

#[test]
fn under_cockroachdb_rules_a_retry_that_waits_restarts_outside_any_transaction() {
    // CockroachDB's rules played on PostgreSQL: nothing here depends on
    // RELEASE committing, and PL/pgSQL faults can be rewound.
    let db = with_faults();
    let (retrier, _) = retrier(Server::CockroachDb, Protocol::Savepoint, 10);
    let (during_attempts, during_sleeps) = watch_retries(&db, retrier);
    assert_eq!(during_attempts, vec![1, 1, 1, 1]);
    assert_eq!(during_sleeps, vec![0, 0, 0]);
    assert_eq!(db.count("marks"), 1);
}

/// Runs a unit that conflicts on its first two attempts with immediate
/// retries, and returns the transaction id each attempt ran in.
fn txids_of_immediate_retries(db: &Database, server: Server, protocol: Protocol) -> Vec<i64> {
    let (retrier, clock) = retrier(server, protocol, 10);
    let retrier = retrier.with_backoff(diesel_tx_retry::Backoff::none());
    let mut txids = Vec::new();
    retrier
        .transaction(&db.pool(1), |conn| {
            txids.push(txid(conn)?);
            mark(conn, "x")?;
            fail_first(conn, 2, "40001")
        })
        .unwrap();
    assert!(clock.sleeps().is_empty(), "immediate retries never sleep");
    assert_eq!(
        db.count("marks"),
        1,
        "the rewound attempts' writes are gone"
    );
    txids
}

#[test]
fn under_cockroachdb_rules_an_immediate_retry_rewinds_inside_one_transaction() {
    let db = with_faults();
    let txids = txids_of_immediate_retries(&db, Server::CockroachDb, Protocol::Savepoint);
    assert_eq!(txids.len(), 3);
    assert!(txids.windows(2).all(|w| w[0] == w[1]), "{txids:?}");
}

#[test]
fn on_postgresql_even_the_savepoint_protocol_restarts_every_conflict() {
    let db = with_faults();
    let txids = txids_of_immediate_retries(&db, Server::PostgreSql, Protocol::Savepoint);
    assert_eq!(txids.len(), 3);
    assert!(txids.windows(2).all(|w| w[0] != w[1]), "{txids:?}");
}

fn serializable_and_read_only_hold_on_every_attempt(protocol: Protocol) {
    let db = with_faults();
    let (retrier, _) = on_postgres(protocol);
    let mut seen = Vec::new();
    retrier
        .build_transaction()
        .read_only()
        .run(&db.pool(1), |conn| {
            seen.push((
                setting(conn, "transaction_isolation")?,
                setting(conn, "transaction_read_only")?,
            ));
            // Sequences cannot advance in a read-only transaction, so the
            // test counts the attempts and the server raises.
            if seen.len() <= 2 {
                raise_error(conn, "40001")?;
            }
            Ok::<_, DieselError>(())
        })
        .unwrap();
    let expected = ("serializable".to_owned(), "on".to_owned());
    assert_eq!(seen, vec![expected.clone(), expected.clone(), expected]);
    let write = retrier
        .build_transaction()
        .read_only()
        .run(&db.pool(1), |conn| mark(conn, "read only"));
    assert_eq!(
        failed_kind(&write),
        Some(DatabaseErrorKind::ReadOnlyTransaction),
        "{write:?}"
    );
}

fn a_40001_at_commit_is_retried(protocol: Protocol) {
    let db = with_faults();
    testbed::faults::fail_commits(&mut db.conn(), 2, "40001");
    let (retrier, _) = on_postgres(protocol);
    let done = retrier
        .build_transaction()
        .run(&db.pool(1), |conn| mark(conn, "x"))
        .unwrap();
    assert_eq!(done.attempts(), 3);
    assert_eq!(testbed::faults::calls(&mut db.conn(), "commit_faults"), 3);
    assert_eq!(db.count("marks"), 1);
}

fn always_failing_gives_up_after_exactly_max_attempts_with_nothing_committed(protocol: Protocol) {
    let db = with_faults();
    let (retrier, clock) = retrier(Server::PostgreSql, protocol, 5);
    let result = retrier.transaction(&db.pool(1), |conn| {
        mark(conn, "doomed")?;
        fail_first(conn, 1_000, "40001")
    });
    match result {
        Err(TxError::GaveUp {
            attempts: 5,
            budget: Budget::Attempts,
            last: DieselError::DatabaseError(DatabaseErrorKind::SerializationFailure, _),
            ..
        }) => {}
        other => panic!("expected GaveUp after 5 attempts, got {other:?}"),
    }
    assert_eq!(
        testbed::faults::calls(&mut db.conn(), "statement_faults"),
        5
    );
    assert_eq!(db.count("marks"), 0);
    assert_eq!(clock.sleeps().len(), 4, "no sleep after the last attempt");
}

#[test]
fn the_deadline_stops_retries_before_a_sleep_would_cross_it() {
    let db = with_faults();
    let (retrier, clock) = retrier(Server::PostgreSql, Protocol::Restart, 1_000);
    let retrier = retrier.with_deadline(Duration::from_millis(100));
    let result = retrier.transaction(&db.pool(1), |conn| fail_first(conn, 1_000, "40001"));
    // 10 + 20 + 40 ms slept; the next 80 ms would end at 150 ms > 100 ms.
    assert!(
        matches!(
            result,
            Err(TxError::GaveUp {
                attempts: 4,
                budget: Budget::Deadline,
                ..
            })
        ),
        "{result:?}"
    );
    let ms = Duration::from_millis;
    assert_eq!(clock.sleeps(), vec![ms(10), ms(20), ms(40)]);
}

#[test]
fn a_constraint_failing_at_commit_is_reported_not_retried() {
    let db = with_faults();
    testbed::faults::fail_commits(&mut db.conn(), 1, "23514");
    let (retrier, _) = on_postgres(Protocol::Restart);
    let result = retrier.transaction(&db.pool(1), |conn| mark(conn, "x"));
    assert_eq!(
        failed_kind(&result),
        Some(DatabaseErrorKind::CheckViolation),
        "{result:?}"
    );
    assert_eq!(db.count("marks"), 0);
}

/// With the savepoint protocol too: on PostgreSQL the COMMIT, not the
/// RELEASE, is the commit, so the rules follow the server.
fn a_backend_killed_at_commit_is_an_ambiguous_commit_not_a_retry(protocol: Protocol) {
    let db = with_faults();
    testbed::faults::fail_commits(&mut db.conn(), 1, "terminate");
    let (retrier, _) = on_postgres(protocol);
    let pool = db.pool(1);
    let mut runs = 0;
    let result = retrier.transaction(&pool, |conn| {
        runs += 1;
        mark(conn, "x")
    });
    assert!(
        matches!(result, Err(TxError::AmbiguousCommit { attempts: 1, .. })),
        "{result:?}"
    );
    assert_eq!(runs, 1);
    // The dead connection did not go back into the pool.
    let mut conn = pool.get().unwrap();
    assert_eq!(bigint(&mut conn, "1::INT8"), Ok(1));
    // Here we can look: the server rolled it back.
    assert_eq!(db.count("marks"), 0);
}

fn a_40003_at_commit_is_ambiguous_unless_the_unit_is_idempotent(protocol: Protocol) {
    let db = with_faults();
    testbed::faults::fail_commits(&mut db.conn(), 1, "40003");
    let (retrier, _) = on_postgres(protocol);
    let result = retrier.transaction(&db.pool(1), |conn| mark(conn, "x"));
    let Err(err @ TxError::AmbiguousCommit { attempts: 1, .. }) = result else {
        panic!("expected an ambiguous commit, got {result:?}");
    };
    let message = err.to_string();
    assert!(message.contains("ambiguous"), "{message}");
    assert!(message.contains("injected commit fault"), "{message}");

    db.exec("ALTER SEQUENCE commit_faults RESTART");
    let done = retrier
        .build_transaction()
        .run_idempotent(&db.pool(1), "y", |conn, attempt| {
            if attempt.in_doubt() {
                let seen = bigint(conn, "(SELECT count(*) FROM marks WHERE note = 'y')")?;
                if seen == 1 {
                    return Ok(Applied::Earlier(()));
                }
            }
            mark(conn, attempt.key())?;
            Ok::<_, DieselError>(Applied::Now(()))
        })
        .unwrap();
    assert_eq!(done.attempts(), 2);
    assert_eq!(*done.value(), Applied::Now(()));
    assert_eq!(db.count("marks"), 1);
}

fn a_backend_terminated_mid_transaction_is_retried_on_a_fresh_connection(protocol: Protocol) {
    let db = with_faults();
    let pool = db.pool(1);
    let mut killer = db.conn();
    let (retrier, _) = on_postgres(protocol);
    let mut pids = Vec::new();
    let done = retrier
        .build_transaction()
        .run(&pool, |conn| {
            let pid = backend_pid(conn);
            pids.push(pid);
            mark(conn, "before the kill")?;
            if pids.len() == 1 {
                // Another session terminates this backend and waits until
                // it is gone, then the unit carries on.
                diesel::sql_query("SELECT pg_terminate_backend($1, 5000)")
                    .bind::<diesel::sql_types::Integer, _>(pid)
                    .execute(&mut killer)?;
            }
            mark(conn, "after")
        })
        .unwrap();
    assert_eq!(done.attempts(), 2);
    assert_ne!(pids[0], pids[1], "the retry must use a new connection");
    assert_eq!(
        db.count("marks"),
        2,
        "both marks of the committed attempt, none of the killed one"
    );
    assert_ne!(backend_pid(&mut pool.get().unwrap()), pids[0]);
}

fn a_panic_rolls_back_and_the_connection_goes_back_idle(protocol: Protocol) {
    let db = with_faults();
    let pool = db.pool(1);
    let pid = backend_pid(&mut pool.get().unwrap());
    let (retrier, _) = on_postgres(protocol);
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
        retrier.transaction(&pool, |conn| -> QueryResult<()> {
            mark(conn, "never committed")?;
            panic!("bug in the unit of work");
        })
    }));
    assert!(outcome.is_err(), "the panic goes on to the caller");
    let mut conn = pool.get().unwrap();
    assert_eq!(
        backend_pid(&mut conn),
        pid,
        "the same connection, back in the pool"
    );
    assert_eq!(
        setting(&mut conn, "transaction_isolation").unwrap(),
        "read committed",
        "not left mid-transaction"
    );
    drop(conn);
    assert_eq!(db.count("marks"), 0);
    retrier
        .transaction(&pool, |conn| mark(conn, "after the panic"))
        .unwrap();
    assert_eq!(db.count("marks"), 1);
}

#[test]
fn on_the_callers_own_connection_a_kill_ends_the_call() {
    let db = with_faults();
    let mut conn = db.conn();
    let mut killer = db.conn();
    let pid = backend_pid(&mut conn);
    let (retrier, _) = on_postgres(Protocol::Restart);
    let result = retrier.transaction(&mut conn, |conn| {
        diesel::sql_query("SELECT pg_terminate_backend($1, 5000)")
            .bind::<diesel::sql_types::Integer, _>(pid)
            .execute(&mut killer)?;
        mark(conn, "x")
    });
    assert_eq!(
        failed_kind(&result),
        Some(DatabaseErrorKind::ClosedConnection),
        "{result:?}"
    );
}

fn giving_up_leaves_the_callers_connection_outside_any_transaction(protocol: Protocol) {
    let db = with_faults();
    let (retrier, _) = retrier(Server::PostgreSql, protocol, 3);
    let mut conn = db.conn();
    let result = retrier.transaction(&mut conn, |conn| {
        mark(conn, "doomed")?;
        fail_first(conn, 1_000, "40001")
    });
    assert!(
        matches!(result, Err(TxError::GaveUp { attempts: 3, .. })),
        "{result:?}"
    );
    assert_eq!(
        setting(&mut conn, "transaction_isolation").unwrap(),
        "read committed",
        "the connection was left inside the serializable transaction"
    );
    assert_eq!(db.count("marks"), 0);
    retrier
        .transaction(&mut conn, |conn| mark(conn, "next"))
        .unwrap();
    assert_eq!(db.count("marks"), 1);
}

fn a_held_connection_serves_every_call_and_a_killed_one_is_replaced(protocol: Protocol) {
    let db = with_faults();
    let pool = db.pool(2);
    let mut killer = db.conn();
    let (retrier, _) = on_postgres(protocol);
    let held = Held::new(&pool);
    let pid_of_call = |mark_as: &str| {
        retrier
            .transaction(&held, |conn| {
                mark(conn, mark_as)?;
                Ok::<_, DieselError>(backend_pid(conn))
            })
            .unwrap()
    };
    let first = pid_of_call("first");
    // Between calls the connection stays with the holder, not in the pool.
    assert_eq!(
        (pool.state().connections, pool.state().idle_connections),
        (1, 0)
    );
    assert_eq!(pid_of_call("second"), first, "the same server session");

    let mut pids = Vec::new();
    let done = retrier
        .build_transaction()
        .run(&held, |conn| {
            pids.push(backend_pid(conn));
            mark(conn, "before the kill")?;
            if pids.len() == 1 {
                diesel::sql_query("SELECT pg_terminate_backend($1, 5000)")
                    .bind::<diesel::sql_types::Integer, _>(pids[0])
                    .execute(&mut killer)?;
            }
            mark(conn, "after")
        })
        .unwrap();
    assert_eq!(done.attempts(), 2);
    assert_eq!(pids[0], first);
    assert_ne!(pids[1], first, "the retry must use a new connection");
    // The dead connection went back to the pool, which closed it; the new
    // one is held from now on.
    assert_eq!(
        (pool.state().connections, pool.state().idle_connections),
        (1, 0)
    );
    assert_eq!(pid_of_call("third"), pids[1]);
    assert_eq!(db.count("marks"), 5, "two calls, two marks, one call");
    drop(held);
    assert_eq!(
        pool.state().idle_connections,
        1,
        "back in the pool when dropped"
    );
}

fn a_panic_under_a_held_connection_rolls_back_and_keeps_it(protocol: Protocol) {
    let db = with_faults();
    let pool = db.pool(1);
    let (retrier, _) = on_postgres(protocol);
    let held = Held::new(&pool);
    let pid = retrier
        .transaction(&held, |conn| Ok::<_, DieselError>(backend_pid(conn)))
        .unwrap();
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
        retrier.transaction(&held, |conn| -> QueryResult<()> {
            mark(conn, "never committed")?;
            panic!("bug in the unit of work");
        })
    }));
    assert!(outcome.is_err(), "the panic goes on to the caller");
    let (after, isolation) = retrier
        .transaction(&held, |conn| {
            Ok::<_, DieselError>((backend_pid(conn), setting(conn, "transaction_isolation")?))
        })
        .unwrap();
    assert_eq!(after, pid, "the same connection, kept");
    assert_eq!(
        isolation, "serializable",
        "a new transaction, not the old one"
    );
    assert_eq!(db.count("marks"), 0);
}

#[test]
fn one_fake_clock_serves_every_test() {
    // The crate's own: it records sleeps and moves time forward by them.
    let clock = FakeClock::new();
    let t0 = clock.now();
    clock.sleep(Duration::from_millis(5));
    clock.advance(Duration::from_millis(7));
    assert_eq!(clock.now() - t0, Duration::from_millis(12));
    assert_eq!(clock.sleeps(), vec![Duration::from_millis(5)]);
}

for_each_protocol!(
    a_40001_on_the_first_k_attempts_is_retried_k_times_and_commits_once,
    no_transaction_is_open_while_the_helper_sleeps,
    serializable_and_read_only_hold_on_every_attempt,
    a_40001_at_commit_is_retried,
    always_failing_gives_up_after_exactly_max_attempts_with_nothing_committed,
    a_backend_killed_at_commit_is_an_ambiguous_commit_not_a_retry,
    a_40003_at_commit_is_ambiguous_unless_the_unit_is_idempotent,
    a_backend_terminated_mid_transaction_is_retried_on_a_fresh_connection,
    a_panic_rolls_back_and_the_connection_goes_back_idle,
    giving_up_leaves_the_callers_connection_outside_any_transaction,
    a_held_connection_serves_every_call_and_a_killed_one_is_replaced,
    a_panic_under_a_held_connection_rolls_back_and_keeps_it,
);
