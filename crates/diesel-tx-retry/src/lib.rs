//! Retrying transactions for Diesel on CockroachDB and PostgreSQL: the
//! counterpart of cockroach-go's `crdb.ExecuteTx` and
//! sqlalchemy-cockroachdb's `run_transaction`.
//!
//! ```no_run
//! use diesel::prelude::*;
//! use diesel::r2d2::{ConnectionManager, Pool};
//! use diesel_tx_retry::Retrier;
//!
//! diesel::table! { accounts (id) { id -> Int8, balance -> Int8 } }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = Pool::new(ConnectionManager::<PgConnection>::new(std::env::var("DATABASE_URL")?))?;
//! let retrier = Retrier::default();
//! let moved = retrier.transaction(&pool, |conn| {
//!     diesel::update(accounts::table.find(1))
//!         .set(accounts::balance.eq(accounts::balance - 10))
//!         .execute(conn)?;
//!     diesel::update(accounts::table.find(2))
//!         .set(accounts::balance.eq(accounts::balance + 10))
//!         .execute(conn)
//! })?;
//! # Ok(())
//! # }
//! ```
//!
//! What it promises:
//! - a unit of work runs in a SERIALIZABLE transaction (or READ COMMITTED,
//!   [`Isolation`]), again after each serialization failure (40001) or
//!   deadlock (40P01), within a bound on attempts and on time, with capped,
//!   jittered backoff ([`Backoff`]), never sleeping inside a transaction;
//! - only the value of the attempt that committed is returned; every
//!   failure is one [`TxError`], and a unit that swallowed a database error
//!   (its transaction aborted) never has its value returned
//!   ([`TxError::SwallowedError`]);
//! - a commit whose outcome is unknown (the connection lost during COMMIT,
//!   or 40003) is reported as [`TxError::AmbiguousCommit`], never retried
//!   behind the caller's back, unless the unit is idempotent by a key the
//!   caller drew before the call ([`Retrier::idempotent_transaction`]): then
//!   it runs again, finds out by its key whether the earlier attempt
//!   committed, and says so ([`Applied`]);
//! - every statement of an attempt is bounded by the time left before the
//!   deadline (`SET LOCAL statement_timeout`, in the `BEGIN` message);
//! - on CockroachDB, its savepoint protocol (`SAVEPOINT cockroach_restart`),
//!   whose `RELEASE` is the commit; on PostgreSQL, and under READ COMMITTED
//!   everywhere, `BEGIN` ... `COMMIT`. The server is detected on first use
//!   (`SELECT version()`, once) unless told ([`Retrier::for_server`]).
//!
//! # Entry points
//!
//! | call | the unit | returns |
//! |---|---|---|
//! | [`Retrier::transaction`] | `\|conn\| -> Result<T, E>` | `T` |
//! | [`Retrier::idempotent_transaction`] | `\|conn, attempt\| -> Result<Applied<T>, E>`, with the key in `attempt` | `Applied<T>` |
//! | [`Retrier::build_transaction`] then [`run`](TransactionBuilder::run) or [`run_idempotent`](TransactionBuilder::run_idempotent) | the same, with per-call options (read-only, isolation) | [`Committed`]: the value, the attempts, how a doubt ended |
//!
//! With the feature `async`, each has an `_async` twin on diesel-async's
//! `AsyncPgConnection` and tokio (`Retrier::transaction_async`,
//! `Retrier::idempotent_transaction_async`, `TransactionBuilder::run_async`,
//! `TransactionBuilder::run_idempotent_async`): a unit is an async closure
//! (`async |conn| ...`), or a closure returning a boxed future through
//! `boxed` for what an async closure cannot express; its future must be
//! `Send`, so that the call can be spawned or serve as a handler. See
//! "Async" below.
//!
//! Each takes its connections from a [`Source`]: `&pool` (an r2d2 pool,
//! feature `r2d2`), `&held` (a [`Held`] connection a worker keeps between
//! calls), `&mut conn` (the caller's own, which a lost connection cannot
//! replace), or a pool of your own. A unit's error type may be any `E:
//! From<diesel::result::Error>` in which the helper can find the database
//! error again ([`UnitError`]): Diesel's own, a `thiserror` enum, `anyhow::Error`.
//!
//! # Coming from cockroach-go or sqlalchemy-cockroachdb
//!
//! | cockroach-go `crdb.ExecuteTx` | sqlalchemy-cockroachdb `run_transaction` | here |
//! |---|---|---|
//! | `crdb.ExecuteTx(ctx, db, nil, func(tx *sql.Tx) error {...})` | `run_transaction(sessionmaker, lambda s: ...)` | `retrier.transaction(&pool, \|conn\| {...})` |
//! | `*sql.TxOptions` | `sessionmaker` options | `retrier.build_transaction().read_only().isolation(..)` |
//! | `crdb.AmbiguousCommitError` | the driver's error | [`TxError::AmbiguousCommit`]; an idempotent unit resolves it ([`Retrier::idempotent_transaction`]) |
//! | `crdb.MaxRetriesExceededError` (50 by default) | `max_retries` (unbounded by default) | [`TxError::GaveUp`], after attempts *and* a deadline ([`Retrier::with_max_attempts`], [`Retrier::with_deadline`]) |
//! | no backoff | `max_backoff` | [`Backoff`] |
//! | the callback's error | the callback's exception | [`TxError::Failed`] |
//!
//! # The decision table
//!
//! When an attempt fails, one pure function picks the next step from where
//! the error came (begin, a statement, `RELEASE`, `COMMIT`), what it means
//! (from the error's kind, and for the SQLSTATEs Diesel has no kind for,
//! from the start of the server's message: a deadlock is a conflict, a
//! drain or restart a lost connection, 25P02 an aborted transaction), the
//! server, the protocol, the isolation level and whether the unit is
//! idempotent. This table is that function; its unit tests check it row by
//! row, and that the rows cover every case once. "Savepoint" in it means the
//! savepoint protocol frames the transaction, which it does only under
//! SERIALIZABLE; under READ COMMITTED read the rows for "otherwise":
//!
//! | stage      | class           | server, protocol          | next step |
//! |------------|-----------------|---------------------------|-----------|
//! | any (but a commit on CockroachDB, below) | definite, aborted, domain | any | fail (at the commit, aborted: [`TxError::SwallowedError`]) |
//! | begin      | conflict        | any                       | restart |
//! | begin, statement | lost      | any                       | reconnect; fail if the connection is the caller's |
//! | begin, statement | other     | any                       | fail |
//! | begin, statement | stale statement | any                 | restart, statements unnamed |
//! | statement  | conflict        | CockroachDB, savepoint    | rewind if the retry would not wait, else restart |
//! | statement  | conflict        | otherwise (READ COMMITTED included) | restart |
//! | release    | conflict        | CockroachDB               | rewind if the retry would not wait, else restart |
//! | release    | conflict        | PostgreSQL                | restart |
//! | release    | lost            | any                       | ambiguous; if idempotent: reconnect |
//! | release    | other           | PostgreSQL                | fail |
//! | release    | other           | CockroachDB               | ambiguous; if idempotent: restart |
//! | commit     | any             | CockroachDB, savepoint    | committed |
//! | commit     | conflict        | otherwise (READ COMMITTED included) | restart |
//! | commit     | lost, other     | otherwise (READ COMMITTED included) | ambiguous; if idempotent: reconnect (lost) or restart (other) |
//!
//! The steps: **rewind** is `ROLLBACK TO SAVEPOINT cockroach_restart` (with
//! the statement bound again) and an immediate retry inside the same
//! transaction, which keeps its place in line; **restart** rolls the whole
//! transaction back, waits the backoff, and begins again; **reconnect**
//! drops the connection (the server rolls back whatever it had open), waits,
//! and retries on a fresh one; **ambiguous** reports
//! [`TxError::AmbiguousCommit`]; **fail** rolls back and returns the error;
//! **committed** returns the value. Any retry first checks the budgets
//! (attempts, the deadline) and gives up with [`TxError::GaveUp`] when one
//! ran out.
//!
//! The rules behind the rows:
//! - The helper never sleeps inside a transaction: a transaction left open
//!   during the wait would keep blocking the very transactions it conflicted
//!   with. Only an immediate retry rewinds.
//! - On CockroachDB a successful `RELEASE SAVEPOINT cockroach_restart` *is*
//!   the commit; the `COMMIT` after it only readies the session, so its error
//!   changes nothing (cockroach-go ignores it too). An error *at* that
//!   RELEASE, other than a conflict or a refusal, leaves the outcome unknown.
//!   <https://www.cockroachlabs.com/docs/stable/advanced-client-side-transaction-retries>
//! - On PostgreSQL a RELEASE commits nothing, and rolling back to a savepoint
//!   keeps the transaction's snapshot, which cannot clear a real
//!   serialization failure: there every conflict restarts. These rules follow
//!   the server, not the protocol.
//! - A lost connection before the commit was sent is safe to retry: the
//!   server rolls back a transaction whose connection died. The savepoint
//!   protocol sends `RELEASE SAVEPOINT cockroach_restart; COMMIT` as one
//!   message (one round trip), so a connection lost there may have taken the
//!   COMMIT with it: ambiguous on either server. Any other error of that
//!   message is the RELEASE's on CockroachDB, whose docs do not say what a
//!   failed RELEASE leaves the session in (read so, a failing COMMIT after a
//!   successful RELEASE is reported ambiguous, never wrong); on PostgreSQL,
//!   the one libpq's transaction status names.
//! - A unit that catches a database error and returns `Ok` leaves its
//!   transaction aborted, and PostgreSQL answers the `COMMIT` of an aborted
//!   transaction with the tag `ROLLBACK` and no error. So the restart
//!   protocol commits with `SET LOCAL statement_timeout = <time left>;
//!   COMMIT` (one message; `SELECT 1; COMMIT` when nothing bounds the
//!   statements): in an aborted
//!   transaction the `SELECT` fails with 25P02 and the `COMMIT` never runs;
//!   the savepoint protocol's `RELEASE` fails the same way.
//! - A panic in the unit rolls back, returns the connection idle, and goes on.
//!
//! After a commit in doubt, until the unit resolves it (below), two rows
//! change and the rest hold: a database error before the commit is retried
//! within the budgets (the retry may have waited on the earlier attempt's
//! locks until its statement bound), and every other failure, a spent budget
//! included, is **ambiguous**, never "failed" or "gave up": the earlier
//! attempt may have committed.
//!
//! # Commits in doubt
//!
//! CockroachDB's docs allow retrying a transaction whose commit is in doubt
//! (a lost connection, 40003) only if it is idempotent
//! (<https://www.cockroachlabs.com/docs/stable/transaction-retry-error-reference#result_is_ambiguous>).
//! A unit makes itself so with a key the caller draws *before* the call (an
//! id, an idempotency key) and that the unit writes in its transaction under
//! a unique constraint: [`Retrier::idempotent_transaction`]. After a commit
//! in doubt the helper retries it on a fresh connection, and the retry,
//! told by [`Keyed::in_doubt`], looks for its key and returns what it found
//! ([`Applied::Earlier`], or [`Applied::Now`] when it applied the change).
//! There is no flag to forget and no setter to skip: a plain unit
//! ([`Retrier::transaction`]) is never retried after a doubt. Only a
//! connection can settle a doubt, so while one is pending a failed checkout
//! (the outage that cut the COMMIT is not over) is retried after the
//! backoff like a lost connection, within the attempts and the deadline;
//! without a doubt, it ends the call with [`TxError::NoConnection`].
//!
//! The rule that makes this safe is the key's uniqueness, not a read after
//! the fact. The first attempt's transaction may still be open on the server
//! when the retry runs (after a partition the old session holds its locks
//! until the server ends it): on PostgreSQL the retry's insert of the same
//! key waits for it, then either proceeds (it did not commit) or meets the
//! key (it did; under SERIALIZABLE, a serialization failure, retried, after
//! which the key is seen). On CockroachDB the retry's write meets the first
//! attempt's write intent and waits for that transaction or pushes it
//! (aborting it if its coordinator is gone), to the same effect
//! (<https://www.cockroachlabs.com/docs/stable/architecture/transaction-layer#write-intents>).
//! On PostgreSQL a plain read cannot decide it: it does not wait for an
//! open transaction, and sees the key absent while the first attempt may
//! still commit. (On CockroachDB "non-locking reads wait for conflicting
//! locks to be released", unlike on PostgreSQL, says its `lock_timeout`
//! docs (<https://www.cockroachlabs.com/docs/stable/session-vars#lock-timeout>),
//! but the rule holds on both servers only through the write.)
//!
//! # READ COMMITTED
//!
//! [`Retrier::with_isolation`] or [`TransactionBuilder::isolation`] asks
//! for it; SERIALIZABLE stays the default, as CockroachDB advises for a
//! workload that runs well under it
//! (<https://www.cockroachlabs.com/docs/stable/read-committed>). The rules the
//! helper follows there, and where they come from:
//! - CockroachDB retries each statement of a READ COMMITTED transaction by
//!   itself (up to the session's `max_retries_for_read_committed`), yet a
//!   40001 still reaches the client: a deadlock broken by aborting one
//!   transaction, those statement retries exhausted ("read committed retry
//!   limit exceeded"), a statement whose results had already streamed
//!   (<https://www.cockroachlabs.com/docs/stable/transaction-retry-error-reference>).
//!   The helper restarts the transaction after the backoff, as under
//!   SERIALIZABLE.
//! - The transaction is framed with `BEGIN ISOLATION LEVEL READ COMMITTED`
//!   ... `COMMIT`, never the savepoint protocol: under READ COMMITTED a
//!   rollback to a savepoint cannot recover from a retry error yet; that
//!   is cockroachdb/cockroach#104233, open ("support savepoint rollback
//!   recovery from retry error under RC"). So the `COMMIT` is the commit on
//!   CockroachDB too.
//! - A read that a later write depends on must lock what it reads
//!   (`SELECT ... FOR UPDATE`, rows in key order so that two transactions
//!   queue instead of deadlocking), as CockroachDB's READ COMMITTED page
//!   advises; otherwise two transfers that read the same balance both write
//!   their own result and one update is lost. The unit must do this; the
//!   helper cannot.
//! - CockroachDB runs READ COMMITTED as SERIALIZABLE without a word when
//!   `sql.txn.read_committed_isolation.enabled` is off (and, in v24.1 and
//!   v24.2, without an enterprise licence). The first READ COMMITTED
//!   transaction of a helper asks `SHOW transaction_isolation` (one round
//!   trip, once) and, if the answer is stronger, logs one warning saying how
//!   to enable it; the run goes on at SERIALIZABLE.
//!
//! # Watching it
//!
//! An [`Observer`] given to [`Retrier::with_observer`] is told of every
//! attempt ([`Attempt`]): how it ended ([`Outcome`]), why ([`Cause`], which
//! tells the unit's own errors from the database's), the backoff that
//! follows, and how a commit in doubt was resolved ([`Resolution`]); all of
//! them are `Display + Hash`, ready to be metric labels. Each call is a
//! `tracing` span (`tx`) with a child span per attempt (`tx_attempt`) and
//! debug events.
//!
//! # Async
//!
//! The async front end drives the same core as the blocking one, so the
//! decision table, the budgets, the doubt and the observer are the same;
//! the backoff sleeps on tokio's timer, outside any transaction. Its
//! connections come from an `AsyncSource` (a bb8 pool of diesel-async
//! connections, or one of your own), owned, so that a task can outlive the
//! caller. Cancel safety, since a caller may drop the call's future at any
//! await (a request deadline, a `select!`):
//! - a connection dropped while a transaction may be open on it (from the
//!   `BEGIN` sent until a `COMMIT` or `ROLLBACK` answered) is marked
//!   broken, and the pool closes it: the server rolls back. Never a
//!   connection pooled inside a transaction;
//! - the commit runs in a task that owns the connection: a call dropped
//!   while its `COMMIT` is in flight still has the commit's real outcome
//!   told to the observer (`Committed`, or `Ambiguous`), and the connection
//!   goes back clean when it committed;
//! - a call dropped anywhere else is told as `Outcome::Cancelled`;
//! - a panic in the unit rolls back, then goes on.
//!
//! The `BEGIN` is not waited for: the unit's first statement goes out in
//! its flight, one round trip less per transaction than the blocking
//! front end. The message opens the block with a bare `BEGIN` and sets the
//! options with `SET TRANSACTION` (`BEGIN; SET TRANSACTION ISOLATION LEVEL
//! SERIALIZABLE; ...`): should the server refuse an option, the block is
//! aborted and the unit's statements fail with 25P02, where a refused
//! `BEGIN ISOLATION LEVEL ...` would have left PostgreSQL's session idle
//! and let them run on their own.
//!
//! The helper frames async transactions with its own statements and keeps
//! diesel-async's count of open transactions in step itself: diesel-async
//! marks a connection whose own transaction statement was dropped half-way
//! as one it then refuses to use, and does not read the server's
//! transaction status, so its bookkeeping could not be trusted after a
//! drop.
//!
//! # Features
//! - `r2d2` (default): r2d2 pools and [`Held`] connections as a [`Source`].
//! - `anyhow` (default): `anyhow::Error` as a unit's error.
//! - `testing`: the module `testing` (`race`, `check`, and with `async`
//!   `race_async`, `check_async`), which forces a genuine conflict between
//!   two units of yours.
//! - `async`: the async front end, on diesel-async 0.9, tokio and bb8.
//! - `metrics`: metrics through the `metrics` facade, under the Prometheus
//!   form of OpenTelemetry's names (`db_client_operation_duration_seconds`
//!   by `db_system_name` and `outcome`, `db_client_transaction_attempts`,
//!   `db_client_transaction_retries_total` by `cause`,
//!   `db_client_transaction_gave_up_total` by `budget`,
//!   `db_client_commits_in_doubt_total` by `resolution`). The application
//!   installs the recorder.
//!
//! # Operating it
//!
//! A [`RetryBudget`] shared by every helper of a process bounds the load
//! retries add ([`Retrier::with_retry_budget`]); a [`Lifespan`] on pooled
//! connections recycles them between calls, [`Held`] ones included.
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]
#![warn(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod blocking;
mod budget;
#[cfg(feature = "async")]
mod nonblocking;
// Public for `internal` (the crate's tests); the helper uses it either way.
#[cfg_attr(not(any(test, feature = "testing")), allow(unreachable_pub))]
mod clock;
mod core;
mod decide;
mod error;
mod idempotent;
mod metrics;
mod observe;
mod policy;
mod retrier;
mod server;
mod source;
#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;

#[cfg(any(test, feature = "testing"))]
#[doc(hidden)]
pub mod internal;

pub use budget::RetryBudget;
pub use error::{via, Budget, Committed, TxError, UnitError};
pub use idempotent::{Applied, Keyed};
#[cfg(feature = "async")]
#[cfg_attr(docsrs, doc(cfg(feature = "async")))]
pub use nonblocking::{boxed, AsyncKeyedUnit, AsyncSource, AsyncUnit, UnitFuture};
pub use observe::{Attempt, Cause, Observer, Outcome, Resolution};
pub use policy::{Backoff, Isolation};
pub use retrier::{Retrier, TransactionBuilder};
pub use server::{Protocol, Server};
#[cfg(feature = "r2d2")]
pub use source::{Held, Lent, Pooled};
pub use source::{Lifespan, Source};
