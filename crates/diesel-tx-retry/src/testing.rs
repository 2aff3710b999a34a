//! A harness for users' own units (feature `testing`), the counterpart of
//! cockroach-go's `ExecuteTxGenericTest`: it forces a genuine conflict
//! between two units instead of hoping contention produces one, and checks
//! that they retried and kept the invariant the caller states.
//!
//! [`race`] runs two calls at once, each on its own thread, through any
//! entry point (idempotent ones included), each unit with its own context.
//! Each call gets a [`Meet`]: its unit reads what its write depends on,
//! calls [`Meet::here`], then writes. The first time each side calls it,
//! both wait there until the other arrives, so both have read before either
//! writes: under SERIALIZABLE one of them must then fail with a
//! serialization failure and run again, and on its retry it sees the other's
//! write.
//!
//! ```no_run
//! use std::time::Duration;
//! use diesel::prelude::*;
//! use diesel::r2d2::{ConnectionManager, Pool};
//! use diesel_tx_retry::{testing, Retrier};
//!
//! # fn demo(pool: &Pool<ConnectionManager<PgConnection>>) -> Result<(), String> {
//! let retrier = Retrier::default();
//! let bump = |meet: &testing::Meet| {
//!     retrier.build_transaction().run(pool, |conn| {
//!         let n: i64 = diesel::dsl::sql::<diesel::sql_types::BigInt>("n").get_result(conn)?;
//!         meet.here();
//!         diesel::sql_query(format!("UPDATE counters SET n = {}", n + 1)).execute(conn)
//!     })
//! };
//! testing::check(Duration::from_secs(5), bump, bump, || true)?;
//! # Ok(())
//! # }
//! ```

use std::any::Any;
use std::cell::Cell;
use std::fmt::Debug;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::Duration;

use crate::{Committed, TxError};

/// One side's meeting point (see the module docs).
#[derive(Debug)]
pub struct Meet<'a> {
    place: &'a Place,
    /// Whether this side has met already.
    met: Cell<bool>,
}

impl Meet<'_> {
    /// Waits for the other side, the first time this side calls it; does
    /// nothing on later calls (retries).
    ///
    /// # Panics
    /// When the other side ends without reaching its meeting point (its
    /// unit returned, failed or panicked first), at once; or when it has
    /// not arrived within the race's bound. The panic fails this side's
    /// unit, whose transaction is rolled back, and [`race`] reports it.
    pub fn here(&self) {
        if !self.met.replace(true) {
            self.place.arrive();
        }
    }
}

/// Where both sides meet: how many arrived, and how many ended without.
#[derive(Debug)]
struct Place {
    state: Mutex<(usize, usize)>,
    changed: Condvar,
    bound: Duration,
}

impl Place {
    fn lock(&self) -> MutexGuard<'_, (usize, usize)> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn arrive(&self) {
        let mut state = self.lock();
        state.0 += 1;
        self.changed.notify_all();
        let (state, timeout) = self
            .changed
            .wait_timeout_while(state, self.bound, |(arrived, gone)| {
                *arrived < 2 && *gone == 0
            })
            .unwrap_or_else(PoisonError::into_inner);
        if state.0 < 2 {
            drop(state);
            if timeout.timed_out() {
                panic!(
                    "the other unit did not reach the meeting point within {:?}",
                    self.bound
                );
            }
            panic!("the other unit ended without reaching the meeting point");
        }
    }

    /// One side ended (returned or panicked): whoever waits for it stops.
    fn leave(&self) {
        self.lock().1 += 1;
        self.changed.notify_all();
    }
}

