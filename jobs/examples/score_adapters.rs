//! Scores LoRA adapters trained on a base model (or, given none, the base
//! itself) on a suite (pass rate), each served as the gateway serves it (the adapter on the base's
//! engine), with no database: the harness behind the training
//! calibration in docs/flywheel.md (`scripts/calibrate-training.sh`).
//!
//!   cargo run --release -p flywheel-jobs --example score_adapters -- \
//!       BASE.gguf SUITE.json [ADAPTER_DIR ...]
//!
//! Prints one JSON line per model: its name (`base` or the folder), items
//! passed, items, seconds, and the outputs of the items it failed.

use std::path::Path;
use std::time::Instant;

use flywheel_engine::{EngineConfig, EngineHandle};
use flywheel_eval::Suite;
use flywheel_eval::run::{Served, answer_suite};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [base, suite, adapters @ ..] = args.as_slice() else {
        anyhow::bail!("usage: score_adapters BASE.gguf SUITE.json [ADAPTER_DIR ...]");
    };
    let suite = Suite::parse(&std::fs::read_to_string(suite)?)?;
    let engine = EngineHandle::load(Path::new(base), "base", EngineConfig::default())?;
    // The base alone when no adapter is given.
    let mut models = Vec::new();
    if adapters.is_empty() {
        models.push(("base".to_string(), None));
    }
    for dir in adapters {
        let weights = flywheel_modelhub::adapter_weights(Path::new(base), Path::new(dir))?;
        let id = engine
            .add_adapter(weights)
            .map_err(|e| anyhow::anyhow!("{dir}: {e}"))?;
        models.push((dir.clone(), Some(id)));
    }
    for (name, adapter) in models {
        let served = Served {
            engine: engine.clone(),
            adapter,
            memo: None,
        };
        let started = Instant::now();
        let answers = answer_suite(&served, &suite, 16).await?;
        let failed: Vec<serde_json::Value> = suite
            .items
            .iter()
            .zip(&answers)
            .filter(|(item, g)| !item.passes(&g.text))
            .map(|(item, g)| serde_json::json!({"item": item.id, "output": g.text}))
            .collect();
        let line = serde_json::json!({
            "model": name,
            "passed": suite.items.len() - failed.len(),
            "items": suite.items.len(),
            "seconds": started.elapsed().as_secs_f64(),
            "failed": failed,
        });
        println!("{line}");
    }
    Ok(())
}
