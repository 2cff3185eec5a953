//! A cycle from start to end: each stage's job reports here what happened
//! ([`curated`], [`trained`], [`evaluated`], [`gave_up`]), the loop picks
//! the move ([`crate::machine`] applies it) and puts the next stage's job on
//! the queue through [`Queue`], in the transaction that moves the cycle, so
//! the next job exists exactly when the move commits.
//!
//! A candidate is trained from the team's base model on the whole dataset,
//! not from the last candidate: continuing from the previous candidate
//! learned nothing in cycles 2 and 3 of the measurement that opened this
//! work (docs/flywheel.md), and an adapter on the base is what the gateway
//! serves without a second copy of the weights.

use flywheel_eval::Policy;
use flywheel_store::cycles::{self, Link, Stage, StageEnd, Status, Trigger};
use flywheel_store::datasets::DatasetVersion;
use flywheel_store::decisions::DecisionKind;
use flywheel_store::evals::{self, Evaluation, NewEvaluation};
use flywheel_store::models::ModelVersion;
use flywheel_store::sqlx::PgConnection;
use flywheel_store::training::TrainingRun;
use flywheel_store::{PgPool, Postgres, StoreError, Transaction};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::decide::{self, Why};
use crate::evidence::{self, Judgeable, Needs};
use crate::machine::{self, Move, Transition};
use crate::{LOOP_ACTOR, LoopError, Result};

/// What a cycle runs with; stored on the cycle when it starts, so each
/// record says how it was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoopConfig {
    /// The dataset version must hold at least this many examples more than
    /// the version the team's last run trained on, or the cycle ends
    /// skipped after curation.
    pub min_new_examples: i64,
    /// The held-out evidence the gate needs before training is worth it.
    pub needs: Needs,
    /// What the worker runs the stages with (curation rules, the training
    /// spec, attempts): the [`Queue`] reads it; the loop keeps it with the
    /// cycle.
    pub work: serde_json::Value,
}

/// An error of the queue behind [`Queue`].
pub type QueueError = Box<dyn std::error::Error + Send + Sync>;

/// How the loop puts a stage's job on the queue, inside the transaction
/// that moves the cycle. The worker implements it; `work` is the cycle's
/// [`LoopConfig::work`].
pub trait Queue: Sync {
    /// Queues the curation of `team`'s feedback for `cycle`.
    fn curate(
        &self,
        conn: &mut PgConnection,
        team: Uuid,
        cycle: Uuid,
        work: &serde_json::Value,
    ) -> impl Future<Output = Result<(), QueueError>> + Send;

    /// Queues a training run on `dataset` from `base`; returns the run's id.
    fn train(
        &self,
        conn: &mut PgConnection,
        dataset: &DatasetVersion,
        base: &ModelVersion,
        work: &serde_json::Value,
    ) -> impl Future<Output = Result<Uuid, QueueError>> + Send;

    /// Queues evaluation `evaluation` (created by the loop), whose verdict
    /// the loop acts on ([`evaluated`]).
    fn evaluate(
        &self,
        conn: &mut PgConnection,
        evaluation: Uuid,
    ) -> impl Future<Output = Result<(), QueueError>> + Send;
}

/// Starts a cycle for `team` and queues its curation, in `tx`. `None` when
/// the team already has one running.
pub async fn start_in(
    tx: &mut Transaction<'_, Postgres>,
    queue: &impl Queue,
    team: Uuid,
    trigger: Trigger,
    cfg: &LoopConfig,
) -> Result<Option<Uuid>> {
    let config = serde_json::to_value(cfg)?;
    let Some(id) = cycles::start(&mut **tx, team, trigger, &config).await? else {
        return Ok(None);
    };
    queue
        .curate(tx, team, id, &cfg.work)
        .await
        .map_err(LoopError::Queue)?;
    Ok(Some(id))
}

/// [`start_in`] in its own transaction.
pub async fn start(
    pool: &PgPool,
    queue: &impl Queue,
    team: Uuid,
    trigger: Trigger,
    cfg: &LoopConfig,
) -> Result<Option<Uuid>> {
    let mut tx = pool.begin().await.map_err(StoreError::from)?;
    let id = start_in(&mut tx, queue, team, trigger, cfg).await?;
    tx.commit().await.map_err(StoreError::from)?;
    Ok(id)
}

