-- Keep this statement identical to its copy in dbinit.sql, as the accounts
-- migration is: IF NOT EXISTS lets this migration run after dbinit.sql.
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
