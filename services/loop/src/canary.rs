//! A canary's live verdict: its thumbs and the champion's since it started,
//! through the sequential test ([`flywheel_eval::gate::judge_canary`]):
//! promote, roll back, or wait. Ending a canary is conditional on it still
//! running, so two workers checking at once never decide it twice. The
//! worker's monitor calls [`check_all`] every few seconds.

use flywheel_eval::{CanaryVerdict, Policy};
use flywheel_store::PgPool;
use flywheel_store::canaries::{self, Canary};
use flywheel_store::decisions::DecisionKind;

use crate::decide::{self, Why};
use crate::{LOOP_ACTOR, LoopError, Result};

/// What one check of one canary did.
#[derive(Debug, Clone, PartialEq)]
pub enum Checked {
    Waiting { prob_better: f64 },
    Promoted(String),
    RolledBack(String),
}

/// Checks one canary now.
pub async fn check(pool: &PgPool, policy: &Policy, c: &Canary) -> Result<Checked> {
    let (canary, champion) = canaries::arms(pool, c).await?;
    let overdue = chrono::Utc::now() >= c.deadline;
    let verdict = flywheel_eval::gate::judge_canary(
        policy,
        (canary.up as u64, canary.down as u64),
        (champion.up as u64, champion.down as u64),
        overdue,
    );
    let evidence = serde_json::json!({
        "canary": {"completions": canary.completions, "up": canary.up, "down": canary.down},
        "champion": {"completions": champion.completions, "up": champion.up, "down": champion.down},
        "verdict": verdict,
    });
    let why = |reason| Why {
        reason,
        evidence: evidence.clone(),
        actor: LOOP_ACTOR,
        evaluation_id: c.evaluation_id,
        canary_id: Some(c.id),
    };
    match &verdict {
        CanaryVerdict::Continue { prob_better } => Ok(Checked::Waiting {
            prob_better: *prob_better,
        }),
        CanaryVerdict::Promote { reason, .. } => {
            let candidate = flywheel_store::models::get(pool, c.candidate_version_id)
                .await?
                .ok_or_else(|| LoopError::NotFound("the canary's version is gone".into()))?;
            // Still running? (Another worker may have decided it.)
            if canaries::running_for(pool, c.team_id)
                .await?
                .is_none_or(|r| r.id != c.id)
            {
                return Ok(Checked::Waiting { prob_better: 1.0 });
            }
            let kind = DecisionKind::CanaryPassed;
            decide::promote(pool, c.team_id, &candidate, kind, why(reason)).await?;
            Ok(Checked::Promoted(reason.clone()))
        }
        CanaryVerdict::RollBack { reason, .. } => {
            let kind = DecisionKind::RolledBack;
            decide::roll_back_canary(pool, c, kind, why(reason)).await?;
            Ok(Checked::RolledBack(reason.clone()))
        }
    }
}

/// Checks every running canary; one that cannot be checked is logged and
/// the others are still checked.
pub async fn check_all(pool: &PgPool, policy: &Policy) -> Result<Vec<(Canary, Checked)>> {
    let mut out = Vec::new();
    for c in canaries::running(pool).await? {
        let checked = match check(pool, policy, &c).await {
            Ok(checked) => checked,
            Err(e) => {
                tracing::warn!(canary = %c.id, error = %e, "canary check failed");
                continue;
            }
        };
        match &checked {
            Checked::Promoted(why) => tracing::info!(canary = %c.id, %why, "canary promoted"),
            Checked::RolledBack(why) => tracing::info!(canary = %c.id, %why, "canary rolled back"),
            Checked::Waiting { .. } => {}
        }
        out.push((c, checked));
    }
    Ok(out)
}
