//! Engine benchmark: prefill and decode speed for one stream, aggregate
//! decode speed for several concurrent streams, and the quality check.
//!
//! ```sh
//! cargo run --release -p flywheel-engine --example bench -- MODEL.gguf [threads] [quality.jsonl]
//! ```
//! Prints one JSON object; `scripts/bench-engine.sh` runs it next to
//! llama.cpp and writes the comparison.

use std::time::Instant;

use flywheel_engine::{
    ChatMessage, EngineConfig, EngineHandle, Event, GenerateRequest, SamplingParams,
};

/// The prefill prompt, shared with the llama.cpp side (bench/llamacpp_bench.py).
pub const LONG_PROMPT: &str = include_str!("../../../bench/prompt.txt");
const DECODE_TOKENS: usize = 128;
const RUNS: usize = 3;

fn chat(engine: &EngineHandle, text: &str) -> Vec<u32> {
    engine
        .prepare_chat(&[ChatMessage {
            role: "user".into(),
            content: text.into(),
        }])
        .unwrap()
}

/// Runs requests together; returns (wall seconds, per-request (ttft, tokens, text)).
fn run(engine: &EngineHandle, reqs: Vec<GenerateRequest>) -> (f64, Vec<(f64, usize, String)>) {
    let start = Instant::now();
    let rxs: Vec<_> = reqs
        .into_iter()
        .map(|r| engine.submit(r).unwrap())
        .collect();
    let handles: Vec<_> = rxs
        .into_iter()
        .map(|mut rx| {
            std::thread::spawn(move || {
                let (mut ttft, mut n, mut text) = (None, 0, String::new());
                while let Some(ev) = rx.blocking_recv() {
                    match ev {
                        Event::Delta { text: t, .. } => {
                            ttft.get_or_insert(start.elapsed().as_secs_f64());
                            n += 1;
                            text.push_str(&t);
                        }
                        Event::Done { .. } => break,
                        Event::Error(e) | Event::TimedOut(e) => panic!("{e}"),
                    }
                }
                (ttft.unwrap_or(0.0), n, text)
            })
        })
        .collect();
    let out: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    (start.elapsed().as_secs_f64(), out)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .expect("usage: bench MODEL.gguf [threads] [quality.jsonl]");
    let threads: usize = args.next().map_or(2, |t| t.parse().unwrap());
    let quality = args.next();
    let engine = EngineHandle::load(
        std::path::Path::new(&path),
        "bench",
        EngineConfig {
            threads,
            max_batch: 16,
            max_batched_tokens: 512,
            // The kernels' speed, as llama.cpp's is measured: each prompt
            // read in full every run (the prefix cache would keep the long
            // prompt after its first run), one pass per token (no guessing
            // ahead; `bench_structured` measures both).
            prefix_cache_bytes: 0,
            speculative: false,
            ..Default::default()
        },
    )
    .unwrap();
    // Bytes of weights one step reads, whatever the batch (the kernel path).
    let weight_bytes = engine.info().weight_bytes;
    let greedy = |max_tokens| SamplingParams {
        temperature: 0.0,
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    };

    // Warm-up.
    run(
        &engine,
        vec![GenerateRequest {
            prompt_ids: chat(&engine, "Hi"),
            params: greedy(8),
            adapter: None,
            ..Default::default()
        }],
    );

    // Prefill: a long prompt, one token out; best of three.
    let long = chat(&engine, LONG_PROMPT.trim());
    let prefill = (0..RUNS)
        .map(|_| {
            let (_, out) = run(
                &engine,
                vec![GenerateRequest {
                    prompt_ids: long.clone(),
                    params: greedy(1),
                    adapter: None,
                    ..Default::default()
                }],
            );
            long.len() as f64 / out[0].0
        })
        .fold(0f64, f64::max);

    // Decode, one stream: tokens after the first over the time after it.
    let short = chat(&engine, "Write a story about a lighthouse keeper.");
    let decode_one = (0..RUNS)
        .map(|_| {
            let (wall, out) = run(
                &engine,
                vec![GenerateRequest {
                    prompt_ids: short.clone(),
                    params: greedy(DECODE_TOKENS),
                    adapter: None,
                    ..Default::default()
                }],
            );
            (out[0].1 - 1) as f64 / (wall - out[0].0)
        })
        .fold(0f64, f64::max);

    // Aggregate decode at several streams (different prompts, same length).
    let topics = [
        "a lighthouse keeper",
        "a lost cat",
        "the moon",
        "a baker",
        "a robot",
        "the sea",
        "a forest",
        "a train",
    ];
    let mut aggregate = Vec::new();
    for streams in [1usize, 4, 8] {
        // Best of three: this machine's neighbours come and go.
        let (mut best_wall, mut best_decode) = (0f64, 0f64);
        for _ in 0..RUNS {
            let reqs = (0..streams)
                .map(|i| GenerateRequest {
                    prompt_ids: chat(&engine, &format!("Write a story about {}.", topics[i])),
                    params: greedy(DECODE_TOKENS),
                    adapter: None,
                    ..Default::default()
                })
                .collect();
            let (wall, out) = run(&engine, reqs);
            let tokens: usize = out.iter().map(|o| o.1).sum();
            let first = out.iter().map(|o| o.0).fold(0f64, f64::max);
            best_wall = best_wall.max(tokens as f64 / wall);
            best_decode = best_decode.max((tokens - streams) as f64 / (wall - first));
        }
        aggregate.push(serde_json::json!({
            "streams": streams,
            "tokens_per_s": best_wall,
            "decode_tokens_per_s": best_decode,
        }));
    }

    let mut score = serde_json::Value::Null;
    if let Some(q) = quality {
        let cases: Vec<serde_json::Value> = std::fs::read_to_string(q)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let mut right = 0;
        let mut answers = Vec::new();
        for c in &cases {
            let prompt = c["prompt"].as_str().unwrap();
            let params = SamplingParams {
                temperature: 0.0,
                max_tokens: 48,
                ..Default::default()
            };
            let (_, out) = run(
                &engine,
                vec![GenerateRequest {
                    prompt_ids: chat(&engine, prompt),
                    params,
                    adapter: None,
                    ..Default::default()
                }],
            );
            let ok = out[0]
                .2
                .to_lowercase()
                .contains(&c["expect"].as_str().unwrap().to_lowercase());
            right += usize::from(ok);
            answers.push(serde_json::json!({"prompt": prompt, "answer": out[0].2, "ok": ok}));
        }
        score = serde_json::json!({"right": right, "total": cases.len(), "answers": answers});
    }
    println!(
        "{}",
        serde_json::json!({
            "engine": "flywheel",
            "threads": threads,
            "prompt_tokens": long.len(),
            "weight_bytes_per_step": weight_bytes,
            "prefill_tokens_per_s": prefill,
            "decode_tokens_per_s": decode_one,
            "aggregate": aggregate,
            "quality": score,
        })
    );
}
