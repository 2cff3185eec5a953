//! Seconds per training example when a step's examples share a system
//! prompt: each example in a step of its own (nothing shared) against
//! steps of 2, 4 and 8 examples packed behind their shared prefix, in
//! alternating rounds of one run. The examples are a scenario's first
//! traffic messages under its system prompt with their right answers; the
//! adapter is the default (LoRA on every projection, rank 16); no replay,
//! so only the examples' own forward and backward passes are timed.
//! Prints one JSON line.
//!
//!   cargo run --release -p flywheel-trainer --example bench_batch -- MODEL.gguf SCENARIO.json [ROUNDS]

use std::time::Instant;

use flywheel_trainer::data::Message;
use flywheel_trainer::{Base, Example, Lora, LoraConfig, TrainConfig, Trainer};

#[allow(unsafe_code)]
fn main() -> anyhow::Result<()> {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: nothing else runs yet; no thread reads the environment.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
    let args: Vec<String> = std::env::args().collect();
    let (Some(model), Some(scenario)) = (args.get(1), args.get(2)) else {
        anyhow::bail!("usage: bench_batch MODEL.gguf SCENARIO.json [ROUNDS]");
    };
    let rounds: usize = args.get(3).map_or(Ok(3), |s| s.parse())?;
    let base = Base::load(std::path::Path::new(model))?;
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(scenario)?)?;
    let message = |role: &str, content: &str| Message {
        role: role.into(),
        content: content.into(),
    };
    let system = s["system"].as_str().unwrap_or_default();
    let examples: Vec<Example> = s["traffic"]
        .as_array()
        .map(|t| t.iter().take(8).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|it| {
            let prompt = [
                message("system", system),
                message("user", it["user"].as_str().unwrap_or_default()),
            ];
            Ok(Example::Sft {
                prompt: base.encode(&prompt, it["answer"].as_str().unwrap_or_default())?,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    anyhow::ensure!(examples.len() == 8, "the scenario needs 8 traffic messages");
    let tokens: Vec<usize> = examples.iter().map(|e| e.sequences()[0].len()).collect();

    // Seconds per example of one pass over the 8 examples, `per_step` a step.
    let pass = |per_step: usize| -> anyhow::Result<f64> {
        let lora = Lora::new(&base.model, LoraConfig::default())?;
        let config = TrainConfig {
            grad_accum: per_step,
            steps: 8 / per_step,
            epochs: 0.0,
            replay_prompts: 0,
            ..Default::default()
        };
        let mut trainer = Trainer::new(&base.model, lora, config, examples.clone())?;
        // One step first: it warms caches and allocators.
        trainer.train_step()?;
        let t = Instant::now();
        for _ in 0..8 / per_step {
            trainer.train_step()?;
        }
        Ok(t.elapsed().as_secs_f64() / 8.0)
    };
    let sizes = [1usize, 2, 4, 8];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); sizes.len()];
    for round in 0..rounds {
        // Alternate the order so drift in the machine's speed favours none.
        let order: Vec<usize> = if round % 2 == 0 {
            (0..sizes.len()).collect()
        } else {
            (0..sizes.len()).rev().collect()
        };
        for k in order {
            let s = pass(sizes[k])?;
            eprintln!("round {round}: {} a step: {s:.3} s an example", sizes[k]);
            times[k].push(s);
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let per_example: serde_json::Map<String, serde_json::Value> = sizes
        .iter()
        .zip(&times)
        .map(|(n, t)| (n.to_string(), serde_json::json!(median(t))))
        .collect();
    println!(
        "{}",
        serde_json::json!({
            "bench": "seconds per training example, by examples a step (median of rounds)",
            "example_tokens": tokens,
            "rounds": rounds,
            "seconds_per_example": per_example,
            "all": times,
        })
    );
    Ok(())
}
