"""Concurrent chat streams against a running gateway, one or more teams at
once; prints one JSON line: aggregate decode tokens/s over the run, time to
first token and per-stream decode speed (p50/p95), and which version
answered each team (the `system_fingerprint` of its completions).

    python3 bench/team_streams.py BASE_URL REQUESTS_PER_STREAM KEY[:STREAMS] ...

Every request streams (SSE) so that time to first token and decode time are
measured apart; `max_tokens` is fixed and `ignore_eos` is not an OpenAI
parameter, so the prompt asks for a long answer and the token count is read
from the final usage chunk.
"""

import json
import sys
import threading
import time
import urllib.request

base, per_stream = sys.argv[1], int(sys.argv[2])
teams = []
for arg in sys.argv[3:]:
    key, _, streams = arg.partition(":")
    teams.append((key, int(streams or 1)))

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works, step by step.",
    "Describe a walk through a forest in autumn.",
    "Write a letter to a friend about your week.",
]
MAX_TOKENS = 64
lock = threading.Lock()
ttft, decode_rates, fingerprints = [], [], {}
tokens_total = 0


def one(key, prompt):
    body = json.dumps({
        "model": "default",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }).encode()
    req = urllib.request.Request(f"{base}/v1/chat/completions", data=body, headers={
        "authorization": f"Bearer {key}", "content-type": "application/json"})
    start = time.perf_counter()
    first, tokens, fp = None, 0, None
    with urllib.request.urlopen(req) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            fp = chunk.get("system_fingerprint") or fp
            if first is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    return start, first or end, end, tokens, fp


def stream(key, index):
    global tokens_total
    for i in range(per_stream):
        start, first, end, tokens, fp = one(key, PROMPTS[(index + i) % len(PROMPTS)])
        with lock:
            ttft.append(first - start)
            if tokens > 1 and end > first:
                decode_rates.append((tokens - 1) / (end - first))
            tokens_total += tokens
            fingerprints.setdefault(key[:12], set()).add(fp)


threads = [threading.Thread(target=stream, args=(key, i))
           for key, streams in teams for i in range(streams)]
t0 = time.perf_counter()
for t in threads:
    t.start()
for t in threads:
    t.join()
wall = time.perf_counter() - t0


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


print(json.dumps({
    "streams": len(threads),
    "requests": len(ttft),
    "completion_tokens": tokens_total,
    "wall_s": round(wall, 2),
    "aggregate_tokens_per_s": round(tokens_total / wall, 1),
    "ttft_p50_ms": round(1000 * pct(ttft, 0.5)),
    "ttft_p95_ms": round(1000 * pct(ttft, 0.95)),
    "stream_decode_tokens_per_s_p50": round(pct(decode_rates, 0.5), 1),
    "served_by": {k: sorted(v) for k, v in fingerprints.items()},
}))
