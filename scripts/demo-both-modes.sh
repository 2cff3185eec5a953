#!/usr/bin/env bash
# After scripts/demo-loop.sh: is the lift the loop's training, or only the
# grammar? Scores the team's champion and the base model on the scenario's
# held-out messages both ways, with the schema (constrained decoding) and
# without it (free text: nothing but the weights keeps the answer in shape),
# and on the general retention suite, in one evaluation on the database the
# demo left. The loop never saw these suites (its gate read the team's own
# held-out votes); they are given to the team here, after the loop, to
# measure.
#
#   scripts/demo-both-modes.sh [OUT_DIR]   (the demo's folder, default target/demo-loop;
#                                           SCENARIO as the demo had it)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-target/demo-loop}")
SCENARIO=${SCENARIO:-scenarios/support-routing-mixed.json}
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/flywheel_demo_loop
export FLYWHEEL_HOME=$OUT/home
export FLYWHEEL_MODEL_CACHE=${FLYWHEEL_MODEL_CACHE:-$HOME/.cache/flywheel/models}
FW=target/release/flywheel
TEAM=shop-support

# The mode the demo's suite was not scored in.
if grep -q '"response_format"' "$OUT/task-suite.json"; then
    OTHER= ; SUFFIX=free-text; WHAT="Without response_format: free text."
else
    OTHER=--structured; SUFFIX=with-schema; WHAT="With the scenario's response_format."
fi
scripts/scenario-task-suite.py "$SCENARIO" "$OUT/other-suite.json" $OTHER
python3 - "$OUT/other-suite.json" "$SUFFIX" "$WHAT" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
s["name"] += "-" + sys.argv[2]
s["description"] += " " + sys.argv[3]
json.dump(s, open(sys.argv[1], "w"), indent=1)
PY
$FW suites add "$OUT/task-suite.json" --team $TEAM
$FW suites add "$OUT/other-suite.json" --team $TEAM
CHAMPION=$(psql -Atq "$DATABASE_URL" -c "select m.name from teams t
    join model_versions m on m.id = t.champion_version_id where t.name = '$TEAM'")
BASE=$(psql -Atq "$DATABASE_URL" -c "select name from model_versions where is_champion")
[ -n "$CHAMPION" ] || { echo "the team has no champion of its own: nothing was promoted"; exit 1; }
echo "champion $CHAMPION against the base $BASE"
# Exit 3 is the gate's "no" (a champion better on the task may still lose
# on a rule); the report is what this script is for.
$FW eval "$CHAMPION" --against "$BASE" --team $TEAM 2>&1 | grep -v ' INFO ' | tee "$OUT/both-modes-eval.txt" || true
