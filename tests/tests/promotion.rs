//! Promote only winners, on real Postgres, the tiny model, a real gateway:
//! a better candidate passes the gate and serves its team only; one that
//! forgets is rejected with the reason stored; an evaluation reads the
//! answers a version gave before; a canary worse on live thumbs is rolled
//! back by itself; a swap under 16 streams fails none and
//! changes none mid-stream; a slow load never holds up a loaded model.
//!
//! Candidates are real LoRA adapters trained here on the tiny model (its
//! answers are random text, so what counts is that the mechanics move the
//! right way: the task's answer learned, the retention answers kept or not).

use std::sync::Arc;
use std::time::Duration;

use flywheel_eval::Policy;
use flywheel_eval::suite::Suite;
use flywheel_gateway::GatewayConfig;
use flywheel_jobs::evaluate::{EvalEnv, EvalJob};
use flywheel_model::Proj;
use flywheel_store::canaries::CanaryStatus;
use flywheel_store::decisions::DecisionKind;
use flywheel_store::models::{Lineage, ModelVersion};
use flywheel_tests::tiny_task::{self, ANSWER, GENERAL, ROUTING, user};
use flywheel_tests::{TestGateway, eventually};
use flywheel_trainer::data::Message;
use flywheel_trainer::{Base, Example, Lora, LoraConfig, Objective, TrainConfig, Trainer};
use futures::StreamExt;
use serde_json::{Value, json};
use uuid::Uuid;

/// What the base says to the general prompts (greedy, 8 tokens), and the
/// retention suite over them.
async fn retention_suite(gw: &TestGateway) -> (Suite, Vec<String>) {
    let served = flywheel_eval::run::Served {
        engine: gw.engine().clone(),
        adapter: None,
        memo: None,
    };
    let mut answers = Vec::new();
    for p in GENERAL {
        let g = flywheel_eval::run::generate(&served, &user(p), 8, 0.0)
            .await
            .unwrap();
        answers.push(g.text);
    }
    (tiny_task::retention_suite(&GENERAL), answers)
}

/// A LoRA adapter trained on `pairs` (prompt, answer) from the tiny base,
/// registered as a candidate version of `team` served on its base.
async fn candidate(
    gw: &TestGateway,
    name: &str,
    team: Option<Uuid>,
    pairs: Vec<(String, String)>,
) -> ModelVersion {
    let base_row = flywheel_store::models::get(&gw.db.pool, gw.served.version_id)
        .await
        .unwrap()
        .unwrap();
    let path = base_row.path.clone();
    let dir = std::env::temp_dir().join(format!("fw-cand-{}", Uuid::new_v4()));
    let (lora, dir) = tokio::task::spawn_blocking(move || {
        let base = Base::load(std::path::Path::new(&path)).unwrap();
        let examples: Vec<Example> = pairs
            .iter()
            .map(|(p, a)| Example::Sft {
                prompt: base
                    .encode(
                        &[Message {
                            role: "user".into(),
                            content: p.clone(),
                        }],
                        a,
                    )
                    .unwrap(),
            })
            .collect();
        let lora = Lora::new(
            &base.model,
            // The attention projections only: at this learning rate the
            // tiny model learns the task there (with every projection, the
            // default, it did not: 0% on the routing suite).
            LoraConfig {
                rank: 8,
                alpha: 16.0,
                targets: vec![Proj::Q, Proj::K, Proj::V, Proj::O],
                ..Default::default()
            },
        )
        .unwrap();
        let config = TrainConfig {
            objective: Objective::Sft,
            learning_rate: 2e-2,
            steps: 300,
            grad_accum: 2,
            ..Default::default()
        };
        let mut t = Trainer::new(&base.model, lora, config, examples).unwrap();
        for _ in 0..300 {
            t.train_step().unwrap();
        }
        let mut lora = t.lora;
        lora.training = false;
        flywheel_trainer::peft::save(&lora, &base.model, "tiny", &dir).unwrap();
        (lora, dir)
    })
    .await
    .unwrap();
    let artifacts = flywheel_modelhub::Artifacts::open(
        &std::env::temp_dir()
            .join(format!("fw-art-{}", Uuid::new_v4()))
            .display()
            .to_string(),
    )
    .unwrap();
    let v = flywheel_jobs::train::register_candidate(
        &gw.db.pool,
        &artifacts,
        &std::env::temp_dir().join(format!("fw-cache-{}", Uuid::new_v4())),
        &flywheel_jobs::train::Candidate {
            base_path: std::path::Path::new(&base_row.path),
            lora: &lora,
            name,
            note: "test candidate",
            lineage: &Lineage {
                base_version_id: Some(base_row.id),
                dataset_version_id: None,
                adapter_path: Some(dir.display().to_string()),
                training: None,
            },
        },
    )
    .await
    .unwrap();
    flywheel_store::models::set_scope(&gw.db.pool, v.id, team, false)
        .await
        .unwrap();
    flywheel_store::models::get(&gw.db.pool, v.id)
        .await
        .unwrap()
        .unwrap()
}

