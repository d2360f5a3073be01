-- 0004: what each debit left of its meter. When Redis has lost a user's idempotency keys,
-- loading the user restores the keys of refs still within their TTL from the ledger, so a
-- retry answers 409 with the original tx_id and remaining instead of debiting again.
-- NULL for other kinds, and for debits flushed before this migration.
ALTER TABLE ledger ADD COLUMN remaining_micro bigint;
