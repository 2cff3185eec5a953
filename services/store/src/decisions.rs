//! The audit log: every promotion, rejection, canary start and end, and
//! manual promotion or rollback, with its reason and evidence.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use crate::Result;

#[derive(Debug, Clone, PartialEq, serde::Serialize, sqlx::FromRow)]
pub struct Decision {
    pub id: Uuid,
    pub team_id: Option<Uuid>,
    pub kind: String,
    pub candidate_version_id: Option<Uuid>,
    pub champion_version_id: Option<Uuid>,
    pub evaluation_id: Option<Uuid>,
    pub canary_id: Option<Uuid>,
    pub reason: String,
    pub evidence: serde_json::Value,
    pub actor: String,
    pub created_at: DateTime<Utc>,
}

/// A decision to record.
#[derive(Debug, Clone, Default)]
pub struct NewDecision<'a> {
    pub team_id: Option<Uuid>,
    pub kind: &'a str,
    pub candidate_version_id: Option<Uuid>,
    pub champion_version_id: Option<Uuid>,
    pub evaluation_id: Option<Uuid>,
    pub canary_id: Option<Uuid>,
    pub reason: &'a str,
    pub evidence: serde_json::Value,
    /// `flywheel` for the loop's own decisions, else who asked.
    pub actor: &'a str,
}

pub async fn record(ex: impl PgExecutor<'_>, d: &NewDecision<'_>) -> Result<Uuid> {
    let id = Uuid::new_v4();
    sqlx::query(
        "insert into decisions (id, team_id, kind, candidate_version_id, champion_version_id,
             evaluation_id, canary_id, reason, evidence, actor)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(id)
    .bind(d.team_id)
    .bind(d.kind)
    .bind(d.candidate_version_id)
    .bind(d.champion_version_id)
    .bind(d.evaluation_id)
    .bind(d.canary_id)
    .bind(d.reason)
    .bind(if d.evidence.is_null() {
        serde_json::json!({})
    } else {
        d.evidence.clone()
    })
    .bind(d.actor)
    .execute(ex)
    .await?;
    Ok(id)
}

/// The newest decisions, of one team or of all.
pub async fn list(
    ex: impl PgExecutor<'_>,
    team: Option<Uuid>,
    limit: i64,
) -> Result<Vec<Decision>> {
    Ok(sqlx::query_as(
        "select id, team_id, kind, candidate_version_id, champion_version_id, evaluation_id,
                canary_id, reason, evidence, actor, created_at
         from decisions where $1::uuid is null or team_id = $1
         order by created_at desc, id desc limit $2",
    )
    .bind(team)
    .bind(limit)
    .fetch_all(ex)
    .await?)
}

/// The champion a team had before its last promotion (what a rollback
/// restores), if a promotion is on record.
pub async fn champion_before_last_promotion(
    ex: impl PgExecutor<'_>,
    team: Uuid,
) -> Result<Option<Uuid>> {
    Ok(sqlx::query_scalar(
        "select champion_version_id from decisions
         where team_id = $1 and kind in ('promote', 'canary_passed', 'manual_promote')
         order by created_at desc, id desc limit 1",
    )
    .bind(team)
    .fetch_optional(ex)
    .await?
    .flatten())
}
