//! The main job through the binary, with faults injected with PL/pgSQL, and
//! the command line's refusal of the savepoint protocol on PostgreSQL.

use crate::helpers::*;
use crate::main_job::{check_story, parse};

#[test]
fn a_retried_phase_is_logged_with_its_cause_and_printed_once() {
    let db = TestDb::with_faults();
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
        retried.contains(
            "tx{server=PostgreSql protocol=Restart isolation=\"SERIALIZABLE\"}:tx_attempt{attempt=1 retry_cause=conflict}"
        ),
        "{retried}"
    );
    assert!(
        retried.contains("error=\"injected fault 1 of 1\""),
        "{retried}"
    );
    assert!(
        retried.contains("sleep_ms=0"),
        "the first retry is immediate: {retried}"
    );
    assert!(
        stderr.contains(
            "tx_attempt{attempt=2}: bank::sql: SET LOCAL statement_timeout = 20000; COMMIT"
        ),
        "{stderr}"
    );
}

#[test]
fn an_ambiguous_transfer_commit_is_one_line_saying_ambiguous() {
    let db = TestDb::with_faults();
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

#[test]
fn the_command_line_refuses_the_savepoint_protocol_on_postgresql() {
    let db = TestDb::migrated();
    for command in [&[][..], &["workload", "--transfers", "5"][..]] {
        let out = bank_cmd(tempdir().path())
            .args([
                "--database-url",
                &db.url_string(),
                "--protocol",
                "savepoint",
            ])
            .args(command)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{command:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            stderr.trim_end(),
            "bank: --protocol savepoint needs CockroachDB, and this server is PostgreSQL; \
             use --protocol restart or auto",
            "{command:?}"
        );
        assert!(out.stdout.is_empty(), "{command:?}");
    }
    assert_eq!(db.count("accounts"), 0, "nothing was written");
}
