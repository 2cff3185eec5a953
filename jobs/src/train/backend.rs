//! What a training backend is given and what it must return. Every backend
//! (in this process, a shell command, a Kubernetes Job) gets the run and its
//! data and answers with a PEFT adapter or a cancellation; the record, the
//! evaluation and the candidate are the job's, whatever trained.

use std::future::Future;
use std::path::{Path, PathBuf};

use flywheel_store::PgPool;
use flywheel_store::models::ModelVersion;
use flywheel_store::training::{self, TrainingRun};
use flywheel_trainer::{Lora, Objective};
use uuid::Uuid;

use super::spec::{RunSpec, TrainEnv, run_key};

/// One run about to train.
pub struct RunContext<'a> {
    pub pool: &'a PgPool,
    pub env: &'a TrainEnv,
    pub run: &'a TrainingRun,
    pub spec: &'a RunSpec,
    /// The dataset version's examples for the objective: (split, example).
    pub rows: &'a [(String, serde_json::Value)],
    /// The base model version.
    pub base: &'a ModelVersion,
    /// Scratch space on this machine, emptied when the run starts.
    pub dir: PathBuf,
}

/// What a backend returns.
pub enum Trained {
    /// A PEFT adapter in `dir`. In-process training also hands over the
    /// adapter itself and the held-out loss after training (the loss before
    /// is in the run's row).
    Adapter {
        dir: PathBuf,
        measured: Option<(Lora, f64)>,
        resumed_from: Option<i32>,
    },
    /// The run was cancelled after `steps` steps.
    Cancelled {
        steps: i32,
        resumed_from: Option<i32>,
    },
}

/// A way to train a run.
pub trait TrainingBackend {
    fn train(&self, ctx: &RunContext<'_>) -> impl Future<Output = anyhow::Result<Trained>> + Send;
}

/// Whether someone asked the run to stop.
pub async fn cancel_requested(pool: &PgPool, run: Uuid) -> anyhow::Result<bool> {
    Ok(training::get(pool, run)
        .await?
        .is_some_and(|r| r.cancel_requested))
}

/// The last `n` lines of `text`, joined with " | ".
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().rev().take(n).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// What an external trainer is given, in the run's scratch folder and
/// under `runs/<id>/data/` in the artifact store.
pub struct Exported {
    /// The training examples, TRL JSONL.
    pub train: PathBuf,
    /// The held-out examples, TRL JSONL.
    pub eval: PathBuf,
    /// The whole run spec as JSON (`{"lora": {...}, "train": {...}}`):
    /// rank, alpha, dropout, target projections, learning rate, steps,
    /// warm-up, accumulation, maximum length, the preference `beta`, the
    /// replay and reference (KL) penalty weights, as the in-process
    /// trainer would use them.
    pub spec: PathBuf,
}

/// The dataset as TRL JSONL for external trainers, with the run's spec:
/// written to the run's scratch folder and kept in the artifact store
/// (`runs/<id>/data/`).
pub async fn export_data(ctx: &RunContext<'_>) -> anyhow::Result<Exported> {
    use flywheel_curation::export::Format;
    let format = match ctx.spec.train.objective {
        Objective::Sft => Format::TrlSft,
        Objective::Dpo => Format::TrlDpo,
        Objective::Kto => Format::TrlKto,
    };
    let (train_file, eval_file) = (ctx.dir.join("train.jsonl"), ctx.dir.join("eval.jsonl"));
    let (mut train_text, mut eval_text) = (String::new(), String::new());
    for (split, stored) in ctx.rows {
        let line = serde_json::to_string(&format.line(stored.clone())?)? + "\n";
        if split == "eval" {
            eval_text.push_str(&line);
        } else {
            train_text.push_str(&line);
        }
    }
    let spec_file = ctx.dir.join("spec.json");
    tokio::fs::write(&train_file, train_text).await?;
    tokio::fs::write(&eval_file, eval_text).await?;
    let spec = serde_json::json!({"lora": ctx.spec.lora, "train": ctx.spec.train});
    tokio::fs::write(&spec_file, serde_json::to_string_pretty(&spec)?).await?;
    for (file, name) in [
        (&train_file, "train.jsonl"),
        (&eval_file, "eval.jsonl"),
        (&spec_file, "spec.json"),
    ] {
        ctx.env
            .artifacts
            .put_file(&run_key(ctx.run.id, &format!("data/{name}")), file)
            .await?;
    }
    Ok(Exported {
        train: train_file,
        eval: eval_file,
        spec: spec_file,
    })
}

/// The base model's file on this machine.
pub fn base_path<'a>(ctx: &'a RunContext<'_>) -> &'a Path {
    Path::new(&ctx.base.path)
}
