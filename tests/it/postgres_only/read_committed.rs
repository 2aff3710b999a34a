//! READ COMMITTED on PostgreSQL: the locking read is what keeps the money.
//!
//! A negative control and its positive twin, the same choreography on two
//! threads: transfer A reads its two balances, transfer B (sharing A's
//! source) reads its own two, A writes and commits, then B writes. Each
//! transfer writes the balances it computed from what it read, as an ORM
//! does (the SQLAlchemy tutorial's `account.balance -= amount`). Without a
//! locking read, B read A's source before A changed it, so B's write undoes
//! A's withdrawal: money appears. With `FOR UPDATE`, B's read waits for A's
//! commit and sees its result (READ COMMITTED re-reads a row it waited for),
//! and the total holds. The bank's own transfer locks the same way (and
//! moves money with `balance = balance ± amount` on top of that).
//!
//! Deterministic: A writes only after B has read (without the lock) or is
//! seen waiting for A's row lock in `pg_stat_activity` (with it); B writes
//! only after A committed. Every wait is bounded.

use std::sync::mpsc;
use std::time::Duration;

use bank::bank::insert_accounts;
use bank::models::Account;
use bank::schema::accounts;
use diesel::prelude::*;
use diesel::sql_types::{Integer, Nullable};
use diesel_tx_retry::{Isolation, Retrier};
use uuid::Uuid;

use crate::helpers::*;

const OPENING: i64 = 1_000;
const WAIT: Duration = Duration::from_secs(20);

/// Reads `from` and `to` (locking them if `locking`), tells `read`, waits
/// for `go`, then writes both balances as computed from what it read.
fn read_then_write(
    conn: &mut PgConnection,
    (from, to, amount): (Uuid, Uuid, i64),
    locking: bool,
    read: &dyn Fn(),
    go: &dyn Fn(),
) -> QueryResult<()> {
    let both = accounts::table
        .filter(accounts::id.eq(from).or(accounts::id.eq(to)))
        .order(accounts::id)
        .select(Account::as_select());
    let rows: Vec<Account> = if locking {
        both.for_update().load(conn)?
    } else {
        both.load(conn)?
    };
    read();
    go();
    for row in rows {
        let balance = if row.id == from {
            row.balance - amount
        } else {
            row.balance + amount
        };
        diesel::update(accounts::table.find(row.id))
            .set(accounts::balance.eq(balance))
            .execute(conn)?;
    }
    Ok(())
}

/// Runs the two transfers as the module docs describe and returns the total
/// afterwards, with the opening total.
fn two_transfers(locking: bool) -> (i64, i64) {
    let db = TestDb::migrated();
    let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    let rows: Vec<Account> = ids
        .iter()
        .map(|&id| Account {
            id,
            balance: OPENING,
        })
        .collect();
    insert_accounts(&mut db.conn(), &rows, 3).unwrap();
    let pool = db.pool(2);
    let retrier = Retrier::default()
        .for_server(db.server)
        .with_isolation(Isolation::ReadCommitted);
    let watcher = std::sync::Mutex::new(db.conn());
    let (a_read, a_has_read) = mpsc::channel::<()>();
    let (b_read, b_has_read) = mpsc::channel::<()>();
    let (b_pid, b_pid_is) = mpsc::channel::<i32>();
    let (a_done, a_committed) = mpsc::channel::<()>();
    let (pool, retrier, ids, watcher) = (&pool, &retrier, &ids, &watcher);
    std::thread::scope(|scope| {
        let a = scope.spawn(move || {
            let result = retrier.build_transaction().run(pool, |conn| {
                read_then_write(
                    conn,
                    (ids[0], ids[1], 100),
                    locking,
                    &|| a_read.send(()).unwrap(),
                    &|| {
                        let pid = b_pid_is.recv_timeout(WAIT).expect("B's backend pid");
                        // B has read, or waits for the lock A holds.
                        for _ in 0..800 {
                            if b_has_read.try_recv().is_ok() {
                                return;
                            }
                            let waiting: Option<i32> = scalar::<Nullable<Integer>, _>(
                                &mut watcher.lock().unwrap(),
                                &format!(
                                    "(SELECT pid FROM pg_stat_activity WHERE pid = {pid} \
                                     AND wait_event_type = 'Lock')"
                                ),
                            )
                            .unwrap();
                            if waiting.is_some() {
                                return;
                            }
                            std::thread::sleep(Duration::from_millis(25));
                        }
                        panic!("B neither read nor waited for A's lock");
                    },
                )
            });
            a_done.send(()).unwrap();
            result
        });
        let b = scope.spawn(move || {
            a_has_read.recv_timeout(WAIT).expect("A read first");
            retrier.build_transaction().run(pool, |conn| {
                b_pid.send(backend_pid(conn)).unwrap();
                read_then_write(
                    conn,
                    (ids[0], ids[2], 100),
                    locking,
                    &|| {
                        let _ = b_read.send(());
                    },
                    &|| a_committed.recv_timeout(WAIT).expect("A committed"),
                )
            })
        });
        let (a, b) = (a.join().unwrap(), b.join().unwrap());
        assert_eq!(a.expect("A commits").attempts(), 1);
        assert_eq!(b.expect("B commits").attempts(), 1);
    });
    let total = db.accounts().iter().map(|(_, b)| b).sum::<i64>();
    (total, 3 * OPENING)
}

