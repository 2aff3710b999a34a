//! What the server says that Diesel has no kind for, met for real: a unit
//! that swallowed a database error (PostgreSQL then answers COMMIT with
//! ROLLBACK), a deadlock (40P01), a drain or restart (57P01, sent by the
//! server without closing the connection), and the statement bound after a
//! rewind.

use std::sync::Arc;
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::dsl::sql;
use diesel::prelude::*;
use diesel::result::Error as DieselError;
use diesel::sql_types::{BigInt, Text};
use diesel_tx_retry::internal::{self, FakeClock};
use diesel_tx_retry::{testing, Applied, Backoff, Protocol, Retrier, Server, TxError};
use testbed::proxy::{Faults, Injection, Proxy};
use testbed::Database;

use crate::fixture::*;

/// A helper under `server`'s rules that never sleeps for real, with the
/// default deadline and statement bound.
fn retrier(server: Server, protocol: Protocol) -> (Retrier, Arc<FakeClock>) {
    let clock = FakeClock::new();
    let retrier = Retrier::default()
        .for_server(server)
        .with_backoff(Backoff::exponential(
            Duration::from_millis(10),
            Duration::from_millis(100),
        ));
    let retrier = internal::with_protocol(retrier, protocol);
    (internal::with_clock(retrier, clock.clone()), clock)
}

/// A pool of one connection through `proxy`.
fn a_unit_that_swallows_a_database_error_commits_nothing_and_says_so(protocol: Protocol) {
    // With a statement bound the restart protocol's commit message is
    // `SET LOCAL statement_timeout = ...; COMMIT`; without, `SELECT 1;
    // COMMIT`: each must find the aborted transaction out.
    for bounded in [false, true] {
        let db = with_faults();
        let pool = db.pool(1);
        let (retrier, _) = retrier(Server::PostgreSql, protocol);
        let retrier = if bounded {
            retrier.with_statement_timeout(Duration::from_secs(5))
        } else {
            retrier.without_deadline().without_statement_timeout()
        };
        let mut runs = 0;
        let result = retrier.transaction(&pool, |conn| {
            runs += 1;
            mark(conn, "the order")?;
            // "Ignore a duplicate": the error is caught, the unit goes on.
            let _ = raise_error(conn, "23505");
            Ok::<_, DieselError>("order placed")
        });
        let err = result.unwrap_err();
        assert!(
            matches!(err, TxError::SwallowedError { attempts: 1, .. }),
            "bounded {bounded}: {err:?}"
        );
        assert!(
            err.to_string()
                .starts_with("the unit of work returned Ok on attempt 1, but a statement"),
            "{err}"
        );
        assert_eq!(runs, 1, "not retried: it would do the same again");
        assert_eq!(db.count("marks"), 0, "nothing was committed");
        // The connection went back clean: the next call commits.
        retrier
            .transaction(&pool, |conn| mark(conn, "next"))
            .unwrap();
        assert_eq!(db.count("marks"), 1);
    }
}

fn a_unit_that_catches_an_error_inside_a_nested_transaction_commits(protocol: Protocol) {
    // What the error's message advises: a savepoint around the statement
    // that may fail keeps the transaction alive.
    let db = with_faults();
    let (retrier, _) = retrier(Server::PostgreSql, protocol);
    let placed = retrier
        .transaction(&db.pool(1), |conn| {
            mark(conn, "the order")?;
            let nested = conn.transaction(|conn| raise_error(conn, "23505"));
            assert!(nested.is_err());
            Ok::<_, DieselError>("order placed")
        })
        .unwrap();
    assert_eq!(placed, "order placed");
    assert_eq!(db.count("marks"), 1);
}

#[test]
fn a_deadlock_between_two_units_is_retried_and_both_commit() {
    let db = Database::create();
    db.exec(&format!(
        "ALTER DATABASE {} SET deadlock_timeout = '50ms';
         CREATE TABLE locks (id INT8 PRIMARY KEY, n INT8 NOT NULL);
         INSERT INTO locks VALUES (1, 0), (2, 0)",
        db.name
    ));
    let pool = db.pool(2);
    let (retrier, _) = retrier(Server::PostgreSql, Protocol::Restart);
    let bump = |conn: &mut PgConnection, id: i64| {
        diesel::sql_query("UPDATE locks SET n = n + 1 WHERE id = $1")
            .bind::<BigInt, _>(id)
            .execute(conn)
    };
    // Each locks its own row, meets the other, then wants the other's: a
    // lock cycle PostgreSQL breaks by failing one of them with 40P01.
    // check() asks that both commit, that one of them retried, and that
    // both bumped both rows.
    let cycle = |first: i64, second: i64| {
        let (retrier, pool) = (&retrier, &pool);
        move |meet: &testing::Meet<'_>| {
            retrier.build_transaction().run(pool, |conn| {
                bump(conn, first)?;
                meet.here();
                bump(conn, second)
            })
        }
    };
    testing::check(Duration::from_secs(30), cycle(1, 2), cycle(2, 1), || {
        bigint(&mut db.conn(), "(SELECT sum(n)::INT8 FROM locks)").unwrap() == 4
    })
    .unwrap();
    // And the server did break a deadlock (or more: the retries race
    // freely, and may lock in opposite orders again): its statistics, which
    // a backend reports at the latest when it exits (looked for at most 50
    // times, 100 ms apart).
    drop(pool);
    let deadlocks = (0..50)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(100));
            bigint(
                &mut db.conn(),
                &format!(
                    "(SELECT deadlocks FROM pg_stat_database WHERE datname = '{}')",
                    db.name
                ),
            )
            .unwrap()
        })
        .find(|n| *n > 0);
    assert!(deadlocks.is_some(), "no deadlock was reported");
}

