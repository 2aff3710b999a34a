//! The async front end (feature `async`): the same core, driven over
//! diesel-async's `AsyncPgConnection` on tokio, cancel-safe at every await.
//!
//! Cancel safety, as this module keeps it:
//! - the connection of a turn is held by an [`AsyncLease`], which knows
//!   whether a transaction may be open on it (from the moment `BEGIN` is
//!   sent until a `COMMIT` or `ROLLBACK` is answered). Dropped while one
//!   may be (the caller dropped the call's future), it marks the
//!   connection broken, so that the pool closes it and the server rolls
//!   back: never a connection pooled inside a transaction. (Rolling back
//!   from a task instead would race diesel-async's own bookkeeping, which
//!   a future dropped inside it leaves in a state it then refuses.)
//! - the commit runs in a task that owns the connection and outlives the
//!   caller: a call dropped while its `COMMIT` is in flight still has the
//!   commit's real outcome told to the observer, and the connection goes
//!   back clean;
//! - a call dropped anywhere else is told to the observer as
//!   [`Outcome::Cancelled`](crate::Outcome::Cancelled) (the core's `Drop`).
//!
//! The helper frames its transactions with its own statements, and keeps
//! diesel-async's count of open transactions (which a unit's nested
//! `conn.transaction(..)` reads) in step itself.

use std::error::Error as StdError;
use std::future::Future;
use std::ops::DerefMut;
use std::panic::{self, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use diesel::connection::{TransactionDepthChange, TransactionManagerStatus};
use diesel::result::Error as DieselError;
use diesel_async::pooled_connection::AsyncDieselConnectionManager;
use diesel_async::{
    AnsiTransactionManager, AsyncConnection, AsyncPgConnection, SimpleAsyncConnection,
};
use diesel_async::{RunQueryDsl, TransactionManager};
use tracing::Instrument;

use crate::core::{classify, Core, Do, Plan, Verdict};
use crate::decide::{self, failed_at_savepoint_commit, Stage};
use crate::retrier::pipelinable_begin;
use crate::{Applied, Committed, Keyed, Protocol, Retrier, Server, TxError, UnitError};

/// A boxed unit's future: what a unit that an async closure cannot express
/// returns (see [`boxed`]).
pub type UnitFuture<'r, T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send + 'r>>;

/// A plain async unit: an async closure `async |conn| ...`, or a closure that
/// returns a future. Implemented for every such closure; the associated
/// type names its future, so that a bound can ask it to be `Send` for every
/// borrow of the connection (which a plain `AsyncFnMut` bound cannot).
pub trait AsyncUnit<C, R>: FnMut(C) -> <Self as AsyncUnit<C, R>>::Fut {
    /// The future an attempt runs.
    type Fut: Future<Output = R>;
}

impl<F, C, Fut, R> AsyncUnit<C, R> for F
where
    F: FnMut(C) -> Fut,
    Fut: Future<Output = R>,
{
    type Fut = Fut;
}

/// An idempotent async unit: `async |conn, attempt| ...`, or a closure that
/// returns a future (see [`AsyncUnit`]).
pub trait AsyncKeyedUnit<C, A, R>: FnMut(C, A) -> <Self as AsyncKeyedUnit<C, A, R>>::Fut {
    /// The future an attempt runs.
    type Fut: Future<Output = R>;
}

impl<F, C, A, Fut, R> AsyncKeyedUnit<C, A, R> for F
where
    F: FnMut(C, A) -> Fut,
    Fut: Future<Output = R>,
{
    type Fut = Fut;
}

/// Gives a closure that returns a boxed future ([`UnitFuture`]) the
/// signature a plain unit needs, for what an async closure cannot express:
///
/// ```no_run
/// # use diesel_async::{AsyncPgConnection, RunQueryDsl};
/// # use diesel_tx_retry::{boxed, Retrier};
/// # async fn demo(pool: &diesel_async::pooled_connection::bb8::Pool<AsyncPgConnection>) -> Result<(), Box<dyn std::error::Error>> {
/// let n = Retrier::default()
///     .transaction_async(pool, boxed(|conn| {
///         Box::pin(async move { diesel::sql_query("UPDATE counters SET n = n + 1").execute(conn).await })
///     }))
///     .await?;
/// # Ok(())
/// # }
/// ```
pub fn boxed<F, T, E>(unit: F) -> F
where
    F: for<'r> FnMut(&'r mut AsyncPgConnection) -> UnitFuture<'r, T, E>,
{
    unit
}

