#!/usr/bin/env bash
# The reference TRL + PEFT trainer (deploy/trainer/train_trl.py) as a
# worker's external trainer, end to end on the real SmolLM2: a team's
# simulated chats and votes (`datasets synth`), `datasets build`, a run
# queued with `train --queue --external` and the run's settings (rank 4 on
# q/v, 3 steps), a `flywheel worker` whose FLYWHEEL_EXTERNAL_TRAINER runs
# the script with `{spec}`; Flywheel checks the adapter it leaves against
# the base, measures held-out loss before and after, merges and registers
# the candidate. Prints the run and the candidate.
#
#   scripts/demo-trl-trainer.sh [PYTHON]   (a Python with torch, trl, peft,
#                                           transformers, datasets, gguf)
# Needs Postgres as for `make test` and the model in the cache.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
"$PY" -c 'import torch, trl, peft, transformers, datasets, gguf' || {
  echo "$PY lacks torch/trl/peft/transformers/datasets/gguf" >&2; exit 1; }
DB=flywheel_demo_trl
ADMIN=${ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
OUT=$(realpath -m target/demo-trl)
rm -rf "$OUT"; mkdir -p "$OUT"
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/$DB
export FLYWHEEL_HOME=$OUT/home
export FLYWHEEL_MODEL_CACHE=${FLYWHEEL_MODEL_CACHE:-$HOME/.cache/flywheel/models}
psql -q "$ADMIN" -c "drop database if exists $DB with (force)" -c "create database $DB"
cargo build -q -p flywheel
FW=target/debug/flywheel
$FW migrate
$FW models pull >/dev/null
$FW datasets synth --team acme --completions 60 --ratings 40
$FW datasets build --team acme --inline
worker_env=(
  FLYWHEEL_CURATION_SCHEDULE=off
  FLYWHEEL_WORKER_ADDR=
  "FLYWHEEL_EXTERNAL_TRAINER=$PY $PWD/deploy/trainer/train_trl.py --train {train} --eval {eval} --spec {spec} --base {base} --out {out}"
)
env "${worker_env[@]}" $FW worker 2> "$OUT/worker.log" & W=$!
trap 'kill $W 2>/dev/null || true' EXIT
run=$($FW train --dataset acme@1 --queue --external --steps 3 --epochs 0 --rank 4 \
  --targets q_proj,v_proj --learning-rate 5e-4 --warmup-steps 1 --max-len 128 | awk '{print $4}')
echo "queued run $run"
for _ in $(seq 900); do
  status=$($FW runs show "$run" | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])')
  case $status in succeeded|failed|cancelled) break;; esac
  sleep 2
done
$FW runs show "$run" | python3 -c '
import json, sys
r = json.load(sys.stdin)
print({k: r.get(k) for k in ("status", "step", "eval_loss_before", "eval_loss_after", "candidate_version_id", "error")})'
echo "== the external trainer's log (kept with the run)"
find "$FLYWHEEL_HOME" -name external.log -path "*$run*" -exec grep -E 'steps of|eval loss|adapter written|not applied' {} \;
