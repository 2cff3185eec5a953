#!/usr/bin/env bash
# The loop by itself on the real SmolLM2, on the defaults a new team gets:
# no task suite (the gate judges each candidate on the held-out part of the
# team's own votes: the corrections users wrote, the newest first), a tenth
# of the team's end users on a candidate that passed (the canary), decided
# by their live thumbs, and the shipped minimum of new examples before a
# cycle trains. `flywheel up` runs the gateway and the worker in one
# process; `flywheel simulate --follow-loop` plays the scenario's traffic
# through the public API, waits for the loop after each batch, keeps its
# users chatting while a canary runs, and scores the scenario's held-out
# messages as served. Those messages are never sent as traffic, never
# rated, and never seen by the gate: the set the lift is reported on is not
# the set that decided.
#
#   scripts/demo-loop.sh [OUT_DIR] [CYCLES] [--unstructured]
#       (default target/demo-loop, 2 cycles, response_format sent;
#       SCENARIO=FILE, default scenarios/support-routing-mixed.json)
#
# Changed from the defaults, and why: a curation slot every minute instead
# of every 15 (the slot only starts a cycle; a demo need not wait a quarter
# of an hour each time), and 50 simulated end users per rater instead of
# the scenario's 3 (a canary serves a tenth of a team's end users, so it
# needs many of them to get votes). Needs Postgres on 127.0.0.1:5432 (user
# postgres, trust) and the model in the cache (any `make test` run pulls
# it).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-target/demo-loop}")
CYCLES=${2:-2}
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
rm -rf "$FLYWHEEL_HOME"
psql -q "$ADMIN" -c "drop database if exists $DB" -c "create database $DB"
cargo build --release -q -p flywheel
FW=target/release/flywheel
TEAM=shop-support

$FW migrate
$FW models pull
$FW keys create --team $TEAM > /dev/null
$FW config show > "$OUT/config.txt"
# The held-out messages as a suite, written for scoring the final champion
# afterwards (scripts/demo-both-modes.sh), never given to the team: the
# gate does not see them. The same mode the traffic is served in unless
# --unstructured.
STRUCTURED=--structured
[ "$SIMULATE_FLAGS" = "--unstructured" ] && STRUCTURED=
scripts/scenario-task-suite.py "$SCENARIO" "$OUT/task-suite.json" $STRUCTURED
# The base answers the retention suite now, and its answers are kept: each
# cycle's evaluation then runs only its candidate there (a promoted
# candidate's answers are kept when it is evaluated).
$FW suites answer --team $TEAM
$FW up > "$OUT/up.out" 2> "$OUT/up.log" &
UP=$!
trap 'kill $UP 2>/dev/null || true' EXIT
until curl -sf "http://$FLYWHEEL_ADDR/readyz" > /dev/null; do sleep 1; done

# shellcheck disable=SC2086
$FW simulate "$SCENARIO" --cycles "$CYCLES" --follow-loop --users-per-rater 50 \
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
