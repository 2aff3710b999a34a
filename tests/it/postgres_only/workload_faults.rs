//! The workload through the binary against a database with a "bug" made
//! with PL/pgSQL.

use crate::helpers::*;

#[test]
fn a_broken_invariant_fails_the_workload() {
    let db = TestDb::migrated();
    // A "bug" in the database: every balance update loses one unit.
    db.exec(
        "CREATE FUNCTION skim() RETURNS trigger AS $$
         BEGIN NEW.balance := NEW.balance - 1; RETURN NEW; END $$ LANGUAGE plpgsql;
         CREATE TRIGGER skim BEFORE UPDATE ON accounts FOR EACH ROW EXECUTE FUNCTION skim()",
    );
    let args = workload_args(
        &db.url_string(),
        &[],
        2,
        5,
        &["--transfers", "10", "--json"],
    );
    let out = bank(&strs(&args));
    assert!(!out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["invariant_ok"], false);
    assert_eq!(
        report["total_before"].as_i64().unwrap() - report["total_after"].as_i64().unwrap(),
        2 * report["committed"].as_i64().unwrap(),
        "two rows skimmed per committed transfer"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("bank: invariant broken: total balance"),
        "{stderr}"
    );
}

#[test]
fn workers_the_server_refuses_are_counted_not_hidden() {
    let db = TestDb::migrated();
    // A role the server lets in twice: the pool's first connection and one
    // more; the third and fourth workers are refused.
    let role = format!("limited_{}", db.name);
    db.exec(&format!(
        "CREATE ROLE {role} LOGIN CONNECTION LIMIT 2;
         GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE accounts TO {role};
         GRANT SELECT, INSERT ON TABLE transfers TO {role}"
    ));
    let url = db
        .url_string()
        .replacen("://postgres@", &format!("://{role}@"), 1);
    assert!(
        url.contains(&role),
        "the test URL names user postgres: {url}"
    );
    let out = bank(&[
        "--database-url",
        &url,
        // The refused workers' checkouts give up after 1 s (15 s in
        // production).
        "--pool-timeout",
        "1",
        "workload",
        "--workers",
        "4",
        "--accounts",
        "10",
        "--transfers",
        "50",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("too many clients: {report}; stderr: {stderr}");
    assert_eq!(report["workers"], 4, "{report}");
    assert_eq!(report["unconnected_workers"], 2, "{report}");
    assert_eq!(
        report["committed"].as_u64().unwrap() + report["rejected"].as_u64().unwrap(),
        50
    );
    assert_eq!(report["invariant_ok"], true, "{report}");
    assert!(
        stderr.contains("2 of 4 workers got no connection and do not run")
            && stderr.contains(&format!("too many connections for role \"{role}\"")),
        "{stderr}"
    );
}
