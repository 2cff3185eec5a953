#!/usr/bin/env bash
# Gateway latency while a LoRA training run is in progress on the same
# machine: chat requests one at a time (32 tokens, greedy) against
# `flywheel serve` on SmolLM2-135M, (1) with nothing else running, then with
# a `flywheel worker` training a run whose threads run at FLYWHEEL_TRAIN_NICE
# 0 (normal priority), 10 (the default) and 19.
#
#   scripts/bench-train-latency.sh        (needs Postgres on 127.0.0.1:5432)
set -euo pipefail
cd "$(dirname "$0")/.."
ADMIN=${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
DB=fw_bench_latency
export RUST_LOG=warn,sqlx=error FLYWHEEL_HOME=$(mktemp -d) FLYWHEEL_CURATION_SCHEDULE=off
export FLYWHEEL_MODEL_CACHE=${FLYWHEEL_MODEL_CACHE:-$HOME/.cache/flywheel/models}
cargo build --release -q -p flywheel
B=target/release/flywheel
psql -q "$ADMIN" -c "drop database if exists $DB" -c "create database $DB"
export DATABASE_URL="${ADMIN%/*}/$DB"
MODEL=$(ls "$FLYWHEEL_MODEL_CACHE"/*.gguf | head -1)
$B models import "$MODEL" --name smollm2 --champion >/dev/null
$B datasets synth --team acme --completions 4000 --ratings 2000 >/dev/null 2>&1
$B datasets build --team acme --inline >/dev/null 2>&1
KEY=$($B keys create --team acme | tail -1)
FLYWHEEL_ADDR=127.0.0.1:18282 $B serve >/dev/null 2>&1 &
SERVE=$!
trap 'kill $SERVE $WORKER 2>/dev/null || true' EXIT
WORKER=
until curl -sf http://127.0.0.1:18282/readyz >/dev/null; do sleep 0.5; done
measure() { python3 bench/chat_latency.py http://127.0.0.1:18282 "$KEY" smollm2 15; }
run_status() { psql -qtA "$DATABASE_URL" -c "select status || ' ' || step from training_runs where id = '$1'"; }

echo "idle:            $(measure)"
for NICE in 0 10 19; do
  RUN=$($B train --dataset acme@1 --queue --steps 100000 --max-len 128 2>/dev/null | awk '{print $4}')
  FLYWHEEL_TRAIN_NICE=$NICE $B worker >/dev/null 2>&1 &
  WORKER=$!
  until [ "$(run_status "$RUN" | awk '{print ($2 >= 2)}')" = 1 ]; do sleep 0.5; done
  echo "training at nice $NICE: $(measure)  (run at step $(run_status "$RUN" | awk '{print $2}'))"
  $B runs cancel "$RUN" >/dev/null
  until [ "$(run_status "$RUN" | awk '{print $1}')" = cancelled ]; do sleep 0.5; done
  kill $WORKER; wait $WORKER 2>/dev/null || true
done
kill $SERVE; wait $SERVE 2>/dev/null || true
psql -q "$ADMIN" -c "drop database $DB" 2>/dev/null || true
