//! Creating and deleting accounts: plain inserts, inserts that meet what a
//! commit in doubt left, and deletes, each idempotent by the ids drawn
//! before the transaction.

use std::collections::HashSet;

use diesel::prelude::*;
use uuid::Uuid;

use super::{BankError, IDS_PER_STATEMENT, MAX_ROWS_PER_INSERT};
use crate::models::Account;
use crate::schema::accounts;
use diesel_tx_retry::{Applied, Keyed};

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
    earlier_batch(attempt, &found, inserted)
}

/// After a commit in doubt, what the rows found say of the batch: all
/// there with our balances and none inserted now is the earlier attempt's
/// batch; anything else is someone else's rows. `found` maps the batch's
/// ids that exist to their balances; `inserted` is how many this attempt
/// inserted. Shared with the async unit.
pub(crate) fn earlier_batch(
    attempt: &Keyed<'_, &[Account]>,
    found: &std::collections::HashMap<Uuid, i64>,
    inserted: usize,
) -> Result<Applied<usize>, BankError> {
    let rows = *attempt.key();
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
    Ok(deleted_of(ids, &deleted, in_doubt))
}

/// What a deletion of `ids` did, from the ids its statements returned
/// (see [`delete_accounts`]). Shared with the async unit.
pub(crate) fn deleted_of(
    ids: &[Uuid],
    deleted: &HashSet<Uuid>,
    in_doubt: bool,
) -> Applied<Vec<Uuid>> {
    if in_doubt {
        if deleted.is_empty() && !ids.is_empty() {
            return Applied::Earlier(ids.to_vec());
        }
        return Applied::Now(ids.to_vec());
    }
    Applied::Now(
        ids.iter()
            .copied()
            .filter(|id| deleted.contains(id))
            .collect(),
    )
}
