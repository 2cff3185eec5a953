//! The training job: fine-tune a LoRA adapter on a dataset version, as a
//! recorded run. Every step's loss and learning rate goes to
//! `training_steps`; every `checkpoint_every` steps the adapter is saved and
//! the run remembers it, so a worker killed mid-run is followed by one that
//! resumes there; a cancel request stops the run at its next step. At the
//! end the adapter is merged into the base, registered as a candidate model
//! version with its lineage, and the run records its held-out loss.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use flywheel_curation::build::{DpoPair, KtoExample, SftExample};
use flywheel_store::PgPool;
use flywheel_store::training::{self, TrainingRun};
use flywheel_trainer::data::Message;
use flywheel_trainer::{Base, Example, Lora, LoraConfig, Objective, TrainConfig, Trainer};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::queue;

/// The queue's payload: which run to (continue to) train.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainJob {
    pub run_id: Uuid,
}

/// What a run trains with; stored as the run's `config`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    pub lora: LoraConfig,
    pub train: TrainConfig,
}

/// Where runs keep their files, and the knobs a worker sets.
#[derive(Debug, Clone)]
pub struct TrainEnv {
    /// Checkpoints and adapters: `<artifacts>/runs/<run id>/`.
    pub artifacts: PathBuf,
    /// Where merged candidate models are stored (the model cache).
    pub model_cache: PathBuf,
    pub checkpoint_every: usize,
    /// Test knob: fail a fresh (not resumed) attempt after this many steps,
    /// as a crash would.
    pub crash_after: Option<usize>,
}

/// How a run ended (for the job's result).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunOutcome {
    pub status: String,
    pub resumed_from: Option<i32>,
    pub steps: i32,
    pub candidate: Option<String>,
    pub eval_loss_before: Option<f64>,
    pub eval_loss_after: Option<f64>,
}

fn kind_of(objective: Objective) -> &'static str {
    match objective {
        Objective::Sft => "sft",
        Objective::Dpo => "dpo",
        Objective::Kto => "kto",
    }
}

/// Creates a queued run and its job in one transaction.
pub async fn create_run(
    pool: &PgPool,
    dataset_version_id: Uuid,
    base_version_id: Uuid,
    spec: &RunSpec,
    max_attempts: u32,
) -> anyhow::Result<(Uuid, String)> {
    let mut tx = pool.begin().await?;
    let run_id = training::create(
        &mut *tx,
        dataset_version_id,
        base_version_id,
        kind_of(spec.train.objective),
        &serde_json::to_value(spec)?,
        spec.train.steps as i32,
    )
    .await?;
    let task = queue::push(&mut tx, queue::TRAINING, &TrainJob { run_id }, max_attempts).await?;
    tx.commit().await?;
    Ok((run_id, task))
}

fn to_messages(m: &[flywheel_curation::build::Message]) -> Vec<Message> {
    m.iter()
        .map(|m| Message {
            role: m.role.clone(),
            content: m.content.clone(),
        })
        .collect()
}

/// A stored dataset example as a training example.
pub fn example(
    base: &Base,
    objective: Objective,
    stored: serde_json::Value,
    max_len: usize,
) -> anyhow::Result<Example> {
    Ok(match objective {
        Objective::Sft => {
            let e: SftExample = serde_json::from_value(stored)?;
            Example::Sft {
                prompt: base
                    .encode(&to_messages(&e.prompt), &e.completion)?
                    .truncated(max_len),
            }
        }
        Objective::Dpo => {
            let e: DpoPair = serde_json::from_value(stored)?;
            let prompt = to_messages(&e.prompt);
            Example::Dpo {
                chosen: base.encode(&prompt, &e.chosen)?.truncated(max_len),
                rejected: base.encode(&prompt, &e.rejected)?.truncated(max_len),
            }
        }
        Objective::Kto => {
            let e: KtoExample = serde_json::from_value(stored)?;
            Example::Kto {
                completion: base
                    .encode(&to_messages(&e.prompt), &e.completion)?
                    .truncated(max_len),
                desirable: e.label,
            }
        }
    })
}

