#!/usr/bin/env python3
"""A reference external trainer for Flywheel, on Hugging Face TRL + PEFT.

Flywheel hands an external trainer a run's data as TRL JSONL (SFT
conversations, DPO pairs or KTO labels), the whole run spec as JSON
(`{"lora": {...}, "train": {...}}`) and the base model, and takes back a
PEFT adapter (adapter_config.json + adapter_model.safetensors), which it
checks against the base, measures on held-out data, merges and registers.
This script is one such trainer, for GPU nodes:

    python3 train_trl.py --train train.jsonl --eval eval.jsonl \
        --spec spec.json --base base.gguf --out adapter/

`--base` is Flywheel's GGUF of the base model (transformers dequantizes
it); `--base-hf` names the same model's Hugging Face weights instead (a
folder or a hub id), the better choice for big models. As the command
backend: FLYWHEEL_EXTERNAL_TRAINER='python3 deploy/trainer/train_trl.py
--train {train} --eval {eval} --spec {spec} --base {base} --out {out}'; as
a Kubernetes Job, see deploy/trainer/Dockerfile.

What the spec asks and TRL does not have: Flywheel's replay of the base
model's own answers and its reference (KL) penalty on them
(`replay_prompts`, `replay_weight`, `reference_kl`). They are reported and
not applied; DPO's and KTO's own reference model still holds the adapter
near the base.
"""

import argparse
import json
import math
import os
import sys


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", required=True, help="training examples, TRL JSONL")
    p.add_argument("--eval", help="held-out examples, TRL JSONL")
    p.add_argument("--spec", required=True, help="the run spec, JSON")
    base = p.add_mutually_exclusive_group(required=True)
    base.add_argument("--base", help="the base model's GGUF file")
    base.add_argument("--base-hf", help="the base model's Hugging Face weights")
    p.add_argument("--out", required=True, help="where the PEFT adapter goes")
    return p.parse_args()


def read_jsonl(path):
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def as_prompt_completion(row):
    """An SFT example as TRL's prompt and completion (Flywheel exports
    them so); a whole conversation (`messages`) is split before its last
    answer."""
    if "messages" not in row:
        return row
    messages = row["messages"]
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def steps_for(train, n_examples):
    """The optimizer steps Flywheel's trainer would make: `steps`, or with
    `epochs` above 0, enough passes over the data at `grad_accum` examples
    a step, between `min_steps` and `steps`."""
    steps, per = train["steps"], max(1, train["grad_accum"])
    if train.get("epochs", 0) > 0 and n_examples > 0:
        wanted = math.ceil(train["epochs"] * n_examples / per)
        steps = max(train.get("min_steps", 1), min(steps, wanted))
    return max(1, steps), per


def load(args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.base_hf:
        where, extra = args.base_hf, {}
    else:
        where = os.path.dirname(os.path.abspath(args.base))
        extra = {"gguf_file": os.path.basename(args.base)}
    tokenizer = AutoTokenizer.from_pretrained(where, **extra)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **extra)
    if not args.base_hf:
        # The GGUF's tensors are dequantized to float32 on load; transformers
        # still marks the model quantized, and refuses to train it.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def main():
    args = parse_args()
    with open(args.spec) as f:
        spec = json.load(f)
    lora, train = spec["lora"], spec["train"]
    objective = train["objective"]
    train_rows, eval_rows = read_jsonl(args.train), read_jsonl(args.eval)
    if not train_rows:
        sys.exit(f"{args.train} holds no examples")
    steps, per = steps_for(train, len(train_rows))
    ignored = {k: train[k] for k in ("replay_prompts", "replay_weight", "reference_kl") if train.get(k)}
    if ignored:
        print(f"not applied (Flywheel's own trainer only): {ignored}", file=sys.stderr)
    print(
        f"{objective}: {len(train_rows)} train / {len(eval_rows)} eval examples; "
        f"{steps} steps of {per}; rank {lora['rank']} on {', '.join(lora['targets'])}",
        file=sys.stderr,
    )

    from datasets import Dataset
    from peft import LoraConfig

    model, tokenizer = load(args)
    peft_config = LoraConfig(
        r=lora["rank"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora.get("dropout", 0.0),
        target_modules=lora["targets"],
        bias="none",
        task_type="CAUSAL_LM",
    )
    import torch

    gpu = torch.cuda.is_available()
    common = dict(
        use_cpu=not gpu,
        bf16=gpu and torch.cuda.is_bf16_supported(),
        output_dir=os.path.join(args.out, "trl"),
        max_steps=steps,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=per,
        learning_rate=train["learning_rate"],
        weight_decay=train.get("weight_decay", 0.0),
        warmup_steps=train.get("warmup_steps", 0),
        max_grad_norm=train.get("max_grad_norm") or 1e9,
        lr_scheduler_type="linear",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=lora.get("seed", 0),
    )
    if objective == "sft":
        # As Flywheel's trainer does: the loss on the answer alone, which
        # TRL applies to prompt-completion rows.
        train_rows, eval_rows = [as_prompt_completion(r) for r in train_rows], [
            as_prompt_completion(r) for r in eval_rows
        ]
    data = Dataset.from_list(train_rows)
    held_out = Dataset.from_list(eval_rows) if eval_rows else None
    if objective == "sft":
        from trl import SFTConfig, SFTTrainer

        config = SFTConfig(max_length=train["max_len"], completion_only_loss=True, **common)
        trainer = SFTTrainer(
            model=model, args=config, train_dataset=data, eval_dataset=held_out,
            processing_class=tokenizer, peft_config=peft_config,
        )
    elif objective == "dpo":
        from trl import DPOConfig, DPOTrainer

        config = DPOConfig(max_length=train["max_len"], beta=train["beta"], **common)
        trainer = DPOTrainer(
            model=model, args=config, train_dataset=data, eval_dataset=held_out,
            processing_class=tokenizer, peft_config=peft_config,
        )
    elif objective == "kto":
        from trl import KTOConfig, KTOTrainer

        config = KTOConfig(max_length=train["max_len"], beta=train["beta"], **common)
        trainer = KTOTrainer(
            model=model, args=config, train_dataset=data, eval_dataset=held_out,
            processing_class=tokenizer, peft_config=peft_config,
        )
    else:
        sys.exit(f"unknown objective {objective!r}")
    if held_out is not None:
        print(f"eval loss before: {trainer.evaluate()['eval_loss']:.4f}", file=sys.stderr)
    trainer.train()
    if held_out is not None:
        print(f"eval loss after: {trainer.evaluate()['eval_loss']:.4f}", file=sys.stderr)
    trainer.model.save_pretrained(args.out)
    print(f"adapter written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
