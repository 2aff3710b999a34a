// A plain unit is never told of a commit in doubt (it is never retried
// after one): its entry point gives it the connection only.
use diesel::prelude::*;
use diesel_tx_retry::Retrier;

fn run(conn: &mut PgConnection) {
    let _ = Retrier::default().transaction(conn, |conn: &mut PgConnection, attempt| {
        let _ = attempt;
        diesel::sql_query("UPDATE counters SET n = n + 1").execute(conn)
    });
}

fn main() {}
