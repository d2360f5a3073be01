-- wrk script: POST one debit per request, keep-alive, every ref unique.
--
-- wrk -t1 -c64 -d15s -s bench/debit.lua http://127.0.0.1:PORT -- TAG USERS [THINK_MS]
--   TAG       a string unique to this run (refs are TAG-thread-counter)
--   USERS     users are spread round-robin over bu0 .. bu<USERS-1>
--   THINK_MS  when given and > 0, each connection waits an exponentially distributed
--             think time of this mean before each request (a rate-limited run; wrk's
--             latency is measured from the moment the request is written, so the think
--             time is not part of it)
-- WRK_PATH selects the route (default the seed 000 debit).
-- The summary is printed as one line "WRKJSON {...}" for the driver.

dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "wrk_common.lua")

local threads = {}
local counter = 0
local tag, users, think, id = "t", 1000, 0, 0
local path = "/internal/billing/quota/debit"
local key = "super-secret-dev"

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  tag = args[1] or tag
  users = tonumber(args[2] or users)
  think = tonumber(args[3] or 0)
  id = tonumber(wrk.thread:get("id")) or 0
  path = os.getenv("WRK_PATH") or path
  key = os.getenv("SERVICE_TOKEN") or key
  math.randomseed(os.time() + id * 7919)
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["X-Internal-Key"] = key
  wrk.method = "POST"
  -- wrk pays a timer per request when the script has delay(): keep it for paced runs only
  if think <= 0 then delay = nil end
end

function request()
  counter = counter + 1
  local user = (counter * 7 + id * 131) % users
  local body = string.format(
    '{"user_id":"bu%d","action":"chat_tokens","units":1,"ref":"%s-%d-%d"}',
    user, tag, id, counter)
  return wrk.format("POST", path, nil, body)
end

function delay()
  return think_time(think)
end