/// Where an async call gets its connection: a bb8 pool of diesel-async
/// connections, or a pool of your own. The connections are owned (`'static`),
/// so that a task can finish a transaction that a dropped call left open.
pub trait AsyncSource: Send {
    /// A connection lent by the source; dropping it gives it back.
    type Conn: DerefMut<Target = AsyncPgConnection> + Send + 'static;

    /// A connection to run attempts on.
    ///
    /// # Errors
    /// Why none could be had; the call ends with
    /// [`TxError::NoConnection`], unless a commit is in doubt: then the
    /// helper asks again, after its backoff, within the attempts and the
    /// deadline.
    fn checkout(
        &mut self,
    ) -> impl Future<Output = Result<Self::Conn, Box<dyn StdError + Send + Sync>>> + Send;

    /// Lets go of a connection the helper gave up on, which must never be
    /// lent again. By default it is marked broken in diesel-async's eyes
    /// and dropped: a pool that asks (bb8 through diesel-async's manager
    /// does) closes it instead of pooling it.
    fn discard(mut conn: Self::Conn) {
        mark_broken(&mut conn);
        drop(conn);
    }
}

/// A bb8 pool of diesel-async connections: a connection for each call.
impl AsyncSource for &bb8::Pool<AsyncDieselConnectionManager<AsyncPgConnection>> {
    type Conn = bb8::PooledConnection<'static, AsyncDieselConnectionManager<AsyncPgConnection>>;

    async fn checkout(&mut self) -> Result<Self::Conn, Box<dyn StdError + Send + Sync>> {
        Ok(self.get_owned().await?)
    }
}

fn mark_broken(conn: &mut AsyncPgConnection) {
    AnsiTransactionManager::transaction_manager_status_mut(conn).set_in_error();
}

/// What diesel-async knows of the connection's transaction: `Some(true)`
/// when one is open, `None` when it gave up on the connection's state.
fn open_transaction(conn: &mut AsyncPgConnection) -> Option<bool> {
    AnsiTransactionManager::transaction_manager_status_mut(conn)
        .transaction_depth()
        .ok()
        .map(|depth| depth.is_some())
}

/// An attempt's run of the unit: its value and what it said of its change,
/// or its error and whether it had settled a doubt first.
pub(crate) type Ran<'r, V, E> =
    Pin<Box<dyn Future<Output = Result<(V, Verdict), (E, bool)>> + Send + 'r>>;

/// One attempt's run of the unit, boxed: the front end's view of a plain
/// or an idempotent unit.
pub(crate) trait RunUnit<V, E>: Send {
    fn call<'r>(
        &'r mut self,
        conn: &'r mut AsyncPgConnection,
        attempt: u32,
        in_doubt: bool,
    ) -> Ran<'r, V, E>
    where
        V: 'r,
        E: 'r;
}

/// A plain unit.
pub(crate) struct Plain<F>(pub(crate) F);

impl<F, T, E> RunUnit<T, E> for Plain<F>
where
    for<'r> F: AsyncUnit<&'r mut AsyncPgConnection, Result<T, E>, Fut: Send> + Send,
    T: Send,
    E: Send,
{
    fn call<'r>(
        &'r mut self,
        conn: &'r mut AsyncPgConnection,
        _attempt: u32,
        _in_doubt: bool,
    ) -> Ran<'r, T, E>
    where
        T: 'r,
        E: 'r,
    {
        let ran = (self.0)(conn);
        Box::pin(async move {
            ran.await
                .map(|value| (value, Verdict::Plain))
                .map_err(|err| (err, false))
        })
    }
}

/// An idempotent unit and its key.
pub(crate) struct KeyedRun<F, K> {
    pub(crate) unit: F,
    pub(crate) key: K,
}

impl<F, K, T, E> RunUnit<Applied<T>, E> for KeyedRun<F, K>
where
    for<'r, 'k, 'q> F: AsyncKeyedUnit<
            &'r mut AsyncPgConnection,
            &'k Keyed<'q, K>,
            Result<Applied<T>, E>,
            Fut: Send,
        > + Send,
    K: Send + Sync,
    T: Send,
    E: Send,
{
    fn call<'r>(
        &'r mut self,
        conn: &'r mut AsyncPgConnection,
        attempt: u32,
        in_doubt: bool,
    ) -> Ran<'r, Applied<T>, E>
    where
        Applied<T>: 'r,
        E: 'r,
    {
        Box::pin(async move {
            let keyed = Keyed {
                key: &self.key,
                attempt,
                in_doubt,
                settled: AtomicBool::new(false),
            };
            match (self.unit)(conn, &keyed).await {
                Ok(applied) => {
                    let verdict = if applied.was_earlier() {
                        Verdict::AppliedEarlier
                    } else {
                        Verdict::AppliedNow
                    };
                    Ok((applied, verdict))
                }
                Err(err) => Err((err, AtomicBool::load(&keyed.settled, Ordering::Relaxed))),
            }
        })
    }
}

