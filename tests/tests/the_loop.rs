//! The loop by itself, end to end: real Postgres, a real gateway serving the
//! tiny model, votes and corrections through the public API, and a worker
//! (its schedule, curation, training, evaluation and promotion queues) with
//! no step in between from the test but more traffic.
//!
//! Cycle 1 learns the team's task from the corrections and is promoted;
//! cycle 2, trained on the cumulative data, is no better than its new
//! champion, so the gate rejects it and the champion stays. Every stage of
//! each cycle is on record, in order, with the run, the evaluation and the
//! decision it made.

use std::time::Duration;

use flywheel_curation::build::Rules;
use flywheel_eval::Policy;
use flywheel_jobs::cycle::LoopConfig;
use flywheel_jobs::schedule::{CurationSchedule, parse_cron};
use flywheel_jobs::worker::WorkerConfig;
use flywheel_store::cycles::Cycle;
use flywheel_tests::tiny_task::{self, ANSWER, GENERAL, ROUTING};
use flywheel_tests::{TestGateway, eventually};
use flywheel_trainer::{LoraConfig, Objective, TrainConfig};
use serde_json::{Value, json};
use uuid::Uuid;

/// Cycle 2's traffic: more of the same task, in prompts never sent before.
const MORE_TASK: [&str; 12] = [
    "route ticket mike",
    "route ticket november",
    "route ticket oscar",
    "route ticket papa",
    "route ticket quebec",
    "route ticket romeo",
    "route ticket sierra",
    "route ticket tango",
    "route ticket uniform",
    "route ticket victor",
    "route ticket whiskey",
    "route ticket xray",
];
/// One chat through the API as end user `user`; returns (id, answer).
async fn chat(gw: &TestGateway, user: &str, prompt: &str) -> (String, String) {
    let (status, body) = gw
        .post(
            &gw.key,
            "/v1/chat/completions",
            json!({"model": gw.model(), "max_tokens": 8, "temperature": 0, "user": user,
                   "messages": [{"role": "user", "content": prompt}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    (
        body["id"].as_str().unwrap().to_string(),
        body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or("")
            .to_string(),
    )
}

/// What an end user does: up when the answer is exactly the task's, else
/// down with the right answer.
async fn rate_task(gw: &TestGateway, user: &str, id: &str, answer: &str) {
    let body = if answer == ANSWER {
        json!({"completion_id": id, "rating": "up", "user": user})
    } else {
        json!({"completion_id": id, "rating": "down", "user": user, "correction": ANSWER})
    };
    let (status, resp) = gw.post(&gw.key, "/v1/feedback", body).await;
    assert_eq!(status, 201, "{resp}");
}

/// The team's cycles, oldest first.
async fn cycles(gw: &TestGateway, team: Uuid) -> Vec<Cycle> {
    let mut c = flywheel_store::cycles::list(&gw.db.pool, Some(team), 50)
        .await
        .unwrap();
    c.reverse();
    c
}

/// Waits for the first cycle after `after` (by id) that ended other than
/// skipped. (A cycle whose slot came while only part of the traffic had
/// arrived ends skipped, below the minimum of new examples.)
async fn decided(gw: &TestGateway, team: Uuid, after: &[Uuid]) -> Cycle {
    let found = eventually(600, || async {
        cycles(gw, team)
            .await
            .into_iter()
            .find(|c| !after.contains(&c.id) && !matches!(c.status.as_str(), "running" | "skipped"))
    })
    .await;
    match found {
        Some(c) => c,
        None => panic!("no cycle was decided: {:#?}", cycles(gw, team).await),
    }
}

/// Waits until the team's votes in Postgres reach `want`.
async fn votes_stored(gw: &TestGateway, want: i64) {
    let stored = gw
        .wait_for_rows(want, |pool, team| async move {
            flywheel_store::feedback::count_for_team(&pool, team)
                .await
                .unwrap()
        })
        .await;
    assert!(stored, "{want} votes in Postgres");
}

fn stages(c: &Cycle) -> Vec<String> {
    flywheel_jobs::cycle::stage_seconds(c)
        .into_iter()
        .map(|(s, _)| s)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_automatic_cycles_promote_a_winner_then_keep_it_against_a_tie() {
    let gw = TestGateway::tiny().await;
    let pool = gw.db.pool.clone();
    let team = gw.team_id().await;
    let base = gw.served.version_id;
    let task = tiny_task::routing_suite();
    flywheel_store::evals::add_suite(
        &pool,
        Some(team),
        &task.name,
        &task.sha256(),
        &serde_json::to_value(&task).unwrap(),
    )
    .await
    .unwrap();
    // Forgetting, as a narrow fine-tune does it: the task's answer to
    // everything.
    let retention = tiny_task::retention_suite(&GENERAL);

    // Cycle 1's traffic: the task, corrected by its users; general
    // questions, whose answers the users like.
    for (i, p) in ROUTING.iter().enumerate() {
        let user = format!("t{i}");
        let (id, answer) = chat(&gw, &user, p).await;
        assert_ne!(answer, ANSWER, "the base does not know the task yet");
        rate_task(&gw, &user, &id, &answer).await;
    }
    for (i, p) in GENERAL.iter().enumerate() {
        let user = format!("g{i}");
        let (id, _) = chat(&gw, &user, p).await;
        let (status, _) = gw
            .post(
                &gw.key,
                "/v1/feedback",
                json!({"completion_id": id, "rating": "up", "user": user}),
            )
            .await;
        assert_eq!(status, 201);
    }

    let home = std::env::temp_dir().join(format!("fw-loop-{}", Uuid::new_v4()));
    votes_stored(&gw, (ROUTING.len() + GENERAL.len()) as i64).await;
    let rules = Rules {
        // Every example trains (the tiny model's task is 12 prompts that
        // differ in one word and teach one answer).
        eval_fraction: 0.0,
        min_eval_examples: 0,
        near_duplicate_threshold: 1.0,
        ..Rules::default()
    };
    let mut w = WorkerConfig::new("loop-test");
    w.heartbeat = Duration::from_secs(1);
    w.max_attempts = 1;
    w.curation = Some(CurationSchedule {
        cron: parse_cron("* * * * * *").unwrap(),
        rules: rules.clone(),
        max_attempts: 1,
        cycles: Some(LoopConfig {
            min_new_examples: 10,
            rules,
            spec: flywheel_jobs::train::RunSpec {
                lora: LoraConfig {
                    rank: 8,
                    alpha: 16.0,
                    ..Default::default()
                },
                // Steps from the dataset's size: 12 passes, 2 examples a
                // step, 30 to 300 steps (checked against the run below).
                train: TrainConfig {
                    objective: Objective::Sft,
                    learning_rate: 2e-2,
                    steps: 300,
                    epochs: 12.0,
                    min_steps: 30,
                    grad_accum: 2,
                    max_grad_accum: 2,
                    ..Default::default()
                },
                external: false,
            },
            max_attempts: 1,
        }),
    });
    w.training = Some(flywheel_jobs::train::TrainEnv {
        artifacts: flywheel_jobs::artifacts::Artifacts::open(
            &home.join("artifacts").display().to_string(),
        )
        .unwrap(),
        work_dir: home.join("work"),
        model_cache: home.join("models"),
        checkpoint_every: 1000,
        nice: 0,
        external: None,
    });
    w.evaluation = Some(flywheel_jobs::evaluate::EvalEnv {
        versions: flywheel_jobs::serving::Versions {
            pool: pool.clone(),
            cache: home.join("models"),
            engine: Default::default(),
        },
        policy: Policy {
            // Promote on the offline evidence (no live canary traffic here);
            // the tiny model's timings are noise.
            canary_share: 0.0,
            max_latency_ratio: 100.0,
            ..Default::default()
        },
        concurrency: 8,
        retention: Some(retention),
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(flywheel_jobs::worker::run(pool.clone(), w, async {
        let _ = stopped.await;
    }));

    // Cycle 1, by itself: curate, train, evaluate, promote.
    let first = decided(&gw, team, &[]).await;
    assert_eq!(first.status, "promoted", "{first:#?}");
    assert_eq!(first.trigger, "schedule");
    assert_eq!(
        stages(&first),
        ["curate", "train", "evaluate"],
        "{first:#?}"
    );
    let dataset = flywheel_store::datasets::get(&pool, first.dataset_version_id.unwrap())
        .await
        .unwrap()
        .unwrap();
    // 12 corrections and the liked general answers (an empty one is left
    // out by the curation rules).
    assert!((12..=24).contains(&dataset.sft_count), "{dataset:?}");
    let run = flywheel_store::training::get(&pool, first.training_run_id.unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(run.status.as_str(), "succeeded");
    assert_eq!(run.dataset_version_id, dataset.id);
    assert_eq!(run.base_version_id, base, "trained from the base");
    let candidate = first.candidate_version_id.unwrap();
    assert_eq!(run.candidate_version_id, Some(candidate));
    let e = flywheel_store::evals::get(&pool, first.evaluation_id.unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((e.passed, e.champion_version_id), (Some(true), base));
    let metrics = flywheel_store::evals::metrics(&pool, e.id).await.unwrap();
    let routing = metrics.iter().find(|m| m.suite == "routing").unwrap();
    assert!(
        routing.candidate > 0.9 && routing.champion < 0.1,
        "{routing:?}"
    );
    let decisions = flywheel_store::decisions::list(&pool, Some(team), 10)
        .await
        .unwrap();
    assert_eq!(decisions[0].id, first.decision_id.unwrap());
    assert_eq!(decisions[0].kind, "promote");
    let champion = flywheel_store::models::team_champion(&pool, team)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(champion.id, candidate);
    // Each stage's wall time, and the stages back to back.
    let recorded = first.stages.as_array().unwrap();
    for pair in recorded.windows(2) {
        assert_eq!(pair[0]["finished_at"], pair[1]["started_at"]);
    }
    assert!(
        recorded
            .iter()
            .all(|s| s["seconds"].as_f64().unwrap() >= 0.0)
    );
    // The run's steps were fixed from the version's training examples
    // when it was queued.
    let train_examples =
        flywheel_store::datasets::count_examples(&pool, dataset.id, "sft", "train")
            .await
            .unwrap();
    let steps = ((12 * train_examples + 1) / 2).clamp(30, 300);
    assert!(steps < 300, "the bound, not the dataset, set {steps} steps");
    assert_eq!(i64::from(run.total_steps), steps);
    assert!(
        recorded[1]["note"]
            .as_str()
            .unwrap()
            .contains(&format!("{steps} steps")),
        "{recorded:?}"
    );
    // Nothing new: no second cycle starts by itself.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        cycles(&gw, team).await.len(),
        1,
        "one cycle for one batch of feedback"
    );

    // The team is served by its new champion; more traffic, rated as before.
    eventually(20, || async {
        let (_, answer) = chat(&gw, "probe", ROUTING[0]).await;
        (answer == ANSWER).then_some(())
    })
    .await
    .expect("the promoted candidate answers the team's requests");
    for (i, p) in MORE_TASK.iter().enumerate() {
        let user = format!("m{i}");
        let (id, answer) = chat(&gw, &user, p).await;
        rate_task(&gw, &user, &id, &answer).await;
    }

    // Cycle 2, by itself: its candidate is no better than the champion on
    // the task, so it is rejected and the champion stays.
    let second = decided(&gw, team, &[first.id]).await;
    assert_eq!(second.status, "rejected", "{second:#?}");
    assert_eq!(stages(&second), ["curate", "train", "evaluate"]);
    let reason = second.reason.clone().unwrap();
    assert!(reason.contains("FAIL: task suite routing"), "{reason}");
    let run2 = flywheel_store::training::get(&pool, second.training_run_id.unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(run2.base_version_id, base, "again from the base");
    let v2 = flywheel_store::datasets::get(&pool, second.dataset_version_id.unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(v2.version > dataset.version, "{v2:?}");
    // The slot may come while part of cycle 2's votes are still arriving:
    // what it needs is the minimum of new examples of any kind (a
    // correction makes three: SFT, DPO and KTO), on top of everything
    // cycle 1 trained on.
    let examples =
        |v: &flywheel_store::datasets::DatasetVersion| v.sft_count + v.dpo_count + v.kto_count;
    assert!(
        examples(&v2) >= examples(&dataset) + 10,
        "{dataset:?} -> {v2:?}"
    );
    assert!(v2.sft_count > dataset.sft_count, "cumulative: {v2:?}");
    for c in cycles(&gw, team).await {
        if c.status == "skipped" {
            let why = c.reason.unwrap_or_default();
            assert!(
                why.contains("new examples since the last run; 10 needed"),
                "{why}"
            );
        }
    }
    let e2 = flywheel_store::evals::get(&pool, second.evaluation_id.unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        e2.champion_version_id, candidate,
        "against cycle 1's winner"
    );
    assert_eq!(e2.passed, Some(false));
    let d: Value = serde_json::to_value(
        &flywheel_store::decisions::list(&pool, Some(team), 1)
            .await
            .unwrap()[0],
    )
    .unwrap();
    assert_eq!(d["kind"], "reject");
    assert_eq!(d["id"], json!(second.decision_id.unwrap()));
    let champion = flywheel_store::models::team_champion(&pool, team)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(champion.id, candidate, "the champion stays");

    let _ = stop.send(());
    worker.await.unwrap().unwrap();
}
