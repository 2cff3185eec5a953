//! The decisions that change what a team is served, each in one
//! transaction with its row in the audit log, and each reaching every
//! gateway through `flywheel_routes`: promotion (after the offline gate or
//! a canary, or by hand), a canary's start and end, and rollback.

use anyhow::{Context, bail};
use chrono::Utc;
use flywheel_store::PgPool;
use flywheel_store::canaries::{self, Canary};
use flywheel_store::cycles::{self, Link, StageEnd};
use flywheel_store::decisions::{self, NewDecision};
use flywheel_store::models::{self, ModelVersion};
use uuid::Uuid;

/// Who made a decision the loop made by itself.
pub const LOOP: &str = "flywheel";

/// Whether `team` may be served by `version` (a base model, its own
/// candidate, or a pooled one when it pools feedback).
pub async fn check_usable(pool: &PgPool, team: Uuid, version: &ModelVersion) -> anyhow::Result<()> {
    let pools = flywheel_store::keys::team_shares(pool, team).await?;
    if !version.usable_by(team, pools) {
        bail!(
            "{} was trained on another team's feedback; it can serve only {}",
            version.name,
            if version.pooled {
                "teams that pool feedback"
            } else {
                "that team"
            }
        );
    }
    Ok(())
}

/// What a decision says, besides its kind.
pub struct Why<'a> {
    pub reason: &'a str,
    pub evidence: serde_json::Value,
    pub actor: &'a str,
    pub evaluation_id: Option<Uuid>,
    pub canary_id: Option<Uuid>,
}

/// Makes `candidate` the team's champion; `kind` is `promote`,
/// `canary_passed` or `manual_promote`. A running canary ends (promoted if
/// it was this candidate's, rolled back otherwise).
pub async fn promote(
    pool: &PgPool,
    team: Uuid,
    candidate: &ModelVersion,
    kind: &str,
    why: Why<'_>,
) -> anyhow::Result<Uuid> {
    check_usable(pool, team, candidate).await?;
    let mut tx = pool.begin().await?;
    let before = models::team_champion(&mut *tx, team)
        .await?
        .context("the team has no champion to replace")?;
    let mut ended = None;
    if let Some(c) = canaries::running_for(&mut *tx, team).await? {
        let (status, reason) = if c.candidate_version_id == candidate.id {
            ("promoted", why.reason.to_string())
        } else {
            (
                "rolled_back",
                format!("another version was promoted: {}", candidate.name),
            )
        };
        canaries::end(&mut tx, c.id, status, &reason).await?;
        ended = Some((c.id, status, reason));
    }
    models::set_team_champion(&mut tx, team, Some(candidate.id)).await?;
    let id = decisions::record(
        &mut *tx,
        &NewDecision {
            team_id: Some(team),
            kind,
            candidate_version_id: Some(candidate.id),
            champion_version_id: Some(before.id),
            evaluation_id: why.evaluation_id,
            canary_id: why.canary_id,
            reason: why.reason,
            evidence: why.evidence,
            actor: why.actor,
        },
    )
    .await?;
    // The loop's cycle ends with it: the one whose canary this was, or the
    // one whose evaluation promoted straight away.
    let end = StageEnd {
        decision_id: Some(id),
        ..Default::default()
    };
    if let Some((canary, status, reason)) = &ended {
        let end = StageEnd {
            note: status,
            ..end.clone()
        };
        let outcome = Some((*status, reason.as_str()));
        cycles::advance_linked(
            &mut tx,
            Link::Canary(*canary),
            "canary",
            "done",
            &end,
            outcome,
        )
        .await?;
    }
    if let Some(evaluation) = why.evaluation_id {
        let end = StageEnd {
            note: "passed the gate",
            ..end
        };
        let outcome = Some(("promoted", why.reason));
        cycles::advance_linked(
            &mut tx,
            Link::Evaluation(evaluation),
            "evaluate",
            "done",
            &end,
            outcome,
        )
        .await?;
    }
    tx.commit().await?;
    tracing::info!(team = %team, candidate = candidate.name, previous = before.name, kind, "promoted");
    Ok(id)
}

