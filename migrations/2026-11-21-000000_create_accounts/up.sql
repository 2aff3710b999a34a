-- Keep this statement identical to dbinit.sql: the schema paths must be
-- interchangeable, so IF NOT EXISTS lets this migration run after dbinit.sql.
-- INT8, not INT: INT is 8 bytes on CockroachDB but 4 on PostgreSQL.
-- The constraint is named so that both servers report the same name.
CREATE TABLE IF NOT EXISTS accounts (
    id UUID PRIMARY KEY,
    balance INT8 NOT NULL,
    CONSTRAINT balance_non_negative CHECK (balance >= 0)
);
