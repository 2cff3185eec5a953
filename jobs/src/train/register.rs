//! From an adapter to a candidate model version: merged into its base as a
//! Q8_0 GGUF, kept in the model cache and in the artifact store
//! (`models/<sha256>.gguf`, the version's source, so a gateway on another
//! machine can fetch it), registered with its lineage. Every way a candidate
//! appears (a run, `train --register`, `models import-adapter`) goes through
//! [`register_candidate`]; a run's end goes through [`conclude`].

use std::path::{Path, PathBuf};

use anyhow::Context;
use flywheel_store::PgPool;
use flywheel_store::models::{Lineage, ModelVersion};
use flywheel_store::training::{self, RunStatus};
use flywheel_trainer::{Base, Lora, Trainer};
use uuid::Uuid;

use super::backend::{RunContext, Trained};
use super::data::load_examples;
use super::spec::{RunOutcome, RunSpec, run_key};
use flywheel_modelhub::Artifacts;

/// A candidate to register.
pub struct Candidate<'a> {
    /// The base model's GGUF file.
    pub base_path: &'a Path,
    pub lora: &'a Lora,
    pub name: &'a str,
    /// Goes into the merged file's metadata.
    pub note: &'a str,
    pub lineage: &'a Lineage,
}

/// Merges the candidate's adapter into its base and registers the result.
pub async fn register_candidate(
    pool: &PgPool,
    artifacts: &Artifacts,
    model_cache: &Path,
    c: &Candidate<'_>,
) -> anyhow::Result<ModelVersion> {
    let tmp = std::env::temp_dir().join(format!("flywheel-merge-{}.gguf", Uuid::new_v4()));
    let (base, adapter, out, note) = (
        c.base_path.to_path_buf(),
        c.lora.clone(),
        tmp.clone(),
        c.note.to_string(),
    );
    tokio::task::spawn_blocking(move || {
        flywheel_trainer::merge::merge_to_gguf(&base, &adapter, &out, &note)
    })
    .await
    .context("merging panicked")??;
    let cache = flywheel_modelhub::ModelCache::new(model_cache)?;
    let fetched = cache.import(&tmp, Some(c.name)).await;
    let _ = std::fs::remove_file(&tmp);
    let fetched = fetched?;
    let key = format!("models/{}.gguf", fetched.sha256);
    if !artifacts.exists(&key).await? {
        artifacts.put_file(&key, &fetched.path).await?;
    }
    let v = flywheel_store::models::register(
        pool,
        &flywheel_store::models::NewModelVersion {
            name: fetched.name.clone(),
            source: artifacts.url(&key),
            sha256: fetched.sha256.clone(),
            format: fetched.format.clone(),
            path: fetched.path.display().to_string(),
            size_bytes: fetched.size_bytes as i64,
            context_length: flywheel_model::context_length(&fetched.path),
        },
    )
    .await?;
    flywheel_store::models::set_lineage(pool, v.id, c.lineage).await?;
    Ok(v)
}

/// Mean loss of `lora` (or the base, with a fresh adapter) on `eval`.
fn eval_loss(
    base: &Base,
    lora: Lora,
    spec: &RunSpec,
    eval: &[flywheel_trainer::Example],
) -> anyhow::Result<f64> {
    if eval.is_empty() {
        return Ok(0.0);
    }
    let mut t = Trainer::new(&base.model, lora, spec.train.clone(), eval.to_vec())?;
    t.evaluate(eval)
}

/// An adapter a trainer outside this process returned: it must be a LoRA
/// adapter for this base; its held-out loss (and the base's) is measured
/// here. Returns the adapter and the losses before and after.
async fn check_returned(ctx: &RunContext<'_>, dir: PathBuf) -> anyhow::Result<(Lora, f64, f64)> {
    let (path, spec, rows) = (
        PathBuf::from(&ctx.base.path),
        ctx.spec.clone(),
        ctx.rows.to_vec(),
    );
    tokio::task::spawn_blocking(move || {
        let base = Base::load(&path)?;
        let lora = flywheel_trainer::peft::load(&base.model, &dir)
            .context("the external trainer did not leave a usable PEFT adapter")?;
        let (_, eval_set) = load_examples(&base, spec.train.objective, rows, spec.train.max_len)?;
        let fresh = Lora::new(&base.model, spec.lora.clone())?;
        let before = eval_loss(&base, fresh, &spec, &eval_set)?;
        let after = eval_loss(&base, lora.clone(), &spec, &eval_set)?;
        anyhow::Ok((lora, before, after))
    })
    .await
    .context("evaluating the returned adapter panicked")?
}

/// Ends a trained run: the adapter goes to the artifact store, is merged
/// and registered as a candidate with its lineage, and the run records its
/// held-out loss and succeeds.
pub async fn conclude(ctx: &RunContext<'_>, trained: Trained) -> anyhow::Result<RunOutcome> {
    let (pool, env, run, base) = (ctx.pool, ctx.env, ctx.run, ctx.base);
    let Trained::Adapter {
        dir,
        measured,
        resumed_from,
    } = trained
    else {
        anyhow::bail!("a cancelled run has no candidate");
    };
    let (lora, eval_after) = match measured {
        Some(m) => m,
        None => {
            let (lora, before, after) = check_returned(ctx, dir.clone()).await?;
            training::set_eval_before(pool, run.id, before).await?;
            let last = training::NewStep {
                step: run.total_steps,
                loss: after,
                learning_rate: 0.0,
                grad_norm: 0.0,
                tokens: 0,
                seconds: 0.0,
            };
            training::record_step(pool, run.id, &last).await?;
            (lora, after)
        }
    };
    let note = format!(
        "LoRA from dataset version {} on {} (run {})",
        run.dataset_version_id, base.name, run.id
    );
    let name = format!("{}-ft-{}", base.name, &run.id.simple().to_string()[..8]);
    let key = run_key(run.id, "adapter");
    env.artifacts.put_dir(&key, &dir).await?;
    let lineage = Lineage {
        base_version_id: Some(base.id),
        dataset_version_id: Some(run.dataset_version_id),
        adapter_path: Some(env.artifacts.url(&key)),
        training: Some(serde_json::json!({"run": run.id})),
    };
    let candidate = register_candidate(
        pool,
        &env.artifacts,
        &env.model_cache,
        &Candidate {
            base_path: Path::new(&base.path),
            lora: &lora,
            name: &name,
            note: &note,
            lineage: &lineage,
        },
    )
    .await?
    .id;
    // A candidate serves the team whose feedback trained it (or the teams
    // that pool feedback, for a shared dataset).
    let dataset = flywheel_store::datasets::get(pool, run.dataset_version_id).await?;
    let team = dataset.as_ref().and_then(|d| d.team_id);
    flywheel_store::models::set_scope(pool, candidate, team, team.is_none()).await?;
    let before = training::get(pool, run.id)
        .await?
        .and_then(|r| r.eval_loss_before);
    training::finish(
        pool,
        run.id,
        RunStatus::Succeeded,
        Some(candidate),
        Some(eval_after),
        None,
    )
    .await?;
    Ok(RunOutcome {
        status: RunStatus::Succeeded,
        resumed_from,
        steps: run.total_steps,
        candidate: Some(name),
        eval_loss_before: before,
        eval_loss_after: Some(eval_after),
        evaluation: None,
    })
}
