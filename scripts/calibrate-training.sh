#!/usr/bin/env bash
# Training settings measured on a scenario without the loop around them:
# trains an adapter with `flywheel train --jsonl` on N traffic messages of a
# scenario with their right answers (a seeded random sample, from the first
# cycle's traffic when N fits in it: what a cycle's corrections and liked
# answers give the trainer), then scores it on the
# scenario's held-out messages as served (jobs example score_adapters, the
# adapter on the base's engine, greedy, with the scenario's response_format
# unless --free). One line per run, appended to OUT_DIR/results.tsv.
#
#   scripts/calibrate-training.sh OUT_DIR NAME SCENARIO N [--free] -- [flywheel train flags...]
#   e.g. scripts/calibrate-training.sh target/calibrate ga1 scenarios/support-routing-mixed.json 50 -- --grad-accum 1
#
# Needs the model in the cache (any `make test` run pulls it).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "$1"); NAME=$2; SCENARIO=$3; N=$4; shift 4
MODE=--structured
if [ "${1:-}" = "--free" ]; then MODE=; shift; fi
[ "${1:-}" = "--" ] && shift
mkdir -p "$OUT/adapters" "$OUT/logs"
MODEL=$(ls "${FLYWHEEL_MODEL_CACHE:-$HOME/.cache/flywheel/models}"/*.gguf | head -1)
cargo build --release -q -p flywheel
cargo build --release -q -p flywheel-jobs --example score_adapters
python3 - "$SCENARIO" "$N" "$OUT/train-$N.jsonl" <<'PY'
import json, random, sys
s = json.load(open(sys.argv[1]))
n = int(sys.argv[2])
# Up to a cycle's worth from the first cycle's traffic, more from all of it.
pool = s["traffic"][:s["chats_per_cycle"]] if n <= s["chats_per_cycle"] else s["traffic"]
items = random.Random(1).sample(pool, n)
with open(sys.argv[3], "w") as f:
    for it in items:
        f.write(json.dumps({
            "prompt": [{"role": "system", "content": s["system"]},
                       {"role": "user", "content": it["user"]}],
            "completion": [{"role": "assistant", "content": it["answer"]}]}) + "\n")
PY
scripts/scenario-task-suite.py "$SCENARIO" "$OUT/suite.json" $MODE
start=$(date +%s)
CANDLE_NUM_THREADS=1 target/release/flywheel train --jsonl "$OUT/train-$N.jsonl" \
    --base-gguf "$MODEL" --out "$OUT/adapters/$NAME" --warmup-steps 0 "$@" > "$OUT/logs/$NAME.train" 2>&1
trained=$(( $(date +%s) - start ))
target/release/examples/score_adapters "$MODEL" "$OUT/suite.json" "$OUT/adapters/$NAME" \
    2>/dev/null | tail -1 > "$OUT/logs/$NAME.score"
python3 - "$OUT" "$NAME" "$SCENARIO" "$N" "$*" "$trained" "${MODE:---free}" <<'PY'
import json, sys
out, name, scenario, n, flags, trained, mode = sys.argv[1:]
s = json.load(open(f"{out}/logs/{name}.score"))
steps = [l for l in open(f"{out}/logs/{name}.train") if l.startswith("step")]
line = (f"{name}\t{scenario}\t{n}\t{flags}\t{mode}\t{s['passed']}/{s['items']}"
        f"\t{100 * s['passed'] / s['items']:.1f}%\t{len(steps)} steps\t{trained} s")
print(line)
open(f"{out}/results.tsv", "a").write(line + "\n")
PY
