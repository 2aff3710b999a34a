//! Real conflicts, deterministically, on any server and with no PL/pgSQL:
//! write skew forced with a barrier, as cockroach-go's
//! `ExecuteTxGenericTest` does. Two units each read both accounts of a pair,
//! meet at the barrier on their first attempt (so both have read before
//! either writes), then each withdraws from its own account if the pair
//! stays covered. Run side by side without SERIALIZABLE, both would withdraw.

use std::sync::{Condvar, Mutex};
use std::thread;
use std::time::Duration;

use bank::bank::insert_accounts;
use bank::models::Account;
use bank::retry::{Committed, Protocol, Retrier, RetryPolicy, TxError, TxOptions};
use bank::schema::accounts;
use diesel::prelude::*;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use uuid::Uuid;

use crate::helpers::*;

const OPENING: i64 = 100;
const WITHDRAWAL: i64 = 100;
/// What the pair must keep in total: one withdrawal fits, two do not.
const FLOOR: i64 = 100;

/// A barrier whose wait gives up after a while instead of hanging the suite.
struct Barrier {
    arrived: Mutex<usize>,
    all_here: Condvar,
    parties: usize,
}

impl Barrier {
    fn new(parties: usize) -> Self {
        Self {
            arrived: Mutex::new(0),
            all_here: Condvar::new(),
            parties,
        }
    }

    fn wait(&self) {
        let mut arrived = self.arrived.lock().unwrap();
        *arrived += 1;
        self.all_here.notify_all();
        let (arrived, timeout) = self
            .all_here
            .wait_timeout_while(arrived, Duration::from_secs(30), |n| *n < self.parties)
            .unwrap();
        assert!(
            !timeout.timed_out(),
            "only {} of {} units reached the barrier",
            *arrived,
            self.parties
        );
    }
}

/// Withdraws from `own` if the pair stays at or above the floor; returns
/// whether it did.
fn withdraw_if_covered(
    conn: &mut PgConnection,
    pair: [Uuid; 2],
    own: Uuid,
    barrier: Option<&Barrier>,
) -> QueryResult<bool> {
    let balances: Vec<i64> = accounts::table
        .filter(accounts::id.eq_any(pair))
        .select(accounts::balance)
        .load(conn)?;
    if let Some(barrier) = barrier {
        barrier.wait();
    }
    if balances.iter().sum::<i64>() - WITHDRAWAL < FLOOR {
        return Ok(false);
    }
    diesel::update(accounts::table.find(own))
        .set(accounts::balance.eq(accounts::balance - WITHDRAWAL))
        .execute(conn)?;
    Ok(true)
}

type Outcome = Result<Committed<bool>, TxError<DieselError>>;

/// Both units, each on its own thread and connection, through `retrier`.
fn race(db: &TestDb, retrier: &Retrier) -> [Outcome; 2] {
    let pair = [Uuid::new_v4(), Uuid::new_v4()];
    let rows = pair.map(|id| Account {
        id,
        balance: OPENING,
    });
    insert_accounts(&mut db.conn(), &rows, 2).unwrap();
    let pool = db.pool(2);
    let barrier = Barrier::new(2);
    let outcomes = thread::scope(|scope| {
        pair.map(|own| {
            let (pool, barrier) = (&pool, &barrier);
            scope.spawn(move || {
                let mut first = true;
                retrier.run(pool, TxOptions::default(), |conn| {
                    let meet = std::mem::take(&mut first).then_some(barrier);
                    withdraw_if_covered(conn, pair, own, meet)
                })
            })
        })
        .map(|worker| worker.join().expect("a unit panicked"))
    });
    let total: i64 = db.accounts().iter().map(|(_, balance)| balance).sum();
    eprintln!("write skew: {outcomes:?}; the pair holds {total}");
    outcomes
}

fn retrier(db: &TestDb, protocol: Protocol, max_attempts: u32) -> Retrier {
    Retrier::new(
        RetryPolicy {
            max_attempts,
            ..RetryPolicy::default()
        },
        db.server,
    )
    .with_protocol(protocol)
}

fn without_retries_one_unit_meets_a_genuine_40001(protocol: Protocol) {
    let db = TestDb::migrated();
    let outcomes = race(&db, &retrier(&db, protocol, 1));
    let conflicts = outcomes
        .iter()
        .filter(|outcome| {
            matches!(
                outcome,
                Err(TxError::GaveUp {
                    attempts: 1,
                    last: DieselError::DatabaseError(DatabaseErrorKind::SerializationFailure, _),
                    ..
                })
            )
        })
        .count();
    assert_eq!(conflicts, 1, "{outcomes:?}");
    assert!(
        outcomes.iter().any(|o| matches!(o, Ok(c) if c.value)),
        "{outcomes:?}"
    );
    let total: i64 = db.accounts().iter().map(|(_, b)| b).sum();
    assert_eq!(total, 2 * OPENING - WITHDRAWAL);
}

fn with_retries_both_commit_and_the_skew_is_prevented(protocol: Protocol) {
    let db = TestDb::migrated();
    let outcomes = race(&db, &retrier(&db, protocol, 5));
    let committed: Vec<&Committed<bool>> = outcomes
        .iter()
        .map(|outcome| outcome.as_ref().expect("both units commit"))
        .collect();
    let retries: u32 = committed.iter().map(|c| c.retries()).sum();
    assert!(retries >= 1, "the conflict was retried: {committed:?}");
    let withdrawals = committed.iter().filter(|c| c.value).count();
    assert_eq!(withdrawals, 1, "exactly one withdrawal: {committed:?}");
    let total: i64 = db.accounts().iter().map(|(_, b)| b).sum();
    assert_eq!(total, 2 * OPENING - WITHDRAWAL, "the pair stays covered");
}

for_each_protocol!(
    without_retries_one_unit_meets_a_genuine_40001,
    with_retries_both_commit_and_the_skew_is_prevented,
);
