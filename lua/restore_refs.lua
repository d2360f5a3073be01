-- restore_refs.lua: put back idempotency records that Redis lost, from the PostgreSQL
-- ledger, so that a retry of a debit already made answers DUPLICATE instead of debiting
-- again; and closed-hold markers (string keys). The hot path runs it while loading a user
-- (before load_user.lua marks the user loaded). A record or marker that exists is kept: it
-- is the same debit's, or a newer one's.
--
-- A record's life is judged here, on the clock that stamped the debits (Redis TIME, or the
-- pinned time), not on the caller's: a caller whose clock runs ahead would otherwise give
-- a record less life than the debit's own had, and a retry in the gap would be debited
-- as new while the ledger, judging by the debits' times, refuses it as a double.
--
-- KEYS[1]       the user's ref buckets         <prefix>:{shard}:u:<user>:r
-- KEYS[1+j]     closed-hold marker j           <prefix>:{shard}:u:<user>:hd:<hold id>
-- ARGV[1]       now, ms since epoch; 0 = use Redis TIME
-- ARGV[2]       idempotency TTL, ms
-- ARGV[3]       n: the number of records
-- ARGV[3i+1 .. 3i+3]  record i: its field and head (as debit_many.lua's), remaining
--               micro-units, its debit's time (ms, the script clock that stamped it)
-- ARGV[3 + 3n + 2j - 1], ARGV[3 + 3n + 2j]  marker j: its value, when it expires (ms)
--
-- Reply: {1, records and markers written} (those already past their TTL are skipped).
local n = int_arg(ARGV[3], 'records')
if #ARGV ~= 3 + 3 * n + 2 * (#KEYS - 1) then
  error('qg: restore_refs needs the time, the TTL, the count, three values a record, two a marker')
end
local now = clock(ARGV[1])
local w, r = ref_window(ARGV[2])
local recs, after = ref_records(n, 4)
local base = after - 1  -- the markers follow the records
local ttls = {}
for j = 1, #KEYS - 1 do
  ttls[j] = int_arg(ARGV[base + 2 * j], 'expiry') - now
end
local written = refs_restore(KEYS[1], recs, now, w, r)
for j = 1, #KEYS - 1 do
  if ttls[j] > 0 and redis.call('SET', KEYS[1 + j], ARGV[base + 2 * j - 1], 'PX',
                                istr(ttls[j]), 'NX') then
    written = written + 1
  end
end
return {OK, written}