/// The model a team's candidates are trained from: the base of its
/// champion (or the champion itself when it is a base).
pub async fn team_base(pool: &PgPool, team: Uuid) -> Result<ModelVersion> {
    let champion = flywheel_store::models::team_champion(pool, team)
        .await?
        .ok_or_else(|| {
            LoopError::Conflict(
                "the team has no champion (pull a model and make it champion)".into(),
            )
        })?;
    let base = flywheel_store::models::lineage(pool, champion.id)
        .await?
        .and_then(|l| l.base_version_id);
    match base {
        Some(id) => flywheel_store::models::get(pool, id)
            .await?
            .ok_or_else(|| LoopError::NotFound(format!("the base of {} is gone", champion.name))),
        None => Ok(champion),
    }
}

/// Curation for cycle `id` ended with dataset version `version` (`None`:
/// the team had no votes). The loop trains on it, or ends the cycle
/// skipped, saying why: no votes, too few new examples, another run on the
/// base, or too little held-out evidence for the gate (and how much more is
/// needed). `None` when the cycle was no longer curating.
pub async fn curated(
    pool: &PgPool,
    queue: &impl Queue,
    id: Uuid,
    version: Option<Uuid>,
) -> Result<Option<Transition>> {
    let Some(c) = cycles::get(pool, id).await? else {
        return Ok(None);
    };
    if c.status != Status::Running || c.stage != Stage::Curate {
        return Ok(None);
    }
    let cfg: LoopConfig = serde_json::from_value(c.config.clone())?;
    let skip = |note: String, reason: String, version: Option<Uuid>| async move {
        let mut conn = pool.acquire().await.map_err(StoreError::from)?;
        let end = StageEnd {
            note: &note,
            dataset_version_id: version,
            ..Default::default()
        };
        let t = machine::apply(
            &mut conn,
            id,
            Stage::Curate,
            Move::Skip,
            &end,
            Some(&reason),
        )
        .await?;
        tracing::info!(cycle = %id, %reason, "cycle skipped");
        Ok::<_, LoopError>(t)
    };
    let Some(version_id) = version else {
        return skip(
            "no votes".into(),
            "the team has no feedback yet".into(),
            None,
        )
        .await;
    };
    let v = flywheel_store::datasets::get(pool, version_id)
        .await?
        .ok_or_else(|| LoopError::NotFound("the dataset version is gone".into()))?;
    let counts = flywheel_store::datasets::evidence_counts(pool, v.id).await?;
    let note = format!(
        "dataset v{}: {} SFT ({} corrections), {} DPO, {} KTO; held out: {} corrections, {} pairs, {} votes",
        v.version,
        v.sft_count,
        counts.corrections,
        v.dpo_count,
        v.kto_count,
        counts.eval_corrections,
        counts.eval_pairs,
        counts.eval_votes,
    );
    if let Some(champion) = flywheel_store::models::team_champion(pool, c.team_id).await?
        && champion.is_upstream()
    {
        let reason = format!(
            "the team's champion {} is served by an upstream, and the loop fine-tunes weights \
             it holds: distil it into a model served here (flywheel distill) and make that the \
             team's champion",
            champion.name
        );
        return skip(note, reason, Some(v.id)).await;
    }
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
        return skip(note, reason, Some(v.id)).await;
    }
    let suites = evals::team_suites(pool, c.team_id).await?.len();
    if let Judgeable::No(reason) = evidence::judgeable(&counts, suites, &cfg.needs) {
        return skip(note, reason, Some(v.id)).await;
    }
    let base = team_base(pool, c.team_id).await?;
    if flywheel_store::training::active_on_base(pool, base.id).await? {
        let reason = format!(
            "a training run on {} is already queued or running; a later slot tries again",
            base.name
        );
        return skip(note, reason, Some(v.id)).await;
    }
    let mut tx = pool.begin().await.map_err(StoreError::from)?;
    let run = queue
        .train(&mut tx, &v, &base, &cfg.work)
        .await
        .map_err(LoopError::Queue)?;
    let end = StageEnd {
        note: &note,
        dataset_version_id: Some(v.id),
        training_run_id: Some(run),
        ..Default::default()
    };
    let t = machine::apply(&mut tx, id, Stage::Curate, Move::Train, &end, None).await?;
    tx.commit().await.map_err(StoreError::from)?;
    tracing::info!(cycle = %id, %run, base = base.name, "cycle training");
    Ok(t)
}