/// Runs `unit` in transactions on connections from `source` until one
/// commits or the core says stop: [`crate::blocking::run`]'s loop, with
/// awaits, a commit handed to a task, and a lease that cleans up after a
/// dropped call.
pub(crate) async fn run<S, V, E, M>(
    retrier: &Retrier,
    plan: impl FnOnce(Server, bool) -> Plan + Send,
    mut source: S,
    mut unit: impl RunUnit<V, E>,
) -> Result<Committed<V>, TxError<E>>
where
    S: AsyncSource,
    V: Send,
    E: UnitError<M>,
{
    let mut plan = Some(plan);
    let mut core: Option<Core<'_, V, E>> = None;
    let mut next = None;
    loop {
        if let Some(core) = &mut core {
            let mut step = next.take().unwrap_or_else(|| core.next());
            // Wait before checking a new connection out, not after.
            if let Do::Wait(delay) = step {
                retrier.clock().sleep_async(delay).await;
                step = core.next();
            }
            if let Do::Return(result) = step {
                return result;
            }
            next = Some(step);
        }
        let mut lease = match source.checkout().await {
            Ok(conn) => AsyncLease::<S>::new(conn, retrier),
            Err(err) => match &mut core {
                Some(core) => {
                    core.no_connection(err);
                    next = None;
                    continue;
                }
                None => return Err(TxError::NoConnection(err)),
            },
        };
        let core = match &mut core {
            Some(core) => core,
            None => {
                let server = start(retrier, &mut lease).await?;
                let plan = plan.take().unwrap_or_else(|| unreachable!());
                core.insert(Core::new(retrier, plan(server, true)))
            }
        };
        while let Some(conn) = lease.conn.as_deref_mut() {
            let step = next.take().unwrap_or_else(|| core.next());
            let span = core.attempt_span().clone();
            match step {
                Do::Begin(sql) => {
                    // From here until a COMMIT or ROLLBACK answers.
                    lease.maybe_open = true;
                    let conn = lease.conn.as_deref_mut().unwrap_or_else(|| unreachable!());
                    let began = begin(retrier, conn, &sql, core.plan())
                        .instrument(span)
                        .await;
                    match began {
                        Ok(()) => core.began(),
                        Err(err) => failed(retrier, core, Stage::Begin, err),
                    }
                }
                Do::Run { attempt, in_doubt } => {
                    let ran = CatchUnwind(unit.call(conn, attempt, in_doubt))
                        .instrument(span)
                        .await;
                    match ran {
                        Ok(Ok((value, verdict))) => core.ran(value, verdict),
                        Ok(Err((err, settled))) => unit_failed(retrier, core, err, settled),
                        Err(payload) => {
                            core.panicked();
                            // Rolled back, and handed back idle, first.
                            lease.rollback().await;
                            drop(lease);
                            panic::resume_unwind(payload);
                        }
                    }
                }
                Do::Commit(sql) => {
                    let plan = *core.plan();
                    match lease.commit(sql.into_owned(), core).instrument(span).await {
                        Ok(()) => core.committed(),
                        Err(err) => {
                            let stage = match plan.framing() {
                                // tokio-postgres does not say whether the
                                // transaction is still open.
                                Protocol::Savepoint => {
                                    failed_at_savepoint_commit(plan.server, None)
                                }
                                _ => Stage::Commit,
                            };
                            failed(retrier, core, stage, err);
                        }
                    }
                }
                Do::Rewind(sql) => {
                    if conn.batch_execute(&sql).await.is_err() {
                        lease.rollback().await;
                    }
                }
                Do::Rollback => lease.rollback().await,
                Do::Discard => lease.discard(),
                Do::Wait(delay) => retrier.clock().sleep_async(delay).await,
                Do::Return(result) => return result,
            }
        }
    }
}

/// The server, on the call's first connection; the call is refused if that
/// connection is inside a transaction already.
async fn start<S: AsyncSource, E>(
    retrier: &Retrier,
    lease: &mut AsyncLease<S>,
) -> Result<Server, TxError<E>> {
    let conn = lease.conn.as_deref_mut().unwrap_or_else(|| unreachable!());
    if open_transaction(conn) == Some(true) {
        // Handed back untouched: not rolled back.
        lease.release();
        return Err(TxError::AlreadyInTransaction);
    }
    if let Some(server) = retrier.server() {
        return Ok(server);
    }
    let asked = diesel::select(diesel::dsl::sql::<diesel::sql_types::Text>("version()"))
        .get_result::<String>(conn)
        .await;
    match asked {
        Ok(version) => Ok(retrier.remember_server(&version)),
        Err(err) => {
            lease.discard();
            Err(TxError::NoConnection(Box::new(err)))
        }
    }
}

