//! Statement logging: every statement at debug level on target `bank::sql`.

use diesel::connection::InstrumentationEvent;
use diesel::prelude::*;

/// Logs every statement `conn` runs at debug level on target `bank::sql`.
/// Connection events are left out on purpose: they carry the URL, and with
/// it the password.
pub fn log_statements(conn: &mut PgConnection) {
    conn.set_instrumentation(|event: InstrumentationEvent<'_>| {
        if let InstrumentationEvent::StartQuery { query, .. } = event {
            tracing::debug!(target: "bank::sql", "{query}");
        }
    });
}
