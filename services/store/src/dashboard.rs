//! The admin dashboard's reads: per-team summaries, per-version traffic and
//! ratings over time, and the completions search. Each is one statement
//! shaped for an index (see `0009_admin.sql`), so pages stay fast with
//! millions of completions.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use crate::Result;

/// One team, as the overview lists it.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct TeamRow {
    pub id: Uuid,
    pub name: String,
    pub store_text: bool,
    pub share_for_training: bool,
    pub created_at: DateTime<Utc>,
    /// Keys not revoked.
    pub live_keys: i64,
    pub requests_per_minute: Option<i32>,
    pub tokens_per_minute: Option<i32>,
}

pub async fn teams(ex: impl PgExecutor<'_>) -> Result<Vec<TeamRow>> {
    Ok(sqlx::query_as(
        "select t.id, t.name, t.store_text, t.share_for_training, t.created_at,
                t.requests_per_minute, t.tokens_per_minute,
                (select count(*) from api_keys k
                 where k.team_id = t.id and k.revoked_at is null) as live_keys
         from teams t order by t.name",
    )
    .fetch_all(ex)
    .await?)
}

/// A team's traffic and votes in one time bucket, for one model version.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct Bucket {
    pub bucket: DateTime<Utc>,
    pub model_version_id: Uuid,
    pub requests: i64,
    pub votes: i64,
    pub up: i64,
}

/// Requests, votes and thumbs up per `bucket_seconds` (a multiple of 60)
/// and model version since `since`, from the per-minute counts the
/// triggers of `0009_admin.sql` keep.
pub async fn traffic(
    ex: impl PgExecutor<'_>,
    team: Uuid,
    since: DateTime<Utc>,
    bucket_seconds: f64,
) -> Result<Vec<Bucket>> {
    Ok(sqlx::query_as(
        "select to_timestamp(floor(extract(epoch from minute) / $3) * $3) as bucket,
                model_version_id, sum(requests)::int8 as requests, sum(votes)::int8 as votes,
                sum(up)::int8 as up
         from traffic_minutes where team_id = $1 and minute >= date_trunc('minute', $2::timestamptz)
         group by 1, 2 having sum(requests) > 0 or sum(votes) > 0 order by 1, 2",
    )
    .bind(team)
    .bind(since)
    .bind(bucket_seconds)
    .fetch_all(ex)
    .await?)
}

/// The team's first minute with traffic at or after `since`.
pub async fn first_traffic(
    ex: impl PgExecutor<'_>,
    team: Uuid,
    since: DateTime<Utc>,
) -> Result<Option<DateTime<Utc>>> {
    Ok(sqlx::query_scalar(
        "select min(minute) from traffic_minutes
         where team_id = $1 and minute >= date_trunc('minute', $2::timestamptz)
           and (requests > 0 or votes > 0)",
    )
    .bind(team)
    .bind(since)
    .fetch_one(ex)
    .await?)
}

/// What the completions page filters by; every field may be left out.
#[derive(Debug, Clone, Default)]
pub struct CompletionFilter {
    pub team: Option<Uuid>,
    pub model_version: Option<Uuid>,
    /// `up`, `down` (any vote so), `none` (never rated) or `corrected`.
    pub rating: Option<String>,
    /// Case-insensitive text in the answer or the request.
    pub text: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// Only completions older than this (the next page's cursor).
    pub before: Option<(DateTime<Utc>, String)>,
}

/// One row of the completions list.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct CompletionRow {
    pub id: String,
    pub team_id: Uuid,
    pub team: String,
    pub model_version_id: Uuid,
    pub model: String,
    pub end_user: Option<String>,
    pub output: String,
    pub latency_ms: f64,
    pub created_at: DateTime<Utc>,
    pub up: i64,
    pub down: i64,
}

/// Newest first, `limit` at most.
pub async fn completions(
    ex: impl PgExecutor<'_>,
    f: &CompletionFilter,
    limit: i64,
) -> Result<Vec<CompletionRow>> {
    let like = f.text.as_ref().map(|t| {
        let escaped = t
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_");
        format!("%{escaped}%")
    });
    let (before_at, before_id) = f.before.clone().unzip();
    Ok(sqlx::query_as(
        "select c.id, c.team_id, t.name as team, c.model_version_id, m.name as model,
                c.end_user, left(c.output, 400) as output, c.latency_ms, c.created_at,
                (select count(*) from feedback v where v.completion_id = c.id
                 and v.rating = 'up') as up,
                (select count(*) from feedback v where v.completion_id = c.id
                 and v.rating = 'down') as down
         from completions c
         join teams t on t.id = c.team_id
         join model_versions m on m.id = c.model_version_id
         where ($1::uuid is null or c.team_id = $1)
           and ($2::uuid is null or c.model_version_id = $2)
           and ($3::timestamptz is null or c.created_at >= $3)
           and ($4::timestamptz is null or c.created_at < $4)
           and ($5::timestamptz is null or (c.created_at, c.id) < ($5, $6))
           and ($7::text is null or c.output ilike $7 or c.request::text ilike $7)
           and (case $8::text
                  when 'none' then not exists (select 1 from feedback v where v.completion_id = c.id)
                  when 'corrected' then exists (select 1 from feedback v
                      where v.completion_id = c.id and v.correction is not null)
                  when 'up' then exists (select 1 from feedback v
                      where v.completion_id = c.id and v.rating = 'up')
                  when 'down' then exists (select 1 from feedback v
                      where v.completion_id = c.id and v.rating = 'down')
                  else true end)
         order by c.created_at desc, c.id desc
         limit $9",
    )
    .bind(f.team)
    .bind(f.model_version)
    .bind(f.since)
    .bind(f.until)
    .bind(before_at)
    .bind(before_id)
    .bind(like)
    .bind(f.rating.as_deref())
    .bind(limit)
    .fetch_all(ex)
    .await?)
}

/// Every vote on a completion, oldest first.
pub async fn votes(
    ex: impl PgExecutor<'_>,
    completion_id: &str,
) -> Result<Vec<crate::feedback::Feedback>> {
    Ok(sqlx::query_as(
        "select id, completion_id, team_id, end_user, rating, comment, correction, created_at
         from feedback where completion_id = $1 order by created_at, id",
    )
    .bind(completion_id)
    .fetch_all(ex)
    .await?)
}

/// Whether Postgres answers, and how long it took (milliseconds).
pub async fn ping(ex: impl PgExecutor<'_>) -> Result<f64> {
    let t = std::time::Instant::now();
    sqlx::query("select 1").execute(ex).await?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}
