#!/usr/bin/env bash
# Two teams on one gateway serving the real SmolLM2, one flooding with four
# times the sequences the engine runs at once (and no regard for
# retry-after): answered, 429s, 5xx, latency and time to first token of the
# quiet team beside its own unloaded baseline, measured in the same run;
# peak memory; and, once the flooding process is killed, how long the
# engine takes to drain and what the quiet team's next request gets.
# Run twice, a fresh gateway each: with the shipped fair scheduling and with
# first-come-first-served (FLYWHEEL_SCHEDULING=fifo), how the engine
# admitted requests before; the per-team share of the queue is the
# default (32 of 64) in both.
#   scripts/bench-fairness.sh [SECONDS=120] [BUILD=release]
# Needs: PostgreSQL as for `make test`; the model is pulled when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-120}
build=${2:-release}
admin=${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
if [ "$build" = release ]; then
  cargo build --release --quiet -p flywheel --bin flywheel
else
  cargo build --quiet -p flywheel --bin flywheel
fi
bin=$PWD/target/$build/flywheel
work=$(mktemp -d)
db="fw_bench_fairness_$(date +%s)"
psql -q "$admin" -c "create database $db"
export DATABASE_URL="${admin%/*}/$db"
export FLYWHEEL_HOME=$work/home RUST_LOG=warn
# The prefix cache off: the short requests repeat one prompt, which the
# cache would serve from memory after the first, and this measures how
# prompts being read share the engine.
export FLYWHEEL_PREFIX_CACHE_MB=0
port=18093
export FLYWHEEL_ADDR=127.0.0.1:$port
$bin migrate >/dev/null
$bin models pull >/dev/null
quiet=$($bin keys create --team quiet | tail -1)
flood=$($bin keys create --team flood | tail -1)
batch=$($bin config show | awk '$1 == "engine.max_batch" {print $3}')
clients=$((4 * ${batch:-16}))

gw=""
trap 'kill $gw 2>/dev/null || true' EXIT
run() { # label, then env assignments for the gateway
  local label=$1; shift
  env "$@" $bin serve 2> "$work/serve-$label.log" & gw=$!
  until curl -sf "http://$FLYWHEEL_ADDR/readyz" >/dev/null; do sleep 0.5; done
  echo "== $label: $clients flooding clients for up to $seconds s" >&2
  python3 bench/flood.py "http://$FLYWHEEL_ADDR" "$quiet" "$flood" "$clients" "$seconds" "$gw" \
    > "$work/$label.json"
  kill $gw; wait $gw 2>/dev/null || true
}
run fair FLYWHEEL_SCHEDULING=fair
run fifo FLYWHEEL_SCHEDULING=fifo

python3 - "$work" "$build" <<'PY'
import json, sys
work, build = sys.argv[1], sys.argv[2]
print(f"build: {build}; raw output in {work}\n")
print("| scheduling | phase | team | sent | answered | 429 | 5xx | latency p50 / p99 (s) | TTFT p50 / p99 (s) |")
print("|---|---|---|---|---|---|---|---|---|")
for label in ["fair", "fifo"]:
    r = json.load(open(f"{work}/{label}.json"))
    for phase, team, key in [("alone", "quiet", "quiet_alone"), ("flood", "quiet", "quiet_under_flood"),
                             ("flood", "flood", "flood"), ("after the kill", "quiet", "quiet_after_kill")]:
        s = r[key]
        print(f"| {label} | {phase} | {team} | {s['sent']} | {s['answered']} | {s['429']} | {s['5xx']} | "
              f"{s['latency_p50_s']} / {s['latency_p99_s']} | {s['ttft_p50_s']} / {s['ttft_p99_s']} |")
print()
for label in ["fair", "fifo"]:
    r = json.load(open(f"{work}/{label}.json"))
    print(f"{label}: {r['flood_clients']} flooding clients; at the kill {r['engine_busy_at_kill']:.0f} "
          f"requests in the engine, drained {r['drained_after_kill_s']} s after; peak RSS {r['peak_rss_mib']} MiB")
PY
psql -q "$admin" -c "drop database $db with (force)"
