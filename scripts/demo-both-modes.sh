#!/usr/bin/env bash
# After scripts/demo-loop.sh: is the lift the loop's training, or only the
# grammar? Scores the team's champion and the base model on the scenario's
# held-out messages twice, with the schema (as served) and without it (free
# text: nothing but the weights keeps the answer in shape), and on the
# general retention suite, in one evaluation on the database the demo left.
#
#   scripts/demo-free-text.sh [OUT_DIR]   (the demo's folder, default target/demo-loop)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-target/demo-loop}")
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/flywheel_demo_loop
export FLYWHEEL_HOME=$OUT/home
export FLYWHEEL_MODEL_CACHE=${FLYWHEEL_MODEL_CACHE:-$HOME/.cache/flywheel/models}
FW=target/release/flywheel
TEAM=shop-support

scripts/scenario-task-suite.py scenarios/support-routing.json "$OUT/free-text-suite.json"
python3 - "$OUT/free-text-suite.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
s["name"] = "support-routing-heldout-free-text"
s["description"] += " Without response_format: free text."
json.dump(s, open(sys.argv[1], "w"), indent=1)
EOF
$FW suites add "$OUT/free-text-suite.json" --team $TEAM
CHAMPION=$(psql -Atq "$DATABASE_URL" -c "select m.name from teams t
    join model_versions m on m.id = t.champion_version_id where t.name = '$TEAM'")
BASE=$(psql -Atq "$DATABASE_URL" -c "select name from model_versions where is_champion")
[ -n "$CHAMPION" ] || { echo "the team has no champion of its own: nothing was promoted"; exit 1; }
echo "champion $CHAMPION against the base $BASE"
$FW eval "$CHAMPION" --against "$BASE" --team $TEAM 2>&1 | grep -v ' INFO ' | tee "$OUT/free-text-eval.txt"
