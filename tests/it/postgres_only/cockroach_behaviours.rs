//! CockroachDB's documented behaviours that PostgreSQL lacks, played at the
//! wire by the proxy (`Proxy::emulating_cockroach`; each behaviour cites its
//! doc in `proxy::Cockroach`), so that the app meets them here: the schema
//! paths under `autocommit_before_ddl`, the main job, and a million-account
//! workload under the 16 MiB message limit. Each behaviour also has a
//! negative control that shows the proxy really plays it. PostgreSQL only:
//! the proxy makes its errors with a `DO` block.

use std::collections::BTreeMap;
use std::time::Instant;

use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};

use crate::helpers::*;
use crate::main_job::{check_story, parse};
use crate::schema::{describe, expected};
use testbed::proxy::Proxy;

/// The migration versions recorded, in order.
fn versions(db: &TestDb) -> Vec<String> {
    #[derive(QueryableByName)]
    struct Version {
        #[diesel(sql_type = Text)]
        version: String,
    }
    diesel::sql_query("SELECT version FROM __diesel_schema_migrations ORDER BY version")
        .load::<Version>(&mut db.conn())
        .unwrap_or_default()
        .into_iter()
        .map(|v| v.version)
        .collect()
}

const BOTH: [&str; 2] = ["20261121000000", "20261202000000"];

