//! What the app learns of the server and its tables before the first
//! transaction: in one cheap query when the schema is the app's own, or
//! the whole catalog inspection otherwise.

use diesel::dsl::sql;
use diesel::prelude::*;
use diesel::sql_types::{Bool, Nullable, Text};
use diesel_tx_retry::Server;

use super::shape;

/// What the connected user finds of the `accounts` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccountsTable {
    /// Not in the current schema.
    Missing,
    /// There, but the user may not read and write it (or may not read and
    /// add to the `transfers` ledger).
    NotAllowed,
    /// There and usable.
    Ready,
}

/// What the app learns before its first transaction, in one query (one
/// round trip): which server it is, and what the user finds of `accounts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspection {
    /// The server.
    pub server: Server,
    /// The `accounts` table.
    pub accounts: AccountsTable,
    /// Whether the `transfers` ledger is there (the second migration).
    pub ledger: bool,
    /// The `accounts` table as the catalog describes it, when it is there
    /// and was not made by the app's own DDL (which needs no comparing).
    pub shape: Option<shape::Shape>,
}

/// Learns what [`Inspection`] says, cheaply where it can: one query that
/// calls a few functions and looks up two constraints by their table
/// ([`inspect_quickly`]) answers when both tables are there, usable, and
/// were made by the app's own DDL; anything else gets the whole inspection
/// ([`inspect_fully`]), which a table made elsewhere needs to be compared
/// with what the app needs.
///
/// # Errors
/// The whole inspection's error.
pub fn inspect(conn: &mut PgConnection) -> QueryResult<Inspection> {
    match inspect_quickly(conn) {
        Ok(Some(inspection)) => Ok(inspection),
        // A table is missing (the query fails on its name), a privilege is,
        // or a table was made elsewhere: the whole inspection says which.
        Ok(None) | Err(_) => inspect_fully(conn),
    }
}

/// The start-up check of a set-up schema, in one query over no catalog
/// scan: the server, the user's privileges on both tables (by name), and
/// the constraints only the app's migrations and `dbinit.sql` create
/// (`balance_non_negative`, `amount_non_negative`), looked up by their
/// table: a table that has its constraint was made by the app's DDL, so its
/// shape needs no comparing. `Some` only when all of that holds.
///
/// The whole inspection reads `information_schema`, whose views cost about
/// 9 ms of PostgreSQL's time in a new session, against under 2 ms for this; on
/// CockroachDB both catalogs are virtual tables built for each query, and
/// `pg_constraint` looked up by `conrelid` is served by its virtual index
/// on the table id (cockroachdb/cockroach#47316), so only the two tables
/// concerned are described.
///
/// # Errors
/// The query's error: a table that does not exist fails `::regclass`.
pub fn inspect_quickly(conn: &mut PgConnection) -> QueryResult<Option<Inspection>> {
    let found = quick_check().get_result(conn)?;
    Ok(quick_inspection(found))
}

/// The quick check's query (see [`inspect_quickly`]): the server's version,
/// whether the user may use both tables, whether the app's DDL made them.
pub(crate) fn quick_check() -> diesel::dsl::select<(
    diesel::expression::SqlLiteral<Text>,
    diesel::expression::SqlLiteral<Bool>,
    diesel::expression::SqlLiteral<Bool>,
)> {
    diesel::select((
        sql::<Text>("version()"),
        sql::<Bool>(
            "has_table_privilege('accounts', 'SELECT') AND has_table_privilege('accounts', 'INSERT') \
             AND has_table_privilege('accounts', 'UPDATE') AND has_table_privilege('accounts', 'DELETE') \
             AND has_table_privilege('transfers', 'SELECT') AND has_table_privilege('transfers', 'INSERT')",
        ),
        sql::<Bool>(
            "EXISTS (SELECT 1 FROM pg_catalog.pg_constraint \
             WHERE conrelid = 'accounts'::regclass AND conname = 'balance_non_negative') \
             AND EXISTS (SELECT 1 FROM pg_catalog.pg_constraint \
             WHERE conrelid = 'transfers'::regclass AND conname = 'amount_non_negative')",
        ),
    ))
}

/// The quick check's SQL, for a client that is not Diesel's.
pub(crate) fn quick_check_sql() -> String {
    use diesel::query_builder::{QueryBuilder, QueryFragment};
    let mut sql = diesel::pg::PgQueryBuilder::default();
    // Literal SQL only: building it cannot fail.
    let _ = QueryFragment::<diesel::pg::Pg>::to_sql(&quick_check(), &mut sql, &diesel::pg::Pg);
    sql.finish()
}

/// The quick check's answer as the simple query protocol gives it, in
/// text: both servers write a boolean as `t` or `f` (PostgreSQL's
/// `boolout`; CockroachDB's pgwire `writeTextBool`, read in its source, not
/// run). `None` for anything else, which the whole inspection then settles.
pub(crate) fn quick_found_in_text(
    version: &str,
    allowed: &str,
    ours: &str,
) -> Option<(String, bool, bool)> {
    let boolean = |text: &str| match text {
        "t" => Some(true),
        "f" => Some(false),
        _ => None,
    };
    Some((version.to_owned(), boolean(allowed)?, boolean(ours)?))
}

