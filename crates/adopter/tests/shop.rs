//! The shop against PostgreSQL (a database per test on the server
//! `DATABASE_URL` names, or on one the test bed starts), through nothing
//! but the crate's public API.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use adopter::{left, place, restock, Connector, Counts, ShopError, SCHEMA};
use diesel_tx_retry::testing::{self, Meet};
use diesel_tx_retry::{Applied, Retrier, TxError};
use testbed::Database;
use uuid::Uuid;

fn shop() -> Database {
    let db = Database::create();
    db.exec(SCHEMA);
    db
}

#[test]
fn first_use_is_two_lines_and_an_order_is_placed_once_per_key() {
    let db = shop();
    let pool = db.pool(2);
    let retrier = Retrier::default();
    let stocked = retrier
        .transaction(&pool, |conn| restock(conn, "tea", 2))
        .unwrap();
    assert_eq!(stocked, 2);

    let order = Uuid::new_v4();
    let placed =
        retrier.idempotent_transaction(&pool, order, |conn, attempt| place(conn, attempt, "tea"));
    assert!(matches!(placed, Ok(Applied::Now(()))), "{placed:?}");
    // The same key again (a client that retried its request): found.
    let again =
        retrier.idempotent_transaction(&pool, order, |conn, attempt| place(conn, attempt, "tea"));
    assert!(matches!(again, Ok(Applied::Earlier(()))), "{again:?}");
    assert_eq!(left(&mut db.conn(), "tea").unwrap(), 1);
    assert_eq!(db.count("orders"), 1);
}

#[test]
fn a_refusal_is_the_shops_own_error_and_nothing_is_kept() {
    let db = shop();
    let pool = db.pool(1);
    let retrier = Retrier::default();
    retrier
        .transaction(&pool, |conn| restock(conn, "tea", 0))
        .unwrap();
    let placed = retrier.idempotent_transaction(&pool, Uuid::new_v4(), |conn, attempt| {
        place(conn, attempt, "tea")
    });
    match placed {
        Err(TxError::Failed(ShopError::OutOfStock(item))) => assert_eq!(item, "tea"),
        other => panic!("{other:?}"),
    }
    assert_eq!(db.count("orders"), 0);
}

#[test]
fn two_orders_for_the_last_one_conflict_then_one_is_refused() {
    let db = shop();
    let pool = db.pool(2);
    let counts = Arc::new(Counts::default());
    let retrier = Retrier::default()
        .with_max_attempts(5)
        .with_observer(counts.clone());
    retrier
        .transaction(&pool, |conn| restock(conn, "tea", 1))
        .unwrap();
    // Each reads the stock, meets the other, then orders: both saw one
    // left, so under SERIALIZABLE one of them conflicts, and its retry
    // finds none left.
    let order = |meet: &Meet<'_>| {
        retrier.idempotent_transaction(&pool, Uuid::new_v4(), |conn, attempt| {
            // The first time, both read before either writes.
            left(conn, "tea")?;
            meet.here();
            place(conn, attempt, "tea")
        })
    };
    let (a, b) = testing::race(Duration::from_secs(20), order, order);
    let refused = |r: &Result<Applied<()>, TxError<ShopError>>| {
        matches!(r, Err(TxError::Failed(ShopError::OutOfStock(_))))
    };
    let placed = |r: &Result<Applied<()>, TxError<ShopError>>| matches!(r, Ok(Applied::Now(())));
    assert!(
        (placed(&a) && refused(&b)) || (refused(&a) && placed(&b)),
        "{a:?} / {b:?}"
    );
    assert_eq!(left(&mut db.conn(), "tea").unwrap(), 0);
    assert_eq!(db.count("orders"), 1);
    // The observer's labels, as a metrics exporter would use them.
    assert!(counts.get("conflict", "restarted") >= 1);
    assert_eq!(
        counts.get("none", "committed"),
        2,
        "the restock and the order"
    );
    assert_eq!(counts.get("domain", "failed"), 1, "the refusal");
}

#[test]
fn a_connection_source_of_the_shops_own_serves_the_helper() {
    let db = shop();
    let connector = Connector::new(&db.url);
    let retrier = Retrier::default();
    let stocked = retrier
        .transaction(&connector, |conn| restock(conn, "tea", 3))
        .unwrap();
    assert_eq!(stocked, 3);
    let placed = retrier
        .idempotent_transaction(&connector, Uuid::new_v4(), |conn, attempt| {
            place(conn, attempt, "tea")
        })
        .unwrap();
    assert!(!placed.was_earlier());
    assert_eq!(left(&mut db.conn(), "tea").unwrap(), 2);
}
