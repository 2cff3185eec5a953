//! Structured output with and without jumping forward and the prefix
//! cache: a scenario's held-out messages (one system prompt, each its own
//! question) answered under its `response_format`, greedy, by engines on
//! the same model file that differ only in `EngineConfig::jump_forward`
//! and `prefix_cache_bytes`, in alternating rounds. Reports, one request
//! at a time, the seconds per answer and from its first text to its end;
//! all at once, tokens per second; engine steps and prompt tokens read or
//! taken from the cache per answer; whether both wrote the same text, and how many answers were
//! right (the scenario's expected fields), so speed is never read without
//! its quality beside it.
//!
//! ```sh
//! cargo run --release -p flywheel-engine --example bench_structured -- \
//!     MODEL.gguf scenarios/support-routing-mixed.json [threads] [messages] [rounds]
//! ```
//! Prints one JSON object (`scripts/bench-structured.sh` runs it).

use std::time::Instant;

use flywheel_engine::{
    ChatMessage, EngineConfig, EngineHandle, Event, GenerateRequest, JsonShape, SamplingParams,
};
use serde_json::{Value, json};

/// One answer: its text, its tokens, and the seconds from its first text
/// to its end (the part jumping forward can shorten; reading the prompt
/// comes before it).
struct Answer {
    text: String,
    tokens: usize,
    after_first: f64,
}

/// Runs requests together; returns the wall seconds and the answers.
fn run(engine: &EngineHandle, reqs: Vec<GenerateRequest>) -> (f64, Vec<Answer>) {
    let start = Instant::now();
    let rxs: Vec<_> = reqs
        .into_iter()
        .map(|r| engine.submit(r).unwrap())
        .collect();
    let out = rxs
        .into_iter()
        .map(|mut rx| {
            let mut text = String::new();
            let mut first = None;
            loop {
                match rx.blocking_recv() {
                    Some(Event::Delta { text: t, .. }) => {
                        first.get_or_insert_with(Instant::now);
                        text.push_str(&t);
                    }
                    Some(Event::Done {
                        completion_tokens, ..
                    }) => {
                        return Answer {
                            text,
                            tokens: completion_tokens,
                            after_first: first.map_or(0.0, |f| f.elapsed().as_secs_f64()),
                        };
                    }
                    Some(Event::Error(e) | Event::TimedOut(e)) => panic!("{e}"),
                    None => panic!("the engine went away"),
                }
            }
        })
        .collect();
    (start.elapsed().as_secs_f64(), out)
}

/// Whether `answer` has every field the scenario's checks name, as given.
fn right(answer: &str, item: &Value) -> bool {
    let Ok(v) = serde_json::from_str::<Value>(answer) else {
        return false;
    };
    item["checks"].as_array().into_iter().flatten().all(|c| {
        c["fields"]
            .as_object()
            .into_iter()
            .flatten()
            .all(|(k, want)| &v[k] == want)
    })
}

#[derive(Default)]
struct Side {
    /// Best of the rounds, one request at a time: mean seconds per answer,
    /// and mean seconds from its first text to its end.
    latency: f64,
    after_first: f64,
    /// Best of the rounds, all at once: tokens per second of wall time,
    /// and mean seconds from an answer's first text to its end.
    together: f64,
    together_after_first: f64,
    /// The first round, one at a time: engine steps, prompt tokens taken
    /// from kept caches and read, tokens written, and the answers.
    steps: u64,
    cached: u64,
    read: u64,
    drafted: u64,
    accepted: u64,
    tokens: usize,
    texts: Vec<String>,
}

