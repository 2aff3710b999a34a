//! Connections for the async front end (`--async`): a bb8 pool of
//! diesel-async connections made by tokio-postgres from the same
//! libpq-style URL, with the same connection policy (timeouts, keepalives,
//! `application_name`, the session timeouts in `options`).
//!
//! tokio-postgres reads a subset of libpq's options, and speaks TLS only
//! through a connector of its own; this front end connects without TLS.
//! An option it cannot honour (`sslmode=require` or stricter, the `ssl*`
//! files, a service file) is refused by name before anything connects,
//! instead of being dropped: a URL that asks for TLS must not quietly get
//! a plaintext connection.

use std::time::Duration;

use diesel::ConnectionResult;
use diesel_async::pooled_connection::bb8::Pool;
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig};
use diesel_async::AsyncPgConnection;
use tokio_postgres::config::{SslMode, TargetSessionAttrs};

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
            "sslmode" => match value {
                "disable" => {
                    config.ssl_mode(SslMode::Disable);
                }
                // libpq's default: TLS if the server offers it. Without a
                // TLS connector, tokio-postgres connects in plaintext, as
                // prefer allows.
                "allow" | "prefer" => {
                    config.ssl_mode(SslMode::Disable);
                }
                other => {
                    return Err(format!(
                        "--async does not speak TLS yet, and the database url asks for sslmode={other}; \
                         drop --async to use libpq's TLS, or use sslmode=disable on a network you trust"
                    ))
                }
            },
            // Defaults libpq fills in that change nothing here.
            "sslnegotiation" | "gssencmode" | "sslcompression" | "krbsrvname" => {}
            other => {
                return Err(format!(
                    "--async cannot honour the database url's {other} option; drop --async to connect \
                     through libpq, which reads it"
                ))
            }
        }
    }
    Ok(config)
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
    let config = tokio_config(url)?;
    let mut manager = ManagerConfig::default();
    manager.custom_setup = Box::new(move |_| {
        let config = config.clone();
        Box::pin(async move { connect(&config).await })
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

/// [`super::inspect_quickly`] on an async connection from `pool`: `None`
/// when the quick check does not settle it (then the blocking start-up's
/// whole inspection says what is wrong), or when no connection came.
pub async fn inspect_quickly(pool: &AsyncPool) -> Option<super::Inspection> {
    use diesel_async::RunQueryDsl;
    let mut conn = pool.get().await.ok()?;
    let found = super::quick_check().get_result(&mut conn).await.ok()?;
    super::quick_inspection(found)
}

async fn connect(config: &tokio_postgres::Config) -> ConnectionResult<AsyncPgConnection> {
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|err| diesel::ConnectionError::BadConnection(err.to_string()))?;
    AsyncPgConnection::try_from_client_and_connection(client, connection).await
}
