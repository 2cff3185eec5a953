//! Training runs and their per-step records.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use crate::{Result, StoreError};

/// Where a training run is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, sqlx::Type)]
#[serde(rename_all = "lowercase")]
#[sqlx(type_name = "text", rename_all = "lowercase")]
pub enum RunStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// Whether the run is over (nothing will change it again).
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for RunStatus {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, sqlx::FromRow)]
pub struct TrainingRun {
    pub id: Uuid,
    pub dataset_version_id: Uuid,
    pub base_version_id: Uuid,
    pub objective: String,
    pub config: serde_json::Value,
    pub status: RunStatus,
    pub step: i32,
    pub total_steps: i32,
    pub checkpoint_step: Option<i32>,
    pub checkpoint_path: Option<String>,
    pub cancel_requested: bool,
    pub candidate_version_id: Option<Uuid>,
    pub eval_loss_before: Option<f64>,
    pub eval_loss_after: Option<f64>,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Throughput over the steps recorded: tokens trained on per second of
    /// step time (None before the first step, or for an external trainer).
    pub tokens_per_second: Option<f64>,
}

macro_rules! run_columns {
    () => {
        "id, dataset_version_id, base_version_id, objective, config, status, step, total_steps,
         checkpoint_step, checkpoint_path, cancel_requested, candidate_version_id,
         eval_loss_before, eval_loss_after, error, created_at, started_at, finished_at,
         (select sum(s.tokens) / nullif(sum(s.seconds), 0) from training_steps s
           where s.run_id = training_runs.id) as tokens_per_second"
    };
}

/// Creates a queued run; a conflict when the base already has one active.
pub async fn create(
    ex: impl PgExecutor<'_>,
    dataset_version_id: Uuid,
    base_version_id: Uuid,
    objective: &str,
    config: &serde_json::Value,
    total_steps: i32,
) -> Result<Uuid> {
    let id = Uuid::new_v4();
    let done = sqlx::query(
        "insert into training_runs (id, dataset_version_id, base_version_id, objective, config,
             status, total_steps)
         values ($1, $2, $3, $4, $5, 'queued', $6)
         on conflict do nothing",
    )
    .bind(id)
    .bind(dataset_version_id)
    .bind(base_version_id)
    .bind(objective)
    .bind(config)
    .bind(total_steps)
    .execute(ex)
    .await?;
    if done.rows_affected() == 0 {
        return Err(StoreError::Conflict(
            "a training run on this base model is already queued or running".into(),
        ));
    }
    Ok(id)
}

pub async fn get(ex: impl PgExecutor<'_>, id: Uuid) -> Result<Option<TrainingRun>> {
    Ok(sqlx::query_as(concat!(
        "select ",
        run_columns!(),
        " from training_runs where id = $1"
    ))
    .bind(id)
    .fetch_optional(ex)
    .await?)
}

pub async fn list(ex: impl PgExecutor<'_>, limit: i64) -> Result<Vec<TrainingRun>> {
    Ok(sqlx::query_as(concat!(
        "select ",
        run_columns!(),
        " from training_runs order by created_at desc limit $1"
    ))
    .bind(limit)
    .fetch_all(ex)
    .await?)
}

/// Marks a run running (again, when resumed).
pub async fn start(ex: impl PgExecutor<'_>, id: Uuid) -> Result<()> {
    sqlx::query(
        "update training_runs set status = 'running', started_at = coalesce(started_at, now()),
             error = null
         where id = $1",
    )
    .bind(id)
    .execute(ex)
    .await?;
    Ok(())
}

/// One optimizer step of a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NewStep {
    pub step: i32,
    pub loss: f64,
    pub learning_rate: f64,
    pub grad_norm: f64,
    pub tokens: i32,
    pub seconds: f64,
}

/// One step's record; writing a step again (after a resume) replaces it.
pub async fn record_step(ex: impl PgExecutor<'_>, id: Uuid, s: &NewStep) -> Result<bool> {
    // Returns whether a cancel was requested, so the loop needs one query.
    Ok(sqlx::query_scalar(
        "with s as (
             insert into training_steps (run_id, step, loss, learning_rate, grad_norm, tokens,
                 seconds)
             values ($1, $2, $3, $4, $5, $6, $7)
             on conflict (run_id, step) do update set loss = excluded.loss,
                 learning_rate = excluded.learning_rate, grad_norm = excluded.grad_norm,
                 tokens = excluded.tokens, seconds = excluded.seconds
         )
         update training_runs set step = $2 where id = $1 returning cancel_requested",
    )
    .bind(id)
    .bind(s.step)
    .bind(s.loss)
    .bind(s.learning_rate)
    .bind(s.grad_norm)
    .bind(s.tokens)
    .bind(s.seconds)
    .fetch_one(ex)
    .await?)
}

