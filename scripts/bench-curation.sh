#!/usr/bin/env bash
# Benchmark of the curation job at production size: generates COMPLETIONS
# synthetic completions with RATINGS ratings in a fresh database, then times
# `flywheel datasets build --inline` (load, build, write) and its peak memory,
# then the rebuild that finds the same input already built.
#
#   scripts/bench-curation.sh [COMPLETIONS] [RATINGS]     (default 1000000 500000)
#
# Needs: a Postgres server (TEST_DATABASE_URL, default 127.0.0.1:5432), psql,
# GNU time (/usr/bin/time; apt install time).
set -euo pipefail
cd "$(dirname "$0")/.."
COMPLETIONS=${1:-1000000}
RATINGS=${2:-500000}
ADMIN=${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
DB=fw_bench_curation

cargo build --release -q -p flywheel
BIN=target/release/flywheel
psql -q "$ADMIN" -c "drop database if exists $DB" -c "create database $DB"
export DATABASE_URL="${ADMIN%/*}/$DB"
export RUST_LOG=warn,sqlx=error
$BIN migrate >/dev/null

echo "== generating $COMPLETIONS completions and $RATINGS ratings"
start=$(date +%s.%N)
$BIN datasets synth --team bench --completions "$COMPLETIONS" --ratings "$RATINGS"
echo "generated in $(echo "$(date +%s.%N) - $start" | bc) s"

measure() {
  /usr/bin/time -f "wall %e s, peak RSS %M KiB" "$@" 2>&1 | grep -v "^\[" || true
}
echo "== build"
measure $BIN datasets build --team bench --inline
echo "== rebuild with no new feedback"
measure $BIN datasets build --team bench --inline
$BIN datasets show bench@1 | python3 -c '
import json, sys
v = json.load(sys.stdin); m = v["manifest"]
print("counts", json.dumps(m["counts"]))
print("dropped", json.dumps(m["dropped"]))
print("kto_balance", json.dumps(m["kto_balance"]))
print("lineage", json.dumps(v["lineage_rows"]))'
psql -q "$ADMIN" -c "drop database $DB"
