//! A statement of the app's held at a chosen point (before a statement, or
//! at its COMMIT) by an advisory lock the test holds, so that a fault can
//! be injected at that exact moment without sleeping to synchronise.

use std::time::Duration;

use diesel::prelude::*;

use super::scalar;

/// The advisory lock the lock-holding trigger waits for.
pub const HELD_LOCK: i64 = 4242;

/// Where the lock-holding trigger holds a statement of the app's.
#[derive(Clone, Copy)]
pub enum HoldAt {
    /// Before the statement (`INSERT`, `UPDATE` or `DELETE` on accounts).
    Statement(&'static str),
    /// Only the first such statement of the database's life.
    FirstStatement(&'static str),
    /// At the COMMIT of the transaction that ran it (a deferred trigger).
    Commit(&'static str),
}

/// Installs the trigger that makes the chosen statement (or COMMIT) wait
/// for advisory lock [`HELD_LOCK`], and takes that lock on `holder`, which
/// keeps it until it is dropped or unlocks it. The harness then sees the
/// app's backend waiting ([`backend_waiting_for_the_lock`]) and acts at
/// that moment, without sleeping to synchronise.
pub fn hold_at(admin: &mut PgConnection, holder: &mut PgConnection, at: HoldAt) {
    use diesel::connection::SimpleConnection;
    let wait = format!("PERFORM pg_advisory_xact_lock({HELD_LOCK});");
    let (body, trigger) = match at {
        HoldAt::Statement(op) => (
            wait,
            format!("CREATE TRIGGER wait_for_lock BEFORE {op} ON accounts FOR EACH STATEMENT"),
        ),
        HoldAt::FirstStatement(op) => (
            format!("IF nextval('held_statements') = 1 THEN {wait} END IF;"),
            format!("CREATE TRIGGER wait_for_lock BEFORE {op} ON accounts FOR EACH STATEMENT"),
        ),
        HoldAt::Commit(op) => (
            wait,
            format!(
                "CREATE CONSTRAINT TRIGGER wait_for_lock AFTER {op} ON accounts \
                 DEFERRABLE INITIALLY DEFERRED FOR EACH ROW"
            ),
        ),
    };
    admin
        .batch_execute(&format!(
            "CREATE SEQUENCE held_statements;
             CREATE FUNCTION wait_for_lock() RETURNS trigger AS $$
             BEGIN {body} RETURN NULL; END $$ LANGUAGE plpgsql;
             {trigger} EXECUTE FUNCTION wait_for_lock()"
        ))
        .expect("install the lock-holding trigger");
    holder
        .batch_execute(&format!("SELECT pg_advisory_lock({HELD_LOCK})"))
        .expect("take the lock");
}

/// The pid of a backend of database `datname` waiting for [`HELD_LOCK`],
/// looked for at most 400 times, 50 ms apart.
pub fn backend_waiting_for_the_lock(watcher: &mut PgConnection, datname: &str) -> i32 {
    for _ in 0..400 {
        let pid: Option<i32> =
            scalar::<diesel::sql_types::Nullable<diesel::sql_types::Integer>, _>(
                watcher,
                &format!(
                    "(SELECT pid FROM pg_stat_activity WHERE datname = '{datname}' \
                 AND wait_event_type = 'Lock' AND wait_event = 'advisory' LIMIT 1)"
                ),
            )
            .expect("read pg_stat_activity");
        if let Some(pid) = pid {
            return pid;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no backend of {datname} ever waited for the lock");
}
