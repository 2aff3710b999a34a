// The async helper asks for a unit whose future is Send (so that the call
// can be spawned, or serve as a handler): one that holds an `Rc` across an
// await is refused by the compiler, at the call.
use std::rc::Rc;

use diesel_async::pooled_connection::bb8::Pool;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use diesel_tx_retry::Retrier;

async fn run(pool: Pool<AsyncPgConnection>) {
    let retrier = Retrier::default();
    let _ = retrier
        .transaction_async(&pool, async |conn: &mut AsyncPgConnection| {
            let shared = Rc::new(1);
            diesel::sql_query("SELECT 1").execute(conn).await?;
            Ok::<_, diesel::result::Error>(*shared)
        })
        .await;
}

fn main() {
    let _ = run;
}
