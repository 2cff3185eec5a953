//! Seconds per optimizer step of LoRA SFT: batch 1, a 256-token sequence,
//! rank 8 on q/k/v/o, on a GGUF model (default: the cached SmolLM2-135M).
//! Prints one JSON line. Compare with `bench/torch_lora_step.py`.
//!
//!   cargo run --release -p flywheel-trainer --example bench_step -- MODEL.gguf [STEPS]
//!
//! `CANDLE_NUM_THREADS=1` unless set: candle's element-wise thread pool
//! spin-waits between ops and, on 2 cores, competes with the matmul threads
//! (1.48 s a step instead of 1.33 when idle; far worse under load).
//! Matmuls still use every core.

use std::time::Instant;

use flywheel_model::Proj;
use flywheel_trainer::{Base, Encoded, Example, Lora, LoraConfig, TrainConfig, Trainer};

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

#[allow(unsafe_code)]
fn main() -> anyhow::Result<()> {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: nothing else runs yet; no thread reads the environment.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).expect("usage: bench_step MODEL.gguf [STEPS]");
    let steps: usize = args.get(2).map_or(Ok(6), |s| s.parse())?;
    let seq = 256;
    let base = Base::load(std::path::Path::new(path))?;
    // Real text, cut to exactly `seq` tokens: half prompt, half answer.
    let text = include_str!("../../../bench/prompt.txt").repeat(8);
    let ids = base.tokenizer.encode(&text)?;
    anyhow::ensure!(ids.len() >= seq, "bench text too short");
    let example = Example::Sft {
        prompt: Encoded {
            prompt: ids[..seq / 2].to_vec(),
            answer: ids[seq / 2..seq].to_vec(),
        },
    };
    let lora = Lora::new(
        &base.model,
        LoraConfig {
            rank: 8,
            alpha: 16.0,
            targets: vec![Proj::Q, Proj::K, Proj::V, Proj::O],
            ..Default::default()
        },
    )?;
    let params = lora.parameter_count();
    let config = TrainConfig {
        steps,
        learning_rate: 1e-4,
        ..Default::default()
    };
    let mut trainer = Trainer::new(&base.model, lora, config, vec![example])?;
    let mut times = Vec::new();
    let mut losses = Vec::new();
    for _ in 0..steps {
        let t = Instant::now();
        let log = trainer.train_step()?;
        times.push(t.elapsed().as_secs_f64());
        losses.push(log.loss);
        eprintln!(
            "step {} loss {:.4} {:.2} s",
            log.step,
            log.loss,
            times.last().unwrap()
        );
    }
    // The first step warms caches and allocators.
    let mut steady: Vec<f64> = times[1..].to_vec();
    steady.sort_by(f64::total_cmp);
    let median = steady[steady.len() / 2];
    println!(
        "{}",
        serde_json::json!({
            "engine": "flywheel-trainer (candle autograd)",
            "seq_len": seq,
            "lora_rank": 8,
            "targets": "q,k,v,o",
            "trainable_params": params,
            "threads": rayon_threads(),
            "seconds_per_step_median": median,
            "seconds_per_step": times,
            "losses": losses,
            "peak_rss_mb": peak_rss_mb(),
        })
    );
    Ok(())
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
