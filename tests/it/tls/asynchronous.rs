//! The async front end over TLS, from the same libpq-style URL: verified
//! against the test's CA, with a client certificate as in CockroachDB's
//! secure cluster, and each failure in the words the blocking front end
//! uses.
//!
//! Two views of each case: the `bank` binary, where a failed async start
//! falls back to the blocking start-up (so its stderr must equal the sync
//! run's), and the async connector on its own, which must refuse the same
//! URLs by itself, in the same words, and use TLS when it connects.

use std::process::Output;

use diesel::sql_types::{Bool, Text};
use diesel::QueryableByName;
use diesel_async::RunQueryDsl;

use super::fixture::{misconfigurations, TlsDb, SENTINEL};
use crate::helpers::*;
use bank::db::asynch::AsyncConnector;
use bank::db::DbUrl;

#[derive(QueryableByName)]
struct Session {
    #[diesel(sql_type = Bool)]
    ssl: bool,
    #[diesel(sql_type = Text)]
    client_dn: String,
}

/// Connects to `url` with the async connector alone: this session's TLS
/// status and client certificate's name, or the one-line failure.
fn connect_async(url: &str) -> Result<(bool, String), String> {
    let url = DbUrl::parse(url).unwrap();
    let connector = AsyncConnector::new(&url)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut conn = connector.connect().await.map_err(|err| err.to_string())?;
        let session: Session = diesel::sql_query(
            "SELECT ssl, coalesce(client_dn, '') AS client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        )
        .get_result(&mut conn)
        .await
        .map_err(|err| err.to_string())?;
        Ok((session.ssl, session.client_dn))
    })
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs the main job on `url`, sync and then async: both outcomes.
fn both_front_ends(url: &str) -> [Output; 2] {
    [
        bank(&["--database-url", url, "--accounts", "6", "--delete", "1"]),
        bank(&[
            "--database-url",
            url,
            "--accounts",
            "6",
            "--delete",
            "1",
            "--async",
        ]),
    ]
}

#[test]
fn the_async_front_end_verifies_the_server_and_names_each_failure_as_the_sync_one_does() {
    let db = TlsDb::new();
    let out = bank(&["--database-url", &db.url(), "--async"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(lines(&out.stdout).len(), 115);
    assert_eq!(db.admin_sql("SELECT count(*) FROM accounts"), "95");
    assert_eq!(connect_async(&db.url()), Ok((true, String::new())));

    // The blocking tests' cases, and a chain checked without the name.
    let mut cases = misconfigurations(&db);
    cases.push((
        db.url_with(
            "localhost",
            SENTINEL,
            &format!(
                "sslmode=verify-ca&sslrootcert={}",
                db.server.file("other-ca.crt")
            ),
        ),
        "certificate could not be verified",
    ));
    for (url, expected) in &cases {
        let [sync, asynchronous] = both_front_ends(url);
        assert_eq!(sync.status.code(), Some(1), "{url}: {}", stderr(&sync));
        assert_eq!(
            asynchronous.status.code(),
            Some(1),
            "{url}: {}",
            stderr(&asynchronous)
        );
        assert_eq!(stderr(&asynchronous), stderr(&sync), "{expected}");
        assert_eq!(stderr(&sync).lines().count(), 1, "{}", stderr(&sync));
        assert!(
            stderr(&sync).contains(expected),
            "{expected}: {}",
            stderr(&sync)
        );
        assert!(!stderr(&sync).contains(SENTINEL), "{}", stderr(&sync));

        let refused = connect_async(url).expect_err(expected);
        assert!(
            refused.contains(expected),
            "async connector: {expected}: {refused}"
        );
        assert!(!refused.contains(SENTINEL), "{refused}");
    }
    // Verifying the chain without the name accepts the address the
    // certificate does not list, on both front ends.
    let by_address = db.url_with(
        "127.0.0.1",
        SENTINEL,
        &format!("sslmode=verify-ca&sslrootcert={}", db.server.ca()),
    );
    for out in both_front_ends(&by_address) {
        assert!(out.status.success(), "{}", stderr(&out));
    }
    assert_eq!(connect_async(&by_address), Ok((true, String::new())));
}

#[test]
fn a_client_certificate_admits_the_user_on_both_front_ends() {
    let db = TlsDb::new();
    let server = db.server;
    let with_cert = |client: &str| {
        format!(
            "postgresql://certroach@localhost:{}/{}?sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
            server.port,
            db.name,
            server.ca(),
            server.file(&format!("{client}.crt")),
            server.file(&format!("{client}.key")),
        )
    };
    for out in both_front_ends(&with_cert("client")) {
        assert!(out.status.success(), "{}", stderr(&out));
    }
    assert_eq!(db.admin_sql("SELECT count(*) FROM accounts"), "10");
    assert_eq!(
        connect_async(&with_cert("client")),
        Ok((true, "/CN=certroach".to_owned()))
    );

    // A certificate another CA signed is refused, in the same words.
    let [sync, asynchronous] = both_front_ends(&with_cert("other-client"));
    assert_eq!(sync.status.code(), Some(1), "{}", stderr(&sync));
    assert_eq!(stderr(&asynchronous), stderr(&sync));
    assert_eq!(stderr(&sync).lines().count(), 1, "{}", stderr(&sync));
    let refused = connect_async(&with_cert("other-client")).unwrap_err();
    println!("sync: {}async connector: {refused}", stderr(&sync));
    assert!(
        stderr(&sync).contains("the server did not accept the client certificate"),
        "{}",
        stderr(&sync)
    );
    assert!(
        refused.contains("the server did not accept the client certificate"),
        "{refused}"
    );

    // No certificate at all: the server says what it wanted.
    let without = format!(
        "postgresql://certroach@localhost:{}/{}?sslmode=verify-full&sslrootcert={}",
        server.port,
        db.name,
        server.ca()
    );
    let [sync, asynchronous] = both_front_ends(&without);
    assert_eq!(sync.status.code(), Some(1), "{}", stderr(&sync));
    assert_eq!(stderr(&asynchronous), stderr(&sync));
    let refused = connect_async(&without).unwrap_err();
    println!("sync: {}async connector: {refused}", stderr(&sync));
    assert!(
        refused.contains("only with a client certificate"),
        "{refused}"
    );
    assert!(
        stderr(&sync).contains("only with a client certificate"),
        "{}",
        stderr(&sync)
    );
}
