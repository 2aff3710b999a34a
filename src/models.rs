//! The `Account` row as Diesel maps it, for reading and for inserting.

use diesel::prelude::*;
use uuid::Uuid;

use crate::schema::accounts;

/// One row of the `accounts` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = accounts)]
#[diesel(check_for_backend(diesel::pg::Pg))]
pub struct Account {
    /// The account's random v4 id.
    pub id: Uuid,
    /// The balance in whole units; the schema refuses negative values.
    pub balance: i64,
}
