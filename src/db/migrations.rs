//! The embedded migrations, applied one at a time, with racing processes
//! tolerated.

use std::time::Duration;

use diesel::prelude::*;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};
use diesel_tx_retry::Backoff;

/// The migrations in `migrations/`, compiled in for `bank migrate`.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// Attempts at applying the migrations when other processes race to apply
/// them too; the waits between them add up to about 1.3 s at most.
const MIGRATION_ATTEMPTS: u32 = 8;

/// Applies the embedded migrations that are not applied yet and returns
/// their versions. Running it twice is a no-op.
///
/// Several processes may run it at once on a fresh database (replicas at
/// deploy time, or `diesel migration run` beside it). Two transactions
/// creating the same table collide (on PostgreSQL, a duplicate key in
/// `pg_type`; on CockroachDB, a retry error or "already exists"), and the
/// migration's version row is unique, so one process wins. The others
/// re-read what is still pending: nothing, when the winner applied it all;
/// otherwise they try again, up to `MIGRATION_ATTEMPTS` (8) times. A lock
/// would avoid the collision on PostgreSQL, but CockroachDB has no advisory
/// locks and diesel CLI would not take ours anyway.
///
/// # Errors
/// The last failure, when migrations are still pending after every attempt.
pub fn run_migrations(conn: &mut PgConnection) -> Result<Vec<String>, MigrationError> {
    // One at a time, so that what this run applied is known even when a
    // later one loses a race: several migrations, several transactions.
    let mut applied = Vec::new();
    let mut attempt = 0;
    loop {
        let err = match conn.pending_migrations(MIGRATIONS) {
            Ok(pending) if pending.is_empty() => return Ok(applied),
            Ok(_) => match conn.run_next_migration(MIGRATIONS) {
                Ok(version) => {
                    applied.push(version.to_string());
                    continue;
                }
                Err(err) => err,
            },
            Err(err) => err,
        };
        attempt += 1;
        let pending = conn.pending_migrations(MIGRATIONS).map(|p| p.len());
        tracing::debug!(attempt, ?pending, error = %err, "migration failed");
        if pending.is_ok_and(|n| n == 0) {
            return Ok(applied);
        }
        if attempt >= MIGRATION_ATTEMPTS {
            return Err(MigrationError(err));
        }
        // 10 ms doubling to 320 ms, jittered so that racers spread out: the
        // retry crate's backoff, as for transactions.
        let backoff = Backoff::exponential(Duration::from_millis(10), Duration::from_millis(320))
            .delay_first_retry();
        std::thread::sleep(backoff.delay(attempt, rand::random::<f64>()));
    }
}

/// A migration failed; the harness's error is the source.
#[derive(Debug, thiserror::Error)]
#[error("migration failed")]
pub struct MigrationError(#[source] Box<dyn std::error::Error + Send + Sync>);

/// The version of the migration that creates `accounts`, as
/// [`run_migrations`] reports it.
pub const ACCOUNTS_MIGRATION: &str = "20261121000000";