/// Starts a canary: `candidate` serves `share` of the team's traffic,
/// compared live with the champion, until promoted or rolled back.
pub async fn start_canary(
    pool: &PgPool,
    team: Uuid,
    candidate: &ModelVersion,
    share: f64,
    deadline_hours: f64,
    why: Why<'_>,
) -> anyhow::Result<Canary> {
    check_usable(pool, team, candidate).await?;
    let mut tx = pool.begin().await?;
    let champion = models::team_champion(&mut *tx, team)
        .await?
        .context("the team has no champion to compare with")?;
    if champion.id == candidate.id {
        bail!("{} is already the team's champion", candidate.name);
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
    decisions::record(
        &mut *tx,
        &NewDecision {
            team_id: Some(team),
            kind: "canary_started",
            candidate_version_id: Some(candidate.id),
            champion_version_id: Some(champion.id),
            evaluation_id: why.evaluation_id,
            canary_id: Some(canary.id),
            reason: why.reason,
            evidence: why.evidence,
            actor: why.actor,
        },
    )
    .await?;
    if let Some(evaluation) = why.evaluation_id {
        let end = StageEnd {
            note: "passed the gate",
            canary_id: Some(canary.id),
            ..Default::default()
        };
        cycles::advance_linked(
            &mut tx,
            Link::Evaluation(evaluation),
            "evaluate",
            "canary",
            &end,
            None,
        )
        .await?;
    }
    tx.commit().await?;
    Ok(canary)
}

/// Ends a running canary without promoting it (`rolled_back`, or
/// `manual_rollback` when a person asked). False when none was running.
pub async fn roll_back_canary(
    pool: &PgPool,
    canary: &Canary,
    kind: &str,
    why: Why<'_>,
) -> anyhow::Result<bool> {
    let mut tx = pool.begin().await?;
    if !canaries::end(&mut tx, canary.id, "rolled_back", why.reason).await? {
        return Ok(false);
    }
    let decision = decisions::record(
        &mut *tx,
        &NewDecision {
            team_id: Some(canary.team_id),
            kind,
            candidate_version_id: Some(canary.candidate_version_id),
            champion_version_id: Some(canary.champion_version_id),
            evaluation_id: canary.evaluation_id,
            canary_id: Some(canary.id),
            reason: why.reason,
            evidence: why.evidence,
            actor: why.actor,
        },
    )
    .await?;
    let end = StageEnd {
        note: "rolled back",
        decision_id: Some(decision),
        ..Default::default()
    };
    let outcome = Some(("rolled_back", why.reason));
    cycles::advance_linked(
        &mut tx,
        Link::Canary(canary.id),
        "canary",
        "done",
        &end,
        outcome,
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// A person's rollback: a running canary is stopped; otherwise the
/// champion the team had before its last promotion comes back.
pub async fn manual_rollback(
    pool: &PgPool,
    team: Uuid,
    reason: &str,
    actor: &str,
) -> anyhow::Result<String> {
    if let Some(c) = canaries::running_for(pool, team).await? {
        let why = Why {
            reason,
            evidence: serde_json::json!({}),
            actor,
            evaluation_id: c.evaluation_id,
            canary_id: Some(c.id),
        };
        roll_back_canary(pool, &c, "manual_rollback", why).await?;
        return Ok("the running canary was stopped".into());
    }
    let previous = decisions::champion_before_last_promotion(pool, team)
        .await?
        .context("no promotion of this team is on record to roll back")?;
    let mut tx = pool.begin().await?;
    let current = models::team_champion(&mut *tx, team).await?;
    models::set_team_champion(&mut tx, team, Some(previous)).await?;
    decisions::record(
        &mut *tx,
        &NewDecision {
            team_id: Some(team),
            kind: "manual_rollback",
            candidate_version_id: current.as_ref().map(|c| c.id),
            champion_version_id: Some(previous),
            reason,
            actor,
            ..Default::default()
        },
    )
    .await?;
    tx.commit().await?;
    let name = models::get(pool, previous)
        .await?
        .map_or_else(|| previous.to_string(), |v| v.name);
    Ok(format!("{name} is the champion again"))
}
