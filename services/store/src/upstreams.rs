//! Model versions answered by an OpenAI-compatible server elsewhere (an
//! upstream) instead of weights in this process. Such a version is an
//! ordinary row of `model_versions` (format `upstream`), so keys, routing,
//! canaries, the journal and feedback treat it as any other; this table
//! says where it is served.

use sha2::{Digest, Sha256};
use sqlx::PgExecutor;
use uuid::Uuid;

use crate::models::ModelVersion;
use crate::{Result, StoreError};

/// `model_versions.format` of an upstream version.
pub const FORMAT: &str = crate::models::UPSTREAM_FORMAT;

/// Where an upstream version is served.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
pub struct Upstream {
    pub model_version_id: Uuid,
    /// Up to and including the API's version prefix: `http://host:8000/v1`.
    pub base_url: String,
    /// The model name the upstream knows it by.
    pub model: String,
    /// The environment variable that holds the API key (the key itself is
    /// never stored).
    pub api_key_env: Option<String>,
    /// The longest a whole answer may take.
    pub timeout_ms: i32,
}

#[derive(Debug, Clone)]
pub struct NewUpstream {
    /// The version's name, as clients and the dashboard see it.
    pub name: String,
    pub base_url: String,
    pub model: String,
    pub api_key_env: Option<String>,
    pub timeout_ms: i32,
    pub context_length: Option<i32>,
    /// Only this team may be served by it (`None`: every team may).
    pub team_id: Option<Uuid>,
}

/// Registers an upstream version. The same name with the same settings
/// again returns the existing version; different ones are a conflict. A
/// URL carrying credentials (`user:key@`) or a query is refused by the
/// table's check: the key belongs in the environment variable, and the URL
/// is shown to admins.
pub async fn register(pool: &sqlx::PgPool, new: &NewUpstream) -> Result<ModelVersion> {
    let base_url = new.base_url.trim_end_matches('/').to_string();
    // Stands for the "file": what answers, so the same name cannot quietly
    // come to mean another server. A digest, as the URL is no client's
    // business (clients see a version's sha256).
    let identity = format!(
        "upstream:{}",
        hex::encode(Sha256::digest(format!("{base_url}\n{}", new.model)))
    );
    let mut tx = pool.begin().await?;
    if let Some(existing) = crate::models::by_name(&mut *tx, &new.name).await? {
        let same = match get(&mut *tx, existing.id).await? {
            Some(u) => {
                existing.sha256 == identity
                    && u.api_key_env == new.api_key_env
                    && u.timeout_ms == new.timeout_ms
                    && existing.team_id == new.team_id
            }
            None => false,
        };
        if same {
            return Ok(existing);
        }
        return Err(StoreError::Conflict(format!(
            "a model version named {} already exists with other settings",
            new.name
        )));
    }
    let v: ModelVersion = sqlx::query_as(
        "insert into model_versions (name, source, sha256, format, path, size_bytes, context_length,
                                     team_id)
         values ($1, $2, $3, $4, '', 0, $5, $6)
         returning id, name, source, sha256, format, path, size_bytes, is_champion, created_at,
                   team_id, pooled, context_length",
    )
    .bind(&new.name)
    .bind(&base_url)
    .bind(&identity)
    .bind(FORMAT)
    .bind(new.context_length)
    .bind(new.team_id)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query(
        "insert into upstreams (model_version_id, base_url, model, api_key_env, timeout_ms)
         values ($1, $2, $3, $4, $5)",
    )
    .bind(v.id)
    .bind(&base_url)
    .bind(&new.model)
    .bind(&new.api_key_env)
    .bind(new.timeout_ms)
    .execute(&mut *tx)
    .await?;
    crate::notify::routes_changed(&mut *tx).await?;
    tx.commit().await?;
    Ok(v)
}

pub async fn list(ex: impl PgExecutor<'_>) -> Result<Vec<Upstream>> {
    Ok(sqlx::query_as(
        "select model_version_id, base_url, model, api_key_env, timeout_ms
         from upstreams order by created_at",
    )
    .fetch_all(ex)
    .await?)
}

pub async fn get(ex: impl PgExecutor<'_>, version: Uuid) -> Result<Option<Upstream>> {
    Ok(sqlx::query_as(
        "select model_version_id, base_url, model, api_key_env, timeout_ms
         from upstreams where model_version_id = $1",
    )
    .bind(version)
    .fetch_optional(ex)
    .await?)
}

