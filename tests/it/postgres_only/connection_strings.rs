//! Every form of connection string libpq accepts, through the binary against
//! the test server: each one runs the main job, and each failing one is one
//! line that names the hosts tried and never the password.

use diesel::sql_types::Text;

use crate::helpers::*;

const SENTINEL: &str = "e";

/// The test server's port and Unix socket directory.
fn server(db: &TestDb) -> (String, String) {
    let mut conn = db.conn();
    let port = scalar::<Text, String>(&mut conn, "current_setting('port')").unwrap();
    let dirs =
        scalar::<Text, String>(&mut conn, "current_setting('unix_socket_directories')").unwrap();
    let dir = dirs.split(',').next().unwrap().trim().to_owned();
    (port, dir)
}

fn percent_encoded(path: &str) -> String {
    path.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn every_form_libpq_accepts_runs_the_job() {
    let (_reserved, refusing) = refusing_port();
    let probe = TestDb::migrated();
    let (port, dir) = server(&probe);
    drop(probe);
    let forms = |name: &str| {
        [
            format!("postgresql://postgres@127.0.0.1:{port}/{name}"),
            format!("postgres://postgres@127.0.0.1:{port}/{name}"),
            // Several hosts: libpq moves on when the first refuses.
            format!("postgresql://postgres@127.0.0.1:{refusing},127.0.0.1:{port}/{name}"),
            format!("postgresql:///{name}?host=127.0.0.1&port={port}&user=postgres"),
            format!(
                "postgresql://postgres@{}:{port}/{name}",
                percent_encoded(&dir)
            ),
            format!("postgresql:///{name}?host={dir}&port={port}&user=postgres"),
            format!("host={dir} port={port} user=postgres dbname={name}"),
            format!(
                "host=127.0.0.1,127.0.0.1 port={refusing},{port} user=postgres dbname='{name}'"
            ),
        ]
    };
    for form in forms("NAME") {
        let db = TestDb::migrated();
        let url = form.replace("NAME", &db.name);
        let out = bank(&["--database-url", &url, "--accounts", "3", "--delete", "1"]);
        assert!(
            out.status.success(),
            "{form}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(db.count("accounts"), 2, "{form}");
    }
}

#[test]
fn a_failure_names_every_host_tried_and_never_the_password() {
    let (_first, a) = refusing_port();
    let (_second, b) = refusing_port();
    for (url, target) in [
        (
            format!("postgresql://app:{SENTINEL}@127.0.0.1:{a},127.0.0.1:{b}/bank"),
            format!(
                "could not connect to app@127.0.0.1:{a},127.0.0.1:{b}/bank: connection refused"
            ),
        ),
        (
            format!(
                "host=127.0.0.1,localhost port={a},{b} user=app password={SENTINEL} dbname=bank"
            ),
            format!(
                "could not connect to app@127.0.0.1:{a},localhost:{b}/bank: connection refused"
            ),
        ),
        (
            format!("postgresql://app:{SENTINEL}@%2Fno%2Fsuch%20dir/bank"),
            "could not connect to app@/no/such dir/bank".to_owned(),
        ),
    ] {
        let out = bank(&["--database-url", &url]);
        assert_eq!(out.status.code(), Some(1), "{url}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        // The password is one letter: a search-and-replace redaction would
        // have mangled every "e" in the line.
        assert!(stderr.starts_with(&format!("bank: {target}")), "{stderr}");
        assert!(!stderr.contains(&url), "{stderr}");
    }
}
