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
use flywheel_store::models::{Lineage, ModelVersion};
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
    /// Train with the configured external command instead of in-process.
    #[serde(default)]
    pub external: bool,
}

/// Where runs keep their files, and the knobs a worker sets.
#[derive(Debug, Clone)]
pub struct TrainEnv {
    /// Checkpoints and adapters: `<artifacts>/runs/<run id>/`.
    pub artifacts: PathBuf,
    /// Where merged candidate models are stored (the model cache).
    pub model_cache: PathBuf,
    pub checkpoint_every: usize,
    /// Niceness of the training thread (and of the external command's
    /// process), so serving on the same machine keeps the CPU.
    pub nice: i32,
    /// The external trainer (`FLYWHEEL_EXTERNAL_TRAINER`): a shell command
    /// with `{train}`, `{eval}` (TRL JSONL files), `{base}` (the base GGUF),
    /// `{out}` (where it must leave a PEFT adapter), `{objective}`,
    /// `{steps}` and `{flywheel}` (this program) filled in.
    pub external_command: Option<String>,
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
    // A thread of its own, so its lowered priority stays with training.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let nice = env.nice;
    std::thread::Builder::new()
        .name(format!("train-{}", &run_id.simple().to_string()[..8]))
        .spawn(move || {
            flywheel_trainer::lower_thread_priority(nice);
            let base_path = Path::new(&base.path);
            let result = if spec.external {
                external_blocking(&handle, &pool2, &env2, &run2, &spec, rows, base_path)
            } else {
                train_blocking(&handle, &pool2, &env2, &run2, &spec, rows, base_path)
            };
            let _ = tx.send(result);
        })?;
    let result = rx.await.context("the training thread panicked")?;
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
            let mut o = cancelled(rt, pool, run, s.step as i32)?;
            o.resumed_from = resumed_from;
            return Ok(o);
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
    let base_name = rt
        .block_on(flywheel_store::models::get(pool, run.base_version_id))?
        .context("the run's base model version is gone")?
        .name;
    flywheel_trainer::peft::save(&trainer.lora, &base.model, &base_name, &adapter)?;
    let mut o = conclude(
        rt,
        pool,
        env,
        run,
        &trainer.lora,
        base_path,
        &adapter,
        after,
    )?;
    o.resumed_from = resumed_from;
    Ok(o)
}

/// Closes a run whose cancel was requested, after `steps` steps.
fn cancelled(
    rt: &tokio::runtime::Handle,
    pool: &PgPool,
    run: &TrainingRun,
    steps: i32,
) -> anyhow::Result<RunOutcome> {
    rt.block_on(training::finish(
        pool,
        run.id,
        "cancelled",
        None,
        None,
        None,
    ))?;
    Ok(RunOutcome {
        status: "cancelled".into(),
        resumed_from: None,
        steps,
        candidate: None,
        eval_loss_before: run.eval_loss_before,
        eval_loss_after: None,
    })
}

/// Merges the finished adapter, registers the candidate and closes the run.
#[allow(clippy::too_many_arguments)]
fn conclude(
    rt: &tokio::runtime::Handle,
    pool: &PgPool,
    env: &TrainEnv,
    run: &TrainingRun,
    lora: &Lora,
    base_path: &Path,
    adapter: &Path,
    eval_after: f64,
) -> anyhow::Result<RunOutcome> {
    let base_row = rt
        .block_on(flywheel_store::models::get(pool, run.base_version_id))?
        .context("the run's base model version is gone")?;
    let note = format!(
        "LoRA from dataset version {} on {} (run {})",
        run.dataset_version_id, base_row.name, run.id
    );
    let name = format!("{}-ft-{}", base_row.name, &run.id.simple().to_string()[..8]);
    let lineage = Lineage {
        base_version_id: Some(base_row.id),
        dataset_version_id: Some(run.dataset_version_id),
        adapter_path: Some(adapter.display().to_string()),
        training: Some(serde_json::json!({"run": run.id})),
    };
    let candidate = rt
        .block_on(register_candidate(
            pool,
            &env.model_cache,
            base_path,
            lora,
            &name,
            &note,
            &lineage,
        ))?
        .id;
    let before = rt
        .block_on(training::get(pool, run.id))?
        .and_then(|r| r.eval_loss_before);
    rt.block_on(training::finish(
        pool,
        run.id,
        "succeeded",
        Some(candidate),
        Some(eval_after),
        None,
    ))?;
    Ok(RunOutcome {
        status: "succeeded".into(),
        resumed_from: None,
        steps: run.total_steps,
        candidate: Some(name),
        eval_loss_before: before,
        eval_loss_after: Some(eval_after),
    })
}

/// Mean loss of `lora` (or the base, with a fresh adapter) on `eval`.
fn eval_loss(base: &Base, lora: Lora, spec: &RunSpec, eval: &[Example]) -> anyhow::Result<f64> {
    if eval.is_empty() {
        return Ok(0.0);
    }
    let mut t = Trainer::new(&base.model, lora, spec.train.clone(), eval.to_vec())?;
    t.evaluate(eval)
}