#[test]
fn a_migration_in_a_transaction_breaks_under_autocommit_before_ddl_as_cockroachdb_documents() {
    // The negative control: the repository's two migrations as they were,
    // run in a transaction each (no metadata.toml), through the proxy.
    let db = TestDb::empty();
    let proxy = Proxy::emulating_cockroach(db.tcp_addr()).unwrap();
    let migrations = tempdir();
    for entry in std::fs::read_dir(repo_root().join("migrations")).unwrap() {
        let from = entry.unwrap().path();
        let to = migrations.path().join(from.file_name().unwrap());
        std::fs::create_dir(&to).unwrap();
        for file in ["up.sql", "down.sql"] {
            std::fs::copy(from.join(file), to.join(file)).unwrap();
        }
    }
    let out = run_diesel_cli(
        &db.url_via(proxy.port()),
        migrations.path(),
        &["migration", "run"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("diesel migration run, transactional: {stderr}");
    assert!(!out.status.success());
    assert!(
        stderr.contains("Cannot perform this operation outside of a transaction"),
        "{stderr}"
    );
    // The DDL ran before the COMMIT that failed, and autocommitted the
    // version row with it; the second migration never ran.
    assert_eq!(proxy.autocommits(), 1);
    assert_eq!(versions(&db), [BOTH[0]]);
    assert_eq!(db.count("accounts"), 0);
    assert!(diesel::sql_query("SELECT 1 FROM transfers")
        .execute(&mut db.conn())
        .is_err());
}

#[test]
fn diesel_cli_migrate_and_dbinit_apply_the_schema_under_autocommit_before_ddl_in_every_order() {
    #[derive(Clone, Copy, Debug)]
    enum Path {
        DieselCli,
        Migrate,
        DbInit,
    }
    for order in [
        [Path::DieselCli, Path::Migrate],
        [Path::Migrate, Path::DieselCli],
        [Path::DbInit, Path::Migrate],
    ] {
        let db = TestDb::empty();
        let proxy = Proxy::emulating_cockroach(db.tcp_addr()).unwrap();
        let url = db.url_via(proxy.port());
        let mut said = Vec::new();
        for path in order {
            let out = match path {
                Path::DieselCli => {
                    run_diesel_cli(&url, &repo_root().join("migrations"), &["migration", "run"])
                }
                Path::Migrate => bank(&["--database-url", &url, "migrate"]),
                Path::DbInit => std::process::Command::new("psql")
                    .env("PGOPTIONS", "-c client_min_messages=warning")
                    .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-f"])
                    .arg(repo_root().join("dbinit.sql"))
                    .arg(&url)
                    .output()
                    .unwrap(),
            };
            assert!(
                out.status.success(),
                "{order:?}: {path:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            if let Path::Migrate = path {
                said = lines(&out.stdout);
            }
        }
        // bank migrate says exactly what it applied (after dbinit.sql,
        // that its first migration kept the table dbinit.sql made).
        let expected_lines: Vec<String> = match order[0] {
            Path::DieselCli => vec!["Schema is up to date.".into()],
            Path::Migrate => BOTH
                .iter()
                .map(|v| format!("Applied migration {v}."))
                .collect(),
            Path::DbInit => vec![
                format!(
                    "Applied migration {}: kept the existing table \"accounts\", made elsewhere, \
                     which is what the app needs.",
                    BOTH[0]
                ),
                format!("Applied migration {}.", BOTH[1]),
            ],
        };
        assert_eq!(said, expected_lines, "{order:?}");
        assert_eq!(describe(&db), expected(), "{order:?}");
        assert_eq!(versions(&db), BOTH, "{order:?}");
    }
}

#[test]
fn five_concurrent_migrations_under_autocommit_before_ddl_apply_each_migration_once() {
    let db = TestDb::empty();
    let proxy = Proxy::emulating_cockroach(db.tcp_addr()).unwrap();
    let url = db.url_via(proxy.port());
    let children: Vec<_> = (0..5)
        .map(|_| spawn_bank(&[], &["--database-url", &url, "migrate"]).0)
        .collect();
    let mut applied = BTreeMap::<String, u32>::new();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert_ok(&out);
        for line in lines(&out.stdout) {
            if let Some(version) = line.strip_prefix("Applied migration ") {
                *applied
                    .entry(version.trim_end_matches('.').to_owned())
                    .or_default() += 1;
            } else {
                assert_eq!(line, "Schema is up to date.");
            }
        }
    }
    let once: BTreeMap<String, u32> = BOTH.iter().map(|v| (v.to_string(), 1)).collect();
    assert_eq!(applied, once);
    assert_eq!(describe(&db), expected());
}

#[test]
fn the_main_job_through_cockroachdbs_behaviours_tells_the_story_the_table_holds() {
    let db = TestDb::migrated();
    let proxy = Proxy::emulating_cockroach(db.tcp_addr()).unwrap();
    let out = bank(&["--database-url", &db.url_via(proxy.port())]);
    assert_ok(&out);
    check_story(&db, &parse(&lines(&out.stdout), 100, 5));
    assert_eq!((proxy.autocommits(), proxy.refused()), (0, 0));
}

#[test]
fn a_message_over_16_mib_is_refused_with_08p01_and_the_session_goes_on() {
    // The negative control of the limit: one parameter of 17 MiB.
    let db = TestDb::migrated();
    let proxy = Proxy::emulating_cockroach(db.tcp_addr()).unwrap();
    let mut conn = PgConnection::establish(&db.url_via(proxy.port())).unwrap();
    let big = "x".repeat(17 << 20);
    let err = diesel::select(
        diesel::dsl::sql::<BigInt>("length(")
            .bind::<Text, _>(&big)
            .sql(")::INT8"),
    )
    .get_result::<i64>(&mut conn)
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "message size 17.0 MiB bigger than maximum allowed message size 16.0 MiB"
    );
    assert_eq!(proxy.refused(), 1);
    let small = "x".repeat(1 << 20);
    let length = diesel::select(
        diesel::dsl::sql::<BigInt>("length(")
            .bind::<Text, _>(&small)
            .sql(")::INT8"),
    )
    .get_result::<i64>(&mut conn)
    .unwrap();
    assert_eq!(length, 1 << 20);
}

#[test]
fn a_million_account_workload_under_the_message_limit_keeps_the_invariant() {
    let db = TestDb::migrated();
    let proxy = Proxy::emulating_cockroach(db.tcp_addr()).unwrap();
    let began = Instant::now();
    let args = workload_args(
        &db.url_via(proxy.port()),
        &[],
        4,
        1_000_000,
        &["--transfers", "2000", "--json"],
    );
    let out = bank(&strs(&args));
    assert_ok(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!(
        "a million accounts through the proxy in {:.1} s: {} committed, invariant_ok {}, {} messages refused",
        began.elapsed().as_secs_f64(),
        report["committed"],
        report["invariant_ok"],
        proxy.refused()
    );
    assert_eq!(report["invariant_ok"], true);
    assert_eq!(report["ledger"]["mismatched_accounts"], 0);
    assert_eq!(proxy.refused(), 0);
}
