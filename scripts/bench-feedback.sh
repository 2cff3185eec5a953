#!/usr/bin/env bash
# Feedback ingestion and completion-log overhead, with wrk on loopback and
# Postgres on this machine:
#   1. POST /v1/feedback for DURATION with each journal fsync policy
#      (FLYWHEEL_JOURNAL_SYNC=always, batch, never; one gateway each, same
#      run): ratings/s, p50/p99 latency, fsync calls, then every acknowledged
#      (201) rating counted in Postgres;
#   2. small chat requests, one at a time (latency, not saturation), with
#      the completion log on, then off (same run): the p99 latency it adds.
#   scripts/bench-feedback.sh [DURATION=30s] [CONNECTIONS=64]
# Needs wrk (apt-get install wrk) and psql; PostgreSQL as for `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-30s}
conns=${2:-64}
admin=${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
cargo build --release --quiet -p flywheel --bin flywheel
cargo build --release --quiet -p flywheel-model --features testing --example tiny_model
bin=$PWD/target/release/flywheel
work=$(mktemp -d)
export BENCH_DIR=$work
db="fw_bench_$(date +%s)"
psql -q "$admin" -c "create database $db"
export DATABASE_URL="${admin%/*}/$db"
$bin migrate >/dev/null
tiny=$(target/release/examples/tiny_model "$work")
$bin models import "$tiny" --name tiny >/dev/null
key=$($bin keys create --team bench | tail -1)
port=18089
gw=""
start() {
  FLYWHEEL_ADDR=127.0.0.1:$port FLYWHEEL_JOURNAL_DIR=$work/journal RUST_LOG=warn \
    FLYWHEEL_LOG_COMPLETIONS=$1 FLYWHEEL_JOURNAL_SYNC=${2:-batch} $bin serve & gw=$!
  until curl -sf "http://127.0.0.1:$port/readyz" >/dev/null; do sleep 0.2; done
}
stop() { kill "$gw"; wait "$gw" 2>/dev/null || true; }
trap 'kill $gw 2>/dev/null || true' EXIT

start true
{
  echo "key = \"$key\""
  echo "ids = {"
  for _ in $(seq 200); do
    curl -sf "http://127.0.0.1:$port/v1/chat/completions" -H "Authorization: Bearer $key" \
      -H 'content-type: application/json' \
      -d '{"model":"tiny","max_tokens":1,"messages":[{"role":"user","content":"hi"}]}' |
      python3 -c 'import json,sys; print("  \"%s\"," % json.load(sys.stdin)["id"])'
  done
  echo "}"
} > "$work/ids.lua"

metric() { curl -s "http://127.0.0.1:$port/metrics" | awk -v m="$1" '$1 == m {print $2}'; }
for policy in ${POLICIES:-never batch always}; do
  # Each policy starts from an empty feedback table.
  stop
  psql -q "$DATABASE_URL" -c "truncate feedback" -c "vacuum analyze feedback"
  start true "$policy"
  echo "== feedback, FLYWHEEL_JOURNAL_SYNC=$policy: wrk -t1 -c$conns -d$duration"
  wrk -t1 -c"$conns" -d"$duration" --latency -s bench/feedback.lua "http://127.0.0.1:$port" | tee "$work/feedback.txt" | grep -E "Requests/sec|RESULT"
  created=$(sed -n 's/.*RESULT created=\([0-9]*\).*/\1/p' "$work/feedback.txt")
  for _ in $(seq 600); do
    [ "$(metric flywheel_journal_pending_records)" = "0" ] && break
    sleep 0.1
  done
  echo "fsync calls: $(metric flywheel_journal_syncs_total)"
  stored=$(psql -tA "$DATABASE_URL" -c "select count(*) from feedback")
  # wrk stops counting with requests still in flight; those are stored too, so
  # stored may exceed what wrk saw acknowledged. Lost = acknowledged but absent.
  lost=$(( created > stored ? created - stored : 0 ))
  echo "acknowledged=$created stored=$stored lost=$lost (in flight when wrk stopped: $(( stored > created ? stored - created : 0 )))"
done
stop
start true

echo "== chat latency, completion log on"
wrk -t1 -c1 -d20s --latency -s bench/chat.lua "http://127.0.0.1:$port" | grep RESULT
stop
start false
echo "== chat latency, completion log off"
wrk -t1 -c1 -d20s --latency -s bench/chat.lua "http://127.0.0.1:$port" | grep RESULT
stop
psql -q "$admin" -c "drop database $db"
