//! Cycles of the loop: one per team at a time, each the record of one turn
//! curate -> train -> evaluate -> canary -> promote or reject, with the wall
//! time of every stage. A stage moves on only from the stage it expects, so
//! a job retried after its cycle moved on changes nothing.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use crate::Result;

#[derive(Debug, Clone, PartialEq, serde::Serialize, sqlx::FromRow)]
pub struct Cycle {
    pub id: Uuid,
    pub team_id: Uuid,
    pub team: String,
    pub trigger: String,
    pub status: String,
    pub stage: String,
    pub stage_started_at: DateTime<Utc>,
    /// The stages behind it: `[{stage, started_at, finished_at, seconds, note}]`.
    pub stages: serde_json::Value,
    pub config: serde_json::Value,
    pub dataset_version_id: Option<Uuid>,
    pub training_run_id: Option<Uuid>,
    pub candidate_version_id: Option<Uuid>,
    pub evaluation_id: Option<Uuid>,
    pub canary_id: Option<Uuid>,
    pub decision_id: Option<Uuid>,
    pub reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

const COLUMNS: &str = "c.id, c.team_id, t.name as team, c.trigger, c.status, c.stage,
    c.stage_started_at, c.stages, c.config, c.dataset_version_id, c.training_run_id,
    c.candidate_version_id, c.evaluation_id, c.canary_id, c.decision_id, c.reason,
    c.created_at, c.finished_at";

/// Starts a cycle at its curation stage; `None` when the team already has
/// one running.
pub async fn start(
    ex: impl PgExecutor<'_>,
    team_id: Uuid,
    trigger: &str,
    config: &serde_json::Value,
) -> Result<Option<Uuid>> {
    Ok(sqlx::query_scalar(
        "insert into cycles (id, team_id, trigger, status, stage, config)
         values ($1, $2, $3, 'running', 'curate', $4)
         on conflict do nothing returning id",
    )
    .bind(Uuid::new_v4())
    .bind(team_id)
    .bind(trigger)
    .bind(config)
    .fetch_optional(ex)
    .await?)
}

pub async fn get(ex: impl PgExecutor<'_>, id: Uuid) -> Result<Option<Cycle>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {COLUMNS} from cycles c join teams t on t.id = c.team_id where c.id = $1"
    )))
    .bind(id)
    .fetch_optional(ex)
    .await?)
}

/// The newest cycles first, of one team or of all.
pub async fn list(
    ex: impl PgExecutor<'_>,
    team_id: Option<Uuid>,
    limit: i64,
) -> Result<Vec<Cycle>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {COLUMNS} from cycles c join teams t on t.id = c.team_id
         where $1::uuid is null or c.team_id = $1
         order by c.created_at desc, c.id limit $2"
    )))
    .bind(team_id)
    .bind(limit)
    .fetch_all(ex)
    .await?)
}

/// Teams with a running cycle.
pub async fn running_teams(ex: impl PgExecutor<'_>) -> Result<Vec<Uuid>> {
    Ok(
        sqlx::query_scalar("select team_id from cycles where status = 'running'")
            .fetch_all(ex)
            .await?,
    )
}

/// The running cycle a record belongs to: by its own id, its training
/// run, its evaluation or its canary.
#[derive(Debug, Clone, Copy)]
pub enum Link {
    Cycle(Uuid),
    Run(Uuid),
    Evaluation(Uuid),
    Canary(Uuid),
}

pub async fn running_for(ex: impl PgExecutor<'_>, link: Link) -> Result<Option<Uuid>> {
    let (column, id) = match link {
        Link::Cycle(id) => ("id", id),
        Link::Run(id) => ("training_run_id", id),
        Link::Evaluation(id) => ("evaluation_id", id),
        Link::Canary(id) => ("canary_id", id),
    };
    Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select id from cycles where {column} = $1 and status = 'running'"
    )))
    .bind(id)
    .fetch_optional(ex)
    .await?)
}