/// Opens the transaction (diesel-async counts it), with the statements
/// unnamed once a pooler was met, and asks the isolation level once.
///
/// The `BEGIN` is sent, not waited for: the unit's first statement goes
/// out behind it, in the same flight, and the transaction costs one round
/// trip less (the issue's "BEGIN pipelined with the first statement"). Its
/// answer is read and dropped by tokio-postgres's connection task. Nothing
/// is lost by not waiting: the message opens the block with a bare `BEGIN`
/// ([`pipelinable_begin`] says why), so a connection that fails fails the
/// unit's first statement as well, and any other failure in the message
/// leaves the block aborted, where the unit's statements fail with 25P02:
/// none runs outside the transaction. The unit's statements follow the
/// `BEGIN` on the one connection, in order. `tests/retries/pipelining.rs`
/// checks the flights, that the unit runs inside with the options set, and
/// a message the server refuses.
async fn begin(
    retrier: &Retrier,
    conn: &mut AsyncPgConnection,
    sql: &str,
    plan: &Plan,
) -> Result<(), DieselError> {
    if open_transaction(conn) != Some(true) {
        send_only(conn, &pipelinable_begin(sql))?;
        let status = AnsiTransactionManager::transaction_manager_status_mut(conn);
        match status {
            TransactionManagerStatus::Valid(valid) => {
                valid.change_transaction_depth(TransactionDepthChange::IncreaseDepth)?;
            }
            TransactionManagerStatus::InError => return Err(DieselError::BrokenTransactionManager),
        }
    }
    if retrier.pooler_seen() {
        conn.set_prepared_statement_cache_size(diesel::connection::CacheSize::Disabled);
    }
    if retrier.isolation_check_due(plan.isolation) {
        let reported = diesel::sql_query("SHOW transaction_isolation")
            .get_result::<crate::retrier::ReportedIsolation>(conn)
            .await?
            .transaction_isolation;
        retrier.isolation_reported(plan.isolation, &reported);
    }
    Ok(())
}

/// Sends `sql` on `conn` without waiting for its answer: the first poll of
/// tokio-postgres's `batch_execute` queues the message for the connection
/// task (in order with whatever is sent after it), and the rest of the
/// future only reads the answer. A connection already closed says so at
/// once.
fn send_only(conn: &mut AsyncPgConnection, sql: &str) -> Result<(), DieselError> {
    let sending = std::pin::pin!(conn.batch_execute(sql));
    match sending.poll(&mut Context::from_waker(std::task::Waker::noop())) {
        Poll::Ready(result) => result,
        Poll::Pending => Ok(()),
    }
}

/// One of the helper's own statements failed at `stage`.
fn failed<V, E: UnitError<M>, M>(
    retrier: &Retrier,
    core: &mut Core<'_, V, E>,
    stage: Stage,
    err: DieselError,
) {
    let class = decide::classify(&err);
    crate::blocking::note_pooler(retrier, class, Some(&err));
    let said = err.to_string();
    core.failed(stage, class, E::from(err), Some(said));
}

/// The unit returned `err`, having settled a doubt first or not.
fn unit_failed<V, E: UnitError<M>, M>(
    retrier: &Retrier,
    core: &mut Core<'_, V, E>,
    err: E,
    settled: bool,
) {
    let Some(class) = classify(&err) else {
        return core.hidden(err);
    };
    crate::blocking::note_pooler(retrier, class, err.diesel_error());
    let said = err.diesel_error().map(ToString::to_string);
    if settled {
        core.settled();
    }
    core.failed(Stage::Statement, class, err, said);
}

/// The connection of one turn. No connection leaves the helper inside a
/// transaction: dropped while one may be open (the call's future was
/// dropped), it is marked broken, and the pool closes it.
struct AsyncLease<S: AsyncSource> {
    conn: Option<S::Conn>,
    /// Whether a transaction may be open on it: from the `BEGIN` sent until
    /// a `COMMIT` or `ROLLBACK` answered.
    maybe_open: bool,
    /// The bound on a rollback.
    bound: Duration,
}

impl<S: AsyncSource> AsyncLease<S> {
    fn new(conn: S::Conn, retrier: &Retrier) -> Self {
        let bound = retrier
            .statement_timeout()
            .unwrap_or(CLEANUP_BOUND)
            .min(CLEANUP_BOUND);
        Self {
            conn: Some(conn),
            maybe_open: false,
            bound,
        }
    }

