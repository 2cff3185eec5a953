#!/usr/bin/env bash
# One cycle of the demo scenario done by hand on the real SmolLM2, as a new
# user would (and as the evaluation issue describes it): 120 chats through
# the API with simulated users' votes and corrections, `datasets build`,
# `train --register` with the defaults, then `flywheel eval` of the
# candidate against the base on the team's task suite (the scenario's
# held-out messages) and the shipped general retention suite. A second
# candidate is trained on the same dataset with replay on
# (`--replay-prompts 32`) and evaluated the same way, so the counter-measure's
# effect is measured on the same traffic in the same run.
#
#   scripts/demo-eval.sh [OUT_DIR]        (default target/demo-eval)
#
# Needs: Postgres on 127.0.0.1:5432 (user postgres, trust), the model in the
# cache (any `make test` run pulls it). Writes the simulation report, the
# dataset manifest, the evaluation report and its per-item outputs to OUT_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-target/demo-eval}")
mkdir -p "$OUT"
DB=flywheel_demo_eval
ADMIN=${ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/$DB
export FLYWHEEL_HOME=$OUT/home
export FLYWHEEL_MODEL_CACHE=${FLYWHEEL_MODEL_CACHE:-$HOME/.cache/flywheel/models}
export FLYWHEEL_ADDR=127.0.0.1:${PORT:-18080}
rm -rf "$FLYWHEEL_HOME"
psql -q "$ADMIN" -c "drop database if exists $DB" -c "create database $DB"
cargo build --release -q -p flywheel
FW=target/release/flywheel
TEAM=shop-support
stamp() { date +%s.%N; }

$FW migrate
$FW models pull
$FW serve 2> "$OUT/serve.log" &
SERVE=$!
trap 'kill $SERVE 2>/dev/null || true' EXIT
until curl -sf "http://$FLYWHEEL_ADDR/readyz" > /dev/null; do sleep 1; done

echo "== traffic: cycle 1 of the scenario, response_format not sent"
$FW simulate scenarios/support-routing.json --cycles 1 --unstructured \
    --report "$OUT/simulate.json"

echo "== datasets build"
t0=$(stamp)
$FW datasets build --team $TEAM --inline
t1=$(stamp)
$FW datasets show $TEAM@1 | tee "$OUT/manifest.txt"

echo "== train --register (defaults)"
$FW train --dataset $TEAM@1 --out "$OUT/adapter" --register smollm2-support-1 \
    2>&1 | tee "$OUT/train.log" | grep -E "replay:|step +(1|25|50|75|100)/|held-out|registered"
t2=$(stamp)
echo "== the same with replay on"
$FW train --dataset $TEAM@1 --out "$OUT/adapter-replay" --register smollm2-support-1-replay \
    --replay-prompts 32 2>&1 | tee "$OUT/train-replay.log" | grep -E "replay:|step +(1|25|50|75|100)/|held-out|registered"

echo "== the team's task suite: the scenario's held-out messages"
scripts/scenario-task-suite.py scenarios/support-routing.json "$OUT/task-suite.json"
$FW suites add "$OUT/task-suite.json" --team $TEAM

echo "== eval"
t3=$(stamp)
$FW eval smollm2-support-1 --team $TEAM 2>&1 | tee "$OUT/eval.txt"
t4=$(stamp)
ID=$(grep -oE "^evaluation [0-9a-f-]{36}" "$OUT/eval.txt" | head -1 | cut -d' ' -f2)
$FW eval show "$ID" --items > "$OUT/eval-items.txt"
$FW eval smollm2-support-1-replay --team $TEAM 2>&1 | tee "$OUT/eval-replay.txt"
ID2=$(grep -oE "^evaluation [0-9a-f-]{36}" "$OUT/eval-replay.txt" | head -1 | cut -d' ' -f2)
$FW eval show "$ID2" --items > "$OUT/eval-items-replay.txt"
$FW decisions --team $TEAM > "$OUT/decisions.txt"
python3 - "$t0" "$t1" "$t2" "$t3" "$t4" <<'PY'
import sys
t = [float(x) for x in sys.argv[1:]]
print(f"wall time: datasets build {t[1]-t[0]:.0f} s, train {t[2]-t[1]:.0f} s, eval {t[4]-t[3]:.0f} s")
PY
for items in "$OUT/eval-items.txt" "$OUT/eval-items-replay.txt"; do
echo "== $(basename "$items"): retention items the base passes and the candidate fails (first 12)"
python3 - "$items" <<'PY'
import sys, collections
rows = collections.defaultdict(dict)
for line in open(sys.argv[1]):
    if not line.startswith("general-retention"):
        continue
    suite, item, who, mark, *text = line.rstrip("\n").split(None, 4)
    rows[item][who] = (mark, text[0] if text else "")
mark = lambda r, who: r.get(who, ("",))[0]
lost = [(i, r) for i, r in rows.items() if mark(r, "champion") == "pass" and mark(r, "candidate") == "FAIL"]
gained = [i for i, r in rows.items() if mark(r, "champion") == "FAIL" and mark(r, "candidate") == "pass"]
print(f"{len(lost)} lost, {len(gained)} gained")
for i, r in lost[:12]:
    print(f"  {i}: base {r['champion'][1][:70]!r} -> candidate {r['candidate'][1][:70]!r}")
PY
done
