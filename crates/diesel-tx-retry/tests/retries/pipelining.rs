//! The async front end sends `BEGIN` without waiting for it: the unit's
//! first statement shares its flight. Counted through the test proxy at a
//! latency (a flight is what goes out before an answer comes back); the
//! unit is shown to run inside the transaction, with its options set; and
//! a `BEGIN` message the server refuses never lets the unit run outside.

use std::time::Duration;

use diesel::sql_types::{Bool, Text};
use diesel_async::pooled_connection::bb8::Pool;
use diesel_async::pooled_connection::AsyncDieselConnectionManager;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use diesel_tx_retry::{Protocol, TxError};
use testbed::proxy::{Proxy, BIND};
use testbed::Database;

use crate::fixture::*;

diesel::table! {
    counter (id) {
        id -> Int8,
        n -> Int8,
    }
}

/// What the unit saw of its session after its write.
#[derive(diesel::QueryableByName, Debug, PartialEq)]
struct Inside {
    #[diesel(sql_type = Text)]
    isolation: String,
    #[diesel(sql_type = Text)]
    timeout: String,
    /// Whether this statement's transaction is the one that wrote.
    #[diesel(sql_type = Bool)]
    wrote: bool,
}

async fn bump_and_look(conn: &mut AsyncPgConnection) -> Result<Inside, diesel::result::Error> {
    use diesel::ExpressionMethods;
    diesel::update(counter::table)
        .filter(counter::id.eq(1))
        .set(counter::n.eq(counter::n + 1))
        .execute(conn)
        .await?;
    diesel::sql_query(
        "SELECT current_setting('transaction_isolation') AS isolation, \
         current_setting('statement_timeout') AS timeout, \
         txid_current_if_assigned() IS NOT NULL AS wrote",
    )
    .get_result(conn)
    .await
}

async fn pool_of(url: String) -> Pool<AsyncPgConnection> {
    Pool::builder()
        .max_size(1)
        .test_on_check_out(false)
        .connection_timeout(Duration::from_secs(5))
        .build(AsyncDieselConnectionManager::<AsyncPgConnection>::new(url))
        .await
        .unwrap()
}

fn counter_db() -> Database {
    let db = Database::create();
    db.exec("CREATE TABLE counter (id INT8 PRIMARY KEY, n INT8 NOT NULL); INSERT INTO counter VALUES (1, 0)");
    db
}

#[test]
fn begin_shares_its_flight_with_the_units_first_statement_and_the_unit_runs_inside() {
    let db = counter_db();
    // 20 ms each way: a statement sent within 40 ms of the BEGIN, before
    // its answer is back, is in its flight.
    let proxy = Proxy::start(db.tcp_addr(), Duration::from_millis(20)).unwrap();
    let (retrier, _) = on_postgres(Protocol::Restart);
    let retrier = retrier.with_statement_timeout(Duration::from_secs(5));
    let (inside, flights) = runtime().block_on(async {
        let pool = pool_of(db.url_via(proxy.port())).await;
        // A connection made and checked out once, so that only the call's
        // own flights are counted.
        drop(pool.get().await.unwrap());
        let before = proxy.round_trips().len();
        let inside = retrier
            .transaction_async(&pool, bump_and_look)
            .await
            .unwrap();
        (inside, proxy.round_trips().split_off(before))
    });
    let sent: Vec<Vec<&str>> = flights
        .iter()
        .map(|rt| rt.sent.iter().map(|s| &s[..s.len().min(30)]).collect())
        .collect();
    // The UPDATE goes out with the BEGIN; the COMMIT alone, once the
    // SELECT has answered. (With this workspace's diesel-async a statement
    // runs in one flight on its first use, vendor/README.md; upstream's
    // prepares it in a flight of its own first, which adds a Bind flight
    // after each of the first two, the UPDATE's Parse still riding with
    // the BEGIN.)
    assert_eq!(
        sent,
        [
            vec![
                "BEGIN; SET TRANSACTION ISOLATI",
                "UPDATE \"counter\" SET \"n\" = (\"c"
            ],
            vec!["SELECT current_setting('transa"],
            vec!["SET LOCAL statement_timeout = "],
        ],
        "{flights:#?}"
    );
    assert!(!flights.iter().any(|rt| rt.sent.iter().any(|s| s == BIND)));
    assert_eq!(
        flights[0].sent[0],
        "BEGIN; SET TRANSACTION ISOLATION LEVEL SERIALIZABLE; SET LOCAL statement_timeout = 5000"
    );
    // The statements after the BEGIN saw its options, and the write.
    assert_eq!(
        inside,
        Inside {
            isolation: "serializable".to_owned(),
            timeout: "5s".to_owned(),
            wrote: true,
        }
    );
    assert_eq!(db.count("counter WHERE n = 1"), 1);
}

