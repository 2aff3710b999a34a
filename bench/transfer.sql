-- pgbench's side of the workload comparison: the transfer `bank workload`
-- runs (bank::transfer), as plain SQL: a locking read of both rows, then one
-- statement that writes the ledger row and both balances. Accounts 1..N
-- (pgbench -D n=N) have the ids 00000000-0000-4000-8000-000000000001 and so
-- on; the ledger key is drawn by the server here, by the client in ours.
\set a random(1, :n)
\set hop random(1, :n - 1)
\set b (:a + :hop - 1) % :n + 1
\set amount random(1, 100)
BEGIN ISOLATION LEVEL SERIALIZABLE;
SELECT id, balance FROM accounts
 WHERE id = ANY (ARRAY[CAST('00000000-0000-4000-8000-' || lpad(CAST(:a AS text), 12, '0') AS uuid),
                       CAST('00000000-0000-4000-8000-' || lpad(CAST(:b AS text), 12, '0') AS uuid)])
 ORDER BY id FOR UPDATE;
WITH logged AS (
  INSERT INTO transfers (id, from_id, to_id, amount)
  VALUES (gen_random_uuid(),
          CAST('00000000-0000-4000-8000-' || lpad(CAST(:a AS text), 12, '0') AS uuid),
          CAST('00000000-0000-4000-8000-' || lpad(CAST(:b AS text), 12, '0') AS uuid),
          :amount)
  ON CONFLICT (id) DO NOTHING RETURNING id)
UPDATE accounts
   SET balance = balance + CASE WHEN id = CAST('00000000-0000-4000-8000-' || lpad(CAST(:a AS text), 12, '0') AS uuid)
                                THEN -CAST(:amount AS INT8) ELSE CAST(:amount AS INT8) END
 WHERE id = ANY (ARRAY[CAST('00000000-0000-4000-8000-' || lpad(CAST(:a AS text), 12, '0') AS uuid),
                       CAST('00000000-0000-4000-8000-' || lpad(CAST(:b AS text), 12, '0') AS uuid)])
   AND EXISTS (SELECT 1 FROM logged)
 RETURNING id, balance;
COMMIT;
