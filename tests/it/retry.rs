//! The retry helper against injected faults on a real PostgreSQL.

use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Duration;

use bank::retry::{Backoff, Budget, Committed, Protocol, Retrier, RetryPolicy, TxError, TxOptions};
use diesel::prelude::*;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel::sql_types::{BigInt, Text};

use crate::helpers::*;

fn policy(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        deadline: None,
        backoff: Backoff {
            base: Duration::from_millis(10),
            cap: Duration::from_millis(100),
            first_retry_immediate: false,
        },
    }
}

/// A helper that never sleeps for real and always draws the full delay.
fn retrier(max_attempts: u32, protocol: Protocol) -> (Retrier, Arc<FakeClock>) {
    let clock = FakeClock::new();
    let retrier = Retrier::new(policy(max_attempts), protocol)
        .with_clock(clock.clone())
        .with_jitter(Arc::new(|| 1.0));
    (retrier, clock)
}

const BOTH: [Protocol; 2] = [Protocol::Restart, Protocol::Savepoint];

#[derive(QueryableByName)]
struct Txid {
    #[diesel(sql_type = BigInt)]
    txid: i64,
}

fn txid(conn: &mut PgConnection) -> QueryResult<i64> {
    diesel::sql_query("SELECT txid_current() AS txid")
        .get_result::<Txid>(conn)
        .map(|t| t.txid)
}

#[test]
fn a_40001_on_the_first_k_attempts_is_retried_k_times_and_commits_once() {
    for protocol in BOTH {
        let db = TestDb::empty();
        db.install_faults();
        let (retrier, clock) = retrier(10, protocol);
        let mut runs = 0;
        let committed = retrier
            .run(&db.pool(1), TxOptions::default(), |conn| {
                runs += 1;
                mark(conn, "before the fault")?;
                fail_first(conn, 3, "40001")?;
                Ok::<_, DieselError>(runs)
            })
            .unwrap();
        assert_eq!(
            committed,
            Committed {
                value: 4,
                attempts: 4
            },
            "{protocol:?}"
        );
        assert_eq!(
            db.count("marks"),
            1,
            "only the committed attempt's write stays ({protocol:?})"
        );
        let ms = Duration::from_millis;
        assert_eq!(clock.sleeps(), vec![ms(10), ms(20), ms(40)], "{protocol:?}");
    }
}

#[test]
fn the_savepoint_protocol_keeps_one_transaction_and_restart_begins_new_ones() {
    for (protocol, same_transaction) in [(Protocol::Savepoint, true), (Protocol::Restart, false)] {
        let db = TestDb::empty();
        db.install_faults();
        let (retrier, _) = retrier(10, protocol);
        let mut txids = Vec::new();
        retrier
            .run(&db.pool(1), TxOptions::default(), |conn| {
                txids.push(txid(conn)?);
                fail_first(conn, 2, "40001")
            })
            .unwrap();
        assert_eq!(txids.len(), 3);
        let all_same = txids.windows(2).all(|w| w[0] == w[1]);
        assert_eq!(all_same, same_transaction, "{protocol:?}: {txids:?}");
    }
}

#[derive(QueryableByName)]
struct Setting {
    #[diesel(sql_type = Text)]
    value: String,
}

fn setting(conn: &mut PgConnection, name: &str) -> QueryResult<String> {
    diesel::sql_query(format!("SELECT current_setting('{name}') AS value"))
        .get_result::<Setting>(conn)
        .map(|s| s.value)
}

