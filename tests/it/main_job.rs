//! The main job through the real binary: the exact lines of the tutorial,
//! and a database that holds exactly the story they tell.

use std::collections::BTreeMap;

use uuid::Uuid;

use crate::helpers::*;

/// What the output says happened, parsed strictly: any line out of place
/// fails the parse.
#[derive(Debug)]
struct Story {
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

fn parse(lines: &[String], accounts: usize, deleted: usize) -> Story {
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
fn check_story(db: &TestDb, story: &Story) {
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
fn a_retried_phase_is_logged_with_its_cause_and_printed_once() {
    let db = TestDb::migrated();
    db.install_faults();
    // The transfer's UPDATE meets a serialization failure once.
    db.exec(
        "CREATE FUNCTION conflict_once() RETURNS trigger AS $$
         BEGIN PERFORM fail_first(1, '40001'); RETURN NEW; END $$ LANGUAGE plpgsql;
         CREATE TRIGGER conflict_once BEFORE UPDATE ON accounts
         FOR EACH ROW EXECUTE FUNCTION conflict_once()",
    );
    let out = bank(&["--database-url", &db.url_string(), "-v"]);
    assert_ok(&out);
    let story = parse(&lines(&out.stdout), 100, 5);
    check_story(&db, &story);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let retried = stderr
        .lines()
        .find(|l| l.contains("retrying transaction"))
        .unwrap_or_else(|| panic!("no retry logged:\n{stderr}"));
    assert!(
        retried
            .contains("tx_attempt{attempt=1 protocol=Restart retry_cause=injected fault 1 of 1}"),
        "{retried}"
    );
    assert!(
        retried.contains("sleep_ms=0"),
        "the first retry is immediate: {retried}"
    );
    assert!(
        stderr.contains("tx_attempt{attempt=2 protocol=Restart}: bank::sql: COMMIT"),
        "{stderr}"
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

#[test]
fn an_ambiguous_transfer_commit_is_one_line_saying_ambiguous() {
    let db = TestDb::migrated();
    db.install_faults();
    // Kill the backend while the transfer commits: nobody can know whether it
    // committed, so the job must say so instead of retrying or claiming success.
    db.exec(
        "CREATE CONSTRAINT TRIGGER kill_at_commit AFTER UPDATE ON accounts
         DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION commit_fault('1000', 'terminate')",
    );
    let out = bank(&["--database-url", &db.url_string()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("bank: transferring funds: commit result is ambiguous"),
        "{stderr}"
    );
    let stdout = lines(&out.stdout);
    assert_eq!(
        stdout.len(),
        101,
        "accounts were created and printed; nothing about the transfer"
    );
    assert!(!stdout.iter().any(|l| l.contains("Transfer complete")));
}

/// The statements a run sent, as `-v` logs them: the first words of each.
fn statements(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter_map(|line| line.split_once("bank::sql: ").map(|(_, sql)| sql))
        .map(|sql| {
            let words: Vec<&str> = sql.split_whitespace().collect();
            let head = words.iter().take(2).copied().collect::<Vec<_>>().join(" ");
            if sql.contains("FOR UPDATE") {
                format!("{head} ... FOR UPDATE")
            } else {
                head
            }
        })
        .collect()
}

#[test]
fn each_phase_sends_the_fewest_statements() {
    let db = TestDb::migrated();
    let run = |protocol: &str| {
        let out = bank(&[
            "--database-url",
            &db.url_string(),
            "-v",
            "--protocol",
            protocol,
        ]);
        assert_ok(&out);
        statements(&String::from_utf8_lossy(&out.stderr))
    };
    let setup = ["SELECT version()", "SELECT EXISTS"];
    let begin = "BEGIN ISOLATION";
    let phases = [
        vec![begin, "INSERT INTO", "COMMIT"],
        vec![
            begin,
            "SELECT \"accounts\".\"id\", ... FOR UPDATE",
            "UPDATE accounts",
            "COMMIT",
        ],
        vec![begin, "DELETE FROM", "COMMIT"],
    ];
    let expected: Vec<String> = setup
        .iter()
        .chain(phases.iter().flatten())
        .map(|s| s.to_string())
        .collect();
    assert_eq!(run("restart"), expected);

    let savepoint: Vec<String> = setup
        .iter()
        .map(|s| s.to_string())
        .chain(phases.iter().flat_map(|phase| {
            let (first, rest) = phase.split_first().unwrap();
            let (last, middle) = rest.split_last().unwrap();
            [
                vec![*first, "SAVEPOINT cockroach_restart"],
                middle.to_vec(),
                vec!["RELEASE SAVEPOINT", *last],
            ]
            .concat()
            .into_iter()
            .map(str::to_owned)
        }))
        .collect();
    assert_eq!(run("savepoint"), savepoint);
}
