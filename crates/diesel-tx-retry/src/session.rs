//! The connection attempts run on, and what Diesel knows of its
//! transaction.

use std::fmt;
use std::ops::DerefMut;

use diesel::connection::{AnsiTransactionManager, SimpleConnection, TransactionManager};
use diesel::result::Error as DieselError;
use diesel::PgConnection;
use tracing::debug;

use crate::{AsDieselError, Stage, TxError};

/// How an attempt ended when it did not commit.
pub(crate) enum Failure<T, E, N> {
    /// An error at a stage, with the unit's value if the unit had finished.
    At(Stage, E, Option<T>),
    /// No connection could be had.
    NoConnection(N),
    /// The unit panicked.
    Panicked(Box<dyn std::any::Any + Send + 'static>),
}

pub(crate) enum OpenError<N> {
    NoConnection(N),
    Database(DieselError),
}

/// Where a session gets a new connection: a pool, a held slot
/// (`connections.rs`), or nowhere (the caller's own connection, which
/// cannot be replaced).
// Public in a private module: the supertrait of the sealed `Connections`,
// which no other crate can name or implement.
#[allow(unreachable_pub)]
pub trait Source {
    /// A connection checked out.
    type Conn<'s>: DerefMut<Target = PgConnection>
    where
        Self: 's;
    /// Why none could be had.
    type Error;
    /// A connection to run an attempt on.
    fn checkout(&self) -> Result<Self::Conn<'_>, Self::Error>;
    /// Lets go of a connection the helper gave up on (lost, or its state
    /// unknown): never lent again, whatever it looks like.
    fn forget(conn: Self::Conn<'_>) {
        drop(conn);
    }
    /// The helper's error for a failed checkout.
    fn no_connection<E>(err: Self::Error) -> TxError<E>;
}

/// No source of connections: the caller's own one.
pub(crate) enum Nowhere {}

impl Source for Nowhere {
    type Conn<'s> = Box<PgConnection>;
    type Error = std::convert::Infallible;
    fn checkout(&self) -> Result<Self::Conn<'_>, Self::Error> {
        match *self {}
    }
    fn no_connection<E>(err: Self::Error) -> TxError<E> {
        match err {}
    }
}

/// The connection attempts run on. Whether a transaction is open on it is
/// read from Diesel's own transaction manager, which lives inside the
/// connection, so the two cannot disagree; and the connection is only ever
/// replaced with no transaction open.
pub(crate) struct Session<'a, S: Source + 'a> {
    pool: Option<&'a S>,
    conn: Option<Handle<'a, S>>,
}

enum Handle<'a, S: Source + 'a> {
    Pooled(S::Conn<'a>),
    Borrowed(&'a mut PgConnection),
}

impl<'a, S: Source + 'a> Handle<'a, S> {
    fn get(&mut self) -> &mut PgConnection {
        match self {
            Handle::Pooled(conn) => conn,
            Handle::Borrowed(conn) => conn,
        }
    }
}

/// What Diesel knows of the connection's transaction: `Some(true)` when one
/// is open, `None` when Diesel gave up on the connection's state.
pub(crate) fn open_transaction(conn: &mut PgConnection) -> Option<bool> {
    AnsiTransactionManager::transaction_manager_status_mut(conn)
        .transaction_depth()
        .ok()
        .map(|depth| depth.is_some())
}

impl<'a, S: Source + 'a> Session<'a, S> {
    #[cfg(feature = "r2d2")]
    pub(crate) fn pooled(pool: &'a S) -> Self {
        Self {
            pool: Some(pool),
            conn: None,
        }
    }

    pub(crate) fn borrowed(conn: &'a mut PgConnection) -> Self {
        Self {
            pool: None,
            conn: Some(Handle::Borrowed(conn)),
        }
    }

    pub(crate) fn replaceable(&self) -> bool {
        self.pool.is_some()
    }

    /// The connection with a transaction open on it: the one a rewind left
    /// open, or a new one begun here (on a fresh connection if needed).
    pub(crate) fn open(&mut self, begin: &str) -> Result<&mut PgConnection, OpenError<S::Error>> {
        let handle = match (self.conn.take(), self.pool) {
            (Some(handle), _) => handle,
            (None, Some(pool)) => Handle::Pooled(pool.checkout().map_err(OpenError::NoConnection)?),
            // The caller's connection was lost earlier.
            (None, None) => return Err(OpenError::Database(DieselError::BrokenTransactionManager)),
        };
        let conn = self.conn.insert(handle).get();
        if open_transaction(conn) == Some(true) {
            return Ok(conn);
        }
        AnsiTransactionManager::begin_transaction_sql(conn, begin).map_err(OpenError::Database)?;
        Ok(conn)
    }

    /// `sql` (`ROLLBACK TO SAVEPOINT cockroach_restart` and the statement
    /// bound), or a full rollback if that fails.
    pub(crate) fn rewind(&mut self, sql: &str) {
        let rewound = self
            .conn
            .as_mut()
            .is_some_and(|handle| handle.get().batch_execute(sql).is_ok());
        if !rewound {
            self.rollback();
        }
    }

    /// Rolls back whatever Diesel knows to be open. A connection that cannot
    /// roll back, or whose state Diesel lost, is discarded.
    pub(crate) fn rollback(&mut self) {
        let Some(handle) = self.conn.as_mut() else {
            return;
        };
        let conn = handle.get();
        let healthy = match open_transaction(conn) {
            Some(true) => AnsiTransactionManager::rollback_transaction(conn)
                .map_err(|err| debug!(error = %err, "rollback failed"))
                .is_ok(),
            Some(false) => true,
            None => false,
        };
        if !healthy {
            self.discard();
        }
    }

    /// Forgets the connection: its source never lends it again. A pool
    /// gets it back and closes it, as Diesel marks a connection whose
    /// socket died as broken and r2d2 closes broken connections instead of
    /// pooling them; a `Held` gives it to the pool rather than keep it.
    pub(crate) fn discard(&mut self) {
        if let Some(Handle::Pooled(mut conn)) = self.conn.take() {
            // Broken in Diesel's eyes too, whatever libpq saw so far (a
            // server's 57P01 can arrive before the connection closes): a
            // pool asks Diesel whether a connection is broken before it
            // takes it back, and closes it if so.
            AnsiTransactionManager::transaction_manager_status_mut(&mut *conn).set_in_error();
            S::forget(conn);
        }
    }
}

impl<'a, S: Source + 'a> Drop for Session<'a, S> {
    /// No connection leaves the helper inside a transaction.
    fn drop(&mut self) {
        self.rollback();
    }
}

pub(crate) struct Cause<'a, E>(pub(crate) &'a E);

impl<E: AsDieselError> fmt::Display for Cause<'_, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_diesel() {
            Some(err) => write!(f, "{err}"),
            None => f.write_str("(not a database error)"),
        }
    }
}
