//! First contact: one connection, with libpq's multi-line failures turned
//! into one line that says what to fix, and the session timeouts in its
//! startup options.

use std::time::Duration;

use diesel::prelude::*;

use super::DbUrl;

/// Connecting failed; the message is one line and never holds the password.
/// The driver's own error stays available as the source, but it is not part
/// of the message: libpq's text spans lines and may echo connection details.
#[derive(Debug, thiserror::Error)]
#[error("could not connect to {target}: {reason}")]
pub struct ConnectError {
    target: String,
    reason: String,
    #[source]
    source: diesel::ConnectionError,
}

/// Opens one connection, turning libpq's multi-line messages into one line
/// that says what to fix.
///
/// # Errors
/// [`ConnectError`].
pub fn establish(url: &DbUrl) -> Result<PgConnection, ConnectError> {
    PgConnection::establish(&url.for_libpq()).map_err(|source| ConnectError {
        target: url.redacted(),
        reason: explain(&source.to_string(), url),
        source,
    })
}

/// Opens one connection to `plain` with the session timeouts of
/// [`DbUrl::with_session_timeouts`] in its startup options, and returns it
/// with the URL it used, for the pool. A pooler that refuses startup options
/// (PgBouncer does, unless `ignore_startup_parameters` lists `options`) gets
/// a second try without them and one warning: each transaction still bounds
/// its statements (`SET LOCAL statement_timeout`, in its `BEGIN`), and the
/// pooler ends the server side of a client it lost.
///
/// # Errors
/// [`ConnectError`].
pub fn establish_with_timeouts(
    plain: &DbUrl,
    timeout: Duration,
) -> Result<(PgConnection, DbUrl), ConnectError> {
    let url = plain.with_session_timeouts(timeout);
    let connected = match establish(&url) {
        Ok(conn) => (conn, url),
        Err(err) if refused_options(&err) && plain.options().is_none() => {
            tracing::warn!(
                "the server at {} refused the startup options that set the session timeouts \
                 (a pooler such as PgBouncer does); connecting without them: each transaction \
                 still bounds its statements",
                plain.redacted()
            );
            (establish(plain)?, plain.clone())
        }
        Err(err) => return Err(err),
    };
    // Said once the server answered: a run that cannot connect has one line
    // to say, why not.
    if let Some(line) = plain.unverified_remote(std::env::var("PGSSLMODE").ok().as_deref()) {
        tracing::warn!("{line}");
    }
    Ok(connected)
}

/// Whether a connect failed because the server (a pooler) refuses the
/// startup parameter `options`: PgBouncer's "unsupported startup parameter:
/// options", its only way of saying so.
fn refused_options(err: &ConnectError) -> bool {
    err.source
        .to_string()
        .contains("unsupported startup parameter: options")
}

/// libpq reports connection failures as text only, with no SQLSTATE, so this
/// is the one place that reads message text.
pub(super) fn explain(message: &str, url: &DbUrl) -> String {
    let first_line = message
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("unknown error");
    let has = |needle: &str| message.contains(needle);
    if has("Connection refused") {
        "connection refused; is the server running and listening on that host and port?".to_owned()
    } else if has("No route to host") || has("Network is unreachable") {
        "no route to the server; the network between here and the server is down, or the address is wrong"
            .to_owned()
    } else if has("the database system is starting up")
        || has("the database system is shutting down")
        || has("the database system is in recovery mode")
    {
        format!("{first_line}; the server is restarting, try again in a moment")
    } else if has("could not translate host name") || has("Name or service not known") {
        format!(
            "unknown host (tried {}); check the host name in the database url",
            url.hosts()
        )
    } else if has("timeout expired") {
        "timed out; check the host, the port and any firewall in between (connect_timeout in the url sets the limit)"
            .to_owned()
    } else if has("password authentication failed") {
        "password authentication failed; check the user and password in the database url".to_owned()
    } else if has("does not match host name")
        || has("does not match host")
        // OpenSSL's words, from the async front end.
        || has("hostname mismatch")
        || has("IP address mismatch")
    {
        "the server's certificate does not match the host name; connect with a host name listed in the certificate"
            .to_owned()
    } else if has("root certificate file") && has("does not exist") {
        format!(
            "the CA certificate file {} does not exist; point sslrootcert at the CA certificate that signed the server's",
            url.sslrootcert().unwrap_or("(the default ~/.postgresql/root.crt)")
        )
    } else if has("alert unknown ca")
        || has("alert bad certificate")
        || has("alert certificate unknown")
        // Under TLS 1.3 the client finishes its handshake before the
        // server checks the client's certificate: a server that refuses
        // it closes the connection with our startup message unread, and
        // the reset may overtake its alert. With a certificate sent, that
        // is the likely cause, and one line for both keeps the message the
        // same from run to run.
        || (url.presents_client_certificate()
            && (has("Connection reset by peer")
                || has("server closed the connection unexpectedly")
                || has("SSL SYSCALL error: EOF detected")))
    {
        "the server did not accept the client certificate; point sslcert and sslkey at a certificate \
         signed by the CA the server trusts, and its key"
            .to_owned()
    } else if has("requires a valid client certificate") {
        "the server admits this user only with a client certificate; point sslcert and sslkey at the \
         user's certificate and key"
            .to_owned()
    } else if has("certificate verify failed") || has("root certificate file") {
        "the server's certificate could not be verified; point sslrootcert at the CA certificate that signed it"
            .to_owned()
    } else if has("no encryption") || (has("no pg_hba.conf entry") && has("SSL off")) {
        "the server requires an encrypted connection; use sslmode=verify-full (or require) in the database url"
            .to_owned()
    } else if has("server does not support SSL") || has("server does not support TLS") {
        "the server does not support TLS but sslmode asks for it; use a TLS-enabled server or change sslmode"
            .to_owned()
    } else if has("unsupported startup parameter") {
        format!(
            "{first_line}; a pooler (PgBouncer) refuses startup parameters it does not know: remove it \
             from the database url, or list it in ignore_startup_parameters in pgbouncer.ini"
        )
    } else if has("does not exist") && has("database") {
        format!("{first_line}; create the database first or fix the name in the url")
    } else {
        first_line.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reset_as_tls_begins_with_a_client_certificate_sent_names_the_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("client.crt");
        std::fs::write(&cert, "a certificate").unwrap();
        let with_cert = DbUrl::parse(&format!(
            "host=db.example dbname=bank sslcert={}",
            cert.display()
        ))
        .unwrap();
        let alert = "error performing TLS handshake: tlsv1 alert unknown ca";
        let reset = "error communicating with the server: Connection reset by peer (os error 104)";
        let expected = explain(alert, &with_cert);
        assert!(
            expected.starts_with("the server did not accept the client certificate"),
            "{expected}"
        );
        // Whichever of the two a run sees, the same line.
        assert_eq!(explain(reset, &with_cert), expected);
        // Without a certificate (a named file that is not there, whatever
        // the environment holds) a reset is only a reset.
        let without =
            DbUrl::parse("host=db.example dbname=bank sslcert=/nonexistent/client.crt").unwrap();
        assert!(!explain(reset, &without).contains("certificate"));
    }
}
