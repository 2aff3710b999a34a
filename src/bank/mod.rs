//! The bank's operations: pure units of work on a connection that return
//! what they did and print nothing, so the retry helper can run them again.

pub mod asynch;
pub mod create;

use std::collections::HashSet;

use diesel::dsl::array;
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types::{BigInt, Uuid as SqlUuid};
use uuid::Uuid;

use crate::models::Account;
use crate::schema::{accounts, transfers};
use diesel_tx_retry::{Applied, Keyed, Resolution};

/// Rows per multi-row `INSERT` by default: past a few thousand rows larger
/// statements stop saving time (bench/RESULTS.md has the sweep).
pub const ROWS_PER_INSERT: usize = 2_000;

/// Each row binds two parameters and the protocol allows 65,535 per
/// statement.
pub const MAX_ROWS_PER_INSERT: usize = 65_535 / 2;

/// Ids bound by one statement at most: a statement that names more (a
/// delete batch, the balance check of a million accounts) is sent as
/// several. CockroachDB refuses any client message over
/// `sql.conn.max_read_buffer_message_size`, 16 MiB by default
/// (cockroachdb/cockroach#63782), and ids travel in one array parameter of
/// 20 bytes each (16 for the UUID, 4 for its length): 50,000 of them are
/// about 1 MB, whatever `--accounts` or `--rows-per-transaction` says.
pub const IDS_PER_STATEMENT: usize = 50_000;

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
    /// Rows with this run's ids are in the table with other balances: not
    /// this run's earlier attempt, someone else's rows.
    #[error("accounts with this run's ids exist with other balances (account {0}); use another seed, or none")]
    NotOurs(Uuid),
    /// The database refused or failed. Its own message, and its source, so
    /// that the retry helper finds it (a transparent variant would hide
    /// it).
    #[error("{0}")]
    Database(#[from] diesel::result::Error),
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

/// Inserts `rows` like [`insert_accounts`], in a retry after a commit in
/// doubt: `ON CONFLICT (id) DO NOTHING`, so that rows the earlier attempt
/// committed are met, not duplicated. An `INSERT` of a key that an earlier
/// transaction still holds uncommitted waits for it, so what it meets is
/// settled. All rows new: the earlier attempt did not commit, and they are
/// inserted now. None new: it did, if the rows there hold the balances this
/// run drew (checked). Anything else is someone else's rows.
///
/// # Errors
/// [`BankError::NotOurs`] for rows that are not this run's; the database's
/// error.
pub fn insert_accounts_resolving(
    conn: &mut PgConnection,
    attempt: &Keyed<'_, &[Account]>,
    rows_per_insert: usize,
) -> Result<Applied<usize>, BankError> {
    let rows = attempt.key();
    let mut inserted = 0;
    for chunk in rows.chunks(rows_per_insert.clamp(1, MAX_ROWS_PER_INSERT)) {
        inserted += diesel::insert_into(accounts::table)
            .values(chunk)
            .on_conflict(accounts::id)
            .do_nothing()
            .execute(conn)?;
    }
    if inserted == rows.len() {
        return Ok(Applied::Now(inserted));
    }
    // Every row is settled (each insert waited for an earlier attempt
    // holding its key): a refusal below is definite, not in doubt.
    let ids: Vec<Uuid> = rows.iter().map(|a| a.id).collect();
    let mut found = std::collections::HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(IDS_PER_STATEMENT) {
        let accounts: Vec<Account> = accounts::table
            .filter(accounts::id.eq_any(chunk))
            .select(Account::as_select())
            .load(conn)?;
        found.extend(accounts.into_iter().map(|a| (a.id, a.balance)));
    }
    if let Some(other) = rows.iter().find(|a| found.get(&a.id) != Some(&a.balance)) {
        attempt.not_applied_earlier();
        return Err(BankError::NotOurs(other.id));
    }
    if inserted > 0 {
        // Some of the rows were there and some not: the earlier attempt was
        // one transaction, so those were someone else's.
        attempt.not_applied_earlier();
        return Err(BankError::NotOurs(rows[0].id));
    }
    Ok(Applied::Earlier(rows.len()))
}

/// Creates the rows of `attempt`'s key, drawn before the transaction (the
/// batch is its own key): a plain insert unless an earlier attempt's commit
/// is in doubt, so that
/// rows already there (a repeated `--seed`) are a definite duplicate, and
/// [`insert_accounts_resolving`] after a commit in doubt.
///
/// # Errors
/// The database's error (a duplicate id is a `UniqueViolation`), or
/// [`BankError::NotOurs`].
pub fn create_batch(
    conn: &mut PgConnection,
    attempt: &Keyed<'_, &[Account]>,
    rows_per_insert: usize,
) -> Result<Applied<usize>, BankError> {
    if attempt.in_doubt() {
        insert_accounts_resolving(conn, attempt, rows_per_insert)
    } else {
        Ok(Applied::Now(insert_accounts(
            conn,
            attempt.key(),
            rows_per_insert,
        )?))
    }
}

/// Says at debug level (`-v`) how a commit in doubt of `phase` ended.
pub fn log_doubt(phase: &str, doubt: Option<Resolution>) {
    match doubt {
        Some(Resolution::AppliedEarlier) => tracing::debug!(
            "{phase}: the commit was in doubt; the retry found it applied by the earlier attempt"
        ),
        Some(Resolution::AppliedNow) => tracing::debug!(
            "{phase}: the commit was in doubt; the earlier attempt had not applied it, the retry did"
        ),
        _ => {}
    }
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
    /// Its key in the ledger, drawn before the transaction.
    pub key: Uuid,
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
    if from == to {
        return Err(BankError::SameAccount(from));
    }
    if let Amount::Exactly(amount @ ..=0) = amount {
        return Err(BankError::NotPositive(amount));
    }
    // `id = ANY(ARRAY[$1, $2])`, two parameters in an array of known length:
    // one index scan that returns the rows in id order, so the server locks
    // them in that order without sorting. Not `id = ANY($1)` with one array
    // parameter, whose unknown length keeps PostgreSQL planning the prepared
    // statement anew on every execution; not `id = $1 OR id = $2`, which
    // plans as two bitmap index scans, a heap scan and a sort: with the
    // write below, 51 against 39 µs of the server's time (bench/NOTES.md).
    let both = accounts::id.eq_any(array::<SqlUuid, _>((from, to)));
    let find = |rows: &[Account], id: Uuid| {
        rows.iter()
            .find(|a| a.id == id)
            .copied()
            .ok_or(BankError::AccountNotFound(id))
    };
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
    Ok(Applied::Now(Transfer {
        key,
        from: source,
        to: destination,
        amount,
        from_after: find(&after, from)?,
        to_after: find(&after, to)?,
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

/// Deletes the given accounts, in one statement per
/// [`IDS_PER_STATEMENT`] ids, and returns the ids that were there to
/// delete, in the order given.
///
/// Idempotent by the ids, chosen before the transaction: in a retry after a
/// commit in doubt (`in_doubt`) they are gone either way once the statement
/// ran (it waits for an earlier attempt still holding their rows), so all of
/// them are reported deleted; none found means the earlier attempt had
/// deleted them ([`Applied::Earlier`]).
///
/// # Errors
/// The database's error.
pub fn delete_accounts(
    conn: &mut PgConnection,
    ids: &[Uuid],
    in_doubt: bool,
) -> QueryResult<Applied<Vec<Uuid>>> {
    let mut deleted = HashSet::with_capacity(ids.len());
    for chunk in ids.chunks(IDS_PER_STATEMENT) {
        deleted.extend(
            diesel::delete(accounts::table.filter(accounts::id.eq_any(chunk)))
                .returning(accounts::id)
                .get_results::<Uuid>(conn)?,
        );
    }
    if in_doubt {
        if deleted.is_empty() && !ids.is_empty() {
            return Ok(Applied::Earlier(ids.to_vec()));
        }
        return Ok(Applied::Now(ids.to_vec()));
    }
    Ok(Applied::Now(
        ids.iter()
            .copied()
            .filter(|id| deleted.contains(id))
            .collect(),
    ))
}

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

#[cfg(test)]
mod tests {
    use super::*;

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
