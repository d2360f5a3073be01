-- restore_refs.lua: put back idempotency keys that Redis lost, from the PostgreSQL ledger,
-- so that a retry of a debit already made answers DUPLICATE instead of debiting again.
-- The hot path runs it while loading a user (before load_user.lua marks the user loaded).
-- A key that exists is kept: it is the same debit's, or a newer one's.
--
-- A key's life is judged here, on the clock that stamped the debits (Redis TIME, or the
-- pinned time), not on the caller's: a caller whose clock runs ahead would otherwise give
-- a key less life than the debit's own key had, and a retry in the gap would be debited
-- as new while the ledger, judging by the debits' times, refuses it as a double.
--
-- KEYS[i]       idempotency key i                <prefix>:{shard}:u:<user>:r:<ref>
-- ARGV[1]       now, ms since epoch; 0 = use Redis TIME
-- ARGV[2i]      key i's value: fingerprint \n tx id \n remaining micro-units
-- ARGV[2i+1]    when key i expires: its debit's time + the idempotency TTL, ms
--
-- Reply: {1, keys written} (keys already expired by now are skipped).
if #ARGV ~= 1 + 2 * #KEYS then
  error('qg: restore_refs needs the time, then a value and an expiry per key')
end
local now = clock(ARGV[1])
local ttls = {}
for i = 1, #KEYS do  -- validate before the first write
  ttls[i] = int_arg(ARGV[2 * i + 1], 'expiry') - now
end
local written = 0
for i = 1, #KEYS do
  if ttls[i] > 0 and redis.call('SET', KEYS[i], ARGV[2 * i], 'PX', istr(ttls[i]), 'NX') then
    written = written + 1
  end
end
return {OK, written}