/// The task, with the base's own answers to the general prompts replayed:
/// what a candidate that learns without forgetting trains on.
fn task_and_replay(answers: &[String]) -> Vec<(String, String)> {
    ROUTING
        .iter()
        .map(|p| (p.to_string(), ANSWER.to_string()))
        .chain(
            GENERAL
                .iter()
                .zip(answers)
                .map(|(p, a)| (p.to_string(), a.clone())),
        )
        .collect()
}

fn env(gw: &TestGateway, retention: Suite, canary_share: f64) -> EvalEnv {
    EvalEnv {
        versions: flywheel_modelhub::Versions {
            pool: gw.db.pool.clone(),
            cache: std::env::temp_dir().join("fw-eval-cache"),
            engine: Default::default(),
        },
        policy: Policy {
            canary_share,
            ..Default::default()
        },
        concurrency: 8,
        retention: Some(retention),
        upstream: Default::default(),
    }
}

/// `cand` against the served champion for `team`, acting on the verdict
/// (a canary, a promotion or a rejection) as the loop does.
async fn evaluate(
    gw: &TestGateway,
    env: &EvalEnv,
    team: Uuid,
    cand: &ModelVersion,
) -> flywheel_jobs::evaluate::EvalOutcome {
    run_evaluation(gw, env, team, cand, None, true).await
}

/// One evaluation of `cand` against the served champion, on `dataset`'s
/// held-out evidence if given; `act`: act on the verdict.
async fn run_evaluation(
    gw: &TestGateway,
    env: &EvalEnv,
    team: Uuid,
    cand: &ModelVersion,
    dataset: Option<Uuid>,
    act: bool,
) -> flywheel_jobs::evaluate::EvalOutcome {
    let (id, _) = flywheel_jobs::evaluate::enqueue(
        &gw.db.pool,
        &flywheel_store::evals::NewEvaluation {
            team_id: Some(team),
            candidate_version_id: cand.id,
            champion_version_id: gw.served.version_id,
            dataset_version_id: dataset,
            training_run_id: None,
        },
        act,
        1,
    )
    .await
    .unwrap();
    flywheel_jobs::evaluate::run(
        &gw.db.pool,
        env,
        &EvalJob {
            evaluation_id: id,
            act,
        },
    )
    .await
    .unwrap()
}

async fn add_task_suite(gw: &TestGateway, team: Uuid) {
    let s = tiny_task::routing_suite();
    flywheel_store::evals::add_suite(
        &gw.db.pool,
        Some(team),
        &s.name,
        &s.sha256(),
        &serde_json::to_value(&s).unwrap(),
    )
    .await
    .unwrap();
}

/// Chat through the API as `key`; returns the body.
async fn chat(gw: &TestGateway, key: &str, model: &str, user: &str) -> (u16, Value) {
    gw.post(
        key,
        "/v1/chat/completions",
        json!({"model": model, "max_tokens": 6, "temperature": 0, "user": user,
               "messages": [{"role": "user", "content": ROUTING[0]}]}),
    )
    .await
}

