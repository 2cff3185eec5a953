"""A long prompt being read: what a short request beside it waits.

    python3 bench/long_prompt.py BASE_URL LONG_KEY SHORT_KEY PROMPT_TOKENS

1. Baseline: the short team sends SHORT_REQUESTS streamed requests alone,
   one after another.
2. The long team sends one streamed request whose prompt is about
   PROMPT_TOKENS tokens (bench/prompt.txt repeated, counted with /tokenize).
   Half a second later, while it is being read, the short team sends the
   same short requests one after another until the long request has ended
   (at least SHORT_REQUESTS of them).

Prints one JSON line: the long request's prompt tokens and time to first
token (how long the engine took to read it), and per phase the short
requests' time to first token and latency (p50 and max), with how many of
them were answered before the long request ended.
"""

import json
import sys
import threading
import time
import urllib.request

from flood import pct, post

SHORT_REQUESTS = 5
SHORT_TOKENS = 8
SHORT = "Name three colours."


def tokens(base, key, text):
    req = urllib.request.Request(f"{base}/tokenize", data=json.dumps({"prompt": text}).encode(),
                                 headers={"authorization": f"Bearer {key}",
                                          "content-type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=60))["count"]


def short(base, key):
    body = {"model": "default", "max_tokens": SHORT_TOKENS, "temperature": 0.0, "stream": True,
            "messages": [{"role": "user", "content": SHORT}]}
    return post(base, key, body, True)


def stats(results):
    ok = [r for r in results if r[0] == 200]
    return {
        "sent": len(results),
        "answered": len(ok),
        "ttft_p50_s": pct([r[2] for r in ok if r[2] is not None], 0.5),
        "ttft_max_s": round(max((r[2] for r in ok if r[2] is not None), default=0), 3),
        "latency_p50_s": pct([r[1] for r in ok], 0.5),
        "latency_max_s": round(max((r[1] for r in ok), default=0), 3),
    }


def main():
    base, long_key, short_key, want = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    alone = [short(base, short_key) for _ in range(SHORT_REQUESTS)]

    unit = open("bench/prompt.txt").read()
    per_unit = tokens(base, long_key, unit)
    text = unit * max(1, want // per_unit)
    while tokens(base, long_key, text + unit) < want - 64:
        text += unit
    prompt_tokens = tokens(base, long_key, text)
    long_result = {}

    def read_long():
        body = {"model": "default", "max_tokens": 4, "temperature": 0.0, "stream": True,
                "messages": [{"role": "user", "content": text + "\nSummarise this in one line."}]}
        started = time.perf_counter()
        status, seconds, first = post(base, long_key, body, True)
        long_result.update(status=status, latency_s=round(seconds, 3),
                           ttft_s=round(first, 3) if first else None,
                           read_at=started + (first or seconds))

    t = threading.Thread(target=read_long)
    began = time.perf_counter()
    t.start()
    time.sleep(0.5)
    beside, before_read, each = [], 0, []
    while len(beside) < SHORT_REQUESTS or t.is_alive():
        sent = time.perf_counter() - began
        r = short(base, short_key)
        beside.append(r)
        each.append([round(sent, 2), round(r[2], 3) if r[2] is not None else None])
        if t.is_alive():
            before_read += 1
        if len(beside) > 200:
            break
    t.join()
    long_result.pop("read_at", None)
    print(json.dumps({
        "prompt_tokens": prompt_tokens,
        "long": long_result,
        "short_alone": stats(alone),
        "short_beside_long": stats(beside),
        "short_answered_before_long_ended": before_read,
        # Each short request beside it: when it was sent (seconds after the
        # long one) and its time to first token.
        "short_beside_long_each": each,
    }))


if __name__ == "__main__":
    main()
