-- wrk script: POST a batch of ITEMS debits per request (/quota/debit/batch), every ref
-- unique, users spread round-robin over bu0 .. bu<USERS-1>.
--
-- wrk -t1 -c16 -d10s -s bench/batch.lua http://127.0.0.1:PORT -- TAG USERS ITEMS
-- The summary is printed as one line "WRKJSON {...}" (requests, not debits).

local counter, id = 0, 0
local tag, users, items = "b", 1000, 100

function init(args)
  tag = args[1] or tag
  users = tonumber(args[2] or users)
  items = tonumber(args[3] or items)
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["X-Internal-Key"] = os.getenv("SERVICE_TOKEN") or "super-secret-dev"
  wrk.method = "POST"
end

function request()
  local parts = {}
  for i = 1, items do
    counter = counter + 1
    parts[i] = string.format(
      '{"user_id":"bu%d","action":"chat_tokens","units":1,"ref":"%s-%d"}',
      (counter * 7) % users, tag, counter)
  end
  return wrk.format("POST", "/internal/billing/quota/debit/batch", nil,
                    '{"items":[' .. table.concat(parts, ",") .. ']}')
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"status_errors":%d,"p50_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, e.status, latency:percentile(50),
    latency:percentile(99)))
end
