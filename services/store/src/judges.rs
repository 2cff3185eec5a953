//! Each team's judge: the model version asked, in an evaluation, which of
//! the candidate's and the champion's answers is better, with the prompt it
//! is asked with and the bar its agreement with the team's users must clear.

use sqlx::PgExecutor;
use uuid::Uuid;

use crate::Result;

#[derive(Debug, Clone, PartialEq, serde::Serialize, sqlx::FromRow)]
pub struct Judge {
    pub team_id: Uuid,
    pub model_version_id: Uuid,
    pub prompt: String,
    pub bar: f64,
    pub budget_tokens: Option<i64>,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// A judge as listed: its team's and version's names.
#[derive(Debug, Clone, PartialEq, serde::Serialize, sqlx::FromRow)]
pub struct Listed {
    pub team: String,
    pub version: String,
    pub bar: f64,
    pub budget_tokens: Option<i64>,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// Makes `version` the team's judge, replacing the one it had.
pub async fn set(
    ex: impl PgExecutor<'_>,
    team: Uuid,
    version: Uuid,
    prompt: &str,
    bar: f64,
    budget_tokens: Option<i64>,
) -> Result<()> {
    sqlx::query(
        "insert into judges (team_id, model_version_id, prompt, bar, budget_tokens)
         values ($1, $2, $3, $4, $5)
         on conflict (team_id) do update set model_version_id = $2, prompt = $3, bar = $4,
             budget_tokens = $5, created_at = now()",
    )
    .bind(team)
    .bind(version)
    .bind(prompt)
    .bind(bar)
    .bind(budget_tokens)
    .execute(ex)
    .await?;
    Ok(())
}

pub async fn get(ex: impl PgExecutor<'_>, team: Uuid) -> Result<Option<Judge>> {
    Ok(sqlx::query_as(
        "select team_id, model_version_id, prompt, bar, budget_tokens, created_at
         from judges where team_id = $1",
    )
    .bind(team)
    .fetch_optional(ex)
    .await?)
}

/// Whether the team had a judge.
pub async fn remove(ex: impl PgExecutor<'_>, team: Uuid) -> Result<bool> {
    let r = sqlx::query("delete from judges where team_id = $1")
        .bind(team)
        .execute(ex)
        .await?;
    Ok(r.rows_affected() > 0)
}

pub async fn list(ex: impl PgExecutor<'_>) -> Result<Vec<Listed>> {
    Ok(sqlx::query_as(
        "select t.name as team, v.name as version, j.bar, j.budget_tokens, j.created_at
         from judges j join teams t on t.id = j.team_id
              join model_versions v on v.id = j.model_version_id
         order by t.name",
    )
    .fetch_all(ex)
    .await?)
}
