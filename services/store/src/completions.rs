//! The completion log: every answer with the model version that made it.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use crate::Result;

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Completion {
    pub id: String,
    pub team_id: Uuid,
    pub model_version_id: Uuid,
    pub end_user: Option<String>,
    pub request: serde_json::Value,
    pub output: String,
    pub finish_reason: String,
    pub prompt_tokens: i32,
    pub completion_tokens: i32,
    pub latency_ms: f64,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct NewCompletion {
    pub id: String,
    pub team_id: Uuid,
    pub model_version_id: Uuid,
    pub end_user: Option<String>,
    pub request: serde_json::Value,
    pub output: String,
    pub finish_reason: String,
    pub prompt_tokens: i32,
    pub completion_tokens: i32,
    pub latency_ms: f64,
}

/// Stores a completion; storing the same id twice keeps the first.
pub async fn insert(ex: impl PgExecutor<'_>, c: &NewCompletion) -> Result<()> {
    sqlx::query(
        "insert into completions (id, team_id, model_version_id, end_user, request, output,
             finish_reason, prompt_tokens, completion_tokens, latency_ms)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         on conflict (id) do nothing",
    )
    .bind(&c.id)
    .bind(c.team_id)
    .bind(c.model_version_id)
    .bind(&c.end_user)
    .bind(&c.request)
    .bind(&c.output)
    .bind(&c.finish_reason)
    .bind(c.prompt_tokens)
    .bind(c.completion_tokens)
    .bind(c.latency_ms)
    .execute(ex)
    .await?;
    Ok(())
}

/// A team's own completion; other teams' ids are simply not found.
pub async fn get(ex: impl PgExecutor<'_>, team_id: Uuid, id: &str) -> Result<Option<Completion>> {
    Ok(sqlx::query_as(
        "select id, team_id, model_version_id, end_user, request, output, finish_reason,
                prompt_tokens, completion_tokens, latency_ms, created_at
         from completions where id = $1 and team_id = $2",
    )
    .bind(id)
    .bind(team_id)
    .fetch_optional(ex)
    .await?)
}

pub async fn count_for_team(ex: impl PgExecutor<'_>, team_id: Uuid) -> Result<i64> {
    Ok(
        sqlx::query_scalar("select count(*) from completions where team_id = $1")
            .bind(team_id)
            .fetch_one(ex)
            .await?,
    )
}
