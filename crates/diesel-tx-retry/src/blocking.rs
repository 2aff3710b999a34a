//! The blocking front end: does what the core ([`crate::core`]) asks on a
//! Diesel `PgConnection` from a [`Source`], and tells it what happened.

use std::panic::{self, AssertUnwindSafe};

use diesel::connection::{AnsiTransactionManager, SimpleConnection, TransactionManager};
use diesel::result::Error as DieselError;
use diesel::{Connection, PgConnection};

use crate::core::{classify, Core, Do, Plan, Verdict};
use crate::decide::{self, failed_at_savepoint_commit, Stage};
use crate::{Committed, Protocol, Retrier, Source, TxError, UnitError};

/// What Diesel knows of the connection's transaction: `Some(true)` when one
/// is open, `None` when Diesel gave up on the connection's state.
pub(crate) fn open_transaction(conn: &mut PgConnection) -> Option<bool> {
    AnsiTransactionManager::transaction_manager_status_mut(conn)
        .transaction_depth()
        .ok()
        .map(|depth| depth.is_some())
}

/// Runs `unit` in transactions on connections from `source` until one
/// commits or the core says stop. `unit` gets the attempt's number and
/// whether a commit is in doubt, and says what it applied; when it fails,
/// whether it had settled the doubt first ([`Keyed::not_applied_earlier`](crate::Keyed::not_applied_earlier)).
pub(crate) fn run<S, V, E, M>(
    retrier: &Retrier,
    plan: impl FnOnce(crate::Server, bool) -> Plan,
    mut source: S,
    mut unit: impl FnMut(&mut PgConnection, u32, bool) -> Result<(V, Verdict), (E, bool)>,
) -> Result<Committed<V>, TxError<E>>
where
    S: Source,
    E: UnitError<M>,
{
    let replaceable = source.is_replaceable();
    let mut plan = Some(plan);
    let mut core: Option<Core<'_, V, E>> = None;
    let mut call = None;
    let mut next = None;
    // One connection a turn: a new one only after the last one was given
    // up on (the source lends it for as long as the turn lasts).
    loop {
        if let Some(core) = &mut core {
            let mut step = next.take().unwrap_or_else(|| core.next());
            // Wait before checking a new connection out, not after.
            if let Do::Wait(delay) = step {
                retrier.clock().sleep(delay);
                step = core.next();
            }
            if let Do::Return(result) = step {
                return result;
            }
            next = Some(step);
        }
        let mut lease = match source.checkout() {
            Ok(conn) => Lease::<S>(Some(conn)),
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
                let server = start(retrier, &mut lease)?;
                let plan = plan.take().unwrap_or_else(|| unreachable!());
                let core = core.insert(Core::new(retrier, plan(server, replaceable)));
                call = Some(core.span().clone().entered());
                core
            }
        };
        while let Some(conn) = lease.0.as_deref_mut() {
            let step = next.take().unwrap_or_else(|| core.next());
            let _attempt = core.attempt_span().clone().entered();
            match step {
                Do::Begin(sql) => match begin(retrier, conn, &sql, core.plan()) {
                    Ok(()) => core.began(),
                    Err(err) => failed(retrier, core, Stage::Begin, err),
                },
                Do::Run { attempt, in_doubt } => {
                    let ran =
                        panic::catch_unwind(AssertUnwindSafe(|| unit(conn, attempt, in_doubt)));
                    match ran {
                        Ok(Ok((value, verdict))) => core.ran(value, verdict),
                        Ok(Err((err, settled))) => unit_failed(retrier, core, err, settled),
                        Err(payload) => {
                            core.panicked();
                            // Rolled back, and handed back idle, first.
                            drop(lease);
                            panic::resume_unwind(payload);
                        }
                    }
                }
                Do::Commit(sql) => {
                    if let Err(err) = conn.batch_execute(&sql) {
                        let stage = commit_stage(core.plan(), conn);
                        failed(retrier, core, stage, err);
                    } else {
                        core.committed();
                    }
                }
                Do::Rewind(sql) => {
                    if conn.batch_execute(&sql).is_err() {
                        lease.rollback();
                    }
                }
                Do::Rollback => lease.rollback(),
                Do::Discard => lease.discard(),
                Do::Wait(delay) => retrier.clock().sleep(delay),
                Do::Return(result) => {
                    drop(call);
                    return result;
                }
            }
        }
    }
}

