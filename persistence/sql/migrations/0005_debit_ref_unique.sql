-- 0005: one debit per (user, ref) in the ledger, whatever Redis did.
--
-- A reconciler that has read a debit but not committed it when Redis loses its data
-- holds the only copy of that debit. A retry of its ref then finds it neither in Redis
-- nor in the ledger and is debited again, with a new tx_id; both would reach the ledger.
-- With this index the second one to be flushed inserts nothing (flush_events:
-- ON CONFLICT DO NOTHING), and the reconciler logs and counts it as a ref conflict.
DO $$
DECLARE
    doubled bigint;
BEGIN
    SELECT count(*) INTO doubled FROM (
        SELECT 1 FROM ledger WHERE kind = 'debit'
        GROUP BY user_id, ref HAVING count(*) > 1) AS d;
    IF doubled > 0 THEN
        RAISE EXCEPTION 'the ledger holds % (user_id, ref) pairs debited more than once; '
            'see SELECT user_id, ref, array_agg(tx_id) FROM ledger WHERE kind = ''debit'' '
            'GROUP BY 1, 2 HAVING count(*) > 1, and settle them before this migration',
            doubled;
    END IF;
END $$;

CREATE UNIQUE INDEX ledger_debit_ref ON ledger (user_id, ref) WHERE kind = 'debit';

-- Debits are found by (user_id, ref) through the unique index above; the older index keeps
-- the other kinds (refunds and credits looked up by their ref). A debit row then updates
-- as many indexes as before this migration (the flush's cost per event is unchanged).
DROP INDEX ledger_user_ref;
CREATE INDEX ledger_user_ref ON ledger (user_id, ref) WHERE ref IS NOT NULL AND kind <> 'debit';
