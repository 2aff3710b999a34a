//! Faults made by the server itself, with PL/pgSQL (PostgreSQL only):
//! errors of any SQLSTATE on chosen calls, at a statement or at COMMIT, and
//! a backend that terminates itself while it commits.

use diesel::connection::SimpleConnection;
use diesel::dsl::sql;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};

/// Installs the fault machinery in the database `conn` is connected to:
/// - `raise_error(code)`: raises SQLSTATE `code`; writes nothing, so it
///   also works in read-only transactions.
/// - `fail_first(k, code)`: raises SQLSTATE `code` on its first `k` calls.
///   Its counter is a sequence because sequences ignore rollbacks, so the
///   count survives the retries it causes.
/// - table `marks`: a row per committed unit of work; [`fail_commits`] adds
///   a deferred trigger on it that fires at COMMIT.
pub fn install(conn: &mut PgConnection) {
    conn.batch_execute(
        "CREATE SEQUENCE statement_faults;
         CREATE SEQUENCE commit_faults;
         CREATE TABLE marks (id SERIAL PRIMARY KEY, note TEXT NOT NULL DEFAULT '');
         CREATE FUNCTION fail_first(k INT8, code TEXT) RETURNS INT8 AS $$
         DECLARE n INT8 := nextval('statement_faults');
         BEGIN
             IF n <= k THEN
                 RAISE EXCEPTION 'injected fault % of %', n, k USING ERRCODE = code;
             END IF;
             RETURN n;
         END $$ LANGUAGE plpgsql;
         CREATE FUNCTION raise_error(code TEXT) RETURNS INT8 AS $$
         BEGIN
             RAISE EXCEPTION 'injected fault' USING ERRCODE = code;
         END $$ LANGUAGE plpgsql;
         CREATE FUNCTION commit_fault() RETURNS trigger AS $$
         DECLARE n INT8 := nextval('commit_faults');
         BEGIN
             IF n <= TG_ARGV[0]::INT8 THEN
                 IF TG_ARGV[1] = 'terminate' THEN
                     PERFORM pg_terminate_backend(pg_backend_pid());
                 ELSE
                     RAISE EXCEPTION 'injected commit fault % of %', n, TG_ARGV[0]
                         USING ERRCODE = TG_ARGV[1];
                 END IF;
             END IF;
             RETURN NULL;
         END $$ LANGUAGE plpgsql;",
    )
    .expect("install the fault machinery");
}

/// Makes the first `k` commits that inserted into `marks` fail with
/// `action`: a SQLSTATE, or `terminate` to kill the backend mid-commit.
pub fn fail_commits(conn: &mut PgConnection, k: u32, action: &str) {
    conn.batch_execute(&format!(
        "CREATE CONSTRAINT TRIGGER fail_at_commit AFTER INSERT ON marks
         DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
         EXECUTE FUNCTION commit_fault('{k}', '{action}')"
    ))
    .expect("install the commit fault");
}

/// Inserts a mark, through the unit of work's own connection.
pub fn mark(conn: &mut PgConnection, note: &str) -> QueryResult<()> {
    diesel::sql_query("INSERT INTO marks (note) VALUES ($1)")
        .bind::<Text, _>(note)
        .execute(conn)
        .map(drop)
}

/// Calls `fail_first(k, code)`.
pub fn fail_first(conn: &mut PgConnection, k: u32, code: &str) -> QueryResult<()> {
    diesel::sql_query("SELECT fail_first($1, $2)")
        .bind::<BigInt, _>(i64::from(k))
        .bind::<Text, _>(code)
        .execute(conn)
        .map(drop)
}

/// Calls `raise_error(code)`.
pub fn raise_error(conn: &mut PgConnection, code: &str) -> QueryResult<()> {
    diesel::sql_query("SELECT raise_error($1)")
        .bind::<Text, _>(code)
        .execute(conn)
        .map(drop)
}

/// Calls made so far to a fault (its sequence: `statement_faults`,
/// `commit_faults`).
pub fn calls(conn: &mut PgConnection, sequence: &str) -> i64 {
    diesel::select(sql::<BigInt>(&format!(
        "(SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {sequence})"
    )))
    .get_result(conn)
    .expect("read fault sequence")
}

/// The backend pid of a connection.
pub fn backend_pid(conn: &mut PgConnection) -> i32 {
    diesel::select(sql::<diesel::sql_types::Integer>("pg_backend_pid()"))
        .get_result(conn)
        .expect("pg_backend_pid")
}