/// Loads a dataset version's examples for an objective, split into
/// (train, eval).
pub fn load_examples(
    base: &Base,
    objective: Objective,
    rows: Vec<(String, serde_json::Value)>,
    max_len: usize,
) -> anyhow::Result<(Vec<Example>, Vec<Example>)> {
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (split, stored) in rows {
        let e = example(base, objective, stored, max_len)?;
        if split == "eval" {
            eval.push(e);
        } else {
            train.push(e);
        }
    }
    if train.is_empty() {
        bail!("no training examples in the train split");
    }
    Ok((train, eval))
}

fn run_dir(env: &TrainEnv, run: Uuid) -> PathBuf {
    env.artifacts.join("runs").join(run.to_string())
}

/// Trains (or resumes) one run to its end. The step function the worker
/// calls; public so tests can run it directly.
#[tracing::instrument(skip_all, err, fields(run = %run_id))]
pub async fn run(pool: &PgPool, env: &TrainEnv, run_id: Uuid) -> anyhow::Result<RunOutcome> {
    let run = training::get(pool, run_id)
        .await?
        .with_context(|| format!("training run {run_id} does not exist"))?;
    if matches!(run.status.as_str(), "succeeded" | "cancelled") {
        return Ok(outcome(&run, None));
    }
    if run.cancel_requested {
        training::finish(pool, run_id, "cancelled", None, None, None).await?;
        return Ok(RunOutcome {
            status: "cancelled".into(),
            ..outcome(&run, None)
        });
    }
    training::start(pool, run_id).await?;
    let spec: RunSpec = serde_json::from_value(run.config.clone())?;
    let objective = spec.train.objective;
    let rows =
        flywheel_store::datasets::examples(pool, run.dataset_version_id, kind_of(objective), None)
            .await?;
    let base = flywheel_store::models::get(pool, run.base_version_id)
        .await?
        .context("the run's base model version is gone")?;
    let handle = tokio::runtime::Handle::current();
    let (pool2, env2, run2) = (pool.clone(), env.clone(), run.clone());
    let result = tokio::task::spawn_blocking(move || {
        train_blocking(
            &handle,
            &pool2,
            &env2,
            &run2,
            &spec,
            rows,
            Path::new(&base.path),
        )
    })
    .await
    .context("training panicked")?;
    match result {
        Ok(o) => Ok(o),
        Err(e) => {
            training::finish(pool, run_id, "failed", None, None, Some(&format!("{e:#}"))).await?;
            Err(e)
        }
    }
}

fn outcome(run: &TrainingRun, resumed_from: Option<i32>) -> RunOutcome {
    RunOutcome {
        status: run.status.clone(),
        resumed_from,
        steps: run.step,
        candidate: run.candidate_version_id.map(|c| c.to_string()),
        eval_loss_before: run.eval_loss_before,
        eval_loss_after: run.eval_loss_after,
    }
}

