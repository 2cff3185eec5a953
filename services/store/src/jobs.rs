//! The history of background jobs (one row per attempt), schedule slots that
//! fire once across workers, and the few reads and writes Flywheel makes on
//! apalis's own queue table (schema `apalis`).

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;

use crate::Result;

/// Records that an attempt started; returns the run's id.
pub async fn run_started(
    ex: impl PgExecutor<'_>,
    task_id: &str,
    kind: &str,
    attempt: i32,
    worker: &str,
    args: &serde_json::Value,
) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "insert into job_runs (task_id, kind, attempt, worker, status, args)
         values ($1, $2, $3, $4, 'running', $5) returning id",
    )
    .bind(task_id)
    .bind(kind)
    .bind(attempt)
    .bind(worker)
    .bind(args)
    .fetch_one(ex)
    .await?)
}

/// Records how an attempt ended: a result, or the error that failed it.
pub async fn run_finished(
    ex: impl PgExecutor<'_>,
    run_id: i64,
    outcome: std::result::Result<&serde_json::Value, &str>,
) -> Result<()> {
    let (status, result, error) = match outcome {
        Ok(v) => ("succeeded", Some(v), None),
        Err(e) => ("failed", None, Some(e)),
    };
    sqlx::query(
        "update job_runs set status = $2, result = $3, error = $4, finished_at = now()
         where id = $1",
    )
    .bind(run_id)
    .bind(status)
    .bind(result)
    .bind(error)
    .execute(ex)
    .await?;
    Ok(())
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, sqlx::FromRow)]
pub struct JobRun {
    pub id: i64,
    pub task_id: String,
    pub kind: String,
    pub attempt: i32,
    pub worker: String,
    pub status: String,
    pub args: serde_json::Value,
    pub result: Option<serde_json::Value>,
    pub error: Option<String>,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// Every attempt of one task, first first.
pub async fn runs_of(ex: impl PgExecutor<'_>, task_id: &str) -> Result<Vec<JobRun>> {
    Ok(sqlx::query_as(
        "select id, task_id, kind, attempt, worker, status, args, result, error, started_at,
                finished_at
         from job_runs where task_id = $1 order by id",
    )
    .bind(task_id)
    .fetch_all(ex)
    .await?)
}

/// The most recent attempts of any job, newest first.
pub async fn recent_runs(ex: impl PgExecutor<'_>, limit: i64) -> Result<Vec<JobRun>> {
    Ok(sqlx::query_as(
        "select id, task_id, kind, attempt, worker, status, args, result, error, started_at,
                finished_at
         from job_runs order by id desc limit $1",
    )
    .bind(limit)
    .fetch_all(ex)
    .await?)
}

/// Claims one slot of a schedule; true for exactly one caller per slot.
pub async fn claim_tick(
    ex: impl PgExecutor<'_>,
    schedule: &str,
    slot: DateTime<Utc>,
) -> Result<bool> {
    Ok(sqlx::query(
        "insert into schedule_ticks (schedule, slot) values ($1, $2) on conflict do nothing",
    )
    .bind(schedule)
    .bind(slot)
    .execute(ex)
    .await?
    .rows_affected()
        == 1)
}

/// Holds a failed task back for `delay`: apalis fetches failed tasks again
/// as soon as their `run_at` has passed, so this is where backoff lives, and
/// it survives a worker restart.
pub async fn delay_task(
    ex: impl PgExecutor<'_>,
    task_id: &str,
    delay: std::time::Duration,
) -> Result<()> {
    sqlx::query("update apalis.jobs set run_at = now() + make_interval(secs => $2) where id = $1")
        .bind(task_id)
        .bind(delay.as_secs_f64())
        .execute(ex)
        .await?;
    Ok(())
}

/// A queued task's state as apalis keeps it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct TaskState {
    pub status: String,
    pub attempts: i32,
    pub max_attempts: i32,
    pub last_result: Option<serde_json::Value>,
}

pub async fn task_state(ex: impl PgExecutor<'_>, task_id: &str) -> Result<Option<TaskState>> {
    Ok(sqlx::query_as(
        "select status, attempts, max_attempts, last_result from apalis.jobs where id = $1",
    )
    .bind(task_id)
    .fetch_optional(ex)
    .await?)
}
