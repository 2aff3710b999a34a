//! Cancel safety on the async front end: the call's future dropped after
//! 1, 2, 3... polls (every await point), dropped during a slow COMMIT, and
//! a unit that panics. After each, no session is left in a transaction and
//! the next checkout is clean.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use super::*;

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
