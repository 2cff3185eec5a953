//! `flywheel train` end to end on the tiny generated model: feedback ->
//! dataset version -> LoRA SFT -> a PEFT adapter and a run record whose
//! held-out loss fell.

use flywheel_tests::{cli, fresh_database};

#[tokio::test]
async fn train_turns_a_dataset_version_into_a_peft_adapter() {
    let (db, dir) = trained_setup("fw_train", 11).await;
    let out = dir.join("adapter");
    let printed = cli(
        &db,
        &[
            "train",
            "--dataset",
            "acme@1",
            "--steps",
            "12",
            "--grad-accum",
            "2",
            "--learning-rate",
            "5e-3",
            "--warmup-steps",
            "2",
            "--rank",
            "4",
            "--max-len",
            "96",
            // On the tiny random model the general chats and the task are
            // the same kind of noise, so the reference penalty (tested in
            // the trainer's tests) would hold the task back too.
            "--reference-kl",
            "0",
            "--out",
            out.to_str().unwrap(),
            "--register",
            "tiny-tuned",
        ],
    );
    assert!(printed.contains("adapter saved"), "{printed}");
    assert!(printed.contains("registered candidate model version tiny-tuned"));
    assert!(out.join("adapter_model.safetensors").exists());
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["r"], 4);
    assert_eq!(config["base_model_name_or_path"], "tiny");
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("flywheel_run.json")).unwrap())
            .unwrap();
    assert_eq!(run["objective"], "sft");
    assert_eq!(run["steps"].as_array().unwrap().len(), 12);
    let (before, after) = (
        run["eval_loss"]["before"].as_f64().unwrap(),
        run["eval_loss"]["after"].as_f64().unwrap(),
    );
    assert!(run["examples"]["eval"].as_u64().unwrap() > 0);
    assert!(after < before * 0.8, "held-out loss {before} -> {after}");

    // A dataset version that does not exist is a clear error.
    let bad = flywheel_tests::run(
        Some(&db),
        &[],
        &["train", "--dataset", "acme@9", "--out", "/tmp/unused"],
        None,
    );
    assert!(!bad.ok());
    assert!(bad.stderr.contains("no dataset version acme@9"));

    // The candidate carries its lineage and is served once promoted.
    let pool = flywheel_store::connect(&db).await.unwrap();
    let tuned = flywheel_store::models::by_name(&pool, "tiny-tuned")
        .await
        .unwrap()
        .unwrap();
    let base = flywheel_store::models::by_name(&pool, "tiny")
        .await
        .unwrap()
        .unwrap();
    let lineage = flywheel_store::models::lineage(&pool, tuned.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lineage.base_version_id, Some(base.id));
    let dataset = flywheel_store::datasets::list(&pool, None).await.unwrap();
    assert_eq!(lineage.dataset_version_id, Some(dataset[0].id));
    assert_eq!(
        lineage.training.unwrap()["steps"].as_array().unwrap().len(),
        12
    );
    // The adapter imports back as a model version of its own.
    let imported = cli(
        &db,
        &[
            "models",
            "import-adapter",
            out.to_str().unwrap(),
            "--base",
            "tiny",
            "--name",
            "tiny-imported",
        ],
    );
    assert!(imported.contains("registered tiny-imported"), "{imported}");
    let again = flywheel_store::models::by_name(&pool, "tiny-imported")
        .await
        .unwrap()
        .unwrap();
    let imported_lineage = flywheel_store::models::lineage(&pool, again.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(imported_lineage.base_version_id, Some(base.id));
    // Same adapter, same base: the same merged weights as the candidate
    // (q and k rows went through PEFT's order and back).
    for name in [
        "blk.0.attn_q.weight",
        "blk.1.attn_k.weight",
        "blk.1.attn_v.weight",
    ] {
        let weights = |path: &str| {
            flywheel_model::gguf::GgufFile::open(std::path::Path::new(path))
                .unwrap()
                .tensor_f32(name, &candle_core::Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(weights(&again.path), weights(&tuned.path), "{name}");
    }
    assert_ne!(again.sha256, base.sha256);
    cli(&db, &["models", "promote", "tiny-tuned"]);
    let key = cli(&db, &["keys", "create", "--team", "acme"])
        .lines()
        .last()
        .unwrap()
        .to_string();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = flywheel_tests::GatewayProcess::spawn(
        &db,
        port,
        &dir.join("journal"),
        &[],
        std::process::Stdio::null(),
    );
    let base_url = format!("http://127.0.0.1:{port}");
    let ready = flywheel_tests::ready(&base_url).await;
    let answer: serde_json::Value = if ready {
        reqwest::Client::new()
            .post(format!("{base_url}/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&serde_json::json!({
                "model": "tiny-tuned",
                "messages": [{"role": "user", "content": "How do I reset my account?"}],
                "max_tokens": 8,
                "temperature": 0
            }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    } else {
        serde_json::Value::Null
    };
    let _ = server.kill();
    let _ = server.wait();
    assert!(ready, "the gateway did not load the merged model");
    assert_eq!(answer["model"], "tiny-tuned", "{answer}");
    assert!(answer["choices"][0]["message"]["content"].is_string());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A database with the tiny model as champion and a curated dataset `acme@1`.
async fn trained_setup(prefix: &str, seed: u64) -> (String, std::path::PathBuf) {
    let db = fresh_database(prefix).await;
    let dir = std::env::temp_dir().join(format!("{prefix}-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    // A seed per test: tests run in parallel and share the model cache.
    let model = flywheel_model::testing::write_tiny_model(&dir, seed).unwrap();
    cli(
        &db,
        &[
            "models",
            "import",
            model.to_str().unwrap(),
            "--name",
            "tiny",
            "--champion",
        ],
    );
    flywheel_tests::synth(&db, "acme", 400, 200);
    cli(&db, &["datasets", "build", "--team", "acme", "--inline"]);
    (db, dir)
}

fn queue_run(db: &str, steps: &str) -> uuid::Uuid {
    queue_run_with(db, steps, &[])
}

fn queue_run_with(db: &str, steps: &str, extra: &[&str]) -> uuid::Uuid {
    let mut args = vec![
        "train",
        "--dataset",
        "acme@1",
        "--queue",
        "--steps",
        steps,
        "--learning-rate",
        "5e-3",
        "--warmup-steps",
        "1",
        "--rank",
        "4",
        "--max-len",
        "96",
    ];
    args.extend_from_slice(extra);
    let out = cli(db, &args);
    out.split_whitespace()
        .nth(3)
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("unexpected output: {out}"))
}

fn train_worker(db: &str, dir: &std::path::Path, env: &[(&str, &str)]) -> std::process::Child {
    let artifacts = dir.join("artifacts").display().to_string();
    let base = [
        ("FLYWHEEL_ARTIFACTS", artifacts.as_str()),
        ("FLYWHEEL_JOB_HEARTBEAT_SECS", "1"),
        ("FLYWHEEL_JOB_BACKOFF_SECS", "1"),
        ("FLYWHEEL_CURATION_SCHEDULE", "off"),
    ];
    flywheel_tests::spawn(db, &[&base[..], env].concat(), &["worker"])
}

async fn wait_for_run<F: Fn(&flywheel_store::training::TrainingRun) -> bool>(
    pool: &flywheel_store::PgPool,
    id: uuid::Uuid,
    secs: u64,
    done: F,
) -> flywheel_store::training::TrainingRun {
    flywheel_tests::until(secs, || async {
        done(
            &flywheel_store::training::get(pool, id)
                .await
                .unwrap()
                .unwrap(),
        )
    })
    .await;
    flywheel_store::training::get(pool, id)
        .await
        .unwrap()
        .unwrap()
}

/// A worker that checkpoints every 3 steps and waits 1.5 s after each,
/// once it has passed its checkpoint at step 3 of `run_id`.
async fn worker_past_its_first_checkpoint(
    db: &str,
    dir: &std::path::Path,
    pool: &flywheel_store::PgPool,
    run_id: uuid::Uuid,
) -> std::process::Child {
    let worker = train_worker(
        db,
        dir,
        &[
            ("FLYWHEEL_CHECKPOINT_EVERY", "3"),
            ("FLYWHEEL_TEST_FAULTS", "train_step_pause_ms=1500"),
        ],
    );
    let run = wait_for_run(pool, run_id, 120, |r| {
        r.checkpoint_step == Some(3) && r.step >= 4
    })
    .await;
    assert_eq!(run.checkpoint_step, Some(3), "{run:#?}");
    worker
}

/// Another worker takes `run_id` over and finishes its `steps`, each
/// recorded once; it is returned still running (its job attempt is marked
/// done after the run) and killed when dropped.
async fn replacement_finishes(
    db: &str,
    dir: &std::path::Path,
    pool: &flywheel_store::PgPool,
    run_id: uuid::Uuid,
    steps: i32,
) -> Killed {
    let addr = format!("127.0.0.1:{}", flywheel_tests::free_port());
    let replacement = Killed(train_worker(
        db,
        dir,
        &[
            ("FLYWHEEL_CHECKPOINT_EVERY", "3"),
            ("FLYWHEEL_WORKER_ADDR", &addr),
        ],
    ));
    let run = wait_for_run(pool, run_id, 240, |r| r.status == "succeeded").await;
    assert_eq!(run.status, "succeeded", "{run:#?}");
    assert_eq!(run.step, steps);
    // Its /metrics counts the tokens of the steps it ran (those after the
    // checkpoint it resumed from: the last steps) and their speed.
    let rows = flywheel_tests::prometheus::scrape(&format!("http://{addr}/metrics")).await;
    let none = serde_json::json!({});
    let tokens = flywheel_tests::prometheus::value(&rows, "flywheel_training_tokens_total", &none);
    let ran: Vec<i32> =
        sqlx::query_scalar("select tokens from training_steps where run_id = $1 order by step")
            .bind(run_id)
            .fetch_all(pool)
            .await
            .unwrap();
    let last_steps: Vec<f64> = (1..ran.len())
        .map(|from| ran[from..].iter().map(|&t| f64::from(t)).sum())
        .collect();
    assert!(last_steps.contains(&tokens), "{tokens} tokens: {rows:?}");
    assert!(
        flywheel_tests::prometheus::value(&rows, "flywheel_training_tokens_per_second", &none)
            > 0.0,
        "{rows:?}"
    );
    let recorded = flywheel_store::training::steps(pool, run_id).await.unwrap();
    assert_eq!(
        recorded.iter().map(|s| s.step).collect::<Vec<_>>(),
        (1..=steps).collect::<Vec<_>>()
    );
    replacement
}

/// A worker process, killed when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The fault itself: the worker process training a run is killed
/// (`SIGKILL`) after its first checkpoint; another worker process takes the
/// job over once the dead one's heartbeat stops, resumes from that
/// checkpoint and finishes the run, each step recorded once.
#[tokio::test]
async fn a_worker_killed_mid_training_is_replaced_and_the_run_resumes_from_its_checkpoint() {
    let (db, dir) = trained_setup("fw_train_kill", 17).await;
    let run_id = queue_run(&db, "8");
    let pool = flywheel_store::connect(&db).await.unwrap();
    // The kill lands between the checkpoint at 3 and the one at 6.
    let mut doomed = worker_past_its_first_checkpoint(&db, &dir, &pool, run_id).await;
    doomed.kill().unwrap(); // SIGKILL: no cleanup, no error recorded
    doomed.wait().unwrap();
    let killed_at = flywheel_store::training::get(&pool, run_id)
        .await
        .unwrap()
        .unwrap()
        .step;
    assert!((4..8).contains(&killed_at), "killed at step {killed_at}");

    let _replacement = replacement_finishes(&db, &dir, &pool, run_id, 8).await;
    // The run is marked done before its job attempt is: wait for that too.
    let attempts = flywheel_tests::eventually(30, || async {
        let all = flywheel_store::jobs::recent_runs(&pool, 10).await.unwrap();
        let train: Vec<_> = all.into_iter().filter(|r| r.kind == "train").collect();
        (train.first().is_some_and(|r| r.status != "running")).then_some(train)
    })
    .await
    .expect("the second attempt ended");
    let train: Vec<_> = attempts.iter().collect();
    assert_eq!(train.len(), 2, "{train:#?}");
    let (second, first) = (train[0], train[1]);
    // The killed attempt never ended: nothing of it ran after the kill.
    assert_eq!(first.status, "running", "{first:#?}");
    assert!(first.finished_at.is_none());
    assert_eq!(second.status, "succeeded");
    assert_ne!(first.worker, second.worker);
    assert_eq!(second.result.as_ref().unwrap()["resumed_from"], 3);
}

/// A worker stopped as Kubernetes stops a pod (`SIGTERM`) while it
/// trains a run that has minutes left: it exits within its grace period
/// (10 s by default, under Kubernetes' 30 s; 4 s here, a heartbeat short of
/// the 5 s after which these workers, heartbeating every second, take a
/// silent one's job) instead of training on, and
/// another worker process resumes the run from its last checkpoint and
/// finishes it, each step recorded once.
#[tokio::test]
async fn a_worker_stopped_with_sigterm_mid_training_exits_within_its_grace_and_the_run_resumes() {
    let (db, dir) = trained_setup("fw_train_term", 19).await;
    let run_id = queue_run(&db, "40");
    let pool = flywheel_store::connect(&db).await.unwrap();
    // At 1.5 s a step, the 40 steps would take a minute more.
    let mut stopped = worker_past_its_first_checkpoint(&db, &dir, &pool, run_id).await;
    let term = std::process::Command::new("kill")
        .args(["-TERM", &stopped.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    // Generous for a loaded machine: the bound is the grace period
    // Kubernetes gives (30 s), not a speed.
    let exited = flywheel_tests::eventually(30, || {
        let status = stopped.try_wait().unwrap();
        async move { status }
    })
    .await;
    let Some(status) = exited else {
        let _ = stopped.kill();
        panic!("the worker was still running 30 s after SIGTERM");
    };
    assert!(status.success(), "{status}");
    let left_at = flywheel_store::training::get(&pool, run_id)
        .await
        .unwrap()
        .unwrap()
        .step;
    assert!(left_at < 40, "it trained to the end: {left_at}");

    let _replacement = replacement_finishes(&db, &dir, &pool, run_id, 40).await;
}

/// Checkpoints and adapters in S3-compatible storage: a resumed attempt
/// reads its checkpoint back from the bucket, as a worker on another machine
/// would.
#[tokio::test]
async fn a_queued_run_resumes_from_its_checkpoint_after_a_crash() {
    let (db, dir) = trained_setup("fw_train_resume", 13).await;
    let s3 = flywheel_tests::S3::start("flywheel-artifacts").await;
    let run_id = queue_run(&db, "8");
    let pool = flywheel_store::connect(&db).await.unwrap();
    let mut env = s3.env();
    env.push(("FLYWHEEL_ARTIFACTS", s3.url("prod")));
    env.push(("FLYWHEEL_CHECKPOINT_EVERY", "3".into()));
    env.push(("FLYWHEEL_TEST_FAULTS", "train_crash_after=5".into()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut w = train_worker(&db, &dir, &env);
    let run = wait_for_run(&pool, run_id, 90, |r| r.status == "succeeded").await;
    let _ = w.kill();
    let _ = w.wait();
    assert_eq!(run.status, "succeeded", "{run:#?}");
    assert_eq!(run.step, 8);
    assert!(run.eval_loss_after.unwrap() < run.eval_loss_before.unwrap());
    assert!(run.tokens_per_second.is_some_and(|t| t > 0.0), "{run:#?}");
    // Two attempts: the crash after step 5, then a resume from step 3.
    // The run is marked done before its job attempt is: wait for that too.
    let attempts = flywheel_tests::eventually(30, || async {
        let all = flywheel_store::jobs::recent_runs(&pool, 10).await.unwrap();
        let train: Vec<_> = all.into_iter().filter(|r| r.kind == "train").collect();
        (train.first().is_some_and(|r| r.status != "running")).then_some(train)
    })
    .await
    .expect("the second attempt ended");
    let train: Vec<_> = attempts.iter().collect();
    assert_eq!(train.len(), 2, "{train:#?}");
    let (second, first) = (train[0], train[1]);
    assert_eq!(first.status, "failed");
    assert!(
        first
            .error
            .as_deref()
            .unwrap()
            .contains("simulated crash after step 5")
    );
    assert_eq!(second.status, "succeeded");
    assert_eq!(second.result.as_ref().unwrap()["resumed_from"], 3);
    // Every step recorded once, the replayed ones overwritten.
    let steps = flywheel_store::training::steps(&pool, run_id)
        .await
        .unwrap();
    assert_eq!(
        steps.iter().map(|s| s.step).collect::<Vec<_>>(),
        (1..=8).collect::<Vec<_>>()
    );
    // The candidate is registered with its lineage.
    let candidate = flywheel_store::models::get(&pool, run.candidate_version_id.unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(candidate.name.starts_with("tiny-ft-"));
    let lineage = flywheel_store::models::lineage(&pool, candidate.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lineage.dataset_version_id, Some(run.dataset_version_id));
    // Everything the run kept is in the bucket: the adapter, and the last
    // checkpoint (step 6, with the optimizer's state) in place of step 3's.
    let adapter_url = lineage.adapter_path.unwrap();
    assert_eq!(adapter_url, s3.url(&format!("prod/runs/{run_id}/adapter")));
    assert_eq!(
        run.checkpoint_path.as_deref(),
        Some(
            s3.url(&format!("prod/runs/{run_id}/checkpoints/6"))
                .as_str()
        )
    );
    let mut keys = s3.keys(&format!("prod/runs/{run_id}/")).await;
    keys.sort();
    let expected: Vec<String> = [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "checkpoints/6/adapter_config.json",
        "checkpoints/6/adapter_model.safetensors",
        "checkpoints/6/optimizer.safetensors",
    ]
    .iter()
    .map(|k| format!("prod/runs/{run_id}/{k}"))
    .collect();
    assert_eq!(keys, expected);
    // `flywheel artifacts get` fetches it with the same settings, and the
    // adapter imports from its URL.
    let local = dir.join("fetched");
    let s3_vars = s3.env();
    let s3_env: Vec<(&str, &str)> = s3_vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let got = flywheel_tests::run(
        None,
        &s3_env,
        &["artifacts", "get", &adapter_url, local.to_str().unwrap()],
        None,
    );
    assert!(got.ok(), "{}", got.stderr);
    assert!(local.join("adapter_model.safetensors").exists());
    let imported = flywheel_tests::run(
        Some(&db),
        &s3_env,
        &[
            "models",
            "import-adapter",
            &adapter_url,
            "--base",
            "tiny",
            "--name",
            "tiny-from-s3",
        ],
        None,
    );
    assert!(imported.ok(), "{}", imported.stderr);
    let from_s3 = flywheel_store::models::by_name(&pool, "tiny-from-s3")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        flywheel_store::models::lineage(&pool, from_s3.id)
            .await
            .unwrap()
            .unwrap()
            .adapter_path,
        Some(adapter_url)
    );

    // The merged candidate is in the bucket too, as its source: a gateway
    // whose disk lacks the file (another machine) fetches it from there.
    assert_eq!(
        candidate.source,
        s3.url(&format!("prod/models/{}.gguf", candidate.sha256))
    );
    cli(&db, &["models", "promote", &candidate.name]);
    std::fs::remove_file(&candidate.path).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let other_machine = dir.join("other-machine").display().to_string();
    let env = [
        &s3_env[..],
        &[("FLYWHEEL_MODEL_CACHE", other_machine.as_str())],
    ]
    .concat();
    let mut server = flywheel_tests::GatewayProcess::spawn(
        &db,
        port,
        &dir.join("journal"),
        &env,
        std::process::Stdio::null(),
    );
    let ready = flywheel_tests::ready(&format!("http://127.0.0.1:{port}")).await;
    let _ = server.kill();
    let _ = server.wait();
    assert!(ready, "the gateway did not fetch and load the candidate");
    let served = flywheel_store::models::get(&pool, candidate.id)
        .await
        .unwrap()
        .unwrap();
    assert!(served.is_champion);
    assert!(
        served
            .path
            .starts_with(dir.join("other-machine").to_str().unwrap()),
        "{}",
        served.path
    );
    assert_eq!(
        flywheel_modelhub::sha256_file(std::path::Path::new(&served.path))
            .await
            .unwrap(),
        candidate.sha256
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_running_run_can_be_cancelled_and_a_base_trains_one_run_at_a_time() {
    let (db, dir) = trained_setup("fw_train_cancel", 17).await;
    let run_id = queue_run(&db, "100000");
    // The base model already has an active run.
    let second = flywheel_tests::run(
        Some(&db),
        &[],
        &["train", "--dataset", "acme@1", "--queue"],
        None,
    );
    assert!(!second.ok());
    assert!(second.stderr.contains("already queued or running"));

    let pool = flywheel_store::connect(&db).await.unwrap();
    let mut w = train_worker(&db, &dir, &[]);
    let running = wait_for_run(&pool, run_id, 60, |r| r.step >= 3).await;
    assert_eq!(running.status, "running", "{running:#?}");
    cli(&db, &["runs", "cancel", &run_id.to_string()]);
    let run = wait_for_run(&pool, run_id, 30, |r| r.status == "cancelled").await;
    let _ = w.kill();
    let _ = w.wait();
    assert_eq!(run.status, "cancelled", "{run:#?}");
    assert!(run.step < 100000 && run.candidate_version_id.is_none());
    // Cancelling again is refused: the run is over.
    let again = flywheel_tests::run(
        Some(&db),
        &[],
        &["runs", "cancel", &run_id.to_string()],
        None,
    );
    assert!(!again.ok());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn an_external_trainer_command_trains_a_run_at_low_priority() {
    let (db, dir) = trained_setup("fw_train_external", 19).await;
    let run_id = queue_run_with(&db, "4", &["--external"]);
    let pool = flywheel_store::connect(&db).await.unwrap();
    // The external command here is Flywheel's own file-based trainer under
    // `nice`: any tool that reads TRL JSONL and writes a PEFT adapter fits.
    // It takes the run's settings (rank 4, 4 steps, ...) from the spec file
    // alone: by its flags' defaults it would train rank 16 for longer.
    let command = "nice -n 10 {flywheel} train --jsonl {train} --eval-jsonl {eval} \
                   --base-gguf {base} --out {out} --spec {spec}";
    let mut w = train_worker(&db, &dir, &[("FLYWHEEL_EXTERNAL_TRAINER", command)]);
    let run = wait_for_run(&pool, run_id, 90, |r| {
        matches!(r.status.as_str(), "succeeded" | "failed")
    })
    .await;
    let _ = w.kill();
    let _ = w.wait();
    assert_eq!(run.status, "succeeded", "{run:#?}");
    assert!(run.eval_loss_after.unwrap() < run.eval_loss_before.unwrap());
    let candidate = flywheel_store::models::get(&pool, run.candidate_version_id.unwrap())
        .await
        .unwrap()
        .unwrap();
    let lineage = flywheel_store::models::lineage(&pool, candidate.id)
        .await
        .unwrap()
        .unwrap();
    // The adapter is kept in the (default, local) artifact store.
    let url = lineage.adapter_path.unwrap();
    let adapter = std::path::PathBuf::from(url.strip_prefix("file://").unwrap());
    assert!(adapter.starts_with(dir.join("artifacts")), "{url}");
    // The command's own record came back with the adapter.
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(adapter.join("flywheel_run.json")).unwrap())
            .unwrap();
    assert_eq!(record["steps"].as_array().unwrap().len(), 4);
    let peft: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(peft["r"], 4, "the spec's rank: {peft}");

    // A command that fails fails the run, with its output in the error.
    let (db2, dir2) = trained_setup("fw_train_external_bad", 23).await;
    let bad = queue_run_with(&db2, "4", &["--external"]);
    let pool2 = flywheel_store::connect(&db2).await.unwrap();
    let mut w = train_worker(
        &db2,
        &dir2,
        &[
            ("FLYWHEEL_EXTERNAL_TRAINER", "echo no gpu here >&2; exit 3"),
            ("FLYWHEEL_JOB_MAX_ATTEMPTS", "1"),
        ],
    );
    let run = wait_for_run(&pool2, bad, 60, |r| r.status == "failed").await;
    let _ = w.kill();
    let _ = w.wait();
    assert_eq!(run.status, "failed", "{run:#?}");
    assert!(
        run.error.as_deref().unwrap().contains("no gpu here"),
        "{run:#?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&dir2).unwrap();
}

/// The Kubernetes Job form of the external trainer, against a stand-in for
/// kubectl (`tests/kubectl_standin.py`: no cluster is reachable here) that
/// runs the Job's container as a local process with only the manifest's
/// environment. The Job and the worker share nothing but the S3 bucket:
/// the container fetches the dataset and the base model from it and leaves
/// the adapter there.
#[tokio::test]
async fn an_external_trainer_job_trains_through_the_object_store() {
    let (db, dir) = trained_setup("fw_train_kube", 29).await;
    let s3 = flywheel_tests::S3::start("flywheel-kube").await;
    let state = dir.join("kube");
    std::fs::create_dir_all(&state).unwrap();
    let kubectl = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/kubectl_standin.py");
    let flywheel = env!("CARGO_BIN_EXE_flywheel");
    let job = |script: String| {
        let env: Vec<serde_json::Value> = s3
            .env()
            .into_iter()
            .map(|(k, v)| serde_json::json!({"name": k, "value": v}))
            .collect();
        serde_json::json!({
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "{job}", "labels": {"flywheel.dev/run": "{run}"}},
            "spec": {"backoffLimit": 0, "template": {"spec": {
                "restartPolicy": "Never",
                "containers": [{
                    "name": "trainer",
                    "image": "flywheel:latest",
                    "command": ["sh", "-c", script],
                    "env": env,
                }],
            }}},
        })
        .to_string()
    };
    let script = format!(
        "set -e; W=$(mktemp -d); \
         {flywheel} artifacts get {{train_url}} $W/train.jsonl; \
         {flywheel} artifacts get {{eval_url}} $W/eval.jsonl; \
         {flywheel} artifacts get {{base_url}} $W/base.gguf; \
         {flywheel} artifacts get {{spec_url}} $W/spec.json; \
         {flywheel} train --jsonl $W/train.jsonl --eval-jsonl $W/eval.jsonl \
           --base-gguf $W/base.gguf --out $W/adapter --spec $W/spec.json; \
         {flywheel} artifacts put $W/adapter {{out_url}}"
    );
    let template = dir.join("job.json");
    std::fs::write(&template, job(script)).unwrap();
    let worker_env = |template: &std::path::Path, attempts: &str| {
        let mut env = s3.env();
        env.push(("FLYWHEEL_ARTIFACTS", s3.url("team")));
        env.push((
            "FLYWHEEL_EXTERNAL_TRAINER_JOB",
            template.display().to_string(),
        ));
        env.push(("FLYWHEEL_KUBECTL", kubectl.to_string()));
        env.push(("KUBECTL_STANDIN_STATE", state.display().to_string()));
        env.push(("FLYWHEEL_JOB_MAX_ATTEMPTS", attempts.to_string()));
        env
    };
    let env = worker_env(&template, "3");
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();

    let run_id = queue_run_with(&db, "4", &["--external"]);
    let pool = flywheel_store::connect(&db).await.unwrap();
    // The first worker submits the Job and dies while it runs; the next one
    // follows the same Job instead of submitting another.
    let mut first = train_worker(&db, &dir, &env_refs);
    let calls = state.join("calls.log");
    let submitted = flywheel_tests::until(60, || async {
        std::fs::read_to_string(&calls).is_ok_and(|c| c.contains("apply"))
    })
    .await;
    assert!(submitted, "the worker never submitted the Job");
    let _ = first.kill();
    let _ = first.wait();
    let mut second = train_worker(&db, &dir, &env_refs);
    let run = wait_for_run(&pool, run_id, 120, |r| {
        matches!(r.status.as_str(), "succeeded" | "failed")
    })
    .await;
    let _ = second.kill();
    let _ = second.wait();
    assert_eq!(run.status, "succeeded", "{run:#?}");
    assert!(run.eval_loss_after.unwrap() < run.eval_loss_before.unwrap());
    let log = std::fs::read_to_string(&calls).unwrap();
    assert_eq!(log.matches("apply -f -").count(), 1, "{log}");
    // The data went out and the adapter came back through the bucket.
    let base = flywheel_store::models::by_name(&pool, "tiny")
        .await
        .unwrap()
        .unwrap();
    let keys = s3.keys("team/").await;
    for key in [
        format!("team/models/{}.gguf", base.sha256),
        format!("team/runs/{run_id}/data/train.jsonl"),
        format!("team/runs/{run_id}/returned/adapter_model.safetensors"),
        format!("team/runs/{run_id}/returned/flywheel_run.json"),
        format!("team/runs/{run_id}/adapter/adapter_model.safetensors"),
    ] {
        assert!(keys.contains(&key), "{key} missing from {keys:#?}");
    }
    let candidate = flywheel_store::models::get(&pool, run.candidate_version_id.unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(candidate.name.starts_with("tiny-ft-"));

    // A Job that fails fails the run, with the reason and the pod's output.
    let bad_template = dir.join("bad-job.json");
    std::fs::write(
        &bad_template,
        job("echo CUDA out of memory >&2; exit 1".into()),
    )
    .unwrap();
    let env = worker_env(&bad_template, "1");
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let bad = queue_run_with(&db, "4", &["--external"]);
    let mut w = train_worker(&db, &dir, &env_refs);
    let run = wait_for_run(&pool, bad, 60, |r| r.status == "failed").await;
    let _ = w.kill();
    let _ = w.wait();
    let error = run.error.unwrap_or_default();
    assert!(
        error.contains("BackoffLimitExceeded") && error.contains("CUDA out of memory"),
        "{error}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
