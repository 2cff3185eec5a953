#!/usr/bin/env bash
# Dashboard page timings at production size: the curation benchmark's data
# (COMPLETIONS synthetic completions, RATINGS ratings, one team) in a fresh
# database, `flywheel serve` on it, and each page requested RUNS times by a
# signed-in admin. Reports the server's own time per page (the
# Server-Timing header) as median and max, and the same pages on an empty
# database first, in the same run, as the baseline.
#
#   scripts/bench-dashboard.sh [COMPLETIONS] [RATINGS] [RUNS]   (default 1000000 500000 10)
#
# Needs: a Postgres server (TEST_DATABASE_URL, default 127.0.0.1:5432),
# psql, curl, and the model in the cache (`flywheel serve` loads it; any
# `make test` run pulls it).
set -euo pipefail
cd "$(dirname "$0")/.."
COMPLETIONS=${1:-1000000}
RATINGS=${2:-500000}
RUNS=${3:-10}
ADMIN=${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
DB=fw_bench_dashboard
PORT=${PORT:-18082}
cargo build --release -q -p flywheel
BIN=target/release/flywheel
export DATABASE_URL="${ADMIN%/*}/$DB"
export RUST_LOG=warn,sqlx=error
export FLYWHEEL_ADDR=127.0.0.1:$PORT
export FLYWHEEL_HOME=$(mktemp -d)
export FLYWHEEL_MODEL_CACHE=${FLYWHEEL_MODEL_CACHE:-$HOME/.cache/flywheel/models}
export FLYWHEEL_ADMIN_PASSWORD=bench-dashboard-password
JAR=$FLYWHEEL_HOME/cookies
BASE=http://$FLYWHEEL_ADDR

pages() {
  echo "/admin"
  echo "/admin/completions"
  echo "/admin/completions?team=bench"
  echo "/admin/completions?team=bench&rating=down"
  echo "/admin/completions?team=bench&rating=corrected"
  echo "/admin/completions?team=bench&q=invoice"
  echo "/admin/completions/$1"
  echo "/admin/datasets"
  echo "/admin/models"
  echo "/admin/decisions"
}

measure() {
  local label=$1 completion=$2
  $BIN serve > "$FLYWHEEL_HOME/serve.log" 2>&1 &
  local pid=$!
  until curl -sf "$BASE/healthz" > /dev/null; do sleep 0.5; done
  # The sign-in form's CSRF token: its cookie into the jar, the same token
  # from the form.
  local csrf
  csrf=$(curl -s -c "$JAR" "$BASE/admin/login" | sed -n 's/.*name="csrf" value="\([0-9a-f]*\)".*/\1/p')
  curl -s -b "$JAR" -c "$JAR" -o /dev/null -d "username=bench&password=$FLYWHEEL_ADMIN_PASSWORD&csrf=$csrf" \
      "$BASE/admin/login"
  echo "== $label"
  printf "%-52s %10s %10s\n" page "median ms" "max ms"
  while read -r page; do
    for _ in $(seq "$RUNS"); do
      curl -s -b "$JAR" -o /dev/null -D - "$BASE$page" | tr -d '\r' \
        | awk -F'dur=' '/^server-timing:/ {print $2}'
    done | sort -n | awk -v p="$page" '{v[NR]=$1} END {printf "%-52s %10.1f %10.1f\n", p, v[int((NR+1)/2)], v[NR]}'
  done < <(pages "$completion")
  kill $pid; wait $pid 2>/dev/null || true
}

psql -q "$ADMIN" -c "drop database if exists $DB" -c "create database $DB"
$BIN migrate > /dev/null
$BIN admin create bench > /dev/null
measure "empty database (baseline)" none

echo "== generating $COMPLETIONS completions and $RATINGS ratings"
$BIN datasets synth --team bench --completions "$COMPLETIONS" --ratings "$RATINGS" 2>&1 | tail -1
psql -q "$DATABASE_URL" -c "analyze"
one=$(psql -Atq "$DATABASE_URL" -c "select completion_id from feedback limit 1")
measure "$COMPLETIONS completions, $RATINGS ratings" "$one"
psql -q "$ADMIN" -c "drop database $DB"