/// One team's use of one upstream version, from the completion log.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
pub struct Use {
    pub version: String,
    pub team: String,
    pub requests: i64,
    /// Requests that ended in an error (the upstream failed, or was not called).
    pub failed: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
}

/// What each team's requests to each upstream version cost since `since`,
/// as the log recorded them (every gateway's, durably), by version and team.
pub async fn usage(
    ex: impl PgExecutor<'_>,
    since: chrono::DateTime<chrono::Utc>,
) -> Result<Vec<Use>> {
    Ok(sqlx::query_as(
        "select v.name as version, t.name as team, count(*) as requests,
                count(*) filter (where c.finish_reason = 'error') as failed,
                coalesce(sum(c.prompt_tokens), 0)::bigint as prompt_tokens,
                coalesce(sum(c.completion_tokens), 0)::bigint as completion_tokens
         from completions c
         join model_versions v on v.id = c.model_version_id
         join teams t on t.id = c.team_id
         where v.format = $1 and c.created_at >= $2
         group by v.name, t.name
         order by v.name, t.name",
    )
    .bind(FORMAT)
    .bind(since)
    .fetch_all(ex)
    .await?)
}

/// The days a team's upstream budget counts over, ending now.
pub const BUDGET_DAYS: i32 = 30;

/// What a job of a team spent on an upstream version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    /// A teacher's answers (`flywheel distill`).
    Distill,
    /// A judge's verdicts (an evaluation, `flywheel judges check`).
    Judge,
}

impl Purpose {
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Distill => "distill",
            Purpose::Judge => "judge",
        }
    }
}

/// Records what a team's job spent on an upstream version.
pub async fn record_spend(
    ex: impl PgExecutor<'_>,
    team: Uuid,
    version: Uuid,
    purpose: Purpose,
    calls: u64,
    tokens: u64,
) -> Result<()> {
    sqlx::query(
        "insert into upstream_spend (team_id, model_version_id, purpose, calls, tokens)
         values ($1, $2, $3, $4, $5)",
    )
    .bind(team)
    .bind(version)
    .bind(purpose.as_str())
    .bind(i32::try_from(calls).unwrap_or(i32::MAX))
    .bind(i64::try_from(tokens).unwrap_or(i64::MAX))
    .execute(ex)
    .await?;
    Ok(())
}

/// A team's upstream budget for its jobs and what they spent in the window
/// ending now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct Budget {
    /// Tokens per [`BUDGET_DAYS`] (`None`: no limit).
    pub budget: Option<i64>,
    pub spent: i64,
}

impl Budget {
    /// Tokens left (`None`: no limit).
    pub fn left(&self) -> Option<u64> {
        self.budget.map(|b| (b - self.spent).max(0) as u64)
    }
}

pub async fn budget(ex: impl PgExecutor<'_>, team: Uuid) -> Result<Budget> {
    Ok(sqlx::query_as(
        "select t.upstream_budget_tokens as budget,
                coalesce((select sum(s.tokens) from upstream_spend s
                          where s.team_id = t.id and s.at > now() - $2 * interval '1 day'), 0)::bigint as spent
         from teams t where t.id = $1",
    )
    .bind(team)
    .bind(BUDGET_DAYS)
    .fetch_optional(ex)
    .await?
    .unwrap_or(Budget {
        budget: None,
        spent: 0,
    }))
}

/// Sets a team's upstream budget (`None`: no limit); whether the team exists.
pub async fn set_budget(ex: impl PgExecutor<'_>, team: &str, tokens: Option<i64>) -> Result<bool> {
    let done = sqlx::query("update teams set upstream_budget_tokens = $2 where name = $1")
        .bind(team)
        .bind(tokens)
        .execute(ex)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// What jobs spent on upstream versions since `since`, by version, team
/// and purpose.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
pub struct Spent {
    pub version: String,
    pub team: String,
    pub purpose: String,
    pub calls: i64,
    pub tokens: i64,
}

pub async fn spent(
    ex: impl PgExecutor<'_>,
    since: chrono::DateTime<chrono::Utc>,
) -> Result<Vec<Spent>> {
    Ok(sqlx::query_as(
        "select v.name as version, t.name as team, s.purpose,
                sum(s.calls)::bigint as calls, sum(s.tokens)::bigint as tokens
         from upstream_spend s
         join model_versions v on v.id = s.model_version_id
         join teams t on t.id = s.team_id
         where s.at >= $1
         group by v.name, t.name, s.purpose
         order by v.name, t.name, s.purpose",
    )
    .bind(since)
    .fetch_all(ex)
    .await?)
}
