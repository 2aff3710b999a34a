//! TLS for the async front end: libpq's `sslmode`, `sslrootcert`,
//! `sslcert` and `sslkey` rules, applied to an OpenSSL connector for
//! tokio-postgres, so one libpq-style URL means the same on both front ends.
//!
//! The rules followed (libpq's "SSL Support" chapter, PostgreSQL 15, and
//! its `fe-secure-openssl.c`), each a case in the tests below:
//! - `disable` sends no TLS; `allow` and `prefer` try TLS first and fall
//!   back to plaintext (tokio-postgres has no plaintext-first mode, so
//!   `allow` is read as `prefer`, the stricter of the two).
//! - The CA file is `sslrootcert`, else `~/.postgresql/root.crt`. When it
//!   exists the server's chain is verified, in every mode (libpq: "if a
//!   root CA file exists, the behavior of sslmode=require will be the same
//!   as that of verify-ca"); when it does not, `verify-ca` and
//!   `verify-full` fail with libpq's own words, and weaker modes encrypt
//!   without checking.
//! - Only `verify-full` checks the host name (or IP address) against the
//!   certificate.
//! - `sslrootcert=system` (libpq 16) uses the system's CAs, and only with
//!   `verify-full`.
//! - The client certificate is `sslcert`, else `~/.postgresql/postgresql.crt`,
//!   used when the file exists; its key is `sslkey`, else
//!   `~/.postgresql/postgresql.key`, and must not be readable by group or
//!   others (0640 when owned by root), as libpq requires.
//! - Each option falls back to its environment variable (`PGSSLMODE`,
//!   `PGSSLROOTCERT`, `PGSSLCERT`, `PGSSLKEY`) as libpq's do.
//!
//! Failures use libpq's wording, so the one place that explains libpq's
//! messages (`connect.rs`) names them for both front ends.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use openssl::ssl::{SslConnector, SslFiletype, SslMethod, SslVerifyMode};
use postgres_openssl::MakeTlsConnector;
use tokio_postgres::config::SslMode;

/// libpq's `sslmode` values, `allow` read as `prefer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// No TLS.
    Disable,
    /// TLS when the server offers it (`prefer`, and `allow`).
    Prefer,
    /// TLS, the server's chain checked only when there is a CA file.
    Require,
    /// TLS, the server's chain checked.
    VerifyCa,
    /// TLS, the server's chain and name checked.
    VerifyFull,
}

/// What the server's certificate is checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Roots {
    /// Not checked: no CA file, in a mode that allows it.
    Unchecked,
    /// The CA certificates in this file.
    File(PathBuf),
    /// The system's CA certificates (`sslrootcert=system`).
    System,
}

/// How the async front end's connections speak TLS. Its fields are
/// private: only [`TlsSettings::from_options`] makes one, so that no
/// combination libpq would not make (a host checked on an unchecked chain)
/// can be built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TlsSettings {
    /// The `sslmode`.
    mode: Mode,
    /// What the server's certificate is checked against.
    roots: Roots,
    /// The client certificate and its key, when there is one.
    identity: Option<(PathBuf, PathBuf)>,
}

/// Where libpq's defaults live: the process's environment and files, or a
/// test's stand-ins.
pub(super) trait Surroundings {
    /// An environment variable.
    fn var(&self, name: &str) -> Option<String>;
    /// The user's home directory.
    fn home(&self) -> Option<PathBuf>;
    /// Whether `path` is a file that can be read.
    fn exists(&self, path: &Path) -> bool;
}

/// The process's own environment and file system.
pub(super) struct Process;

impl Surroundings for Process {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
    fn home(&self) -> Option<PathBuf> {
        std::env::var_os("HOME").map(PathBuf::from)
    }
    fn exists(&self, path: &Path) -> bool {
        path.is_file()
    }
}

