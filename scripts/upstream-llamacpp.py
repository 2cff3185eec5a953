#!/usr/bin/env python3
"""An upstream model version against llama.cpp's real server.

The CI tests (services/flywheel/tests/upstream.rs) run the upstream path
against a stand-in; this script runs it once against the real thing:
llama-cpp-python's OpenAI-compatible server (`python -m llama_cpp.server`)
serving the SmolLM2 GGUF Flywheel itself serves, registered as an upstream
version and made a team's champion. Through `flywheel serve` and the OpenAI
SDK it sends a chat and a stream, rates one, reads the records back from
Postgres, then kills the llama.cpp server in the middle of a stream and
shows what the client got and what was recorded.

Needs: a built `flywheel` (target/release, or FLYWHEEL_BIN), PostgreSQL at
TEST_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/postgres), and
`pip install 'llama-cpp-python[server]==0.3.36' openai` (llama.cpp builds
from source: about 25 minutes on 2 cores).

Usage: scripts/upstream-llamacpp.py > report.json
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

import openai

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("FLYWHEEL_BIN", os.path.join(ROOT, "target/release/flywheel"))
ADMIN_URL = os.environ.get("TEST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, secs=120):
    end = time.time() + secs
    while time.time() < end:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            time.sleep(0.5)
    raise SystemExit(f"{url} did not answer within {secs} s")


def psql(db, sql):
    out = subprocess.run(["psql", db, "-Atc", sql], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def main():
    home = tempfile.mkdtemp(prefix="fw-upstream-")
    name = f"fw_upstream_llamacpp_{uuid.uuid4().hex[:8]}"
    psql(ADMIN_URL, f'create database "{name}"')
    db = ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_") or k == "FLYWHEEL_MODEL_CACHE"}
    env.update(DATABASE_URL=db, FLYWHEEL_HOME=home)
    # The tests' model cache: SmolLM2 is downloaded once.
    env.setdefault("FLYWHEEL_MODEL_CACHE", os.path.expanduser("~/.cache/flywheel/models"))

    def fw(*args):
        out = subprocess.run([BIN, *args], env=env, check=True, capture_output=True, text=True)
        return out.stdout

    procs = []
    try:
        fw("migrate")
        log("pulling SmolLM2 (cached after the first time)")
        fw("models", "pull")
        local = [json.loads(l) for l in fw("models", "list", "--json").splitlines()][0]
        key = fw("keys", "create", "--team", "acme").splitlines()[-1]
        # A second team, left on the model Flywheel serves itself.
        own_key = fw("keys", "create", "--team", "own").splitlines()[-1]

        port = free_port()
        log(f"starting llama.cpp's server on {local['path']}")
        llama = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", local["path"], "--host", "127.0.0.1",
             "--port", str(port), "--model_alias", "smollm2-135m", "--n_ctx", "2048"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(llama)
        wait_http(f"http://127.0.0.1:{port}/v1/models")
        fw("models", "add-upstream", "smollm2-llamacpp", "--url", f"http://127.0.0.1:{port}/v1",
           "--model", "smollm2-135m", "--team", "acme", "--timeout-secs", "60")
        fw("models", "promote", "smollm2-llamacpp", "--team", "acme", "--reason",
           "llama.cpp's server as the team's upstream")

        gport = free_port()
        gw_env = dict(env, FLYWHEEL_ADDR=f"127.0.0.1:{gport}", FLYWHEEL_JOURNAL_DIR=os.path.join(home, "journal"),
                      FLYWHEEL_UPSTREAM_BREAKER_FAILURES="4")
        gw = subprocess.Popen([BIN, "serve"], env=gw_env, stdout=subprocess.DEVNULL,
                              stderr=open(os.path.join(home, "gateway.log"), "w"))
        procs.append(gw)
        wait_http(f"http://127.0.0.1:{gport}/readyz")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{gport}/v1", api_key=key, max_retries=0)
        question = [{"role": "user", "content": "What is the capital of France?"}]
        report = {"llama_cpp_server": f"llama-cpp-python {__import__('llama_cpp').__version__}",
                  "model_file": local["path"]}

        t = time.time()
        full = client.chat.completions.create(model="default", messages=question, temperature=0, max_tokens=30,
                                              user="end-user-1")
        report["chat"] = {"content": full.choices[0].message.content, "model": full.model,
                          "finish_reason": full.choices[0].finish_reason,
                          "usage": full.usage.model_dump(), "seconds": round(time.time() - t, 2)}
        text, usage = "", None
        for chunk in client.chat.completions.create(model="default", messages=question, temperature=0,
                                                    max_tokens=30, stream=True,
                                                    stream_options={"include_usage": True}):
            for c in chunk.choices:
                text += c.delta.content or ""
            usage = chunk.usage or usage
        report["stream"] = {"content": text, "usage": usage.model_dump() if usage else None}
        # The same question to Flywheel's own engine on the same file (the
        # other team's champion).
        own_client = openai.OpenAI(base_url=f"http://127.0.0.1:{gport}/v1", api_key=own_key, max_retries=0)
        own = own_client.chat.completions.create(model="default", messages=question, temperature=0, max_tokens=30)
        report["flywheel_engine_usage"] = own.usage.model_dump()
        report["flywheel_engine_on_the_same_file"] = own.choices[0].message.content

        vote = urllib.request.Request(
            f"http://127.0.0.1:{gport}/v1/feedback", method="POST",
            data=json.dumps({"completion_id": full.id, "rating": "up", "user": "end-user-1"}).encode(),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        report["feedback_status"] = urllib.request.urlopen(vote).status

        # Kill the real server in the middle of a stream.
        story = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
        got, error = "", None
        stream = client.chat.completions.create(model="default", messages=story, temperature=0, max_tokens=400,
                                                stream=True)
        try:
            for i, chunk in enumerate(stream):
                for c in chunk.choices:
                    got += c.delta.content or ""
                if i == 10:
                    llama.send_signal(signal.SIGKILL)
                    llama.wait()
        except Exception as e:  # the SDK raises on the error event
            error = f"{type(e).__name__}: {e}"
        report["killed_mid_stream"] = {"client_got_chars": len(got), "client_error": error}
        after = []
        for _ in range(3):
            try:
                client.chat.completions.create(model="default", messages=question, max_tokens=5)
                after.append(200)
            except openai.APIStatusError as e:
                after.append(e.status_code)
        report["after_the_kill_statuses"] = after

        time.sleep(2)  # the journal reaches Postgres
        rows = psql(db, "select c.finish_reason || ' ' || c.prompt_tokens || ' ' || c.completion_tokens"
                        " || ' ' || length(c.output) from completions c join model_versions v"
                        " on v.id = c.model_version_id where v.name = 'smollm2-llamacpp' order by c.created_at")
        report["records"] = [dict(zip(["finish_reason", "prompt_tokens", "completion_tokens", "output_chars"],
                                      r.split(" "))) for r in rows.splitlines()]
        report["votes"] = int(psql(db, "select count(*) from feedback"))
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{gport}/metrics").read().decode()
        report["metrics"] = [l for l in metrics.splitlines() if l.startswith("flywheel_upstream_")]
        print(json.dumps(report, indent=2))
    finally:
        for p in procs:
            p.kill()
            p.wait()
        psql(ADMIN_URL, f'drop database if exists "{name}" with (force)')


if __name__ == "__main__":
    main()
