// An idempotent unit says what it found: it returns an `Applied`, so there
// is no "applied now" by default to forget.
use diesel::prelude::*;
use diesel_tx_retry::Retrier;

fn run(conn: &mut PgConnection) {
    let _ = Retrier::default().idempotent_transaction(conn, 7, |conn: &mut PgConnection, _attempt| {
        diesel::sql_query("UPDATE counters SET n = n + 1").execute(conn)
    });
}

fn main() {}
