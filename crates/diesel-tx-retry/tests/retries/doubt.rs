//! Commits in doubt made on purpose: a proxy cuts the connection at the
//! first `COMMIT`, before forwarding it (the server rolls back) or just
//! after (the server commits, and its answer is lost). A plain unit ends in
//! doubt; an idempotent one is retried on a new connection, finds out by
//! its key what happened, and says so, even when no connection can be had
//! for a while after the cut. And a connection killed before the call's
//! first statement.

use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Duration;

use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel::result::Error as DieselError;
use diesel_tx_retry::{Applied, Cause, Outcome, Pooled, Protocol, Resolution, Source, TxError};
use testbed::proxy::{Cut, Proxy};
use testbed::Database;

use crate::fixture::*;

/// A unit idempotent by its mark: in doubt, it looks for the mark first.
fn mark_once(
    conn: &mut PgConnection,
    key: &str,
    in_doubt: bool,
) -> Result<Applied<()>, DieselError> {
    if in_doubt {
        let seen = bigint(
            conn,
            &format!("(SELECT count(*) FROM marks WHERE note = '{key}')"),
        )?;
        if seen == 1 {
            return Ok(Applied::Earlier(()));
        }
    }
    mark(conn, key)?;
    Ok(Applied::Now(()))
}

fn a_commit_cut_either_way_is_ambiguous_for_a_plain_unit_and_resolved_for_an_idempotent_one(
    protocol: Protocol,
) {
    for cut in [Cut::BeforeForwarding, Cut::AfterForwarding] {
        // Plain: in doubt, and reported so; the server decided as the cut
        // says.
        let db = with_faults();
        let proxy = Proxy::cutting_commits(db.tcp_addr(), 1_000, cut).unwrap();
        let pool = pool_via(&db, &proxy);
        let (retrier, _) = on_postgres(protocol);
        let result = retrier.transaction(&pool, |conn| mark(conn, "plain"));
        assert!(
            matches!(result, Err(TxError::AmbiguousCommit { attempts: 1, .. })),
            "{cut:?}: {result:?}"
        );
        let applied = i64::from(cut == Cut::AfterForwarding);
        assert_eq!(db.count("marks"), applied, "{cut:?}");

        // Idempotent: retried on a new connection, resolved by the key.
        let db = with_faults();
        let proxy = Proxy::cutting_commits(db.tcp_addr(), 1_000, cut).unwrap();
        let pool = pool_via(&db, &proxy);
        let done = retrier
            .build_transaction()
            .run_idempotent(&pool, "keyed", |conn, attempt| {
                mark_once(conn, attempt.key(), attempt.in_doubt())
            })
            .unwrap();
        let (applied, resolution) = match cut {
            Cut::AfterForwarding => (Applied::Earlier(()), Resolution::AppliedEarlier),
            Cut::BeforeForwarding => (Applied::Now(()), Resolution::AppliedNow),
        };
        assert_eq!(
            (done.attempts(), *done.value(), done.doubt()),
            (2, applied, Some(resolution)),
            "{cut:?}"
        );
        assert_eq!(
            proxy.connections(),
            2,
            "{cut:?}: the retry ran on a new connection"
        );
        assert_eq!(db.count("marks"), 1, "{cut:?}: applied once");
    }
}

#[test]
fn a_budget_spent_before_the_doubt_is_resolved_stays_ambiguous() {
    // Every COMMIT cut after it reached the server, three attempts: the
    // first commits; each retry finds its mark, but its own COMMIT is cut
    // too, so the call is in doubt again each time, until the attempts run
    // out: ambiguous, never "gave up, nothing committed".
    let db = with_faults();
    let proxy = Proxy::cutting_commits(db.tcp_addr(), 1, Cut::AfterForwarding).unwrap();
    let pool = pool_via(&db, &proxy);
    let (retrier, _) = retrier(diesel_tx_retry::Server::PostgreSql, Protocol::Restart, 3);
    let result = retrier.idempotent_transaction(&pool, "keyed", |conn, attempt| {
        mark_once(conn, attempt.key(), attempt.in_doubt())
    });
    assert!(
        matches!(result, Err(TxError::AmbiguousCommit { attempts: 3, .. })),
        "never 'gave up, nothing committed': {result:?}"
    );
    assert_eq!(db.count("marks"), 1);
}

