//! The three ways to create the schema, alone and after one another.

use std::process::Command;

use bank::db;
use diesel::prelude::*;
use diesel::sql_types::Text;

use crate::helpers::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    DieselCli,
    DbInit,
    Migrate,
}

const PATHS: [Path; 3] = [Path::DieselCli, Path::DbInit, Path::Migrate];

fn apply(db: &TestDb, path: Path) {
    match path {
        Path::DieselCli => diesel_cli(db, &["migration", "run"]),
        Path::DbInit => {
            // psql is PostgreSQL's client; on CockroachDB the README's
            // `cockroach sql --url ... < dbinit.sql` does the same.
            let status = match db.server {
                diesel_tx_retry::Server::PostgreSql => Command::new("psql")
                    // Running it a second time only draws an "already exists" NOTICE.
                    .env("PGOPTIONS", "-c client_min_messages=warning")
                    .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-f"])
                    .arg(repo_root().join("dbinit.sql"))
                    .arg(db.url_string())
                    .status(),
                _ => Command::new("cockroach")
                    .args(["sql", "--url", &db.url_string(), "--file"])
                    .arg(repo_root().join("dbinit.sql"))
                    .status(),
            };
            assert!(
                status.expect("run the SQL client").success(),
                "dbinit.sql failed"
            );
        }
        Path::Migrate => {
            let out = bank(&["--database-url", &db.url_string(), "migrate"]);
            assert_ok(&out);
        }
    }
}

