-- 0006: who last wrote each plan (the caller's name, or 'migrate' for the catalog file),
-- so that a change of the catalog is recorded with its caller like every other operation.
ALTER TABLE plans ADD COLUMN updated_by text NOT NULL DEFAULT '';
