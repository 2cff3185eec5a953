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
Mistral's tokenizer is SentencePiece's BPE, learned on the same corpus by
the `sentencepiece` library, which gives the reference ids (on each text
between special tokens, as llama.cpp tokenizes); transformers' Llama
tokenizer, converted from that SentencePiece model, must agree.

    pip install torch transformers gguf peft sentencepiece
    scripts/tiny-families.py [OUT_DIR [FAMILY...]]   # default tests/testdata/families, every family

Writes, per family, `OUT_DIR/<family>/model.gguf`, `reference.json` (the
tokenizer's ids on tricky strings; for each prompt its ids, the top 5
next-token log-probabilities and the greedy continuation of 32 tokens, in
float32, never stopped at an end token; a LoRA step's loss and gradients)
`adapter/`, the random LoRA adapter that step used, in PEFT's layout, and
`hf/`, the same model as a Hugging Face folder (what `flywheel models
import` converts).
"""

import copy
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

# Llama 3's chat layout (its headers, the begin-of-text token first),
# without the tool-calling parts of the shipped template.
LLAMA3_CHAT = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{%- endif %}"
)

# The templates that put a system message into a turn of their own
# choosing: it taken apart from the rest (`system`, with a blank line after
# it), `messages` the turns after it.
SYSTEM_APART = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] + '\n\n' %}"
    "{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- endif %}"
)

# Mistral's instruction layout ([INST] ... [/INST], the begin-of-sequence
# token first, each answer closed by the end token), a system message put in
# front of the first instruction as Mistral's later templates do.
MISTRAL_CHAT = (
    SYSTEM_APART
    + "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{{- '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- message['content'] + eos_token }}{%- endif %}"
    "{%- endfor %}"
)

# Mistral's later instruction layout (Ministral, Mistral NeMo): `[INST]`
# and `[/INST]` as tokens of their own, no spaces around them, a system
# message in front of the last instruction.
MISTRAL_TEKKEN_CHAT = (
    SYSTEM_APART
    + "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}"
    "{{- '[INST]' + (system if loop.last else '') + message['content'] + '[/INST]' }}"
    "{%- else %}{{- message['content'] + eos_token }}{%- endif %}"
    "{%- endfor %}"
)

# Phi-3's chat layout: each message under its role's token and closed by
# the end token, the assistant's role token last.
PHI3_CHAT = (
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}"
    "{%- else %}{{- eos_token }}{%- endif %}"
)

# Gemma's chat layout: turns between `<start_of_turn>` and `<end_of_turn>`,
# the assistant's role named `model`, a system message put at the start of
# the first user turn (Gemma has no system role), the begin token first.
GEMMA_CHAT = (
    "{{- bos_token }}"
    + SYSTEM_APART
    + "{%- for message in messages %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{- '<start_of_turn>' + role + '\n' + (system if loop.first else '')"
    " + message['content'] | trim + '<end_of_turn>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\n' }}{%- endif %}"
)

# SmolLM3's chat layout: ChatML turns, a system turn that always opens the
# chat with its metadata block (reasoning off: `/no_think`) and the
# caller's system message as custom instructions, and the assistant's turn
# opened with an empty thinking block, as SmolLM3's template does when
# reasoning is off (without its tool-calling and date parts).
SMOLLM3_CHAT = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] %}"
    "{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- endif %}"
    "{{- '<|im_start|>system\n## Metadata\n\nReasoning Mode: /no_think\n\n'"
    " + '## Custom Instructions\n\n' + system + '\n\n<|im_end|>\n' }}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\n<think>\n\n</think>\n' }}"
    "{%- endif %}"
)

# Qwen2's and Qwen3's text side: their pre-tokenizer (its regex from their
# tokenizer.json; NFC first), special tokens, template and end token.
QWEN_TEXT = {
    "pre": "qwen2",
    "split": (
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
        r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
    ),
    "nfc": True,
    "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "bos": None,
    "eos": "<|im_end|>",
    "template": CHATML,
}

# Llama 3's word-split regex (its tokenizer.json's), which SmolLM3 shares.
LLAMA3_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2's transformers classes and settings, for its three tiny models.
QWEN2_MODEL = {
    "config": "Qwen2Config",
    "model": "Qwen2ForCausalLM",
    "extra": {
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
}

# Mistral's transformers classes and settings (no sliding window), for its
# two tiny models.
MISTRAL_MODEL = {
    "config": "MistralConfig",
    "model": "MistralForCausalLM",
    "extra": {
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "sliding_window": None,
    },
}

# Gemma's text side (Gemma 2 and 3): a SentencePiece vocabulary that puts no
# space in front of a text, its turn tokens, template and end tokens.
GEMMA_TEXT = {
    "spm": True,
    "space_prefix": False,
    "specials": ["<unk>", "<s>", "</s>"],
    "added": ["<start_of_turn>", "<end_of_turn>"],
    "bos": "<s>",
    "eos": "</s>",
    "stop": ["</s>", "<end_of_turn>"],
    "template": GEMMA_CHAT,
}

# Each family: its GGUF architecture and pre-tokenizer name, its word-split
# regex (from its tokenizer.json) and normalization, special tokens, chat
# template, end token, and the transformers config of the tiny model.
FAMILIES = {
    "qwen2": {
        "arch": "qwen2",
        **QWEN_TEXT,
        # The weights' seed: one whose greedy continuations hold no near-tie
        # (the script prints the smallest gap between two best logits).
        "seed": 30,
        # Each also written with its matrices in these GGUF types (gguf's
        # own quantizers), its reference computed on what they hold.
        "formats": ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1"],
        # Its Hugging Face folder holds the chat template in
        # tokenizer_config.json.
        "template_in_config": True,
        **QWEN2_MODEL,
    },
    # Qwen2 again, wide enough for the K-quants (their blocks are 256 of a
    # row's values): one layer, no folder (the family's own are above).
    "qwen2-k": {
        "arch": "qwen2",
        **QWEN_TEXT,
        "hidden": 256,
        "intermediate": 256,
        "layers": 1,
        "folder": False,
        "seed": 30,
        "formats": ["Q4_K", "Q5_K", "Q6_K"],
        **QWEN2_MODEL,
    },
    # Qwen2 again, its weights drawn as gently as Flywheel's own tiny
    # llama's, for the loop's end-to-end test (the reference weights above
    # are drawn sharp so that a forward pass that drops anything is caught;
    # a few LoRA steps barely move them).
    "qwen2-loop": {
        "arch": "qwen2",
        **QWEN_TEXT,
        "gentle": True,
        "folder": False,
        "seed": 30,
        "formats": [],
        **QWEN2_MODEL,
    },
    # Qwen3: Qwen2's tokenizer and layout without the biases, with an RMS
    # norm on each head of q and k, and a head size of its own (twice what
    # hidden / heads would give here, as in the real 0.6B).
    "qwen3": {
        "arch": "qwen3",
        **QWEN_TEXT,
        "seed": 30,
        # The two types the serving kernels compute on as stored.
        "formats": ["Q8_0", "Q4_1"],
        "config": "Qwen3Config",
        "model": "Qwen3ForCausalLM",
        "extra": {
            "head_dim": 32,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": True,
        },
    },
    # Llama 3.1 / 3.2: llama's layout, Llama 3's tokenizer, and its rope
    # scaling, with the scaling's original context far shorter than the
    # tiny model's so that it changes most of its frequencies.
    "llama3": {
        "arch": "llama",
        "pre": "llama-bpe",
        "split": LLAMA3_SPLIT,
        "ignore_merges": True,
        "nfc": False,
        "specials": [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ],
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
        "template": LLAMA3_CHAT,
        # Its Hugging Face folder: sharded, and ending answers at either
        # end token (generation_config.json's list, as Llama 3.1's).
        "shard": "200KB",
        "stop": ["<|end_of_text|>", "<|eot_id|>"],
        "seed": 33,
        "formats": ["Q8_0", "Q4_1"],
        "config": "LlamaConfig",
        "model": "LlamaForCausalLM",
        "extra": {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 10_000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
        },
    },
    # Mistral (v0.2, v0.3; Llama 2 is the same to Flywheel): llama's layout
    # and a SentencePiece tokenizer (GGUF tokenizer model `llama`), no
    # sliding window.
    "mistral": {
        "arch": "llama",
        "spm": True,
        "specials": ["<unk>", "<s>", "</s>"],
        "bos": "<s>",
        "eos": "</s>",
        "template": MISTRAL_CHAT,
        "seed": 34,
        "formats": ["Q8_0", "Q4_1"],
        **MISTRAL_MODEL,
    },
    # Ministral (8B) and Mistral NeMo: llama's layout with Mistral's
    # byte-level BPE tokenizer (`tekken`: words split by letter case, digits
    # one by one, no contractions).
    "ministral": {
        "arch": "llama",
        "pre": "tekken",
        "ignore_merges": True,
        "split": (
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"""
            r"""|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"""
            r"""|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
        ),
        "nfc": False,
        "specials": ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
        "bos": "<s>",
        "eos": "</s>",
        "template": MISTRAL_TEKKEN_CHAT,
        # Where tekken splits as no other family here does: at a change of
        # letter case, and slashes kept with the punctuation before them.
        "tricky": ["HelloWorld XMLHttpRequest iPhone", "path//to/ file.rs", "ÉCOLE École"],
        "seed": 37,
        "formats": ["Q8_0", "Q4_1"],
        **MISTRAL_MODEL,
    },
    # Phi-3 / Phi-3.5: q, k and v in one matrix and gate and up in another,
    # a SentencePiece tokenizer with Phi-3's added tokens, Phi-3.5's
    # long-context rope scaling (the original context far shorter than the
    # tiny model's, so the long and short factors differ where it is
    # served) and a sliding window.
    "phi3": {
        "arch": "phi3",
        "spm": True,
        "specials": ["<unk>", "<s>", "</s>"],
        "added": ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>"],
        "bos": "<s>",
        "eos": "<|endoftext|>",
        "stop": ["<|endoftext|>", "<|assistant|>", "<|end|>"],
        "template": PHI3_CHAT,
        "seed": 37,
        "formats": ["Q8_0", "Q4_1"],
        "config": "Phi3Config",
        "model": "Phi3ForCausalLM",
        "peft_targets": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
        "extra": {
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 10_000.0,
                "short_factor": [1.0, 1.0, 1.1, 1.2, 1.5, 2.0, 2.5, 3.0],
                "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0],
            },
            "original_max_position_embeddings": 64,
            "sliding_window": 200,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
            "pad_token_id": None,
        },
    },
    # Gemma 2: GELU on the gate, embeddings scaled by sqrt(hidden), norms on
    # the attention's and the feed-forward's outputs, soft-capped attention
    # scores and logits (caps lower than the real 50 and 30, so that this
    # small model's scores and logits reach them), a head size of its own, a
    # sliding window on every other layer (shorter than the prompts and
    # answers, longer than the loop test's task needs); a SentencePiece
    # vocabulary that puts no space in front of a text.
    "gemma2": {
        "arch": "gemma2",
        **GEMMA_TEXT,
        "seed": 37,
        "embed_std": 0.125,
        "formats": ["Q8_0", "Q4_1"],
        "config": "Gemma2Config",
        "model": "Gemma2ForCausalLM",
        "extra": {
            "head_dim": 32,
            "query_pre_attn_scalar": 32,
            "attn_logit_softcapping": 20.0,
            "final_logit_softcapping": 10.0,
            "sliding_window": 32,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10_000.0},
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": True,
        },
    },
    # Gemma 3: Gemma 2's layer and vocabulary without the soft-caps, with
    # q and k norms, five sliding-window layers to one global (six layers
    # here, a window shorter than the prompts), the local layers turning by
    # a rotary base of 10,000, the global one by its own with linear
    # scaling (as the 4B and larger).
    "gemma3": {
        "arch": "gemma3",
        **GEMMA_TEXT,
        "layers": 6,
        "seed": 31,
        "embed_std": 0.125,
        "formats": ["Q8_0", "Q4_1"],
        "config": "Gemma3TextConfig",
        "model": "Gemma3ForCausalLM",
        "extra": {
            "head_dim": 32,
            "query_pre_attn_scalar": 32,
            "sliding_window": 16,
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {
                    "rope_type": "linear",
                    "factor": 8.0,
                    "rope_theta": 1_000_000.0,
                },
            },
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": True,
        },
    },
    # SmolLM3: llama's layout and Llama 3's tokenizer (ChatML's turn tokens
    # added), no rotary embedding in the last of every four layers: four
    # layers here, so that one attends by content alone.
    "smollm3": {
        "arch": "smollm3",
        # llama.cpp's converter names SmolLM3's tokenizer (Llama 3's rules)
        # `smaug-bpe`.
        "pre": "smaug-bpe",
        "split": LLAMA3_SPLIT,
        "ignore_merges": True,
        "nfc": False,
        "specials": ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"],
        "bos": None,
        "eos": "<|im_end|>",
        "template": SMOLLM3_CHAT,
        "layers": 4,
        "seed": 40,
        "formats": ["Q8_0", "Q4_1"],
        "config": "SmolLM3Config",
        "model": "SmolLM3ForCausalLM",
        "extra": {
            "rope_parameters": {"rope_type": "default", "rope_theta": 10_000.0},
            "no_rope_layer_interval": 4,
            "pad_token_id": None,
            "use_sliding_window": False,
            "sliding_window": None,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": True,
        },
    },
}

# Characters the corpus never holds: a SentencePiece tokenizer spells them
# by their bytes.
UNSEEN = ["Ωmega ≈ 3 ½", "Grüße, Ελλάδα"]

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


def learn_vocab(vocab_size, specials):
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
    return tokens + specials, merges


def encode(text, family, tokens, merges):
    """The family's tokenizer rules in plain Python: special tokens matched
    whole, NFC where the family normalizes, words by the family's regex,
    each word's bytes merged by merge rank (a word the vocabulary holds
    whole taken as one token first, where the family's tokenizer.json says
    `ignore_merges`, as Llama 3's and tekken's do)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
    alphabet = byte_level_alphabet()
    ids = []
    specials = family["specials"]
    for chunk in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
        if chunk in specials:
            ids.append(vocab[chunk])
            continue
        if family["nfc"]:
            chunk = unicodedata.normalize("NFC", chunk)
        for word in regex.findall(family["split"], chunk):
            symbols = [alphabet[b] for b in word.encode("utf-8")]
            whole = "".join(symbols)
            if family.get("ignore_merges") and whole in vocab:
                ids.append(vocab[whole])
                continue
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


