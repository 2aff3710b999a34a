//! The async front end (feature `async`) against PostgreSQL: the same
//! guarantees as the blocking one, and cancel safety, shown by dropping the
//! call's future after 1, 2, 3... polls, and during a slow COMMIT.

use std::future::Future;
use std::ops::RangeInclusive;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use diesel::result::Error as DieselError;
use diesel::sql_types::{BigInt, Text};
use diesel_async::pooled_connection::bb8::Pool;
use diesel_async::pooled_connection::AsyncDieselConnectionManager;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use diesel_tx_retry::testing::{self, AsyncMeet};
use diesel_tx_retry::{
    internal, Applied, AsyncSource, Attempt, Cause, Keyed, Observer, Outcome, Protocol, Server,
    TxError,
};
use testbed::proxy::{Cut, Proxy};
use testbed::Database;

use crate::fixture::*;

type AsyncPool = Pool<AsyncPgConnection>;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn pool_of(url: &str, size: u32) -> AsyncPool {
    Pool::builder()
        .max_size(size)
        .connection_timeout(Duration::from_secs(5))
        .build(AsyncDieselConnectionManager::<AsyncPgConnection>::new(url))
        .await
        .unwrap()
}

async fn mark_async(conn: &mut AsyncPgConnection, note: &str) -> Result<(), DieselError> {
    diesel::sql_query("INSERT INTO marks (note) VALUES ($1)")
        .bind::<Text, _>(note)
        .execute(conn)
        .await
        .map(drop)
}

async fn fail_first_async(
    conn: &mut AsyncPgConnection,
    k: i64,
    code: &str,
) -> Result<(), DieselError> {
    diesel::sql_query("SELECT fail_first($1, $2)")
        .bind::<BigInt, _>(k)
        .bind::<Text, _>(code)
        .execute(conn)
        .await
        .map(drop)
}