pub async fn checkpoint(ex: impl PgExecutor<'_>, id: Uuid, step: i32, path: &str) -> Result<()> {
    sqlx::query(
        "update training_runs set checkpoint_step = $2, checkpoint_path = $3 where id = $1",
    )
    .bind(id)
    .bind(step)
    .bind(path)
    .execute(ex)
    .await?;
    Ok(())
}

pub async fn set_eval_before(ex: impl PgExecutor<'_>, id: Uuid, loss: f64) -> Result<()> {
    sqlx::query(
        "update training_runs set eval_loss_before = coalesce(eval_loss_before, $2) where id = $1",
    )
    .bind(id)
    .bind(loss)
    .execute(ex)
    .await?;
    Ok(())
}

/// Ends a run: `Succeeded` (with its candidate and held-out loss),
/// `Failed` (with the error) or `Cancelled`.
pub async fn finish(
    ex: impl PgExecutor<'_>,
    id: Uuid,
    status: RunStatus,
    candidate: Option<Uuid>,
    eval_loss_after: Option<f64>,
    error: Option<&str>,
) -> Result<()> {
    sqlx::query(
        "update training_runs set status = $2, candidate_version_id = $3, eval_loss_after = $4,
             error = $5, finished_at = now()
         where id = $1",
    )
    .bind(id)
    .bind(status)
    .bind(candidate)
    .bind(eval_loss_after)
    .bind(error)
    .execute(ex)
    .await?;
    Ok(())
}

/// Asks a run to stop at its next step; a queued run is cancelled at once.
/// False if the run is already over.
pub async fn request_cancel(ex: impl PgExecutor<'_>, id: Uuid) -> Result<bool> {
    Ok(sqlx::query(
        "update training_runs set cancel_requested = true,
             status = case when status = 'queued' then 'cancelled' else status end,
             finished_at = case when status = 'queued' then now() else finished_at end
         where id = $1 and status in ('queued', 'running')",
    )
    .bind(id)
    .execute(ex)
    .await?
    .rows_affected()
        == 1)
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, sqlx::FromRow)]
pub struct StepRow {
    pub step: i32,
    pub loss: f64,
    pub learning_rate: f64,
}

pub async fn steps(ex: impl PgExecutor<'_>, id: Uuid) -> Result<Vec<StepRow>> {
    Ok(sqlx::query_as(
        "select step, loss, learning_rate from training_steps where run_id = $1 order by step",
    )
    .bind(id)
    .fetch_all(ex)
    .await?)
}

/// Each team's newest dataset version with its example count, and the
/// example count of the dataset version its last training run used (0 when
/// it has none): what the training trigger compares.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct TeamProgress {
    pub team_id: Uuid,
    pub latest_version_id: Uuid,
    pub latest_examples: i64,
    pub trained_examples: i64,
}

pub async fn team_progress(ex: impl PgExecutor<'_>) -> Result<Vec<TeamProgress>> {
    Ok(sqlx::query_as(
        "with latest as (
             select distinct on (team_id) team_id, id,
                 (sft_count + dpo_count + kto_count)::bigint as examples
             from dataset_versions where team_id is not null
             order by team_id, version desc
         ), trained as (
             select distinct on (d.team_id) d.team_id,
                 (d.sft_count + d.dpo_count + d.kto_count)::bigint as examples
             from training_runs r join dataset_versions d on d.id = r.dataset_version_id
             where d.team_id is not null and r.status <> 'cancelled'
             order by d.team_id, r.created_at desc
         )
         select l.team_id, l.id as latest_version_id, l.examples as latest_examples,
                coalesce(t.examples, 0) as trained_examples
         from latest l left join trained t on t.team_id = l.team_id
         order by l.team_id",
    )
    .fetch_all(ex)
    .await?)
}

/// Whether a base model has a queued or running run.
pub async fn active_on_base(ex: impl PgExecutor<'_>, base_version_id: Uuid) -> Result<bool> {
    Ok(sqlx::query_scalar(
        "select exists(select 1 from training_runs
                       where base_version_id = $1 and status in ('queued', 'running'))",
    )
    .bind(base_version_id)
    .fetch_one(ex)
    .await?)
}