/// A run trained by the configured external command: the dataset goes out
/// as TRL JSONL, a PEFT adapter comes back, and Flywheel keeps the record,
/// the held-out loss and the candidate.
#[allow(clippy::too_many_arguments)]
fn external_blocking(
    rt: &tokio::runtime::Handle,
    pool: &PgPool,
    env: &TrainEnv,
    run: &TrainingRun,
    spec: &RunSpec,
    rows: Vec<(String, serde_json::Value)>,
    base_path: &Path,
) -> anyhow::Result<RunOutcome> {
    use flywheel_curation::export::Format;
    let template = env
        .external_command
        .as_deref()
        .context("this run wants the external trainer, but FLYWHEEL_EXTERNAL_TRAINER is not set")?;
    let dir = run_dir(env, run.id);
    std::fs::create_dir_all(&dir)?;
    let format = match spec.train.objective {
        Objective::Sft => Format::TrlSft,
        Objective::Dpo => Format::TrlDpo,
        Objective::Kto => Format::TrlKto,
    };
    let (train_file, eval_file) = (dir.join("train.jsonl"), dir.join("eval.jsonl"));
    let (mut train_text, mut eval_text) = (String::new(), String::new());
    for (split, stored) in &rows {
        let line = serde_json::to_string(&format.line(stored.clone())?)? + "\n";
        if split == "eval" {
            eval_text.push_str(&line);
        } else {
            train_text.push_str(&line);
        }
    }
    std::fs::write(&train_file, train_text)?;
    std::fs::write(&eval_file, eval_text)?;
    let adapter = dir.join("adapter");
    let _ = std::fs::remove_dir_all(&adapter);
    let exe = std::env::current_exe()?;
    let command = template
        .replace("{train}", &train_file.display().to_string())
        .replace("{eval}", &eval_file.display().to_string())
        .replace("{base}", &base_path.display().to_string())
        .replace("{out}", &adapter.display().to_string())
        .replace("{objective}", kind_of(spec.train.objective))
        .replace("{steps}", &spec.train.steps.to_string())
        .replace("{flywheel}", &exe.display().to_string());
    let log_path = dir.join("external.log");
    let log = std::fs::File::create(&log_path)?;
    tracing::info!(%command, "starting the external trainer");
    let mut child = std::process::Command::new("nice")
        .arg("-n")
        .arg(env.nice.clamp(0, 19).to_string())
        .arg("sh")
        .arg("-c")
        .arg(&command)
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the external trainer")?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        let cancel = rt
            .block_on(training::get(pool, run.id))?
            .is_some_and(|r| r.cancel_requested);
        if cancel {
            let _ = child.kill();
            let _ = child.wait();
            return cancelled(rt, pool, run, 0);
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    if !status.success() {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(5).collect();
        bail!(
            "the external trainer exited with {status}: {}",
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        );
    }
    // What came back must be a LoRA adapter for this base.
    let base = Base::load(base_path)?;
    let lora = flywheel_trainer::peft::load(&base.model, &adapter)
        .context("the external trainer did not leave a usable PEFT adapter")?;
    let (_, eval_set) = load_examples(&base, spec.train.objective, rows, spec.train.max_len)?;
    let before = eval_loss(
        &base,
        Lora::new(&base.model, spec.lora.clone())?,
        spec,
        &eval_set,
    )?;
    rt.block_on(training::set_eval_before(pool, run.id, before))?;
    let after = eval_loss(&base, lora.clone(), spec, &eval_set)?;
    rt.block_on(training::record_step(
        pool,
        run.id,
        run.total_steps,
        after,
        0.0,
        0.0,
        0,
        0.0,
    ))?;
    conclude(rt, pool, env, run, &lora, base_path, &adapter, after)
}

/// Merges `lora` into the base GGUF (Q8_0 where adapted), keeps the result
/// in the model cache and registers it as model version `name` with its
/// lineage. Every way a candidate appears (a run, `train --register`,
/// `models import-adapter`) goes through here.
#[allow(clippy::too_many_arguments)]
pub async fn register_candidate(
    pool: &PgPool,
    model_cache: &Path,
    base_path: &Path,
    lora: &Lora,
    name: &str,
    note: &str,
    lineage: &Lineage,
) -> anyhow::Result<ModelVersion> {
    let tmp = std::env::temp_dir().join(format!("flywheel-merge-{}.gguf", Uuid::new_v4()));
    let (base, adapter, out, note) = (
        base_path.to_path_buf(),
        lora.clone(),
        tmp.clone(),
        note.to_string(),
    );
    tokio::task::spawn_blocking(move || {
        flywheel_trainer::merge::merge_to_gguf(&base, &adapter, &out, &note)
    })
    .await
    .context("merging panicked")??;
    let cache = flywheel_modelhub::ModelCache::new(model_cache)?;
    let fetched = cache.import(&tmp, Some(name)).await;
    let _ = std::fs::remove_file(&tmp);
    let fetched = fetched?;
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
    flywheel_store::models::set_lineage(pool, v.id, lineage).await?;
    Ok(v)
}