#[derive(diesel::QueryableByName)]
struct N {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

async fn count_async(conn: &mut AsyncPgConnection, sql: &str) -> Result<i64, DieselError> {
    Ok(diesel::sql_query(sql).get_result::<N>(conn).await?.n)
}

/// Every attempt the observer was told of: (number, cause, outcome).
#[derive(Default)]
struct Seen(Mutex<Vec<(u32, Option<Cause>, Outcome)>>);

impl Observer for Seen {
    fn attempt(&self, attempt: &Attempt) {
        self.0
            .lock()
            .unwrap()
            .push((attempt.number(), attempt.cause(), attempt.outcome()));
    }
}

impl Seen {
    fn outcomes(&self) -> Vec<Outcome> {
        self.0.lock().unwrap().iter().map(|s| s.2).collect()
    }
}

/// Waits, within `bound`, until no session of `db` but the watcher's has
/// a transaction open; returns how many still do.
fn settle(db: &Database, bound: Duration) -> i64 {
    let mut watcher = db.conn();
    let until = Instant::now() + bound;
    loop {
        let open = open_transactions(db, &mut watcher);
        if open == 0 || Instant::now() >= until {
            return open;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn a_conflict_is_retried_and_commits_once(protocol: Protocol) {
    let db = with_faults();
    let seen = Arc::new(Seen::default());
    let (retrier, clock) = on_postgres(protocol);
    let retrier = retrier.with_observer(seen.clone());
    let done = runtime().block_on(async {
        let pool = pool_of(&db.url, 2).await;
        retrier
            .build_transaction()
            .run_async(&pool, async |conn: &mut AsyncPgConnection| {
                fail_first_async(conn, 2, "40001").await?;
                mark_async(conn, "once").await
            })
            .await
            .unwrap()
    });
    assert_eq!(done.attempts(), 3);
    assert_eq!(db.count("marks"), 1);
    // The backoff, on the test's clock (tokio's timer for real).
    assert_eq!(
        clock.sleeps(),
        [Duration::from_millis(10), Duration::from_millis(20)]
    );
    assert_eq!(
        seen.outcomes(),
        [Outcome::Restarted, Outcome::Restarted, Outcome::Committed]
    );
    assert_eq!(settle(&db, Duration::from_secs(5)), 0);
}

fn write_skew_is_prevented_through_the_async_harness(protocol: Protocol) {
    // Two withdrawals from a pair whose sum must stay >= 0, each reading
    // both rows then writing its own: a genuine 40001 for one of them.
    let db = Database::create();
    db.exec("CREATE TABLE pair (id INT8 PRIMARY KEY, balance INT8 NOT NULL); INSERT INTO pair VALUES (1, 50), (2, 50)");
    let (retrier, _) = on_postgres(protocol);
    let result = runtime().block_on(async {
        let pool = pool_of(&db.url, 2).await;
        let withdraw = |id: i64| {
            let (retrier, pool) = (&retrier, &pool);
            move |meet: AsyncMeet| async move {
                retrier
                    .build_transaction()
                    .run_async(pool, async |conn: &mut AsyncPgConnection| {
                        let total =
                            count_async(conn, "SELECT sum(balance)::INT8 AS n FROM pair").await?;
                        meet.here().await;
                        if total - 80 < 0 {
                            return Ok(false);
                        }
                        diesel::sql_query("UPDATE pair SET balance = balance - 80 WHERE id = $1")
                            .bind::<BigInt, _>(id)
                            .execute(conn)
                            .await?;
                        Ok::<_, DieselError>(true)
                    })
                    .await
            }
        };
        testing::check_async(Duration::from_secs(10), withdraw(1), withdraw(2), || true).await
    });
    let [a, b] = result.unwrap();
    assert_eq!(
        [*a.value(), *b.value()].iter().filter(|w| **w).count(),
        1,
        "exactly one withdrawal"
    );
    // The pair's floor held: the sum is not below 0.
    assert_eq!(
        db.count("(SELECT 1 FROM pair HAVING sum(balance) < 0) AS below"),
        0
    );
}

fn a_commit_cut_is_resolved_by_an_idempotent_unit(protocol: Protocol) {
    for cut in [Cut::BeforeForwarding, Cut::AfterForwarding] {
        let db = with_faults();
        let proxy = Proxy::cutting_commits(db.tcp_addr(), 1_000, cut).unwrap();
        let (retrier, _) = on_postgres(protocol);
        let done = runtime().block_on(async {
            let pool = pool_of(&db.url_via(proxy.port()), 1).await;
            retrier
                .build_transaction()
                .run_idempotent_async(
                    &pool,
                    "keyed",
                    async |conn: &mut AsyncPgConnection, attempt: &Keyed<'_, &str>| {
                        if attempt.in_doubt()
                            && count_async(
                                conn,
                                "SELECT count(*) AS n FROM marks WHERE note = 'keyed'",
                            )
                            .await?
                                == 1
                        {
                            return Ok(Applied::Earlier(()));
                        }
                        mark_async(conn, attempt.key()).await?;
                        Ok::<_, DieselError>(Applied::Now(()))
                    },
                )
                .await
                .unwrap()
        });
        let applied = match cut {
            Cut::AfterForwarding => Applied::Earlier(()),
            Cut::BeforeForwarding => Applied::Now(()),
        };
        assert_eq!((done.attempts(), *done.value()), (2, applied), "{cut:?}");
        assert!(done.doubt().is_some());
        assert_eq!(db.count("marks"), 1, "{cut:?}: applied once");
        // And a plain unit: in doubt, reported so.
        let db = with_faults();
        let proxy = Proxy::cutting_commits(db.tcp_addr(), 1_000, cut).unwrap();
        let result = runtime().block_on(async {
            let pool = pool_of(&db.url_via(proxy.port()), 1).await;
            retrier
                .transaction_async(&pool, async |conn: &mut AsyncPgConnection| {
                    mark_async(conn, "plain").await
                })
                .await
        });
        assert!(
            matches!(result, Err(TxError::AmbiguousCommit { attempts: 1, .. })),
            "{cut:?}: {result:?}"
        );
    }
}

/// A pool that cannot be reached for its checkouts numbered `refused`
/// (the first is 1).
struct Outage<'p> {
    pool: &'p AsyncPool,
    checkouts: usize,
    refused: RangeInclusive<usize>,
}

impl AsyncSource for Outage<'_> {
    type Conn = <&'static AsyncPool as AsyncSource>::Conn;

    async fn checkout(&mut self) -> Result<Self::Conn, Box<dyn std::error::Error + Send + Sync>> {
        self.checkouts += 1;
        if self.refused.contains(&self.checkouts) {
            return Err("timed out waiting for connection".into());
        }
        Ok(self.pool.get_owned().await?)
    }
}

/// As the blocking front end does: after a COMMIT cut once it reached the
/// server, two checkouts fail; the helper asks again after its backoff and
/// resolves the doubt by the key.
#[test]
fn an_outage_after_a_commit_in_doubt_is_waited_out() {
    let db = with_faults();
    let proxy = Proxy::cutting_commits(db.tcp_addr(), 1_000, Cut::AfterForwarding).unwrap();
    let seen = Arc::new(Seen::default());
    let (retrier, clock) = on_postgres(Protocol::Restart);
    let retrier = retrier.with_observer(seen.clone());
    let done = runtime().block_on(async {
        let pool = pool_of(&db.url_via(proxy.port()), 1).await;
        let outage = Outage {
            pool: &pool,
            checkouts: 0,
            refused: 2..=3,
        };
        retrier
            .build_transaction()
            .run_idempotent_async(
                outage,
                "keyed",
                async |conn: &mut AsyncPgConnection, attempt: &Keyed<'_, &str>| {
                    if attempt.in_doubt()
                        && count_async(conn, "SELECT count(*) AS n FROM marks WHERE note = 'keyed'")
                            .await?
                            == 1
                    {
                        return Ok(Applied::Earlier(()));
                    }
                    mark_async(conn, attempt.key()).await?;
                    Ok::<_, DieselError>(Applied::Now(()))
                },
            )
            .await
            .unwrap()
    });
    assert_eq!((done.attempts(), *done.value()), (4, Applied::Earlier(())));
    let lost = Some(Cause::ConnectionLost);
    assert_eq!(
        *seen.0.lock().unwrap(),
        vec![
            (1, lost, Outcome::Reconnected),
            (2, lost, Outcome::Reconnected),
            (3, lost, Outcome::Reconnected),
            (4, None, Outcome::Committed),
        ]
    );
    let ms = Duration::from_millis;
    assert_eq!(clock.sleeps(), [ms(10), ms(20), ms(40)]);
    assert_eq!(db.count("marks"), 1);
}

