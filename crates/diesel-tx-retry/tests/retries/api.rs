//! The entry points as a service uses them: first use in two lines, the
//! idempotent entry point's verdicts, per-call options and the report, any
//! error type (and a loud refusal of one that hides its database errors),
//! the observer, a transaction-mode pooler's stale statements, and the
//! refusals.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel::result::Error as DieselError;
use diesel_tx_retry::{
    Applied, Attempt, Cause, Isolation, Observer, Outcome, Protocol, Retrier, Server, TxError,
};
use testbed::Database;

use crate::fixture::*;

#[test]
fn first_use_is_two_lines_and_the_server_is_detected_once() {
    let db = with_faults();
    let pool = db.pool(1);
    let retrier = Retrier::default();
    assert_eq!(retrier.server(), None);
    let n: i64 = retrier
        .transaction(&pool, |conn| {
            mark(conn, "x")?;
            bigint(conn, "(SELECT count(*) FROM marks)")
        })
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(retrier.server(), Some(Server::PostgreSql));
    assert_eq!(retrier.protocol(), Some(Protocol::Restart));
    // Clones share what it learned.
    assert_eq!(retrier.clone().server(), Some(Server::PostgreSql));
}

#[test]
fn an_idempotent_call_returns_the_units_verdict() {
    let db = with_faults();
    let pool = db.pool(1);
    let retrier = Retrier::default();
    let key = uuid::Uuid::new_v4().to_string();
    let once = |conn: &mut PgConnection, key: &String| -> Result<Applied<i64>, DieselError> {
        let seen = bigint(
            conn,
            &format!("(SELECT count(*) FROM marks WHERE note = '{key}')"),
        )?;
        if seen == 1 {
            return Ok(Applied::Earlier(seen));
        }
        mark(conn, key)?;
        Ok(Applied::Now(1))
    };
    let first = retrier
        .idempotent_transaction(&pool, key.clone(), |conn, attempt| {
            once(conn, attempt.key())
        })
        .unwrap();
    assert_eq!(first, Applied::Now(1));
    // The caller retries a whole call (its last one ended in doubt): the
    // key is found, nothing is applied twice.
    let again = retrier
        .idempotent_transaction(&pool, key, |conn, attempt| once(conn, attempt.key()))
        .unwrap();
    assert!(again.was_earlier());
    assert_eq!(db.count("marks"), 1);
}

#[test]
fn per_call_options_hold_and_the_report_tells_the_attempts() {
    let db = with_faults();
    let (retrier, _) = on_postgres(Protocol::Restart);
    let done = retrier
        .build_transaction()
        .read_only()
        .isolation(Isolation::ReadCommitted)
        .run(&db.pool(1), |conn| {
            Ok::<_, DieselError>((
                setting(conn, "transaction_isolation")?,
                setting(conn, "transaction_read_only")?,
            ))
        })
        .unwrap();
    assert_eq!(
        done.value(),
        &("read committed".to_owned(), "on".to_owned())
    );
    assert_eq!(
        (done.attempts(), done.retries(), done.doubt()),
        (1, 0, None)
    );
}

