-- wrk script: small non-streaming chat requests (latency of the request path).
dofile(os.getenv("BENCH_DIR") .. "/ids.lua")

function request()
  return wrk.format("POST", "/v1/chat/completions",
    {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. key},
    '{"model":"tiny","max_tokens":1,"temperature":0,"messages":[{"role":"user","content":"hi"}]}')
end

function done(summary, latency, requests)
  io.write(string.format("RESULT requests=%d errors=%d seconds=%.2f p50_ms=%.3f p99_ms=%.3f\n",
    summary.requests, summary.errors.status, summary.duration / 1e6,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
