#!/usr/bin/env bash
# The loop by itself on the real SmolLM2: `flywheel up` (gateway and worker
# in one process) turns cycles with no manual step, while `flywheel
# simulate --follow-loop` plays the demo scenario's traffic through the
# public API, waits for the loop's cycle after each batch, and scores the
# held-out messages (never sent as traffic) as served. The team's task
# suite is those held-out messages; the gate also runs the shipped general
# retention suite.
#
#   scripts/demo-loop.sh [OUT_DIR] [CYCLES] [--unstructured]
#       (default target/demo-loop, 3 cycles, response_format sent;
#       SCENARIO=FILE, default scenarios/support-routing-mixed.json)
#
# Settings for a demo that fits an afternoon: a curation slot every minute,
# a cycle trains once 150 new examples are in (a cycle of 120 chats brings
# about 240), and a passing candidate is promoted on the offline evidence
# (FLYWHEEL_CANARY_SHARE=0: the simulated users rate traffic only while a
# batch is sent, so a canary would wait for its votes). Needs Postgres on
# 127.0.0.1:5432 (user postgres, trust) and the model in the cache (any
# `make test` run pulls it).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-target/demo-loop}")
CYCLES=${2:-3}
SIMULATE_FLAGS=${3:-}
SCENARIO=${SCENARIO:-scenarios/support-routing-mixed.json}
mkdir -p "$OUT"
DB=flywheel_demo_loop
ADMIN=${ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/$DB
export FLYWHEEL_HOME=$OUT/home
export FLYWHEEL_MODEL_CACHE=${FLYWHEEL_MODEL_CACHE:-$HOME/.cache/flywheel/models}
export FLYWHEEL_ADDR=127.0.0.1:${PORT:-18081}
export FLYWHEEL_CURATION_SCHEDULE="0 * * * * *"
export FLYWHEEL_TRAIN_MIN_NEW_EXAMPLES=150
export FLYWHEEL_CANARY_SHARE=0
rm -rf "$FLYWHEEL_HOME"
psql -q "$ADMIN" -c "drop database if exists $DB" -c "create database $DB"
cargo build --release -q -p flywheel
FW=target/release/flywheel
TEAM=shop-support

$FW migrate
$FW models pull
$FW keys create --team $TEAM > /dev/null
# The suite is scored the way the traffic is served: with the schema unless
# --unstructured.
STRUCTURED=--structured
[ "$SIMULATE_FLAGS" = "--unstructured" ] && STRUCTURED=
scripts/scenario-task-suite.py "$SCENARIO" "$OUT/task-suite.json" $STRUCTURED
# The base answers the task and retention suites now, before the first
# cycle, and its answers are kept: each cycle's evaluation then runs only
# its candidate (a promoted candidate's answers are kept when it is
# evaluated).
$FW suites add "$OUT/task-suite.json" --team $TEAM --answer
$FW up > "$OUT/up.out" 2> "$OUT/up.log" &
UP=$!
trap 'kill $UP 2>/dev/null || true' EXIT
until curl -sf "http://$FLYWHEEL_ADDR/readyz" > /dev/null; do sleep 1; done

# shellcheck disable=SC2086
$FW simulate "$SCENARIO" --cycles "$CYCLES" --follow-loop \
    $SIMULATE_FLAGS --report "$OUT/simulate.json" 2>&1 | tee "$OUT/simulate.txt"
$FW cycles list --team $TEAM | tee "$OUT/cycles.txt"
for id in $(awk 'NR > 1 && $6 != "skipped" {print $1}' "$OUT/cycles.txt"); do
    $FW cycles show "$id"
done | tee "$OUT/cycles-shown.txt"
$FW decisions --team $TEAM | tee "$OUT/decisions.txt"
for e in $(grep -oE "^evaluation [0-9a-f-]{36}" "$OUT/cycles-shown.txt" | cut -d' ' -f2); do
    $FW eval show "$e"
done > "$OUT/evaluations.txt"

# The dashboard as the run left it, page by page (Chromium, playwright-core
# from tests/browser; scripts/test.sh installs both).
export FLYWHEEL_ADMIN_PASSWORD=demo-loop-password
$FW admin create demo > /dev/null
mkdir -p "$OUT/screenshots"
(cd tests/browser && BASE="http://$FLYWHEEL_ADDR" ADMIN_USER=demo \
    PASSWORD=$FLYWHEEL_ADMIN_PASSWORD SHOTS="$OUT/screenshots" node screenshots.mjs)