for_each_protocol!(
    a_conflict_is_retried_and_commits_once,
    write_skew_is_prevented_through_the_async_harness,
    a_commit_cut_is_resolved_by_an_idempotent_unit,
);

/// A future that gives up after `polls` polls, dropping the one it wraps:
/// a caller that stops waiting at an exact await point.
struct DropAfter<F> {
    inner: Option<Pin<Box<F>>>,
    polls: usize,
}

impl<F: Future> Future for DropAfter<F> {
    type Output = Option<F::Output>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.polls == 0 {
            self.inner = None;
            return Poll::Ready(None);
        }
        self.polls -= 1;
        let inner = self.inner.as_mut().unwrap().as_mut();
        match inner.poll(cx) {
            Poll::Ready(value) => Poll::Ready(Some(value)),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[test]
fn a_call_dropped_at_any_await_point_leaves_no_transaction_open() {
    // A call with a retry in it (a conflict, then a commit), dropped after
    // 1, 2, 3... polls until one run completes: each drop lands on another
    // await point (checkout, BEGIN, the unit's statements, the rollback,
    // the backoff, the commit).
    let db = with_faults();
    let rt = runtime();
    let pool = rt.block_on(pool_of(&db.url, 1));
    let mut dropped = 0;
    for polls in 1.. {
        assert!(polls < 200, "the call never completed");
        db.exec("ALTER SEQUENCE statement_faults RESTART");
        let seen = Arc::new(Seen::default());
        let (retrier, _) = on_postgres(Protocol::Restart);
        let retrier = retrier.with_observer(seen.clone());
        let note = format!("polls {polls}");
        let finished = rt.block_on(async {
            let call = retrier.transaction_async(&pool, async |conn: &mut AsyncPgConnection| {
                fail_first_async(conn, 1, "40001").await?;
                mark_async(conn, &note).await
            });
            DropAfter {
                inner: Some(Box::pin(call)),
                polls,
            }
            .await
        });
        // Whatever the drop interrupted, no session keeps a transaction.
        assert_eq!(
            settle(&db, Duration::from_secs(5)),
            0,
            "after {polls} polls"
        );
        // The next checkout is clean: a call on the same pool commits.
        let next = rt.block_on(async { pool.get().await.map(drop).map_err(|err| err.to_string()) });
        assert!(next.is_ok(), "after {polls} polls: {next:?}");
        match finished {
            Some(result) => {
                result.unwrap();
                assert_eq!(db.count(&format!("marks WHERE note = '{note}'")), 1);
                break;
            }
            None => {
                dropped += 1;
                // Told as cancelled, or, if the commit was in flight, as
                // what the commit did, once it answered; or nothing, when
                // the drop came before the first attempt began (waiting
                // for a connection).
                wait_idle(&pool, Duration::from_secs(5));
                let last = seen.outcomes().last().copied();
                assert!(
                    matches!(last, None | Some(Outcome::Cancelled | Outcome::Committed)),
                    "after {polls} polls: {:?}",
                    seen.outcomes()
                );
                let committed = db.count(&format!("marks WHERE note = '{note}'"));
                assert_eq!(
                    committed,
                    i64::from(last == Some(Outcome::Committed)),
                    "after {polls} polls"
                );
            }
        }
    }
    eprintln!("dropped at {dropped} await points before a run completed");
    assert!(dropped >= 5, "only {dropped} await points were tried");
}

/// Waits, within `bound`, until no connection of `pool` is checked out: a
/// commit's task holds one until its answer is read or dropped (and told).
fn wait_idle(pool: &AsyncPool, bound: Duration) {
    let until = Instant::now() + bound;
    loop {
        let state = pool.state();
        if state.idle_connections == state.connections || Instant::now() >= until {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The observer's last outcome, once it is one that ends a call (a commit
/// handed to a task may answer after the drop).
fn wait_for_last_outcome(seen: &Seen, bound: Duration) -> Option<Outcome> {
    let until = Instant::now() + bound;
    loop {
        let last = seen.outcomes().last().copied();
        if matches!(last, Some(o) if !o.is_retry()) || Instant::now() >= until {
            return last;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_call_dropped_during_a_slow_commit_still_tells_the_commits_outcome() {
    // The COMMIT takes 300 ms (a deferred trigger that sleeps); the caller
    // gives up after 100 ms, as a request deadline would.
    let db = with_faults();
    db.exec(
        "CREATE FUNCTION slow_commit() RETURNS trigger AS $$
         BEGIN PERFORM pg_sleep(0.3); RETURN NULL; END $$ LANGUAGE plpgsql;
         CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON marks
         DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()",
    );
    let seen = Arc::new(Seen::default());
    let (retrier, _) = on_postgres(Protocol::Restart);
    let retrier = retrier.with_observer(seen.clone());
    let rt = runtime();
    let pool = rt.block_on(pool_of(&db.url, 1));
    let gave_up = rt.block_on(async {
        let call = retrier.transaction_async(&pool, async |conn: &mut AsyncPgConnection| {
            mark_async(conn, "slow").await
        });
        tokio::time::timeout(Duration::from_millis(100), call)
            .await
            .is_err()
    });
    assert!(gave_up, "the call was dropped during its COMMIT");
    assert_eq!(
        wait_for_last_outcome(&seen, Duration::from_secs(5)),
        Some(Outcome::Committed),
        "{:?}",
        seen.outcomes()
    );
    assert_eq!(db.count("marks"), 1, "the commit went through");
    assert_eq!(settle(&db, Duration::from_secs(5)), 0);
    // The connection went back to the pool clean.
    rt.block_on(async {
        retrier
            .transaction_async(&pool, async |conn: &mut AsyncPgConnection| {
                mark_async(conn, "next").await
            })
            .await
            .unwrap();
    });
    assert_eq!(db.count("marks"), 2);
}

#[test]
fn a_panic_rolls_back_then_goes_on() {
    let db = with_faults();
    let (retrier, _) = on_postgres(Protocol::Restart);
    let rt = runtime();
    let pool = rt.block_on(pool_of(&db.url, 1));
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt.block_on(async {
            retrier
                .transaction_async(&pool, async |conn: &mut AsyncPgConnection| {
                    mark_async(conn, "panicked").await?;
                    panic!("the unit's own panic");
                    #[allow(unreachable_code)]
                    Ok::<_, DieselError>(())
                })
                .await
        })
    }));
    let payload = panicked.unwrap_err();
    assert_eq!(
        payload.downcast_ref::<&str>(),
        Some(&"the unit's own panic")
    );
    assert_eq!(db.count("marks"), 0);
    assert_eq!(settle(&db, Duration::from_secs(5)), 0);
    rt.block_on(async {
        retrier
            .transaction_async(&pool, async |conn: &mut AsyncPgConnection| {
                mark_async(conn, "next").await
            })
            .await
            .unwrap();
    });
    assert_eq!(db.count("marks"), 1);
}

#[test]
fn read_committed_is_asked_for_and_the_server_detected_once() {
    let db = with_faults();
    let rt = runtime();
    let retrier = diesel_tx_retry::Retrier::default();
    let levels = rt.block_on(async {
        let pool = pool_of(&db.url, 1).await;
        let mut levels = Vec::new();
        for isolation in [
            diesel_tx_retry::Isolation::ReadCommitted,
            diesel_tx_retry::Isolation::Serializable,
        ] {
            let level = retrier
                .build_transaction()
                .isolation(isolation)
                .run_async(&pool, async |conn: &mut AsyncPgConnection| {
                    #[derive(diesel::QueryableByName)]
                    struct Level {
                        #[diesel(sql_type = Text)]
                        transaction_isolation: String,
                    }
                    Ok::<_, DieselError>(
                        diesel::sql_query("SHOW transaction_isolation")
                            .get_result::<Level>(conn)
                            .await?
                            .transaction_isolation,
                    )
                })
                .await
                .unwrap();
            levels.push(level.into_value());
        }
        levels
    });
    assert_eq!(levels, ["read committed", "serializable"]);
    assert_eq!(retrier.server(), Some(Server::PostgreSql));
}

#[test]
fn the_async_harness_fails_fast_with_the_units_own_message() {
    let rt = runtime();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt.block_on(testing::race_async(
            Duration::from_secs(60),
            |_meet| async { panic!("no such account") },
            |meet| async move { meet.here().await },
        ))
    }));
    let payload = outcome.unwrap_err();
    let message = payload
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        message,
        "unit a panicked: no such account; unit b panicked: the other unit ended without \
         reaching the meeting point"
    );
}

#[test]
fn the_savepoint_protocol_under_cockroachdbs_rules_rewinds_an_immediate_retry() {
    // PostgreSQL cannot clear a real conflict by a rewind, but an injected
    // 40001 is cleared by any rollback: this shows the steps, not the server.
    let db = with_faults();
    let (retrier, _) = retrier(Server::CockroachDb, Protocol::Savepoint, 5);
    let retrier = internal::with_jitter(
        retrier.with_backoff(diesel_tx_retry::Backoff::none()),
        Arc::new(|| 0.0),
    );
    let seen = Arc::new(Seen::default());
    let retrier = retrier.with_observer(seen.clone());
    let done = runtime().block_on(async {
        let pool = pool_of(&db.url, 1).await;
        retrier
            .build_transaction()
            .run_async(&pool, async |conn: &mut AsyncPgConnection| {
                fail_first_async(conn, 1, "40001").await?;
                mark_async(conn, "rewound").await
            })
            .await
            .unwrap()
    });
    assert_eq!(done.attempts(), 2);
    assert_eq!(seen.outcomes(), [Outcome::Rewound, Outcome::Committed]);
    assert_eq!(db.count("marks"), 1);
}