#[test]
fn serializable_and_read_only_hold_on_every_attempt() {
    for protocol in BOTH {
        let db = TestDb::empty();
        db.install_faults();
        let (retrier, _) = retrier(10, protocol);
        let mut seen = Vec::new();
        let opts = TxOptions {
            read_only: true,
            idempotent: false,
        };
        retrier
            .run(&db.pool(1), opts, |conn| {
                seen.push((
                    setting(conn, "transaction_isolation")?,
                    setting(conn, "transaction_read_only")?,
                ));
                // Sequences cannot advance in a read-only transaction, so
                // the test counts the attempts and the server raises.
                if seen.len() <= 2 {
                    raise_error(conn, "40001")?;
                }
                Ok::<_, DieselError>(())
            })
            .unwrap();
        let expected = ("serializable".to_owned(), "on".to_owned());
        assert_eq!(
            seen,
            vec![expected.clone(), expected.clone(), expected],
            "{protocol:?}"
        );
        let write = retrier.run(&db.pool(1), opts, |conn| mark(conn, "read only"));
        assert!(
            matches!(
                write,
                Err(TxError::Failed(DieselError::DatabaseError(
                    DatabaseErrorKind::ReadOnlyTransaction,
                    _
                )))
            ),
            "{protocol:?}"
        );
    }
}

#[test]
fn a_40001_at_commit_is_retried() {
    for protocol in BOTH {
        let db = TestDb::empty();
        db.install_faults();
        db.fail_commits(2, "40001");
        let (retrier, _) = retrier(10, protocol);
        let committed = retrier
            .run(&db.pool(1), TxOptions::default(), |conn| mark(conn, "x"))
            .unwrap();
        assert_eq!(committed.attempts, 3, "{protocol:?}");
        assert_eq!(db.fault_calls("commit_faults"), 3);
        assert_eq!(db.count("marks"), 1, "{protocol:?}");
    }
}

