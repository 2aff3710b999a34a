// An idempotent unit goes through its own entry point, which takes the key.
use diesel::prelude::*;
use diesel_tx_retry::{Applied, Retrier};

fn run(conn: &mut PgConnection) {
    let _ = Retrier::default().idempotent_transaction(conn, |conn: &mut PgConnection, _attempt| {
        diesel::sql_query("UPDATE counters SET n = n + 1").execute(conn)?;
        Ok::<_, diesel::result::Error>(Applied::Now(()))
    });
}

fn main() {}
