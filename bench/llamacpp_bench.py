"""llama.cpp baseline for the engine benchmark (llama-cpp-python 0.3.36).

Same GGUF, same thread count, same prompts as services/engine/examples/bench.rs:
prefill speed on bench/prompt.txt, greedy decode speed for one stream, and the
quality check. Prints one JSON object.

    python3 bench/llamacpp_bench.py MODEL.gguf [threads] [quality.jsonl]
"""

import json
import os
import sys
import time

import numpy as np
from llama_cpp import Llama

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
DECODE_TOKENS = 128


def chat(text):
    return f"{SYSTEM}<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def main():
    path = sys.argv[1]
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    quality = sys.argv[3] if len(sys.argv) > 3 else None
    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=2048,
                n_batch=512, logits_all=False, verbose=False)
    n_vocab = llm.n_vocab()
    tok = lambda s: llm.tokenize(s.encode(), add_bos=False, special=True)

    def logits():
        # With logits_all=False llama-cpp-python no longer fills llm.scores.
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))

    here = os.path.dirname(os.path.abspath(__file__))
    long = tok(chat(open(os.path.join(here, "prompt.txt")).read().strip()))
    prefill = 0.0
    for _ in range(3):
        llm.reset()
        t = time.perf_counter()
        llm.eval(long)
        prefill = max(prefill, len(long) / (time.perf_counter() - t))

    short = tok(chat("Write a story about a lighthouse keeper."))
    decode = 0.0
    for _ in range(3):
        llm.reset()
        llm.eval(short)
        nxt = int(np.argmax(logits()))
        t = time.perf_counter()
        for _ in range(DECODE_TOKENS - 1):
            llm.eval([nxt])
            nxt = int(np.argmax(logits()))
        decode = max(decode, (DECODE_TOKENS - 1) / (time.perf_counter() - t))

    score = None
    if quality:
        cases = [json.loads(l) for l in open(quality)]
        answers, right = [], 0
        for c in cases:
            llm.reset()
            out = llm.create_completion(chat(c["prompt"]), max_tokens=48, temperature=0.0,
                                        stop=["<|im_end|>"])
            text = out["choices"][0]["text"]
            ok = c["expect"].lower() in text.lower()
            right += ok
            answers.append({"prompt": c["prompt"], "answer": text, "ok": ok})
        score = {"right": right, "total": len(cases), "answers": answers}

    print(json.dumps({"engine": "llama.cpp", "threads": threads, "prompt_tokens": len(long),
                      "prefill_tokens_per_s": prefill, "decode_tokens_per_s": decode,
                      "quality": score}))


if __name__ == "__main__":
    main()
