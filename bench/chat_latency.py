"""Sequential chat requests against a running gateway; prints p50/p95/max
latency and decode speed as one JSON line.

    python3 bench/chat_latency.py BASE_URL KEY MODEL [N]
"""

import json
import sys
import time
import urllib.request

base, key, model = sys.argv[1:4]
n = int(sys.argv[4]) if len(sys.argv) > 4 else 15
body = json.dumps({
    "model": model,
    "messages": [{"role": "user", "content": "Write two sentences about the sea."}],
    "max_tokens": 32,
    "temperature": 0,
}).encode()
times, tokens = [], 0
for _ in range(n):
    req = urllib.request.Request(f"{base}/v1/chat/completions", data=body, headers={
        "authorization": f"Bearer {key}", "content-type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(req) as resp:
        out = json.load(resp)
    times.append(time.perf_counter() - start)
    tokens += out["usage"]["completion_tokens"]
times.sort()
print(json.dumps({
    "requests": n,
    "p50_s": times[n // 2],
    "p95_s": times[min(n - 1, int(n * 0.95))],
    "max_s": times[-1],
    "tokens_per_s": tokens / sum(times),
}))
