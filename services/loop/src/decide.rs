//! The decisions that change what a team is served, each in one
//! transaction with its row in the audit log and the move of the cycle it
//! ends, and each reaching every gateway through `flywheel_routes`:
//! promotion (after the offline gate or a canary, or by hand), a canary's
//! start and end, a rejection, and rollback. The loop, the dashboard and
//! the command line all decide through these functions.

use chrono::Utc;
use flywheel_store::canaries::{self, Canary, CanaryStatus};
use flywheel_store::cycles::{self, Link, Stage, StageEnd};
use flywheel_store::decisions::{self, DecisionKind, NewDecision};
use flywheel_store::models::{self, ModelVersion};
use flywheel_store::sqlx::PgConnection;
use flywheel_store::{PgPool, StoreError};
use uuid::Uuid;

use crate::machine::{self, Move};
use crate::{LoopError, Result};

/// Whether `team` may be served by `version` (a base model, its own
/// candidate, or a pooled one when it pools feedback).
pub async fn check_usable(pool: &PgPool, team: Uuid, version: &ModelVersion) -> Result<()> {
    let pools = flywheel_store::keys::team_shares(pool, team).await?;
    if !version.usable_by(team, pools) {
        return Err(LoopError::Refused(format!(
            "{} was trained on another team's feedback; it can serve only {}",
            version.name,
            if version.pooled {
                "teams that pool feedback"
            } else {
                "that team"
            }
        )));
    }
    Ok(())
}

/// What a decision says, besides its kind.
#[derive(Debug, Clone)]
pub struct Why<'a> {
    pub reason: &'a str,
    pub evidence: serde_json::Value,
    pub actor: &'a str,
    pub evaluation_id: Option<Uuid>,
    pub canary_id: Option<Uuid>,
}

/// Makes the running cycle `link` names (if it is at `from`) take move `by`.
async fn move_linked(
    conn: &mut PgConnection,
    link: Link,
    from: Stage,
    by: Move,
    end: &StageEnd<'_>,
    reason: Option<&str>,
) -> Result<()> {
    if let Some(c) = cycles::running_for(&mut *conn, link).await?
        && c.stage == from
    {
        machine::apply(conn, c.id, from, by, end, reason).await?;
    }
    Ok(())
}

fn record<'a>(
    team: Uuid,
    kind: DecisionKind,
    candidate: Option<Uuid>,
    champion: Option<Uuid>,
    why: &Why<'a>,
) -> NewDecision<'a> {
    NewDecision {
        team_id: Some(team),
        kind,
        candidate_version_id: candidate,
        champion_version_id: champion,
        evaluation_id: why.evaluation_id,
        canary_id: why.canary_id,
        reason: why.reason,
        evidence: why.evidence.clone(),
        actor: why.actor,
    }
}