/// What the quick check's answer says: an inspection when all holds.
pub(crate) fn quick_inspection(
    (version, allowed, ours): (String, bool, bool),
) -> Option<Inspection> {
    (allowed && ours).then(|| Inspection {
        server: Server::from_version(&version),
        accounts: AccountsTable::Ready,
        ledger: true,
        shape: None,
    })
}

/// The whole inspection. `accounts` is looked for in `pg_class`, which
/// lists tables the user may not use (`information_schema` hides them,
/// which made a missing privilege look like a missing table).
///
/// # Errors
/// The query's error.
pub fn inspect_fully(conn: &mut PgConnection) -> QueryResult<Inspection> {
    type Catalog = (Option<String>, Option<String>, Option<String>);
    let (version, present, allowed, ledger, (columns, key, checks)): (
        String,
        bool,
        bool,
        bool,
        Catalog,
    ) = diesel::select((
        sql::<Text>("version()"),
        sql::<Bool>(
            "EXISTS (SELECT 1 FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relname = 'accounts' AND n.nspname = current_schema())",
        ),
        sql::<Bool>(
            "COALESCE((SELECT bool_and(has_table_privilege(c.oid, p)) \
             FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace, \
             unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE']) AS p \
             WHERE c.relname = 'accounts' AND n.nspname = current_schema()), false) \
             AND COALESCE((SELECT bool_and(has_table_privilege(c.oid, p)) \
             FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace, \
             unnest(ARRAY['SELECT', 'INSERT']) AS p \
             WHERE c.relname = 'transfers' AND n.nspname = current_schema()), true)",
        ),
        sql::<Bool>(
            "EXISTS (SELECT 1 FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relname = 'transfers' AND n.nspname = current_schema())",
        ),
        // The accounts table's shape, for shape::differences.
        (
            sql::<Nullable<Text>>(
                "(SELECT string_agg(column_name || ' ' || data_type || ' ' || is_nullable, ',' \
                 ORDER BY column_name) FROM information_schema.columns \
                 WHERE table_schema = current_schema() AND table_name = 'accounts')",
            ),
            sql::<Nullable<Text>>(
                "(SELECT string_agg(k.column_name, ',' ORDER BY k.ordinal_position) \
                 FROM information_schema.table_constraints t \
                 JOIN information_schema.key_column_usage k ON k.constraint_name = t.constraint_name \
                 AND k.table_schema = t.table_schema AND k.table_name = t.table_name \
                 WHERE t.table_schema = current_schema() AND t.table_name = 'accounts' \
                 AND t.constraint_type = 'PRIMARY KEY')",
            ),
            // The migration's own check is known by its name: reading a
            // clause (pg_get_constraintdef, which information_schema uses
            // too) waits for a lock on the table, and the inspection must
            // not wait behind a session holding it.
            sql::<Nullable<Text>>(
                "(SELECT string_agg(CASE WHEN c.conname = 'balance_non_negative' \
                 THEN 'balance >= 0' ELSE pg_get_constraintdef(c.oid) END, ' AND ') \
                 FROM pg_catalog.pg_constraint c \
                 JOIN pg_catalog.pg_class r ON r.oid = c.conrelid \
                 JOIN pg_catalog.pg_namespace n ON n.oid = r.relnamespace \
                 WHERE r.relname = 'accounts' AND n.nspname = current_schema() AND c.contype = 'c')",
            ),
        ),
    ))
    .get_result(conn)?;
    Ok(Inspection {
        server: Server::from_version(&version),
        accounts: match (present, allowed) {
            (false, _) => AccountsTable::Missing,
            (true, false) => AccountsTable::NotAllowed,
            (true, true) => AccountsTable::Ready,
        },
        ledger,
        shape: present.then(|| {
            shape::Shape::from_catalog(
                columns.as_deref().unwrap_or_default(),
                key.as_deref().unwrap_or_default(),
                checks.as_deref().unwrap_or_default(),
            )
        }),
    })
}

/// Rows of `accounts` whose balance is NULL (a table made elsewhere).
///
/// # Errors
/// The query's error.
pub fn null_balances(conn: &mut PgConnection) -> QueryResult<i64> {
    crate::schema::accounts::table
        .filter(crate::schema::accounts::balance.nullable().is_null())
        .count()
        .get_result(conn)
}

#[cfg(test)]
mod tests {
    use super::quick_found_in_text;

    #[test]
    fn the_quick_checks_text_answer_reads_t_and_f_and_nothing_else() {
        let version = "PostgreSQL 15.18";
        assert_eq!(
            quick_found_in_text(version, "t", "f"),
            Some((version.to_owned(), true, false))
        );
        assert_eq!(
            quick_found_in_text(version, "f", "t"),
            Some((version.to_owned(), false, true))
        );
        for odd in ["true", "1", "", "T"] {
            assert_eq!(quick_found_in_text(version, odd, "t"), None, "{odd:?}");
            assert_eq!(quick_found_in_text(version, "t", odd), None, "{odd:?}");
        }
    }
}
