//! The loop on the tiny model as a team gets it by default, for the tests
//! of the loop: a worker with the shipped settings (read from the binary's
//! configuration; each one changed here says why), the tiny task's traffic
//! through the public API as its end users send it, and their votes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use flywheel_eval::Suite;
use flywheel_jobs::evaluate::EvalEnv;
use flywheel_jobs::stages::Work;
use flywheel_jobs::train::{RunSpec, TrainEnv};
use flywheel_jobs::worker::WorkerConfig;
use flywheel_loop::LoopConfig;
use flywheel_model::Proj;
use flywheel_store::PgPool;
use flywheel_store::cycles::{Cycle, Status};
use flywheel_trainer::{LoraConfig, TrainConfig};
use serde_json::json;
use uuid::Uuid;

use crate::gateway::TestGateway;
use crate::tiny_task::{ANSWER, GENERAL};
use crate::wait::eventually;

/// Where a test's worker keeps its files.
pub fn home() -> PathBuf {
    std::env::temp_dir().join(format!("fw-loop-{}", Uuid::new_v4()))
}

/// The retention suite the tiny model is judged on. The shipped one asks
/// facts no random-weight model knows; this one asks what a narrow
/// fine-tune of it loses: general prompts must not get the task's answer.
pub fn retention() -> Suite {
    crate::tiny_task::retention_suite(&GENERAL)
}

/// What a cycle's stages run with: the shipped curation rules and job
/// attempts, and the shipped training spec except what the tiny model
/// needs to learn in the steps a run takes: a learning rate of 2e-2 (its
/// random weights move nowhere at the default 3e-4 in 150 steps) on the
/// attention projections at rank 8 (on every projection, the default, it
/// did not learn the task at that rate: 0% on its routing suite).
pub fn work() -> Work {
    let cfg = crate::config();
    Work {
        rules: cfg.jobs.curation_rules.clone(),
        spec: RunSpec {
            lora: LoraConfig {
                rank: 8,
                alpha: 16.0,
                targets: vec![Proj::Q, Proj::K, Proj::V, Proj::O],
                ..Default::default()
            },
            train: TrainConfig {
                learning_rate: 2e-2,
                ..Default::default()
            },
            external: false,
        },
        max_attempts: cfg.jobs.max_attempts,
        distill: None,
    }
}

/// The loop's settings: the shipped minimum of new examples and the gate's
/// shipped minimum of held-out evidence.
pub fn loop_config() -> LoopConfig {
    let cfg = crate::config();
    work().loop_config(
        cfg.training.min_new_examples as i64,
        cfg.promotion.min_items,
    )
}

/// A worker with the shipped settings, but: a heartbeat of 1 s (an idle
/// worker looks for new jobs on each; 3 s would only add waiting), the
/// canary checked every second (not every 30 s: the test waits for the
/// monitor's verdict, not for its clock), no curation schedule (cycles are
/// started as `flywheel loop` starts them), and the tiny retention suite.
pub fn worker(pool: &PgPool, home: &Path, name: &str) -> WorkerConfig {
    let cfg = crate::config();
    let mut w = WorkerConfig::new(name);
    w.heartbeat = Duration::from_secs(1);
    w.max_attempts = cfg.jobs.max_attempts;
    w.backoff.base = Duration::from_secs(cfg.jobs.backoff_secs);
    w.training = Some(TrainEnv {
        artifacts: flywheel_modelhub::Artifacts::open(
            &home.join("artifacts").display().to_string(),
        )
        .unwrap(),
        work_dir: home.join("work"),
        model_cache: home.join("models"),
        checkpoint_every: cfg.training.checkpoint_every,
        nice: cfg.training.nice,
        external: None,
    });
    w.evaluation = Some(EvalEnv {
        versions: flywheel_modelhub::Versions {
            pool: pool.clone(),
            cache: home.join("models"),
            engine: Default::default(),
        },
        policy: cfg.promotion.clone(),
        concurrency: cfg.eval_concurrency,
        retention: Some(retention()),
        upstream: Default::default(),
    });
    w.canary_check = Some(Duration::from_secs(1));
    w
}

/// Runs `w` until the returned sender is dropped or sent to.
pub fn spawn_worker(
    pool: &PgPool,
    w: WorkerConfig,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(flywheel_jobs::worker::run(pool.clone(), w, async {
        let _ = stopped.await;
    }));
    (stop, handle)
}

