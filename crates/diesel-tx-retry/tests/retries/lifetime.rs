//! Connection lifetimes: a `Held` connection whose manager says it is due
//! goes back to the pool between calls (never inside one), and the pool's
//! manager closes it; the next call gets a fresh one.

use std::borrow::{Borrow, BorrowMut};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, ManageConnection, Pool};
use diesel_tx_retry::{Held, Lifespan, Protocol};
use testbed::Database;

use crate::fixture::*;

/// A connection with the time it is due.
struct Aged {
    conn: PgConnection,
    due: Instant,
}

impl Borrow<PgConnection> for Aged {
    fn borrow(&self) -> &PgConnection {
        &self.conn
    }
}

impl BorrowMut<PgConnection> for Aged {
    fn borrow_mut(&mut self) -> &mut PgConnection {
        &mut self.conn
    }
}

impl Lifespan for Aged {
    fn expired(&self) -> bool {
        Instant::now() >= self.due
    }
}

/// Diesel's manager, its connections due `lifetime` after they open.
struct AgedManager {
    inner: ConnectionManager<PgConnection>,
    lifetime: Duration,
}

impl ManageConnection for AgedManager {
    type Connection = Aged;
    type Error = diesel::r2d2::Error;

    fn connect(&self) -> Result<Aged, Self::Error> {
        Ok(Aged {
            conn: self.inner.connect()?,
            due: Instant::now() + self.lifetime,
        })
    }

    fn is_valid(&self, conn: &mut Aged) -> Result<(), Self::Error> {
        self.inner.is_valid(&mut conn.conn)
    }

    fn has_broken(&self, conn: &mut Aged) -> bool {
        conn.expired() || self.inner.has_broken(&mut conn.conn)
    }
}

#[test]
fn a_held_connection_past_its_lifetime_is_replaced_between_calls() {
    let db = Database::create();
    let lifetime = Duration::from_millis(100);
    let pool = Pool::builder()
        .max_size(1)
        .build(AgedManager {
            inner: ConnectionManager::new(db.url.clone()),
            lifetime,
        })
        .unwrap();
    let held = Held::new(&pool);
    let (retrier, _) = on_postgres(Protocol::Restart);
    // Each session's first and last call, by its backend pid, and how long
    // the longest call took.
    let mut seen: BTreeMap<i32, (Instant, Instant)> = BTreeMap::new();
    let mut longest = Duration::ZERO;
    let began = Instant::now();
    while began.elapsed() < Duration::from_millis(700) {
        let start = Instant::now();
        let pid = retrier.transaction(&held, backend_pid_of).unwrap();
        let end = Instant::now();
        longest = longest.max(end - start);
        let span = seen.entry(pid).or_insert((start, end));
        span.1 = end;
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        seen.len() >= 3,
        "one session for {} calls: {seen:?}",
        seen.len()
    );
    for (pid, (first, last)) in &seen {
        // A connection serves calls that begin before it is due: its last
        // ends at most one call after.
        assert!(
            *last - *first <= lifetime + longest,
            "session {pid} served for {:?}",
            *last - *first
        );
    }
    // And the pool closed the ones it got back: one session is left.
    drop(held);
    // (A closed session leaves pg_stat_activity as its backend exits:
    // within a bound, not at once.)
    let mut watcher = db.conn();
    let sessions = format!(
        "(SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' AND pid <> pg_backend_pid())",
        db.name
    );
    let until = Instant::now() + Duration::from_secs(5);
    let mut open = bigint(&mut watcher, &sessions).unwrap();
    while open > 1 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
        open = bigint(&mut watcher, &sessions).unwrap();
    }
    assert!(open <= 1, "{open} sessions still open");
}

fn backend_pid_of(conn: &mut PgConnection) -> QueryResult<i32> {
    diesel::select(diesel::dsl::sql::<diesel::sql_types::Integer>(
        "pg_backend_pid()",
    ))
    .get_result(conn)
}
