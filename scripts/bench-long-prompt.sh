#!/usr/bin/env bash
# A short request while an 8k-token prompt is being read, on the real
# SmolLM2 through the gateway: its time to first token beside its own
# unloaded baseline, measured in the same run. Run twice, a fresh gateway
# each: with the shipped fair scheduling (the prompts being read share each
# step's token budget) and with first-come-first-served
# (FLYWHEEL_SCHEDULING=fifo: the oldest prompt takes the budget, how the
# engine read prompts before), both with the default 256 tokens a step.
#   scripts/bench-long-prompt.sh [PROMPT_TOKENS=8000] [BUILD=release] [MODES="fair fifo"]
# Needs: PostgreSQL as for `make test`; the model is pulled when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
want=${1:-8000}
build=${2:-release}
modes=${3:-fair fifo}
admin=${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
if [ "$build" = release ]; then
  cargo build --release --quiet -p flywheel --bin flywheel
else
  cargo build --quiet -p flywheel --bin flywheel
fi
bin=$PWD/target/$build/flywheel
work=$(mktemp -d)
db="fw_bench_long_prompt_$(date +%s)"
psql -q "$admin" -c "create database $db"
export DATABASE_URL="${admin%/*}/$db"
export FLYWHEEL_HOME=$work/home RUST_LOG=warn
# The prefix cache off: the short requests repeat one prompt, which the
# cache would serve from memory after the first, and this measures how
# prompts being read share the engine.
export FLYWHEEL_PREFIX_CACHE_MB=0
export FLYWHEEL_ADDR=127.0.0.1:18094
$bin migrate >/dev/null
$bin models pull >/dev/null
long=$($bin keys create --team long | tail -1)
short=$($bin keys create --team short | tail -1)

gw=""
trap 'kill $gw 2>/dev/null || true' EXIT
for label in $modes; do
  FLYWHEEL_SCHEDULING=$label $bin serve 2> "$work/serve-$label.log" & gw=$!
  until curl -sf "http://$FLYWHEEL_ADDR/readyz" >/dev/null; do sleep 0.5; done
  echo "== $label" >&2
  python3 bench/long_prompt.py "http://$FLYWHEEL_ADDR" "$long" "$short" "$want" > "$work/$label.json"
  kill $gw; wait $gw 2>/dev/null || true
done

python3 - "$work" "$build" "$modes" <<'PY'
import json, sys
work, build = sys.argv[1], sys.argv[2]
print(f"build: {build}; raw output in {work}\n")
print("| scheduling | long prompt (tokens) | long prompt read in (s) | short alone: TTFT p50 / max (s) | short beside it: TTFT p50 / max (s) | short latency beside it: p50 / max (s) | short answered before it ended |")
print("|---|---|---|---|---|---|---|")
for label in sys.argv[3].split():
    r = json.load(open(f"{work}/{label}.json"))
    a, b = r["short_alone"], r["short_beside_long"]
    print(f"| {label} | {r['prompt_tokens']} | {r['long']['ttft_s']} | {a['ttft_p50_s']} / {a['ttft_max_s']} | "
          f"{b['ttft_p50_s']} / {b['ttft_max_s']} | {b['latency_p50_s']} / {b['latency_max_s']} | "
          f"{r['short_answered_before_long_ended']} of {b['sent']} |")
PY
psql -q "$admin" -c "drop database $db with (force)"
