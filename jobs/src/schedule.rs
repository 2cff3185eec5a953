//! Cron-style schedules. Every worker runs the schedule; each slot is claimed
//! in Postgres, so a slot enqueues its jobs once however many workers run.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use flywheel_curation::build::Rules;
use flywheel_store::PgPool;
use flywheel_store::datasets::{self, Scope};

use crate::curate::CurateJob;
use crate::queue;

/// The scheduled curation: its name in `schedule_ticks` and its cron
/// expression (seconds first, as the `cron` crate reads it).
#[derive(Debug, Clone)]
pub struct CurationSchedule {
    pub cron: cron::Schedule,
    pub rules: Rules,
    pub max_attempts: u32,
    /// Checked on the same slots, after curation is queued.
    pub training: Option<TrainingTrigger>,
}

pub const CURATION_SCHEDULE: &str = "curation";

/// Every 15 minutes, on the quarter hour.
pub const DEFAULT_CURATION_CRON: &str = "0 */15 * * * *";

pub fn parse_cron(expr: &str) -> anyhow::Result<cron::Schedule> {
    cron::Schedule::from_str(expr).map_err(|e| anyhow::anyhow!("bad cron expression `{expr}`: {e}"))
}

/// Fires one slot: when this caller claims it, enqueues a curation job for
/// every team with feedback newer than its latest dataset version. Returns
/// the task ids enqueued (empty when another worker had the slot).
pub async fn fire_curation(
    pool: &PgPool,
    s: &CurationSchedule,
    slot: DateTime<Utc>,
) -> anyhow::Result<Vec<String>> {
    let mut tx = pool.begin().await?;
    if !flywheel_store::jobs::claim_tick(&mut *tx, CURATION_SCHEDULE, slot).await? {
        return Ok(Vec::new());
    }
    let mut ids = Vec::new();
    for team in datasets::teams_with_new_feedback(&mut *tx).await? {
        let job = CurateJob {
            scope: Scope::Team(team),
            rules: s.rules.clone(),
            until: None,
        };
        ids.push(queue::push(&mut tx, queue::CURATION, &job, s.max_attempts).await?);
    }
    tx.commit().await?;
    Ok(ids)
}

/// Runs the schedule until `shutdown` resolves.
pub async fn run_curation_schedule(
    pool: PgPool,
    s: CurationSchedule,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let Some(slot) = s.cron.upcoming(Utc).next() else {
            return;
        };
        let wait = (slot - Utc::now()).to_std().unwrap_or_default();
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(wait) => {}
        }
        match fire_curation(&pool, &s, slot).await {
            Ok(ids) if !ids.is_empty() => {
                tracing::info!(%slot, jobs = ids.len(), "scheduled curation enqueued")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(%slot, error = %e, "scheduled curation failed to enqueue"),
        }
        if let Some(t) = &s.training
            && let Err(e) = fire_training(&pool, t, slot).await
        {
            tracing::warn!(%slot, error = %e, "training trigger failed");
        }
    }
}

/// The scheduled training trigger: starts a run on the champion when a
/// team's newest dataset version has at least `min_new_examples` more
/// examples than the version of its last run.
#[derive(Debug, Clone)]
pub struct TrainingTrigger {
    pub min_new_examples: i64,
    pub spec: crate::train::RunSpec,
    pub max_attempts: u32,
}

pub const TRAINING_SCHEDULE: &str = "training";

/// Fires the trigger for one slot; returns the run it queued, if any. At
/// most one run per base at a time, so at most one team per slot.
pub async fn fire_training(
    pool: &PgPool,
    t: &TrainingTrigger,
    slot: DateTime<Utc>,
) -> anyhow::Result<Option<uuid::Uuid>> {
    if !flywheel_store::jobs::claim_tick(pool, TRAINING_SCHEDULE, slot).await? {
        return Ok(None);
    }
    let Some(champion) = flywheel_store::models::champion(pool).await? else {
        return Ok(None);
    };
    if flywheel_store::training::active_on_base(pool, champion.id).await? {
        return Ok(None);
    }
    for p in flywheel_store::training::team_progress(pool).await? {
        if p.latest_examples - p.trained_examples < t.min_new_examples {
            continue;
        }
        let mut spec = t.spec.clone();
        let v = flywheel_store::datasets::get(pool, p.latest_version_id)
            .await?
            .ok_or_else(|| anyhow::anyhow!("dataset version vanished"))?;
        spec.train.objective = if v.sft_count > 0 {
            flywheel_trainer::Objective::Sft
        } else if v.dpo_count > 0 {
            flywheel_trainer::Objective::Dpo
        } else {
            flywheel_trainer::Objective::Kto
        };
        match crate::train::create_run(pool, v.id, champion.id, &spec, t.max_attempts).await {
            Ok((run, _)) => {
                tracing::info!(%run, team = %p.team_id, "scheduled training run queued");
                return Ok(Some(run));
            }
            // Another process queued one for this base meanwhile.
            Err(e) if e.to_string().contains("already queued or running") => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}
