-- Creates the bank's schema. Run it as a user allowed to create tables:
--   cockroach sql --url "$DATABASE_URL" < dbinit.sql     (CockroachDB)
--   psql "$DATABASE_URL" -f dbinit.sql                   (PostgreSQL)
-- It is safe to run more than once, and before or after `diesel migration run`
-- or `bank migrate`: the statements below are those of migrations/*/up.sql,
-- in order.
-- INT8, not INT: INT is 8 bytes on CockroachDB but 4 on PostgreSQL.
CREATE TABLE IF NOT EXISTS accounts (
    id UUID PRIMARY KEY,
    balance INT8 NOT NULL,
    CONSTRAINT balance_non_negative CHECK (balance >= 0)
);
-- The ledger: one row per transfer, keyed by the id the client draws before
-- the transaction (its idempotency key), written in the same statement as
-- the two balances. No foreign keys: an account may be deleted, its
-- transfers stay. The amount may be 0 (half of a balance of 0 or 1).
CREATE TABLE IF NOT EXISTS transfers (
    id UUID PRIMARY KEY,
    from_id UUID NOT NULL,
    to_id UUID NOT NULL,
    amount INT8 NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT amount_non_negative CHECK (amount >= 0)
);