/// The server, on the call's first connection; the call is refused if that
/// connection is inside a transaction already (rolling back would end the
/// caller's own).
fn start<S: Source, E>(
    retrier: &Retrier,
    lease: &mut Lease<'_, S>,
) -> Result<crate::Server, TxError<E>> {
    let conn = lease.0.as_deref_mut().unwrap_or_else(|| unreachable!());
    if open_transaction(conn) == Some(true) {
        // Handed back untouched: not rolled back.
        drop(lease.0.take());
        return Err(TxError::AlreadyInTransaction);
    }
    match retrier.server_on(conn) {
        Ok(server) => Ok(server),
        Err(err) => {
            lease.discard();
            Err(TxError::NoConnection(Box::new(err)))
        }
    }
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
    note_pooler(retrier, class, err.diesel_error());
    let said = err.diesel_error().map(ToString::to_string);
    if settled {
        core.settled();
    }
    core.failed(Stage::Statement, class, err, said);
}

/// Which statement of the commit message failed.
fn commit_stage(plan: &Plan, conn: &mut PgConnection) -> Stage {
    match plan.framing() {
        Protocol::Savepoint => failed_at_savepoint_commit(plan.server, open_transaction(conn)),
        Protocol::Restart => Stage::Commit,
    }
}

/// Makes sure a transaction is open: `BEGIN` unless a rewound one is.
fn begin(
    retrier: &Retrier,
    conn: &mut PgConnection,
    sql: &str,
    plan: &Plan,
) -> Result<(), DieselError> {
    if open_transaction(conn) != Some(true) {
        AnsiTransactionManager::begin_transaction_sql(conn, sql)?;
    }
    // Once one connection met a transaction-mode pooler, every other one
    // of the same helper stops naming its statements before it meets one
    // of another connection's (same name, other statement). The BEGIN
    // message is a simple query, never a named statement.
    if retrier.pooler_seen() {
        use diesel::connection::CacheSize;
        conn.set_prepared_statement_cache_size(CacheSize::Disabled);
    }
    retrier.check_isolation(conn, plan.isolation)
}

/// One of the helper's own statements failed at `stage`.
fn failed<V, E: UnitError<M>, M>(
    retrier: &Retrier,
    core: &mut Core<'_, V, E>,
    stage: Stage,
    err: DieselError,
) {
    let class = decide::classify(&err);
    note_pooler(retrier, class, Some(&err));
    let said = err.to_string();
    core.failed(stage, class, E::from(err), Some(said));
}

/// Says once that a transaction-mode pooler moves connections between
/// server sessions.
pub(crate) fn note_pooler(retrier: &Retrier, class: decide::Class, err: Option<&DieselError>) {
    if class == decide::Class::StaleStatement {
        if let Some(err) = err {
            retrier.pooler_met(err);
        }
    }
}

/// The connection of one turn. No connection leaves the helper inside a
/// transaction: dropped, it rolls back whatever is open.
struct Lease<'s, S: Source + 's>(Option<S::Conn<'s>>);

impl<'s, S: Source + 's> Lease<'s, S> {
    /// Rolls back whatever Diesel knows to be open. A connection that cannot
    /// roll back, or whose state Diesel lost, is given up on.
    fn rollback(&mut self) {
        let Some(conn) = self.0.as_deref_mut() else {
            return;
        };
        let healthy = match open_transaction(conn) {
            Some(true) => AnsiTransactionManager::rollback_transaction(conn)
                .map_err(|err| tracing::debug!(error = %err, "rollback failed"))
                .is_ok(),
            Some(false) => true,
            None => false,
        };
        if !healthy {
            self.discard();
        }
    }

    /// Gives the connection up: its source never lends it again.
    fn discard(&mut self) {
        if let Some(conn) = self.0.take() {
            S::discard(conn);
        }
    }
}

impl<'s, S: Source + 's> Drop for Lease<'s, S> {
    fn drop(&mut self) {
        self.rollback();
    }
}
