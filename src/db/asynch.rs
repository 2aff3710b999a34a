//! Connections for the async front end (`--async`): a bb8 pool of
//! diesel-async connections made by tokio-postgres from the same
//! libpq-style URL, with the same connection policy (timeouts, keepalives,
//! `application_name`, the session timeouts in `options`), and TLS by
//! libpq's rules (`tls/`).
//!
//! tokio-postgres reads a subset of libpq's options. An option it cannot
//! honour (a service file, `target_session_attrs=read-only`, ...) is
//! refused by name before anything connects, instead of being dropped.
use std::time::Duration;

use diesel::ConnectionResult;
use diesel_async::pooled_connection::bb8::Pool;
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig};
use diesel_async::AsyncPgConnection;
use futures_util::StreamExt;
use postgres_openssl::MakeTlsConnector;
use tokio_postgres::config::{ChannelBinding, SslMode, TargetSessionAttrs};
use tokio_postgres::{SimpleQueryMessage, SimpleQueryRow};

use super::tls::{Process, TlsSettings};
use super::DbUrl;

/// A bb8 pool of diesel-async connections.
pub type AsyncPool = Pool<AsyncPgConnection>;

/// The tokio-postgres form of `url`, with the connection policy.
///
/// # Errors
/// The first option tokio-postgres cannot honour, named, with what to do.
pub fn tokio_config(url: &DbUrl) -> Result<tokio_postgres::Config, String> {
    let mut config = tokio_postgres::Config::new();
    let seconds = |key: &str, value: &str| -> Result<Duration, String> {
        value
            .trim()
            .parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|_| format!("{key} must be a whole number of seconds, not '{value}'"))
    };
    for (key, value) in url.with_policy().entries() {
        match key {
            "host" => {
                for host in value.split(',') {
                    config.host(host.trim());
                }
            }
            "hostaddr" => {
                for addr in value.split(',') {
                    let addr = addr.trim().parse().map_err(|_| {
                        format!("hostaddr must be IP addresses, and '{}' is not one", addr.trim())
                    })?;
                    config.hostaddr(addr);
                }
            }
            "port" => {
                for port in value.split(',') {
                    let port = port
                        .trim()
                        .parse()
                        .map_err(|_| format!("port must be a number, not '{}'", port.trim()))?;
                    config.port(port);
                }
            }
            "user" => {
                config.user(value);
            }
            "password" => {
                config.password(value);
            }
            "dbname" => {
                config.dbname(value);
            }
            "options" => {
                config.options(value);
            }
            "application_name" => {
                config.application_name(value);
            }
            "connect_timeout" => {
                config.connect_timeout(seconds(key, value)?);
            }
            "keepalives" => {
                config.keepalives(value.trim() != "0");
            }
            "keepalives_idle" => {
                config.keepalives_idle(seconds(key, value)?);
            }
            "keepalives_interval" => {
                config.keepalives_interval(seconds(key, value)?);
            }
            "keepalives_count" => {
                config.keepalives_retries(
                    value
                        .trim()
                        .parse()
                        .map_err(|_| format!("keepalives_count must be a number, not '{value}'"))?,
                );
            }
            "tcp_user_timeout" => {
                let ms: u64 = value
                    .trim()
                    .parse()
                    .map_err(|_| format!("tcp_user_timeout must be milliseconds, not '{value}'"))?;
                config.tcp_user_timeout(Duration::from_millis(ms));
            }
            "target_session_attrs" => match value {
                "any" => {
                    config.target_session_attrs(TargetSessionAttrs::Any);
                }
                "read-write" => {
                    config.target_session_attrs(TargetSessionAttrs::ReadWrite);
                }
                other => {
                    return Err(format!(
                        "--async cannot honour target_session_attrs={other}; use any or read-write, or drop --async"
                    ))
                }
            },
            "channel_binding" => {
                config.channel_binding(match value {
                    "disable" => ChannelBinding::Disable,
                    "prefer" => ChannelBinding::Prefer,
                    "require" => ChannelBinding::Require,
                    other => {
                        return Err(format!(
                            "invalid channel_binding value: \"{other}\"; use disable, prefer or require"
                        ))
                    }
                });
            }
            // TLS: read by `TlsSettings`, which tells `config` below.
            "sslmode" | "sslrootcert" | "sslcert" | "sslkey" => {}
            // Defaults libpq fills in that change nothing here.
            // (`sslsni=1` is what OpenSSL's connector does anyway.)
            "sslnegotiation" | "gssencmode" | "sslcompression" | "krbsrvname" | "sslsni" => {}
            other => {
                return Err(format!(
                    "--async cannot honour the database url's {other} option; drop --async to connect \
                     through libpq, which reads it"
                ))
            }
        }
    }
    // A TLS setting that fails is reported by each connect, as libpq
    // reports it; meanwhile nothing goes out in plaintext.
    config.ssl_mode(tls_settings(url).map_or(SslMode::Require, |tls| tls.ssl_mode()));
    Ok(config)
}