/// The stages behind with the current one appended, its wall time up to
/// now and its note (the statement's `$4`).
const BEHIND: &str = "stages || jsonb_build_array(jsonb_build_object(
    'stage', stage,
    'started_at', stage_started_at,
    'finished_at', now(),
    'seconds', round(extract(epoch from now() - stage_started_at)::numeric, 3),
    'note', $4::text))";

/// What a stage's end records on its cycle (unset fields stay as they are).
#[derive(Debug, Clone, Default)]
pub struct StageEnd<'a> {
    /// What happened in the stage, for the record (`"v3: 65 SFT, 61 DPO"`).
    pub note: &'a str,
    pub dataset_version_id: Option<Uuid>,
    pub training_run_id: Option<Uuid>,
    pub candidate_version_id: Option<Uuid>,
    pub evaluation_id: Option<Uuid>,
    pub canary_id: Option<Uuid>,
    pub decision_id: Option<Uuid>,
}

/// Ends stage `from` of a running cycle: it goes behind with its wall time,
/// and the cycle moves to `to` (`done` with `status` and `reason` when it
/// ends). False when the cycle was not running at `from` (a retried job
/// after the cycle moved on).
pub async fn advance(
    ex: impl PgExecutor<'_>,
    id: Uuid,
    from: &str,
    to: &str,
    end: &StageEnd<'_>,
    outcome: Option<(&str, &str)>,
) -> Result<bool> {
    let (status, reason) = match outcome {
        Some((status, reason)) => (status, Some(reason)),
        None => ("running", None),
    };
    let done = sqlx::query(sqlx::AssertSqlSafe(format!(
        "update cycles set
             stages = {BEHIND}, stage = $3, stage_started_at = now(), status = $5,
             reason = coalesce($6, reason),
             finished_at = case when $5 = 'running' then null else now() end,
             dataset_version_id = coalesce($7, dataset_version_id),
             training_run_id = coalesce($8, training_run_id),
             candidate_version_id = coalesce($9, candidate_version_id),
             evaluation_id = coalesce($10, evaluation_id),
             canary_id = coalesce($11, canary_id),
             decision_id = coalesce($12, decision_id)
         where id = $1 and stage = $2 and status = 'running'"
    )))
    .bind(id)
    .bind(from)
    .bind(to)
    .bind(end.note)
    .bind(status)
    .bind(reason)
    .bind(end.dataset_version_id)
    .bind(end.training_run_id)
    .bind(end.candidate_version_id)
    .bind(end.evaluation_id)
    .bind(end.canary_id)
    .bind(end.decision_id)
    .execute(ex)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Ends a running cycle in whatever stage it is, as `failed` with why
/// (its stage's job gave up). False when it was not running.
pub async fn fail(ex: impl PgExecutor<'_>, id: Uuid, reason: &str) -> Result<bool> {
    let done = sqlx::query(sqlx::AssertSqlSafe(format!(
        "update cycles set
             stages = {BEHIND}, stage = 'done', stage_started_at = now(), status = $3,
             reason = $2, finished_at = now()
         where id = $1 and status = 'running'"
    )))
    .bind(id)
    .bind(reason)
    .bind("failed")
    .bind("failed")
    .execute(ex)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// [`advance`] on the running cycle `link` belongs to, in the caller's
/// transaction (the one recording the stage's outcome). False when no
/// running cycle is linked (a person's own run or evaluation).
pub async fn advance_linked(
    conn: &mut sqlx::PgConnection,
    link: Link,
    from: &str,
    to: &str,
    end: &StageEnd<'_>,
    outcome: Option<(&str, &str)>,
) -> Result<bool> {
    match running_for(&mut *conn, link).await? {
        Some(id) => advance(&mut *conn, id, from, to, end, outcome).await,
        None => Ok(false),
    }
}

/// [`fail`] on the running cycle `link` belongs to; its id when there was one.
pub async fn fail_linked(pool: &sqlx::PgPool, link: Link, reason: &str) -> Result<Option<Uuid>> {
    match running_for(pool, link).await? {
        Some(id) if fail(pool, id, reason).await? => Ok(Some(id)),
        _ => Ok(None),
    }
}
