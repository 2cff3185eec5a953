#!/usr/bin/env bash
# A judge checked against the demo scenario's simulated users, on the real
# SmolLM2. `flywheel serve` answers one cycle of the scenario's traffic
# (scenarios/support-routing-mixed.json: 120 chats, each rated by a
# simulated user, some corrected); curation makes the preference pairs (the
# answer the simulated user wrote, chosen, against the model's, rejected);
# then `flywheel judges check` asks the judge about each pair in both orders
# and reports its agreement with those users, its position bias and
# whether the gate would trust it.
#
# The judge is SmolLM2-135M-Instruct itself, the only real model here: the
# big model a team would use as judge cannot be downloaded on this machine.
# Any other version can be given (JUDGE=NAME, e.g. an upstream registered
# with `flywheel models add-upstream`).
#
#   scripts/judge-demo.sh [OUT_DIR] [PAIRS]     (default target/judge-demo, 60)
#
# Needs Postgres on 127.0.0.1:5432 (user postgres, trust) and the model in
# the cache (any `make test` run pulls it). FLYWHEEL_BIN picks the binary
# (default: a release build, made when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-target/judge-demo}")
PAIRS=${2:-60}
SCENARIO=${SCENARIO:-scenarios/support-routing-mixed.json}
mkdir -p "$OUT"
DB=flywheel_judge_demo
ADMIN=${ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/$DB
export FLYWHEEL_HOME=$OUT/home
export FLYWHEEL_MODEL_CACHE=${FLYWHEEL_MODEL_CACHE:-$HOME/.cache/flywheel/models}
export FLYWHEEL_ADDR=127.0.0.1:${PORT:-18083}
rm -rf "$FLYWHEEL_HOME"
psql -q "$ADMIN" -c "drop database if exists $DB" -c "create database $DB"
FW=${FLYWHEEL_BIN:-target/release/flywheel}
[ -x "$FW" ] || cargo build --release -q -p flywheel
TEAM=shop-support

$FW migrate
$FW models pull
$FW serve > "$OUT/serve.out" 2> "$OUT/serve.log" &
SERVE=$!
trap 'kill $SERVE 2>/dev/null || true' EXIT
until curl -sf "http://$FLYWHEEL_ADDR/readyz" > /dev/null; do sleep 1; done
START=$(date +%s)
$FW simulate "$SCENARIO" --cycles 1 --no-heldout --report "$OUT/simulate.json" \
    2>&1 | tee "$OUT/simulate.txt"
$FW datasets build --team $TEAM --inline | tee "$OUT/dataset.txt"
JUDGE=${JUDGE:-$($FW models list --json | python3 -c \
    'import json, sys; print(next(v["name"] for v in map(json.loads, sys.stdin) if v.get("is_champion")))')}
set +e
$FW judges check --judge "$JUDGE" --dataset "$TEAM@1" --limit "$PAIRS" --json \
    > "$OUT/judge.json" 2> "$OUT/judge.log"
CODE=$?
set -e
echo "judges check exited $CODE (0: trusted, 3: not to be trusted); $(( $(date +%s) - START )) s in all"
python3 - "$OUT/judge.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
a = r["report"]
print(f"judge {r['judge']} on {r['dataset']}: {a['pairs']} pairs, the simulated users' choice "
      f"{a['chosen']}, the other {a['rejected']}, tie {a['ties']}, inconsistent {a['inconsistent']}; "
      f"{a['unreadable']} of its {r['questions']} replies gave no verdict; "
      f"first answer picked in {100 * a['first_position_share']:.0f}% of its picks; "
      f"{r['questions']} questions, {r['tokens']} tokens")
print(a["reason"])
PY