#[tokio::test]
async fn a_better_candidate_passes_the_gate_and_serves_its_team_only() {
    let gw = TestGateway::tiny().await;
    let team_a = gw.team_id().await;
    let (_, key_b) = flywheel_store::keys::create_key(&gw.db.pool, "team-b")
        .await
        .unwrap();
    add_task_suite(&gw, team_a).await;
    let (retention, answers) = retention_suite(&gw).await;
    let cand = candidate(&gw, "tiny-ft-good", Some(team_a), task_and_replay(&answers)).await;

    let out = evaluate(&gw, &env(&gw, retention, 0.0), team_a, &cand).await;
    assert!(out.passed, "{:#?}", out.reasons);
    assert_eq!(out.action.as_deref(), Some("promote"));
    let metrics = flywheel_store::evals::metrics(&gw.db.pool, out.evaluation_id)
        .await
        .unwrap();
    let task = metrics.iter().find(|m| m.suite == "routing").unwrap();
    assert!(task.candidate > 0.9 && task.champion < 0.1, "{task:?}");
    assert!(task.ci_low > 0.0);
    let items = flywheel_store::evals::items(&gw.db.pool, out.evaluation_id, Some("routing"))
        .await
        .unwrap();
    assert_eq!(items.len(), 2 * ROUTING.len(), "every example, both models");

    // Team a is served by its new champion, within seconds, with no restart;
    // team b still gets the base and may not even name the candidate.
    let base_name = gw.model().to_string();
    let served_by = |body: &Value| {
        body["system_fingerprint"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    let switched = eventually(10, || async {
        let (status, body) = chat(&gw, &gw.key, &base_name, "ann").await;
        (status == 200 && served_by(&body) == cand.id.to_string()).then_some(body)
    })
    .await
    .expect("team a's requests reach the promoted candidate");
    assert_eq!(switched["model"], "tiny-ft-good");
    assert_eq!(
        switched["choices"][0]["message"]["content"], ANSWER,
        "{switched}"
    );
    let (status, body) = chat(&gw, &key_b, &base_name, "bob").await;
    assert_eq!(status, 200);
    assert_eq!(
        served_by(&body),
        gw.served.version_id.to_string(),
        "team b keeps the base"
    );
    assert_eq!(chat(&gw, &key_b, "tiny-ft-good", "bob").await.0, 404);
    let (_, listed) = gw.get(&gw.key, "/v1/models").await;
    assert_eq!(listed["data"][0]["id"], "tiny-ft-good");
    assert_eq!(listed["data"][0]["role"], "champion");
    assert_eq!(listed["data"][0]["sha256"], cand.sha256);
    let (_, listed_b) = gw.get(&key_b, "/v1/models").await;
    assert_eq!(listed_b["data"][0]["id"], base_name);
    // The candidate runs on the base's weights: one engine, an adapter.
    let loaded = gw.state.models().loaded();
    assert_eq!(loaded.len(), 1, "{loaded:?}");

    let decisions = flywheel_store::decisions::list(&gw.db.pool, Some(team_a), 10)
        .await
        .unwrap();
    assert_eq!(decisions[0].kind, DecisionKind::Promote);
    assert_eq!(decisions[0].candidate_version_id, Some(cand.id));
    assert_eq!(decisions[0].champion_version_id, Some(gw.served.version_id));
}

#[tokio::test]
async fn a_candidate_that_forgets_is_rejected_with_the_reason_stored() {
    let gw = TestGateway::tiny().await;
    let team = gw.team_id().await;
    add_task_suite(&gw, team).await;
    let (retention, _) = retention_suite(&gw).await;
    // The task alone: "ok" to everything, the general answers lost.
    let pairs = ROUTING
        .iter()
        .chain(GENERAL.iter())
        .map(|p| (p.to_string(), ANSWER.to_string()))
        .collect();
    let cand = candidate(&gw, "tiny-ft-forgetful", Some(team), pairs).await;
    let out = evaluate(&gw, &env(&gw, retention, 0.1), team, &cand).await;
    assert!(!out.passed);
    assert_eq!(out.action.as_deref(), Some("reject"));
    let e = flywheel_store::evals::get(&gw.db.pool, out.evaluation_id)
        .await
        .unwrap()
        .unwrap();
    let reasons = e.reasons.unwrap().to_string();
    assert!(reasons.contains("pass: task suite routing"), "{reasons}");
    assert!(
        reasons.contains("FAIL: retention suite retention"),
        "{reasons}"
    );
    let d = &flywheel_store::decisions::list(&gw.db.pool, Some(team), 10)
        .await
        .unwrap()[0];
    assert_eq!(d.kind, DecisionKind::Reject);
    assert!(d.reason.contains("FAIL: retention suite"), "{}", d.reason);
    assert_eq!(
        flywheel_store::models::team_champion(&gw.db.pool, team)
            .await
            .unwrap()
            .unwrap()
            .id,
        gw.served.version_id,
        "the champion stays"
    );
}

#[tokio::test]
async fn a_candidate_slower_than_the_latency_rule_allows_is_rejected_for_it() {
    let gw = TestGateway::tiny().await;
    let team = gw.team_id().await;
    add_task_suite(&gw, team).await;
    let (retention, answers) = retention_suite(&gw).await;
    let good = candidate(&gw, "tiny-ft-fast", Some(team), task_and_replay(&answers)).await;
    // The same candidate, merged, with 126 idle layers: every answer the
    // same, each token many times the work.
    let dir = std::env::temp_dir().join(format!("fw-slow-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let slow_path = dir.join("slow.gguf");
    flywheel_tests::slow_model::with_idle_layers(std::path::Path::new(&good.path), &slow_path, 126)
        .unwrap();
    let imported = flywheel_modelhub::ModelCache::new(dir.join("cache"))
        .unwrap()
        .import(&slow_path, Some("tiny-ft-slow"))
        .await
        .unwrap();
    let slow = flywheel::register(&gw.db.pool, &imported).await.unwrap();
    flywheel_store::models::set_scope(&gw.db.pool, slow.id, Some(team), false)
        .await
        .unwrap();
    // The shipped policy: at most 1.5x the champion's time per token.
    let out = evaluate(&gw, &env(&gw, retention, 0.0), team, &slow).await;
    assert!(!out.passed, "{:#?}", out.reasons);
    assert_eq!(out.action.as_deref(), Some("reject"));
    let failed: Vec<&String> = out
        .reasons
        .iter()
        .filter(|r| r.starts_with("FAIL"))
        .collect();
    assert_eq!(
        failed.len(),
        1,
        "only the latency rule fails: {:#?}",
        out.reasons
    );
    assert!(failed[0].starts_with("FAIL: latency (alone)"), "{failed:?}");
    assert!(
        out.reasons
            .iter()
            .any(|r| r.starts_with("pass: task suite routing")),
        "{:#?}",
        out.reasons
    );
    let d = &flywheel_store::decisions::list(&gw.db.pool, Some(team), 1)
        .await
        .unwrap()[0];
    assert_eq!(d.kind, DecisionKind::Reject);
    assert!(d.reason.contains("FAIL: latency (alone)"), "{}", d.reason);
}

#[tokio::test]
async fn an_evaluation_reads_the_answers_a_version_gave_before() {
    let gw = TestGateway::tiny().await;
    let team = gw.team_id().await;
    add_task_suite(&gw, team).await;
    let (retention, _) = retention_suite(&gw).await;
    let pairs = ROUTING
        .iter()
        .map(|p| (p.to_string(), ANSWER.to_string()))
        .collect();
    let cand = candidate(&gw, "tiny-ft-memo", Some(team), pairs).await;
    let env = env(&gw, retention.clone(), 0.1);
    let pool = &gw.db.pool;
    // The champion answers the team's suite and the retention suite ahead
    // (`flywheel suites add --answer`); a second time there is nothing new.
    let per_model = ROUTING.len() + retention.items.len();
    let (name, generated) = flywheel_jobs::evaluate::remember_champion(pool, &env, team)
        .await
        .unwrap();
    assert_eq!((name.as_str(), generated), (gw.model(), per_model));
    let again = flywheel_jobs::evaluate::remember_champion(pool, &env, team)
        .await
        .unwrap();
    assert_eq!(again.1, 0);
    // Mark one of the champion's kept answers: an evaluation that reads the
    // memo shows the mark, one that generates again would not.
    let kept = flywheel_store::evals::remembered(pool, gw.served.version_id)
        .await
        .unwrap();
    assert_eq!(kept.len(), per_model);
    sqlx::query(
        "update remembered_answers set output = 'MARKED'
         where model_version_id = $1 and request_sha256 = $2",
    )
    .bind(gw.served.version_id)
    .bind(&kept[0].request_sha256)
    .execute(pool)
    .await
    .unwrap();
    let outputs = |id| async move {
        flywheel_store::evals::items(pool, id, None)
            .await
            .unwrap()
            .into_iter()
            .map(|i| ((i.suite, i.item, i.model_version_id), i.output))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let first = outputs(evaluate(&gw, &env, team, &cand).await.evaluation_id).await;
    let marked: Vec<_> = first.iter().filter(|(_, o)| *o == "MARKED").collect();
    assert_eq!(marked.len(), 1, "the champion's answer came from the memo");
    assert_eq!(marked[0].0.2, gw.served.version_id);
    // The candidate's answers were generated and are kept now too: a second
    // evaluation reads both sides and gives the same outputs.
    let kept = flywheel_store::evals::remembered(pool, cand.id)
        .await
        .unwrap();
    assert_eq!(kept.len(), per_model);
    let second = outputs(evaluate(&gw, &env, team, &cand).await.evaluation_id).await;
    assert_eq!(first, second);
}

#[tokio::test]
async fn a_canary_worse_on_live_thumbs_is_rolled_back_by_itself() {
    let gw = TestGateway::tiny().await;
    let team = gw.team_id().await;
    let cand = candidate(
        &gw,
        "tiny-ft-canary",
        Some(team),
        ROUTING
            .iter()
            .map(|p| (p.to_string(), "meh".to_string()))
            .collect(),
    )
    .await;
    let policy = Policy {
        canary_share: 0.5,
        canary_min_votes: 10,
        ..Default::default()
    };
    let why = flywheel_loop::decide::Why {
        reason: "test canary",
        evidence: json!({}),
        actor: "test",
        evaluation_id: None,
        canary_id: None,
    };
    let canary = flywheel_loop::decide::start_canary(&gw.db.pool, team, &cand, 0.5, 24.0, why)
        .await
        .unwrap();
    gw.state.refresh_routes().await.unwrap();
    // 60 end users, each sticky to one side; they dislike the canary.
    let mut sides = std::collections::HashMap::new();
    for u in 0..60 {
        let user = format!("user-{u}");
        let (status, body) = chat(&gw, &gw.key, gw.model(), &user).await;
        assert_eq!(status, 200, "{body}");
        let on_canary = body["system_fingerprint"] == cand.id.to_string();
        // The same user lands on the same side again.
        let (_, again) = chat(&gw, &gw.key, gw.model(), &user).await;
        assert_eq!(
            again["system_fingerprint"], body["system_fingerprint"],
            "{user} is sticky"
        );
        sides.insert(user.clone(), on_canary);
        let rating = if on_canary { "down" } else { "up" };
        let (status, _) = gw
            .post(
                &gw.key,
                "/v1/feedback",
                json!({"completion_id": body["id"], "rating": rating, "user": user}),
            )
            .await;
        assert_eq!(status, 201);
    }
    let on_canary = sides.values().filter(|c| **c).count();
    assert!(
        (15..=45).contains(&on_canary),
        "{on_canary} of 60 users on a 50% canary"
    );
    assert!(
        gw.state
            .journal()
            .wait_flushed(Duration::from_secs(10))
            .await
    );
    let checked = flywheel_loop::canary::check_all(&gw.db.pool, &policy)
        .await
        .unwrap();
    assert_eq!(checked.len(), 1);
    match &checked[0].1 {
        flywheel_loop::canary::Checked::RolledBack(why) => {
            assert!(why.contains("worse than the champion"), "{why}")
        }
        other => panic!("{other:?}"),
    }
    let c = flywheel_store::canaries::get(&gw.db.pool, canary.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.status, CanaryStatus::RolledBack);
    let d = &flywheel_store::decisions::list(&gw.db.pool, Some(team), 5)
        .await
        .unwrap()[0];
    assert_eq!(
        (d.kind, d.canary_id),
        (DecisionKind::RolledBack, Some(canary.id))
    );
    // Everyone is on the champion again.
    gw.state.refresh_routes().await.unwrap();
    for u in 0..20 {
        let (_, body) = chat(&gw, &gw.key, gw.model(), &format!("user-{u}")).await;
        assert_eq!(body["system_fingerprint"], gw.served.version_id.to_string());
    }
}

#[tokio::test]
async fn a_swap_under_16_streams_fails_none_and_changes_none_mid_stream() {
    let gw = TestGateway::tiny().await;
    let team = gw.team_id().await;
    let cand = candidate(
        &gw,
        "tiny-ft-swap",
        Some(team),
        ROUTING
            .iter()
            .map(|p| (p.to_string(), ANSWER.to_string()))
            .collect(),
    )
    .await;
    let (base, key, model) = (gw.base.clone(), gw.key.clone(), gw.model().to_string());
    // The key is checked once here, not by 16 first requests at once: on
    // a fast machine the first streams were done before the last had its
    // key looked up, and none was open across the swap (0 of 16 in one run
    // of three; with this, 16 of 16 in six).
    let (status, _) = chat(&gw, &gw.key, gw.model(), "warm-up").await;
    assert_eq!(status, 200);
    // Every stream runs to its 200 tokens: the tiny model's random weights
    // would end some at an end-of-turn token at once (in a loaded full run
    // 0 of 16 were still open when the promotion committed).
    let bias = gw.no_end_of_turn().await;
    let (started_tx, mut started_rx) = tokio::sync::mpsc::channel::<()>(16);
    // Set once the promotion has committed: chunks a stream reads after it
    // show the stream was open across the swap.
    let promoted = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let streams: Vec<_> = (0..16)
        .map(|i| {
            let (base, key, model, started, bias) = (
                base.clone(),
                key.clone(),
                model.clone(),
                started_tx.clone(),
                bias.clone(),
            );
            let promoted = promoted.clone();
            tokio::spawn(async move {
                let resp = reqwest::Client::new()
                    .post(format!("{base}/v1/chat/completions"))
                    .bearer_auth(key)
                    .json(
                        &json!({"model": model, "max_tokens": 200, "temperature": 1.0,
                                  "seed": i, "stream": true, "user": format!("s{i}"),
                                  "logit_bias": bias,
                                  "messages": [{"role": "user", "content": format!("story {i}")}]}),
                    )
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 200);
                let mut body = resp.bytes_stream();
                let (mut fingerprints, mut done, mut text) = (Vec::new(), false, String::new());
                let (mut first, mut after_swap) = (true, 0);
                while let Some(chunk) = body.next().await {
                    text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
                    while let Some(end) = text.find("\n\n") {
                        let event: String = text.drain(..end + 2).collect();
                        let data = event.trim().trim_start_matches("data: ");
                        if data == "[DONE]" {
                            done = true;
                            continue;
                        }
                        let v: Value = serde_json::from_str(data).unwrap();
                        assert!(v.get("error").is_none(), "stream {i} failed: {v}");
                        fingerprints.push(v["system_fingerprint"].as_str().unwrap().to_string());
                        if promoted.load(std::sync::atomic::Ordering::SeqCst) {
                            after_swap += 1;
                        }
                        if first {
                            first = false;
                            let _ = started.send(()).await;
                        }
                    }
                }
                (done, fingerprints, after_swap)
            })
        })
        .collect();
    for _ in 0..16 {
        started_rx.recv().await.unwrap();
    }
    // Every stream is under way: promote now.
    flywheel_loop::decide::promote(
        &gw.db.pool,
        team,
        &cand,
        DecisionKind::ManualPromote,
        flywheel_loop::decide::Why {
            reason: "swap under load",
            evidence: json!({}),
            actor: "test",
            evaluation_id: None,
            canary_id: None,
        },
    )
    .await
    .unwrap();
    promoted.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut open_across = 0;
    for (i, s) in streams.into_iter().enumerate() {
        let (done, fps, after_swap) = s.await.unwrap();
        open_across += usize::from(after_swap > 0);
        assert!(done, "stream {i} ended without [DONE]");
        assert!(fps.len() > 2, "stream {i}: {} chunks", fps.len());
        assert!(
            fps.iter().all(|f| *f == fps[0]),
            "stream {i} changed version: {fps:?}"
        );
        assert_eq!(
            fps[0],
            gw.served.version_id.to_string(),
            "stream {i} began before the swap"
        );
    }
    // The swap happened while streams were open, else the checks above
    // would hold by construction.
    eprintln!("{open_across} of 16 streams read chunks after the swap");
    assert!(
        open_across >= 4,
        "only {open_across} of 16 streams were open across the swap"
    );
    // The next requests get the candidate.
    let after = eventually(10, || async {
        let (_, body) = chat(&gw, &gw.key, gw.model(), "later").await;
        (body["system_fingerprint"] == cand.id.to_string()).then_some(())
    })
    .await;
    assert!(
        after.is_some(),
        "requests after the swap reach the new champion"
    );
}

/// A loader that holds one version's load until the test releases it, and
/// says when that load has begun.
struct Slow {
    inner: Arc<dyn flywheel_gateway::Loader>,
    slow: Uuid,
    started: Arc<tokio::sync::Notify>,
    release: Arc<tokio::sync::Notify>,
}

impl flywheel_gateway::Loader for Slow {
    fn engine(
        &self,
        v: ModelVersion,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<
                    Output = Result<
                        flywheel_engine::EngineHandle,
                        flywheel_gateway::serving::LoadError,
                    >,
                > + Send,
        >,
    > {
        let (inner, slow) = (self.inner.clone(), v.id == self.slow);
        let (started, release) = (self.started.clone(), self.release.clone());
        Box::pin(async move {
            if slow {
                started.notify_one();
                release.notified().await;
            }
            inner.engine(v).await
        })
    }

    fn adapter(
        &self,
        v: ModelVersion,
        path: String,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<
                    Output = Result<
                        flywheel_engine::AdapterWeights,
                        flywheel_gateway::serving::LoadError,
                    >,
                > + Send,
        >,
    > {
        self.inner.adapter(v, path)
    }
}

#[tokio::test]
async fn a_slow_load_never_holds_up_a_loaded_model_and_the_budget_holds() {
    let gw = TestGateway::tiny_with(GatewayConfig {
        max_loaded_models: 1,
        ..Default::default()
    })
    .await;
    // A second full model (not an adapter): team b's champion.
    let dir = std::env::temp_dir().join(format!("fw-second-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = flywheel_model::testing::write_tiny_model(&dir, 21).unwrap();
    let second = flywheel_modelhub::ModelCache::new(dir.join("cache"))
        .unwrap()
        .import(&path, Some("tiny-second"))
        .await
        .unwrap();
    let second = flywheel::register(&gw.db.pool, &second).await.unwrap();
    let (_, key_b) = flywheel_store::keys::create_key(&gw.db.pool, "team-b")
        .await
        .unwrap();
    let team_b = flywheel_store::keys::team_id(&gw.db.pool, "team-b")
        .await
        .unwrap()
        .unwrap();
    flywheel_store::models::set_team_champion(
        &mut gw.db.pool.acquire().await.unwrap(),
        team_b,
        Some(second.id),
    )
    .await
    .unwrap();
    let (started, release) = (Arc::default(), Arc::<tokio::sync::Notify>::default());
    gw.state.set_loader(Arc::new(Slow {
        inner: flywheel::serve::gateway_loader(&flywheel_tests::config(), &gw.db.pool),
        slow: second.id,
        started: Arc::clone(&started),
        release: Arc::clone(&release),
    }));
    gw.state.refresh_routes().await.unwrap();
    let model = gw.model().to_string();
    let b = tokio::spawn({
        let (base, model) = (gw.base.clone(), model.clone());
        async move {
            let resp = reqwest::Client::new()
                .post(format!("{base}/v1/chat/completions"))
                .bearer_auth(key_b)
                .json(&json!({"model": model, "max_tokens": 3,
                              "messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
                .unwrap();
            resp.status()
        }
    });
    // While team b's model is loading (held there until released), team
    // a's loaded one answers: a gateway that made it wait for the load would
    // never answer, as the load does not end before a's answer comes.
    tokio::time::timeout(Duration::from_secs(120), started.notified())
        .await
        .expect("team b's load begins");
    let (status, _) =
        tokio::time::timeout(Duration::from_secs(120), chat(&gw, &gw.key, &model, "a"))
            .await
            .expect("the loaded model answers while another model loads");
    assert_eq!(status, 200);
    release.notify_one();
    assert_eq!(b.await.unwrap(), 200);
    // One engine at a time: team b's load unloaded team a's; a's next
    // request loads it again and still answers.
    assert_eq!(gw.state.models().loaded().len(), 1);
    assert_eq!(gw.state.models().loaded()[0].0, second.id);
    let (status, body) = chat(&gw, &gw.key, &model, "a").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["system_fingerprint"], gw.served.version_id.to_string());
    assert_eq!(gw.state.models().loaded()[0].0, gw.served.version_id);
}

#[tokio::test]
async fn an_output_holding_a_nul_character_is_kept_not_refused() {
    // Byte-level vocabularies have a token for byte 0, and the tiny model
    // emits it: Postgres text cannot hold U+0000, so it is kept as U+FFFD
    // instead of failing the evaluation that stores it.
    let gw = TestGateway::tiny().await;
    let pool = &gw.db.pool;
    let v = gw.served.version_id;
    let id = flywheel_store::evals::create(
        pool,
        &flywheel_store::evals::NewEvaluation {
            team_id: None,
            candidate_version_id: v,
            champion_version_id: v,
            dataset_version_id: None,
            training_run_id: None,
        },
    )
    .await
    .unwrap();
    let item = flywheel_store::evals::Item {
        suite: "s".into(),
        item: "i".into(),
        model_version_id: v,
        prompt: json!([{"role": "user", "content": "a\u{0}b"}]),
        output: "x\u{0}y".into(),
        passed: Some(false),
        score: None,
    };
    flywheel_store::evals::add_items(pool, id, &[item])
        .await
        .unwrap();
    let stored = flywheel_store::evals::items(pool, id, None).await.unwrap();
    assert_eq!(stored[0].output, "x\u{FFFD}y");
    assert_eq!(stored[0].prompt[0]["content"], "a\u{FFFD}b");
    let kept = flywheel_store::evals::Remembered {
        request_sha256: "k".into(),
        output: "\u{0}".into(),
        tokens: 1,
    };
    flywheel_store::evals::remember(pool, v, &[kept])
        .await
        .unwrap();
    let back = flywheel_store::evals::remembered(pool, v).await.unwrap();
    assert_eq!(back[0].output, "\u{FFFD}");
}

/// A dataset version of `team` written as curation would: `train` its
/// preference pairs, `corrections` and `liked` its held-out answers.
async fn dataset(
    gw: &TestGateway,
    team: Uuid,
    train: &[(String, &str, &str)],
    corrections: &[(String, &str)],
    liked: &[(String, &str)],
) -> Uuid {
    use flywheel_curation::build::{DpoPair, Message as Msg, SftExample, Split};
    let prompt = |p: &str| {
        vec![Msg {
            role: "user".into(),
            content: p.into(),
        }]
    };
    let mut examples = Vec::new();
    for (p, chosen, rejected) in train {
        let pair = DpoPair {
            prompt: prompt(p),
            chosen: chosen.to_string(),
            rejected: rejected.to_string(),
            split: Split::Train,
            sources: vec![],
        };
        examples.push(flywheel_store::datasets::NewExample {
            kind: "dpo",
            split: "train",
            example: serde_json::to_string(&pair).unwrap(),
        });
    }
    for (list, correction) in [(corrections, true), (liked, false)] {
        for (p, answer) in list {
            let sft = SftExample {
                prompt: prompt(p),
                completion: answer.to_string(),
                correction,
                split: Split::Eval,
                source: String::new(),
            };
            examples.push(flywheel_store::datasets::NewExample {
                kind: "sft",
                split: "eval",
                example: serde_json::to_string(&sft).unwrap(),
            });
        }
    }
    let id = Uuid::new_v4();
    let mut tx = gw.db.pool.begin().await.unwrap();
    flywheel_store::datasets::insert_version(
        &mut tx,
        &flywheel_store::datasets::NewVersion {
            id,
            scope: flywheel_store::datasets::Scope::Team(team),
            fingerprint: id.to_string(),
            manifest: json!({"built_by": "the promotion test"}),
            sft_count: (corrections.len() + liked.len()) as i32,
            dpo_count: train.len() as i32,
            kto_count: 0,
            window_start: None,
            window_end: None,
        },
        &examples,
        &[],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    id
}

/// One evaluation of `cand` on `dataset`'s held-out evidence, reported
/// only (no promotion), and what it kept of the team's judge.
async fn evaluate_on(
    gw: &TestGateway,
    env: &EvalEnv,
    team: Uuid,
    cand: &ModelVersion,
    dataset: Uuid,
) -> (flywheel_jobs::evaluate::EvalOutcome, Option<Value>) {
    let out = run_evaluation(gw, env, team, cand, Some(dataset), false).await;
    let e = flywheel_store::evals::get(&gw.db.pool, out.evaluation_id)
        .await
        .unwrap()
        .unwrap();
    (out, e.judge)
}

/// The gate's borderline case: with no task suite, the users' held-out
/// corrections show the candidate better on 2 of 10 and the interval
/// touches zero, so alone they cannot pass it. The team's judge (a
/// stand-in upstream, scripted to prefer the task's answer; named so) is
/// checked on the dataset's train pairs, a set apart from the held-out
/// prompts it then judges: a position-biased one is found out and
/// ignored, one out of budget is ignored, and one the users vouch for
/// moves the decision, with the weight it was given.
#[tokio::test]
async fn a_judge_that_agrees_with_users_moves_a_borderline_gate_decision() {
    use flywheel_tests::standin::{Behave, StandIn};
    let gw = TestGateway::tiny().await;
    let team = gw.team_id().await;
    let (retention, answers) = retention_suite(&gw).await;
    let cand = candidate(&gw, "tiny-ft-judged", Some(team), task_and_replay(&answers)).await;
    // Checked on routing requests the held-out set does not hold: the users
    // chose the task's answer over a refusal.
    let train: Vec<(String, &str, &str)> = tiny_task::tickets(0, 12)
        .into_iter()
        .map(|p| (p, ANSWER, "I cannot route that ticket."))
        .collect();
    let corrections: Vec<(String, &str)> = ROUTING[..2]
        .iter()
        .map(|p| (p.to_string(), ANSWER))
        .chain(
            GENERAL[..8]
                .iter()
                .map(|p| (p.to_string(), "Escalate to a human agent.")),
        )
        .collect();
    let liked: Vec<(String, &str)> = ROUTING[2..]
        .iter()
        .map(|p| (p.to_string(), ANSWER))
        .collect();
    let data = dataset(&gw, team, &train, &corrections, &liked).await;
    let mut env = env(&gw, retention, 0.0);
    env.upstream.retries = 0;

    // No judge: the users' evidence alone, borderline, fails.
    let (out, judge) = evaluate_on(&gw, &env, team, &cand, data).await;
    assert!(!out.passed, "{:#?}", out.reasons);
    assert!(judge.is_none());
    let metrics = flywheel_store::evals::metrics(&gw.db.pool, out.evaluation_id)
        .await
        .unwrap();
    let users = metrics
        .iter()
        .find(|m| m.suite == "heldout-corrections" && m.metric == "contains_match")
        .unwrap();
    assert_eq!(
        (users.items, users.candidate, users.champion),
        (10, 0.2, 0.0),
        "the candidate answers the two routing corrections, the champion neither: {users:?}"
    );
    assert!(users.ci_low <= 0.0, "borderline: {users:?}");
    assert!(
        out.reasons[0].starts_with("FAIL: held-out heldout-corrections contains_match"),
        "{:#?}",
        out.reasons
    );

    let standin = StandIn::start();
    let judge_version = flywheel_store::upstreams::register(
        &gw.db.pool,
        &flywheel_store::upstreams::NewUpstream {
            name: "judge-7b".into(),
            base_url: format!("{}/v1", standin.base),
            model: "judge-7b".into(),
            api_key_env: None,
            timeout_ms: 20_000,
            context_length: None,
            team_id: Some(team),
        },
    )
    .await
    .unwrap();
    let set_judge = |budget: Option<i64>| {
        flywheel_store::judges::set(
            &gw.db.pool,
            team,
            judge_version.id,
            flywheel_eval::judge::DEFAULT_PROMPT,
            0.6,
            budget,
        )
    };

    // A judge that says "A" whatever it is shown: inconsistent on every
    // pair of its check, ignored, and asked nothing more.
    set_judge(None).await.unwrap();
    standin.always(Behave::Say("A"));
    let (out, judge) = evaluate_on(&gw, &env, team, &cand, data).await;
    let judge = judge.expect("the judge's part is kept");
    assert!(!out.passed, "{:#?}", out.reasons);
    assert_eq!(judge["weight"], 0.0, "{judge}");
    assert_eq!(judge["check"]["inconsistent"], 12, "{judge}");
    assert_eq!(judge["check"]["first_position_share"], 1.0, "{judge}");
    assert_eq!(judge["questions"], 24, "its check only: {judge}");
    assert_eq!(standin.seen().len(), 24);
    let check_cost = judge["tokens"].as_i64().unwrap();
    assert!(check_cost >= 24, "every answer costs: {judge}");
    assert!(
        out.reasons
            .iter()
            .any(|r| r.starts_with("info: judge judge-7b") && r.contains("ignored")),
        "{:#?}",
        out.reasons
    );

    // A judge that prefers the task's answer, in either position, but with
    // a budget that runs out while it judges the held-out prompts: its
    // verdicts are ignored, and the evaluation says why.
    standin.always(Behave::PreferExactly(ANSWER));
    let budget = check_cost + check_cost / 4;
    set_judge(Some(budget)).await.unwrap();
    let (out, judge) = evaluate_on(&gw, &env, team, &cand, data).await;
    let judge = judge.unwrap();
    assert!(!out.passed, "{:#?}", out.reasons);
    assert_eq!(judge["check"]["trusted"], true, "{judge}");
    assert_eq!(judge["weight"], 0.0, "{judge}");
    assert!(
        judge["reason"]
            .as_str()
            .unwrap()
            .contains(&format!("stopped at its budget of {budget} tokens")),
        "{judge}"
    );

    // The same judge without the budget: trusted (12 of 12), asked about
    // the held-out prompts, and the decision moves.
    set_judge(None).await.unwrap();
    let asked_before = standin.seen().len();
    let (out, judge) = evaluate_on(&gw, &env, team, &cand, data).await;
    let judge = judge.unwrap();
    assert!(out.passed, "{:#?}\n{judge}", out.reasons);
    let weight = judge["weight"].as_f64().unwrap();
    assert!(weight > 0.4 && weight < 0.6, "12 of 12 right: {judge}");
    // Held-out prompts both answered the same way are not asked (a tie).
    let judged = judge["verdicts"]["prompts"].as_u64().unwrap() as usize;
    assert!((12..=20).contains(&judged), "{judge}");
    assert!(
        judge["verdicts"]["candidate"].as_u64().unwrap() >= 12,
        "the candidate's routing answers: {judge}"
    );
    assert_eq!(judge["verdicts"]["champion"], 0, "{judge}");
    assert_eq!(standin.seen().len() - asked_before, 2 * (12 + judged));
    assert!(
        out.reasons[0].starts_with("pass: held-out heldout-corrections contains_match")
            && out.reasons[0].contains(&format!("judge judge-7b at weight {weight:.2}")),
        "{:#?}",
        out.reasons
    );
    let metrics = flywheel_store::evals::metrics(&gw.db.pool, out.evaluation_id)
        .await
        .unwrap();
    let judged = metrics
        .iter()
        .find(|m| (m.suite.as_str(), m.metric.as_str()) == flywheel_eval::judge::JUDGED)
        .expect("the judge's verdicts are a metric of the evaluation");
    assert!(judged.ci_low > 0.0, "{judged:?}");
}
