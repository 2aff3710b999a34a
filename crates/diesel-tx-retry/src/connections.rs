//! Where [`Retrier::run`](crate::Retrier::run) gets its connections: an r2d2
//! pool, a connection for each call, or a [`Held`] one, kept from one call
//! to the next and replaced only when lost.

use std::cell::Cell;
use std::ops::{Deref, DerefMut};

use diesel::PgConnection;
use r2d2::{ManageConnection, Pool, PooledConnection};

use crate::session::Source;
use crate::TxError;

/// What [`Retrier::run`](crate::Retrier::run) and
/// [`Retrier::run_with`](crate::Retrier::run_with) take connections from:
/// an r2d2 [`Pool`] (a connection checked out for each call), or a [`Held`]
/// connection. Either way a connection lost before the commit is replaced
/// by a new one from the pool. Sealed: these two are all there is.
pub trait Connections: Source {}

impl<M: ManageConnection<Connection = PgConnection>> Connections for Pool<M> {}

impl<M: ManageConnection<Connection = PgConnection>> Connections for Held<M> {}

/// A connection from a pool that one worker keeps from one call to the next:
/// checked out when first needed, and again only after the helper lost or
/// discarded the one it held. For a thread that runs units back to back (a
/// queue consumer, a load generator), as each of pgbench's clients keeps its
/// connection.
///
/// What it saves is the pool: no lock that every worker shares and no
/// connection passed from thread to thread (r2d2 hands back whichever
/// connection came back last), so each worker stays with one server session.
/// Between calls the connection sits idle here, not in the pool, so size the
/// pool for the workers that hold one. Not `Sync`: one per thread.
///
/// ```no_run
/// use diesel::prelude::*;
/// use diesel::r2d2::{ConnectionManager, Pool};
/// use diesel_tx_retry::{Held, Retrier, RetryPolicy, Server, TxOptions};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = Pool::new(ConnectionManager::<PgConnection>::new(std::env::var("DATABASE_URL")?))?;
/// let retrier = Retrier::new(RetryPolicy::default(), Server::detect(&mut *pool.get()?)?);
/// let held = Held::new(&pool);
/// for _ in 0..1_000 {
///     retrier.run(&held, TxOptions::default(), |conn| {
///         diesel::sql_query("UPDATE counters SET n = n + 1").execute(conn)
///     })?;
/// }
/// # Ok(())
/// # }
/// ```
pub struct Held<M: ManageConnection<Connection = PgConnection>> {
    pool: Pool<M>,
    conn: Cell<Option<PooledConnection<M>>>,
}

impl<M: ManageConnection<Connection = PgConnection>> Held<M> {
    /// Holds connections from `pool` (a clone of the handle, which shares
    /// the pool); none is checked out until the first call needs one.
    pub fn new(pool: &Pool<M>) -> Self {
        Self {
            pool: pool.clone(),
            conn: Cell::new(None),
        }
    }
}

impl<M: ManageConnection<Connection = PgConnection>> std::fmt::Debug for Held<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held").finish_non_exhaustive()
    }
}

/// A connection lent by a [`Held`] for one call: back in the slot when the
/// call is done with it, unless the helper gave up on it.
// Public for `Source`, which no other crate can name.
#[allow(unreachable_pub)]
pub struct Lent<'h, M: ManageConnection<Connection = PgConnection>> {
    slot: &'h Cell<Option<PooledConnection<M>>>,
    conn: Option<PooledConnection<M>>,
}

impl<M: ManageConnection<Connection = PgConnection>> Deref for Lent<'_, M> {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        // Some from checkout until drop or forget, which consume it.
        self.conn.as_deref().unwrap_or_else(|| unreachable!())
    }
}

impl<M: ManageConnection<Connection = PgConnection>> DerefMut for Lent<'_, M> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.conn.as_deref_mut().unwrap_or_else(|| unreachable!())
    }
}

impl<M: ManageConnection<Connection = PgConnection>> Drop for Lent<'_, M> {
    /// Back in the slot: the session hands a connection back only with no
    /// transaction open, and gives up on a broken one through `forget`.
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.slot.set(Some(conn));
        }
    }
}

impl<M: ManageConnection<Connection = PgConnection>> Source for Pool<M> {
    type Conn<'s> = PooledConnection<M>;
    type Error = r2d2::Error;
    fn checkout(&self) -> Result<PooledConnection<M>, r2d2::Error> {
        self.get()
    }
    fn no_connection<E>(err: r2d2::Error) -> TxError<E> {
        TxError::NoConnection(err)
    }
}

impl<M: ManageConnection<Connection = PgConnection>> Source for Held<M> {
    type Conn<'s> = Lent<'s, M>;
    type Error = r2d2::Error;
    fn checkout(&self) -> Result<Lent<'_, M>, r2d2::Error> {
        let conn = match self.conn.take() {
            Some(conn) => conn,
            None => self.pool.get()?,
        };
        Ok(Lent {
            slot: &self.conn,
            conn: Some(conn),
        })
    }
    fn forget(mut conn: Lent<'_, M>) {
        // To the pool, not the slot: r2d2 closes it, as Diesel calls a
        // connection broken once libpq lost it or its state is unknown.
        drop(conn.conn.take());
    }
    fn no_connection<E>(err: r2d2::Error) -> TxError<E> {
        TxError::NoConnection(err)
    }
}
