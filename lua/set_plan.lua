-- set_plan.lua: write through a plan assignment already committed in PostgreSQL.
--
-- KEYS[1]  user state hash  <prefix>:{shard}:u:<user>
-- ARGV[1]  plan code   ARGV[2] expiry ms (0 = none)   ARGV[3] plan version (increasing)
-- ARGV[4]  user state TTL, ms
-- ARGV[5]  the assignment's start ms (0 = not known: a cycle meter counts by month)
--
-- Reply: 1 written, 0 Redis already holds this version or a newer one.
-- A user not loaded yet gets the fields too (without the 'loaded' marker), and the write
-- generation 'wg' moves on so that a concurrent load retries with fresh PostgreSQL rows.
local version = int_arg(ARGV[3], 'plan version')
int_arg(ARGV[2], 'expiry')
if int_or_zero(redis.call('HGET', KEYS[1], 'pv')) >= version then return 0 end
int_arg(ARGV[5], 'plan start')
redis.call('HSET', KEYS[1], 'plan', ARGV[1], 'exp', ARGV[2], 'pv', ARGV[3], 'ps', ARGV[5])
redis.call('HINCRBY', KEYS[1], 'wg', 1)
redis.call('PEXPIRE', KEYS[1], int_arg(ARGV[4], 'user ttl'))
return 1