#[test]
fn always_failing_gives_up_after_exactly_max_attempts_with_nothing_committed() {
    for protocol in BOTH {
        let db = TestDb::empty();
        db.install_faults();
        let (retrier, clock) = retrier(5, protocol);
        let result = retrier.run(&db.pool(1), TxOptions::default(), |conn| {
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
            other => panic!("{protocol:?}: expected GaveUp after 5 attempts, got {other:?}"),
        }
        assert_eq!(db.fault_calls("statement_faults"), 5);
        assert_eq!(db.count("marks"), 0);
        assert_eq!(clock.sleeps().len(), 4, "no sleep after the last attempt");
    }
}

#[test]
fn the_deadline_stops_retries_before_a_sleep_would_cross_it() {
    let db = TestDb::empty();
    db.install_faults();
    let clock = FakeClock::new();
    let retrier = Retrier::new(
        RetryPolicy {
            deadline: Some(Duration::from_millis(100)),
            ..policy(1_000)
        },
        Protocol::Restart,
    )
    .with_clock(clock.clone())
    .with_jitter(Arc::new(|| 1.0));
    let result = retrier.run(&db.pool(1), TxOptions::default(), |conn| {
        fail_first(conn, 1_000, "40001")
    });
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
fn a_non_retryable_error_returns_at_once_untouched() {
    for protocol in BOTH {
        let db = TestDb::migrated();
        let id = uuid::Uuid::new_v4();
        db.exec(&format!(
            "INSERT INTO accounts (id, balance) VALUES ('{id}', 10)"
        ));
        let (retrier, clock) = retrier(10, protocol);
        let mut runs = 0;
        let result = retrier.run(&db.pool(1), TxOptions::default(), |conn| {
            runs += 1;
            diesel::sql_query(format!(
                "UPDATE accounts SET balance = -1 WHERE id = '{id}'"
            ))
            .execute(conn)
        });
        assert!(
            matches!(
                result,
                Err(TxError::Failed(DieselError::DatabaseError(
                    DatabaseErrorKind::CheckViolation,
                    _
                )))
            ),
            "{protocol:?}: {result:?}"
        );
        assert_eq!(runs, 1);
        assert!(clock.sleeps().is_empty());
        assert_eq!(db.accounts(), vec![(id, 10)]);
    }
}

#[test]
fn a_constraint_failing_at_commit_is_reported_not_retried() {
    let db = TestDb::empty();
    db.install_faults();
    db.fail_commits(1, "23514");
    let (retrier, _) = retrier(10, Protocol::Restart);
    let result = retrier.run(&db.pool(1), TxOptions::default(), |conn| mark(conn, "x"));
    assert!(
        matches!(
            result,
            Err(TxError::Failed(DieselError::DatabaseError(
                DatabaseErrorKind::CheckViolation,
                _
            )))
        ),
        "{result:?}"
    );
    assert_eq!(db.count("marks"), 0);
}

#[test]
fn a_backend_killed_at_commit_is_an_ambiguous_commit_not_a_retry() {
    for protocol in BOTH {
        let db = TestDb::empty();
        db.install_faults();
        db.fail_commits(1, "terminate");
        let (retrier, _) = retrier(10, protocol);
        let pool = db.pool(1);
        let mut runs = 0;
        let result = retrier.run(&pool, TxOptions::default(), |conn| {
            runs += 1;
            mark(conn, "x")
        });
        assert!(
            matches!(result, Err(TxError::AmbiguousCommit { attempts: 1, .. })),
            "{protocol:?}: {result:?}"
        );
        assert_eq!(runs, 1);
        // The dead connection did not go back into the pool.
        let mut conn = pool.get().unwrap();
        assert_eq!(
            diesel::select(1.into_sql::<diesel::sql_types::Integer>()).get_result::<i32>(&mut conn),
            Ok(1)
        );
        // Here we can look: the server rolled it back.
        assert_eq!(db.count("marks"), 0);
    }
}

#[test]
fn a_40003_at_commit_is_ambiguous_unless_the_unit_is_idempotent() {
    let db = TestDb::empty();
    db.install_faults();
    db.fail_commits(1, "40003");
    let (retrier, _) = retrier(10, Protocol::Restart);
    let result = retrier.run(&db.pool(1), TxOptions::default(), |conn| mark(conn, "x"));
    let Err(TxError::AmbiguousCommit { attempts: 1, cause }) = result else {
        panic!("expected an ambiguous commit, got {result:?}");
    };
    assert!(
        cause.to_string().contains("injected commit fault"),
        "{cause}"
    );
    assert!(
        TxError::<DieselError>::AmbiguousCommit { attempts: 1, cause }
            .to_string()
            .contains("ambiguous")
    );

    let idempotent = TxOptions {
        read_only: false,
        idempotent: true,
    };
    db.exec("ALTER SEQUENCE commit_faults RESTART");
    let committed = retrier
        .run(&db.pool(1), idempotent, |conn| mark(conn, "y"))
        .unwrap();
    assert_eq!(committed.attempts, 2);
    assert_eq!(db.count("marks"), 1);
}

#[test]
fn a_backend_terminated_mid_transaction_is_retried_on_a_fresh_connection() {
    for protocol in BOTH {
        let db = TestDb::empty();
        db.install_faults();
        let pool = db.pool(1);
        let mut killer = db.conn();
        let (retrier, _) = retrier(10, protocol);
        let mut pids = Vec::new();
        let committed = retrier
            .run(&pool, TxOptions::default(), |conn| {
                let pid = backend_pid(conn);
                pids.push(pid);
                mark(conn, "before the kill")?;
                if pids.len() == 1 {
                    // Another session terminates this backend and waits
                    // until it is gone, then the unit carries on.
                    diesel::sql_query("SELECT pg_terminate_backend($1, 5000)")
                        .bind::<diesel::sql_types::Integer, _>(pid)
                        .execute(&mut killer)?;
                }
                mark(conn, "after")
            })
            .unwrap();
        assert_eq!(committed.attempts, 2, "{protocol:?}");
        assert_ne!(pids[0], pids[1], "the retry must use a new connection");
        assert_eq!(
            db.count("marks"),
            2,
            "both marks of the committed attempt, none of the killed one"
        );
        assert_ne!(backend_pid(&mut pool.get().unwrap()), pids[0]);
    }
}

#[test]
fn a_panic_rolls_back_and_the_connection_goes_back_idle() {
    for protocol in BOTH {
        let db = TestDb::empty();
        db.install_faults();
        let pool = db.pool(1);
        let pid = backend_pid(&mut pool.get().unwrap());
        let (retrier, _) = retrier(10, protocol);
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
            retrier.run(&pool, TxOptions::default(), |conn| -> QueryResult<()> {
                mark(conn, "never committed")?;
                panic!("bug in the unit of work");
            })
        }));
        assert!(outcome.is_err(), "the panic goes on to the caller");
        let mut conn = pool.get().unwrap();
        assert_eq!(
            backend_pid(&mut conn),
            pid,
            "{protocol:?}: the same connection, back in the pool"
        );
        assert_eq!(
            setting(&mut conn, "transaction_isolation").unwrap(),
            "read committed",
            "not left mid-transaction"
        );
        drop(conn);
        assert_eq!(db.count("marks"), 0);
        retrier
            .run(&pool, TxOptions::default(), |conn| {
                mark(conn, "after the panic")
            })
            .unwrap();
        assert_eq!(db.count("marks"), 1);
    }
}

