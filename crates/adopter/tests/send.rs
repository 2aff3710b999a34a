//! The async helper's future is `Send` when its unit borrows the
//! connection: it compiles inside `tokio::spawn` and as a web framework's
//! handler (axum's `Handler` asks exactly this of its future). The proof is
//! that this file compiles; the test runs the spawned call once against
//! PostgreSQL.

use std::future::Future;
use std::sync::Arc;

use diesel_async::pooled_connection::bb8::Pool;
use diesel_async::pooled_connection::AsyncDieselConnectionManager;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use diesel_tx_retry::{boxed, Applied, Keyed, Retrier, TxError};
use uuid::Uuid;

/// What a handler's state holds.
#[derive(Clone)]
struct AppState {
    pool: Pool<AsyncPgConnection>,
    retrier: Arc<Retrier>,
}

/// A handler as axum takes one: a function of the state whose future is
/// `Send + 'static`.
fn assert_handler<S, F, Fut>(_handler: F)
where
    F: Fn(S) -> Fut + Clone + Send + 'static,
    Fut: Future + Send + 'static,
{
}

/// Restocks and places an order, the shop's two kinds of unit, each
/// borrowing the connection across its awaits.
async fn order(state: AppState) -> Result<Applied<()>, TxError<diesel::result::Error>> {
    let item = String::from("tea");
    state
        .retrier
        .transaction_async(&state.pool, async |conn: &mut AsyncPgConnection| {
            diesel::sql_query("INSERT INTO stock VALUES ($1, 1) ON CONFLICT (item) DO UPDATE SET \"left\" = stock.\"left\" + 1")
                .bind::<diesel::sql_types::Text, _>(&item)
                .execute(conn)
                .await
        })
        .await?;
    state
        .retrier
        .idempotent_transaction_async(
            &state.pool,
            Uuid::new_v4(),
            async |conn: &mut AsyncPgConnection, attempt: &Keyed<'_, Uuid>| {
                let inserted =
                    diesel::sql_query("INSERT INTO orders VALUES ($1, $2) ON CONFLICT DO NOTHING")
                        .bind::<diesel::sql_types::Uuid, _>(attempt.key())
                        .bind::<diesel::sql_types::Text, _>(&item)
                        .execute(conn)
                        .await?;
                if inserted == 0 {
                    return Ok(Applied::Earlier(()));
                }
                attempt.not_applied_earlier();
                diesel::sql_query("UPDATE stock SET \"left\" = \"left\" - 1 WHERE item = $1")
                    .bind::<diesel::sql_types::Text, _>(&item)
                    .execute(conn)
                    .await?;
                Ok(Applied::Now(()))
            },
        )
        .await
}

/// The boxed-future fallback, for a unit an async closure cannot express.
async fn count_boxed(state: AppState) -> Result<usize, TxError<diesel::result::Error>> {
    state
        .retrier
        .transaction_async(
            &state.pool,
            boxed(|conn| {
                Box::pin(async move { diesel::sql_query("SELECT 1").execute(conn).await })
            }),
        )
        .await
}

#[test]
fn the_async_helper_runs_in_a_spawned_task_and_as_a_handler() {
    assert_handler(order);
    assert_handler(count_boxed);
    let db = testbed::Database::create();
    db.exec(adopter::SCHEMA);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let placed = runtime.block_on(async {
        let pool = Pool::builder()
            .max_size(2)
            .build(AsyncDieselConnectionManager::<AsyncPgConnection>::new(
                &db.url,
            ))
            .await
            .unwrap();
        let state = AppState {
            pool,
            retrier: Arc::new(Retrier::default()),
        };
        let spawned = tokio::spawn(order(state.clone()));
        let placed = spawned.await.unwrap().unwrap();
        assert_eq!(tokio::spawn(count_boxed(state)).await.unwrap().unwrap(), 1);
        placed
    });
    assert_eq!(placed, Applied::Now(()));
    assert_eq!(adopter::left(&mut db.conn(), "tea").unwrap(), 0);
}
