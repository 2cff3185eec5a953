#!/usr/bin/env python3
"""Tiny random-weight models of the families Flywheel serves, built with the
reference implementation, and the vectors our tests check against.

Real weights of these families cannot be downloaded where Flywheel is built,
so each family is shown on a model of its own architecture with small
dimensions: transformers builds it (the family's config class, random
weights from a fixed seed), this script writes it as a GGUF file the way
llama.cpp's converter lays that family out, and transformers computes what
a correct forward pass gives on it. The tokenizer is byte-level BPE with
merges learned on a small corpus, so that a family's word-splitting rules
change the ids. The reference ids come from the family's rules written out
here in plain Python (its regex through the `regex` module, byte-level BPE
by merge rank, as GPT-2's encoder does), and transformers' tokenizer class
for the family must give the same ids (it runs on the `tokenizers` library
that Flywheel uses too, so it is the second opinion, not the reference).

    pip install torch transformers gguf peft
    scripts/tiny-families.py [OUT_DIR]     # default tests/testdata/families

Writes, per family, `OUT_DIR/<family>/model.gguf`, `reference.json` (the
tokenizer's ids on tricky strings; for each prompt its ids, the top 5
next-token log-probabilities and the greedy continuation of 32 tokens, in
float32, never stopped at an end token; a LoRA step's loss and gradients)
and `adapter/`, the random LoRA adapter that step used, in PEFT's layout.
"""

import importlib.metadata
import json
import pathlib
import re
import sys
import unicodedata

import gguf
import numpy as np
import regex
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

ROPE_THETA = 1_000_000.0
# The weights' seed: one whose greedy continuations have no near-tie (the
# script prints the smallest gap between two best logits).
SEED = 30
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, as Qwen2's own template renders it when the first message is
# not a system message.
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# What the BPE merges are learned on: words, numbers, code, other scripts.
CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2024 and we're 12345 steps in.",
    "Route the ticket to billing, shipping or returns; answer in JSON: {\"team\": \"billing\"}.",
    "Numbers: 1234567890, 3.14159, 2718281828, 100 200 300 400 500 600 700 800 900.",
    "def add(a, b):\n    return a + b\n\nprint(add(12, 34))\n",
    "日本語のテキストと中文文本，还有한국어 텍스트.",
    "Emoji 🚀🔥 and accents: café, naïve, résumé, Ünïcödé.",
    "I'm sure you'll see they've said she'd go; DON'T SHOUT, It'S fine.",
    "   leading spaces, trailing spaces   \n\n\ttabs\tand\r\nnewlines\n",
] * 20

TRICKY = [
    "1234567",
    "It's 2024, 12345 steps!",
    "   hello   world   ",
    "日本語のテキスト",
    "🚀🔥 launch",
    "café naïve",
    "cafe\u0301",  # decomposed é: NFC makes it one character
    "I'M you'LL they'VE",
    "a\n\n\nb\r\nc\td",
    "x=1+2;y=[3,4]",
    "<|im_start|>user\nhi<|im_end|>",
    "<|not_special|> text",
    "def add(a, b):\n    return a + b",
    "Route ticket 42 to billing.",
]

PROMPTS = [
    {"messages": [{"role": "user", "content": "Route ticket 42 to billing."}]},
    {
        "messages": [
            {"role": "system", "content": "Answer in JSON."},
            {"role": "user", "content": "What is 12 + 34?"},
        ]
    },
    {"text": "The quick brown fox"},
]


def byte_level_alphabet():
    """GPT-2's printable stand-ins for the 256 bytes, in byte order."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    out, extra = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def learn_vocab(vocab_size):
    """Byte-level BPE merges learned on CORPUS: the 256 bytes first (in
    byte order), then the merged tokens, then the special tokens. The
    merges are learned with GPT-2's word splitting, not the family's, so
    the vocabulary holds tokens across the family's word boundaries
    (`Ġ2024`, `12345`, ...): a tokenizer that split the family's text
    wrongly would use them, and its ids would differ."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=byte_level_alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    tokens = byte_level_alphabet()
    for a, b in (m.split(" ") for m in merges):
        if a + b not in tokens:
            tokens.append(a + b)
    return tokens + SPECIALS, merges


def encode(text, split_regex, tokens, merges, nfc):
    """The family's tokenizer rules in plain Python: special tokens matched
    whole, NFC where the family normalizes, words by the family's regex,
    each word's bytes merged by merge rank."""
    vocab = {t: i for i, t in enumerate(tokens)}
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
    alphabet = byte_level_alphabet()
    ids = []
    for chunk in re.split("(" + "|".join(map(re.escape, SPECIALS)) + ")", text):
        if chunk in SPECIALS:
            ids.append(vocab[chunk])
            continue
        if nfc:
            chunk = unicodedata.normalize("NFC", chunk)
        for word in regex.findall(split_regex, chunk):
            symbols = [alphabet[b] for b in word.encode("utf-8")]
            while len(symbols) > 1:
                rank, at = min(
                    (ranks.get(pair, float("inf")), i)
                    for i, pair in enumerate(zip(symbols, symbols[1:]))
                )
                if rank == float("inf"):
                    break
                symbols[at : at + 2] = [symbols[at] + symbols[at + 1]]
            ids.extend(vocab[s] for s in symbols)
    return ids


