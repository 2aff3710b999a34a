//! Contention, forced: two transfers over the same pair of accounts meet
//! after both have read (the conflict harness of the retry crate), so the
//! one that writes second meets a genuine serialization failure every time;
//! the helper retries it, both commit once, and the money adds up.

use std::time::Duration;

use bank::bank::{insert_accounts, transfer, Amount};
use bank::models::Account;
use diesel_tx_retry::testing::{self, Meet};
use diesel_tx_retry::Retrier;
use uuid::Uuid;

use crate::helpers::*;

#[test]
fn two_transfers_forced_into_a_conflict_both_commit_once_after_a_retry() {
    let db = TestDb::migrated();
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let rows = [a, b].map(|id| Account { id, balance: 1_000 });
    insert_accounts(&mut db.conn(), &rows, 2).unwrap();
    let pool = db.pool(2);
    let retrier = Retrier::default().for_server(db.server);
    // Each reads the pair, meets the other, then transfers: the second
    // transfer's locking read finds a row the first changed since its
    // snapshot, and fails with 40001.
    let move_ = |from: Uuid, to: Uuid, amount: i64| {
        let (retrier, pool) = (&retrier, &pool);
        move |meet: &Meet<'_>| {
            retrier
                .build_transaction()
                .run_idempotent(pool, Uuid::new_v4(), |conn, attempt| {
                    let _: i64 = scalar::<diesel::sql_types::BigInt, _>(
                        conn,
                        "(SELECT sum(balance)::INT8 FROM accounts)",
                    )?;
                    meet.here();
                    transfer(conn, attempt, from, to, Amount::Exactly(amount))
                })
        }
    };
    let total = || db.accounts().iter().map(|(_, b)| b).sum::<i64>();
    let done = testing::check(
        Duration::from_secs(30),
        move_(a, b, 100),
        move_(b, a, 30),
        || total() == 2_000 && db.count("transfers") == 2,
    )
    .unwrap_or_else(|line| panic!("{line}"));
    assert_eq!(done[0].retries() + done[1].retries(), 1, "{done:?}");
    let balances: std::collections::BTreeMap<Uuid, i64> = db.accounts().into_iter().collect();
    assert_eq!((balances[&a], balances[&b]), (930, 1_070));
}