/// Training run `run` left `candidate`: every candidate of a team's
/// dataset is evaluated against the team's champion, and the loop acts on
/// the verdict. The evaluation is queued and the run's cycle, if any, moves
/// to it. Returns the evaluation's id (`None` for a run on a shared
/// dataset, which no single team's champion can judge).
pub async fn trained(
    pool: &PgPool,
    queue: &impl Queue,
    run: &TrainingRun,
    candidate: &ModelVersion,
    note: &str,
) -> Result<Option<Uuid>> {
    let dataset = flywheel_store::datasets::get(pool, run.dataset_version_id).await?;
    let Some(team) = dataset.and_then(|d| d.team_id) else {
        return Ok(None);
    };
    let champion = flywheel_store::models::team_champion(pool, team)
        .await?
        .ok_or_else(|| LoopError::Conflict("the team has no champion".into()))?;
    let mut tx = pool.begin().await.map_err(StoreError::from)?;
    let evaluation = evals::create(
        &mut *tx,
        &NewEvaluation {
            team_id: Some(team),
            candidate_version_id: candidate.id,
            champion_version_id: champion.id,
            dataset_version_id: Some(run.dataset_version_id),
            training_run_id: Some(run.id),
        },
    )
    .await?;
    queue
        .evaluate(&mut tx, evaluation)
        .await
        .map_err(LoopError::Queue)?;
    if let Some(c) = cycles::running_for(&mut *tx, Link::Run(run.id)).await? {
        let end = StageEnd {
            note,
            candidate_version_id: Some(candidate.id),
            evaluation_id: Some(evaluation),
            ..Default::default()
        };
        machine::apply(&mut tx, c.id, Stage::Train, Move::Evaluate, &end, None).await?;
    }
    tx.commit().await.map_err(StoreError::from)?;
    tracing::info!(%evaluation, candidate = candidate.name, "evaluation queued");
    Ok(Some(evaluation))
}

/// The loop's move after evaluation `e` of a team's candidate: a canary (or
/// a promotion, with no canary configured) for one that passed the gate, a
/// rejection on record for one that did not. Returns the decision made.
pub async fn evaluated(
    pool: &PgPool,
    policy: &Policy,
    e: &Evaluation,
    passed: bool,
    reasons: &[String],
) -> Result<Option<DecisionKind>> {
    let Some(team) = e.team_id else {
        return Ok(None);
    };
    let candidate = flywheel_store::models::get(pool, e.candidate_version_id)
        .await?
        .ok_or_else(|| LoopError::NotFound("the candidate is gone".into()))?;
    let evidence = serde_json::json!({
        "evaluation": e.id,
        "metrics": evals::metrics(pool, e.id).await?,
        "reasons": reasons,
    });
    let summary = reasons.join("; ");
    let verdict = if passed {
        "passed the offline gate"
    } else {
        "failed the offline gate"
    };
    let reason = format!("{verdict}: {summary}");
    let why = Why {
        reason: &reason,
        evidence,
        actor: LOOP_ACTOR,
        evaluation_id: Some(e.id),
        canary_id: None,
    };
    let kind = if !passed {
        decide::reject(pool, team, candidate.id, e.champion_version_id, why).await?;
        DecisionKind::Reject
    } else if policy.canary_share > 0.0 {
        let (share, hours) = (policy.canary_share, policy.canary_deadline_hours);
        decide::start_canary(pool, team, &candidate, share, hours, why).await?;
        DecisionKind::CanaryStarted
    } else {
        decide::promote(pool, team, &candidate, DecisionKind::Promote, why).await?;
        DecisionKind::Promote
    };
    Ok(Some(kind))
}

/// The job of the running cycle `link` names gave up after its attempts
/// (or its run was cancelled): the cycle ends `failed` with `reason`,
/// whatever stage it was at. Its id when there was one.
pub async fn gave_up(pool: &PgPool, link: Link, reason: &str) -> Result<Option<Uuid>> {
    let mut conn = pool.acquire().await.map_err(StoreError::from)?;
    // A stage that moves on between the read and the move is read again.
    for _ in 0..3 {
        let Some(c) = cycles::running_for(&mut *conn, link).await? else {
            return Ok(None);
        };
        let end = StageEnd {
            note: reason,
            ..Default::default()
        };
        if machine::apply(&mut conn, c.id, c.stage, Move::Fail, &end, Some(reason))
            .await?
            .is_some()
        {
            tracing::warn!(cycle = %c.id, %reason, "cycle failed");
            return Ok(Some(c.id));
        }
    }
    Ok(None)
}
