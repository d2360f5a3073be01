-- ledger_lag.lua: how far behind the flush is, for many shard streams in one call.
--
-- KEYS[i]  shard ledger stream i   <prefix>:{shard}:ledger
--          (streams of several hash slots: one call per node under Redis Cluster)
-- No ARGV.
--
-- Reply: per stream, in order: the number of unflushed entries, then the id of the oldest
-- ('<ms>-<seq>') or 0 when it is empty.
local out = {}
for i = 1, #KEYS do
  local n = redis.call('XLEN', KEYS[i])
  local oldest = 0
  if n > 0 then oldest = redis.call('XRANGE', KEYS[i], '-', '+', 'COUNT', 1)[1][1] end
  out[2 * i - 1] = n
  out[2 * i] = oldest
end
return out
