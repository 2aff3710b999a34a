//! Moving money: both rows locked in id order, then the ledger row and both
//! balances in one statement ([`MoveFunds`]), idempotent by the ledger key.

use diesel::dsl::array;
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types::{BigInt, Uuid as SqlUuid};
use uuid::Uuid;

use super::{Amount, BankError, Transfer};
use crate::models::Account;
use crate::schema::{accounts, transfers};
use diesel_tx_retry::{Applied, Keyed};

/// Moves money between two accounts in two statements: one `SELECT ... FOR
/// UPDATE` that locks both rows, and one statement that writes the transfer's
/// ledger row (keyed by `key`, drawn before the transaction) and both
/// balances (`MoveFunds`). Locking before reading the balance is what
/// CockroachDB recommends for read-modify-write, and what READ COMMITTED
/// needs: a concurrent transfer queues on the lock instead of failing its
/// commit or losing an update.
///
/// Both rows are locked in id order, so two transfers over the same pair
/// queue instead of deadlocking. On PostgreSQL that order comes from the
/// `ORDER BY`: the rows are sorted before they are locked. CockroachDB locks
/// rows as its scan reads them, and the scan reads the two ids from the
/// primary index in key order, which is the same order (CockroachDB also
/// detects and breaks lock cycles by itself).
///
/// Idempotent by its `key`, drawn by the caller before the retry helper. In
/// a retry after a commit in doubt (`in_doubt`), the ledger is read for
/// the key (found: the earlier attempt committed, and the transfer is
/// [`Applied::Earlier`], with the ledger's amount and the balances now, and
/// applies nothing); if it is not there, the key is claimed with an insert,
/// which waits for an earlier attempt still holding it and then either
/// claims it (that attempt did not commit) or meets it (it did). On every
/// attempt the ledger row's insert is `ON CONFLICT DO NOTHING` and the
/// balances move only if it inserted, so the key's uniqueness, not a read,
/// is what keeps a transfer from applying twice. An earlier transfer's
/// balances before it are worked back from the balances now.
///
/// # Errors
/// [`BankError`]; nothing is changed when it fails.
pub fn transfer(
    conn: &mut PgConnection,
    attempt: &Keyed<'_, Uuid>,
    from: Uuid,
    to: Uuid,
    amount: Amount,
) -> Result<Applied<Transfer>, BankError> {
    let key = *attempt.key();
    check_request(from, to, amount)?;
    // `id = ANY(ARRAY[$1, $2])`, two parameters in an array of known length:
    // one index scan that returns the rows in id order, so the server locks
    // them in that order without sorting. Not `id = ANY($1)` with one array
    // parameter, whose unknown length keeps PostgreSQL planning the prepared
    // statement anew on every execution; not `id = $1 OR id = $2`, which
    // plans as two bitmap index scans, a heap scan and a sort: with the
    // write below, 51 against 39 µs of the server's time (bench/NOTES.md).
    let both = accounts::id.eq_any(array::<SqlUuid, _>((from, to)));
    if attempt.in_doubt() {
        // First the ledger, without locks: an earlier attempt that committed
        // is found at once, whatever contention the accounts are under.
        let amount = match ledger_amount(conn, key)? {
            Some(amount) => Some(amount),
            // Then the key claimed: the insert waits for an earlier attempt
            // still holding it, and either claims it (that attempt did not
            // commit) or meets it (it did). The claim is given back before
            // the transfer writes its real row, in this same transaction.
            None => match claim(conn, key, from, to)? {
                true => {
                    // The earlier attempt did not commit, and cannot now: a
                    // refusal below (insufficient funds) is definite.
                    attempt.not_applied_earlier();
                    unclaim(conn, key)?;
                    None
                }
                false => ledger_amount(conn, key)?,
            },
        };
        if let Some(amount) = amount {
            let now: Vec<Account> = accounts::table
                .filter(both)
                .select(Account::as_select())
                .load(conn)?;
            return Ok(applied_earlier(
                key,
                find(&now, from)?,
                find(&now, to)?,
                amount,
            ));
        }
    }
    let rows: Vec<Account> = accounts::table
        .filter(both)
        .order(accounts::id)
        .for_update()
        .select(Account::as_select())
        .load(conn)?;
    let (source, destination) = (find(&rows, from)?, find(&rows, to)?);
    let amount = amount_to_move(source, amount)?;
    let after: Vec<Account> = MoveFunds {
        key,
        from,
        to,
        amount,
    }
    .load(conn)?;
    if after.is_empty() {
        // The ledger row was there: an earlier attempt committed it, seen
        // only now (READ COMMITTED sees what committed while it waited).
        let amount = ledger_amount(conn, key)?.ok_or(BankError::AccountNotFound(from))?;
        return Ok(applied_earlier(key, source, destination, amount));
    }
    applied_now(key, source, destination, amount, &after)
}

