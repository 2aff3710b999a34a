//! The shared retry budget against real conflicts: a conflict forced by the
//! harness is retried when the budget has a token for it, and ends as given
//! up (the budget named) when it has none; a commit in doubt is resolved
//! whatever the budget says.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use diesel::prelude::*;
use diesel::result::Error as DieselError;
use diesel_tx_retry::testing::{self, Meet};
use diesel_tx_retry::{
    Applied, Attempt, Budget, Observer, Outcome, Protocol, RetryBudget, TxError,
};
use testbed::proxy::{Cut, Proxy};
use testbed::Database;

use crate::fixture::*;

fn counter() -> Database {
    let db = Database::create();
    db.exec("CREATE TABLE counter (n INT8 NOT NULL); INSERT INTO counter VALUES (0)");
    db
}

fn bump(conn: &mut PgConnection, meet: &Meet<'_>) -> QueryResult<i64> {
    let n = bigint(conn, "(SELECT n FROM counter)")?;
    meet.here();
    diesel::sql_query(format!("UPDATE counter SET n = {}", n + 1)).execute(conn)?;
    Ok(n + 1)
}

/// What the observer heard of calls that gave up: their budgets.
#[derive(Default)]
struct GaveUp(Mutex<Vec<Option<Budget>>>);

impl Observer for GaveUp {
    fn attempt(&self, attempt: &Attempt) {
        if attempt.outcome() == Outcome::GaveUp {
            self.0.lock().unwrap().push(attempt.budget());
        }
    }
}

/// Both calls' results, the budgets the observer heard ran out, and the
/// counter afterwards.
type Raced = (
    Vec<Result<i64, TxError<DieselError>>>,
    Vec<Option<Budget>>,
    i64,
);

/// Two units forced into a conflict by the harness, under `budget`.
fn race_under(budget: RetryBudget) -> Raced {
    let db = counter();
    let pool = db.pool(2);
    let seen = Arc::new(GaveUp::default());
    let (retrier, _) = on_postgres(Protocol::Restart);
    let retrier = retrier
        .with_retry_budget(budget)
        .with_observer(seen.clone());
    let side = |meet: &Meet<'_>| retrier.transaction(&pool, |conn| bump(conn, meet));
    let (a, b) = testing::race(Duration::from_secs(30), side, side);
    let n = bigint(&mut db.conn(), "(SELECT n FROM counter)").unwrap();
    let gave_up = seen.0.lock().unwrap().clone();
    (vec![a, b], gave_up, n)
}

#[test]
fn a_conflict_is_retried_when_the_budget_pays_and_given_up_when_it_cannot() {
    // One token (a budget starts full): the loser's retry is paid for,
    // and both commit.
    let (results, gave_up, n) = race_under(RetryBudget::new(0.0).with_floor(0.0).with_cap(1.0));
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert!(gave_up.is_empty());
    assert_eq!(n, 2);

    // No tokens, no floor: the loser's retry is refused, and the call
    // says which budget ran out; the winner committed.
    let (results, gave_up, n) = race_under(RetryBudget::new(0.0).with_floor(0.0).with_cap(0.0));
    let refused: Vec<_> = results
        .iter()
        .filter(|r| {
            matches!(
                r,
                Err(TxError::GaveUp {
                    budget: Budget::Retries,
                    attempts: 1,
                    ..
                })
            )
        })
        .collect();
    assert_eq!(refused.len(), 1, "{results:?}");
    assert!(results.iter().any(Result::is_ok), "{results:?}");
    assert_eq!(gave_up, [Some(Budget::Retries)]);
    assert_eq!(n, 1);
    let line = refused[0].as_ref().unwrap_err().to_string();
    assert!(line.contains("the shared retry budget was spent"), "{line}");

    // The floor alone pays for it.
    let (results, _, n) = race_under(RetryBudget::new(0.0).with_floor(5.0).with_cap(0.0));
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(n, 2);
}

#[test]
fn a_commit_in_doubt_is_resolved_whatever_the_budget_says() {
    let db = with_faults();
    let proxy = Proxy::cutting_commits(db.tcp_addr(), 1_000, Cut::AfterForwarding).unwrap();
    let pool = pool_via(&db, &proxy);
    let (retrier, _) = on_postgres(Protocol::Restart);
    let retrier = retrier.with_retry_budget(RetryBudget::new(0.0).with_floor(0.0).with_cap(0.0));
    let done = retrier
        .build_transaction()
        .run_idempotent(&pool, "keyed", |conn, attempt| {
            if attempt.in_doubt()
                && bigint(conn, "(SELECT count(*) FROM marks WHERE note = 'keyed')")? == 1
            {
                return Ok::<_, DieselError>(Applied::Earlier(()));
            }
            mark(conn, attempt.key())?;
            Ok(Applied::Now(()))
        })
        .unwrap();
    assert_eq!((done.attempts(), *done.value()), (2, Applied::Earlier(())));
    assert_eq!(db.count("marks"), 1);
}
