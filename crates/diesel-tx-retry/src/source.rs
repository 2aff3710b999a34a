//! Where a call gets its connection ([`Source`]): an r2d2 pool, a [`Held`]
//! connection a worker keeps between calls, or the caller's own
//! `&mut PgConnection`; or any pool of your own that implements the trait.

use std::error::Error as StdError;
use std::ops::DerefMut;

use diesel::connection::{AnsiTransactionManager, TransactionManager};
use diesel::PgConnection;

/// A source of connections for [`Retrier::transaction`](crate::Retrier::transaction)
/// and the other entry points. Implemented for `&r2d2::Pool` and `&Held`
/// (feature `r2d2`) and for `&mut PgConnection`; implement it for another
/// pool to use that one.
///
/// The helper checks out one connection and keeps it for the whole call,
/// but for a connection it gives up on (lost, or in a state nobody knows),
/// which it hands to [`Source::discard`] and replaces with another checkout
/// if [`Source::is_replaceable`].
pub trait Source {
    /// A connection lent by the source.
    type Conn<'s>: DerefMut<Target = PgConnection>
    where
        Self: 's;

    /// A connection to run attempts on.
    ///
    /// # Errors
    /// Why none could be had (a pool's checkout timed out); the call ends
    /// with [`TxError::NoConnection`](crate::TxError::NoConnection), unless
    /// a commit is in doubt: then the helper asks again, after its backoff,
    /// within the attempts and the deadline.
    fn checkout(&mut self) -> Result<Self::Conn<'_>, Box<dyn StdError + Send + Sync>>;

    /// Whether a second checkout gives another connection: a pool's does,
    /// a single connection's does not (a lost one then ends the call).
    fn is_replaceable(&self) -> bool {
        true
    }

    /// Lets go of a connection the helper gave up on, which must never be
    /// lent again. By default it is marked broken in Diesel's eyes and
    /// dropped: a pool that asks Diesel (`R2D2Connection::is_broken`, as
    /// r2d2's `has_broken` does) then closes it instead of pooling it,
    /// whatever libpq saw so far (a server's 57P01 can arrive before the
    /// connection closes).
    fn discard(mut conn: Self::Conn<'_>) {
        AnsiTransactionManager::transaction_manager_status_mut(&mut *conn).set_in_error();
        drop(conn);
    }
}

/// The caller's own connection: never replaced, never marked broken.
impl Source for &mut PgConnection {
    type Conn<'s>
        = &'s mut PgConnection
    where
        Self: 's;

    fn checkout(&mut self) -> Result<&mut PgConnection, Box<dyn StdError + Send + Sync>> {
        Ok(&mut **self)
    }

    fn is_replaceable(&self) -> bool {
        false
    }

    fn discard(_conn: &mut PgConnection) {}
}

/// What a pooled connection knows of its own end: whether it is due to be
/// closed and replaced before its next transaction, for a maximum
/// lifetime. A [`Held`] connection asks before each call, and goes back to
/// its pool when due (the pool's manager should then close it: r2d2 asks
/// its `has_broken`). Diesel's own connection never is due; a manager
/// whose connections wrap one with the time it is due implements this
/// (the repository's bank app does, with CockroachDB's advice of a
/// lifetime of minutes and some jitter).
pub trait Lifespan {
    /// Whether the connection should be closed and replaced now.
    fn expired(&self) -> bool {
        false
    }
}

impl Lifespan for PgConnection {}

#[cfg(feature = "r2d2")]
pub use pooled::{Held, Lent, Pooled};

#[cfg(feature = "r2d2")]
mod pooled {
    use std::borrow::{Borrow, BorrowMut};
    use std::cell::Cell;
    use std::error::Error as StdError;
    use std::ops::{Deref, DerefMut};

    use diesel::PgConnection;
    use r2d2::{ManageConnection, Pool, PooledConnection};

    use super::{Lifespan, Source};

    /// A connection for each call, checked out of the pool. The pool's
    /// connections are Diesel's, or wrap one (a manager that keeps
    /// something beside each connection, its birth time say).
    impl<M: ManageConnection<Connection: BorrowMut<PgConnection>>> Source for &Pool<M> {
        type Conn<'s>
            = Pooled<M>
        where
            Self: 's;

        fn checkout(&mut self) -> Result<Pooled<M>, Box<dyn StdError + Send + Sync>> {
            Ok(Pooled(self.get()?))
        }
    }

    /// A connection checked out of an r2d2 pool, as the helper uses it:
    /// the pool's connection, seen as the Diesel connection it is or wraps.
    pub struct Pooled<M: ManageConnection<Connection: BorrowMut<PgConnection>>>(
        PooledConnection<M>,
    );

