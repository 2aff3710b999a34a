//! The database URL: what the user gave, parsed by libpq, with the
//! connection policy added (libpq defaults for timeouts and keepalives, the
//! server-side session timeouts), and shown without secrets.

use std::time::Duration;

use super::conninfo::ConnInfo;

/// A database connection string that libpq parsed: a `postgresql://` or
/// `postgres://` URL, or keyword/value pairs (see [`super::conninfo`]).
#[derive(Clone)]
pub struct DbUrl {
    info: ConnInfo,
}

impl std::fmt::Debug for DbUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DbUrl({})", self.redacted())
    }
}

impl DbUrl {
    /// Parses and checks the string without ever echoing it (it may hold a
    /// password).
    ///
    /// # Errors
    /// A one-line message saying what is wrong and what the string should
    /// look like.
    pub fn parse(raw: &str) -> Result<Self, String> {
        const SHAPE: &str = "expected postgresql://USER[:PASSWORD]@HOST[:PORT][,HOST[:PORT]...]/DATABASE[?sslmode=...] \
             or key=value pairs such as host=HOST dbname=DATABASE";
        let raw = raw.trim();
        if raw.is_empty() {
            return Err(format!("the database url is empty; {SHAPE}"));
        }
        // libpq reads anything that is not one of its two URL schemes as
        // keyword/value pairs, which would make a wrong scheme a puzzling
        // "missing =".
        if let Some((scheme, _)) = raw.split_once("://") {
            let is_scheme = !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c));
            if is_scheme && !matches!(scheme, "postgres" | "postgresql") {
                return Err(format!(
                    "the database url has scheme '{scheme}', which is not a PostgreSQL wire-protocol url; {SHAPE}"
                ));
            }
        }
        let info = ConnInfo::parse(raw)
            .map_err(|err| format!("the database url is malformed ({err}); {SHAPE}"))?;
        Ok(Self { info })
    }

    /// The string handed to libpq: the user's options, plus an
    /// `application_name` (so the app shows up in CockroachDB's console and
    /// `pg_stat_activity`, as in the tutorial) and a `connect_timeout` (so
    /// an unreachable host fails instead of hanging), unless the user set
    /// them.
    ///
    /// And TCP keepalives and a `tcp_user_timeout`, unless set: a peer that
    /// vanished (a partition, a node gone without a word) then fails the
    /// connection within about 15 seconds instead of the kernel's 15-minute
    /// retransmission limit. Idle connections are probed after 5 seconds, 3
    /// times 2 seconds apart; data unacknowledged for 15 seconds ends the
    /// connection.
    pub fn for_libpq(&self) -> String {
        self.with_policy().to_libpq()
    }

    /// The options [`DbUrl::for_libpq`] hands to libpq: the user's, with
    /// the connection policy's defaults added.
    pub(super) fn with_policy(&self) -> ConnInfo {
        let mut info = self.info.clone();
        for (key, value) in [
            ("application_name", "docs_simplecrud_diesel"),
            ("connect_timeout", "10"),
            ("keepalives", "1"),
            ("keepalives_idle", "5"),
            ("keepalives_interval", "2"),
            ("keepalives_count", "3"),
            ("tcp_user_timeout", "15000"),
        ] {
            if info.get(key).is_none() {
                info = info.with(key, value);
            }
        }
        info
    }

    /// `user@host:port,.../database`, for messages: never the password or
    /// any other option.
    pub fn redacted(&self) -> String {
        self.info.redacted()
    }

    /// The hosts libpq tries, as written, for messages.
    pub fn hosts(&self) -> String {
        self.info.hosts().join(", ")
    }

    /// The `sslrootcert` file, if one is named.
    pub fn sslrootcert(&self) -> Option<&str> {
        self.info.get("sslrootcert")
    }

    /// Whether connections present a client certificate: `sslcert` in the
    /// string or `PGSSLCERT`, or libpq's default file
    /// (`~/.postgresql/postgresql.crt`), when the file is there.
    pub fn presents_client_certificate(&self) -> bool {
        let named = self
            .info
            .get("sslcert")
            .map(str::to_owned)
            .or_else(|| std::env::var("PGSSLCERT").ok().filter(|v| !v.is_empty()));
        let file = named.map(std::path::PathBuf::from).or_else(|| {
            std::env::var_os("HOME")
                .map(|home| std::path::Path::new(&home).join(".postgresql/postgresql.crt"))
        });
        file.is_some_and(|f| f.is_file())
    }

    /// A warning when a password or data may go to whoever answers: a host
    /// that is neither a Unix socket nor a loopback address, reached with
    /// an `sslmode` below `verify-ca` (libpq's default `prefer`, and
    /// `require`, encrypt without checking who answers). `env_sslmode` is
    /// `PGSSLMODE`, which libpq reads when the string sets no `sslmode`.
    pub fn unverified_remote(&self, env_sslmode: Option<&str>) -> Option<String> {
        let sslmode = self.info.get("sslmode").or(env_sslmode).unwrap_or("prefer");
        if matches!(sslmode, "verify-ca" | "verify-full") {
            return None;
        }
        let names = self.info.get("host").unwrap_or_default();
        let addrs = self.info.get("hostaddr").unwrap_or_default();
        let remote: Vec<&str> = names
            .split(',')
            .chain(addrs.split(','))
            .map(str::trim)
            .filter(|h| !h.is_empty() && !is_local(h))
            .collect();
        let first = remote.first()?;
        Some(format!(
            "the server's identity is not checked (sslmode={sslmode}) on the way to {first}, which is not \
             this machine: whoever answers there gets the password; use sslmode=verify-full&sslrootcert=CA.crt \
             (the CA certificate that signed the server's) in the database url"
        ))
    }

    /// The startup `options`, if the connection string sets them.
    pub fn options(&self) -> Option<&str> {
        self.info.get("options")
    }

    /// The user to connect as, if one is named.
    pub fn user(&self) -> Option<&str> {
        self.info.get("user")
    }

    /// The same connection string with the server-side session timeouts
    /// in the startup `options` (no round trip; PostgreSQL and CockroachDB
    /// both read `-c name=value` there), each unless the options set it:
    /// - `statement_timeout`: no statement or lock wait lasts longer;
    /// - `idle_in_transaction_session_timeout`, the same value: a session
    ///   left open in a transaction is ended by the server, and its locks
    ///   freed. The app never waits inside a transaction, so only a session
    ///   it lost (a partition, a client killed mid-transaction) sits idle
    ///   in one; without this, its locks would block every retry until the
    ///   server noticed the dead peer, hours later by default.
    pub fn with_session_timeouts(&self, timeout: Duration) -> Self {
        let mut options = self.info.get("options").unwrap_or_default().to_owned();
        for name in ["statement_timeout", "idle_in_transaction_session_timeout"] {
            // The names do not contain each other, so a substring test is
            // exact enough for "the user set it".
            if !options.contains(&format!("{name}=")) {
                if !options.is_empty() {
                    options.push(' ');
                }
                // With its unit: CockroachDB documents milliseconds for a
                // bare statement_timeout only, not for the other.
                options.push_str(&format!("-c {name}={}ms", timeout.as_millis().max(1)));
            }
        }
        self.with_param("options", &options)
    }

    /// The same connection string with option `key` set to `value`.
    pub fn with_param(&self, key: &str, value: &str) -> Self {
        Self {
            info: self.info.with(key, value),
        }
    }

    /// The same connection string pointing at another database (tests
    /// create one each).
    pub fn with_database(&self, name: &str) -> Self {
        self.with_param("dbname", name)
    }
}

