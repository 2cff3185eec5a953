#!/usr/bin/env bash
# Seconds per LoRA SFT optimizer step on SmolLM2-135M (batch 1, 256 tokens,
# rank 8 on q/k/v/o, f32, CPU): flywheel-trainer, then PyTorch + PEFT on the
# same GGUF file and text, in the same run. Prints both JSON lines and the ratio.
#
#   scripts/bench-train.sh [STEPS] [THREADS]      (default 6 2)
#
# Needs: the model in the cache (any `make test` run pulls it), and for the
# baseline: pip install torch transformers peft gguf (torch pulls ~3 GB).
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-6}
THREADS=${2:-2}
MODEL=$(ls "${FLYWHEEL_MODEL_CACHE:-$HOME/.cache/flywheel/models}"/*.gguf | head -1)
cargo build --release -q -p flywheel-trainer --example bench_step
ours=$(RAYON_NUM_THREADS=$THREADS target/release/examples/bench_step "$MODEL" "$STEPS" 2>/dev/null)
torch=$(THREADS=$THREADS python3 bench/torch_lora_step.py "$MODEL" "$STEPS" 2>/dev/null)
echo "$ours"
echo "$torch"
python3 - "$ours" "$torch" <<'PY'
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"flywheel {a['seconds_per_step_median']:.3f} s/step, peak {a['peak_rss_mb']:.0f} MB; "
      f"PyTorch {b['seconds_per_step_median']:.3f} s/step, peak {b['peak_rss_mb']:.0f} MB; "
      f"time ratio {a['seconds_per_step_median'] / b['seconds_per_step_median']:.2f}x; "
      f"first-step loss {a['losses'][0]:.5f} vs {b['losses'][0]:.5f}")
PY