#[test]
fn a_begin_message_the_server_refuses_never_lets_the_unit_run_outside() {
    let db = counter_db();
    // At 20 ms each way the unit's first statement leaves well before the
    // BEGIN's answer is back, as it does at any real distance.
    let proxy = Proxy::start(db.tcp_addr(), Duration::from_millis(20)).unwrap();
    let (retrier, _) = on_postgres(Protocol::Restart);
    // More than PostgreSQL's largest statement_timeout (2^31 - 1 ms): its
    // `SET LOCAL` fails, after the BEGIN ran.
    let retrier = retrier.with_statement_timeout(Duration::from_secs(30 * 24 * 3600));
    let (result, flights) = runtime().block_on(async {
        let pool = pool_of(db.url_via(proxy.port())).await;
        drop(pool.get().await.unwrap());
        let before = proxy.round_trips().len();
        let result = retrier.transaction_async(&pool, bump_and_look).await;
        (result, proxy.round_trips().split_off(before))
    });
    let err = match result {
        Err(TxError::Failed(err)) => err.to_string(),
        other => panic!("not the unit's error: {other:?}"),
    };
    let update_sent = flights
        .iter()
        .any(|rt| rt.sent.iter().any(|s| s.starts_with("UPDATE")));
    if update_sent {
        // The UPDATE went out behind the BEGIN and found the block
        // aborted: it did not run on its own.
        assert!(err.contains("current transaction is aborted"), "{err}");
    } else {
        // The BEGIN's answer was back before the unit's first statement
        // left (the thread was descheduled for 40 ms in between): the call
        // ended on that answer, and the unit never ran. Locally, with no
        // delay, this was 2 runs in 40 under a loaded machine.
        assert!(
            err.contains(r#"invalid value for parameter "statement_timeout""#),
            "{err}"
        );
    }
    assert_eq!(db.count("counter WHERE n = 0"), 1);
    let mut watcher = db.conn();
    assert_eq!(open_transactions(&db, &mut watcher), 0);
}

/// The statement strategy of this workspace's diesel-async
/// (vendor/README.md), as calls see it on one connection. A statement
/// Diesel does not cache (this UPDATE's `n + 1`, any `sql_query`) runs in
/// one flight every time, where upstream prepares it by name in a flight
/// of its own, runs it, and closes it, every time. A statement Diesel
/// caches (a plain select by key) runs in one flight the first time; on
/// its second run it is prepared by name and kept (its Parse, then its
/// Bind, once); from its third on it is only bound. Never more flights
/// than upstream, which prepares on the first run.
#[test]
fn uncached_statements_run_in_one_flight_and_cached_ones_are_kept_prepared_from_their_second_run() {
    let db = counter_db();
    let proxy = Proxy::start(db.tcp_addr(), Duration::from_millis(20)).unwrap();
    let (retrier, _) = on_postgres(Protocol::Restart);
    let flights = runtime().block_on(async {
        let pool = pool_of(db.url_via(proxy.port())).await;
        drop(pool.get().await.unwrap());
        let mut flights = Vec::new();
        for _ in 0..3 {
            let before = proxy.round_trips().len();
            retrier
                .transaction_async(&pool, async |conn: &mut AsyncPgConnection| {
                    use diesel::{ExpressionMethods, QueryDsl};
                    diesel::update(counter::table)
                        .filter(counter::id.eq(1))
                        .set(counter::n.eq(counter::n + 1))
                        .execute(conn)
                        .await?;
                    counter::table
                        .filter(counter::id.eq(1))
                        .select(counter::n)
                        .first::<i64>(conn)
                        .await
                })
                .await
                .unwrap();
            let call = proxy.round_trips().split_off(before);
            flights.push(
                call.iter()
                    .map(|rt| {
                        rt.sent
                            .iter()
                            .map(|s| match s.ends_with("COMMIT") {
                                true => "COMMIT",
                                false => s.split_whitespace().next().unwrap_or(""),
                            })
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .collect::<Vec<_>>(),
            );
        }
        flights
    });
    assert_eq!(
        flights,
        [
            vec!["BEGIN; UPDATE", "SELECT", "COMMIT"],
            vec!["BEGIN; UPDATE", "SELECT", BIND, "COMMIT"],
            vec!["BEGIN; UPDATE", BIND, "COMMIT"],
        ],
        "the first word of each message, per flight, per call"
    );
    assert_eq!(db.count("counter WHERE n = 3"), 1);
}
