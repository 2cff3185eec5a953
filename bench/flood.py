"""Two teams on one gateway, one flooding: what the quiet team gets.

    python3 bench/flood.py BASE_URL QUIET_KEY FLOOD_KEY FLOOD_CLIENTS SECONDS PID

1. Baseline: the quiet team alone sends QUIET_REQUESTS streamed requests,
   one after another.
2. Flood: FLOOD_CLIENTS clients of the flooding team send non-streamed
   requests back to back for SECONDS (a refused one is sent again after
   0.1 s, not after `retry-after`, as a careless client would), while the
   quiet team sends its requests one after another as in the baseline.
3. Recovery: the flood stops; the time until the engine's queue and batch
   are empty again (read from /metrics).

Prints one JSON line: per phase and team, answered / 429 / 5xx / other
failures, latency and time-to-first-token percentiles; the gateway's peak
resident memory (VmHWM of PID) and the recovery time.
"""

import json
import sys
import threading
import time
import urllib.error
import urllib.request

base, quiet_key, flood_key = sys.argv[1], sys.argv[2], sys.argv[3]
flood_clients, seconds, pid = int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
QUIET_REQUESTS = 12
QUIET_TOKENS = 24
FLOOD_TOKENS = 64
PROMPT = "Write a short story about a lighthouse keeper."


def post(key, body, stream):
    req = urllib.request.Request(f"{base}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"authorization": f"Bearer {key}",
                                          "content-type": "application/json"})
    start = time.perf_counter()
    first = None
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            if stream:
                for raw in resp:
                    line = raw.decode().strip()
                    if first is None and line.startswith("data: {") and '"content"' in line:
                        first = time.perf_counter() - start
            else:
                resp.read()
        return 200, time.perf_counter() - start, first
    except urllib.error.HTTPError as e:
        e.read()
        return e.code, time.perf_counter() - start, None
    except Exception:  # a reset or a timeout: counted, not fatal
        return 0, time.perf_counter() - start, None


def quiet_run(out):
    body = {"model": "default", "max_tokens": QUIET_TOKENS, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": "Name three colours."}]}
    for _ in range(QUIET_REQUESTS):
        out.append(post(quiet_key, body, True))


def flood_run(out, stop):
    body = {"model": "default", "max_tokens": FLOOD_TOKENS, "temperature": 1.0,
            "messages": [{"role": "user", "content": PROMPT}]}
    while not stop.is_set():
        result = post(flood_key, body, False)
        out.append(result)
        if result[0] != 200:
            time.sleep(0.1)


def pct(xs, q):
    xs = sorted(xs)
    if not xs:
        return None
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3)


def summary(results):
    ok = [r for r in results if r[0] == 200]
    return {
        "sent": len(results),
        "answered": len(ok),
        "429": sum(1 for r in results if r[0] == 429),
        "5xx": sum(1 for r in results if r[0] >= 500),
        "failed_otherwise": sum(1 for r in results if r[0] not in (200, 429) and r[0] < 500),
        "latency_p50_s": pct([r[1] for r in ok], 0.5),
        "latency_p99_s": pct([r[1] for r in ok], 0.99),
        "ttft_p50_s": pct([r[2] for r in ok if r[2] is not None], 0.5),
        "ttft_p99_s": pct([r[2] for r in ok if r[2] is not None], 0.99),
    }


def engine_busy():
    text = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    busy = 0.0
    for line in text.splitlines():
        if line.startswith(("flywheel_engine_queue_depth", "flywheel_engine_running")):
            busy += float(line.rsplit(" ", 1)[1])
    return busy


def peak_rss_mib():
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return None


baseline = []
quiet_run(baseline)

stop = threading.Event()
flood, quiet = [], []
threads = [threading.Thread(target=flood_run, args=(flood, stop)) for _ in range(flood_clients)]
for t in threads:
    t.start()
time.sleep(5)  # the flood fills the batch and its share of the queue first
quiet_thread = threading.Thread(target=quiet_run, args=(quiet,))
quiet_thread.start()
deadline = time.time() + seconds
while time.time() < deadline and quiet_thread.is_alive():
    time.sleep(0.5)
quiet_thread.join()
stop.set()
stopped = time.perf_counter()
for t in threads:
    t.join()
while engine_busy() > 0:
    time.sleep(0.1)
recovery = time.perf_counter() - stopped

print(json.dumps({
    "flood_clients": flood_clients,
    "quiet_alone": summary(baseline),
    "quiet_under_flood": summary(quiet),
    "flood": summary(flood),
    "recovery_s": round(recovery, 2),
    "peak_rss_mib": peak_rss_mib(),
}))
