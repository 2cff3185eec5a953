//! The audit log: every promotion, rejection, canary start and end, and
//! manual promotion or rollback, with its reason and evidence.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

use crate::Result;
use crate::cycles::text_enum;

text_enum! {
    /// What a decision did to what a team is served.
    DecisionKind {
        /// The loop promoted a candidate on the offline evidence.
        Promote = "promote",
        /// The loop kept the champion: the candidate failed the gate.
        Reject = "reject",
        /// The loop started a canary for a candidate that passed the gate.
        CanaryStarted = "canary_started",
        /// The canary won on live thumbs and became champion.
        CanaryPassed = "canary_passed",
        /// The canary lost, ran out of time, or another version was promoted.
        RolledBack = "rolled_back",
        /// A person made a version the team's champion.
        ManualPromote = "manual_promote",
        /// A person stopped a canary or restored the previous champion.
        ManualRollback = "manual_rollback",
    }
}

impl DecisionKind {
    /// Whether the decision made a new champion (what a rollback undoes).
    pub fn promotes(self) -> bool {
        matches!(
            self,
            Self::Promote | Self::CanaryPassed | Self::ManualPromote
        )
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, schemars::JsonSchema, sqlx::FromRow)]
pub struct Decision {
    pub id: Uuid,
    pub team_id: Option<Uuid>,
    pub kind: DecisionKind,
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
#[derive(Debug, Clone)]
pub struct NewDecision<'a> {
    pub team_id: Option<Uuid>,
    pub kind: DecisionKind,
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
         where team_id = $1 and kind = any($2)
         order by created_at desc, id desc limit 1",
    )
    .bind(team)
    .bind(
        DecisionKind::ALL
            .iter()
            .filter(|k| k.promotes())
            .map(|k| k.as_str())
            .collect::<Vec<_>>(),
    )
    .fetch_optional(ex)
    .await?
    .flatten())
}
