//! A harness for users' own units (feature `testing`), the counterpart of
//! cockroach-go's `ExecuteTxGenericTest`: it forces a genuine conflict
//! between two units instead of hoping contention produces one, and checks
//! that they retried and kept the invariant the caller states.
//!
//! Each unit gets a [`Meet`]: it reads what its write depends on, calls
//! [`Meet::here`], then writes. On their first attempts both units wait
//! there until the other arrives, so both have read before either writes:
//! under SERIALIZABLE one of them must then fail with a serialization
//! failure and run again, and on its retry it sees the other's write.

use std::sync::{Condvar, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use diesel::PgConnection;

use crate::{AsDieselError, Committed, Retrier, TxError, TxOptions};

/// How long a unit waits at the meeting point for the other one.
const MEETING_WAIT: Duration = Duration::from_secs(30);

/// The meeting point of one attempt (see the module docs).
#[derive(Debug)]
pub struct Meet<'a> {
    barrier: Option<&'a Barrier>,
}

impl Meet<'_> {
    /// Waits for the other unit on the first attempt; does nothing on
    /// later ones. Panics (and so fails the unit, whose transaction is
    /// rolled back) if the other unit does not arrive within 30 s.
    pub fn here(&self) {
        if let Some(barrier) = self.barrier {
            barrier.wait();
        }
    }
}

#[derive(Debug)]
struct Barrier {
    arrived: Mutex<usize>,
    all_here: Condvar,
}

impl Barrier {
    fn wait(&self) {
        let mut arrived = self.arrived.lock().unwrap_or_else(PoisonError::into_inner);
        *arrived += 1;
        self.all_here.notify_all();
        let (arrived, timeout) = self
            .all_here
            .wait_timeout_while(arrived, MEETING_WAIT, |n| *n < 2)
            .unwrap_or_else(PoisonError::into_inner);
        assert!(
            !timeout.timed_out(),
            "only {} of 2 units reached the meeting point within {MEETING_WAIT:?}",
            *arrived
        );
    }
}

/// What each of the two units' calls returned.
pub type Raced<T, E> = [Result<Committed<T>, TxError<E>>; 2];

/// Runs `a` and `b` at once, each on its own thread and on a connection of
/// its own from `pool`, through `retrier` with `opts`; their first
/// attempts meet at [`Meet::here`]. Returns both calls' results, `a`'s
/// first.
///
/// # Panics
/// If a unit panics (a unit that never calls [`Meet::here`] leaves the
/// other waiting until it gives up, and panics).
pub fn race<T, E, A, B, M>(
    retrier: &Retrier,
    pool: &r2d2::Pool<M>,
    opts: TxOptions,
    a: A,
    b: B,
) -> Raced<T, E>
where
    T: Send,
    E: AsDieselError + Send,
    A: FnMut(&mut PgConnection, &Meet<'_>) -> Result<T, E> + Send,
    B: FnMut(&mut PgConnection, &Meet<'_>) -> Result<T, E> + Send,
    M: r2d2::ManageConnection<Connection = PgConnection>,
{
    let barrier = Barrier {
        arrived: Mutex::new(0),
        all_here: Condvar::new(),
    };
    thread::scope(|scope| {
        let barrier = &barrier;
        let a = scope.spawn(move || run_meeting(retrier, pool, opts, barrier, a));
        let b = scope.spawn(move || run_meeting(retrier, pool, opts, barrier, b));
        [a, b].map(|unit| unit.join().expect("a unit panicked"))
    })
}

fn run_meeting<T, E, F, M>(
    retrier: &Retrier,
    pool: &r2d2::Pool<M>,
    opts: TxOptions,
    barrier: &Barrier,
    mut unit: F,
) -> Result<Committed<T>, TxError<E>>
where
    E: AsDieselError,
    F: FnMut(&mut PgConnection, &Meet<'_>) -> Result<T, E>,
    M: r2d2::ManageConnection<Connection = PgConnection>,
{
    let mut first = true;
    retrier.run(pool, opts, |conn| {
        let meet = Meet {
            barrier: std::mem::take(&mut first).then_some(barrier),
        };
        unit(conn, &meet)
    })
}

/// [`race`], then checks what a correct pair of units must show: both
/// committed, at least one of them retried (the conflict was real and the
/// helper handled it), and `invariant` holds afterwards on a connection
/// from `pool`.
///
/// # Errors
/// A one-line description of what did not hold, with both results.
pub fn check<T, E, A, B, M>(
    retrier: &Retrier,
    pool: &r2d2::Pool<M>,
    opts: TxOptions,
    a: A,
    b: B,
    invariant: impl FnOnce(&mut PgConnection) -> bool,
) -> Result<[Committed<T>; 2], String>
where
    T: Send + std::fmt::Debug,
    E: AsDieselError + Send + std::fmt::Display,
    A: FnMut(&mut PgConnection, &Meet<'_>) -> Result<T, E> + Send,
    B: FnMut(&mut PgConnection, &Meet<'_>) -> Result<T, E> + Send,
    M: r2d2::ManageConnection<Connection = PgConnection>,
{
    let [a, b] = race(retrier, pool, opts, a, b);
    let (a, b) = match (a, b) {
        (Ok(a), Ok(b)) => (a, b),
        (a, b) => {
            let show = |r: &Result<Committed<T>, TxError<E>>| match r {
                Ok(c) => format!("{c:?}"),
                Err(err) => format!("error: {err}"),
            };
            return Err(format!(
                "both units must commit: {}; {}",
                show(&a),
                show(&b)
            ));
        }
    };
    if a.retries() + b.retries() == 0 {
        return Err(format!(
            "neither unit retried, so they never conflicted: {a:?}; {b:?}; \
             read what the write depends on before Meet::here"
        ));
    }
    let mut conn = pool
        .get()
        .map_err(|err| format!("no connection to check the invariant: {err}"))?;
    if !invariant(&mut conn) {
        return Err(format!("the invariant does not hold after {a:?}; {b:?}"));
    }
    Ok([a, b])
}
