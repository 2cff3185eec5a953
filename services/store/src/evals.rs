//! Evaluation suites, evaluations of a candidate against a champion, their
//! metrics with confidence intervals, and every example's output.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use crate::Result;

#[derive(Debug, Clone, PartialEq, serde::Serialize, sqlx::FromRow)]
pub struct Suite {
    pub id: Uuid,
    pub team_id: Option<Uuid>,
    pub name: String,
    pub sha256: String,
    pub definition: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

/// Stores a suite; the same content under the same name is the same suite.
pub async fn add_suite(
    ex: impl PgExecutor<'_>,
    team_id: Option<Uuid>,
    name: &str,
    sha256: &str,
    definition: &serde_json::Value,
) -> Result<Suite> {
    Ok(sqlx::query_as(
        "insert into eval_suites (id, team_id, name, sha256, definition)
         values ($1, $2, $3, $4, $5)
         on conflict (coalesce(team_id, '00000000-0000-0000-0000-000000000000'::uuid), name, sha256)
         do update set name = excluded.name
         returning id, team_id, name, sha256, definition, created_at",
    )
    .bind(Uuid::new_v4())
    .bind(team_id)
    .bind(name)
    .bind(sha256)
    .bind(definition)
    .fetch_one(ex)
    .await?)
}

/// The newest version of each suite a team runs (its own).
pub async fn team_suites(ex: impl PgExecutor<'_>, team_id: Uuid) -> Result<Vec<Suite>> {
    Ok(sqlx::query_as(
        "select distinct on (name) id, team_id, name, sha256, definition, created_at
         from eval_suites where team_id = $1 order by name, created_at desc",
    )
    .bind(team_id)
    .fetch_all(ex)
    .await?)
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, sqlx::FromRow)]
pub struct Evaluation {
    pub id: Uuid,
    pub team_id: Option<Uuid>,
    pub candidate_version_id: Uuid,
    pub champion_version_id: Uuid,
    pub dataset_version_id: Option<Uuid>,
    pub training_run_id: Option<Uuid>,
    pub status: String,
    pub passed: Option<bool>,
    pub reasons: Option<serde_json::Value>,
    pub policy: Option<serde_json::Value>,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The team's judge in this evaluation: its check against the users,
    /// the weight the gate gave it, its verdicts (`None`: no judge).
    pub judge: Option<serde_json::Value>,
}

const COLUMNS: &str = "id, team_id, candidate_version_id, champion_version_id,
    dataset_version_id, training_run_id, status, passed, reasons, policy, error, created_at,
    finished_at, judge";

/// What to compare.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NewEvaluation {
    pub team_id: Option<Uuid>,
    pub candidate_version_id: Uuid,
    pub champion_version_id: Uuid,
    pub dataset_version_id: Option<Uuid>,
    pub training_run_id: Option<Uuid>,
}

pub async fn create(ex: impl PgExecutor<'_>, e: &NewEvaluation) -> Result<Uuid> {
    let id = Uuid::new_v4();
    sqlx::query(
        "insert into evaluations (id, team_id, candidate_version_id, champion_version_id,
             dataset_version_id, training_run_id, status)
         values ($1, $2, $3, $4, $5, $6, 'queued')",
    )
    .bind(id)
    .bind(e.team_id)
    .bind(e.candidate_version_id)
    .bind(e.champion_version_id)
    .bind(e.dataset_version_id)
    .bind(e.training_run_id)
    .execute(ex)
    .await?;
    Ok(id)
}

pub async fn get(ex: impl PgExecutor<'_>, id: Uuid) -> Result<Option<Evaluation>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {COLUMNS} from evaluations where id = $1"
    )))
    .bind(id)
    .fetch_optional(ex)
    .await?)
}

pub async fn list(
    ex: impl PgExecutor<'_>,
    team: Option<Uuid>,
    limit: i64,
) -> Result<Vec<Evaluation>> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "select {COLUMNS} from evaluations where $1::uuid is null or team_id = $1
         order by created_at desc limit $2"
    )))
    .bind(team)
    .bind(limit)
    .fetch_all(ex)
    .await?)
}

/// Marks an evaluation running; clears what an earlier attempt left.
pub async fn start(conn: &mut sqlx::PgConnection, id: Uuid) -> Result<()> {
    sqlx::query("delete from eval_metrics where evaluation_id = $1")
        .bind(id)
        .execute(&mut *conn)
        .await?;
    sqlx::query("delete from eval_items where evaluation_id = $1")
        .bind(id)
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "update evaluations set status = 'running', error = null, judge = null where id = $1",
    )
    .bind(id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// One metric's comparison.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, sqlx::FromRow)]
pub struct Metric {
    pub suite: String,
    pub metric: String,
    pub items: i32,
    pub candidate: f64,
    pub champion: f64,
    pub difference: f64,
    pub ci_low: f64,
    pub ci_high: f64,
}

/// One example's output by one model.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, sqlx::FromRow)]
pub struct Item {
    pub suite: String,
    pub item: String,
    pub model_version_id: Uuid,
    pub prompt: serde_json::Value,
    pub output: String,
    pub passed: Option<bool>,
    pub score: Option<f64>,
}

pub async fn add_metrics(ex: impl PgExecutor<'_>, id: Uuid, metrics: &[Metric]) -> Result<()> {
    if metrics.is_empty() {
        return Ok(());
    }
    let col = |f: fn(&Metric) -> f64| metrics.iter().map(f).collect::<Vec<_>>();
    sqlx::query(
        "insert into eval_metrics (evaluation_id, suite, metric, items, candidate, champion,
             difference, ci_low, ci_high)
         select $1, * from unnest($2::text[], $3::text[], $4::int4[], $5::float8[],
             $6::float8[], $7::float8[], $8::float8[], $9::float8[])",
    )
    .bind(id)
    .bind(metrics.iter().map(|m| m.suite.clone()).collect::<Vec<_>>())
    .bind(metrics.iter().map(|m| m.metric.clone()).collect::<Vec<_>>())
    .bind(metrics.iter().map(|m| m.items).collect::<Vec<_>>())
    .bind(col(|m| m.candidate))
    .bind(col(|m| m.champion))
    .bind(col(|m| m.difference))
    .bind(col(|m| m.ci_low))
    .bind(col(|m| m.ci_high))
    .execute(ex)
    .await?;
    Ok(())
}

