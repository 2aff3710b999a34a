//! The async front end (feature `async`) against PostgreSQL: the same
//! guarantees as the blocking one; cancel safety in `cancellation`.

use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::result::Error as DieselError;
use diesel::sql_types::{BigInt, Text};
use diesel_async::pooled_connection::bb8::Pool;
use diesel_async::pooled_connection::AsyncDieselConnectionManager;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use diesel_tx_retry::testing::{self, AsyncMeet};
use diesel_tx_retry::{
    internal, Applied, AsyncSource, Cause, Keyed, Outcome, Protocol, Server, TxError,
};
use testbed::proxy::{Cut, Proxy};
use testbed::Database;

use crate::fixture::*;

mod cancellation;

type AsyncPool = Pool<AsyncPgConnection>;

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
