#!/usr/bin/env bash
# Seconds per training example on SmolLM2-135M when a step's examples share
# the demo scenario's system prompt: one example a step (nothing shared)
# against 2, 4 and 8 a step packed behind the prefix, alternating in one run.
#
#   scripts/bench-train-batch.sh [ROUNDS]      (default 3)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
MODEL=$(ls "${FLYWHEEL_MODEL_CACHE:-$HOME/.cache/flywheel/models}"/*.gguf | head -1)
cargo build --release -q -p flywheel-trainer --example bench_batch
target/release/examples/bench_batch "$MODEL" scenarios/support-routing-mixed.json "$ROUNDS"