/// One chat through the API as end user `user`: (completion id, answer,
/// the version that answered).
pub async fn chat(gw: &TestGateway, user: &str, prompt: &str) -> (String, String, String) {
    let (status, body) = gw
        .post(
            &gw.key,
            "/v1/chat/completions",
            json!({"model": gw.model(), "max_tokens": 8, "temperature": 0, "user": user,
                   "messages": [{"role": "user", "content": prompt}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
    (
        text(&body["id"]),
        text(&body["choices"][0]["message"]["content"]),
        text(&body["system_fingerprint"]),
    )
}

/// An end user's vote, with a correction when given.
pub async fn vote(gw: &TestGateway, user: &str, id: &str, up: bool, correction: Option<&str>) {
    let mut body = json!({"completion_id": id, "rating": if up { "up" } else { "down" },
                          "user": user});
    if let Some(c) = correction {
        body["correction"] = c.into();
    }
    let (status, resp) = gw.post(&gw.key, "/v1/feedback", body).await;
    assert_eq!(status, 201, "{resp}");
}

/// What the team's users do with a routing answer: up when it is the
/// task's, else down with the right answer.
pub async fn rate_routing(gw: &TestGateway, user: &str, id: &str, answer: &str) {
    if answer == ANSWER {
        vote(gw, user, id, true, None).await;
    } else {
        vote(gw, user, id, false, Some(ANSWER)).await;
    }
}

/// What a batch of traffic sent: answers already right, votes, and the
/// training examples curation will make of them. The tiny model often
/// answers with nothing printable; a corrected empty answer still teaches
/// its correction (one SFT example) but makes no preference pair or KTO
/// vote, and a liked empty one makes nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sent {
    pub right: usize,
    pub votes: usize,
    pub examples: usize,
}

/// Each prompt sent once by its own user (`{prefix}{i}`) and rated as
/// [`rate_routing`] does.
pub async fn routing_traffic(gw: &TestGateway, prefix: &str, prompts: &[String]) -> Sent {
    let mut sent = Sent::default();
    for (i, p) in prompts.iter().enumerate() {
        let user = format!("{prefix}{i}");
        let (id, answer, _) = chat(gw, &user, p).await;
        let printable = !answer.trim().is_empty();
        sent.votes += 1;
        if answer == ANSWER {
            sent.right += 1;
            sent.examples += 2;
        } else {
            sent.examples += 1 + 2 * usize::from(printable);
        }
        rate_routing(gw, &user, &id, &answer).await;
    }
    sent
}

/// Each general prompt sent once and its answer liked.
pub async fn liked_general(gw: &TestGateway, prefix: &str, prompts: &[String]) -> Sent {
    let mut sent = Sent::default();
    for (i, p) in prompts.iter().enumerate() {
        let user = format!("{prefix}{i}");
        let (id, answer, _) = chat(gw, &user, p).await;
        sent.votes += 1;
        sent.examples += 2 * usize::from(!answer.trim().is_empty());
        vote(gw, &user, &id, true, None).await;
    }
    sent
}

/// Waits until the team's votes in Postgres reach `want`.
pub async fn votes_stored(gw: &TestGateway, want: i64) {
    let stored = gw
        .wait_for_rows(want, |pool, team| async move {
            flywheel_store::feedback::count_for_team(&pool, team)
                .await
                .unwrap()
        })
        .await;
    assert!(stored, "{want} votes in Postgres");
}

/// Waits (up to `secs`) until cycle `id` is no longer running, or is at
/// `stage` if one is given; panics with the cycle otherwise.
pub async fn wait_cycle(
    pool: &PgPool,
    id: Uuid,
    stage: Option<flywheel_store::cycles::Stage>,
    secs: u64,
) -> Cycle {
    let get = || async {
        flywheel_store::cycles::get(pool, id)
            .await
            .unwrap()
            .unwrap()
    };
    let found = eventually(secs, || async {
        let c = get().await;
        let done = match stage {
            Some(s) => c.stage == s || c.status != Status::Running,
            None => c.status != Status::Running,
        };
        done.then_some(c)
    })
    .await;
    match found {
        Some(c) => c,
        None => panic!("cycle {id} did not get there: {:#?}", get().await),
    }
}
