//! The bank's operations: pure units of work on a connection that return
//! what they did and print nothing, so the retry helper can run them again.

pub mod create;

use std::collections::HashSet;

use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types::{BigInt, Uuid as SqlUuid};
use uuid::Uuid;

use crate::models::Account;
use crate::schema::accounts;
use diesel_tx_retry::AsDieselError;

/// Rows per multi-row `INSERT` by default: past a few thousand rows larger
/// statements stop saving time (bench/RESULTS.md has the sweep).
pub const ROWS_PER_INSERT: usize = 2_000;

/// Each row binds two parameters and the protocol allows 65,535 per
/// statement.
pub const MAX_ROWS_PER_INSERT: usize = 65_535 / 2;

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BankError {
    /// An account the operation needs is not there.
    #[error("account {0} does not exist")]
    AccountNotFound(Uuid),
    /// The source account cannot cover the amount.
    #[error("account {id} holds {balance}, less than the {amount} to transfer")]
    InsufficientFunds {
        /// The source account.
        id: Uuid,
        /// Its balance.
        balance: i64,
        /// The amount asked for.
        amount: i64,
    },
    /// A transfer needs two different accounts.
    #[error("cannot transfer from account {0} to itself")]
    SameAccount(Uuid),
    /// A fixed amount must move something, and forwards.
    #[error("cannot transfer {0}: the amount must be at least 1")]
    NotPositive(i64),
    /// The database refused or failed.
    #[error(transparent)]
    Database(#[from] diesel::result::Error),
}

impl AsDieselError for BankError {
    fn as_diesel(&self) -> Option<&diesel::result::Error> {
        match self {
            BankError::Database(err) => Some(err),
            _ => None,
        }
    }
}

/// Inserts `rows` in multi-row statements of at most `rows_per_insert` rows
/// (at most [`MAX_ROWS_PER_INSERT`]).
///
/// # Errors
/// The database's error; a duplicate id is a `UniqueViolation`.
pub fn insert_accounts(
    conn: &mut PgConnection,
    rows: &[Account],
    rows_per_insert: usize,
) -> QueryResult<usize> {
    let mut inserted = 0;
    for chunk in rows.chunks(rows_per_insert.clamp(1, MAX_ROWS_PER_INSERT)) {
        inserted += diesel::insert_into(accounts::table)
            .values(chunk)
            .execute(conn)?;
    }
    Ok(inserted)
}

/// How much a transfer moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Amount {
    /// `floor(source balance / 2)`, read inside the transaction, as the tutorial does.
    HalfOfSource,
    /// A fixed amount, at least 1 ([`transfer`] refuses others).
    Exactly(i64),
}

/// A committed transfer, as the transaction saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transfer {
    /// The source before the transfer.
    pub from: Account,
    /// The destination before the transfer.
    pub to: Account,
    /// What moved.
    pub amount: i64,
    /// The source after the transfer.
    pub from_after: Account,
    /// The destination after the transfer.
    pub to_after: Account,
}

/// Moves money between two accounts in two statements: one `SELECT ... FOR
/// UPDATE` that locks both rows, and one `UPDATE ... RETURNING` for both
/// balances. Locking before reading the balance is what CockroachDB
/// recommends for read-modify-write: a concurrent transfer queues on the
/// lock instead of failing its commit.
///
/// Both rows are locked in id order, so two transfers over the same pair
/// queue instead of deadlocking. On PostgreSQL that order comes from the
/// `ORDER BY`: the rows are sorted before they are locked. CockroachDB locks
/// rows as its scan reads them, and the scan reads the two ids from the
/// primary index in key order, which is the same order (CockroachDB also
/// detects and breaks lock cycles by itself).
///
/// # Errors
/// [`BankError`]; nothing is changed when it fails.
pub fn transfer(
    conn: &mut PgConnection,
    from: Uuid,
    to: Uuid,
    amount: Amount,
) -> Result<Transfer, BankError> {
    if from == to {
        return Err(BankError::SameAccount(from));
    }
    if let Amount::Exactly(amount @ ..=0) = amount {
        return Err(BankError::NotPositive(amount));
    }
    // `id = $1 OR id = $2` rather than `id = ANY($1)`: with an array of
    // unknown length PostgreSQL keeps planning the prepared statement anew
    // on every execution, while this form settles on one generic plan.
    let both = accounts::id.eq(from).or(accounts::id.eq(to));
    let rows: Vec<Account> = accounts::table
        .filter(both)
        .order(accounts::id)
        .for_update()
        .select(Account::as_select())
        .load(conn)?;
    let find = |id: Uuid| {
        rows.iter()
            .find(|a| a.id == id)
            .copied()
            .ok_or(BankError::AccountNotFound(id))
    };
    let (source, destination) = (find(from)?, find(to)?);
    let amount = match amount {
        Amount::HalfOfSource => source.balance / 2,
        Amount::Exactly(amount) => amount,
    };
    if amount > source.balance {
        return Err(BankError::InsufficientFunds {
            id: from,
            balance: source.balance,
            amount,
        });
    }
    let after: Vec<Account> = MoveFunds { from, to, amount }.load(conn)?;
    let find_after = |id: Uuid| {
        after
            .iter()
            .find(|a| a.id == id)
            .copied()
            .ok_or(BankError::AccountNotFound(id))
    };
    Ok(Transfer {
        from: source,
        to: destination,
        amount,
        from_after: find_after(from)?,
        to_after: find_after(to)?,
    })
}