def learn_sentencepiece(vocab_size, prefix=True):
    """A SentencePiece BPE model learned on CORPUS as Llama's and Mistral's
    were set up: byte fallback, no normalization, a space in front of each
    text; ids 0-2 `<unk>`, `<s>`, `</s>`, then the 256 byte pieces."""
    import io

    import sentencepiece as spm

    lines = [line for text in CORPUS for line in text.split("\n") if line.strip()]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=out,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=prefix,
        split_digits=False,
        allow_whitespace_only_pieces=True,
        hard_vocab_limit=False,
        num_threads=1,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    return out.getvalue()


class SentencePieceText:
    """A SentencePiece tokenizer: the reference ids from the `sentencepiece`
    library, transformers' Llama tokenizer converted from the same model as
    the second opinion, and its GGUF metadata as llama.cpp writes it."""

    def __init__(self, family):
        import tempfile

        import sentencepiece as spm
        from transformers import LlamaTokenizer

        self.family = family
        # Gemma's vocabulary puts no space in front of a text.
        self.prefix = family.get("space_prefix", True)
        self.proto = learn_sentencepiece(500, self.prefix)
        self.sp = spm.SentencePieceProcessor(model_proto=self.proto)
        sp = self.sp
        self.tokens = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        self.scores = [sp.get_score(i) for i in range(sp.get_piece_size())]
        self.types = []
        for i in range(sp.get_piece_size()):
            if sp.is_unknown(i):
                self.types.append(gguf.TokenType.UNKNOWN)
            elif sp.is_control(i):
                self.types.append(gguf.TokenType.CONTROL)
            elif sp.is_byte(i):
                self.types.append(gguf.TokenType.BYTE)
            elif sp.is_unused(i):
                self.types.append(gguf.TokenType.UNUSED)
            else:
                self.types.append(gguf.TokenType.NORMAL)
        assert self.tokens[:3] == family["specials"], self.tokens[:3]
        # Added tokens after SentencePiece's own (Phi-3's role and end
        # tokens), control tokens as llama.cpp's converter types them.
        self.added = family.get("added", [])
        self.tokens += self.added
        self.scores += [0.0] * len(self.added)
        self.types += [gguf.TokenType.CONTROL] * len(self.added)
        with tempfile.TemporaryDirectory() as d:
            path = pathlib.Path(d) / "tokenizer.model"
            path.write_bytes(self.proto)
            converted = LlamaTokenizer.from_pretrained(d, legacy=True)
        # transformers' converted model (its merges derived by transformers
        # from the SentencePiece model), with the text set up as Llama 2's
        # tokenizer.json sets it up: a `▁` put in front of every text
        # between special tokens, even one that begins with a space (the
        # Metaspace step transformers now uses skips those, where
        # sentencepiece and llama.cpp do not).
        from tokenizers import normalizers

        self.theirs = converted.backend_tokenizer
        if self.prefix:
            self.theirs.normalizer = normalizers.Sequence(
                [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
            )
        else:
            # As Gemma's tokenizer.json: spaces escaped, none put in front,
            # none taken off the front when decoding.
            from tokenizers import decoders

            self.theirs.normalizer = normalizers.Replace(" ", "\u2581")
            self.theirs.decoder = decoders.Sequence(
                [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
            )
        self.theirs.pre_tokenizer = None
        from tokenizers import AddedToken

        self.theirs.add_special_tokens([AddedToken(t, special=True) for t in self.added])

    def encode(self, text):
        # `<unk>` is not matched in text.
        specials = self.family["specials"][1:] + self.added
        ids = []
        for chunk in re.split("(" + "|".join(map(re.escape, specials)) + ")", text):
            if chunk in specials:
                ids.append(self.tokens.index(chunk))
            elif chunk:
                ids.extend(self.sp.encode(chunk))
        return ids

    def tokenize(self, text):
        ids = self.encode(text)
        other = self.theirs.encode(text, add_special_tokens=False).ids
        assert ids == other, f"{text!r}: {ids} from sentencepiece, {other} from transformers"
        return ids, self.theirs.decode(ids, skip_special_tokens=False)

    def write_gguf(self, w):
        w.add_tokenizer_model("llama")
        w.add_token_list(self.tokens)
        w.add_token_scores(self.scores)
        w.add_token_types(self.types)
        w.add_add_space_prefix(self.prefix)
        w.add_unk_token_id(0)


class ByteLevelText:
    """A byte-level BPE tokenizer by the family's rules, checked against the
    `tokenizers` library set up as the family's tokenizer.json."""

    def __init__(self, family):
        self.family = family
        self.tokens, self.merges = learn_vocab(400, family["specials"])
        self.theirs = second_opinion(family, self.tokens, self.merges)

    def tokenize(self, text):
        ids = encode(text, self.family, self.tokens, self.merges)
        other = self.theirs.encode(text, add_special_tokens=False).ids
        assert ids == other, f"{text!r}: {ids} here, {other} from tokenizers"
        return ids, self.theirs.decode(ids, skip_special_tokens=False)

    def write_gguf(self, w):
        specials = self.family["specials"]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(self.family["pre"])
        w.add_token_list(self.tokens)
        w.add_token_types(
            [
                gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL
                for t in self.tokens
            ]
        )
        w.add_token_merges(self.merges)


def randomize_gently(model, seed):
    """Weights drawn as Flywheel's own tiny llama draws them
    (`services/model/src/testing.rs`: uniform within 0.3, embeddings within
    1, norms one), biases within 0.1: a model whose answers a few LoRA steps
    can change, for the loop's end-to-end test."""
    g = torch.Generator().manual_seed(seed)
    uniform = lambda p, r: p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * r)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                uniform(p, 0.1)
            elif "embed_tokens" in name:
                uniform(p, 1.0)
            else:
                uniform(p, 0.3)


def randomize(model, seed, embed_std=1.0):
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
                p.copy_(embed_std * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) * 4.0 / fan_in**0.5)