def randomize(model, seed):
    """Weights large enough that the tiny model's choices are clear (the
    default init gives near-uniform logits) and its layers outweigh the
    tied embedding (else it repeats one token: a weak greedy check),
    biases and norms not zero and one, so that a forward pass that drops
    them is caught."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) * 4.0 / fan_in**0.5)


def qwen2(out):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

    tokens, merges = learn_vocab(400)
    second_opinion = Qwen2Tokenizer(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=[tuple(m.split(" ")) for m in merges],
        additional_special_tokens=SPECIALS[1:],
    )

    def tokenize(text):
        ids = encode(text, PRETOKENIZE_REGEX, tokens, merges, nfc=True)
        theirs = second_opinion.encode(text, add_special_tokens=False)
        assert ids == theirs, f"{text!r}: {ids} here, {theirs} from transformers"
        return ids, second_opinion.decode(ids, skip_special_tokens=False)

    cfg = Qwen2Config(
        vocab_size=len(tokens),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokens.index("<|im_end|>"),
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval().float()
    randomize(model, seed=SEED)

    w = gguf.GGUFWriter(str(out / "model.gguf"), "qwen2")
    w.add_name("tiny-random-qwen2")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(ROPE_THETA)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(
        [gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens]
    )
    w.add_token_merges(merges)
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_chat_template(CHATML)
    # llama.cpp's names for Qwen2's tensors; q and k are not permuted (the
    # converter permutes llama's only).
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
    }
    per_layer = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for i in range(cfg.num_hidden_layers):
        for hf, short in per_layer.items():
            for kind in ("weight", "bias"):
                names[f"model.layers.{i}.{hf}.{kind}"] = f"blk.{i}.{short}.{kind}"
    for name, p in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to the embedding
        w.add_tensor(names[name], p.detach().numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    def render(p):
        if "text" in p:
            return p["text"]
        from jinja2 import Template

        return Template(CHATML).render(messages=p["messages"], add_generation_prompt=True)

    ref = reference(model, tokenize, render)
    ref["lora_step"] = lora_step(model, tokenize, out / "adapter")
    return ref


def lora_step(model, tokenize, adapter_dir):
    """One LoRA training step's loss on one example, through PEFT: the mean
    negative log-likelihood of the answer's tokens with a random adapter on
    all seven projections (B not zero, so the adapter counts), and the sum
    of the squared gradients of its A and B matrices, a figure any row
    order of them gives alike."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
    )
    peft_model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(str(adapter_dir))
    (adapter_dir / "README.md").unlink()  # PEFT's model-card template
    # PEFT writes its target modules from a set, in any order: sorted, the
    # file is the same on every run.
    config_file = adapter_dir / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    saved["target_modules"] = sorted(saved["target_modules"])
    config_file.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    prompt, _ = tokenize("<|im_start|>user\nRoute ticket 42<|im_end|>\n<|im_start|>assistant\n")
    answer, _ = tokenize('{"team": "billing"}<|im_end|>')
    ids = torch.tensor([prompt + answer])
    logits = peft_model(ids).logits[0, len(prompt) - 1 : -1]
    logp = torch.log_softmax(logits.float(), -1)
    loss = -logp[torch.arange(len(answer)), torch.tensor(answer)].mean()
    loss.backward()
    grad_sq = sum(float((p.grad**2).sum()) for n, p in peft_model.named_parameters() if "lora_" in n)
    peft_model.unload()
    return {
        "prompt_ids": prompt,
        "answer_ids": answer,
        "loss": float(loss),
        "lora_grad_sq_sum": grad_sq,
    }


def reference(model, tokenize, render):
    tricky = []
    for text in TRICKY:
        ids, decoded = tokenize(text)
        tricky.append({"text": text, "ids": ids, "decoded": decoded})
    cases = []
    smallest_gap = float("inf")
    for p in PROMPTS:
        text = render(p)
        ids, _ = tokenize(text)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
            top = torch.topk(logp, 5)
            seq = list(ids)
            for _ in range(32):
                logits = model(torch.tensor([seq])).logits[0, -1]
                two = torch.topk(logits, 2).values
                smallest_gap = min(smallest_gap, float(two[0] - two[1]))
                seq.append(int(logits.argmax()))
        cases.append(
            {
                "prompt": text,
                "prompt_ids": ids,
                "top5_first": [[int(i), float(l)] for l, i in zip(top.values, top.indices)],
                "greedy_ids": seq[len(ids) :],
            }
        )
    return {"tokenize": tricky, "forward": cases, "smallest_greedy_gap": smallest_gap}


FAMILIES = {"qwen2": qwen2}


def main():
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "tests/testdata/families")
    import transformers

    for name, build in FAMILIES.items():
        out = root / name
        out.mkdir(parents=True, exist_ok=True)
        ref = build(out)
        ref["made_with"] = {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "gguf": importlib.metadata.version("gguf"),
        }
        (out / "reference.json").write_text(json.dumps(ref, indent=1, ensure_ascii=False) + "\n")
        print(
            f"{name}: {out / 'model.gguf'} ({(out / 'model.gguf').stat().st_size} bytes), "
            f"smallest greedy logit gap {ref['smallest_greedy_gap']:.4f}"
        )


if __name__ == "__main__":
    main()
