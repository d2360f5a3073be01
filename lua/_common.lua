-- _common.lua: helpers prepended to every operation script when it is registered.
-- It defines functions and constants only; it never touches a key by itself.
--
-- Reply status codes (mirrored by lua.Status in Python):
-- (8 and 9 are retired: 9 was check_many's "plan names meters not asked for")
local OK, DUPLICATE, REF_REUSED, INSUFFICIENT, NOT_LOADED, STALE_WINDOW, BACKLOG,
  HOLD_GONE, TOO_MANY_HOLDS = 1, 2, 3, 4, 5, 6, 7, 10, 11

-- Integers travel as decimal strings; Lua numbers are doubles, exact below 2^53.
local EXACT = 9007199254740992

local function int_arg(value, name)
  local n = tonumber(value)
  if n == nil or n ~= math.floor(n) or n < 0 or n >= EXACT then
    error('qg: ' .. name .. ' is not a non-negative integer: ' .. tostring(value))
  end
  return n
end

-- An exact integer as text ('..' would format large numbers as 1e+15). '%d' formats a C
-- long, 64 bits on every platform Redis ships for (exact: |n| < 2^53 here), and costs a
-- fraction of '%.0f', which goes through floating-point printing.
local function istr(n)
  return string.format('%d', n)
end

local function int_or_zero(value)
  if not value then return 0 end
  return tonumber(value)
end

-- A stored running sum (credits, usage) as a number. PostgreSQL caps every such sum far
-- below 2^53 (MAX_BALANCE_MICRO); one at or past it would not be exact here: refuse it.
local function stored_int(value, name)
  if not value then return 0 end
  local n = tonumber(value)
  if n >= EXACT then error('qg: ' .. name .. ' is past 2^53: ' .. value) end
  return n
end

-- "Now" in milliseconds: the caller's pinned time (tests, simulations) or Redis TIME.
local function clock(override)
  local pinned = int_arg(override, 'now')
  if pinned > 0 then return pinned end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The plan in force: the assigned one, or the default once the assigned one expired.
-- Returns code, status ('active'|'expired'), assigned code, expiry ms (0 = none).
local function plan_in_force(user_fields_plan, user_fields_exp, now, default_code)
  local assigned = user_fields_plan or default_code
  local exp = int_or_zero(user_fields_exp)
  if exp > 0 and now >= exp then
    return default_code, 'expired', assigned, exp
  end
  return assigned, 'active', assigned, exp
end

-- A catalog rule's text ('<period>:<allowance>', or 'c:<allowance>:<since ms>' for a cycle,
-- see load_catalog.lua; or false) as period ('d', 'm', 'c' or 'n'), allowance in
-- micro-units and, for a cycle, when the meter became one. A meter the plan does not name
-- has no allowance (credits can still pay for it).
local function parse_rule(text)
  if not text then return 'n', 0, 0 end
  local period = string.sub(text, 1, 1)
  if period == 'c' then
    local limit, since = string.match(text, '^c:(%d+):(%d+)$')
    return 'c', tonumber(limit), tonumber(since)
  end
  return period, tonumber(string.sub(text, 3)), 0
end

-- Where a 'cycle' meter counts for a user: its assignment's own counter (key
-- <user>:c:<meter>:y:<plan version>: every purchase, renewal or plan apply is a new version,
-- so a new cycle; in the user's hash slot), ending at the plan's expiry; or, for an
-- assignment that began before the meter became a cycle (or whose start Redis does not
-- hold, or that has no expiry to end a cycle), the calendar month, as before the switch.
-- Returns the period kind to count in ('y' or 'm') and, for 'y', the key and cycle id.
local function cycle_counter(user_key, meter, start, since, expires, version)
  if start > 0 and start >= since and expires > 0 and version > 0 then
    return 'y', user_key .. ':c:' .. meter .. ':y:' .. istr(version), version
  end
  return 'm'
end


-- Idempotency records (core/refs.py). A user's refs live in hash buckets
-- <user key>:r:<b>, b = floor(t / W) for the debit's time t (this clock) and W the
-- idempotency TTL in ms; field = 12 bytes of a hash of (user, ref); value =
-- fingerprint(4) | id (8 or 16) | stamp(2) | remaining(7), the last two packed here: the
-- stamp is t's offset in its bucket in units of R = floor(W / 65535) + 1 ms, rounded up, so
-- a ref is remembered at least W and at most W + R. A bucket expires as a whole when its
-- last ref can no longer be live ((b + 2) W); field '' marks a bucket whose expiry is set.
-- At any time only the buckets b and b - 1 can hold live refs: two lookups, whatever W is.
local function ref_window(ttl_arg)
  local w = int_arg(ttl_arg, 'idempotency ttl')
  if w < 1 then error('qg: idempotency ttl must be at least 1 ms') end
  return w, math.floor(w / 65535) + 1
end

