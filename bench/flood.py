"""Two teams on one gateway, one flooding: what the quiet team gets.

    python3 bench/flood.py BASE_URL QUIET_KEY FLOOD_KEY FLOOD_CLIENTS SECONDS PID

1. Baseline: the quiet team alone sends QUIET_REQUESTS streamed requests,
   one after another.
2. Flood: a child process runs FLOOD_CLIENTS clients of the flooding team,
   each sending non-streamed requests back to back (a refused one is sent
   again after 0.1 s, not after `retry-after`, as a careless client
   would). Once it has filled the engine, the quiet team sends its requests
   one after another as in the baseline, for at most SECONDS.
3. Recovery: the flooding process is killed (its connections drop); the
   time until the engine's queue and batch are empty (read from /metrics),
   then one more quiet request.

Prints one JSON line: per phase and team, answered / 429 / 5xx / other
failures, latency and time-to-first-token percentiles; the gateway's peak
resident memory (VmHWM of PID) and the recovery.

    python3 bench/flood.py flood BASE_URL FLOOD_KEY CLIENTS OUT_FILE

is the flooding child: one line per request, "status seconds", in OUT_FILE.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

QUIET_REQUESTS = 12
QUIET_TOKENS = 24
FLOOD_TOKENS = 64
PROMPT = "Write a short story about a lighthouse keeper."


def post(base, key, body, stream):
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
                    if first is None and line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        choices = chunk.get("choices") or [{}]
                        if choices[0].get("delta", {}).get("content"):
                            first = time.perf_counter() - start
            else:
                resp.read()
        return 200, time.perf_counter() - start, first
    except urllib.error.HTTPError as e:
        e.read()
        return e.code, time.perf_counter() - start, None
    except Exception:  # a reset or a timeout: counted, not fatal
        return 0, time.perf_counter() - start, None


def flood_child(base, key, clients, out_path):
    body = {"model": "default", "max_tokens": FLOOD_TOKENS, "temperature": 1.0,
            "messages": [{"role": "user", "content": PROMPT}]}
    lock = threading.Lock()
    out = open(out_path, "a", buffering=1)

    def client():
        while True:
            status, seconds, _ = post(base, key, body, False)
            with lock:
                out.write(f"{status} {seconds:.4f}\n")
            if status != 200:
                time.sleep(0.1)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


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


def metric(base, names):
    text = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.split(" ")[0] in names)


def peak_rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return None


def main():
    base, quiet_key, flood_key = sys.argv[1], sys.argv[2], sys.argv[3]
    clients, seconds, pid = int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
    quiet_body = {"model": "default", "max_tokens": QUIET_TOKENS, "temperature": 0,
                  "stream": True, "messages": [{"role": "user", "content": "Name three colours."}]}
    baseline = [post(base, quiet_key, quiet_body, True) for _ in range(QUIET_REQUESTS)]

    flood_file = f"/tmp/flood-{os.getpid()}.txt"
    child = subprocess.Popen([sys.executable, __file__, "flood", base, flood_key, str(clients),
                              flood_file], start_new_session=True)
    # The flood fills the batch and its share of the queue first.
    deadline = time.time() + 60
    while metric(base, {"flywheel_engine_running"}) < 1 or time.time() < deadline - 50:
        time.sleep(0.2)
    quiet = []
    end = time.time() + seconds
    while len(quiet) < QUIET_REQUESTS and time.time() < end:
        quiet.append(post(base, quiet_key, quiet_body, True))
    busy_before_kill = metric(base, {"flywheel_engine_running", "flywheel_engine_queue_depth"})
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    killed = time.perf_counter()
    while metric(base, {"flywheel_engine_running", "flywheel_engine_queue_depth"}) > 0:
        time.sleep(0.05)
    drained = time.perf_counter() - killed
    after = post(base, quiet_key, quiet_body, True)

    flood = []
    with open(flood_file) as f:
        for line in f:
            status, secs = line.split()
            flood.append((int(status), float(secs), None))
    os.remove(flood_file)
    print(json.dumps({
        "flood_clients": clients,
        "quiet_alone": summary(baseline),
        "quiet_under_flood": summary(quiet),
        "flood": summary(flood),
        "engine_busy_at_kill": busy_before_kill,
        "drained_after_kill_s": round(drained, 3),
        "quiet_after_kill": summary([after]),
        "peak_rss_mib": peak_rss_mib(pid),
    }))


if __name__ == "__main__":
    if sys.argv[1] == "flood":
        flood_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    else:
        main()
