-- restore_refs.lua: put back idempotency keys that Redis lost, from the PostgreSQL ledger,
-- so that a retry of a debit already made answers DUPLICATE instead of debiting again.
-- The hot path runs it while loading a user (before load_user.lua marks the user loaded).
-- A key that exists is kept: it is the same debit's, or a newer one's.
--
-- KEYS[i]       idempotency key i                <prefix>:{shard}:u:<user>:r:<ref>
-- ARGV[2i-1]    its value: fingerprint \n tx id \n remaining micro-units
-- ARGV[2i]      the TTL it has left, ms (> 0)
--
-- Reply: {1, keys written}.
if #ARGV ~= 2 * #KEYS then error('qg: restore_refs needs a value and a TTL per key') end
for i = 1, #KEYS do  -- validate before the first write
  if int_arg(ARGV[2 * i], 'ttl') < 1 then error('qg: a restored key needs a TTL > 0') end
end
local written = 0
for i = 1, #KEYS do
  if redis.call('SET', KEYS[i], ARGV[2 * i - 1], 'PX', ARGV[2 * i], 'NX') then
    written = written + 1
  end
end
return {OK, written}
