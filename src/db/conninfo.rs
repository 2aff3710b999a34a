//! Connection strings, parsed by libpq's own parser (`PQconninfoParse`), so
//! that every form libpq accepts is accepted here too: `postgresql://` and
//! `postgres://` URLs with several hosts and ports, hosts and ports in the
//! query string, Unix socket directories, and keyword/value strings. What is
//! shown to people is built from the parsed parts, never the password.
//!
//! Why not a Rust parser: tokio-postgres's `Config`, the well-kept one,
//! refuses options libpq takes and CockroachDB Cloud's URLs carry
//! (`sslmode=verify-full`, `sslrootcert`), so it would turn working URLs
//! away. libpq is already linked (Diesel talks through it), and this module
//! holds the project's only `unsafe` code: the call to its parser.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString};
use std::fmt;
use std::ptr;

/// A parsed connection string: the options it sets, as libpq read them.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnInfo {
    options: Vec<(String, String)>,
}

/// Why a connection string does not parse. The message is libpq's reason
/// with every part of the string it quoted left out, since that part could
/// be a password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(String);

impl ConnInfo {
    /// Parses `text` exactly as libpq will when connecting.
    ///
    /// # Errors
    /// [`ParseError`], which never repeats the text.
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        let text =
            CString::new(text).map_err(|_| ParseError("it contains a NUL character".to_owned()))?;
        let mut error: *mut std::os::raw::c_char = ptr::null_mut();
        // SAFETY: `text` is a valid NUL-terminated string; libpq returns
        // either an array it allocated (ending with a NULL keyword), freed
        // below with PQconninfoFree, or NULL and an error message it
        // allocated, freed with PQfreemem. Nothing borrowed from either
        // outlives this function: every string is copied first.
        unsafe {
            let parsed = pq_sys::PQconninfoParse(text.as_ptr(), &mut error);
            if parsed.is_null() {
                let reason = if error.is_null() {
                    "libpq could not parse it (out of memory?)".to_owned()
                } else {
                    let message = CStr::from_ptr(error).to_string_lossy().into_owned();
                    pq_sys::PQfreemem(error.cast());
                    without_quotes(&message)
                };
                return Err(ParseError(reason));
            }
            let mut options = Vec::new();
            let mut option = parsed;
            while !(*option).keyword.is_null() {
                if !(*option).val.is_null() {
                    options.push((
                        CStr::from_ptr((*option).keyword)
                            .to_string_lossy()
                            .into_owned(),
                        CStr::from_ptr((*option).val).to_string_lossy().into_owned(),
                    ));
                }
                option = option.add(1);
            }
            pq_sys::PQconninfoFree(parsed);
            Ok(Self { options })
        }
    }

    /// The value of `keyword`, if the string sets it.
    pub fn get(&self, keyword: &str) -> Option<&str> {
        self.options
            .iter()
            .find(|(k, _)| k == keyword)
            .map(|(_, v)| v.as_str())
    }

    /// Every option the string sets, as `(keyword, value)`.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &str)> {
        self.options.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The same options with `keyword` set to `value`.
    pub fn with(&self, keyword: &str, value: &str) -> Self {
        let mut options: Vec<(String, String)> = self
            .options
            .iter()
            .filter(|(k, _)| k != keyword)
            .cloned()
            .collect();
        options.push((keyword.to_owned(), value.to_owned()));
        Self { options }
    }

    /// The options as a keyword/value string for libpq, each value quoted.
    pub fn to_libpq(&self) -> String {
        self.options
            .iter()
            .map(|(k, v)| format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'")))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The hosts libpq will try, in order, each with its port when one is
    /// set: `host`, or `hostaddr` where no host name is given.
    pub fn hosts(&self) -> Vec<String> {
        let list = |key| {
            self.get(key)
                .map(|v| v.split(',').map(str::to_owned).collect::<Vec<_>>())
                .unwrap_or_default()
        };
        let (names, addrs, ports) = (list("host"), list("hostaddr"), list("port"));
        let count = names.len().max(addrs.len()).max(1);
        (0..count)
            .map(|i| {
                let name = names
                    .get(i)
                    .filter(|n| !n.is_empty())
                    .or_else(|| addrs.get(i).filter(|a| !a.is_empty()))
                    .cloned()
                    .unwrap_or_else(|| "the default socket".to_owned());
                // One port applies to every host.
                let port = ports.get(i).or(ports.first().filter(|_| ports.len() == 1));
                match port.filter(|p| !p.is_empty()) {
                    Some(port) => format!("{name}:{port}"),
                    None => name,
                }
            })
            .collect()
    }

    /// `user@host:port,host:port/database`, for messages: never the
    /// password, nor any other option.
    pub fn redacted(&self) -> String {
        let user = self
            .get("user")
            .map(|u| format!("{u}@"))
            .unwrap_or_default();
        let database = self
            .get("dbname")
            .map(|d| format!("/{d}"))
            .unwrap_or_default();
        format!("{user}{}{database}", self.hosts().join(","))
    }
}

impl fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConnInfo({})", self.redacted())
    }
}

