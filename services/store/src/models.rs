//! The model-version registry: every model file Flywheel can serve, and
//! which one is the champion.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use crate::{Result, StoreError};

#[derive(Debug, Clone, PartialEq, serde::Serialize, sqlx::FromRow)]
pub struct ModelVersion {
    pub id: Uuid,
    pub name: String,
    pub source: String,
    pub sha256: String,
    pub format: String,
    pub path: String,
    pub size_bytes: i64,
    pub is_champion: bool,
    pub created_at: DateTime<Utc>,
    /// The team whose feedback trained it: only that team may use it.
    pub team_id: Option<Uuid>,
    /// Trained on a shared dataset: only teams that pool feedback may use it.
    pub pooled: bool,
    /// The context window it serves, when known.
    pub context_length: Option<i32>,
}

/// `format` of a version served by an upstream ([`crate::upstreams`]).
pub const UPSTREAM_FORMAT: &str = "upstream";

impl ModelVersion {
    /// Served by an OpenAI-compatible server elsewhere: no weights here.
    pub fn is_upstream(&self) -> bool {
        self.format == UPSTREAM_FORMAT
    }

    /// Whether a team may be served by this version: its own candidates,
    /// pooled ones when it pools, base models always.
    pub fn usable_by(&self, team: Uuid, team_pools: bool) -> bool {
        match self.team_id {
            Some(owner) => owner == team,
            None => !self.pooled || team_pools,
        }
    }
}

#[derive(Debug, Clone)]
pub struct NewModelVersion {
    pub name: String,
    pub source: String,
    pub sha256: String,
    pub format: String,
    pub path: String,
    pub size_bytes: i64,
    pub context_length: Option<i32>,
}

/// The columns of [`ModelVersion`], as a literal so queries stay `&'static str`.
macro_rules! columns {
    () => {
        "id, name, source, sha256, format, path, size_bytes, is_champion, created_at, team_id, pooled,
         context_length"
    };
}

/// Registers a model version. Registering the same file (same sha256) under
/// the same name again returns the existing version.
pub async fn register(pool: &sqlx::PgPool, new: &NewModelVersion) -> Result<ModelVersion> {
    if let Some(existing) = by_name(pool, &new.name).await? {
        if existing.sha256 == new.sha256 {
            return Ok(existing);
        }
        return Err(StoreError::Conflict(format!(
            "a model version named {} already exists with different contents",
            new.name
        )));
    }
    Ok(sqlx::query_as(concat!(
        "insert into model_versions (name, source, sha256, format, path, size_bytes,
             context_length)
         values ($1, $2, $3, $4, $5, $6, $7) returning ",
        columns!(),
        ""
    ))
    .bind(&new.name)
    .bind(&new.source)
    .bind(&new.sha256)
    .bind(&new.format)
    .bind(&new.path)
    .bind(new.size_bytes)
    .bind(new.context_length)
    .fetch_one(pool)
    .await?)
}

pub async fn list(ex: impl PgExecutor<'_>) -> Result<Vec<ModelVersion>> {
    Ok(sqlx::query_as(concat!(
        "select ",
        columns!(),
        " from model_versions order by created_at"
    ))
    .fetch_all(ex)
    .await?)
}

pub async fn by_name(ex: impl PgExecutor<'_>, name: &str) -> Result<Option<ModelVersion>> {
    Ok(sqlx::query_as(concat!(
        "select ",
        columns!(),
        " from model_versions where name = $1"
    ))
    .bind(name)
    .fetch_optional(ex)
    .await?)
}

pub async fn champion(ex: impl PgExecutor<'_>) -> Result<Option<ModelVersion>> {
    Ok(sqlx::query_as(concat!(
        "select ",
        columns!(),
        " from model_versions where is_champion"
    ))
    .fetch_optional(ex)
    .await?)
}