fn main() {
    let mut args = std::env::args().skip(1);
    let usage = "usage: bench_structured MODEL.gguf SCENARIO.json QUALITY.jsonl [threads] [messages] [rounds]";
    let model = args.next().expect(usage);
    let scenario: Value =
        serde_json::from_str(&std::fs::read_to_string(args.next().expect(usage)).unwrap()).unwrap();
    let quality = args.next().expect(usage);
    let threads: usize = args.next().map_or(2, |t| t.parse().unwrap());
    let messages: usize = args.next().map_or(40, |t| t.parse().unwrap());
    let rounds: usize = args.next().map_or(3, |t| t.parse().unwrap());
    let shape = JsonShape::from_response_format(&scenario["response_format"])
        .unwrap()
        .expect("the scenario's response_format is a JSON one");
    let items: Vec<&Value> = scenario["heldout"]
        .as_array()
        .unwrap()
        .iter()
        .take(messages)
        .collect();
    // Each configuration starts each pass on a fresh engine, so no pass
    // finds the previous pass's prompts kept.
    let configs = [
        ("one pass per token", false, 0, false),
        ("jump-forward", true, 0, false),
        ("jump-forward and prefix cache", true, 256 << 20, false),
        ("all three (the default)", true, 256 << 20, true),
    ];
    let load = |jump_forward, prefix_cache_bytes, speculative| {
        EngineHandle::load(
            std::path::Path::new(&model),
            "bench",
            EngineConfig {
                threads,
                max_batch: 16,
                max_batched_tokens: 512,
                queue_capacity: 1024,
                queue_per_tenant: 1024,
                jump_forward,
                prefix_cache_bytes,
                speculative,
                ..Default::default()
            },
        )
        .unwrap()
    };
    let system = scenario["system"].as_str().unwrap_or_default();
    let requests = |engine: &EngineHandle| -> Vec<GenerateRequest> {
        items
            .iter()
            .map(|item| GenerateRequest {
                prompt_ids: engine
                    .prepare_chat(&[
                        ChatMessage {
                            role: "system".into(),
                            content: system.into(),
                        },
                        ChatMessage {
                            role: "user".into(),
                            content: item["user"].as_str().unwrap().into(),
                        },
                    ])
                    .unwrap(),
                params: SamplingParams {
                    temperature: 0.0,
                    max_tokens: scenario["max_tokens"].as_u64().unwrap_or(64) as usize,
                    json: Some(shape.clone()),
                    ..Default::default()
                },
                ..Default::default()
            })
            .collect()
    };
    let mut sides: Vec<Side> = configs
        .iter()
        .map(|_| Side {
            latency: f64::INFINITY,
            after_first: f64::INFINITY,
            together_after_first: f64::INFINITY,
            ..Default::default()
        })
        .collect();
    for round in 0..rounds {
        for (&(_, jump, prefix, spec), side) in configs.iter().zip(&mut sides) {
            // One at a time: each answer's own latency.
            let engine = load(jump, prefix, spec);
            let (mut wall, mut after_first, mut tokens, mut texts) = (0.0, 0.0, 0, Vec::new());
            for req in requests(&engine) {
                let (w, mut out) = run(&engine, vec![req]);
                let a = out.remove(0);
                wall += w;
                after_first += a.after_first;
                tokens += a.tokens;
                texts.push(a.text);
            }
            let n = items.len() as f64;
            side.latency = side.latency.min(wall / n);
            side.after_first = side.after_first.min(after_first / n);
            if round == 0 {
                let stats = engine.stats();
                side.steps = stats.steps;
                side.cached = stats.cached_prompt_tokens;
                side.read = stats.prompt_tokens;
                side.drafted = stats.draft_tokens;
                side.accepted = stats.draft_tokens_accepted;
                side.tokens = tokens;
                side.texts = texts;
            }
            drop(engine);
            // All at once, batched as the gateway batches its traffic.
            let engine = load(jump, prefix, spec);
            let (wall, out) = run(&engine, requests(&engine));
            let tokens: usize = out.iter().map(|a| a.tokens).sum();
            side.together = side.together.max(tokens as f64 / wall);
            let after_first = out.iter().map(|a| a.after_first).sum::<f64>() / out.len() as f64;
            side.together_after_first = side.together_after_first.min(after_first);
        }
    }
    let first = &sides[0];
    let report: Vec<Value> = configs
        .iter()
        .zip(&sides)
        .map(
            |(&(name, jump_forward, prefix_cache_bytes, speculative), s)| {
                let ok = s
                    .texts
                    .iter()
                    .zip(&items)
                    .filter(|(t, i)| right(t, i))
                    .count();
                let n = items.len() as f64;
                json!({
                    "engine": name,
                    "jump_forward": jump_forward,
                    "prefix_cache_bytes": prefix_cache_bytes,
                    "speculative": speculative,
                    "draft_tokens_per_answer": s.drafted as f64 / n,
                    "draft_tokens_accepted_per_answer": s.accepted as f64 / n,
                    "seconds_per_answer_alone": s.latency,
                    "seconds_after_first_text_alone": s.after_first,
                    "tokens_per_s_together": s.together,
                    "seconds_after_first_text_together": s.together_after_first,
                    "tokens_per_answer": s.tokens as f64 / n,
                    "steps_per_answer": s.steps as f64 / n,
                    "prompt_tokens_read_per_answer": s.read as f64 / n,
                    "prompt_tokens_cached_per_answer": s.cached as f64 / n,
                    "right": ok,
                    "same_text_as_first": s.texts == first.texts,
                })
            },
        )
        .collect();
    // Free text: the quality prompts (greedy, 48 tokens), one at a time,
    // with and without guessing ahead; nothing to jump over there.
    let quality: Vec<Value> = std::fs::read_to_string(&quality)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut free = Vec::new();
    for speculative in [false, true] {
        let (mut best, mut texts, mut stats) = (0f64, Vec::new(), None);
        for _ in 0..rounds {
            let engine = load(false, 0, speculative);
            let (mut wall, mut tokens) = (0.0, 0);
            texts.clear();
            for q in &quality {
                let req = GenerateRequest {
                    prompt_ids: engine
                        .prepare_chat(&[ChatMessage {
                            role: "user".into(),
                            content: q["prompt"].as_str().unwrap().into(),
                        }])
                        .unwrap(),
                    params: SamplingParams {
                        temperature: 0.0,
                        max_tokens: 48,
                        ..Default::default()
                    },
                    ..Default::default()
                };
                let (w, mut out) = run(&engine, vec![req]);
                let a = out.remove(0);
                wall += w;
                tokens += a.tokens;
                texts.push(a.text);
            }
            best = best.max(tokens as f64 / wall);
            stats = Some(engine.stats());
        }
        let stats = stats.unwrap();
        let right = texts
            .iter()
            .zip(&quality)
            .filter(|(t, q)| {
                t.to_lowercase()
                    .contains(&q["expect"].as_str().unwrap().to_lowercase())
            })
            .count();
        free.push((speculative, best, texts, stats, right));
    }
    let free_report: Vec<Value> = free
        .iter()
        .map(|(speculative, best, texts, stats, right)| {
            json!({
                "speculative": speculative,
                "tokens_per_s_alone": best,
                "draft_tokens": stats.draft_tokens,
                "draft_tokens_accepted": stats.draft_tokens_accepted,
                "right": right,
                "of": quality.len(),
                "same_text_as_first": texts == &free[0].2,
            })
        })
        .collect();
    println!(
        "{}",
        json!({
            "model": model,
            "messages": items.len(),
            "threads": threads,
            "rounds": rounds,
            "engines": report,
            "quality_prompts": free_report,
            "example_answer": first.texts.first(),
        })
    );
}