impl TlsSettings {
    /// The settings for the connection string's options (`option` looks
    /// one up), with libpq's defaults from `around`.
    ///
    /// # Errors
    /// An option's value libpq would refuse, or a CA file that a verifying
    /// mode needs and that does not exist, in libpq's words.
    pub(super) fn from_options(
        option: impl Fn(&str) -> Option<String>,
        around: &impl Surroundings,
    ) -> Result<Self, String> {
        let get = |key: &str, env: &str| option(key).or_else(|| around.var(env));
        let in_home = |file: &str| around.home().map(|h| h.join(".postgresql").join(file));
        let mode = match get("sslmode", "PGSSLMODE").as_deref().unwrap_or("prefer") {
            "disable" => Mode::Disable,
            "allow" | "prefer" => Mode::Prefer,
            "require" => Mode::Require,
            "verify-ca" => Mode::VerifyCa,
            "verify-full" => Mode::VerifyFull,
            other => {
                return Err(format!(
                    "invalid sslmode value: \"{other}\"; use disable, allow, prefer, require, verify-ca or verify-full"
                ))
            }
        };
        if mode == Mode::Disable {
            return Ok(Self {
                mode,
                roots: Roots::Unchecked,
                identity: None,
            });
        }
        let rootcert = get("sslrootcert", "PGSSLROOTCERT");
        let roots = match rootcert.as_deref() {
            Some("system") if mode == Mode::VerifyFull => Roots::System,
            Some("system") => {
                return Err(format!(
                "weak sslmode \"{}\" may not be used with sslrootcert=system (use \"verify-full\")",
                mode.name()
            ))
            }
            named => {
                let file = named.map(PathBuf::from).or_else(|| in_home("root.crt"));
                match file {
                    Some(file) if around.exists(&file) => Roots::File(file),
                    file if matches!(mode, Mode::VerifyCa | Mode::VerifyFull) => {
                        let file = file.map_or_else(
                            || "~/.postgresql/root.crt".to_owned(),
                            |f| f.display().to_string(),
                        );
                        return Err(format!(
                            "root certificate file \"{file}\" does not exist; either provide the file or \
                             change sslmode to disable server certificate verification"
                        ));
                    }
                    _ => Roots::Unchecked,
                }
            }
        };
        let cert = get("sslcert", "PGSSLCERT")
            .map(PathBuf::from)
            .or_else(|| in_home("postgresql.crt"));
        let key = get("sslkey", "PGSSLKEY")
            .map(PathBuf::from)
            .or_else(|| in_home("postgresql.key"));
        // libpq goes without a client certificate when the file is not
        // there, even a named one: the server then says what it wanted.
        let identity = match (cert, key) {
            (Some(cert), key) if around.exists(&cert) => match key {
                Some(key) if around.exists(&key) => Some((cert, key)),
                key => {
                    let key = key.map_or_else(|| "(none)".to_owned(), |k| k.display().to_string());
                    return Err(format!(
                        "certificate present, but not private key file \"{key}\"; point sslkey at the \
                         client certificate's key"
                    ));
                }
            },
            _ => None,
        };
        Ok(Self {
            mode,
            roots,
            identity,
        })
    }

    /// tokio-postgres's mode: whether TLS is skipped, tried or required
    /// (the checks are the connector's).
    pub(super) fn ssl_mode(&self) -> SslMode {
        match self.mode {
            Mode::Disable => SslMode::Disable,
            Mode::Prefer => SslMode::Prefer,
            Mode::Require | Mode::VerifyCa | Mode::VerifyFull => SslMode::Require,
        }
    }

    /// The OpenSSL connector that makes these checks, and presents the
    /// client certificate; `None` for `sslmode=disable`.
    ///
    /// # Errors
    /// A file OpenSSL cannot read, or a key others may read, in libpq's
    /// words.
    pub(super) fn connector(&self) -> Result<Option<MakeTlsConnector>, String> {
        if self.mode == Mode::Disable {
            return Ok(None);
        }
        let mut builder = SslConnector::builder(SslMethod::tls())
            .map_err(|err| format!("could not set up TLS: {err}"))?;
        match &self.roots {
            Roots::Unchecked => builder.set_verify(SslVerifyMode::NONE),
            Roots::File(file) => builder.set_ca_file(file).map_err(|err| {
                format!(
                    "could not read root certificate file \"{}\": {err}",
                    file.display()
                )
            })?,
            Roots::System => builder
                .set_default_verify_paths()
                .map_err(|err| format!("could not load the system's root certificates: {err}"))?,
        }
        if let Some((cert, key)) = &self.identity {
            check_key_permissions(key)?;
            builder.set_certificate_chain_file(cert).map_err(|err| {
                format!(
                    "could not read certificate file \"{}\": {err}",
                    cert.display()
                )
            })?;
            builder
                .set_private_key_file(key, SslFiletype::PEM)
                .map_err(|err| {
                    format!(
                        "could not load private key file \"{}\": {err}",
                        key.display()
                    )
                })?;
        }
        let mut connector = MakeTlsConnector::new(builder.build());
        let check_host = self.mode == Mode::VerifyFull;
        connector.set_callback(move |config, _host| {
            config.set_verify_hostname(check_host);
            Ok(())
        });
        Ok(Some(connector))
    }
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Disable => "disable",
            Mode::Prefer => "prefer",
            Mode::Require => "require",
            Mode::VerifyCa => "verify-ca",
            Mode::VerifyFull => "verify-full",
        }
    }
}

/// libpq refuses a key file that group or others may read: 0600 or less
/// for a file of one's own, 0640 or less for one root owns (a key shared
/// through a group, as system packages do).
fn check_key_permissions(key: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(key).map_err(|err| {
        format!(
            "could not read private key file \"{}\": {err}",
            key.display()
        )
    })?;
    let mode = meta.mode();
    let too_open = if meta.uid() == 0 {
        mode & 0o037 != 0
    } else {
        mode & 0o077 != 0
    };
    if too_open {
        return Err(format!(
            "private key file \"{}\" has group or world access; file must have permissions u=rw (0600) \
             or less if owned by the current user, or permissions u=rw,g=r (0640) or less if owned by root",
            key.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