/// What a transfer asks for, checked before anything is read: two
/// accounts, a positive amount. Shared with the async unit.
pub(crate) fn check_request(from: Uuid, to: Uuid, amount: Amount) -> Result<(), BankError> {
    if from == to {
        return Err(BankError::SameAccount(from));
    }
    if let Amount::Exactly(amount @ ..=0) = amount {
        return Err(BankError::NotPositive(amount));
    }
    Ok(())
}

/// The account `id` among `rows`.
pub(crate) fn find(rows: &[Account], id: Uuid) -> Result<Account, BankError> {
    rows.iter()
        .find(|a| a.id == id)
        .copied()
        .ok_or(BankError::AccountNotFound(id))
}

/// How much leaves `source`: `amount` resolved against its balance, which
/// must cover it.
pub(crate) fn amount_to_move(source: Account, amount: Amount) -> Result<i64, BankError> {
    let amount = match amount {
        Amount::HalfOfSource => source.balance / 2,
        Amount::Exactly(amount) => amount,
    };
    if amount > source.balance {
        return Err(BankError::InsufficientFunds {
            id: source.id,
            balance: source.balance,
            amount,
        });
    }
    Ok(amount)
}

/// The transfer this attempt applied: the balances before, and `after`,
/// the rows the write returned.
pub(crate) fn applied_now(
    key: Uuid,
    source: Account,
    destination: Account,
    amount: i64,
    after: &[Account],
) -> Result<Applied<Transfer>, BankError> {
    Ok(Applied::Now(Transfer {
        key,
        from: source,
        to: destination,
        amount,
        from_after: find(after, source.id)?,
        to_after: find(after, destination.id)?,
    }))
}

/// Inserts a placeholder ledger row for `key` unless the key is there;
/// says whether it did.
fn claim(conn: &mut PgConnection, key: Uuid, from: Uuid, to: Uuid) -> QueryResult<bool> {
    let claimed = diesel::insert_into(transfers::table)
        .values((
            transfers::id.eq(key),
            transfers::from_id.eq(from),
            transfers::to_id.eq(to),
            transfers::amount.eq(0),
        ))
        .on_conflict(transfers::id)
        .do_nothing()
        .execute(conn)?;
    Ok(claimed == 1)
}

/// Removes the placeholder [`claim`] inserted in this transaction.
fn unclaim(conn: &mut PgConnection, key: Uuid) -> QueryResult<()> {
    diesel::delete(transfers::table.find(key)).execute(conn)?;
    Ok(())
}

/// The amount of the ledger's transfer `key`, if it is there.
fn ledger_amount(conn: &mut PgConnection, key: Uuid) -> QueryResult<Option<i64>> {
    transfers::table
        .find(key)
        .select(transfers::amount)
        .first(conn)
        .optional()
}

/// A transfer an earlier attempt applied, from the balances now.
pub(crate) fn applied_earlier(
    key: Uuid,
    from_now: Account,
    to_now: Account,
    amount: i64,
) -> Applied<Transfer> {
    Applied::Earlier(Transfer {
        key,
        from: Account {
            balance: from_now.balance + amount,
            ..from_now
        },
        to: Account {
            balance: to_now.balance - amount,
            ..to_now
        },
        amount,
        from_after: from_now,
        to_after: to_now,
    })
}

/// The transfer's write, one statement:
///
/// ```sql
/// WITH logged AS (
///     INSERT INTO transfers (id, from_id, to_id, amount) VALUES (key, from, to, amount)
///     ON CONFLICT (id) DO NOTHING RETURNING id)
/// UPDATE accounts SET balance = balance + CASE WHEN id = from THEN -amount ELSE amount END
///  WHERE id = ANY (ARRAY[from, to]) AND EXISTS (SELECT 1 FROM logged)
/// RETURNING id, balance
/// ```
///
/// The ledger row and the balances in one round trip (a data-modifying CTE,
/// which PostgreSQL and CockroachDB both run), and the balances move only if
/// the ledger row is new: no rows back means the key was there already.
///
/// Written as a query fragment because Diesel's own `UPDATE` is never kept
/// as a prepared statement (its `SET` list may vary between calls), so the
/// server would parse and plan it on every transfer: that cost a third of
/// the workload's throughput (bench/RESULTS.md). This fragment has a fixed
/// shape and a static query id, so Diesel prepares it once per connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MoveFunds {
    pub(crate) key: Uuid,
    pub(crate) from: Uuid,
    pub(crate) to: Uuid,
    pub(crate) amount: i64,
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
        // Built from the schema's tables and columns, so a renamed column
        // fails to compile here instead of failing at run time. Column
        // lists and the SET target are bare names, as PostgreSQL requires.
        out.push_sql("WITH logged AS (INSERT INTO ");
        transfers::table.walk_ast(out.reborrow())?;
        out.push_sql(" (");
        for (i, column) in [
            transfers::id::NAME,
            transfers::from_id::NAME,
            transfers::to_id::NAME,
            transfers::amount::NAME,
        ]
        .into_iter()
        .enumerate()
        {
            if i > 0 {
                out.push_sql(", ");
            }
            out.push_identifier(column)?;
        }
        out.push_sql(") VALUES (");
        out.push_bind_param::<SqlUuid, _>(&self.key)?;
        out.push_sql(", ");
        out.push_bind_param::<SqlUuid, _>(&self.from)?;
        out.push_sql(", ");
        out.push_bind_param::<SqlUuid, _>(&self.to)?;
        out.push_sql(", ");
        out.push_bind_param::<BigInt, _>(&self.amount)?;
        out.push_sql(") ON CONFLICT (");
        out.push_identifier(transfers::id::NAME)?;
        out.push_sql(") DO NOTHING RETURNING ");
        out.push_identifier(transfers::id::NAME)?;
        // The UPDATE names the same three values again by number instead
        // of binding them five more times: four parameters, not nine, to
        // serialize here and to bind on the server, on every transfer. The
        // numbers are those of the four binds above, which are this
        // statement's first (the fragment is always the whole statement,
        // and the unit test pins the text).
        out.push_sql(") UPDATE ");
        accounts::table.walk_ast(out.reborrow())?;
        out.push_sql(" SET ");
        out.push_identifier(accounts::balance::NAME)?;
        out.push_sql(" = ");
        accounts::balance.walk_ast(out.reborrow())?;
        out.push_sql(" + CASE WHEN ");
        accounts::id.walk_ast(out.reborrow())?;
        out.push_sql(" = $2 THEN -$4 ELSE $4 END WHERE ");
        accounts::id.walk_ast(out.reborrow())?;
        // The same one index scan as the transfer's read (see `transfer`).
        out.push_sql(" = ANY (ARRAY[$2, $3]) AND EXISTS (SELECT 1 FROM logged) RETURNING ");
        (accounts::id, accounts::balance).walk_ast(out.reborrow())?;
        Ok(())
    }
}

