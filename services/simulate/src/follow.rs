//! Following the loop while the simulation waits for it: which cycle of the
//! team turned after a batch of traffic, how it ended and what each stage
//! took. While a cycle of the team runs a canary, the simulated users keep
//! chatting (the batch's requests again, from other users drawn the same
//! way), so the canary's live thumbs come from traffic as its own would.

use std::time::{Duration, Instant};

use anyhow::bail;
use chrono::{DateTime, Utc};
use flywheel_store::PgPool;
use flywheel_store::cycles::{self, Stage, Status};
use serde::Serialize;
use uuid::Uuid;

use crate::play::{self, Target, Traffic};
use crate::scenario::Scenario;

/// What the loop did with a batch's traffic.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Turned {
    pub cycle_id: Uuid,
    pub status: String,
    pub reason: Option<String>,
    /// Seconds per stage, in order.
    pub stages: Vec<(String, f64)>,
    /// Cycles that ended skipped meanwhile (too few new examples yet).
    pub skipped: usize,
    /// From the traffic's end to the cycle's end.
    pub waited_seconds: f64,
    /// The chats sent while a canary ran, per version that answered.
    pub canary_traffic: Option<Traffic>,
}

/// The chats users keep sending while a canary runs.
#[derive(Debug, Clone, Copy)]
pub struct KeepChatting<'a> {
    pub scenario: &'a Scenario,
    pub target: &'a Target,
    /// The batch whose requests are sent again: traffic items `batch.0 ..
    /// batch.0 + batch.1`.
    pub batch: (usize, usize),
    /// Chats sent at once between looks at the cycle.
    pub chunk: usize,
}

/// Where the draws of chats sent again start: apart from every traffic
/// chat's and second rater's.
const AGAIN: usize = 1 << 48;

/// Waits until a cycle of `team` started after `since` has trained and
/// ended, with no cycle of the team running; chats as `chatting` says
/// while one runs a canary.
pub async fn follow_loop(
    pool: &PgPool,
    team: Uuid,
    since: DateTime<Utc>,
    timeout: Duration,
    chatting: KeepChatting<'_>,
) -> anyhow::Result<Turned> {
    let t0 = Instant::now();
    let mut canary: Option<Traffic> = None;
    let mut sent = 0usize;
    loop {
        let all = cycles::list(pool, Some(team), 100).await?;
        let in_canary = all
            .iter()
            .any(|c| c.status == Status::Running && c.stage == Stage::Canary);
        if in_canary {
            let (first, len) = chatting.batch;
            let chats: Vec<(usize, usize)> = (sent..sent + chatting.chunk.max(1))
                .map(|n| (first + n % len.max(1), AGAIN + first + n))
                .collect();
            sent += chats.len();
            let t = play::send(chatting.scenario, chatting.target, chats).await?;
            canary.get_or_insert_with(Traffic::default).add(&t);
            continue;
        }
        let recent: Vec<_> = all.into_iter().filter(|c| c.created_at >= since).collect();
        let running = recent.iter().any(|c| c.status == Status::Running);
        let trained = recent
            .iter()
            .find(|c| c.training_run_id.is_some() && c.status != Status::Running);
        if let (false, Some(c)) = (running, trained) {
            return Ok(Turned {
                cycle_id: c.id,
                status: c.status.to_string(),
                reason: c.reason.clone(),
                stages: c
                    .stage_records()
                    .into_iter()
                    .map(|s| (s.stage.to_string(), s.seconds))
                    .collect(),
                skipped: recent
                    .iter()
                    .filter(|c| c.status == Status::Skipped)
                    .count(),
                waited_seconds: t0.elapsed().as_secs_f64(),
                canary_traffic: canary,
            });
        }
        if t0.elapsed() > timeout {
            bail!(
                "the loop did not turn within {} minutes (is a worker running, with \
                 FLYWHEEL_TRAIN_MIN_NEW_EXAMPLES above 0?)",
                timeout.as_secs() / 60
            );
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}