/// Makes `name` the one champion.
pub async fn set_champion(pool: &sqlx::PgPool, name: &str) -> Result<ModelVersion> {
    if let Some(v) = by_name(pool, name).await?
        && v.is_upstream()
    {
        // Every gateway loads the global champion into memory at start.
        return Err(StoreError::Conflict(format!(
            "{name} is served by an upstream and cannot be the global champion, which every \
             gateway loads; make it a team's champion (--team)"
        )));
    }
    let mut tx = pool.begin().await?;
    sqlx::query("update model_versions set is_champion = false where is_champion")
        .execute(&mut *tx)
        .await?;
    let v: Option<ModelVersion> = sqlx::query_as(concat!(
        "update model_versions set is_champion = true where name = $1 returning ",
        columns!(),
        ""
    ))
    .bind(name)
    .fetch_optional(&mut *tx)
    .await?;
    let v = v.ok_or_else(|| StoreError::NotFound(format!("model version {name}")))?;
    crate::notify::routes_changed(&mut *tx).await?;
    tx.commit().await?;
    Ok(v)
}

/// Whose a version is (see [`ModelVersion::usable_by`]).
pub async fn set_scope(
    ex: impl PgExecutor<'_>,
    id: Uuid,
    team_id: Option<Uuid>,
    pooled: bool,
) -> Result<()> {
    sqlx::query("update model_versions set team_id = $2, pooled = $3 where id = $1")
        .bind(id)
        .bind(team_id)
        .bind(pooled)
        .execute(ex)
        .await?;
    Ok(())
}

/// A team's champion: its own, or the global one.
pub async fn team_champion(ex: impl PgExecutor<'_>, team_id: Uuid) -> Result<Option<ModelVersion>> {
    Ok(sqlx::query_as(concat!(
        "select ",
        columns!(),
        " from model_versions where id = coalesce(
             (select champion_version_id from teams where id = $1),
             (select id from model_versions where is_champion))"
    ))
    .bind(team_id)
    .fetch_optional(ex)
    .await?)
}

/// Makes `version` the team's champion (`None`: back to the global one),
/// and tells every gateway.
pub async fn set_team_champion(
    conn: &mut sqlx::PgConnection,
    team_id: Uuid,
    version: Option<Uuid>,
) -> Result<()> {
    let done = sqlx::query("update teams set champion_version_id = $2 where id = $1")
        .bind(team_id)
        .bind(version)
        .execute(&mut *conn)
        .await?;
    if done.rows_affected() == 0 {
        return Err(StoreError::NotFound(format!("team {team_id}")));
    }
    crate::notify::routes_changed(&mut *conn).await
}

/// Lineage of a trained model version.
#[derive(Debug, Clone, PartialEq, serde::Serialize, sqlx::FromRow)]
pub struct Lineage {
    pub base_version_id: Option<Uuid>,
    pub dataset_version_id: Option<Uuid>,
    pub adapter_path: Option<String>,
    pub training: Option<serde_json::Value>,
}

/// Records where a trained version came from.
pub async fn set_lineage(ex: impl PgExecutor<'_>, id: Uuid, lineage: &Lineage) -> Result<()> {
    sqlx::query(
        "update model_versions set base_version_id = $2, dataset_version_id = $3,
             adapter_path = $4, training = $5
         where id = $1",
    )
    .bind(id)
    .bind(lineage.base_version_id)
    .bind(lineage.dataset_version_id)
    .bind(&lineage.adapter_path)
    .bind(&lineage.training)
    .execute(ex)
    .await?;
    Ok(())
}

pub async fn lineage(ex: impl PgExecutor<'_>, id: Uuid) -> Result<Option<Lineage>> {
    Ok(sqlx::query_as(
        "select base_version_id, dataset_version_id, adapter_path, training
         from model_versions where id = $1",
    )
    .bind(id)
    .fetch_optional(ex)
    .await?)
}

/// Records where a version's file now lies on this machine (after it was
/// fetched again from its source).
pub async fn set_path(ex: impl PgExecutor<'_>, id: Uuid, path: &str) -> Result<()> {
    sqlx::query("update model_versions set path = $2 where id = $1")
        .bind(id)
        .bind(path)
        .execute(ex)
        .await?;
    Ok(())
}

pub async fn get(ex: impl PgExecutor<'_>, id: Uuid) -> Result<Option<ModelVersion>> {
    Ok(sqlx::query_as(concat!(
        "select ",
        columns!(),
        " from model_versions where id = $1"
    ))
    .bind(id)
    .fetch_optional(ex)
    .await?)
}
