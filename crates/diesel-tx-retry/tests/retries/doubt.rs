//! Commits in doubt made on purpose: a proxy cuts the connection at the
//! first `COMMIT`, before forwarding it (the server rolls back) or just
//! after (the server commits, and its answer is lost). A plain unit ends in
//! doubt; an idempotent one is retried on a new connection, finds out by
//! its key what happened, and says so. And a connection killed before the
//! call's first statement.

use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel::result::Error as DieselError;
use diesel_tx_retry::{Applied, Protocol, Resolution, TxError};
use testbed::proxy::{Cut, Proxy};

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

#[test]
fn a_connection_killed_before_the_call_is_replaced_at_begin() {
    let db = with_faults();
    let pool = Pool::builder()
        .max_size(1)
        .test_on_check_out(false)
        .build(ConnectionManager::<PgConnection>::new(&db.url))
        .unwrap();
    let idle = backend_pid(&mut pool.get().unwrap());
    // Killed while idle in the pool, which checks nothing on checkout.
    diesel::sql_query("SELECT pg_terminate_backend($1, 5000)")
        .bind::<diesel::sql_types::Integer, _>(idle)
        .execute(&mut db.conn())
        .unwrap();
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
