//! The run's accounts checked against their initial balances and the
//! ledger, in one pass.

use diesel::prelude::*;
use uuid::Uuid;

use super::IDS_PER_STATEMENT;
use crate::models::Account;
use crate::schema::{accounts, transfers};
use diesel::sql_types::BigInt;

/// A run's accounts after its transfers, against their initial balances
/// and the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Audit {
    /// The sum of their balances now.
    pub total: i64,
    /// How many of them hold a negative balance.
    pub negative: i64,
    /// The ledger's rows from these accounts.
    pub ledger_rows: u64,
    /// Accounts whose balance is not their initial one plus the ledger's
    /// movements (or that are gone).
    pub mismatched_accounts: u64,
}

/// Reads the balances of `ids`, whose balances were `initial` (in the same
/// order) before any transfer, and reconciles them with the ledger: every
/// balance must be its initial one plus what the ledger moved into it, less
/// what it moved out. The ledger is summed on the server, one row per pair
/// of accounts; the balances are read once, and summed here. One statement
/// of each per [`IDS_PER_STATEMENT`] ids.
///
/// # Errors
/// The database's error, or a sum of balances past INT8 (which holds any
/// sum below 2^63: with balances created below 1,000,000 and transfers that
/// keep the total, over nine trillion accounts).
pub fn audit(conn: &mut PgConnection, ids: &[Uuid], initial: &[i64]) -> QueryResult<Audit> {
    use diesel::dsl::{count_star, sql};
    let mut expected: std::collections::HashMap<Uuid, i64> =
        ids.iter().copied().zip(initial.iter().copied()).collect();
    let mut ledger_rows = 0;
    for chunk in ids.chunks(IDS_PER_STATEMENT) {
        let moved: Vec<(Uuid, Uuid, i64, i64)> = transfers::table
            .filter(transfers::from_id.eq_any(chunk))
            .group_by((transfers::from_id, transfers::to_id))
            .select((
                transfers::from_id,
                transfers::to_id,
                count_star(),
                // SUM(INT8) is NUMERIC on both servers; back to INT8.
                sql::<BigInt>("COALESCE(SUM(amount), 0)::INT8"),
            ))
            .load(conn)?;
        for (from, to, count, amount) in moved {
            ledger_rows += u64::try_from(count).unwrap_or(0);
            *expected.entry(from).or_default() -= amount;
            *expected.entry(to).or_default() += amount;
        }
    }
    let (mut total, mut negative, mut matching) = (0i64, 0, 0);
    for chunk in ids.chunks(IDS_PER_STATEMENT) {
        let now: Vec<Account> = accounts::table
            .filter(accounts::id.eq_any(chunk))
            .select(Account::as_select())
            .load(conn)?;
        for account in now {
            total = total.checked_add(account.balance).ok_or_else(|| {
                diesel::result::Error::DeserializationError(
                    "the sum of the balances overflows INT8".into(),
                )
            })?;
            negative += i64::from(account.balance < 0);
            matching += usize::from(expected.get(&account.id) == Some(&account.balance));
        }
    }
    Ok(Audit {
        total,
        negative,
        ledger_rows,
        mismatched_accounts: (ids.len() - matching) as u64,
    })
}