/// A Unix socket directory (or abstract socket) or a loopback address.
fn is_local(host: &str) -> bool {
    if host.starts_with('/') || host.starts_with('@') || host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_remote_host_without_verification_is_warned_of() {
        let warn = |url: &str, env: Option<&str>| DbUrl::parse(url).unwrap().unverified_remote(env);
        for quiet in [
            "postgresql://u@localhost/d",
            "postgresql://u@127.0.0.1:5432/d?sslmode=disable",
            "postgresql://u@[::1]/d",
            "postgresql://u@127.9.9.9/d",
            "host=/var/run/postgresql dbname=d",
            "postgresql:///d",
            "postgresql://u@db.example/d?sslmode=verify-full&sslrootcert=ca.crt",
            "postgresql://u@10.0.0.5/d?sslmode=verify-ca",
        ] {
            assert_eq!(warn(quiet, None), None, "{quiet}");
        }
        for (loud, env, mode, host) in [
            ("postgresql://u@db.example/d", None, "prefer", "db.example"),
            (
                "postgresql://u@10.0.0.5/d?sslmode=require",
                None,
                "require",
                "10.0.0.5",
            ),
            (
                "postgresql://u@10.0.0.5/d?sslmode=disable",
                None,
                "disable",
                "10.0.0.5",
            ),
            // The second host of a list is remote.
            (
                "postgresql://u@localhost,db2.example/d",
                None,
                "prefer",
                "db2.example",
            ),
            (
                "host=localhost hostaddr=192.0.2.7 dbname=d",
                None,
                "prefer",
                "192.0.2.7",
            ),
            // libpq reads PGSSLMODE when the url sets none.
            (
                "postgresql://u@db.example/d",
                Some("require"),
                "require",
                "db.example",
            ),
        ] {
            let line = warn(loud, env).unwrap_or_else(|| panic!("{loud}: no warning"));
            assert!(
                line.starts_with(&format!(
                    "the server's identity is not checked (sslmode={mode}) on the way to {host},"
                )),
                "{loud}: {line}"
            );
            assert!(line.contains("sslmode=verify-full&sslrootcert="), "{line}");
        }
        // PGSSLMODE does not weaken what the url says.
        assert_eq!(
            warn(
                "postgresql://u@db.example/d?sslmode=verify-full",
                Some("disable")
            ),
            None
        );
    }

    #[test]
    fn redaction_drops_the_password_and_query() {
        let url = DbUrl::parse("postgresql://max:s3cret@db.example:26257/bank?sslmode=verify-full")
            .unwrap();
        assert_eq!(url.redacted(), "max@db.example:26257/bank");
        assert!(url.for_libpq().contains("password='s3cret'"));
        assert!(!format!("{url:?}").contains("s3cret"));
    }

    #[test]
    fn libpq_url_gets_application_name_and_timeout_once() {
        let url = DbUrl::parse("postgresql://root@h:1/d?application_name=mine").unwrap();
        let libpq = url.for_libpq();
        assert!(libpq.contains("application_name='mine'"));
        assert!(!libpq.contains("docs_simplecrud_diesel"));
        assert!(libpq.contains("connect_timeout='10'"));
        // The production dead-peer bounds: keepalives after 5 s idle, 3
        // probes 2 s apart, data unacknowledged for 15 s.
        for default in [
            "keepalives='1'",
            "keepalives_idle='5'",
            "keepalives_interval='2'",
            "keepalives_count='3'",
            "tcp_user_timeout='15000'",
        ] {
            assert!(libpq.contains(default), "{default} in {libpq}");
        }
        let url =
            DbUrl::parse("postgresql://h/d?tcp_user_timeout=1000&options=-c%20search_path%3Dx")
                .unwrap();
        let libpq = url
            .with_session_timeouts(Duration::from_secs(3))
            .for_libpq();
        assert!(libpq.contains("tcp_user_timeout='1000'"), "{libpq}");
        assert!(
            libpq.contains(
                "options='-c search_path=x -c statement_timeout=3000ms \
                 -c idle_in_transaction_session_timeout=3000ms'"
            ),
            "{libpq}"
        );
        // Each one the user set is kept, and only that one.
        let url = DbUrl::parse("host=h options='-c statement_timeout=9'").unwrap();
        let libpq = url
            .with_session_timeouts(Duration::from_secs(3))
            .for_libpq();
        assert!(
            libpq.contains(
                "options='-c statement_timeout=9 -c idle_in_transaction_session_timeout=3000ms'"
            ),
            "{libpq}"
        );
        let url =
            DbUrl::parse("host=h options='-c idle_in_transaction_session_timeout=0'").unwrap();
        let libpq = url
            .with_session_timeouts(Duration::from_secs(3))
            .for_libpq();
        assert!(
            libpq.contains(
                "options='-c idle_in_transaction_session_timeout=0 -c statement_timeout=3000ms'"
            ),
            "{libpq}"
        );
    }

    #[test]
    fn bad_urls_get_one_line_that_hides_them() {
        for bad in [
            "",
            "not a url",
            "mysql://u:pw@h/d",
            "postgresql://u:pw@h/d%zz",
        ] {
            let err = DbUrl::parse(bad).unwrap_err();
            assert!(!err.contains('\n'), "{err}");
            assert!(err.contains("expected postgresql://"), "{err}");
            assert!(!err.contains("pw@"), "{err}");
        }
    }
}