fn diesel_cli(db: &TestDb, args: &[&str]) {
    let out = run_diesel_cli(&db.url_string(), &repo_root().join("migrations"), args);
    assert!(
        out.status.success(),
        "diesel {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[derive(QueryableByName, Debug)]
struct Line {
    #[diesel(sql_type = Text)]
    line: String,
}

/// The two tables (accounts and the transfers ledger) as information_schema
/// describes them: columns with types and nullability, constraints with
/// their kinds and check clauses.
pub(crate) fn describe(db: &TestDb) -> Vec<String> {
    let sql = "
        SELECT table_name || ' column ' || column_name || ' ' || data_type || ' nullable=' || is_nullable AS line
          FROM information_schema.columns
         WHERE table_schema = current_schema() AND table_name IN ('accounts', 'transfers')
        UNION ALL
        SELECT tc.table_name || ' constraint ' || tc.constraint_name || ' ' || tc.constraint_type
               || COALESCE(' ' || cc.check_clause, '') AS line
          FROM information_schema.table_constraints tc
          LEFT JOIN information_schema.check_constraints cc
                 ON cc.constraint_schema = tc.constraint_schema AND cc.constraint_name = tc.constraint_name
         WHERE tc.table_schema = current_schema() AND tc.table_name IN ('accounts', 'transfers')
           -- PostgreSQL lists NOT NULL as checks too; nullability is above.
           AND COALESCE(cc.check_clause, '') NOT LIKE '%IS NOT NULL%'
        ORDER BY line";
    diesel::sql_query(sql)
        .load::<Line>(&mut db.conn())
        .unwrap()
        .into_iter()
        .map(|l| l.line)
        .collect()
}

pub(crate) fn expected() -> Vec<String> {
    [
        "accounts column balance bigint nullable=NO",
        "accounts column id uuid nullable=NO",
        "accounts constraint accounts_pkey PRIMARY KEY",
        "accounts constraint balance_non_negative CHECK ((balance >= 0))",
        "transfers column amount bigint nullable=NO",
        "transfers column created_at timestamp with time zone nullable=NO",
        "transfers column from_id uuid nullable=NO",
        "transfers column id uuid nullable=NO",
        "transfers column to_id uuid nullable=NO",
        "transfers constraint amount_non_negative CHECK ((amount >= 0))",
        "transfers constraint transfers_pkey PRIMARY KEY",
    ]
    .map(String::from)
    .to_vec()
}

#[test]
fn every_path_creates_the_same_table() {
    for path in PATHS {
        let db = TestDb::empty();
        apply(&db, path);
        assert_eq!(describe(&db), expected(), "{path:?}");
    }
}

#[test]
fn any_path_after_any_other_succeeds_and_changes_nothing() {
    for first in PATHS {
        for second in PATHS {
            let db = TestDb::empty();
            apply(&db, first);
            apply(&db, second);
            assert_eq!(describe(&db), expected(), "{first:?} then {second:?}");
        }
    }
}

#[test]
fn migrate_twice_is_a_no_op() {
    let db = TestDb::empty();
    let run = || {
        let out = bank(&["--database-url", &db.url_string(), "migrate"]);
        assert_ok(&out);
        lines(&out.stdout)
    };
    assert_eq!(
        run(),
        vec![
            "Applied migration 20261121000000.",
            "Applied migration 20261202000000."
        ]
    );
    assert_eq!(run(), vec!["Schema is up to date."]);
    assert_eq!(describe(&db), expected());
}

#[test]
fn the_migration_goes_down_and_up_again() {
    let db = TestDb::migrated();
    db.exec("INSERT INTO accounts VALUES ('00000000-0000-4000-8000-000000000000', 1)");
    diesel_cli(&db, &["migration", "redo", "--all"]);
    assert_eq!(describe(&db), expected());
    assert_eq!(
        db.count("accounts"),
        0,
        "down dropped the table, up created it empty"
    );
    diesel_cli(&db, &["migration", "revert", "--all"]);
    assert_eq!(
        db::inspect(&mut db.conn()).unwrap().accounts,
        db::AccountsTable::Missing
    );
    assert!(
        db::run_migrations(&mut db.conn()).unwrap().len() == 2,
        "migrate brings it back"
    );
    assert_eq!(describe(&db), expected());
}

#[test]
fn the_start_up_check_is_one_cheap_query_on_the_apps_own_tables_only() {
    // The app's own tables, from either path: the quick query answers.
    for path in [Path::Migrate, Path::DbInit] {
        let db = TestDb::empty();
        apply(&db, path);
        let quick = db::inspect_quickly(&mut db.conn()).unwrap();
        assert_eq!(
            quick.map(|i| (i.accounts, i.ledger, i.shape)),
            Some((db::AccountsTable::Ready, true, None)),
            "{path:?}"
        );
    }
    // No tables: the quick query fails on the name, the whole inspection
    // says which is missing.
    let db = TestDb::empty();
    assert!(db::inspect_quickly(&mut db.conn()).is_err());
    assert_eq!(
        db::inspect(&mut db.conn()).unwrap().accounts,
        db::AccountsTable::Missing
    );
    // A table made elsewhere (no constraint of the app's): compared whole.
    // One statement each: CockroachDB runs DDL in implicit transactions of
    // one statement.
    db.exec("CREATE TABLE accounts (id UUID PRIMARY KEY, balance INT8)");
    db.exec(
        "CREATE TABLE transfers (id UUID PRIMARY KEY, from_id UUID NOT NULL, to_id UUID NOT NULL, \
         amount INT8 NOT NULL, created_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    );
    assert_eq!(db::inspect_quickly(&mut db.conn()).unwrap(), None);
    let whole = db::inspect(&mut db.conn()).unwrap();
    assert_eq!(whole.accounts, db::AccountsTable::Ready);
    assert!(whole.shape.is_some());
}

#[test]
fn schema_rs_is_what_diesel_print_schema_generates() {
    let db = TestDb::migrated();
    let workdir = tempdir();
    let out = Command::new("diesel")
        .args(["print-schema", "--database-url", &db.url_string()])
        .current_dir(workdir.path())
        .output()
        .unwrap();
    assert_ok(&out);
    let committed = std::fs::read_to_string(repo_root().join("src/schema.rs")).unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim_end(),
        committed.trim_end()
    );
}

#[test]
fn dbinit_sql_holds_the_migrations_statements_in_order() {
    let strip = |text: &str| -> String {
        text.lines()
            .filter(|l| !l.trim_start().starts_with("--"))
            .collect::<Vec<_>>()
            .join("\n")
            .trim()
            .to_owned()
    };
    let dbinit = std::fs::read_to_string(repo_root().join("dbinit.sql")).unwrap();
    let mut dirs: Vec<_> = std::fs::read_dir(repo_root().join("migrations"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    dirs.sort();
    assert_eq!(dirs.len(), 2, "{dirs:?}");
    let ups: Vec<String> = dirs
        .iter()
        .map(|dir| strip(&std::fs::read_to_string(dir.join("up.sql")).unwrap()))
        .collect();
    assert_eq!(strip(&dbinit), ups.join("\n"));
}

/// Starts `bank migrate` on `db` without waiting for it.
pub(crate) fn spawn_migrate(db: &TestDb, workdir: &std::path::Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_bank"))
        .current_dir(workdir)
        .env_remove("DATABASE_URL")
        .args(["--database-url", &db.url_string(), "migrate"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start bank migrate")
}

#[test]
fn five_concurrent_migrations_on_a_fresh_database_all_succeed() {
    // Replicas that migrate at deploy time race like this. A few free
    // rounds, on any server; postgres_only::migration_races makes every
    // racer lose a race for certain.
    let workdir = tempdir();
    for round in 1..=4 {
        let db = TestDb::empty();
        let children: Vec<_> = (0..5).map(|_| spawn_migrate(&db, workdir.path())).collect();
        // Each migration applied by exactly one of them (one may apply the
        // first and another the second).
        let mut applied = std::collections::BTreeMap::<String, u32>::new();
        for child in children {
            let out = child.wait_with_output().unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "round {round}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            for line in stdout.lines() {
                match line {
                    "Schema is up to date." => {}
                    l if l.starts_with("Applied migration ") => {
                        *applied.entry(l.to_owned()).or_default() += 1
                    }
                    other => panic!("round {round}: unexpected output {other:?}"),
                }
            }
        }
        assert_eq!(
            applied.into_iter().collect::<Vec<_>>(),
            vec![
                ("Applied migration 20261121000000.".to_owned(), 1),
                ("Applied migration 20261202000000.".to_owned(), 1)
            ],
            "round {round}: each applied by exactly one"
        );
        assert_eq!(describe(&db), expected(), "round {round}");
    }
}

#[test]
fn migrate_beside_diesel_migration_run_succeeds() {
    let workdir = tempdir();
    let mut diesel_failures = 0;
    for round in 1..=4 {
        let db = TestDb::empty();
        let ours = spawn_migrate(&db, workdir.path());
        let theirs = Command::new("diesel")
            .args([
                "migration",
                "run",
                "--database-url",
                &db.url_string(),
                "--migration-dir",
            ])
            .arg(repo_root().join("migrations"))
            .current_dir(workdir.path())
            .output()
            .expect("diesel CLI on PATH (./dev test installs it)");
        let ours = ours.wait_with_output().unwrap();
        assert!(
            ours.status.success(),
            "round {round}: {}",
            String::from_utf8_lossy(&ours.stderr)
        );
        // diesel CLI has no retry of its own: when it loses the race it
        // fails, and the schema is right all the same.
        diesel_failures += usize::from(!theirs.status.success());
        assert_eq!(describe(&db), expected(), "round {round}");
    }
    eprintln!("migrate beside diesel CLI: diesel CLI failed in {diesel_failures} of 4 rounds");
}

/// The Python tutorial's table: nullable, no check.
const PYTHON_TABLE: &str = "CREATE TABLE accounts (id UUID PRIMARY KEY, balance INT8)";
const PYTHON_DIFFERS: &str = "table \"accounts\" differs from what the app needs: balance is not \
     NOT NULL; no check keeps balance >= 0";
const PYTHON_FIX: &str = "fix it with: ALTER TABLE accounts ALTER COLUMN balance SET NOT NULL; \
     ALTER TABLE accounts ADD CONSTRAINT balance_non_negative CHECK (balance >= 0)";

#[test]
fn on_the_python_tutorials_table_migrate_says_it_kept_it_and_how_to_fix_it() {
    let db = TestDb::empty();
    db.exec(PYTHON_TABLE);
    db.exec("INSERT INTO accounts VALUES ('00000000-0000-4000-8000-000000000001', NULL)");
    let out = bank(&["--database-url", &db.url_string(), "migrate"]);
    assert_ok(&out);
    let stdout = lines(&out.stdout);
    assert_eq!(stdout.len(), 2, "{stdout:#?}");
    assert!(
        stdout[0].starts_with(
            "Applied migration 20261121000000: kept the existing table \"accounts\", made elsewhere \
             (the migration creates it only where none exists); "
        ),
        "{}",
        stdout[0]
    );
    assert!(stdout[0].contains(PYTHON_DIFFERS), "{}", stdout[0]);
    assert!(
        stdout[0].contains("(1 row holds a NULL balance, which this app never reads"),
        "{}",
        stdout[0]
    );
    assert!(
        stdout[0].ends_with(&format!("{PYTHON_FIX}.")),
        "{}",
        stdout[0]
    );
    assert_eq!(stdout[1], "Applied migration 20261202000000.");
    // Kept as it was: still nullable, and the row is there.
    assert_eq!(db.count("accounts"), 1);
    // Asked again, it still says so.
    let again = lines(&bank(&["--database-url", &db.url_string(), "migrate"]).stdout);
    assert!(again[0].starts_with("Schema is up to date, but table \"accounts\" differs"));
    // Once fixed as it says, the table is the app's.
    db.exec("UPDATE accounts SET balance = 0 WHERE balance IS NULL");
    db.exec(
        "ALTER TABLE accounts ALTER COLUMN balance SET NOT NULL; \
         ALTER TABLE accounts ADD CONSTRAINT balance_non_negative CHECK (balance >= 0)",
    );
    let fixed = lines(&bank(&["--database-url", &db.url_string(), "migrate"]).stdout);
    assert_eq!(fixed, vec!["Schema is up to date."]);
}

#[test]
fn on_the_python_tutorials_table_the_job_and_the_workload_warn_and_go_on() {
    let db = TestDb::empty();
    db.exec(PYTHON_TABLE);
    db.exec("INSERT INTO accounts VALUES ('00000000-0000-4000-8000-000000000001', NULL)");
    assert_ok(&bank(&["--database-url", &db.url_string(), "migrate"]));
    let out = bank(&["--database-url", &db.url_string()]);
    assert_ok(&out);
    crate::main_job::parse(&lines(&out.stdout), 100, 5);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(PYTHON_DIFFERS), "{stderr}");
    assert!(stderr.contains("(1 row holds a NULL balance"), "{stderr}");
    assert!(stderr.trim_end().ends_with(PYTHON_FIX), "{stderr}");
    let args = workload_args(
        &db.url_string(),
        &[],
        2,
        10,
        &["--transfers", "50", "--json"],
    );
    let out = bank(&strs(&args));
    assert_ok(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["invariant_ok"], true, "{report}");
    assert!(String::from_utf8_lossy(&out.stderr).contains(PYTHON_DIFFERS));
}

#[test]
fn a_table_the_app_cannot_use_is_refused_with_its_fix() {
    let db = TestDb::empty();
    db.exec(
        "CREATE TABLE accounts (id UUID PRIMARY KEY, balance INT4 NOT NULL CHECK (balance >= 0))",
    );
    let out = bank(&["--database-url", &db.url_string(), "migrate"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        one_line(&out).ends_with(
            "balance is integer, not INT8; fix it with: ALTER TABLE accounts ALTER COLUMN balance \
             TYPE INT8; the app cannot run on it until then"
        ),
        "{}",
        one_line(&out)
    );
    let out = bank(&["--database-url", &db.url_string()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "nothing written");
    assert!(one_line(&out).contains("ALTER TABLE accounts ALTER COLUMN balance TYPE INT8"));
    assert_eq!(db.count("accounts"), 0);
}
