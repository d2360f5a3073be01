-- ack_many.lua: acknowledge and delete the entries of many shard streams whose batch was
-- committed to PostgreSQL, in one call (atomic, as MULTI/EXEC was: no snapshot, AOF cut or
-- replica ever holds an entry acked but not deleted, which no reader would take again).
--
-- KEYS[i]  shard ledger stream i   <prefix>:{shard}:ledger
--          (one hash slot per call under Redis Cluster)
-- ARGV[1]  the consumer group
-- ARGV[2..]  for each stream in order: the number of its ids, then the ids
--
-- Reply: {OK, entries deleted}
local group, at, deleted = ARGV[1], 2, 0
for i = 1, #KEYS do
  local n = int_arg(ARGV[at], 'id count')
  if n > 0 then
    local ids = {unpack(ARGV, at + 1, at + n)}
    redis.call('XACK', KEYS[i], group, unpack(ids))
    deleted = deleted + redis.call('XDEL', KEYS[i], unpack(ids))
  end
  at = at + 1 + n
end
if at ~= #ARGV + 1 then error('qg: ack_many needs a count and the ids of each stream') end
return {OK, deleted}