/// How connections to `url` speak TLS, by libpq's rules.
fn tls_settings(url: &DbUrl) -> Result<TlsSettings, String> {
    let info = url.with_policy();
    TlsSettings::from_options(|key| info.get(key).map(str::to_owned), &Process)
}

/// Opens async connections to one URL: its tokio-postgres config and its
/// TLS connector, made once.
#[derive(Clone)]
pub struct AsyncConnector {
    config: tokio_postgres::Config,
    /// `None` for `sslmode=disable`; the error is kept for each connect to
    /// report (a missing CA file is a failed connect, as in libpq).
    tls: Result<Option<MakeTlsConnector>, String>,
    url: DbUrl,
}

impl AsyncConnector {
    /// The connector for `url`.
    ///
    /// # Errors
    /// As [`tokio_config`].
    pub fn new(url: &DbUrl) -> Result<Self, String> {
        Ok(Self {
            config: tokio_config(url)?,
            tls: tls_settings(url).and_then(|tls| tls.connector()),
            url: url.clone(),
        })
    }

    /// One connection. A failure is one line in the words the blocking
    /// front end uses for the same failure (it goes through the same
    /// explanation of libpq's messages), without the password.
    ///
    /// # Errors
    /// `BadConnection` with that line.
    pub async fn connect(&self) -> ConnectionResult<AsyncPgConnection> {
        Ok(self.connect_asking(None).await?.0)
    }

    /// [`AsyncConnector::connect`], and the first row of `first` (a query
    /// without parameters, in text), sent ahead of diesel-async's session
    /// set-up and in its first flight: no round trip of its own, where
    /// diesel-async would prepare the query in one and run it in another.
    ///
    /// # Errors
    /// As [`AsyncConnector::connect`]; the query's failure, as its text.
    pub async fn connect_asking(
        &self,
        first: Option<&str>,
    ) -> ConnectionResult<(AsyncPgConnection, Option<SimpleQueryRow>)> {
        let explained = |text: &str| {
            diesel::ConnectionError::BadConnection(super::connect::explain(text, &self.url))
        };
        let connecting = async {
            match &self.tls {
                Err(text) => Err(explained(text)),
                Ok(None) => {
                    let (client, connection) = self
                        .config
                        .connect(tokio_postgres::NoTls)
                        .await
                        .map_err(|err| explained(&full_text(&err)))?;
                    set_up(client, connection, first).await
                }
                Ok(Some(tls)) => {
                    let (client, connection) = self
                        .config
                        .connect(tls.clone())
                        .await
                        .map_err(|err| explained(&full_text(&err)))?;
                    set_up(client, connection, first).await
                }
            }
        };
        // libpq's connect_timeout bounds the whole connect (TLS, the
        // startup, authentication); tokio-postgres's only the socket's. A
        // server that accepts and never answers would hold this for ever.
        // 0 means no bound, as in libpq.
        match self.config.get_connect_timeout().filter(|t| !t.is_zero()) {
            Some(bound) => tokio::time::timeout(*bound, connecting)
                .await
                .unwrap_or_else(|_| Err(explained("timeout expired"))),
            None => connecting.await,
        }
    }
}

