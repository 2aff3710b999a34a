-- Creates the bank's schema. Run it as a user allowed to create tables:
--   cockroach sql --url "$DATABASE_URL" < dbinit.sql     (CockroachDB)
--   psql "$DATABASE_URL" -f dbinit.sql                   (PostgreSQL)
-- It is safe to run more than once, and before or after `diesel migration run`
-- or `bank migrate`: the statement below is the one in migrations/*/up.sql.
-- INT8, not INT: INT is 8 bytes on CockroachDB but 4 on PostgreSQL.
CREATE TABLE IF NOT EXISTS accounts (
    id UUID PRIMARY KEY,
    balance INT8 NOT NULL,
    CONSTRAINT balance_non_negative CHECK (balance >= 0)
);