/// A pool of one connection to `db`, killed while idle in the pool, which
/// checks nothing on checkout; and the killed backend's pid.
fn pool_with_its_connection_killed(db: &Database) -> (Pool<ConnectionManager<PgConnection>>, i32) {
    let pool = Pool::builder()
        .max_size(1)
        .test_on_check_out(false)
        .build(ConnectionManager::<PgConnection>::new(&db.url))
        .unwrap();
    let idle = backend_pid(&mut pool.get().unwrap());
    diesel::sql_query("SELECT pg_terminate_backend($1, 5000)")
        .bind::<diesel::sql_types::Integer, _>(idle)
        .execute(&mut db.conn())
        .unwrap();
    (pool, idle)
}

#[test]
fn a_connection_killed_before_the_call_is_replaced_at_begin() {
    let db = with_faults();
    let (pool, idle) = pool_with_its_connection_killed(&db);
    let (retrier, _) = on_postgres(Protocol::Restart);
    let done = retrier
        .build_transaction()
        .run(&pool, |conn| {
            mark(conn, "x")?;
            Ok::<_, DieselError>(backend_pid(conn))
        })
        .unwrap();
    assert_eq!(done.attempts(), 2);
    assert_ne!(*done.value(), idle);
    assert_eq!(db.count("marks"), 1);
}

for_each_protocol!(
    a_commit_cut_either_way_is_ambiguous_for_a_plain_unit_and_resolved_for_an_idempotent_one
);

/// After a commit in doubt, an idempotent unit that finds its key absent and
/// then refuses (a business rule, not the database) ends the call in doubt,
/// unless it said the doubt is over first ([`Keyed::not_applied_earlier`]):
/// then the refusal is what the call reports.
#[test]
fn a_refusal_after_the_unit_settled_the_doubt_is_definite() {
    for settle in [false, true] {
        let db = with_faults();
        let proxy = Proxy::cutting_commits(db.tcp_addr(), 1_000, Cut::BeforeForwarding).unwrap();
        let pool = pool_via(&db, &proxy);
        let (retrier, _) = on_postgres(Protocol::Restart);
        let result = retrier.idempotent_transaction(&pool, "keyed", |conn, attempt| {
            if attempt.in_doubt() {
                // Cut before it reached the server: the mark is not there.
                assert_eq!(
                    bigint(conn, "(SELECT count(*) FROM marks WHERE note = 'keyed')")?,
                    0
                );
                if settle {
                    attempt.not_applied_earlier();
                }
                anyhow::bail!("out of stock");
            }
            mark(conn, attempt.key())?;
            Ok(Applied::Now(()))
        });
        match (settle, &result) {
            (true, Err(TxError::Failed(err))) => assert_eq!(err.to_string(), "out of stock"),
            (false, Err(TxError::AmbiguousCommit { attempts: 2, .. })) => {}
            _ => panic!("settled {settle}: {result:?}"),
        }
        assert_eq!(db.count("marks"), 0);
    }
}

/// A pool that cannot be reached for its checkouts numbered `refused`
/// (the first is 1): a server gone for a while, as after the outage that
/// cut a COMMIT.
struct Outage<'p> {
    pool: &'p Pool<ConnectionManager<PgConnection>>,
    checkouts: usize,
    refused: RangeInclusive<usize>,
}

impl<'p> Outage<'p> {
    fn new(
        pool: &'p Pool<ConnectionManager<PgConnection>>,
        refused: RangeInclusive<usize>,
    ) -> Self {
        Self {
            pool,
            checkouts: 0,
            refused,
        }
    }
}

