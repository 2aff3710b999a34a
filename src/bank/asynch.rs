//! The bank's units of work for the async front end (`--async`): the same
//! statements and the same rules as their blocking twins in [`super`]
//! (whose docs say why each is written as it is), awaited on diesel-async.

use std::collections::HashSet;

use diesel::dsl::array;
use diesel::prelude::*;
use diesel::sql_types::Uuid as SqlUuid;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::accounts::{deleted_of, earlier_batch};
use super::transfer::{amount_to_move, applied_now, check_request, find};
use super::{
    applied_earlier, Amount, BankError, MoveFunds, Transfer, IDS_PER_STATEMENT, MAX_ROWS_PER_INSERT,
};
use crate::models::Account;
use crate::schema::{accounts, transfers};
use diesel_tx_retry::{Applied, Keyed};

/// [`super::create_batch`]: a plain insert, or after a commit in doubt one
/// that meets the rows an earlier attempt committed.
///
/// # Errors
/// The database's error (a duplicate id is a `UniqueViolation`), or
/// [`BankError::NotOurs`].
pub async fn create_batch(
    conn: &mut AsyncPgConnection,
    attempt: &Keyed<'_, &[Account]>,
    rows_per_insert: usize,
) -> Result<Applied<usize>, BankError> {
    let rows = *attempt.key();
    let mut inserted = 0;
    for chunk in rows.chunks(rows_per_insert.clamp(1, MAX_ROWS_PER_INSERT)) {
        inserted += if attempt.in_doubt() {
            diesel::insert_into(accounts::table)
                .values(chunk)
                .on_conflict(accounts::id)
                .do_nothing()
                .execute(conn)
                .await?
        } else {
            diesel::insert_into(accounts::table)
                .values(chunk)
                .execute(conn)
                .await?
        };
    }
    if !attempt.in_doubt() || inserted == rows.len() {
        return Ok(Applied::Now(inserted));
    }
    let ids: Vec<Uuid> = rows.iter().map(|a| a.id).collect();
    let mut found = std::collections::HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(IDS_PER_STATEMENT) {
        let accounts: Vec<Account> = accounts::table
            .filter(accounts::id.eq_any(chunk))
            .select(Account::as_select())
            .load(conn)
            .await?;
        found.extend(accounts.into_iter().map(|a| (a.id, a.balance)));
    }
    earlier_batch(attempt, &found, inserted)
}

/// [`super::transfer`]: both rows locked in id order, then the ledger row
/// and both balances in one statement; idempotent by the attempt's key.
///
/// # Errors
/// [`BankError`]; nothing is changed when it fails.
pub async fn transfer(
    conn: &mut AsyncPgConnection,
    attempt: &Keyed<'_, Uuid>,
    from: Uuid,
    to: Uuid,
    amount: Amount,
) -> Result<Applied<Transfer>, BankError> {
    let key = *attempt.key();
    check_request(from, to, amount)?;
    let both = || accounts::id.eq_any(array::<SqlUuid, _>((from, to)));
    if attempt.in_doubt() {
        let amount = match ledger_amount(conn, key).await? {
            Some(amount) => Some(amount),
            None => {
                let claimed = diesel::insert_into(transfers::table)
                    .values((
                        transfers::id.eq(key),
                        transfers::from_id.eq(from),
                        transfers::to_id.eq(to),
                        transfers::amount.eq(0),
                    ))
                    .on_conflict(transfers::id)
                    .do_nothing()
                    .execute(conn)
                    .await?;
                if claimed == 1 {
                    attempt.not_applied_earlier();
                    diesel::delete(transfers::table.find(key))
                        .execute(conn)
                        .await?;
                    None
                } else {
                    ledger_amount(conn, key).await?
                }
            }
        };
        if let Some(amount) = amount {
            let now: Vec<Account> = accounts::table
                .filter(both())
                .select(Account::as_select())
                .load(conn)
                .await?;
            return Ok(applied_earlier(
                key,
                find(&now, from)?,
                find(&now, to)?,
                amount,
            ));
        }
    }
    let rows: Vec<Account> = accounts::table
        .filter(both())
        .order(accounts::id)
        .for_update()
        .select(Account::as_select())
        .load(conn)
        .await?;
    let (source, destination) = (find(&rows, from)?, find(&rows, to)?);
    let amount = amount_to_move(source, amount)?;
    let after: Vec<Account> = MoveFunds {
        key,
        from,
        to,
        amount,
    }
    .load(conn)
    .await?;
    if after.is_empty() {
        let amount = ledger_amount(conn, key)
            .await?
            .ok_or(BankError::AccountNotFound(from))?;
        return Ok(applied_earlier(key, source, destination, amount));
    }
    applied_now(key, source, destination, amount, &after)
}

async fn ledger_amount(conn: &mut AsyncPgConnection, key: Uuid) -> QueryResult<Option<i64>> {
    transfers::table
        .find(key)
        .select(transfers::amount)
        .first(conn)
        .await
        .optional()
}

/// [`super::delete_accounts`]: the ids that were there to delete, in the
/// order given; all of them after a commit in doubt.
///
/// # Errors
/// The database's error.
pub async fn delete_accounts(
    conn: &mut AsyncPgConnection,
    ids: &[Uuid],
    in_doubt: bool,
) -> QueryResult<Applied<Vec<Uuid>>> {
    let mut deleted = HashSet::with_capacity(ids.len());
    for chunk in ids.chunks(IDS_PER_STATEMENT) {
        deleted.extend(
            diesel::delete(accounts::table.filter(accounts::id.eq_any(chunk)))
                .returning(accounts::id)
                .get_results::<Uuid>(conn)
                .await?,
        );
    }
    Ok(deleted_of(ids, &deleted, in_doubt))
}
