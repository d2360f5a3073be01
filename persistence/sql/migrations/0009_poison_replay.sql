-- 0009: a poisoned ledger entry can be written once its cause is fixed.
--
-- `quota-gateway poison replay ID` writes the entry to the ledger (idempotent on tx_id) and
-- records here when and with what result; the row stays for the record.
ALTER TABLE poison_events ADD COLUMN replayed_at timestamptz;
ALTER TABLE poison_events ADD COLUMN replay_result text;