/// A model's output as Postgres can keep it: a NUL character (which a
/// model may produce, byte-level vocabularies have a token for it) becomes
/// U+FFFD, the replacement character; text cannot hold U+0000.
fn storable(text: &str) -> String {
    text.replace('\0', "\u{FFFD}")
}

/// [`storable`] for every string in a JSON value (jsonb cannot hold
/// U+0000 either).
fn storable_json(v: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::String(s) => Value::String(storable(s)),
        Value::Array(a) => Value::Array(a.iter().map(storable_json).collect()),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, v)| (storable(k), storable_json(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Stores each example's output of an evaluation (a NUL character in an
/// output is kept as U+FFFD).
pub async fn add_items(ex: impl PgExecutor<'_>, id: Uuid, items: &[Item]) -> Result<()> {
    if items.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "insert into eval_items (evaluation_id, suite, item, model_version_id, prompt, output,
             passed, score)
         select $1, * from unnest($2::text[], $3::text[], $4::uuid[], $5::jsonb[], $6::text[],
             $7::bool[], $8::float8[])
         on conflict do nothing",
    )
    .bind(id)
    .bind(items.iter().map(|i| i.suite.clone()).collect::<Vec<_>>())
    .bind(items.iter().map(|i| i.item.clone()).collect::<Vec<_>>())
    .bind(items.iter().map(|i| i.model_version_id).collect::<Vec<_>>())
    .bind(
        items
            .iter()
            .map(|i| storable_json(&i.prompt))
            .collect::<Vec<_>>(),
    )
    .bind(
        items
            .iter()
            .map(|i| storable(&i.output))
            .collect::<Vec<_>>(),
    )
    .bind(items.iter().map(|i| i.passed).collect::<Vec<_>>())
    .bind(items.iter().map(|i| i.score).collect::<Vec<_>>())
    .execute(ex)
    .await?;
    Ok(())
}

/// Keeps what the team's judge did in the evaluation.
pub async fn set_judge(ex: impl PgExecutor<'_>, id: Uuid, judge: &serde_json::Value) -> Result<()> {
    sqlx::query("update evaluations set judge = $2 where id = $1")
        .bind(id)
        .bind(judge)
        .execute(ex)
        .await?;
    Ok(())
}

/// Ends an evaluation with the gate's verdict, or its error.
pub async fn finish(
    ex: impl PgExecutor<'_>,
    id: Uuid,
    passed: Option<bool>,
    reasons: &serde_json::Value,
    policy: &serde_json::Value,
    error: Option<&str>,
) -> Result<()> {
    sqlx::query(
        "update evaluations set status = case when $5::text is null then 'succeeded' else 'failed' end,
             passed = $2, reasons = $3, policy = $4, error = $5, finished_at = now()
         where id = $1",
    )
    .bind(id)
    .bind(passed)
    .bind(reasons)
    .bind(policy)
    .bind(error)
    .execute(ex)
    .await?;
    Ok(())
}

pub async fn metrics(ex: impl PgExecutor<'_>, id: Uuid) -> Result<Vec<Metric>> {
    Ok(sqlx::query_as(
        "select suite, metric, items, candidate, champion, difference, ci_low, ci_high
         from eval_metrics where evaluation_id = $1 order by suite, metric",
    )
    .bind(id)
    .fetch_all(ex)
    .await?)
}

pub async fn items(ex: impl PgExecutor<'_>, id: Uuid, suite: Option<&str>) -> Result<Vec<Item>> {
    Ok(sqlx::query_as(
        "select suite, item, model_version_id, prompt, output, passed, score
         from eval_items where evaluation_id = $1 and ($2::text is null or suite = $2)
         order by suite, item, model_version_id",
    )
    .bind(id)
    .bind(suite)
    .fetch_all(ex)
    .await?)
}

/// One remembered answer: a model version's output for a request key.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Remembered {
    pub request_sha256: String,
    pub output: String,
    pub tokens: i32,
}

/// The answers `version` is remembered to give (`remembered_answers`).
pub async fn remembered(ex: impl PgExecutor<'_>, version: Uuid) -> Result<Vec<Remembered>> {
    Ok(sqlx::query_as(
        "select request_sha256, output, tokens from remembered_answers
         where model_version_id = $1",
    )
    .bind(version)
    .fetch_all(ex)
    .await?)
}

/// Keeps `version`'s answers for later evaluations (a key already kept
/// stays as it was; a NUL character is kept as U+FFFD).
pub async fn remember(ex: impl PgExecutor<'_>, version: Uuid, rows: &[Remembered]) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "insert into remembered_answers (model_version_id, request_sha256, output, tokens)
         select $1, * from unnest($2::text[], $3::text[], $4::int4[])
         on conflict do nothing",
    )
    .bind(version)
    .bind(
        rows.iter()
            .map(|r| r.request_sha256.clone())
            .collect::<Vec<_>>(),
    )
    .bind(rows.iter().map(|r| storable(&r.output)).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.tokens).collect::<Vec<_>>())
    .execute(ex)
    .await?;
    Ok(())
}