impl RunQueryDsl<PgConnection> for MoveFunds {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bank::{IDS_PER_STATEMENT, MAX_ROWS_PER_INSERT};

    /// What a statement's messages carry at the most: its text (in Parse)
    /// plus, per bound value, its bytes, a 4-byte length, a 4-byte type
    /// (Parse) and a 2-byte format code (Bind).
    fn message_bytes(sql: &str, values: &[usize]) -> usize {
        sql.len() + values.iter().map(|v| v + 4 + 4 + 2).sum::<usize>()
    }

    #[test]
    fn no_statement_comes_near_cockroachdbs_16_mib_message_limit_at_any_flag_value() {
        const QUARTER_LIMIT: usize = (16 << 20) / 4;
        // The largest INSERT --rows-per-insert allows: a UUID (16 bytes) and
        // an INT8 (8) a row.
        let rows = vec![
            Account {
                id: Uuid::nil(),
                balance: 0
            };
            MAX_ROWS_PER_INSERT
        ];
        let insert =
            diesel::debug_query::<Pg, _>(&diesel::insert_into(accounts::table).values(&rows))
                .to_string();
        let sql = insert.split(" -- binds").next().unwrap();
        let values: Vec<usize> = rows.iter().flat_map(|_| [16, 8]).collect();
        let bytes = message_bytes(sql, &values);
        assert!(bytes < QUARTER_LIMIT, "the largest INSERT: {bytes} bytes");
        // The largest list of ids: one array parameter, 20 bytes an id,
        // whatever --accounts or --rows-per-transaction says (the callers
        // chunk by IDS_PER_STATEMENT).
        let ids = vec![Uuid::nil(); IDS_PER_STATEMENT];
        let delete = diesel::debug_query::<Pg, _>(
            &diesel::delete(accounts::table.filter(accounts::id.eq_any(&ids)))
                .returning(accounts::id),
        )
        .to_string();
        let sql = delete.split(" -- binds").next().unwrap();
        let bytes = message_bytes(sql, &[20 + IDS_PER_STATEMENT * 20]);
        assert!(
            bytes < QUARTER_LIMIT,
            "the largest list of ids: {bytes} bytes"
        );
    }

    #[test]
    fn move_funds_is_one_fixed_statement_over_the_schemas_columns() {
        let key = Uuid::from_u128(9);
        let from = Uuid::from_u128(1);
        let to = Uuid::from_u128(2);
        let sql = diesel::debug_query::<Pg, _>(&MoveFunds {
            key,
            from,
            to,
            amount: 7,
        })
        .to_string();
        assert_eq!(
            sql,
            format!(
                "WITH logged AS (INSERT INTO \"transfers\" (\"id\", \"from_id\", \"to_id\", \"amount\") \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (\"id\") DO NOTHING RETURNING \"id\") \
                 UPDATE \"accounts\" SET \"balance\" = \"accounts\".\"balance\" + CASE WHEN \
                 \"accounts\".\"id\" = $2 THEN -$4 ELSE $4 END WHERE \
                 \"accounts\".\"id\" = ANY (ARRAY[$2, $3]) AND EXISTS (SELECT 1 FROM logged) \
                 RETURNING \"accounts\".\"id\", \"accounts\".\"balance\" \
                 -- binds: [{key}, {from}, {to}, 7]"
            )
        );
    }
}
