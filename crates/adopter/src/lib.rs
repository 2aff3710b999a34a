//! A small shop that adopts `diesel-tx-retry` the way a service outside this
//! repository would: its own schema, its own error types (a `thiserror` enum
//! and `anyhow`), its own observer, its own connection source, and nothing
//! of the crate but its public API, with default features. Its tests
//! (`tests/shop.rs`) run it against PostgreSQL; `tests/ui` holds the
//! misuses that must not compile.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::sync::Mutex;

use diesel::prelude::*;
use diesel_tx_retry::{Applied, Attempt, Cause, Keyed, Observer, Outcome, Source};
use uuid::Uuid;

diesel::table! {
    stock (item) {
        item -> Text,
        left -> Int8,
    }
}

diesel::table! {
    orders (id) {
        id -> Uuid,
        item -> Text,
    }
}

/// The shop's schema.
pub const SCHEMA: &str =
    "CREATE TABLE stock (item TEXT PRIMARY KEY, \"left\" INT8 NOT NULL CHECK (\"left\" >= 0)); \
     CREATE TABLE orders (id UUID PRIMARY KEY, item TEXT NOT NULL);";

/// What placing an order can meet.
#[derive(Debug, thiserror::Error)]
pub enum ShopError {
    /// None left: a refusal of the shop's, not the database's.
    #[error("{0} is out of stock")]
    OutOfStock(String),
    /// The database's error, kept as the source so that the helper finds
    /// it (and retries a conflict).
    #[error("the database failed")]
    Database(#[from] diesel::result::Error),
}

/// Places the order `attempt.key()` (drawn by the caller before the call)
/// for one `item`, unless it was placed already.
///
/// The key goes in first: the insert waits for an earlier attempt still
/// holding it, then inserts it (that attempt did not commit, and now
/// cannot) or meets it (it did, or an earlier call did). So a refusal after
/// the insert is definite, which the unit tells the helper.
///
/// # Errors
/// [`ShopError`].
pub fn place(
    conn: &mut PgConnection,
    attempt: &Keyed<'_, Uuid>,
    item: &str,
) -> Result<Applied<()>, ShopError> {
    let inserted = diesel::insert_into(orders::table)
        .values((orders::id.eq(attempt.key()), orders::item.eq(item)))
        .on_conflict_do_nothing()
        .execute(conn)?;
    if inserted == 0 {
        return Ok(Applied::Earlier(()));
    }
    attempt.not_applied_earlier();
    let taken = diesel::update(stock::table.find(item).filter(stock::left.gt(0)))
        .set(stock::left.eq(stock::left - 1))
        .execute(conn)?;
    if taken == 0 {
        return Err(ShopError::OutOfStock(item.to_owned()));
    }
    Ok(Applied::Now(()))
}

/// Adds `count` of `item` to the stock (a plain unit, with `anyhow`).
///
/// # Errors
/// The database's error, in an `anyhow::Error`.
pub fn restock(conn: &mut PgConnection, item: &str, count: i64) -> anyhow::Result<i64> {
    let left = diesel::insert_into(stock::table)
        .values((stock::item.eq(item), stock::left.eq(count)))
        .on_conflict(stock::item)
        .do_update()
        .set(stock::left.eq(stock::left + count))
        .returning(stock::left)
        .get_result(conn)?;
    Ok(left)
}

/// How many of `item` are left.
///
/// # Errors
/// The database's error.
pub fn left(conn: &mut PgConnection, item: &str) -> QueryResult<i64> {
    stock::table.find(item).select(stock::left).get_result(conn)
}

/// Counts attempts by cause and outcome, as a metrics exporter would label
/// them (both are `Display + Hash`).
#[derive(Debug, Default)]
pub struct Counts(Mutex<HashMap<(String, String), u64>>);

impl Counts {
    /// The count for a cause label (`none` for an attempt that had none)
    /// and an outcome label.
    pub fn get(&self, cause: &str, outcome: &str) -> u64 {
        let counts = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        counts
            .get(&(cause.to_owned(), outcome.to_owned()))
            .copied()
            .unwrap_or(0)
    }
}

impl Observer for Counts {
    fn attempt(&self, attempt: &Attempt) {
        let cause = attempt
            .cause()
            .map_or_else(|| "none".to_owned(), |cause: Cause| cause.to_string());
        let outcome: Outcome = attempt.outcome();
        let mut counts = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *counts.entry((cause, outcome.to_string())).or_default() += 1;
    }
}

/// A connection source of the shop's own: a new connection for each
/// checkout, closed when the helper is done with it. Stands for any pool
/// the crate does not know.
#[derive(Debug)]
pub struct Connector {
    url: String,
}

impl Connector {
    /// Connections to `url`.
    pub fn new(url: &str) -> Self {
        Self {
            url: url.to_owned(),
        }
    }
}

impl Source for &Connector {
    type Conn<'s>
        = Box<PgConnection>
    where
        Self: 's;

    fn checkout(&mut self) -> Result<Box<PgConnection>, Box<dyn StdError + Send + Sync>> {
        Ok(Box::new(PgConnection::establish(&self.url)?))
    }
}
