-- load_catalog.lua: replace a shard's copy of the plan catalog with a newer version.
-- Each shard keeps its own copy so that a script touches one hash slot only.
--
-- KEYS[1]  shard plan catalog hash  <prefix>:{shard}:plans
-- ARGV[1]  catalog version (increases with every change in PostgreSQL)
-- ARGV[2..] field, value pairs:
--            <plan>         -> comma-separated meters of the plan
--            <plan>|<meter> -> '<period>:<allowance micro-units>', period d, m or n
--
-- Reply: 1 replaced, 0 the shard already holds this version or a newer one.
local version = int_arg(ARGV[1], 'catalog version')
if int_or_zero(redis.call('HGET', KEYS[1], '~v')) >= version then return 0 end
if (#ARGV - 1) % 2 ~= 0 then error('qg: load_catalog needs field/value pairs') end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], '~v', ARGV[1], unpack(ARGV, 2))
return 1