/// libpq's parse error with what it quoted from the string cut out: its
/// messages quote the offending part, or the whole URL.
fn without_quotes(message: &str) -> String {
    let first_line = message.lines().next().unwrap_or_default();
    // These two quote an option's name, never its value: worth showing.
    for prefix in [
        "invalid connection option \"",
        "invalid URI query parameter: \"",
    ] {
        if let Some(name) = first_line
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix('"'))
        {
            return format!("unknown option '{name}'");
        }
    }
    // Anything else quoted is left out, but for libpq's own one-character
    // quotes ("=", "]"), which are not the user's text.
    let mut kept = String::new();
    for (i, part) in first_line.split('"').enumerate() {
        let inside_quotes = i % 2 == 1;
        if !inside_quotes {
            kept.push_str(part);
        } else if part.chars().count() == 1 && !part.chars().all(char::is_alphanumeric) {
            kept.push_str(&format!("\"{part}\""));
        } else {
            kept.push_str("\"…\"");
        }
    }
    let kept = kept
        .trim()
        .trim_end_matches(':')
        .trim_end_matches(": \"…\"");
    kept.trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> ConnInfo {
        ConnInfo::parse(text).unwrap()
    }

    #[test]
    fn a_url_and_the_same_keyword_string_parse_alike() {
        let url = parsed("postgresql://max:s3cret@db.example:26257/bank?sslmode=verify-full");
        let dsn = parsed(
            "host=db.example port=26257 user=max password=s3cret dbname=bank sslmode=verify-full",
        );
        for key in ["host", "port", "user", "password", "dbname", "sslmode"] {
            assert_eq!(url.get(key), dsn.get(key), "{key}");
        }
        assert_eq!(url.redacted(), "max@db.example:26257/bank");
        assert!(!format!("{url:?}").contains("s3cret"));
    }

    #[test]
    fn several_hosts_are_listed_with_their_ports() {
        let info = parsed("postgresql://root@h1:26257,h2:26258,h3/defaultdb");
        assert_eq!(info.hosts(), ["h1:26257", "h2:26258", "h3"]);
        assert_eq!(info.redacted(), "root@h1:26257,h2:26258,h3/defaultdb");
        let info = parsed("host=h1,h2 port=26257 user=root");
        assert_eq!(info.hosts(), ["h1:26257", "h2:26257"]);
    }

    #[test]
    fn hosts_in_the_query_string_and_socket_paths_are_the_hosts() {
        let info = parsed("postgresql:///bank?host=/var/run/postgresql&port=5433&user=app");
        assert_eq!(info.redacted(), "app@/var/run/postgresql:5433/bank");
        let info = parsed("postgres://app@%2Ftmp%2Fsock%20dir/bank");
        assert_eq!(info.get("host"), Some("/tmp/sock dir"));
        assert_eq!(info.redacted(), "app@/tmp/sock dir/bank");
        let info = parsed("dbname=bank");
        assert_eq!(info.redacted(), "the default socket/bank");
        let info = parsed("hostaddr=127.0.0.1 port=1");
        assert_eq!(info.hosts(), ["127.0.0.1:1"]);
    }

    #[test]
    fn the_libpq_string_round_trips_through_libpq() {
        let info = parsed("postgresql://u:it's%20a%5Cpw@h/d?options=-c%20statement_timeout%3D5s")
            .with("application_name", "bank");
        let again = parsed(&info.to_libpq());
        assert_eq!(again, info);
        assert_eq!(again.get("password"), Some("it's a\\pw"));
        assert_eq!(again.get("options"), Some("-c statement_timeout=5s"));
    }

    #[test]
    fn parse_errors_never_repeat_the_string() {
        for bad in [
            "host=h password secret-Pa55",
            "postgresql://u:secret-Pa55@h/d?x",
            "postgresql://u:secret-Pa55@[::1/d",
            "postgresql://u:secret-Pa55@h/d%zz",
            "host='secret-Pa55",
            "postgresql://u:secret-Pa55@h/d?nosuchoption=1",
        ] {
            let err = ConnInfo::parse(bad).unwrap_err().to_string();
            assert!(!err.contains("secret"), "{bad}: {err}");
            assert!(!err.is_empty() && !err.contains('\n'), "{bad}: {err}");
        }
        assert_eq!(
            ConnInfo::parse("postgresql://h/d?sslrootcrt=x")
                .unwrap_err()
                .to_string(),
            "unknown option 'sslrootcrt'"
        );
    }
}
