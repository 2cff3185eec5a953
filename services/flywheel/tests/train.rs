//! `flywheel train` end to end on the tiny generated model: feedback ->
//! dataset version -> LoRA SFT -> a PEFT adapter and a run record whose
//! held-out loss fell.

use std::process::Command;

mod common;

use common::fresh_database;

fn cli(db: &str, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_flywheel"))
        .env("FLYWHEEL_HOME", common::test_home())
        .args(args)
        .env("DATABASE_URL", db)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[tokio::test]
async fn train_turns_a_dataset_version_into_a_peft_adapter() {
    let db = fresh_database("fw_train").await;
    let dir = std::env::temp_dir().join(format!("fw-train-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let model = flywheel_engine::tiny::write_tiny_model(&dir, 11).unwrap();
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
    cli(
        &db,
        &[
            "datasets",
            "synth",
            "--team",
            "acme",
            "--completions",
            "600",
            "--ratings",
            "300",
        ],
    );
    cli(&db, &["datasets", "build", "--team", "acme", "--inline"]);
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
    let bad = Command::new(env!("CARGO_BIN_EXE_flywheel"))
        .env("FLYWHEEL_HOME", common::test_home())
        .args(["train", "--dataset", "acme@9", "--out", "/tmp/unused"])
        .env("DATABASE_URL", &db)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no dataset version acme@9"));

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
    let mut server = Command::new(env!("CARGO_BIN_EXE_flywheel"))
        .env("FLYWHEEL_HOME", common::test_home())
        .arg("serve")
        .env("DATABASE_URL", &db)
        .env("FLYWHEEL_ADDR", format!("127.0.0.1:{port}"))
        .env("FLYWHEEL_JOURNAL_DIR", dir.join("journal"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let base_url = format!("http://127.0.0.1:{port}");
    let mut ready = false;
    for _ in 0..300 {
        if let Ok(r) = reqwest::get(format!("{base_url}/readyz")).await
            && r.status() == 200
        {
            ready = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
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