#[test]
fn without_the_locking_read_read_committed_loses_an_update() {
    let (total, opening) = two_transfers(false);
    // B wrote the source as it was before A's withdrawal: A's 100 reappear.
    assert_eq!(total, opening + 100, "the negative control must break");
}

#[test]
fn with_the_locking_read_read_committed_keeps_the_total() {
    let (total, opening) = two_transfers(true);
    assert_eq!(total, opening);
}

#[test]
fn the_main_job_at_read_committed_locks_what_it_reads_and_tells_the_same_story() {
    let db = TestDb::migrated();
    let out = bank(&[
        "--database-url",
        &db.url_string(),
        "--isolation",
        "read-committed",
        "-v",
    ]);
    assert_ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let sql: Vec<&str> = stderr
        .lines()
        .filter_map(|line| line.split_once("bank::sql: ").map(|(_, sql)| sql))
        .collect();
    let begins: Vec<&&str> = sql.iter().filter(|s| s.starts_with("BEGIN")).collect();
    assert_eq!(begins.len(), 3, "one transaction a phase: {sql:?}");
    for begin in begins {
        assert!(
            begin.starts_with("BEGIN ISOLATION LEVEL READ COMMITTED;"),
            "{begin}"
        );
    }
    // The transfer's read locks both rows, in id order.
    assert!(
        sql.iter()
            .any(|s| s.starts_with("SELECT")
                && s.contains("ORDER BY \"accounts\".\"id\" FOR UPDATE")),
        "{sql:?}"
    );
    // Asked once, and PostgreSQL runs what was asked: no warning.
    assert_eq!(
        sql.iter()
            .filter(|s| s.starts_with("SHOW transaction_isolation"))
            .count(),
        1,
        "{sql:?}"
    );
    assert!(!stderr.contains("was asked for"), "{stderr}");
    let story = crate::main_job::parse(&lines(&out.stdout), 100, 5);
    crate::main_job::check_story(&db, &story);
}

/// One workload at `level`: 8 workers on 4 accounts, a fixed count of
/// transfers; returns its JSON report.
fn contended_workload(level: &str) -> serde_json::Value {
    let db = TestDb::migrated();
    let args = workload_args(
        &db.url_string(),
        &["--isolation", level],
        8,
        4,
        &["--transfers", "600", "--json", "--seed", "19"],
    );
    let out = bank(&strs(&args));
    assert_ok(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["invariant_ok"], true, "{level}: {report}");
    assert_eq!(report["failed"], 0, "{level}: {report}");
    report
}

#[test]
fn under_contention_read_committed_keeps_the_invariant_with_a_tenth_of_the_retries() {
    let serializable = contended_workload("serializable");
    let read_committed = contended_workload("read-committed");
    let retries = |r: &serde_json::Value| r["retries"].as_u64().unwrap();
    eprintln!(
        "retries on 4 accounts, 8 workers, 600 transfers: serializable {}, read committed {}",
        retries(&serializable),
        retries(&read_committed)
    );
    // Eight workers on four accounts conflict all the time under
    // SERIALIZABLE; under READ COMMITTED the row locks queue them instead.
    assert!(retries(&serializable) > 0, "{serializable}");
    assert!(
        retries(&read_committed) * 10 <= retries(&serializable),
        "{read_committed} against {serializable}"
    );
}
