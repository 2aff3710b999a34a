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
    let out = bank(&[
        "--database-url",
        &db.url_string(),
        "workload",
        "--workers",
        "2",
        "--accounts",
        "5",
        "--transfers",
        "10",
        "--json",
    ]);
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
