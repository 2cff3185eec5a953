"""PyTorch + PEFT baseline for `flywheel-trainer`'s bench_step example: one
LoRA SFT optimizer step (batch 1, 256 tokens, loss on the last 128, rank 8
on q/k/v/o, AdamW, clipping at 1.0), f32 on the CPU, on the same GGUF file
(transformers dequantizes it) and the same text.

    THREADS=2 python3 bench/torch_lora_step.py MODEL.gguf [STEPS]

Needs: torch, transformers, peft, gguf (pip). Prints one JSON line.
"""

import json
import os
import resource
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

path = sys.argv[1]
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 6
threads = int(os.environ.get("THREADS", "2"))
torch.set_num_threads(threads)
torch.manual_seed(0)

folder, name = os.path.split(os.path.abspath(path))
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
here = os.path.dirname(os.path.abspath(__file__))
text = open(os.path.join(here, "prompt.txt")).read() * 8
ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[:, :256]
labels = ids.clone()
labels[:, :128] = -100  # loss on the second half, like the Rust benchmark

config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
model = get_peft_model(model, config)
model.train()
params = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)

times, losses = [], []
for _ in range(steps):
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad()
    times.append(time.perf_counter() - start)
    losses.append(loss.item())
    print(f"step {len(times)} loss {losses[-1]:.4f} {times[-1]:.2f} s", file=sys.stderr)

steady = sorted(times[1:])
print(json.dumps({
    "engine": f"PyTorch {torch.__version__} + PEFT",
    "seq_len": int(ids.shape[1]),
    "lora_rank": 8,
    "targets": "q,k,v,o",
    "trainable_params": sum(p.numel() for p in params),
    "threads": threads,
    "seconds_per_step_median": steady[len(steady) // 2],
    "seconds_per_step": times,
    "losses": losses,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