/// Makes `candidate` the team's champion; `kind` is `Promote` (the loop, on
/// the offline evidence), `CanaryPassed` or `ManualPromote`. A running
/// canary ends (promoted if it was this candidate's, rolled back
/// otherwise), and so does the cycle behind it or behind the evaluation.
#[tracing::instrument(name = "promote", skip_all, fields(team = %team, candidate = %candidate.id, kind = %kind))]
pub async fn promote(
    pool: &PgPool,
    team: Uuid,
    candidate: &ModelVersion,
    kind: DecisionKind,
    why: Why<'_>,
) -> Result<Uuid> {
    if !kind.promotes() {
        return Err(LoopError::Conflict(format!(
            "a {kind} decision does not promote"
        )));
    }
    check_usable(pool, team, candidate).await?;
    let mut tx = pool.begin().await.map_err(StoreError::from)?;
    let before = models::team_champion(&mut *tx, team)
        .await?
        .ok_or_else(|| LoopError::Conflict("the team has no champion to replace".into()))?;
    let mut ended = None;
    if let Some(c) = canaries::running_for(&mut *tx, team).await? {
        let (status, by, reason) = if c.candidate_version_id == candidate.id {
            (
                CanaryStatus::Promoted,
                Move::Promote,
                why.reason.to_string(),
            )
        } else {
            (
                CanaryStatus::RolledBack,
                Move::RollBack,
                format!("another version was promoted: {}", candidate.name),
            )
        };
        canaries::end(&mut tx, c.id, status, &reason).await?;
        ended = Some((c.id, status, by, reason));
    }
    models::set_team_champion(&mut tx, team, Some(candidate.id)).await?;
    let id = decisions::record(
        &mut *tx,
        &record(team, kind, Some(candidate.id), Some(before.id), &why),
    )
    .await?;
    // The loop's cycle ends with it: the one whose canary this was, or the
    // one whose evaluation promoted straight away.
    let end = StageEnd {
        decision_id: Some(id),
        ..Default::default()
    };
    if let Some((canary, status, by, reason)) = &ended {
        let end = StageEnd {
            note: status.as_str(),
            ..end.clone()
        };
        let link = Link::Canary(*canary);
        move_linked(&mut tx, link, Stage::Canary, *by, &end, Some(reason)).await?;
    }
    if let Some(evaluation) = why.evaluation_id {
        let end = StageEnd {
            note: "passed the gate",
            ..end
        };
        let link = Link::Evaluation(evaluation);
        let reason = Some(why.reason);
        move_linked(&mut tx, link, Stage::Evaluate, Move::Promote, &end, reason).await?;
    }
    tx.commit().await.map_err(StoreError::from)?;
    tracing::info!(team = %team, candidate = candidate.name, previous = before.name, %kind, "promoted");
    Ok(id)
}

/// Starts a canary: `candidate` serves `share` of the team's end users,
/// compared live with the champion, until promoted or rolled back.
#[tracing::instrument(name = "canary.start", skip_all, fields(team = %team, candidate = %candidate.id, share = share))]
pub async fn start_canary(
    pool: &PgPool,
    team: Uuid,
    candidate: &ModelVersion,
    share: f64,
    deadline_hours: f64,
    why: Why<'_>,
) -> Result<Canary> {
    check_usable(pool, team, candidate).await?;
    let mut tx = pool.begin().await.map_err(StoreError::from)?;
    let champion = models::team_champion(&mut *tx, team)
        .await?
        .ok_or_else(|| LoopError::Conflict("the team has no champion to compare with".into()))?;
    if champion.id == candidate.id {
        return Err(LoopError::Conflict(format!(
            "{} is already the team's champion",
            candidate.name
        )));
    }
    let deadline = Utc::now() + chrono::Duration::seconds((deadline_hours * 3600.0) as i64);
    let canary = canaries::start(
        &mut tx,
        team,
        candidate.id,
        champion.id,
        share,
        deadline,
        why.evaluation_id,
    )
    .await?;
    let why = Why {
        canary_id: Some(canary.id),
        ..why
    };
    decisions::record(
        &mut *tx,
        &record(
            team,
            DecisionKind::CanaryStarted,
            Some(candidate.id),
            Some(champion.id),
            &why,
        ),
    )
    .await?;
    if let Some(evaluation) = why.evaluation_id {
        let end = StageEnd {
            note: "passed the gate",
            canary_id: Some(canary.id),
            ..Default::default()
        };
        let link = Link::Evaluation(evaluation);
        move_linked(&mut tx, link, Stage::Evaluate, Move::Canary, &end, None).await?;
    }
    tx.commit().await.map_err(StoreError::from)?;
    Ok(canary)
}