/// A proxy that answers every `every`-th simple query starting with
/// `starting` with `message` as SQLSTATE 57P01, the connection left open.
fn draining(db: &Database, starting: &'static str, message: &'static str) -> Proxy {
    Proxy::with_faults(
        db.tcp_addr(),
        Faults {
            inject: Some(Injection {
                starting,
                every: 1000,
                code: "57P01",
                message,
            }),
            ..Faults::default()
        },
    )
    .unwrap()
}

/// PostgreSQL's word for a restart or a `pg_terminate_backend`, and
/// CockroachDB's for a node that drains.
const DRAINS: [&str; 2] = [
    "terminating connection due to administrator command",
    "server is shutting down",
];

fn a_drain_before_the_commit_reconnects_and_commits_once(protocol: Protocol) {
    for message in DRAINS {
        let db = with_faults();
        let proxy = draining(&db, "INSERT INTO marks", message);
        let pool = pool_via(&db, &proxy);
        let mut watcher = db.conn();
        let (retrier, _) = retrier(Server::PostgreSql, protocol);
        let done = retrier
            .build_transaction()
            .run(&pool, |conn| {
                // A simple query, which the proxy can answer for the server.
                conn.batch_execute("INSERT INTO marks (note) VALUES ('x')")
            })
            .unwrap();
        assert_eq!((done.attempts(), proxy.injected()), (2, 1), "{message}");
        assert_eq!(
            proxy.connections(),
            2,
            "{message}: the retry ran on a new connection"
        );
        assert_eq!(db.count("marks"), 1, "{message}");
        // The connection that heard the error was closed, not pooled: its
        // session's aborted transaction is gone with it.
        drop(pool);
        assert_eq!(open_transactions(&db, &mut watcher), 0, "{message}");
    }
}

fn a_drain_at_the_commit_is_a_lost_connection_there(protocol: Protocol) {
    let commit = match protocol {
        // The statement bound again (20 s, the default), then the COMMIT.
        Protocol::Restart => "SET LOCAL statement_timeout = 20000; COMMIT",
        Protocol::Savepoint => "RELEASE SAVEPOINT cockroach_restart; COMMIT",
        other => panic!("no test for the protocol {other:?}"),
    };
    for idempotent in [false, true] {
        let db = with_faults();
        let proxy = draining(&db, commit, DRAINS[0]);
        let pool = pool_via(&db, &proxy);
        let (retrier, _) = retrier(Server::PostgreSql, protocol);
        let result = if idempotent {
            retrier
                .build_transaction()
                .run_idempotent(&pool, "x", |conn, attempt| {
                    // The mark is the unit's key.
                    if attempt.in_doubt() && bigint(conn, "(SELECT count(*) FROM marks)")? == 1 {
                        return Ok(Applied::Earlier(()));
                    }
                    mark(conn, attempt.key())?;
                    Ok(Applied::Now(()))
                })
                .map(|done| (done.attempts(), done.into_value()))
        } else {
            retrier
                .build_transaction()
                .run(&pool, |conn| mark(conn, "x"))
                .map(|done| (done.attempts(), Applied::Now(())))
        };
        assert_eq!(proxy.injected(), 1);
        if idempotent {
            let (attempts, applied) = result.unwrap();
            assert_eq!(
                (attempts, applied, proxy.connections()),
                (2, Applied::Now(()), 2)
            );
            assert_eq!(db.count("marks"), 1);
        } else {
            let err = result.unwrap_err();
            assert!(
                matches!(&err, TxError::AmbiguousCommit { attempts: 1, cause, .. }
                    if cause.to_string() == DRAINS[0]),
                "{err:?}"
            );
            assert_eq!(db.count("marks"), 0);
        }
    }
}

#[test]
fn under_cockroachdb_rules_a_rewind_bounds_the_retry_by_the_time_left() {
    // CockroachDB's docs: ROLLBACK TO SAVEPOINT rolls back what SET LOCAL
    // set. The rewind sends the bound again, for the time left: 30 s of
    // deadline, of which the first attempt used 25.
    let db = with_faults();
    let (retrier, clock) = retrier(Server::CockroachDb, Protocol::Savepoint);
    let mut bounds = Vec::new();
    retrier
        .transaction(&db.pool(1), |conn| {
            bounds.push(
                diesel::select(sql::<Text>("current_setting('statement_timeout')"))
                    .get_result::<String>(conn)?,
            );
            if bounds.len() == 1 {
                clock.advance(Duration::from_secs(25));
            }
            mark(conn, "x")?;
            fail_first(conn, 1, "40001")
        })
        .unwrap();
    assert!(clock.sleeps().is_empty(), "an immediate retry rewinds");
    assert_eq!(bounds, ["20s", "5s"]);
}

for_each_protocol!(
    a_unit_that_swallows_a_database_error_commits_nothing_and_says_so,
    a_unit_that_catches_an_error_inside_a_nested_transaction_commits,
    a_drain_before_the_commit_reconnects_and_commits_once,
    a_drain_at_the_commit_is_a_lost_connection_there,
);
