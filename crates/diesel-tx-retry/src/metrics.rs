//! Metrics through the `metrics` facade (feature `metrics`), under the
//! Prometheus form of OpenTelemetry's names; without the feature, nothing.
//! The application installs a recorder (an exporter); without one the
//! facade drops them.
//!
//! | name | kind | labels |
//! |---|---|---|
//! | `db_client_operation_duration_seconds` | histogram over a whole call, every attempt included | `db_system_name` (`cockroachdb`, `postgresql`), `outcome` |
//! | `db_client_transaction_attempts` | histogram of attempts per call | |
//! | `db_client_transaction_retries_total` | counter | `cause` |
//! | `db_client_transaction_gave_up_total` | counter | `budget` |
//! | `db_client_commits_in_doubt_total` | counter | `resolution` (`applied_earlier`, `applied_now`, `unresolved`) |

use std::time::Duration;

use crate::{Budget, Cause, Server};

/// The duration histogram's name.
pub(crate) const OPERATION_DURATION: &str = "db_client_operation_duration_seconds";
/// The attempts histogram's name.
pub(crate) const ATTEMPTS: &str = "db_client_transaction_attempts";
/// The retries counter's name.
pub(crate) const RETRIES: &str = "db_client_transaction_retries_total";
/// The give-ups counter's name.
pub(crate) const GAVE_UP: &str = "db_client_transaction_gave_up_total";
/// The commits-in-doubt counter's name.
pub(crate) const IN_DOUBT: &str = "db_client_commits_in_doubt_total";

/// A call ended with `outcome` after `attempts` attempts in `elapsed`.
pub(crate) fn operation(server: Server, outcome: &'static str, elapsed: Duration, attempts: u32) {
    #[cfg(feature = "metrics")]
    {
        metrics::histogram!(OPERATION_DURATION, "db_system_name" => server.to_string(), "outcome" => outcome)
            .record(elapsed.as_secs_f64());
        metrics::histogram!(ATTEMPTS).record(f64::from(attempts));
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (
        server,
        outcome,
        elapsed,
        attempts,
        OPERATION_DURATION,
        ATTEMPTS,
    );
}

/// A retry for `cause`.
pub(crate) fn retry(cause: Cause) {
    #[cfg(feature = "metrics")]
    metrics::counter!(RETRIES, "cause" => cause.to_string()).increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = (cause, RETRIES);
}

/// A call given up when `budget` ran out.
pub(crate) fn gave_up(budget: Budget) {
    #[cfg(feature = "metrics")]
    metrics::counter!(GAVE_UP, "budget" => budget.to_string()).increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = (budget, GAVE_UP);
}

/// A call whose commit was in doubt ended, the doubt `resolution`.
pub(crate) fn in_doubt(resolution: &'static str) {
    #[cfg(feature = "metrics")]
    metrics::counter!(IN_DOUBT, "resolution" => resolution).increment(1);
    #[cfg(not(feature = "metrics"))]
    let _ = (resolution, IN_DOUBT);
}