def second_opinion(family, tokens, merges):
    """The `tokenizers` library (which transformers' tokenizer classes run
    on, and Flywheel too) set up as the family's tokenizer.json sets it up."""
    from tokenizers import AddedToken, Regex, decoders, normalizers

    tok = Tokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(tokens)},
            merges=[tuple(m.split(" ")) for m in merges],
            ignore_merges=family.get("ignore_merges", False),
        )
    )
    if family["nfc"]:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(family["split"]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in family["specials"]])
    return tok


def interleave(w, heads):
    """q or k rows from Hugging Face's order (rotary over halves) to the
    interleaved one llama.cpp's converter writes for llama: in each head,
    row 2i + j is row j * head_dim / 2 + i."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def deinterleave(w, heads):
    """The inverse of `interleave`: back to Hugging Face's row order."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(rope, head_dim):
    """Llama 3.1's rope scaling as one factor per rotary frequency (the
    frequency is divided by it): high frequencies kept, low ones divided by
    `factor`, those between blended by wavelength."""
    import math

    theta, factor = rope["rope_theta"], rope["factor"]
    old = rope["original_max_position_embeddings"]
    low_wave = old / rope["low_freq_factor"]
    high_wave = old / rope["high_freq_factor"]
    factors = []
    for i in range(head_dim // 2):
        freq = 1.0 / theta ** (2 * i / head_dim)
        wave = 2 * math.pi / freq
        if wave < high_wave:
            factors.append(1.0)
        elif wave > low_wave:
            factors.append(factor)
        else:
            smooth = (old / wave - rope["low_freq_factor"]) / (
                rope["high_freq_factor"] - rope["low_freq_factor"]
            )
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


# The K-quants, written here: gguf's Python package reads them but has no
# quantizer for them. Each 256-value block of a row splits into sub-blocks
# with a scale (and, for Q4_K and Q5_K, a minimum) of their own, the
# sub-blocks' scales quantized again against one f16 scale per block. These
# pick each scale from its sub-block's range, plainly (llama.cpp searches
# for better ones); the layout is llama.cpp's, and `k_quantize` checks it by
# reading the bytes back with gguf's own dequantizer.
QK_K = 256


def f16(x):
    return np.asarray(x, np.float32).astype(np.float16)


def k_pack_scales(sc, mn):
    """Q4_K's and Q5_K's 12 bytes of eight 6-bit scales and eight 6-bit
    minimums: the first four of each in the low six bits of bytes 0-3 and
    4-7, the last four's low nibbles in bytes 8-11 and their top two bits in
    the top two bits of bytes 0-7."""
    n = sc.shape[0]
    out = np.zeros((n, 12), np.uint8)
    out[:, 0:4] = (sc[:, 0:4] & 0x3F) | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = (mn[:, 0:4] & 0x3F) | ((mn[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((mn[:, 4:8] & 0x0F) << 4)
    return out


def k_scale_min(x, levels):
    """Q4_K's and Q5_K's sub-block scales and minimums (x: blocks of eight
    sub-blocks of 32): value = d * sc * q - dmin * m, q in 0..levels."""
    lo = np.minimum(x.min(-1), 0.0)
    hi = x.max(-1)
    scale = (hi - lo) / levels
    d = f16(scale.max(-1) / 63)
    dmin = f16(-lo.min(-1) / 63)
    d32, dmin32 = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.clip(np.round(np.divide(scale, d32, out=np.zeros_like(scale), where=d32 > 0)), 0, 63)
    mn = np.clip(np.round(np.divide(-lo, dmin32, out=np.zeros_like(lo), where=dmin32 > 0)), 0, 63)
    step = (d32 * sc)[..., None]
    q = np.divide(x + (dmin32 * mn)[..., None], step, out=np.zeros_like(x), where=step > 0)
    q = np.clip(np.round(q), 0, levels).astype(np.uint8)
    return d, dmin, sc.astype(np.uint8), mn.astype(np.uint8), q


def k_quantize(t, qtype):
    """`t` (rows a multiple of 256 wide) as Q4_K, Q5_K or Q6_K blocks."""
    blocks = t.reshape(-1, QK_K).astype(np.float32)
    n = blocks.shape[0]
    if qtype in ("Q4_K", "Q5_K"):
        levels = 15 if qtype == "Q4_K" else 31
        d, dmin, sc, mn, q = k_scale_min(blocks.reshape(n, 8, 32), levels)
        low = q & 0x0F
        # Four 32-byte chunks: sub-block 2c in the low nibbles, 2c + 1 in
        # the high ones.
        qs = (low[:, 0::2] | (low[:, 1::2] << 4)).reshape(n, 128)
        parts = [d.view(np.uint8).reshape(n, 2), dmin.view(np.uint8).reshape(n, 2)]
        parts.append(k_pack_scales(sc, mn))
        if qtype == "Q5_K":
            # Bit i of byte b: the fifth bit of sub-block i's value b.
            high = (q >> 4) & 1
            qh = np.zeros((n, 32), np.uint8)
            for i in range(8):
                qh |= high[:, i, :] << i
            parts.append(qh)
        parts.append(qs)
    else:
        # Q6_K: sixteen groups of 16 with an 8-bit scale each, q in -32..31.
        groups = blocks.reshape(n, 16, 16)
        scale = np.abs(groups).max(-1) / 31
        d = f16(np.abs(scale).max(-1) / 127)
        d32 = d.astype(np.float32)[:, None]
        sc = np.clip(np.round(np.divide(scale, d32, out=np.zeros_like(scale), where=d32 > 0)), -128, 127)
        step = (d32 * sc)[..., None]
        q = np.divide(groups, step, out=np.zeros_like(groups), where=step != 0)
        q = (np.clip(np.round(q), -32, 31) + 32).astype(np.uint8).reshape(n, 2, 128)
        # Each half of 128: its values 0-63 and 64-127 share the low
        # nibbles of 64 bytes; its four runs of 32 share 32 bytes of high
        # bits, two each.
        ql = ((q[:, :, :64] & 0x0F) | ((q[:, :, 64:] & 0x0F) << 4)).reshape(n, 128)
        hi = (q >> 4).reshape(n, 2, 4, 32)
        qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6))
        parts = [ql, qh.reshape(n, 64), sc.astype(np.int8).view(np.uint8), d.view(np.uint8).reshape(n, 2)]
    raw = np.concatenate(parts, axis=1).reshape(t.shape[0], -1)
    kind = gguf.GGMLQuantizationType[qtype]
    back = gguf.quants.dequantize(raw, kind).reshape(t.shape)
    # Read back by gguf: within a step of each sub-block's grid of the
    # weights (a layout written wrongly lands far off).
    worst = np.abs(back - t).max() / np.abs(t).max()
    assert worst < {"Q4_K": 0.1, "Q5_K": 0.05, "Q6_K": 0.05}[qtype], (qtype, worst)
    return raw


def build(name, family, out):
    import transformers

    if family.get("pre") == "qwen2":
        # The regex written above is transformers' for Qwen2.
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

        assert family["split"] == PRETOKENIZE_REGEX
    text_side = SentencePieceText(family) if family.get("spm") else ByteLevelText(family)
    tokens, tokenize = text_side.tokens, text_side.tokenize

    cfg = getattr(transformers, family["config"])(
        vocab_size=len(tokens),
        hidden_size=family.get("hidden", 64),
        intermediate_size=family.get("intermediate", 128),
        num_hidden_layers=family.get("layers", 2),
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokens.index(family["bos"]) if family["bos"] else None,
        eos_token_id=tokens.index(family["eos"]),
        **family["extra"],
    )
    torch.manual_seed(0)
    model = getattr(transformers, family["model"])(cfg).eval().float()
    # Gemma multiplies its embeddings by sqrt(hidden): drawn that much
    # smaller, they do not drown the layers.
    if family.get("gentle"):
        randomize_gently(model, seed=family["seed"])
    else:
        randomize(model, seed=family["seed"], embed_std=family.get("embed_std", 1.0))

    arch = family["arch"]
    rope = family["extra"]["rope_parameters"]
    # Gemma 3's global layers' (its local ones' base is fixed by llama.cpp).
    rope = rope.get("full_attention", rope)
    # What the references are computed on: the model as Flywheel serves it.
    # With longrope that is at the context the file gives (the window,
    # 200), longer than the original (64), where llama.cpp and Flywheel use
    # the long factors at every position; transformers uses them only for
    # runs longer than the original, so the served model is the same
    # weights with the long factors in the short ones' place. The model
    # itself (short factors) is the reference for a context cut to the
    # original.
    served = model
    if rope["rope_type"] == "longrope":
        long_cfg = copy.deepcopy(cfg)
        long_cfg.rope_parameters = dict(cfg.rope_parameters, short_factor=rope["long_factor"])
        served = getattr(transformers, family["model"])(long_cfg).eval().float()
        served.load_state_dict(model.state_dict())
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    def write(path, qtype=None):
        """Writes the model as llama.cpp lays the family out, its matrices in
        `qtype` (None: F32); returns the state dict of what the file holds,
        read back as transformers' tensors (the rounding of `qtype` in)."""
        held = {}
        w = gguf.GGUFWriter(str(path), arch)
        w.add_name(f"tiny-random-{name}")
        w.add_block_count(cfg.num_hidden_layers)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        if head_dim != cfg.hidden_size // cfg.num_attention_heads:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        w.add_rope_freq_base(rope["rope_theta"])
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        text_side.write_gguf(w)
        if family["bos"]:
            w.add_bos_token_id(tokens.index(family["bos"]))
        w.add_eos_token_id(tokens.index(family["eos"]))
        w.add_chat_template(family["template"])
        if rope["rope_type"] == "llama3":
            w.add_tensor("rope_freqs.weight", llama3_rope_factors(rope, head_dim))
        if rope["rope_type"] == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rope["factor"])
        if rope["rope_type"] == "longrope":
            # As llama.cpp's converter writes Phi-3.5's: the factors as two
            # tensors, the attention factor transformers derives from the
            # context over the original one.
            import math

            old = family["extra"]["original_max_position_embeddings"]
            scale = cfg.max_position_embeddings / old
            w.add_rope_dimension_count(head_dim)
            w.add_rope_scaling_orig_ctx_len(old)
            w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(old)))
            w.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], np.float32))
            w.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], np.float32))
        if family["extra"].get("sliding_window"):
            w.add_sliding_window(family["extra"]["sliding_window"])
        if arch == "gemma2":
            w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
            w.add_final_logit_softcapping(cfg.final_logit_softcapping)
        # llama.cpp's tensor names; it permutes llama's q and k rows (and
        # SmolLM3's, a llama to its converter; no other family's).
        names = {
            "model.embed_tokens.weight": "token_embd.weight",
            "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight",
        }
        per_layer = {
            "self_attn.q_proj": "attn_q",
            "self_attn.k_proj": "attn_k",
            "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output",
            "mlp.gate_proj": "ffn_gate",
            "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down",
            "self_attn.qkv_proj": "attn_qkv",
            "mlp.gate_up_proj": "ffn_up",
            "self_attn.q_norm": "attn_q_norm",
            "self_attn.k_norm": "attn_k_norm",
            "input_layernorm": "attn_norm",
            "post_attention_layernorm": "ffn_norm",
        }
        if arch in ("gemma2", "gemma3"):
            per_layer.update(
                {
                    "post_attention_layernorm": "post_attention_norm",
                    "pre_feedforward_layernorm": "ffn_norm",
                    "post_feedforward_layernorm": "post_ffw_norm",
                }
            )
        for i in range(cfg.num_hidden_layers):
            for hf, short in per_layer.items():
                for kind in ("weight", "bias"):
                    names[f"model.layers.{i}.{hf}.{kind}"] = f"blk.{i}.{short}.{kind}"
        for hf_name, p in model.state_dict().items():
            if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            t = p.detach().numpy().astype(np.float32)
            if arch in ("llama", "smollm3") and ".q_proj." in hf_name:
                t = interleave(t, cfg.num_attention_heads)
            if arch in ("llama", "smollm3") and ".k_proj." in hf_name:
                t = interleave(t, cfg.num_key_value_heads)
            if qtype is None or t.ndim != 2:
                # Gemma's norms multiply by 1 + weight; llama.cpp stores
                # the sum.
                plus = 1.0 if arch in ("gemma2", "gemma3") and hf_name.endswith("norm.weight") else 0.0
                w.add_tensor(names[hf_name], t + np.float32(plus))
                stored = t
            elif qtype == "F16":
                w.add_tensor(names[hf_name], t.astype(np.float16))
                stored = t.astype(np.float16).astype(np.float32)
            else:
                kind = gguf.GGMLQuantizationType[qtype]
                if qtype.endswith("_K"):
                    raw = k_quantize(t, qtype)
                else:
                    raw = gguf.quants.quantize(t, kind)
                w.add_tensor(names[hf_name], raw, raw_dtype=kind)
                stored = gguf.quants.dequantize(raw, kind).reshape(t.shape)
            if arch in ("llama", "smollm3") and ".q_proj." in hf_name:
                stored = deinterleave(stored, cfg.num_attention_heads)
            if arch in ("llama", "smollm3") and ".k_proj." in hf_name:
                stored = deinterleave(stored, cfg.num_key_value_heads)
            held[hf_name] = torch.from_numpy(np.ascontiguousarray(stored, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return held

    write(out / "model.gguf")
    if family.get("folder", True):
        write_hf(out / "hf", model, family, text_side)

    from jinja2 import Template

    template = Template(family["template"])

    def render(p):
        if "text" in p:
            return p["text"]
        return template.render(
            messages=p["messages"], add_generation_prompt=True, bos_token=family["bos"] or ""
        )

    own_markup = render({"messages": [{"role": "user", "content": "hi"}]})
    unseen = UNSEEN if family.get("spm") else []
    ref = reference(served, tokenize, render, TRICKY + unseen + family.get("tricky", []) + [own_markup])
    if served is not model:
        short = reference(model, tokenize, render, [], PROMPTS[:1])
        case = short["forward"][0]
        positions = len(case["prompt_ids"]) + len(case["greedy_ids"])
        assert positions <= family["extra"]["original_max_position_embeddings"], positions
        ref["short_context"] = short["forward"]
    lora_prompt = render({"messages": [{"role": "user", "content": "Route ticket 42"}]})
    lora_answer = '{"team": "billing"}' + family["eos"]
    if family.get("formats"):
        ref["formats"] = {}
        for qtype in family["formats"]:
            held = write(out / f"model.{qtype.lower()}.gguf", qtype)
            rounded = copy.deepcopy(served)
            rounded.load_state_dict(held, strict=False)
            # One prompt: the first whose greedy steps hold no near-tie on
            # the rounded weights (rounding makes some, prompt by prompt).
            for p in PROMPTS:
                first = reference(rounded, tokenize, render, [], [p])
                if first["smallest_greedy_gap"] > 0.02:
                    break
            ref["formats"][qtype] = {
                "forward": first["forward"],
                "smallest_greedy_gap": first["smallest_greedy_gap"],
            }
    # Last: PEFT wraps the model in place (and unwraps it after).
    ref["lora_step"] = lora_step(
        served,
        tokenize,
        lora_prompt,
        lora_answer,
        out / "adapter",
        family.get("peft_targets"),
    )
    return ref


def write_hf(path, model, family, text_side):
    """The same model as a Hugging Face folder, laid out as the hub holds
    one: config.json, generation_config.json, the weights in safetensors
    (sharded with an index where the family says), tokenizer.json and
    tokenizer_config.json, the chat template as transformers saves it."""
    import shutil

    from transformers import PreTrainedTokenizerFast

    shutil.rmtree(path, ignore_errors=True)
    if family.get("stop"):
        # Instruct models list every token that ends an answer here.
        model.generation_config.eos_token_id = [text_side.tokens.index(t) for t in family["stop"]]
    model.save_pretrained(str(path), max_shard_size=family.get("shard", "1GB"))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=text_side.theirs,
        bos_token=family["bos"],
        eos_token=family["eos"],
        chat_template=family["template"],
    )
    fast.save_pretrained(str(path))
    if family.get("template_in_config"):
        # As most folders on the hub hold it (saved before transformers
        # wrote chat_template.jinja).
        jinja = path / "chat_template.jinja"
        config = json.loads((path / "tokenizer_config.json").read_text())
        config["chat_template"] = jinja.read_text()
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        jinja.unlink()


def lora_step(model, tokenize, prompt_text, answer_text, adapter_dir, targets=None):
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
        target_modules=targets
        or [
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
    prompt, _ = tokenize(prompt_text)
    answer, _ = tokenize(answer_text)
    ids = torch.tensor([prompt + answer])
    logits = peft_model(ids).logits[0, len(prompt) - 1 : -1]
    logp = torch.log_softmax(logits.float(), -1)
    loss = -logp[torch.arange(len(answer)), torch.tensor(answer)].mean()
    loss.backward()
    grad_sq = sum(float((p.grad**2).sum()) for n, p in peft_model.named_parameters() if "lora_" in n)
    # B's alone: a fused module's A serves all its projections, so its
    # gradient is theirs summed, where an adapter per projection has one
    # A each; B's rows are each projection's own either way.
    grad_sq_b = sum(
        float((p.grad**2).sum()) for n, p in peft_model.named_parameters() if "lora_B" in n
    )
    peft_model.unload()
    return {
        "prompt_ids": prompt,
        "answer_ids": answer,
        "loss": float(loss),
        "lora_grad_sq_sum": grad_sq,
        "lora_b_grad_sq_sum": grad_sq_b,
    }


def reference(model, tokenize, render, strings, prompts=PROMPTS):
    tricky = []
    for text in strings:
        ids, decoded = tokenize(text)
        tricky.append({"text": text, "ids": ids, "decoded": decoded})
    cases = []
    smallest_gap = float("inf")
    for p in prompts:
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


def main():
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "tests/testdata/families")
    import transformers

    only = sys.argv[2:]
    for name, family in FAMILIES.items():
        if only and name not in only:
            continue
        out = root / name
        out.mkdir(parents=True, exist_ok=True)
        ref = build(name, family, out)
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
        for qtype, f in ref.get("formats", {}).items():
            print(f"  {qtype}: smallest greedy logit gap {f['smallest_greedy_gap']:.4f}")


if __name__ == "__main__":
    main()
