//! The canary monitor: every few seconds each worker looks at the running
//! canaries and applies the sequential test to their live thumbs
//! ([`flywheel_eval::gate::judge_canary`]): promote, roll back, or wait.
//! Ending a canary is conditional on it still running, so two workers never
//! decide the same canary twice.

use flywheel_eval::{CanaryVerdict, Policy};
use flywheel_store::PgPool;
use flywheel_store::canaries::{self, Canary};

use crate::promote::{self, LOOP, Why};

/// What one check of one canary did.
#[derive(Debug, Clone, PartialEq)]
pub enum Checked {
    Waiting { prob_better: f64 },
    Promoted(String),
    RolledBack(String),
}

/// Checks one canary now.
pub async fn check(pool: &PgPool, policy: &Policy, c: &Canary) -> anyhow::Result<Checked> {
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
    match verdict {
        CanaryVerdict::Continue { prob_better } => Ok(Checked::Waiting { prob_better }),
        CanaryVerdict::Promote { reason, .. } => {
            let candidate = flywheel_store::models::get(pool, c.candidate_version_id)
                .await?
                .ok_or_else(|| anyhow::anyhow!("the canary's version is gone"))?;
            // Still running? (Another worker may have decided it.)
            if canaries::running_for(pool, c.team_id)
                .await?
                .is_none_or(|r| r.id != c.id)
            {
                return Ok(Checked::Waiting { prob_better: 1.0 });
            }
            promote::promote(
                pool,
                c.team_id,
                &candidate,
                "canary_passed",
                Why {
                    reason: &reason,
                    evidence,
                    actor: LOOP,
                    evaluation_id: c.evaluation_id,
                    canary_id: Some(c.id),
                },
            )
            .await?;
            Ok(Checked::Promoted(reason))
        }
        CanaryVerdict::RollBack { reason, .. } => {
            promote::roll_back_canary(
                pool,
                c,
                "rolled_back",
                Why {
                    reason: &reason,
                    evidence,
                    actor: LOOP,
                    evaluation_id: c.evaluation_id,
                    canary_id: Some(c.id),
                },
            )
            .await?;
            Ok(Checked::RolledBack(reason))
        }
    }
}

/// Checks every running canary.
pub async fn check_all(pool: &PgPool, policy: &Policy) -> anyhow::Result<Vec<(Canary, Checked)>> {
    let mut out = Vec::new();
    for c in canaries::running(pool).await? {
        let checked = check(pool, policy, &c).await?;
        match &checked {
            Checked::Promoted(why) => tracing::info!(canary = %c.id, %why, "canary promoted"),
            Checked::RolledBack(why) => tracing::info!(canary = %c.id, %why, "canary rolled back"),
            Checked::Waiting { .. } => {}
        }
        out.push((c, checked));
    }
    Ok(out)
}

/// Runs the monitor until `shutdown` resolves.
pub async fn monitor(
    pool: PgPool,
    policy: Policy,
    every: std::time::Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(every) => {}
        }
        if let Err(e) = check_all(&pool, &policy).await {
            tracing::warn!(error = %format!("{e:#}"), "canary check failed");
        }
    }
}
