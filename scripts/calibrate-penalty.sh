#!/usr/bin/env bash
# After scripts/demo-loop.sh: how strong a reference penalty holds the
# general answers on the loop's own data, chosen on sets that neither the
# gate's retention rule nor the reported results read. For each weight it
# trains a candidate on a dataset version of the demo's database (the
# defaults otherwise), with the penalty on the first 32 of the 48 shipped
# replay prompts only, and evaluates it against the base on:
#   - the version's held-out corrections (the gate's task evidence), and
#   - the other 16 replay prompts, never penalised: does the candidate still
#     give the base's greedy answer word for word (suite `replay-held-back`).
# The evaluation also runs the retention suite (every evaluation does); it
# is printed but is not what the weight is chosen on, and the scenario's
# held-out messages are not read at all.
#
#   scripts/calibrate-penalty.sh OUT_DIR VERSION WEIGHT...
#       e.g. scripts/calibrate-penalty.sh target/penalty 2 30 100
#   (DATABASE_URL, FLYWHEEL_HOME as the demo had them: defaults below)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "$1"); VERSION=$2; shift 2
mkdir -p "$OUT"
DEMO=${DEMO:-target/demo-loop}
export DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/flywheel_demo_loop}
export FLYWHEEL_HOME=${FLYWHEEL_HOME:-$(realpath -m "$DEMO/home")}
export FLYWHEEL_MODEL_CACHE=${FLYWHEEL_MODEL_CACHE:-$HOME/.cache/flywheel/models}
export FLYWHEEL_ADDR=127.0.0.1:${PORT:-18082}
export FLYWHEEL_CURATION_SCHEDULE=off
cargo build --release -q -p flywheel
FW=target/release/flywheel
TEAM=shop-support

# The base: the version pulled for everyone (no team's), not whatever the
# team's champion is after the demo.
BASE=${BASE:-$($FW models list --json | python3 -c '
import json, sys
rows = [json.loads(l) for l in sys.stdin if l.strip()]
print(min((r for r in rows if r["team_id"] is None), key=lambda r: r["created_at"])["name"])')}
echo "base: $BASE"

# The base's greedy answers to the 16 held-back replay prompts, as served
# (once: the suite is kept in the database).
if ! $FW suites list --team $TEAM | grep -q replay-held-back; then
    $FW serve > "$OUT/serve.log" 2>&1 &
    SERVE=$!
    trap 'kill $SERVE 2>/dev/null || true' EXIT
    until curl -sf "http://$FLYWHEEL_ADDR/readyz" > /dev/null; do sleep 1; done
    KEY=$($FW keys create --team $TEAM | tail -1)
    python3 - "$OUT/replay-held-back.json" "http://$FLYWHEEL_ADDR" "$KEY" "$BASE" <<'PY'
import json, sys, urllib.request
out, base, key, model = sys.argv[1:]
prompts = json.load(open("services/trainer/replay/general-prompts.json"))["prompts"][32:48]
items = []
for i, p in enumerate(prompts):
    body = json.dumps({"model": model, "temperature": 0, "max_tokens": 48,
                       "messages": [{"role": "user", "content": p}]}).encode()
    req = urllib.request.Request(f"{base}/v1/chat/completions", body,
        {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    answer = json.load(urllib.request.urlopen(req))["choices"][0]["message"]["content"]
    items.append({"id": f"held-back-{i}", "messages": [{"role": "user", "content": p}],
                  "max_tokens": 48, "checks": [{"type": "exact", "value": answer.strip()}]})
json.dump({"name": "replay-held-back", "description": "The 16 shipped replay prompts a "
           "calibration run does not penalise: the base's own greedy answers, word for word.",
           "source": "scripts/calibrate-penalty.sh", "license": "Apache-2.0",
           "defaults": {"max_tokens": 48, "temperature": 0}, "items": items},
          open(out, "w"), indent=1)
PY
    kill $SERVE; wait $SERVE 2>/dev/null || true
    $FW suites add "$OUT/replay-held-back.json" --team $TEAM
fi

for W in "$@"; do
    NAME=penalty-$W-v$VERSION-$(date +%s)
    start=$(date +%s)
    $FW train --dataset $TEAM@$VERSION --model "$BASE" --reference-kl "$W" --replay-prompts 32 \
        --register "$NAME" --out "$OUT/$NAME" > "$OUT/$NAME.train" 2>&1
    trained=$(( $(date +%s) - start ))
    $FW eval "$NAME" --team $TEAM --against "$BASE" --dataset $TEAM@$VERSION > "$OUT/$NAME.eval" 2>&1 || true
    python3 - "$OUT/$NAME.eval" "$W" "$VERSION" "$trained" <<'PY' | tee -a "$OUT/results.tsv"
import re, sys
text, w, v, trained = open(sys.argv[1]).read(), *sys.argv[2:]
def row(suite, metric):
    m = re.search(rf"^{re.escape(suite)}\s+{metric}\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\[.*?\])", text, re.M)
    return f"{m.group(2)} vs {m.group(3)} over {m.group(1)}, {m.group(4)} {m.group(5)}" if m else "-"
print("\t".join([f"weight {w}", f"v{v}", f"{trained} s",
    "held-out corrections " + row("heldout-corrections", "contains_match"),
    "held-back replay " + row("replay-held-back", "pass_rate"),
    "(retention, not chosen on) " + row("general-retention", "pass_rate")]))
PY
done