/// A unit's own errors, as a service writes them.
#[derive(Debug, thiserror::Error)]
enum ShopError {
    #[error("out of stock")]
    OutOfStock,
    #[error("{0}")]
    Database(#[from] DieselError),
}

/// The same, with the database variant transparent, which hides it.
#[derive(Debug, thiserror::Error)]
enum HidingError {
    #[error("out of stock")]
    OutOfStock,
    #[error(transparent)]
    Database(#[from] DieselError),
}

#[test]
fn any_error_type_that_shows_its_database_error_is_retried_on_a_conflict() {
    let db = with_faults();
    let pool = db.pool(1);
    let (retrier, _) = on_postgres(Protocol::Restart);
    // A thiserror enum: the conflict retried, the refusal returned.
    let placed = retrier
        .build_transaction()
        .run(&pool, |conn| {
            fail_first(conn, 1, "40001")?;
            Ok::<_, ShopError>("placed")
        })
        .unwrap();
    assert_eq!(placed.attempts(), 2);
    let refused = retrier.transaction(&pool, |_| Err::<(), _>(ShopError::OutOfStock));
    assert!(
        matches!(refused, Err(TxError::Failed(ShopError::OutOfStock))),
        "{refused:?}"
    );
    // anyhow::Error, with context around the database error.
    db.exec("ALTER SEQUENCE statement_faults RESTART");
    let placed = retrier
        .build_transaction()
        .run(&pool, |conn| -> anyhow::Result<&str> {
            use anyhow::Context as _;
            fail_first(conn, 1, "40001").context("reserving the item")?;
            Ok("placed")
        })
        .unwrap();
    assert_eq!(placed.attempts(), 2);
    let refused = retrier.transaction(&pool, |_| -> anyhow::Result<()> {
        anyhow::bail!("out of stock")
    });
    assert_eq!(refused.unwrap_err().to_string(), "out of stock");
    // A boxed error.
    db.exec("ALTER SEQUENCE statement_faults RESTART");
    let placed = retrier
        .build_transaction()
        .run(
            &pool,
            |conn| -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
                fail_first(conn, 1, "40001")?;
                Ok(())
            },
        )
        .unwrap();
    assert_eq!(placed.attempts(), 2);
}

#[test]
fn an_error_type_that_hides_its_database_error_is_refused_loudly() {
    let db = with_faults();
    let pool = db.pool(1);
    let (retrier, _) = on_postgres(Protocol::Restart);
    let mut runs = 0;
    let result = retrier.transaction(&pool, |conn| {
        runs += 1;
        fail_first(conn, 1, "40001")?;
        Ok::<_, HidingError>(())
    });
    let err = result.unwrap_err();
    assert!(matches!(err, TxError::HiddenDatabaseError(_)), "{err:?}");
    assert_eq!(runs, 1, "not retried: nobody can tell it was a conflict");
    let line = err.to_string();
    assert!(
        line.starts_with("injected fault 1 of 1 (the unit's error type "),
        "{line}"
    );
    assert!(
        line.contains("HidingError does not show the helper"),
        "{line}"
    );
    // Its own errors too: the type cannot be told apart.
    let result = retrier.transaction(&pool, |_| Err::<(), _>(HidingError::OutOfStock));
    assert!(matches!(
        result,
        Err(TxError::HiddenDatabaseError(HidingError::OutOfStock))
    ));
}

/// Every attempt the helper reports.
/// An attempt as an observer sees it: number, cause, outcome, backoff.
type Seen1 = (u32, Option<Cause>, Outcome, Duration);

#[derive(Default)]
struct Seen(Mutex<Vec<Seen1>>);

impl Observer for Seen {
    fn attempt(&self, attempt: &Attempt) {
        self.0.lock().unwrap().push((
            attempt.number(),
            attempt.cause(),
            attempt.outcome(),
            attempt.backoff(),
        ));
    }
}

#[test]
fn the_observer_tells_a_domain_error_from_a_database_error() {
    let db = with_faults();
    let pool = db.pool(1);
    let seen = Arc::new(Seen::default());
    let (retrier, _) = on_postgres(Protocol::Restart);
    let retrier = retrier.with_observer(seen.clone());
    retrier
        .transaction(&pool, |conn| {
            fail_first(conn, 1, "40001")?;
            Ok::<_, ShopError>(())
        })
        .unwrap();
    let _ = retrier.transaction(&pool, |_| Err::<(), _>(ShopError::OutOfStock));
    let ms = Duration::from_millis;
    assert_eq!(
        *seen.0.lock().unwrap(),
        vec![
            (1, Some(Cause::Conflict), Outcome::Restarted, ms(10)),
            (2, None, Outcome::Committed, ms(0)),
            (1, Some(Cause::Domain), Outcome::Failed, ms(0)),
        ]
    );
    assert_eq!(
        [Cause::Conflict.to_string(), Outcome::Restarted.to_string()],
        ["conflict", "restarted"]
    );
}

#[test]
fn a_poolers_stale_statement_is_run_again_unnamed() {
    // What a transaction-mode pooler does to a named statement (another
    // server session, which never prepared it), played on one session:
    // the statement is deallocated under Diesel's cache.
    let db = with_faults();
    let (retrier, _) = on_postgres(Protocol::Restart);
    let mut conn = db.conn();
    // A query built with Diesel's DSL: prepared once, under a name, and
    // cached (a `sql_query` is not cached, and would not show it).
    let count = |conn: &mut PgConnection| marks::table.count().get_result::<i64>(conn);
    // Prepared (and cached by name) outside the helper.
    assert_eq!(count(&mut conn).unwrap(), 0);
    conn.batch_execute("DEALLOCATE ALL").unwrap();
    let done = retrier
        .build_transaction()
        .run(&mut conn, |conn| count(conn))
        .unwrap();
    assert_eq!((*done.value(), done.attempts()), (0, 2));
}

diesel::table! {
    marks (id) {
        id -> Int4,
        note -> Text,
    }
}

#[test]
fn calling_the_helper_inside_a_transaction_is_refused() {
    let db = Database::create();
    let mut conn = db.conn();
    let retrier = Retrier::default();
    let nested = conn.transaction(|conn| {
        let inner = retrier.transaction(conn, |c| c.batch_execute("SELECT 1"));
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
}

#[test]
fn a_pool_that_cannot_connect_is_reported_with_its_cause() {
    // A port just freed: nothing listens there, connections are refused.
    let reserved = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = reserved.local_addr().unwrap().port();
    drop(reserved);
    let pool = Pool::builder()
        .connection_timeout(Duration::from_millis(300))
        .build_unchecked(ConnectionManager::<PgConnection>::new(format!(
            "postgresql://app@127.0.0.1:{port}/bank"
        )));
    let result = Retrier::default()
        .for_server(Server::PostgreSql)
        .transaction(&pool, |conn| conn.batch_execute("SELECT 1"));
    let Err(err @ TxError::NoConnection(_)) = result else {
        panic!("expected a pool error, got {result:?}");
    };
    let line = format!("{:#}", anyhow::Error::new(err));
    assert!(
        line.starts_with(
            "could not get a connection from the pool: timed out waiting for connection"
        ),
        "{line}"
    );
    // The cause once: the error's message does not repeat its source's.
    assert_eq!(
        line.matches("timed out waiting for connection").count(),
        1,
        "{line}"
    );
}
