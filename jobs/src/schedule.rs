//! Cron-style schedules. Every worker runs the schedule; each slot is claimed
//! in Postgres, so a slot enqueues its jobs (or starts its cycles) once
//! however many workers run.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use flywheel_curation::build::Rules;
use flywheel_store::PgPool;
use flywheel_store::datasets::{self, Scope};

use flywheel_loop::LoopConfig;
use flywheel_store::cycles::Trigger;

use crate::curate::CurateJob;
use crate::queue;
use crate::stages::JobQueue;

/// The scheduled curation: its name in `schedule_ticks` and its cron
/// expression (seconds first, as the `cron` crate reads it).
#[derive(Debug, Clone)]
pub struct CurationSchedule {
    pub cron: cron::Schedule,
    pub rules: Rules,
    pub max_attempts: u32,
    /// The loop: each slot starts a cycle (curation first) for the teams
    /// with something new, instead of a bare curation. `None`: curation
    /// only.
    pub cycles: Option<LoopConfig>,
}

pub const CURATION_SCHEDULE: &str = "curation";

/// Every 15 minutes, on the quarter hour.
pub const DEFAULT_CURATION_CRON: &str = "0 */15 * * * *";

pub fn parse_cron(expr: &str) -> anyhow::Result<cron::Schedule> {
    cron::Schedule::from_str(expr).map_err(|e| anyhow::anyhow!("bad cron expression `{expr}`: {e}"))
}

/// Fires one slot: when this caller claims it, enqueues a curation job (or,
/// with the loop on, starts a cycle) for every team with feedback newer
/// than its latest dataset version; with the loop on, also for every team
/// whose latest version holds enough examples its last run did not have
/// (its last cycle was skipped while the base was busy). A team with a
/// cycle running waits for it. Returns the task or cycle ids (empty when
/// another worker had the slot).
pub async fn fire_curation(
    pool: &PgPool,
    s: &CurationSchedule,
    slot: DateTime<Utc>,
) -> anyhow::Result<Vec<String>> {
    let mut tx = pool.begin().await?;
    if !flywheel_store::jobs::claim_tick(&mut *tx, CURATION_SCHEDULE, slot).await? {
        return Ok(Vec::new());
    }
    let mut teams = datasets::teams_with_new_feedback(&mut *tx).await?;
    let mut ids = Vec::new();
    match &s.cycles {
        None => {
            for team in teams {
                let job = CurateJob {
                    scope: Scope::Team(team),
                    rules: s.rules.clone(),
                    until: None,
                    cycle: None,
                };
                ids.push(queue::push(&mut tx, queue::CURATION, &job, s.max_attempts).await?);
            }
        }
        Some(cfg) => {
            for p in flywheel_store::training::team_progress(&mut *tx).await? {
                if p.latest_examples - p.trained_examples >= cfg.min_new_examples {
                    teams.push(p.team_id);
                }
            }
            let running = flywheel_store::cycles::running_teams(&mut *tx).await?;
            teams.sort();
            teams.dedup();
            teams.retain(|t| !running.contains(t));
            let queue = JobQueue {
                max_attempts: s.max_attempts,
            };
            for team in teams {
                let started =
                    flywheel_loop::cycle::start_in(&mut tx, &queue, team, Trigger::Schedule, cfg)
                        .await?;
                if let Some(id) = started {
                    ids.push(id.to_string());
                }
            }
        }
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
            Ok(ids) if !ids.is_empty() && s.cycles.is_some() => {
                tracing::info!(%slot, cycles = ids.len(), "scheduled cycles started")
            }
            Ok(ids) if !ids.is_empty() => {
                tracing::info!(%slot, jobs = ids.len(), "scheduled curation enqueued")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(%slot, error = %e, "scheduled curation failed to enqueue"),
        }
    }
}
