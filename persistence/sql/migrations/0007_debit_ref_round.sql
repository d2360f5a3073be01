-- 0007: a ref reused past the idempotency TTL is a new debit, and the ledger keeps it.
--
-- Redis forgets a ref IDEMPOTENCY_TTL_SECONDS after its debit, and then debits it again
-- (the caller gets 200 and a new tx_id); 0005's index, one debit per (user, ref) for ever,
-- made the flush drop that accepted debit. A debit's round counts its ref's reuses: the
-- reconciler writes a debit refused by the index again with the next round when no debit
-- of its ref lies within the TTL of it (reconciler/writer.py); otherwise it is still
-- refused (a retry that Redis lost the traces of, 0005).
ALTER TABLE ledger ADD COLUMN ref_round integer NOT NULL DEFAULT 0;

CREATE UNIQUE INDEX ledger_debit_ref_round ON ledger (user_id, ref, ref_round)
    WHERE kind = 'debit';
DROP INDEX ledger_debit_ref;
