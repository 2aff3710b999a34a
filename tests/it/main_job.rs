//! The main job through the real binary: the exact lines of the tutorial,
//! and a database that holds exactly the story they tell.

use std::collections::BTreeMap;

use uuid::Uuid;

use crate::helpers::*;

/// What the output says happened, parsed strictly: any line out of place
/// fails the parse.
#[derive(Debug)]
pub(crate) struct Story {
    created: Vec<(Uuid, i64)>,
    before: [(Uuid, i64); 2],
    amount: i64,
    after: [(Uuid, i64); 2],
    deleted: Vec<Uuid>,
}

fn account_line(line: &str) -> (Uuid, i64) {
    let rest = line
        .strip_prefix("Account ")
        .unwrap_or_else(|| panic!("not an account line: {line}"));
    let (id, balance) = rest.split_once(": ").unwrap();
    (id.parse().unwrap(), balance.parse().unwrap())
}

pub(crate) fn parse(lines: &[String], accounts: usize, deleted: usize) -> Story {
    assert_eq!(lines.len(), 1 + accounts + 8 + 1 + deleted, "{lines:#?}");
    let mut it = lines.iter().map(String::as_str);
    let mut next = || it.next().unwrap();
    assert_eq!(next(), "Creating new accounts...");
    let created = (0..accounts)
        .map(|_| {
            let line = next();
            let rest = line
                .strip_prefix("Created new account with id ")
                .unwrap_or_else(|| panic!("{line}"));
            let (id, balance) = rest
                .strip_suffix('.')
                .unwrap()
                .split_once(" and balance ")
                .unwrap();
            (id.parse().unwrap(), balance.parse().unwrap())
        })
        .collect();
    assert_eq!(next(), "Random account balances:");
    let before = [account_line(next()), account_line(next())];
    let transferring = next();
    let rest = transferring.strip_prefix("Transferring ").unwrap();
    let (amount, rest) = rest.split_once(" from account ").unwrap();
    assert_eq!(
        rest,
        format!("{} to account {}...", before[0].0, before[1].0)
    );
    assert_eq!(next(), "Transfer complete.");
    assert_eq!(next(), "New balances:");
    let after = [account_line(next()), account_line(next())];
    assert_eq!(next(), "Deleting existing accounts...");
    let deleted = (0..deleted)
        .map(|_| {
            let line = next();
            line.strip_prefix("Deleted account ")
                .and_then(|r| r.strip_suffix('.'))
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    Story {
        created,
        before,
        amount: amount.parse().unwrap(),
        after,
        deleted,
    }
}

#[test]
fn the_default_job_prints_the_tutorial_lines_and_the_database_matches_them() {
    let db = TestDb::migrated();
    let out = bank(&["--database-url", &db.url_string()]);
    assert_ok(&out);
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let story = parse(&lines(&out.stdout), 100, 5);
    check_story(&db, &story);
}

/// The database holds exactly what the output says happened: the created
/// balances, the transfer applied once, the deleted accounts gone.
pub(crate) fn check_story(db: &TestDb, story: &Story) {
    let mut expected: BTreeMap<Uuid, i64> = story.created.iter().copied().collect();
    assert_eq!(expected.len(), 100, "ids are distinct");
    for (id, balance) in &story.created {
        assert_eq!(id.get_version_num(), 4, "{id}");
        assert!((0..1_000_000).contains(balance), "{balance}");
    }
    let ([from, to], [from_after, to_after]) = (story.before, story.after);
    assert_ne!(from.0, to.0, "two distinct accounts");
    assert_eq!(
        expected[&from.0], from.1,
        "the balance read is the one created"
    );
    assert_eq!(expected[&to.0], to.1);
    assert_eq!(story.amount, from.1 / 2, "floor(balance / 2)");
    assert_eq!(from_after, (from.0, from.1 - story.amount));
    assert_eq!(to_after, (to.0, to.1 + story.amount));
    expected.insert(from.0, from_after.1);
    expected.insert(to.0, to_after.1);

    let mut deleted = story.deleted.clone();
    deleted.sort();
    deleted.dedup();
    assert_eq!(deleted.len(), 5, "five distinct accounts");
    for id in &story.deleted {
        assert!(
            expected.remove(id).is_some(),
            "deleted {id} was created by this run"
        );
    }
    let in_db: Vec<(Uuid, i64)> = db.accounts();
    assert_eq!(in_db.len(), 95);
    assert_eq!(
        in_db,
        expected.into_iter().collect::<Vec<_>>(),
        "the database holds exactly the printed story"
    );
}

#[test]
fn the_same_seed_gives_the_same_story() {
    let run = || {
        let db = TestDb::migrated();
        let out = bank(&[
            "--database-url",
            &db.url_string(),
            "--seed",
            "7",
            "--accounts",
            "20",
            "--delete",
            "3",
        ]);
        assert_ok(&out);
        (lines(&out.stdout), db.accounts())
    };
    let (first, first_db) = run();
    let (second, second_db) = run();
    assert_eq!(first, second);
    assert_eq!(first_db, second_db);
    let story = parse(&first, 20, 3);
    assert_eq!(first_db.len(), 17);
    assert_eq!(story.deleted.len(), 3);
}

#[test]
fn every_account_may_be_deleted() {
    let db = TestDb::migrated();
    let out = bank(&[
        "--database-url",
        &db.url_string(),
        "--accounts",
        "2",
        "--delete",
        "2",
    ]);
    assert_ok(&out);
    parse(&lines(&out.stdout), 2, 2);
    assert_eq!(db.count("accounts"), 0);
}

#[test]
fn verbose_logs_statements_and_retries_on_stderr_only() {
    let db = TestDb::migrated();
    let out = bank(&["--database-url", &db.url_string(), "-v"]);
    assert_ok(&out);
    parse(&lines(&out.stdout), 100, 5);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("BEGIN ISOLATION LEVEL SERIALIZABLE"),
        "{stderr}"
    );
    assert!(stderr.contains("FOR UPDATE"), "{stderr}");
    assert!(stderr.contains("COMMIT"), "{stderr}");
}

/// The first words of a statement, as the statement-count test compares them.
fn head(sql: &str) -> String {
    if sql.split_whitespace().count() <= 3 {
        return sql.trim().to_owned();
    }
    let words: Vec<&str> = sql.split_whitespace().take(2).collect();
    let head = words.join(" ");
    if sql.ends_with("; COMMIT") {
        format!("{head} ...; COMMIT")
    } else if sql.contains("FOR UPDATE") {
        format!("{head} ... FOR UPDATE")
    } else {
        head
    }
}

/// The statements a run sent, as `-v` logs them.
fn statements(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter_map(|line| line.split_once("bank::sql: ").map(|(_, sql)| head(sql)))
        .collect()
}

const BEGIN: &str = "BEGIN ISOLATION";
/// The commit, after the statement bound again (for the time left), which
/// finds an aborted transaction out, in the same message.
const COMMIT: &str = "SET LOCAL ...; COMMIT";
const PHASES: [&[&str]; 3] = [
    &[BEGIN, "INSERT INTO", COMMIT],
    &[
        BEGIN,
        "SELECT \"accounts\".\"id\", ... FOR UPDATE",
        "WITH logged",
        COMMIT,
    ],
    &[BEGIN, "DELETE FROM", COMMIT],
];

#[test]
fn each_phase_sends_the_fewest_statements() {
    let db = TestDb::migrated();
    let out = bank(&["--database-url", &db.url_string(), "-v"]);
    assert_ok(&out);
    let expected: Vec<&str> = ["SELECT version(),"]
        .into_iter()
        .chain(PHASES.into_iter().flatten().copied())
        .collect();
    assert_eq!(statements(&String::from_utf8_lossy(&out.stderr)), expected);
}

#[test]
fn deletions_go_in_batches_like_creations_and_quiet_runs_print_one_line_for_them() {
    let db = TestDb::migrated();
    let out = bank(&[
        "--database-url",
        &db.url_string(),
        "--accounts",
        "25",
        "--delete",
        "25",
        "--rows-per-transaction",
        "10",
        "--quiet",
        "-v",
    ]);
    assert_ok(&out);
    let stdout = lines(&out.stdout);
    assert_eq!(stdout.len(), 12, "{stdout:#?}");
    assert_eq!(stdout[0], "Creating new accounts...");
    assert!(stdout[1].starts_with("Created 25 new accounts with balances totalling "));
    assert_eq!(stdout[2], "Random account balances:");
    assert_eq!(
        stdout[10..],
        ["Deleting existing accounts...", "Deleted 25 accounts."]
    );
    let sent = statements(&String::from_utf8_lossy(&out.stderr));
    let count = |head: &str| sent.iter().filter(|s| s.starts_with(head)).count();
    assert_eq!(count("INSERT INTO"), 3, "{sent:?}");
    assert_eq!(count("DELETE FROM"), 3, "batches of 10, 10 and 5: {sent:?}");
    assert_eq!(count(COMMIT), 3 + 1 + 3);
    assert_eq!(db.count("accounts"), 0);
}