    impl<M: ManageConnection<Connection: BorrowMut<PgConnection>>> std::fmt::Debug for Pooled<M> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Pooled").finish_non_exhaustive()
        }
    }

    impl<M: ManageConnection<Connection: BorrowMut<PgConnection>>> Deref for Pooled<M> {
        type Target = PgConnection;
        fn deref(&self) -> &PgConnection {
            (*self.0).borrow()
        }
    }

    impl<M: ManageConnection<Connection: BorrowMut<PgConnection>>> DerefMut for Pooled<M> {
        fn deref_mut(&mut self) -> &mut PgConnection {
            (*self.0).borrow_mut()
        }
    }

    /// A connection from a pool that one worker keeps from one call to the
    /// next: checked out when first needed, and again only after the helper
    /// lost or discarded the one it held. For a thread that runs units back
    /// to back (a queue consumer, a load generator), as each of pgbench's
    /// clients keeps its connection.
    ///
    /// What it saves is the pool: no lock that every worker shares and no
    /// connection passed from thread to thread (r2d2 hands back whichever
    /// connection came back last), so each worker stays with one server
    /// session. Between calls the connection sits idle here, not in the
    /// pool, so size the pool for the workers that hold one. Not `Sync`: one
    /// per thread.
    ///
    /// ```no_run
    /// use diesel::prelude::*;
    /// use diesel::r2d2::{ConnectionManager, Pool};
    /// use diesel_tx_retry::{Held, Retrier};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let pool = Pool::new(ConnectionManager::<PgConnection>::new(std::env::var("DATABASE_URL")?))?;
    /// let retrier = Retrier::default();
    /// let held = Held::new(&pool);
    /// for _ in 0..1_000 {
    ///     retrier.transaction(&held, |conn| {
    ///         diesel::sql_query("UPDATE counters SET n = n + 1").execute(conn)
    ///     })?;
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub struct Held<M: ManageConnection<Connection: BorrowMut<PgConnection> + Lifespan>> {
        pool: Pool<M>,
        conn: Cell<Option<PooledConnection<M>>>,
    }

    impl<M: ManageConnection<Connection: BorrowMut<PgConnection> + Lifespan>> Held<M> {
        /// Holds connections from `pool` (a clone of the handle, which
        /// shares the pool); none is checked out until the first call needs
        /// one.
        pub fn new(pool: &Pool<M>) -> Self {
            Self {
                pool: pool.clone(),
                conn: Cell::new(None),
            }
        }
    }

    impl<M: ManageConnection<Connection: BorrowMut<PgConnection> + Lifespan>> std::fmt::Debug
        for Held<M>
    {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Held").finish_non_exhaustive()
        }
    }

    /// A connection lent by a [`Held`] for one call: back in the slot when
    /// the call is done with it, unless the helper gave up on it.
    pub struct Lent<'h, M: ManageConnection<Connection: BorrowMut<PgConnection> + Lifespan>> {
        slot: &'h Cell<Option<PooledConnection<M>>>,
        conn: Option<PooledConnection<M>>,
    }

    impl<M: ManageConnection<Connection: BorrowMut<PgConnection> + Lifespan>> std::fmt::Debug
        for Lent<'_, M>
    {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Lent").finish_non_exhaustive()
        }
    }

    impl<M: ManageConnection<Connection: BorrowMut<PgConnection> + Lifespan>> Deref for Lent<'_, M> {
        type Target = PgConnection;
        fn deref(&self) -> &PgConnection {
            // Some from checkout until drop or discard, which consume it.
            (**self.conn.as_ref().unwrap_or_else(|| unreachable!())).borrow()
        }
    }

    impl<M: ManageConnection<Connection: BorrowMut<PgConnection> + Lifespan>> DerefMut for Lent<'_, M> {
        fn deref_mut(&mut self) -> &mut PgConnection {
            (**self.conn.as_mut().unwrap_or_else(|| unreachable!())).borrow_mut()
        }
    }

    impl<M: ManageConnection<Connection: BorrowMut<PgConnection> + Lifespan>> Drop for Lent<'_, M> {
        /// Back in the slot: the helper hands a connection back only with
        /// no transaction open, and gives up on a broken one through
        /// `discard`.
        fn drop(&mut self) {
            if let Some(conn) = self.conn.take() {
                self.slot.set(Some(conn));
            }
        }
    }

    /// The held connection, or a new one from the pool.
    impl<'h, M: ManageConnection<Connection: BorrowMut<PgConnection> + Lifespan>> Source
        for &'h Held<M>
    {
        type Conn<'s>
            = Lent<'h, M>
        where
            Self: 's;

        fn checkout(&mut self) -> Result<Lent<'h, M>, Box<dyn StdError + Send + Sync>> {
            // The held connection, unless its manager says it is done for
            // (broken, or past a lifetime the manager keeps): then it goes
            // back to the pool, which closes it, and another comes.
            // Dropped when due: back to the pool, whose manager closes it.
            let held = self.conn.take().filter(|conn| !(**conn).expired());
            let conn = match held {
                Some(conn) => conn,
                None => self.pool.get()?,
            };
            Ok(Lent {
                slot: &self.conn,
                conn: Some(conn),
            })
        }

        fn discard(mut lent: Lent<'_, M>) {
            // To the pool, not the slot, marked broken so that the pool
            // closes it.
            if let Some(mut conn) = lent.conn.take() {
                use diesel::connection::{AnsiTransactionManager, TransactionManager};
                AnsiTransactionManager::transaction_manager_status_mut((*conn).borrow_mut())
                    .set_in_error();
            }
        }
    }
}
