//! The loop: a cycle turns one team's feedback into a decision with no
//! human step. Curate the team's feedback into a dataset version; train a
//! candidate when the version holds enough examples its last run did not
//! have; evaluate the candidate against the team's champion; then a canary
//! (or promotion on the offline evidence) for a winner, a rejection for the
//! rest; a canary ends promoted or rolled back by the live thumbs.
//!
//! Each stage is its own queued job, so a cycle survives restarts and a
//! training run waits for the one training slot a worker has. The cycle
//! record moves with each stage's outcome (in the same transaction as the
//! run, evaluation or decision that ends the stage), so `flywheel cycles`
//! shows where each cycle is and what each stage took.
//!
//! A candidate is trained from the team's base model on the whole dataset,
//! not from the last candidate: continuing from the previous candidate
//! learned nothing in cycles 2 and 3 of the measurement that opened this
//! work (docs/flywheel.md), and an adapter on the base is what the gateway
//! serves without a second copy of the weights.

use anyhow::Context;
use flywheel_curation::build::Rules;
use flywheel_store::cycles::{self, Cycle, Link, StageEnd};
use flywheel_store::datasets::Scope;
use flywheel_store::models::ModelVersion;
use flywheel_store::{PgPool, Postgres, Transaction};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::curate::{self, CurateJob};
use crate::queue;
use crate::train::{self, RunSpec};

/// What a cycle runs with; stored on the cycle when it starts, so each
/// record says how it was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoopConfig {
    /// The dataset version must hold at least this many examples more than
    /// the version the team's last run trained on, or the cycle ends
    /// skipped after curation.
    pub min_new_examples: i64,
    pub rules: Rules,
    pub spec: RunSpec,
    pub max_attempts: u32,
}

/// Starts a cycle for `team` (`trigger`: `schedule` or `manual`) and queues
/// its curation, in `tx`. `None` when the team already has one running.
pub async fn start_in(
    tx: &mut Transaction<'_, Postgres>,
    team: Uuid,
    trigger: &str,
    cfg: &LoopConfig,
) -> anyhow::Result<Option<Uuid>> {
    let Some(id) = cycles::start(&mut **tx, team, trigger, &serde_json::to_value(cfg)?).await?
    else {
        return Ok(None);
    };
    let job = CurateJob {
        scope: Scope::Team(team),
        rules: cfg.rules.clone(),
        until: None,
        cycle: Some(id),
    };
    queue::push(tx, queue::CURATION, &job, cfg.max_attempts).await?;
    Ok(Some(id))
}

/// [`start_in`] in its own transaction.
pub async fn start(
    pool: &PgPool,
    team: Uuid,
    trigger: &str,
    cfg: &LoopConfig,
) -> anyhow::Result<Option<Uuid>> {
    let mut tx = pool.begin().await?;
    let id = start_in(&mut tx, team, trigger, cfg).await?;
    tx.commit().await?;
    Ok(id)
}

/// The model a team's candidates are trained from: the base of its
/// champion (or the champion itself when it is a base).
pub async fn team_base(pool: &PgPool, team: Uuid) -> anyhow::Result<ModelVersion> {
    let champion = flywheel_store::models::team_champion(pool, team)
        .await?
        .context("the team has no champion (pull a model and make it champion)")?;
    let base = flywheel_store::models::lineage(pool, champion.id)
        .await?
        .and_then(|l| l.base_version_id);
    match base {
        Some(id) => Ok(flywheel_store::models::get(pool, id)
            .await?
            .with_context(|| format!("the base of {} is gone", champion.name))?),
        None => Ok(champion),
    }
}

/// The end of a cycle's curation: queues the training run (the cycle moves
/// to `train`) or ends the cycle skipped, saying why.
pub async fn curated(pool: &PgPool, id: Uuid, outcome: &curate::Outcome) -> anyhow::Result<()> {
    let Some(c) = cycles::get(pool, id).await? else {
        return Ok(());
    };
    if c.status != "running" || c.stage != "curate" {
        return Ok(());
    }
    let cfg: LoopConfig = serde_json::from_value(c.config.clone())?;
    let skip = |note: String, reason: String| async move {
        cycles::advance(
            pool,
            id,
            "curate",
            "done",
            &StageEnd {
                note: &note,
                dataset_version_id: outcome.version_id,
                ..Default::default()
            },
            Some(("skipped", &reason)),
        )
        .await?;
        tracing::info!(cycle = %id, %reason, "cycle skipped");
        anyhow::Ok(())
    };
    let Some(version_id) = outcome.version_id else {
        return skip("no votes".into(), "the team has no feedback yet".into()).await;
    };
    let v = flywheel_store::datasets::get(pool, version_id)
        .await?
        .context("the dataset version is gone")?;
    let note = format!(
        "dataset v{}: {} SFT, {} DPO, {} KTO",
        v.version, v.sft_count, v.dpo_count, v.kto_count
    );
    let examples = i64::from(v.sft_count + v.dpo_count + v.kto_count);
    let trained = flywheel_store::training::team_progress(pool)
        .await?
        .into_iter()
        .find(|p| p.team_id == c.team_id)
        .map_or(0, |p| p.trained_examples);
    if examples - trained < cfg.min_new_examples {
        let reason = format!(
            "{} new examples since the last run; {} needed",
            (examples - trained).max(0),
            cfg.min_new_examples
        );
        return skip(note, reason).await;
    }
    let base = team_base(pool, c.team_id).await?;
    if flywheel_store::training::active_on_base(pool, base.id).await? {
        let reason = format!(
            "a training run on {} is already queued or running; a later slot tries again",
            base.name
        );
        return skip(note, reason).await;
    }
    let mut spec = cfg.spec.clone();
    spec.train.objective = if v.sft_count > 0 {
        flywheel_trainer::Objective::Sft
    } else if v.dpo_count > 0 {
        flywheel_trainer::Objective::Dpo
    } else {
        flywheel_trainer::Objective::Kto
    };
    let mut tx = pool.begin().await?;
    let (run, _) = train::queue_run(&mut tx, v.id, base.id, &spec, cfg.max_attempts).await?;
    cycles::advance(
        &mut *tx,
        id,
        "curate",
        "train",
        &StageEnd {
            note: &note,
            dataset_version_id: Some(v.id),
            training_run_id: Some(run),
            ..Default::default()
        },
        None,
    )
    .await?;
    tx.commit().await?;
    tracing::info!(cycle = %id, %run, base = base.name, "cycle training");
    Ok(())
}

/// Ends the running cycle of `link` as failed (its stage's job gave up, or
/// its run was cancelled).
pub async fn failed(pool: &PgPool, link: Link, reason: &str) -> anyhow::Result<()> {
    if let Some(id) = cycles::fail_linked(pool, link, reason).await? {
        tracing::warn!(cycle = %id, %reason, "cycle failed");
    }
    Ok(())
}

/// Seconds each stage took, in order (for `flywheel cycles`).
pub fn stage_seconds(c: &Cycle) -> Vec<(String, f64)> {
    c.stages
        .as_array()
        .map(|stages| {
            stages
                .iter()
                .map(|s| {
                    (
                        s["stage"].as_str().unwrap_or("?").to_string(),
                        s["seconds"].as_f64().unwrap_or(0.0),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}