/// Runs `a` and `b` at once, each on a thread of its own, each with its
/// [`Meet`]; their units wait for each other at [`Meet::here`] for at most
/// `bound`. Returns both calls' results, `a`'s first.
///
/// # Panics
/// When a side panics (a unit that panicked, or a meeting that failed),
/// with each side's own message, as soon as both sides ended: a side that
/// waits for one that already ended stops waiting at once.
pub fn race<RA, RB>(
    bound: Duration,
    a: impl FnOnce(&Meet<'_>) -> RA + Send,
    b: impl FnOnce(&Meet<'_>) -> RB + Send,
) -> (RA, RB)
where
    RA: Send,
    RB: Send,
{
    let place = Place {
        state: Mutex::new((0, 0)),
        changed: Condvar::new(),
        bound,
    };
    let (ra, rb) = thread::scope(|scope| {
        let place = &place;
        let a = scope.spawn(move || side(place, a));
        let b = scope.spawn(move || side(place, b));
        (a.join(), b.join())
    });
    // A side's thread cannot panic outside `side`, which catches the
    // unit's panic: both are reported the same way.
    let ra = ra.unwrap_or_else(Err);
    let rb = rb.unwrap_or_else(Err);
    match (ra, rb) {
        (Ok(ra), Ok(rb)) => (ra, rb),
        (ra, rb) => {
            let panicked = |name: &str, payload: Option<Box<dyn Any + Send>>| {
                payload.map(|payload| format!("unit {name} panicked: {}", message(&*payload)))
            };
            let said: Vec<String> = [panicked("a", ra.err()), panicked("b", rb.err())]
                .into_iter()
                .flatten()
                .collect();
            panic!("{}", said.join("; "));
        }
    }
}

/// One side: its call, then word that it ended, however it ended.
fn side<R>(
    place: &Place,
    call: impl FnOnce(&Meet<'_>) -> R,
) -> Result<R, Box<dyn Any + Send + 'static>> {
    let meet = Meet {
        place,
        met: Cell::new(false),
    };
    let result = panic::catch_unwind(AssertUnwindSafe(|| call(&meet)));
    place.leave();
    result
}

/// A panic's message, when it has one.
fn message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(a panic without a message)".to_owned())
}

/// [`race`] two reported calls ([`TransactionBuilder::run`](crate::TransactionBuilder::run)
/// or [`run_idempotent`](crate::TransactionBuilder::run_idempotent)), then
/// checks what a correct pair of units must show: both committed, at least
/// one of them retried (the conflict was real and the helper handled it),
/// and `invariant` holds afterwards.
///
/// # Errors
/// A one-line description of what did not hold, with both results.
///
/// # Panics
/// As [`race`] does.
pub fn check<T, E>(
    bound: Duration,
    a: impl FnOnce(&Meet<'_>) -> Result<Committed<T>, TxError<E>> + Send,
    b: impl FnOnce(&Meet<'_>) -> Result<Committed<T>, TxError<E>> + Send,
    invariant: impl FnOnce() -> bool,
) -> Result<[Committed<T>; 2], String>
where
    T: Send + Debug,
    E: Send + std::fmt::Display,
{
    let (a, b) = race(bound, a, b);
    verdict(a, b, invariant)
}

/// What [`check`] and [`check_async`] require of two raced calls.
fn verdict<T: Debug, E: std::fmt::Display>(
    a: Result<Committed<T>, TxError<E>>,
    b: Result<Committed<T>, TxError<E>>,
    invariant: impl FnOnce() -> bool,
) -> Result<[Committed<T>; 2], String> {
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
    if !invariant() {
        return Err(format!("the invariant does not hold after {a:?}; {b:?}"));
    }
    Ok([a, b])
}

#[cfg(feature = "async")]
pub use self::nonblocking::{check_async, race_async, AsyncMeet};

/// The harness for async units: the sides are two futures polled together
/// on the caller's task, and the meeting point an async barrier.
#[cfg(feature = "async")]
mod nonblocking {
    use std::any::Any;
    use std::fmt::Debug;
    use std::future::{poll_fn, Future};
    use std::panic::{self, AssertUnwindSafe};
    use std::pin::{pin, Pin};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex, PoisonError};
    use std::task::{Context, Poll};
    use std::time::Duration;

    use tokio::sync::Notify;

    use super::{message, verdict};
    use crate::{Committed, TxError};

    /// One side's meeting point for async units (see the module docs); it
    /// is `Send` and `Sync`, so a unit may hold it across an await.
    #[derive(Debug)]
    pub struct AsyncMeet {
        place: Arc<AsyncPlace>,
        met: AtomicBool,
    }

    impl AsyncMeet {
        /// Waits for the other side, the first time this side calls it;
        /// returns at once on later calls (retries).
        ///
        /// # Panics
        /// As [`Meet::here`](super::Meet::here): when the other side ends
        /// without reaching its meeting point, or has not arrived within the
        /// race's bound.
        pub async fn here(&self) {
            if !self.met.swap(true, Ordering::Relaxed) {
                self.place.arrive().await;
            }
        }
    }

    #[derive(Debug)]
    struct AsyncPlace {
        /// How many arrived, and how many ended without.
        state: Mutex<(usize, usize)>,
        changed: Notify,
        bound: Duration,
    }

    impl AsyncPlace {
        fn state(&self) -> (usize, usize) {
            *self.state.lock().unwrap_or_else(PoisonError::into_inner)
        }

        fn change(&self, arrived: usize, gone: usize) {
            {
                let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
                state.0 += arrived;
                state.1 += gone;
            }
            self.changed.notify_waiters();
        }

        async fn arrive(&self) {
            self.change(1, 0);
            let wait = async {
                loop {
                    // Registered before the state is read: no change is missed.
                    let notified = self.changed.notified();
                    let mut notified = pin!(notified);
                    notified.as_mut().enable();
                    let (arrived, gone) = self.state();
                    if arrived >= 2 {
                        return;
                    }
                    if gone > 0 {
                        panic!("the other unit ended without reaching the meeting point");
                    }
                    notified.await;
                }
            };
            if tokio::time::timeout(self.bound, wait).await.is_err() {
                panic!(
                    "the other unit did not reach the meeting point within {:?}",
                    self.bound
                );
            }
        }
    }

    /// [`race`](super::race) for async calls: runs the futures `a` and `b`
    /// make, together on this task, each with its [`AsyncMeet`]; they wait
    /// for each other at [`AsyncMeet::here`] for at most `bound`. Returns
    /// both results, `a`'s first.
    ///
    /// # Panics
    /// As [`race`](super::race): with each side's own message, once both
    /// sides ended.
    pub async fn race_async<FA, FB>(
        bound: Duration,
        a: impl FnOnce(AsyncMeet) -> FA,
        b: impl FnOnce(AsyncMeet) -> FB,
    ) -> (FA::Output, FB::Output)
    where
        FA: Future,
        FB: Future,
    {
        let place = Arc::new(AsyncPlace {
            state: Mutex::new((0, 0)),
            changed: Notify::new(),
            bound,
        });
        let meet = || AsyncMeet {
            place: Arc::clone(&place),
            met: AtomicBool::new(false),
        };
        let mut fa = pin!(side(&place, a(meet())));
        let mut fb = pin!(side(&place, b(meet())));
        let (mut ra, mut rb) = (None, None);
        poll_fn(|cx| {
            if ra.is_none() {
                if let Poll::Ready(r) = fa.as_mut().poll(cx) {
                    ra = Some(r);
                }
            }
            if rb.is_none() {
                if let Poll::Ready(r) = fb.as_mut().poll(cx) {
                    rb = Some(r);
                }
            }
            if ra.is_some() && rb.is_some() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
        match (ra, rb) {
            (Some(Ok(ra)), Some(Ok(rb))) => (ra, rb),
            (ra, rb) => {
                let panicked = |name: &str, r: Option<Result<(), Box<dyn Any + Send>>>| {
                    r.and_then(Result::err)
                        .map(|payload| format!("unit {name} panicked: {}", message(&*payload)))
                };
                let said: Vec<String> = [
                    panicked("a", ra.map(|r| r.map(drop))),
                    panicked("b", rb.map(|r| r.map(drop))),
                ]
                .into_iter()
                .flatten()
                .collect();
                panic!("{}", said.join("; "));
            }
        }
    }

    /// One side: its future, its panic caught, then word that it ended.
    async fn side<F: Future>(
        place: &AsyncPlace,
        call: F,
    ) -> Result<F::Output, Box<dyn Any + Send>> {
        let result = Caught(Box::pin(call)).await;
        place.change(0, 1);
        result
    }

    struct Caught<F>(Pin<Box<F>>);

    impl<F: Future> Future for Caught<F> {
        type Output = Result<F::Output, Box<dyn Any + Send>>;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            let inner = self.0.as_mut();
            match panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
                Ok(Poll::Pending) => Poll::Pending,
                Ok(Poll::Ready(value)) => Poll::Ready(Ok(value)),
                Err(payload) => Poll::Ready(Err(payload)),
            }
        }
    }

    /// [`check`](super::check) for async calls ([`race_async`]).
    ///
    /// # Errors
    /// A one-line description of what did not hold, with both results.
    ///
    /// # Panics
    /// As [`race_async`].
    pub async fn check_async<T, E, FA, FB>(
        bound: Duration,
        a: impl FnOnce(AsyncMeet) -> FA,
        b: impl FnOnce(AsyncMeet) -> FB,
        invariant: impl FnOnce() -> bool,
    ) -> Result<[Committed<T>; 2], String>
    where
        FA: Future<Output = Result<Committed<T>, TxError<E>>>,
        FB: Future<Output = Result<Committed<T>, TxError<E>>>,
        T: Debug,
        E: std::fmt::Display,
    {
        let (a, b) = race_async(bound, a, b).await;
        verdict(a, b, invariant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_wait_for_each_other_once() {
        let (a, b) = race(
            Duration::from_secs(10),
            |meet| {
                meet.here();
                meet.here();
                1
            },
            |meet| {
                meet.here();
                2
            },
        );
        assert_eq!((a, b), (1, 2));
    }

    #[test]
    fn a_side_that_panics_ends_the_race_at_once_with_its_own_message() {
        // A bound of a minute: had the other side waited it out, it would
        // say so instead of what it says.
        let outcome = panic::catch_unwind(|| {
            race(
                Duration::from_secs(60),
                |_| -> u32 { panic!("no such account") },
                |meet| meet.here(),
            )
        });
        assert_eq!(
            message(&*outcome.unwrap_err()),
            "unit a panicked: no such account; unit b panicked: the other unit ended without \
             reaching the meeting point"
        );
    }

    #[test]
    fn a_side_that_never_comes_is_waited_for_only_as_long_as_the_bound() {
        let outcome = panic::catch_unwind(|| {
            race(
                Duration::from_millis(50),
                |meet| meet.here(),
                |_| thread::sleep(Duration::from_secs(2)),
            )
        });
        assert_eq!(
            message(&*outcome.unwrap_err()),
            "unit a panicked: the other unit did not reach the meeting point within 50ms"
        );
    }
}
