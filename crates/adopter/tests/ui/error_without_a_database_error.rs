// A unit's error must be able to hold the database's error (From<diesel::result::Error>):
// a `String` cannot, so the helper could never tell a conflict from a refusal.
use diesel::prelude::*;
use diesel_tx_retry::Retrier;

fn run(conn: &mut PgConnection) {
    let _ = Retrier::default().transaction(conn, |_conn: &mut PgConnection| Err::<(), String>("no".to_owned()));
}

fn main() {}
