//! Before the first transaction: connect (so that a bad URL gets its real
//! reason), learn the server and the state of the schema, refuse a schema
//! the app cannot run on in words that say how to fix it, and build the
//! pools the run uses.

use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use diesel_tx_retry::Server;

use super::asynch::{self, AsyncPool};
use super::{AccountsTable, Connects, DbUrl, Inspection, Manager, PgPool};

/// How the run's connections are set up.
#[derive(Debug, Clone)]
pub struct Setup {
    /// The server-side session timeouts ([`DbUrl::with_session_timeouts`]).
    pub statement_timeout: Duration,
    /// How long a checkout waits for a connection.
    pub pool_timeout: Duration,
    /// Each connection's lifetime (give or take a tenth on the blocking pool).
    pub lifetime: Duration,
    /// Log every statement (`-v`).
    pub verbose: bool,
    /// Send every statement unnamed (`--unnamed-statements`).
    pub unnamed_statements: bool,
    /// Where the blocking pool counts the connections it is opening.
    pub connects: Connects,
}

/// Connects, learns the server and the schema in one query, refuses a
/// schema the app cannot run on, and builds a pool of `pool_size` whose
/// first connection is this one. `for_server` makes what depends on the
/// server (the retry helper) as soon as it is known, and may refuse it. The
/// main job runs its statements once each, so they go unprepared (`cached`
/// false).
///
/// # Errors
/// Connecting, the inspection, the schema, `for_server`'s refusal.
pub fn prepare<T>(
    setup: &Setup,
    url: &DbUrl,
    pool_size: u32,
    cached: bool,
    for_server: impl FnOnce(Server) -> anyhow::Result<T>,
) -> anyhow::Result<(T, PgPool, DbUrl)> {
    let (mut conn, url) = super::establish_with_timeouts(url, setup.statement_timeout)?;
    if setup.verbose {
        super::log_statements(&mut conn);
    }
    let inspection = super::inspect(&mut conn).context("asking the server what it is")?;
    let made = for_server(inspection.server)?;
    check_schema(&mut conn, &url, &inspection)?;
    tracing::debug!(server = ?inspection.server, target = %url.redacted(), "connected");
    let manager = Manager::new(&url)
        .with_lifetime(setup.lifetime)
        .with_first(conn)
        .counted_in(&setup.connects)
        .logging_statements(setup.verbose);
    let manager = if cached && !setup.unnamed_statements {
        manager
    } else {
        manager.without_statement_cache()
    };
    let pool = super::pool_of(manager, pool_size, setup.pool_timeout)
        .context("building the connection pool")?;
    Ok((made, pool, url))
}

/// The schema as the inspection found it: usable, or a one-line refusal
/// that says how to fix it; a table made elsewhere that the app can run on
/// draws one warning.
fn check_schema(
    conn: &mut diesel::PgConnection,
    url: &DbUrl,
    inspection: &Inspection,
) -> anyhow::Result<()> {
    match inspection.accounts {
        AccountsTable::Ready if !inspection.ledger => bail!(
            "table \"transfers\" (the ledger, the schema's second migration) does not exist in {}; \
             add it with `diesel migration run`, `cockroach sql --url \"$DATABASE_URL\" < dbinit.sql` \
             (psql \"$DATABASE_URL\" -f dbinit.sql on PostgreSQL), or `bank migrate`",
            url.redacted()
        ),
        AccountsTable::Ready => {
            let finding = inspection
                .shape
                .as_ref()
                .and_then(|shape| super::shape::assess(conn, shape));
            match finding {
                Some(finding) if finding.blocking => bail!("{}", finding.refusal()),
                // It can run: the check and the NOT NULL guard data the app
                // never writes (negative balances, NULLs).
                Some(finding) => tracing::warn!("{}", finding.line),
                None => {}
            }
            Ok(())
        }
        AccountsTable::Missing => bail!(
            "table \"accounts\" does not exist in {}; create it with `diesel migration run`, \
             `cockroach sql --url \"$DATABASE_URL\" < dbinit.sql` (psql \"$DATABASE_URL\" -f dbinit.sql on PostgreSQL), \
             or `bank migrate`",
            url.redacted()
        ),
        AccountsTable::NotAllowed => {
            let user = url.user().unwrap_or("the connecting user");
            bail!(
                "user {user} may not read and write table \"accounts\" (and add to \"transfers\") in {}; \
                 an admin can allow it with: GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE accounts TO {user}; \
                 GRANT SELECT, INSERT ON TABLE transfers TO {user}",
                url.redacted()
            )
        }
    }
}

/// [`prepare`] for the async front end, on `tokio`: a pool of `size` async
/// connections, the session timeouts in their startup options. The quick
/// start-up check runs on the async pool's first connection, so a set-up
/// schema costs no other connection; anything it does not settle (no
/// connection, a missing table, a pooler refusing the startup options)
/// goes through the blocking start-up, which says what is wrong in the
/// app's words, and whose connection string the async pool then uses.
///
/// # Errors
/// As [`prepare`].
pub fn prepare_async<T>(
    setup: &Setup,
    tokio: &tokio::runtime::Runtime,
    url: &DbUrl,
    size: u32,
    for_server: impl FnOnce(Server) -> anyhow::Result<T>,
) -> anyhow::Result<(T, AsyncPool, DbUrl)> {
    let timed = url.with_session_timeouts(setup.statement_timeout);
    let pool = async_pool(setup, tokio, &timed, size)?;
    if let Some(inspection) = tokio.block_on(asynch::inspect_quickly(&pool, &timed)) {
        if let Some(line) = url.unverified_remote(std::env::var("PGSSLMODE").ok().as_deref()) {
            tracing::warn!("{line}");
        }
        tracing::debug!(server = ?inspection.server, target = %url.redacted(), "connected (async)");
        return Ok((for_server(inspection.server)?, pool, timed));
    }
    drop(pool);
    let (made, _, url) = prepare(setup, url, 1, false, for_server)?;
    let pool = async_pool(setup, tokio, &url, size)?;
    Ok((made, pool, url))
}

/// A pool of `size` async connections to `url`, made on `tokio` (bb8 starts
/// its reaper of idle and old connections there).
fn async_pool(
    setup: &Setup,
    tokio: &tokio::runtime::Runtime,
    url: &DbUrl,
    size: u32,
) -> anyhow::Result<AsyncPool> {
    let _inside = tokio.enter();
    asynch::async_pool(url, size, setup.pool_timeout, setup.lifetime).map_err(|line| anyhow!(line))
}