/// `UPDATE accounts SET balance = balance ± amount ... RETURNING id, balance`
/// for both accounts of a transfer at once.
///
/// Written as a query fragment because Diesel's own `UPDATE` is never kept
/// as a prepared statement (its `SET` list may vary between calls), so the
/// server would parse and plan it on every transfer: that cost a third of
/// the workload's throughput (bench/RESULTS.md). This fragment has a fixed
/// shape and a static query id, so Diesel prepares it once per connection.
#[derive(Debug, Clone, Copy)]
struct MoveFunds {
    from: Uuid,
    to: Uuid,
    amount: i64,
}

impl QueryId for MoveFunds {
    type QueryId = Self;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl Query for MoveFunds {
    type SqlType = (SqlUuid, BigInt);
}

impl QueryFragment<Pg> for MoveFunds {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        // Built from the schema's table and columns, so a renamed column
        // fails to compile here instead of failing at run time. The SET
        // target is a bare column name, as PostgreSQL requires.
        out.push_sql("UPDATE ");
        accounts::table.walk_ast(out.reborrow())?;
        out.push_sql(" SET ");
        out.push_identifier(accounts::balance::NAME)?;
        out.push_sql(" = ");
        accounts::balance.walk_ast(out.reborrow())?;
        out.push_sql(" + CASE WHEN ");
        accounts::id.walk_ast(out.reborrow())?;
        out.push_sql(" = ");
        out.push_bind_param::<SqlUuid, _>(&self.from)?;
        out.push_sql(" THEN -");
        out.push_bind_param::<BigInt, _>(&self.amount)?;
        out.push_sql(" ELSE ");
        out.push_bind_param::<BigInt, _>(&self.amount)?;
        out.push_sql(" END WHERE ");
        accounts::id.walk_ast(out.reborrow())?;
        out.push_sql(" = ");
        out.push_bind_param::<SqlUuid, _>(&self.from)?;
        out.push_sql(" OR ");
        accounts::id.walk_ast(out.reborrow())?;
        out.push_sql(" = ");
        out.push_bind_param::<SqlUuid, _>(&self.to)?;
        out.push_sql(" RETURNING ");
        (accounts::id, accounts::balance).walk_ast(out.reborrow())?;
        Ok(())
    }
}

impl RunQueryDsl<PgConnection> for MoveFunds {}

/// Deletes the given accounts in one statement and returns the ids that
/// were there to delete, in the order given.
///
/// # Errors
/// The database's error.
pub fn delete_accounts(conn: &mut PgConnection, ids: &[Uuid]) -> QueryResult<Vec<Uuid>> {
    let deleted: HashSet<Uuid> = diesel::delete(accounts::table.filter(accounts::id.eq_any(ids)))
        .returning(accounts::id)
        .get_results::<Uuid>(conn)?
        .into_iter()
        .collect();
    Ok(ids
        .iter()
        .copied()
        .filter(|id| deleted.contains(id))
        .collect())
}

/// The sum of the given accounts' balances and how many are negative.
///
/// # Errors
/// The database's error.
pub fn balance_summary(conn: &mut PgConnection, ids: &[Uuid]) -> QueryResult<(i64, i64)> {
    // SUM(INT8) is NUMERIC on both servers, cast back to INT8 here. INT8
    // holds any sum below 2^63 (about 9.2e18): with balances created below
    // 1,000,000 and transfers that keep the total, that is over nine trillion
    // accounts. Past that the cast fails with an out-of-range error; it never
    // wraps.
    accounts::table
        .filter(accounts::id.eq_any(ids))
        .select((
            diesel::dsl::sql::<BigInt>("COALESCE(SUM(balance), 0)::INT8"),
            diesel::dsl::sql::<BigInt>("COUNT(*) FILTER (WHERE balance < 0)"),
        ))
        .get_result(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn move_funds_is_one_fixed_update_over_the_schemas_columns() {
        let from = Uuid::from_u128(1);
        let to = Uuid::from_u128(2);
        let sql = diesel::debug_query::<Pg, _>(&MoveFunds {
            from,
            to,
            amount: 7,
        })
        .to_string();
        assert_eq!(
            sql,
            format!(
                "UPDATE \"accounts\" SET \"balance\" = \"accounts\".\"balance\" + CASE WHEN \
                 \"accounts\".\"id\" = $1 THEN -$2 ELSE $3 END WHERE \
                 \"accounts\".\"id\" = $4 OR \"accounts\".\"id\" = $5 \
                 RETURNING \"accounts\".\"id\", \"accounts\".\"balance\" \
                 -- binds: [{from}, 7, 7, {from}, {to}]"
            )
        );
    }
}