fn train_blocking(
    rt: &tokio::runtime::Handle,
    pool: &PgPool,
    env: &TrainEnv,
    run: &TrainingRun,
    spec: &RunSpec,
    rows: Vec<(String, serde_json::Value)>,
    base_path: &Path,
) -> anyhow::Result<RunOutcome> {
    let base = Base::load(base_path)?;
    let (train_set, eval_set) =
        load_examples(&base, spec.train.objective, rows, spec.train.max_len)?;
    let dir = run_dir(env, run.id);
    let checkpoint = dir.join("checkpoint");
    let (lora, resumed_from) = match (run.checkpoint_step, &run.checkpoint_path) {
        (Some(step), Some(path)) => (
            flywheel_trainer::peft::load(&base.model, Path::new(path))?,
            Some(step),
        ),
        _ => (Lora::new(&base.model, spec.lora.clone())?, None),
    };
    let mut trainer = Trainer::new(&base.model, lora, spec.train.clone(), train_set)?;
    if let Some(step) = resumed_from {
        trainer.resume_at(step as usize);
        tracing::info!(step, "resuming from checkpoint");
    }
    if run.eval_loss_before.is_none() && resumed_from.is_none() {
        let before = trainer.evaluate(&eval_set)?;
        rt.block_on(training::set_eval_before(pool, run.id, before))?;
    }
    let total = spec.train.steps;
    let every = env.checkpoint_every.max(1);
    while trainer.step < total {
        let s = trainer.train_step()?;
        let cancel = rt.block_on(training::record_step(
            pool,
            run.id,
            s.step as i32,
            s.loss,
            s.learning_rate,
            s.grad_norm,
            s.tokens as i32,
            s.seconds,
        ))?;
        if cancel {
            rt.block_on(training::finish(
                pool,
                run.id,
                "cancelled",
                None,
                None,
                None,
            ))?;
            return Ok(RunOutcome {
                status: "cancelled".into(),
                resumed_from,
                steps: s.step as i32,
                candidate: None,
                eval_loss_before: run.eval_loss_before,
                eval_loss_after: None,
            });
        }
        if s.step % every == 0 && s.step < total {
            // Written next to the old one and renamed, so a crash mid-save
            // leaves the previous checkpoint intact.
            let tmp = dir.join("checkpoint.partial");
            let _ = std::fs::remove_dir_all(&tmp);
            flywheel_trainer::peft::save(&trainer.lora, &base.model, "base", &tmp)?;
            let _ = std::fs::remove_dir_all(&checkpoint);
            std::fs::rename(&tmp, &checkpoint)?;
            rt.block_on(training::checkpoint(
                pool,
                run.id,
                s.step as i32,
                &checkpoint.display().to_string(),
            ))?;
        }
        if env.crash_after == Some(s.step) && resumed_from.is_none() {
            bail!("simulated crash after step {}", s.step);
        }
    }
    let after = trainer.evaluate(&eval_set)?;
    let adapter = dir.join("adapter");
    let base_row = rt
        .block_on(flywheel_store::models::get(pool, run.base_version_id))?
        .context("the run's base model version is gone")?;
    flywheel_trainer::peft::save(&trainer.lora, &base.model, &base_row.name, &adapter)?;
    let merged = dir.join("merged.gguf");
    let note = format!(
        "LoRA from dataset version {} on {} (run {})",
        run.dataset_version_id, base_row.name, run.id
    );
    flywheel_trainer::merge::merge_to_gguf(base_path, &trainer.lora, &merged, &note)?;
    let name = format!("{}-ft-{}", base_row.name, &run.id.simple().to_string()[..8]);
    let candidate = rt.block_on(register_candidate(
        pool, env, run, &base_row, &merged, &adapter, &name,
    ))?;
    std::fs::remove_file(&merged)?;
    let before = rt
        .block_on(training::get(pool, run.id))?
        .and_then(|r| r.eval_loss_before);
    rt.block_on(training::finish(
        pool,
        run.id,
        "succeeded",
        Some(candidate),
        Some(after),
        None,
    ))?;
    Ok(RunOutcome {
        status: "succeeded".into(),
        resumed_from,
        steps: total as i32,
        candidate: Some(name),
        eval_loss_before: before,
        eval_loss_after: Some(after),
    })
}

#[allow(clippy::too_many_arguments)]
async fn register_candidate(
    pool: &PgPool,
    env: &TrainEnv,
    run: &TrainingRun,
    base: &flywheel_store::models::ModelVersion,
    merged: &Path,
    adapter: &Path,
    name: &str,
) -> anyhow::Result<Uuid> {
    let cache = flywheel_modelhub::ModelCache::new(&env.model_cache)?;
    let fetched = cache.import(merged, Some(name)).await?;
    let v = flywheel_store::models::register(
        pool,
        &flywheel_store::models::NewModelVersion {
            name: fetched.name.clone(),
            source: fetched.source.clone(),
            sha256: fetched.sha256.clone(),
            format: fetched.format.clone(),
            path: fetched.path.display().to_string(),
            size_bytes: fetched.size_bytes as i64,
        },
    )
    .await?;
    flywheel_store::models::set_lineage(
        pool,
        v.id,
        &flywheel_store::models::Lineage {
            base_version_id: Some(base.id),
            dataset_version_id: Some(run.dataset_version_id),
            adapter_path: Some(adapter.display().to_string()),
            training: Some(serde_json::json!({"run": run.id})),
        },
    )
    .await?;
    Ok(v.id)
}