impl Source for Outage<'_> {
    type Conn<'s>
        = Pooled<ConnectionManager<PgConnection>>
    where
        Self: 's;

    fn checkout(&mut self) -> Result<Self::Conn<'_>, Box<dyn std::error::Error + Send + Sync>> {
        self.checkouts += 1;
        if self.refused.contains(&self.checkouts) {
            return Err("timed out waiting for connection".into());
        }
        let mut pool = self.pool;
        pool.checkout()
    }
}

/// After a COMMIT cut either way, the pool cannot give a connection for two
/// checkouts: only a connection can settle the doubt, so the helper asks
/// again after its backoff (each ask an attempt) and resolves it by the key.
/// When the attempts run out first, the call stays in doubt; without a
/// doubt, a failed checkout ends the call at once, as nothing committed.
#[test]
fn an_outage_after_a_commit_in_doubt_is_waited_out_within_the_attempts() {
    let ms = Duration::from_millis;
    let lost = Some(Cause::ConnectionLost);
    for cut in [Cut::BeforeForwarding, Cut::AfterForwarding] {
        let db = with_faults();
        let proxy = Proxy::cutting_commits(db.tcp_addr(), 1_000, cut).unwrap();
        let pool = pool_via(&db, &proxy);
        let seen = Arc::new(Seen::default());
        let (retrier, clock) = on_postgres(Protocol::Restart);
        let retrier = retrier.with_observer(seen.clone());
        let done = retrier
            .build_transaction()
            .run_idempotent(Outage::new(&pool, 2..=3), "keyed", |conn, attempt| {
                mark_once(conn, attempt.key(), attempt.in_doubt())
            })
            .unwrap();
        let resolution = match cut {
            Cut::AfterForwarding => Resolution::AppliedEarlier,
            Cut::BeforeForwarding => Resolution::AppliedNow,
        };
        assert_eq!(
            (done.attempts(), done.doubt()),
            (4, Some(resolution)),
            "{cut:?}"
        );
        assert_eq!(
            *seen.0.lock().unwrap(),
            vec![
                (1, lost, Outcome::Reconnected),
                (2, lost, Outcome::Reconnected),
                (3, lost, Outcome::Reconnected),
                (4, None, Outcome::Committed),
            ],
            "{cut:?}"
        );
        assert_eq!(clock.sleeps(), [ms(10), ms(20), ms(40)], "{cut:?}");
        assert_eq!(db.count("marks"), 1, "{cut:?}: applied once");
    }

    // The outage outlasts the attempts: in doubt, never "no connection".
    let db = with_faults();
    let proxy = Proxy::cutting_commits(db.tcp_addr(), 1_000, Cut::AfterForwarding).unwrap();
    let pool = pool_via(&db, &proxy);
    let (retrier, _) = retrier(diesel_tx_retry::Server::PostgreSql, Protocol::Restart, 3);
    let result =
        retrier.idempotent_transaction(Outage::new(&pool, 2..=99), "keyed", |conn, attempt| {
            mark_once(conn, attempt.key(), attempt.in_doubt())
        });
    assert!(
        matches!(result, Err(TxError::AmbiguousCommit { attempts: 3, .. })),
        "{result:?}"
    );
    assert_eq!(db.count("marks"), 1);

    // No doubt: the connection was lost before anything was sent, and the
    // pool has no other one. Nothing committed, and the call says so.
    let db = with_faults();
    let (pool, _) = pool_with_its_connection_killed(&db);
    let (retrier, _) = on_postgres(Protocol::Restart);
    let result =
        retrier.idempotent_transaction(Outage::new(&pool, 2..=2), "keyed", |conn, attempt| {
            mark_once(conn, attempt.key(), attempt.in_doubt())
        });
    assert!(
        matches!(result, Err(TxError::NoConnection(_))),
        "{result:?}"
    );
    assert_eq!(db.count("marks"), 0);
}
