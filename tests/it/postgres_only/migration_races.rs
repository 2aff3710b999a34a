//! Migrations that lose a race, for certain: the harness applies the
//! migrations in a transaction it keeps open, so that every racer started
//! meanwhile blocks on the tables it is creating (it waits on the
//! harness's transaction, visible in `pg_stat_activity`); then the harness
//! commits, and every racer meets what the winner made. Free-running races,
//! which collide only sometimes, stay in `schema.rs`.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bank::db::MIGRATIONS;
use diesel::prelude::*;
use diesel::sql_types::BigInt;
use diesel_migrations::MigrationHarness;

use crate::helpers::*;
use crate::schema::{describe, expected, spawn_migrate};

/// Runs `racers` against `db` while the harness holds the winning
/// migration open, once all of them wait behind it; returns their outputs.
fn lose_the_race(db: &TestDb, racers: impl FnOnce() -> Vec<Child>) -> Vec<std::process::Output> {
    let mut winner = db.conn();
    let mut watcher = db.conn();
    let mut children = Vec::new();
    winner
        .transaction::<_, diesel::result::Error, _>(|conn| {
            if let Err(err) = conn.run_pending_migrations(MIGRATIONS) {
                panic!("the winner's migration: {err}");
            }
            children = racers();
            let n = i64::try_from(children.len()).unwrap();
            // Looked for at most 400 times, 25 ms apart.
            let waiting = (0..400)
                .map(|_| {
                    std::thread::sleep(Duration::from_millis(25));
                    scalar::<BigInt, i64>(
                        &mut watcher,
                        &format!(
                            "(SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' \
                             AND wait_event_type = 'Lock')",
                            db.name
                        ),
                    )
                    .unwrap()
                })
                .find(|waiting| *waiting >= n);
            assert_eq!(waiting, Some(n), "the racers never all waited");
            Ok(())
        })
        .unwrap();
    children
        .into_iter()
        .map(|child| child.wait_with_output().unwrap())
        .collect()
}

#[test]
fn five_migrations_that_lose_a_race_all_succeed_and_say_the_schema_is_up_to_date() {
    let db = TestDb::empty();
    let workdir = tempdir();
    let outs = lose_the_race(&db, || {
        (0..5).map(|_| spawn_migrate(&db, workdir.path())).collect()
    });
    for out in outs {
        assert_ok(&out);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim_end(),
            "Schema is up to date."
        );
    }
    assert_eq!(describe(&db), expected());
}

#[test]
fn migrate_and_diesel_cli_that_both_lose_a_race_leave_the_right_schema() {
    let db = TestDb::empty();
    let workdir = tempdir();
    let mut outs = lose_the_race(&db, || {
        let diesel = Command::new("diesel")
            .args(["migration", "run", "--database-url", &db.url_string()])
            .arg("--migration-dir")
            .arg(repo_root().join("migrations"))
            .current_dir(workdir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("diesel CLI on PATH (./dev test installs it)");
        vec![spawn_migrate(&db, workdir.path()), diesel]
    });
    // diesel CLI has no retry of its own and may fail; ours must not.
    let theirs = outs.pop().unwrap();
    let ours = outs.pop().unwrap();
    assert_ok(&ours);
    assert_eq!(
        String::from_utf8_lossy(&ours.stdout).trim_end(),
        "Schema is up to date."
    );
    eprintln!(
        "diesel CLI after losing the race: {:?} {}",
        theirs.status.code(),
        String::from_utf8_lossy(&theirs.stderr).trim_end()
    );
    assert_eq!(describe(&db), expected());
}
