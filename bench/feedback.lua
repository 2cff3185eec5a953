-- wrk script: POST /v1/feedback with rotating completions and users.
-- Expects ids.lua beside it defining `ids` (completion ids) and `key`.
dofile(os.getenv("BENCH_DIR") .. "/ids.lua")
local threads = {}
local n = 0

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  created = 0
  others = 0
end

function request()
  n = n + 1
  local id = ids[(n % #ids) + 1]
  local body = string.format(
    '{"completion_id":"%s","rating":"%s","user":"user-%d","comment":"bench"}',
    id, (n % 3 == 0) and "down" or "up", n % 5000)
  return wrk.format("POST", "/v1/feedback",
    {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. key}, body)
end

function response(status, headers, body)
  if status == 201 then created = created + 1 else others = others + 1 end
end

function done(summary, latency, requests)
  local c, o = 0, 0
  for _, t in ipairs(threads) do
    c = c + t:get("created")
    o = o + t:get("others")
  end
  io.write(string.format("RESULT created=%d others=%d seconds=%.2f p50_ms=%.2f p99_ms=%.2f max_ms=%.2f\n",
    c, o, summary.duration / 1e6, latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    latency.max / 1000))
end