/// Queues `first` on the bare tokio-postgres client in the simple query
/// protocol (the request goes to the connection's queue at once, and its
/// answer waits in its own stream), hands both to diesel-async, whose
/// session set-up follows in the same flight, then reads the answer.
async fn set_up<T>(
    client: tokio_postgres::Client,
    connection: tokio_postgres::Connection<tokio_postgres::Socket, T>,
    first: Option<&str>,
) -> ConnectionResult<(AsyncPgConnection, Option<SimpleQueryRow>)>
where
    T: tokio_postgres::tls::TlsStream + Unpin + Send + 'static,
{
    let failed =
        |err: tokio_postgres::Error| diesel::ConnectionError::BadConnection(full_text(&err));
    let asked = match first {
        Some(sql) => Some(client.simple_query_raw(sql).await.map_err(failed)?),
        None => None,
    };
    let conn = AsyncPgConnection::try_from_client_and_connection(client, connection).await?;
    let mut row = None;
    if let Some(answer) = asked {
        let mut answer = std::pin::pin!(answer);
        // Read to the end: the stream is over at the query's ReadyForQuery.
        while let Some(message) = answer.next().await {
            if let SimpleQueryMessage::Row(found) = message.map_err(failed)? {
                row.get_or_insert(found);
            }
        }
    }
    Ok((conn, row))
}

/// An error with its causes, as libpq would have put them in one message.
fn full_text(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A pool of at most `max_size` async connections to `url`, whose
/// checkouts wait `checkout_wait` at the most, each closed once `lifetime`
/// old (bb8's own limit, without the blocking pool's jitter). No
/// connection is opened until the first checkout.
///
/// # Errors
/// An option tokio-postgres cannot honour ([`tokio_config`]).
pub fn async_pool(
    url: &DbUrl,
    max_size: u32,
    checkout_wait: Duration,
    lifetime: Duration,
) -> Result<AsyncPool, String> {
    let connector = AsyncConnector::new(url)?;
    let mut manager = ManagerConfig::default();
    manager.custom_setup = Box::new(move |_| {
        let connector = connector.clone();
        Box::pin(async move { connector.connect().await })
    });
    Ok(Pool::builder()
        .max_size(max_size)
        .min_idle(Some(0))
        .test_on_check_out(false)
        .idle_timeout(Some(Duration::from_secs(60)))
        .max_lifetime(Some(lifetime))
        .connection_timeout(checkout_wait)
        .build_unchecked(AsyncDieselConnectionManager::new_with_config(
            String::new(),
            manager,
        )))
}

/// [`super::inspect_quickly`] on a first async connection to `url`, which
/// then joins `pool`: `None` when the quick check does not settle it (then
/// the blocking start-up's whole inspection says what is wrong), or when
/// the connection failed. It is made outside the pool, so one failed
/// attempt ends it: the pool would retry until its checkout wait ran out.
pub async fn inspect_quickly(pool: &AsyncPool, url: &DbUrl) -> Option<super::Inspection> {
    let sql = super::quick_check_sql();
    let connector = AsyncConnector::new(url).ok()?;
    let (conn, row) = connector.connect_asking(Some(&sql)).await.ok()?;
    let row = row?;
    let found = super::quick_found_in_text(row.get(0)?, row.get(1)?, row.get(2)?)?;
    let inspection = super::quick_inspection(found)?;
    // Full only if another task got there first: then this one is spare.
    let _ = pool.add(conn);
    Some(inspection)
}