-- The live record of `field` at `now` (or false), with the current bucket's key, whether
-- that bucket exists, and its number. A record in the current bucket is always live.
local function ref_find(prefix, field, now, w, r)
  local b = math.floor(now / w)
  local cur = prefix .. ':' .. istr(b)
  local got = redis.call('HMGET', cur, field, '')
  local rec = got[1]
  if not rec then
    rec = redis.call('HGET', prefix .. ':' .. istr(b - 1), field)
    if rec and (b - 1) * w + struct.unpack('>I2', rec, #rec - 8) * r + w <= now then
      rec = false  -- past its TTL: the ref is new again
    end
  end
  return rec, cur, got[2], b
end

-- Remember `field` in the current bucket (ref_find said where), answered by `head`
-- (fingerprint and id) and `remaining`.
local function ref_take(cur, exists, b, field, head, now, w, r, remaining)
  local value = head .. struct.pack('>I2I7', math.ceil((now - b * w) / r), remaining)
  if exists then
    redis.call('HSET', cur, field, value)
  else
    redis.call('HSET', cur, field, value, '', '1')
    redis.call('PEXPIRE', cur, istr((b + 2) * w + 65536 - now))
  end
end

-- Records to put back (restore_refs.lua, load_user.lua): `n` triples of ARGV from `a`, each
-- a field and head (as debit_many.lua's), remaining micro-units, and its debit's time (ms,
-- on the script clock that stamped it). Validated before the first write; returns them and
-- the index of the ARGV after them.
local function ref_records(n, a)
  local recs = {}
  for k = 1, n do
    local rec = {ARGV[a], int_arg(ARGV[a + 1], 'remaining'), int_arg(ARGV[a + 2], 'time')}
    if #rec[1] < 17 then error('qg: a record needs a 12-byte field and a head') end
    recs[k] = rec
    a = a + 3
  end
  return recs, a
end

-- Put records back into the buckets under `prefix`: each in the bucket of its debit's
-- time, kept if the bucket holds the field already (the same debit's, or a newer one's),
-- skipped if past its TTL. A bucket this call creates gets its expiry (asked once a bucket:
-- a user's recent refs share one or two). Returns how many were written.
local function refs_restore(prefix, recs, now, w, r)
  local written, seen = 0, {}
  for _, rec in ipairs(recs) do
    local t = rec[3]
    if t + w > now then
      local b = math.floor(t / w)
      local key = prefix .. ':' .. istr(b)
      local value = string.sub(rec[1], 13)
          .. struct.pack('>I2I7', math.ceil((t - b * w) / r), rec[2])
      written = written + redis.call('HSETNX', key, string.sub(rec[1], 1, 12), value)
      if not seen[key] then
        seen[key] = true
        if redis.call('HSETNX', key, '', '1') == 1 then
          redis.call('PEXPIRE', key, istr((b + 2) * w + 65536 - now))
        end
      end
    end
  end
  return written
end

-- The answer to a ref that is already taken: what the first debit or reserve answered
-- (its id as stored: Python turns it into the tx or hold id), or reuse when the request's
-- fingerprint (the first 4 bytes of `head`) differs.
local function prior_reply(rec, head)
  if string.sub(rec, 1, 4) ~= string.sub(head, 1, 4) then return {REF_REUSED} end
  local _, remaining = struct.unpack('>I2I7', rec, #rec - 8)
  return {DUPLICATE, string.sub(rec, 5, #rec - 9), remaining}
end

-- Holds (reservations). Of a user whose state hash is K, in K's hash slot:
--   K fields 'h:<meter>'  units held by the user's open holds of the meter
--   K field 'hx'          the earliest expiry (ms) of the user's open holds (absent: none)
--   K:h                   hash: hold id -> record of an open hold (hold_record)
--   K:hd:<hold id>        what a closed hold came to, kept for the idempotency TTL:
--                         's' settled (and its result), 'r' released, 'e' expired
--   <shard tag>:holds     sorted set of the shard's open holds by expiry, members
--                         '<user id>\031<hold id>' (the reconciler's sweep, expire_holds.lua)
-- A hold record: meter, units, expires ms, expiry tx id, ref, caller, action, reason,
-- joined by '\031'.
local function hold_record(text)
  local r = {}
  for v in string.gmatch(text .. '\031', '(.-)\031') do r[#r + 1] = v end
  return r
end

local function hold_record_text(r)
  return table.concat(r, '\031', 1, 8)
end

local function user_of(k_user)
  return string.match(k_user, '}:u:(.*)$')
end

local function shard_holds_key(k_user)
  return string.match(k_user, '^(.-}):u:') .. ':holds'
end

-- A hold's ledger event, layout 'v3' (core/events.py, LAYOUT_V3): k, tx, u, m, h, hu, ref,
-- rs, c, ac, then what the script decided: a, al, cr, p, pl, ts, rm, hx; last the tx id
-- the hold's expiry carries (xt).
local function hold_event(kind, tx, user_id, hold_id, r, caller, a, al, cr, p, pl, ts, rm, hx)
  return 'v3\031' .. kind .. '\031' .. tx .. '\031' .. user_id .. '\031' .. r[1] .. '\031'
    .. hold_id .. '\031' .. r[2] .. '\031' .. r[5] .. '\031' .. r[8] .. '\031' .. caller
    .. '\031' .. r[7] .. '\031' .. a .. '\031' .. al .. '\031' .. cr .. '\031' .. p .. '\031'
    .. pl .. '\031' .. ts .. '\031' .. rm .. '\031' .. hx .. '\031' .. r[4]
end

-- Set the user's 'hx' to the earliest expiry of its open holds (none: no field).
local function first_expiry(k_user)
  local first = 0
  local rest = redis.call('HGETALL', k_user .. ':h')
  for i = 2, #rest, 2 do
    local exp = tonumber(string.match(rest[i], '^[^\031]*\031[^\031]*\031(%d+)'))
    if first == 0 or exp < first then first = exp end
  end
  if first > 0 then
    redis.call('HSET', k_user, 'hx', istr(first))
  else
    redis.call('HDEL', k_user, 'hx')
  end
end

-- Take an open hold out of the user's state (settled, released or expired): its units stop
-- counting, the earliest expiry is found again among the holds left.
local function close_hold(k_user, hold_id, r, marker, marker_ttl)
  local k_holds = k_user .. ':h'
  redis.call('HDEL', k_holds, hold_id)
  if redis.call('EXISTS', k_user) == 1 then
    local field = 'h:' .. r[1]
    if redis.call('HINCRBY', k_user, field, -tonumber(r[2])) <= 0 then
      redis.call('HDEL', k_user, field)
    end
    first_expiry(k_user)
  end
  redis.call('ZREM', shard_holds_key(k_user), user_of(k_user) .. '\031' .. hold_id)
  redis.call('SET', k_user .. ':hd:' .. hold_id, marker, 'PX', marker_ttl)
end

-- Expire the user's holds whose time has come (hx: the 'hx' field as read, or false), each
-- with its ledger event (the tx id chosen at the reserve, the time its expiry). Every
-- script that reads a user's holds calls this first. Returns how many expired.
local function drop_expired_holds(k_user, hx, now, k_ledger, marker_ttl)
  local first = int_or_zero(hx)
  if first == 0 or now < first then return 0 end
  local all = redis.call('HGETALL', k_user .. ':h')
  local user_id, dropped = user_of(k_user), 0
  for i = 1, #all, 2 do
    local r = hold_record(all[i + 1])
    if tonumber(r[3]) <= now then
      close_hold(k_user, all[i], r, 'e', marker_ttl)
      redis.call('XADD', k_ledger, '*', 'e', hold_event(
        'expiry', r[4], user_id, all[i], r, r[6], '0', '0', '0', '', '', r[3], '', r[3]))
      dropped = dropped + 1
    end
  end
  if dropped == 0 and redis.call('EXISTS', k_user) == 1 then first_expiry(k_user) end
  return dropped
end

-- Where a meter of a loaded user counts now and how much of it is used: the counter key
-- (false for a lifetime meter, whose usage is the user hash's 'n:<meter>', given as
-- ``lifetime``), the period ('d', 'm', 'y' or 'n'), its id for the ledger, its end (ms; 0
-- for 'n') and the usage. ``start``, ``version`` and ``expires`` are the user's plan
-- assignment's; ``day`` and ``month`` the caller's windows ({id, end ms}).
local function meter_place(k_user, meter, period, since, start, version, expires, day, month,
                           lifetime)
  local counter, kind, period_id, end_ms = false, 'n', 'n', 0
  if period == 'c' then
    local cycle_kind, key, cycle = cycle_counter(k_user, meter, start, since, expires, version)
    if cycle_kind == 'y' then
      counter, kind, period_id, end_ms = key, 'y', 'y:' .. istr(cycle), expires
    else
      period = 'm'
    end
  end
  if period == 'd' then
    counter, kind, period_id, end_ms = k_user .. ':c:' .. meter .. ':d:' .. day[1], 'd',
      'd:' .. day[1], day[2]
  elseif period == 'm' then
    counter, kind, period_id, end_ms = k_user .. ':c:' .. meter .. ':m:' .. month[1], 'm',
      'm:' .. month[1], month[2]
  end
  local used
  if counter then
    used = int_or_zero(redis.call('GET', counter))
  else
    used = stored_int(lifetime, 'usage')
  end
  return counter, kind, period_id, end_ms, used
end

-- A batch script's answer is one flat array: per item the number of values of its reply,
-- then the values, or 1 and an error reply when the item raised one (``pcall``'s ``ok`` and
-- ``reply``). Appends one item at ``o`` (the values so far); returns the new count.
local function batch_append(out, o, ok, reply)
  if ok then
    local m = #reply
    out[o + 1] = m
    for j = 1, m do out[o + 1 + j] = reply[j] end
    return o + 1 + m
  end
  if type(reply) ~= 'table' or not reply.err then reply = {err = tostring(reply)} end
  out[o + 1], out[o + 2] = 1, reply
  return o + 2
end
