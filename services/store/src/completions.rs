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
    pub request_id: Option<String>,
    pub trace_id: Option<String>,
    pub ttft_ms: Option<f64>,
    pub started_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
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
    #[serde(default)]
    pub request_id: Option<String>,
    /// The trace the request belongs to (32 hex digits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    #[serde(default)]
    pub ttft_ms: Option<f64>,
    #[serde(default)]
    pub started_at: Option<DateTime<Utc>>,
    /// `champion`, `canary` or `named` (the request named the version).
    #[serde(default = "champion_route")]
    pub route: String,
    /// The canary that served it.
    #[serde(default)]
    pub canary_id: Option<Uuid>,
}

fn champion_route() -> String {
    "champion".into()
}

/// Stores many completions in one statement; ids already present are
/// skipped, so replaying a journal never duplicates a row, and so are those
/// of an end user whose data was deleted after the request began
/// (`user_deletions`): a gateway's journal may deliver them late. A record
/// with no start time (written by an older version) counts as made before
/// any deletion of its user.
pub async fn insert_many(ex: impl PgExecutor<'_>, rows: &[NewCompletion]) -> Result<u64> {
    if rows.is_empty() {
        return Ok(0);
    }
    let col = |f: fn(&NewCompletion) -> String| rows.iter().map(f).collect::<Vec<_>>();
    let done = sqlx::query(
        "insert into completions (id, team_id, model_version_id, end_user, request, output,
             finish_reason, prompt_tokens, completion_tokens, latency_ms, request_id, ttft_ms,
             started_at, route, canary_id, trace_id)
         select * from unnest($1::text[], $2::uuid[], $3::uuid[], $4::text[], $5::jsonb[],
             $6::text[], $7::text[], $8::int4[], $9::int4[], $10::float8[], $11::text[],
             $12::float8[], $13::timestamptz[], $14::text[], $15::uuid[], $16::text[])
             as c (id, team_id, model_version_id, end_user, request, output, finish_reason,
                   prompt_tokens, completion_tokens, latency_ms, request_id, ttft_ms,
                   started_at, route, canary_id, trace_id)
         where not exists (
             select 1 from user_deletions d
              where d.team_id = c.team_id
                and d.end_user_sha256 = encode(sha256(convert_to(c.end_user, 'UTF8')), 'hex')
                and d.deleted_at >= coalesce(c.started_at, '-infinity'))
         on conflict (id) do nothing",
    )
    .bind(col(|c| c.id.clone()))
    .bind(rows.iter().map(|c| c.team_id).collect::<Vec<_>>())
    .bind(rows.iter().map(|c| c.model_version_id).collect::<Vec<_>>())
    .bind(rows.iter().map(|c| c.end_user.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|c| c.request.clone()).collect::<Vec<_>>())
    .bind(col(|c| c.output.clone()))
    .bind(col(|c| c.finish_reason.clone()))
    .bind(rows.iter().map(|c| c.prompt_tokens).collect::<Vec<_>>())
    .bind(rows.iter().map(|c| c.completion_tokens).collect::<Vec<_>>())
    .bind(rows.iter().map(|c| c.latency_ms).collect::<Vec<_>>())
    .bind(
        rows.iter()
            .map(|c| c.request_id.clone())
            .collect::<Vec<_>>(),
    )
    .bind(rows.iter().map(|c| c.ttft_ms).collect::<Vec<_>>())
    .bind(rows.iter().map(|c| c.started_at).collect::<Vec<_>>())
    .bind(col(|c| c.route.clone()))
    .bind(rows.iter().map(|c| c.canary_id).collect::<Vec<_>>())
    .bind(rows.iter().map(|c| c.trace_id.clone()).collect::<Vec<_>>())
    .execute(ex)
    .await?;
    Ok(done.rows_affected())
}

/// Whose a completion is, and which version made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub team_id: Uuid,
    pub model_version_id: Uuid,
}

/// The team that owns a completion and the version that made it, if it
/// exists.
pub async fn owner(ex: impl PgExecutor<'_>, id: &str) -> Result<Option<Owner>> {
    let row: Option<(Uuid, Uuid)> =
        sqlx::query_as("select team_id, model_version_id from completions where id = $1")
            .bind(id)
            .fetch_optional(ex)
            .await?;
    Ok(row.map(|(team_id, model_version_id)| Owner {
        team_id,
        model_version_id,
    }))
}

/// A team's own completion; other teams' ids are simply not found.
pub async fn get(ex: impl PgExecutor<'_>, team_id: Uuid, id: &str) -> Result<Option<Completion>> {
    Ok(sqlx::query_as(
        "select id, team_id, model_version_id, end_user, request, output, finish_reason,
                prompt_tokens, completion_tokens, latency_ms, request_id, trace_id, ttft_ms,
                started_at, created_at
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

/// A logged request's messages (what a teacher is asked again when the
/// team's prompts are distilled).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct LoggedPrompt {
    pub id: String,
    pub end_user: Option<String>,
    /// The request's `messages` as logged (contents are hashes for teams
    /// that store no text).
    pub messages: sqlx::types::Json<serde_json::Value>,
    pub created_at: DateTime<Utc>,
}

/// Whether the team has a logged request stored after `after` (any, when
/// `None`).
pub async fn logged_after(
    ex: impl PgExecutor<'_>,
    team_id: Uuid,
    after: Option<DateTime<Utc>>,
) -> Result<bool> {
    Ok(sqlx::query_scalar(
        "select exists (select 1 from completions
                        where team_id = $1 and ($2::timestamptz is null or created_at > $2))",
    )
    .bind(team_id)
    .bind(after)
    .fetch_one(ex)
    .await?)
}

/// A team's logged chat requests (not text completions, which have no
/// messages), newest first (by when they were made, not stored: the
/// journal stores several at once), at most `limit`.
pub async fn recent_prompts(
    ex: impl PgExecutor<'_>,
    team_id: Uuid,
    limit: i64,
) -> Result<Vec<LoggedPrompt>> {
    Ok(sqlx::query_as(
        "select id, end_user, coalesce(request -> 'messages', '[]') as messages, created_at
         from completions where team_id = $1 and request ? 'messages'
         order by coalesce(started_at, created_at) desc, id limit $2",
    )
    .bind(team_id)
    .bind(limit)
    .fetch_all(ex)
    .await?)
}

/// Those of `ids` still in a team's log (an end user's deleted data is
/// not), locked until the caller's transaction ends: a deletion waits for
/// it, and so sees what it wrote.
pub async fn still_logged(
    ex: impl PgExecutor<'_>,
    team_id: Uuid,
    ids: &[String],
) -> Result<Vec<String>> {
    Ok(
        sqlx::query_scalar("select id from completions where team_id = $1 and id = any($2)")
            .bind(team_id)
            .bind(ids)
            .fetch_all(ex)
            .await?,
    )
}
