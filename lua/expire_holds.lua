-- expire_holds.lua: the reconciler's sweep of one shard: expire the holds whose time has
-- come, of users no request touches (a request's script expires its user's own first).
--
-- KEYS[1]  the shard's open holds by expiry   <prefix>:{shard}:holds
-- KEYS[2]  the shard's ledger stream          <prefix>:{shard}:ledger
-- ARGV[1]  now, ms since epoch; 0 = use Redis TIME
-- ARGV[2]  most holds looked at in this call
-- ARGV[3]  idempotency TTL, ms: how long an expired hold is remembered
--
-- Reply: {expired, looked at}; a member whose hold is not open any more (its user's state
-- fell out of Redis with it) is removed.
local now = clock(ARGV[1])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0,
                       int_arg(ARGV[2], 'limit'))
local base = string.sub(KEYS[1], 1, #KEYS[1] - #':holds') .. ':u:'
local expired = 0
for _, member in ipairs(due) do
  local user_id = string.match(member, '^(.-)\031')
  local k_user = base .. user_id
  local hx = redis.call('HGET', k_user, 'hx')
  if not hx then hx = '1' end  -- the user hash is gone: its holds hash may not be
  expired = expired + drop_expired_holds(k_user, hx, now, KEYS[2], ARGV[3])
  redis.call('ZREM', KEYS[1], member)
end
return {expired, #due}
