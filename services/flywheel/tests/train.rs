//! `flywheel train` end to end on the tiny generated model: feedback ->
//! dataset version -> LoRA SFT -> a PEFT adapter and a run record whose
//! held-out loss fell.

use std::process::Command;

mod common;

use common::fresh_database;

fn cli(db: &str, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_flywheel"))
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
        ],
    );
    assert!(printed.contains("adapter saved"), "{printed}");
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
        .args(["train", "--dataset", "acme@9", "--out", "/tmp/unused"])
        .env("DATABASE_URL", &db)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no dataset version acme@9"));
    std::fs::remove_dir_all(&dir).unwrap();
}