/// Records that the candidate of `evaluation` failed the offline gate: a
/// `reject` decision, and the cycle behind the evaluation ends rejected.
#[tracing::instrument(name = "reject", skip_all, fields(team = %team, candidate = %candidate))]
pub async fn reject(
    pool: &PgPool,
    team: Uuid,
    candidate: Uuid,
    champion: Uuid,
    why: Why<'_>,
) -> Result<Uuid> {
    let mut tx = pool.begin().await.map_err(StoreError::from)?;
    let id = decisions::record(
        &mut *tx,
        &record(
            team,
            DecisionKind::Reject,
            Some(candidate),
            Some(champion),
            &why,
        ),
    )
    .await?;
    if let Some(evaluation) = why.evaluation_id {
        let end = StageEnd {
            note: "failed the gate",
            decision_id: Some(id),
            ..Default::default()
        };
        let link = Link::Evaluation(evaluation);
        let reason = Some(why.reason);
        move_linked(&mut tx, link, Stage::Evaluate, Move::Reject, &end, reason).await?;
    }
    tx.commit().await.map_err(StoreError::from)?;
    Ok(id)
}

/// Ends a running canary without promoting it (`RolledBack` by the loop,
/// `ManualRollback` when a person asked). False when it was not running.
#[tracing::instrument(name = "canary.roll_back", skip_all, fields(canary = %canary.id, kind = %kind))]
pub async fn roll_back_canary(
    pool: &PgPool,
    canary: &Canary,
    kind: DecisionKind,
    why: Why<'_>,
) -> Result<bool> {
    if !matches!(
        kind,
        DecisionKind::RolledBack | DecisionKind::ManualRollback
    ) {
        return Err(LoopError::Conflict(format!(
            "a {kind} decision does not roll back"
        )));
    }
    let mut tx = pool.begin().await.map_err(StoreError::from)?;
    if !canaries::end(&mut tx, canary.id, CanaryStatus::RolledBack, why.reason).await? {
        return Ok(false);
    }
    let decision = decisions::record(
        &mut *tx,
        &record(
            canary.team_id,
            kind,
            Some(canary.candidate_version_id),
            Some(canary.champion_version_id),
            &why,
        ),
    )
    .await?;
    let end = StageEnd {
        note: "rolled back",
        decision_id: Some(decision),
        ..Default::default()
    };
    let link = Link::Canary(canary.id);
    let reason = Some(why.reason);
    move_linked(&mut tx, link, Stage::Canary, Move::RollBack, &end, reason).await?;
    tx.commit().await.map_err(StoreError::from)?;
    Ok(true)
}

/// A person's rollback: a running canary is stopped; otherwise the
/// champion the team had before its last promotion comes back.
pub async fn manual_rollback(
    pool: &PgPool,
    team: Uuid,
    reason: &str,
    actor: &str,
) -> Result<String> {
    if let Some(c) = canaries::running_for(pool, team).await? {
        let why = Why {
            reason,
            evidence: serde_json::json!({}),
            actor,
            evaluation_id: c.evaluation_id,
            canary_id: Some(c.id),
        };
        roll_back_canary(pool, &c, DecisionKind::ManualRollback, why).await?;
        return Ok("the running canary was stopped".into());
    }
    let previous = decisions::champion_before_last_promotion(pool, team)
        .await?
        .ok_or_else(|| {
            LoopError::Conflict("no promotion of this team is on record to roll back".into())
        })?;
    let mut tx = pool.begin().await.map_err(StoreError::from)?;
    let current = models::team_champion(&mut *tx, team).await?;
    models::set_team_champion(&mut tx, team, Some(previous)).await?;
    let why = Why {
        reason,
        evidence: serde_json::json!({}),
        actor,
        evaluation_id: None,
        canary_id: None,
    };
    decisions::record(
        &mut *tx,
        &record(
            team,
            DecisionKind::ManualRollback,
            current.as_ref().map(|c| c.id),
            Some(previous),
            &why,
        ),
    )
    .await?;
    tx.commit().await.map_err(StoreError::from)?;
    let name = models::get(pool, previous)
        .await?
        .map_or_else(|| previous.to_string(), |v| v.name);
    Ok(format!("{name} is the champion again"))
}
