"""Loads a Flywheel-trained adapter with PEFT on the same GGUF base (through
transformers) and reports the mean answer-token loss on an exported eval
split, without and with the adapter: the numbers `flywheel train` printed
should come out again if the adapter's layout is right.

    python3 bench/peft_check.py MODEL.gguf ADAPTER_DIR EVAL.jsonl
"""

import json
import os
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

model_path, adapter, data = sys.argv[1:4]
torch.set_num_threads(2)
folder, name = os.path.split(os.path.abspath(model_path))
tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
base = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32)
eos = tok.convert_tokens_to_ids("<|im_end|>")
rows = [json.loads(line) for line in open(data)]


def mean_loss(model):
    total = 0.0
    for r in rows:
        prompt = tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
        p = tok(prompt, add_special_tokens=False).input_ids
        a = tok(r["completion"][0]["content"], add_special_tokens=False).input_ids + [eos]
        ids = torch.tensor([p + a])
        labels = ids.clone()
        labels[0, : len(p)] = -100
        with torch.no_grad():
            total += model(input_ids=ids, labels=labels).loss.item()
    return total / len(rows)


before = mean_loss(base)
tuned = PeftModel.from_pretrained(base, adapter)
print(json.dumps({"examples": len(rows), "loss_base": before, "loss_with_adapter": mean_loss(tuned)}))
