//! libpq's TLS rules, one case each, in a made-up environment.

use super::*;
use std::collections::HashMap;

/// A made-up environment: variables, a home, and the files that exist.
#[derive(Default)]
struct Fake {
    vars: HashMap<&'static str, &'static str>,
    files: Vec<&'static str>,
}

impl Surroundings for Fake {
    fn var(&self, name: &str) -> Option<String> {
        self.vars.get(name).map(|v| (*v).to_owned())
    }
    fn home(&self) -> Option<PathBuf> {
        Some(PathBuf::from("/home/max"))
    }
    fn exists(&self, path: &Path) -> bool {
        self.files.iter().any(|f| Path::new(f) == path)
    }
}

fn settings(options: &[(&str, &str)], around: &Fake) -> Result<TlsSettings, String> {
    let options: HashMap<String, String> = options
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    TlsSettings::from_options(|key| options.get(key).cloned(), around)
}

#[test]
fn libpqs_default_tries_tls_without_checking_when_there_is_no_ca_file() {
    let s = settings(&[], &Fake::default()).unwrap();
    assert_eq!(
        (s.mode, &s.roots, &s.identity),
        (Mode::Prefer, &Roots::Unchecked, &None)
    );
    assert_eq!(s.ssl_mode(), SslMode::Prefer);
}

#[test]
fn allow_is_read_as_prefer_and_disable_checks_nothing() {
    let allow = settings(&[("sslmode", "allow")], &Fake::default()).unwrap();
    assert_eq!(allow.mode, Mode::Prefer);
    let around = Fake {
        files: vec!["/home/max/.postgresql/root.crt"],
        ..Fake::default()
    };
    let off = settings(&[("sslmode", "disable")], &around).unwrap();
    assert_eq!(
        (off.ssl_mode(), &off.roots),
        (SslMode::Disable, &Roots::Unchecked)
    );
    assert!(off.connector().unwrap().is_none());
}

#[test]
fn an_existing_ca_file_is_checked_in_every_mode() {
    let around = Fake {
        files: vec!["/certs/ca.crt", "/home/max/.postgresql/root.crt"],
        ..Fake::default()
    };
    for mode in ["prefer", "require", "verify-ca", "verify-full"] {
        let s = settings(
            &[("sslmode", mode), ("sslrootcert", "/certs/ca.crt")],
            &around,
        )
        .unwrap();
        assert_eq!(s.roots, Roots::File("/certs/ca.crt".into()), "{mode}");
    }
    let home = settings(&[("sslmode", "require")], &around).unwrap();
    assert_eq!(
        home.roots,
        Roots::File("/home/max/.postgresql/root.crt".into())
    );
}

#[test]
fn a_verifying_mode_without_its_ca_file_fails_in_libpqs_words() {
    for mode in ["verify-ca", "verify-full"] {
        let err = settings(
            &[("sslmode", mode), ("sslrootcert", "/nonexistent/ca.crt")],
            &Fake::default(),
        )
        .unwrap_err();
        assert!(
            err.starts_with("root certificate file \"/nonexistent/ca.crt\" does not exist"),
            "{err}"
        );
        let err = settings(&[("sslmode", mode)], &Fake::default()).unwrap_err();
        assert!(
            err.contains("\"/home/max/.postgresql/root.crt\" does not exist"),
            "{err}"
        );
    }
    // A weaker mode goes on without checking.
    let s = settings(
        &[
            ("sslmode", "require"),
            ("sslrootcert", "/nonexistent/ca.crt"),
        ],
        &Fake::default(),
    )
    .unwrap();
    assert_eq!(s.roots, Roots::Unchecked);
}

#[test]
fn the_systems_cas_need_verify_full() {
    let s = settings(
        &[("sslmode", "verify-full"), ("sslrootcert", "system")],
        &Fake::default(),
    )
    .unwrap();
    assert_eq!(s.roots, Roots::System);
    let err = settings(
        &[("sslmode", "verify-ca"), ("sslrootcert", "system")],
        &Fake::default(),
    )
    .unwrap_err();
    assert!(
        err.starts_with("weak sslmode \"verify-ca\" may not be used with sslrootcert=system"),
        "{err}"
    );
}

#[test]
fn only_verify_modes_require_tls_of_tokio_postgres() {
    let around = Fake {
        files: vec!["/certs/ca.crt"],
        ..Fake::default()
    };
    for (mode, expected) in [
        ("prefer", SslMode::Prefer),
        ("require", SslMode::Require),
        ("verify-ca", SslMode::Require),
        ("verify-full", SslMode::Require),
    ] {
        let s = settings(
            &[("sslmode", mode), ("sslrootcert", "/certs/ca.crt")],
            &around,
        )
        .unwrap();
        assert_eq!(s.ssl_mode(), expected, "{mode}");
    }
}

#[test]
fn the_environment_fills_in_what_the_url_leaves_out() {
    let around = Fake {
        vars: HashMap::from([
            ("PGSSLMODE", "verify-full"),
            ("PGSSLROOTCERT", "/env/ca.crt"),
            ("PGSSLCERT", "/env/client.crt"),
            ("PGSSLKEY", "/env/client.key"),
        ]),
        files: vec![
            "/env/ca.crt",
            "/env/client.crt",
            "/env/client.key",
            "/url/ca.crt",
        ],
    };
    let s = settings(&[], &around).unwrap();
    assert_eq!(s.mode, Mode::VerifyFull);
    assert_eq!(s.roots, Roots::File("/env/ca.crt".into()));
    assert_eq!(
        s.identity,
        Some(("/env/client.crt".into(), "/env/client.key".into()))
    );
    // The URL wins over the environment.
    let s = settings(
        &[("sslmode", "require"), ("sslrootcert", "/url/ca.crt")],
        &around,
    )
    .unwrap();
    assert_eq!(
        (s.mode, s.roots),
        (Mode::Require, Roots::File("/url/ca.crt".into()))
    );
}

#[test]
fn a_client_certificate_is_used_when_its_file_exists_and_needs_its_key() {
    let around = Fake {
        files: vec![
            "/certs/client.crt",
            "/certs/client.key",
            "/home/max/.postgresql/postgresql.crt",
        ],
        ..Fake::default()
    };
    let s = settings(
        &[
            ("sslcert", "/certs/client.crt"),
            ("sslkey", "/certs/client.key"),
        ],
        &around,
    )
    .unwrap();
    assert_eq!(
        s.identity,
        Some(("/certs/client.crt".into(), "/certs/client.key".into()))
    );
    // A named certificate that is not there: none, as libpq does.
    let s = settings(&[("sslcert", "/certs/missing.crt")], &around).unwrap();
    assert_eq!(s.identity, None);
    // The default certificate exists, its default key does not.
    let err = settings(&[], &around).unwrap_err();
    assert!(
        err.starts_with(
            "certificate present, but not private key file \"/home/max/.postgresql/postgresql.key\""
        ),
        "{err}"
    );
}

#[test]
fn an_unknown_sslmode_is_named() {
    let err = settings(&[("sslmode", "verify_full")], &Fake::default()).unwrap_err();
    assert!(
        err.starts_with("invalid sslmode value: \"verify_full\""),
        "{err}"
    );
}

#[test]
fn a_key_others_may_read_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("client.key");
    std::fs::write(&key, "not a key").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = check_key_permissions(&key).unwrap_err();
    assert!(err.contains("has group or world access"), "{err}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    check_key_permissions(&key).unwrap();
}
