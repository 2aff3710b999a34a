//! Bad input: one clear line on stderr, a non-zero exit, no panic, no
//! password, and nothing written.

use std::net::TcpListener;

use crate::helpers::*;

const SENTINEL: &str = "sentinel-Pa55word";

/// Runs the binary and checks the common promises; returns stderr's line.
fn fails(args: &[&str]) -> String {
    let out = bank(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success(), "{args:?} succeeded: {stdout}");
    assert_ne!(out.status.code(), Some(101), "{args:?} panicked: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        stderr.lines().count(),
        1,
        "{args:?}: not one line:\n{stderr}"
    );
    assert!(stderr.starts_with("bank: "), "{stderr}");
    assert!(
        !stderr.contains(SENTINEL) && !stdout.contains(SENTINEL),
        "password leaked: {stderr}"
    );
    let message = stderr.trim_end().trim_start_matches("bank: ");
    assert!(
        message.starts_with(|c: char| !c.is_uppercase()),
        "starts lowercase: {message}"
    );
    assert!(!message.ends_with('.'), "no trailing period: {message}");
    stderr
}

#[test]
fn a_refused_connection_is_one_line_without_the_password() {
    let (_reserved, port) = refusing_port();
    let url = format!("postgresql://app:{SENTINEL}@127.0.0.1:{port}/bank");
    let line = fails(&["--database-url", &url]);
    assert!(line.contains("connection refused"), "{line}");
    assert!(line.contains("app@127.0.0.1"), "names the target: {line}");
}

#[test]
fn a_connection_error_keeps_the_drivers_error_as_its_source() {
    let (_reserved, port) = refusing_port();
    let url = bank::db::DbUrl::parse(&format!("postgresql://app@127.0.0.1:{port}/bank")).unwrap();
    let Err(err) = bank::db::establish(&url) else {
        panic!("connected to a refusing port");
    };
    assert!(err.to_string().contains("connection refused"), "{err}");
    let source = std::error::Error::source(&err).expect("a source");
    assert!(
        source.to_string().contains("Connection refused"),
        "{source}"
    );
}

#[test]
fn an_unknown_host_is_named() {
    let url = format!("postgresql://app:{SENTINEL}@no-such-host.invalid:26257/bank");
    let line = fails(&["--database-url", &url]);
    assert!(
        line.contains("unknown host (tried no-such-host.invalid:26257)"),
        "{line}"
    );
}

#[test]
fn a_malformed_url_says_what_a_url_looks_like() {
    for url in [
        format!("postgres//app:{SENTINEL}@h/db"),
        format!("mysql://app:{SENTINEL}@h/db"),
        String::new(),
    ] {
        let line = fails(&["--database-url", &url]);
        assert!(line.contains("expected postgresql://"), "{line}");
    }
}

#[test]
fn a_missing_url_says_where_to_set_it() {
    let line = fails(&[]);
    assert!(
        line.contains("set database_url") || line.contains("DATABASE_URL"),
        "{line}"
    );
}

#[test]
fn a_missing_table_names_the_three_ways_to_create_it() {
    let db = TestDb::empty();
    let line = fails(&["--database-url", &db.url_string()]);
    assert!(
        line.contains(r#"table "accounts" does not exist"#),
        "{line}"
    );
    for way in ["diesel migration run", "dbinit.sql", "bank migrate"] {
        assert!(line.contains(way), "{way} missing from: {line}");
    }
}

#[test]
fn impossible_counts_are_refused_before_anything_is_written() {
    let db = TestDb::migrated();
    let url = db.url_string();
    let not_whole = |n: &str| {
        format!("bank: invalid value '{n}' for '--accounts <N>': must be a whole number (see bank --help)")
    };
    // clap reads a whole number; the plan checks its range, once, and the
    // command line names the flag.
    let out_of_range = |n: &str| {
        format!(
            "bank: --accounts {n} is out of range: it must be between 2 (the transfer needs two \
             accounts) and 100000000 (every id is kept in memory)"
        )
    };
    let cases: [(&[&str], String); 12] = [
        (&["--accounts", "0"], out_of_range("0")),
        (&["--accounts", "-5"], not_whole("-5")),
        (&["--accounts", "1"], out_of_range("1")),
        (
            &["--accounts", "18446744073709551615"],
            out_of_range("18446744073709551615"),
        ),
        (
            &["--accounts", "10000000000", "-q"],
            out_of_range("10000000000"),
        ),
        (&["--accounts", "many"], not_whole("many")),
        (
            &["--delete", "0"],
            "bank: --delete 0 is out of range: it must be between 1 and the 100 accounts created"
                .to_owned(),
        ),
        (
            &["--accounts", "5", "--delete", "6"],
            "bank: --delete 6 is out of range: it must be between 1 and the 5 accounts created"
                .to_owned(),
        ),
        (
            &["--tx-deadline", "-5"],
            "bank: invalid value '-5' for '--tx-deadline <SECONDS>': must be more than 0 and at \
             most 86400 seconds, like 30, 0.5, 30s or 500ms (see bank --help)"
                .to_owned(),
        ),
        (
            &["--isolation", "bogus"],
            "bank: invalid value 'bogus' for '--isolation <LEVEL>' [possible values: \
             serializable, read-committed] (see bank --help)"
                .to_owned(),
        ),
        (
            &["workload", "--isolation", "repeatable-read"],
            "bank: invalid value 'repeatable-read' for '--isolation <LEVEL>' [possible values: \
             serializable, read-committed] (see bank --help)"
                .to_owned(),
        ),
        (
            &["--max-retries", "-1"],
            "bank: invalid value '-1' for '--max-retries <N>': must be a whole number from 0 to \
             4294967294 (see bank --help)"
                .to_owned(),
        ),
    ];
    for (args, expected) in cases {
        let mut all = vec!["--database-url", &url];
        all.extend_from_slice(args);
        let out = bank(&all);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let line = fails(&all);
        assert_eq!(line.trim_end(), expected, "{args:?}");
    }
    assert_eq!(db.count("accounts"), 0, "nothing was written");
}

#[test]
fn a_server_that_never_answers_times_out_with_a_clear_line() {
    // The kernel completes the TCP handshake for the backlog, but nothing
    // ever answers the startup message: libpq's connect_timeout must end it.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let url = format!("postgresql://app:{SENTINEL}@127.0.0.1:{port}/bank?connect_timeout=2");
    let line = fails(&["--database-url", &url]);
    assert!(line.contains("timed out"), "{line}");
    drop(silent);
}