    /// Rolls back whatever may be open. A connection that cannot roll back
    /// in time is given up on.
    async fn rollback(&mut self) {
        let Some(conn) = self.conn.as_deref_mut() else {
            return;
        };
        if !self.maybe_open && open_transaction(conn) == Some(false) {
            return;
        }
        if rolled_back(conn, self.bound).await {
            self.maybe_open = false;
        } else {
            self.discard();
        }
    }

    /// Gives the connection up: its source never lends it again.
    fn discard(&mut self) {
        self.maybe_open = false;
        if let Some(conn) = self.conn.take() {
            S::discard(conn);
        }
    }

    /// Hands the connection back untouched.
    fn release(&mut self) {
        drop(self.conn.take());
    }

    /// Sends the commit message in a task that owns the connection and
    /// outlives the caller. The answer carries what the observer must be
    /// told: if the caller is gone before it reads it (dropped while the
    /// task ran, or after), the answer tells the observer how the commit
    /// ended as it is dropped, and the connection goes back to the pool,
    /// which closes it unless the commit succeeded.
    async fn commit<V, E>(
        &mut self,
        sql: String,
        core: &mut Core<'_, V, E>,
    ) -> Result<(), DieselError> {
        let mut conn = self.conn.take().unwrap_or_else(|| unreachable!());
        let handoff = core.hand_off_commit();
        let (answer, answered) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let result = commit(&mut conn, &sql).await;
            // Fails only when the caller is gone: the answer is dropped
            // here, and tells.
            let _ = answer.send(Answer {
                conn: Some(conn),
                result: Some(result),
                handoff: Some(handoff),
            });
        });
        let answer = answered.await;
        core.took_back();
        match answer {
            Ok(mut answer) => {
                // The caller reports from here on.
                answer.handoff = None;
                self.conn = answer.conn.take();
                let result = answer.result.take().unwrap_or_else(|| unreachable!());
                if result.is_ok() {
                    self.maybe_open = false;
                }
                result
            }
            // The task panicked (or its runtime shut down) with the
            // connection: as if it were lost during the commit.
            Err(_) => {
                self.maybe_open = false;
                Err(DieselError::DatabaseError(
                    diesel::result::DatabaseErrorKind::ClosedConnection,
                    Box::new("the commit's task ended without an answer".to_owned()),
                ))
            }
        }
    }
}

/// A commit's answer, from its task to the caller; dropped unread (the
/// caller is gone), it tells the observer how the commit ended.
struct Answer<C> {
    conn: Option<C>,
    result: Option<Result<(), DieselError>>,
    handoff: Option<crate::core::Handoff>,
}

impl<C> Drop for Answer<C> {
    fn drop(&mut self) {
        if let (Some(handoff), Some(result)) = (&self.handoff, &self.result) {
            handoff.tell(result);
        }
    }
}

/// The longest a rollback may take before the connection is closed instead.
const CLEANUP_BOUND: Duration = Duration::from_secs(5);

impl<S: AsyncSource> Drop for AsyncLease<S> {
    fn drop(&mut self) {
        if self.maybe_open {
            // The call was dropped inside a transaction.
            self.discard();
        }
    }
}

/// Rolls back whatever is open, within `bound` (`ROLLBACK` with none open
/// only draws a warning): whether the connection is clean afterwards.
async fn rolled_back(conn: &mut AsyncPgConnection, bound: Duration) -> bool {
    let done = matches!(
        tokio::time::timeout(bound, conn.batch_execute("ROLLBACK")).await,
        Ok(Ok(()))
    );
    if done {
        *AnsiTransactionManager::transaction_manager_status_mut(conn) =
            TransactionManagerStatus::default();
    }
    done
}

/// The commit message; on success the transaction is over, which
/// diesel-async (it does not read the server's transaction status) is told.
async fn commit(conn: &mut AsyncPgConnection, sql: &str) -> Result<(), DieselError> {
    conn.batch_execute(sql).await?;
    *AnsiTransactionManager::transaction_manager_status_mut(conn) =
        TransactionManagerStatus::default();
    Ok(())
}

/// A future whose panic is caught, as `catch_unwind` does for a closure.
struct CatchUnwind<F>(F);

impl<F: Future + Unpin> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn std::any::Any + Send>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = &mut self.0;
        match panic::catch_unwind(AssertUnwindSafe(|| Pin::new(inner).poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(value)) => Poll::Ready(Ok(value)),
            Err(payload) => Poll::Ready(Err(payload)),
        }
    }
}