#[test]
fn calling_the_helper_inside_a_transaction_is_an_error() {
    let db = TestDb::empty();
    db.install_faults();
    let (retrier, _) = retrier(10, Protocol::Restart);
    let mut conn = db.conn();
    let nested = conn.transaction(|conn| {
        let inner = retrier.run_on(conn, TxOptions::default(), |c| mark(c, "nested"));
        Ok::<_, DieselError>(inner)
    });
    let inner = nested.unwrap();
    assert!(
        matches!(inner, Err(TxError::AlreadyInTransaction)),
        "{inner:?}"
    );
    assert!(inner
        .unwrap_err()
        .to_string()
        .contains("already inside a transaction"));
    assert_eq!(db.count("marks"), 0);
}

#[test]
fn run_on_one_connection_cannot_replace_it_so_a_kill_ends_the_call() {
    let db = TestDb::empty();
    db.install_faults();
    let mut conn = db.conn();
    let mut killer = db.conn();
    let pid = backend_pid(&mut conn);
    let (retrier, _) = retrier(10, Protocol::Restart);
    let result = retrier.run_on(&mut conn, TxOptions::default(), |conn| {
        diesel::sql_query("SELECT pg_terminate_backend($1, 5000)")
            .bind::<diesel::sql_types::Integer, _>(pid)
            .execute(&mut killer)?;
        mark(conn, "x")
    });
    assert!(
        matches!(
            result,
            Err(TxError::Failed(DieselError::DatabaseError(
                DatabaseErrorKind::ClosedConnection,
                _
            )))
        ),
        "{result:?}"
    );
}

#[test]
fn giving_up_leaves_the_callers_connection_outside_any_transaction() {
    for protocol in BOTH {
        let db = TestDb::empty();
        db.install_faults();
        let (retrier, _) = retrier(3, protocol);
        let mut conn = db.conn();
        let result = retrier.run_on(&mut conn, TxOptions::default(), |conn| {
            mark(conn, "doomed")?;
            fail_first(conn, 1_000, "40001")
        });
        assert!(
            matches!(result, Err(TxError::GaveUp { attempts: 3, .. })),
            "{protocol:?}: {result:?}"
        );
        assert_eq!(
            setting(&mut conn, "transaction_isolation").unwrap(),
            "read committed",
            "{protocol:?}: the connection was left inside the serializable transaction"
        );
        assert_eq!(db.count("marks"), 0);
        retrier
            .run_on(&mut conn, TxOptions::default(), |conn| mark(conn, "next"))
            .unwrap();
        assert_eq!(db.count("marks"), 1, "{protocol:?}");
    }
}
