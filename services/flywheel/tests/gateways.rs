//! Two `flywheel serve` processes on one database: a team promotion made
//! with the CLI reaches both within seconds, with no restart, and so does
//! the rollback; another team keeps the base throughout; the audit log
//! holds both decisions with the admin's reasons.

use std::path::Path;

use flywheel_tests::{GatewayProcess, TinySetup, cli, eventually};
use flywheel_trainer::data::Message;
use flywheel_trainer::{Base, Example, Lora, LoraConfig, Objective, TrainConfig, Trainer};
use serde_json::json;

/// A PEFT adapter for the tiny model, a few real SFT steps away from it
/// (so the version it makes answers differently from the base).
fn train_adapter(model: &Path, out: &Path) {
    let base = Base::load(model).unwrap();
    let examples = ["route this ticket", "where is my order"]
        .iter()
        .map(|p| Example::Sft {
            prompt: base
                .encode(
                    &[Message {
                        role: "user".into(),
                        content: p.to_string(),
                    }],
                    "ok",
                )
                .unwrap(),
        })
        .collect();
    let lora = Lora::new(
        &base.model,
        LoraConfig {
            rank: 4,
            alpha: 8.0,
            ..Default::default()
        },
    )
    .unwrap();
    let config = TrainConfig {
        objective: Objective::Sft,
        learning_rate: 1e-2,
        steps: 20,
        ..Default::default()
    };
    let mut t = Trainer::new(&base.model, lora, config, examples).unwrap();
    for _ in 0..20 {
        t.train_step().unwrap();
    }
    let mut lora = t.lora;
    lora.training = false;
    flywheel_trainer::peft::save(&lora, &base.model, "tiny", out).unwrap();
}

/// The version id that answered a chat (`system_fingerprint`) on `gw`.
async fn served_by(gw: &GatewayProcess, key: &str, user: &str) -> String {
    let (status, body) = gw
        .post(
            key,
            "/v1/chat/completions",
            json!({"model": "tiny", "max_tokens": 2, "user": user,
                   "messages": [{"role": "user", "content": "route this ticket"}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body["system_fingerprint"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn two_gateways_on_one_database_both_switch_on_promotion_and_rollback() {
    let setup = TinySetup::new("fw_two_gateways").await;
    let (key_a, key_b) = (setup.key("acme"), setup.key("globex"));
    let adapter = setup.dir.join("adapter");
    // The file TinySetup imported as `tiny`.
    let model = setup.dir.join("tiny-4.gguf");
    tokio::task::spawn_blocking({
        let (model, adapter) = (model.clone(), adapter.clone());
        move || train_adapter(&model, &adapter)
    })
    .await
    .unwrap();
    let imported = cli(
        &setup.db,
        &[
            "models",
            "import-adapter",
            adapter.to_str().unwrap(),
            "--base",
            "tiny",
            "--name",
            "tiny-acme",
            "--team",
            "acme",
        ],
    );
    assert!(imported.contains("registered tiny-acme"), "{imported}");
    let pool = flywheel_store::connect(&setup.db).await.unwrap();
    let (base, cand) = (
        flywheel_store::models::by_name(&pool, "tiny")
            .await
            .unwrap()
            .unwrap()
            .id
            .to_string(),
        flywheel_store::models::by_name(&pool, "tiny-acme")
            .await
            .unwrap()
            .unwrap()
            .id
            .to_string(),
    );

    // The periodic reread is an hour apart: only the notification can make
    // a switch within seconds.
    let env = [("FLYWHEEL_ROUTE_REFRESH_SECS", "3600")];
    let gateways = [
        GatewayProcess::start(&setup.db, &setup.dir.join("journal-1"), &env).await,
        GatewayProcess::start(&setup.db, &setup.dir.join("journal-2"), &env).await,
    ];
    for gw in &gateways {
        assert_eq!(served_by(gw, &key_a, "ann").await, base);
        // Not yet acme's champion, but acme may name it; globex may not.
        let (status, body) = gw
            .post(
                &key_b,
                "/v1/chat/completions",
                json!({"model": "tiny-acme", "max_tokens": 2,
                       "messages": [{"role": "user", "content": "hi"}]}),
            )
            .await;
        assert_eq!(status, 404, "{body}");
        assert_eq!(body["error"]["code"], "model_not_found");
    }

    let promoted = cli(
        &setup.db,
        &[
            "models",
            "promote",
            "tiny-acme",
            "--team",
            "acme",
            "--reason",
            "reviewed by hand",
        ],
    );
    assert!(promoted.contains("now team acme's champion"), "{promoted}");
    for (i, gw) in gateways.iter().enumerate() {
        let switched = eventually(10, || async {
            (served_by(gw, &key_a, "ann").await == cand).then_some(())
        })
        .await;
        assert!(switched.is_some(), "gateway {i} still serves acme the base");
        assert_eq!(
            served_by(gw, &key_b, "bob").await,
            base,
            "globex keeps the base"
        );
    }

    let rolled = cli(
        &setup.db,
        &[
            "models",
            "rollback",
            "--team",
            "acme",
            "--reason",
            "answers got worse",
        ],
    );
    assert!(rolled.contains("team acme"), "{rolled}");
    for (i, gw) in gateways.iter().enumerate() {
        let back = eventually(10, || async {
            (served_by(gw, &key_a, "ann").await == base).then_some(())
        })
        .await;
        assert!(
            back.is_some(),
            "gateway {i} still serves acme the candidate"
        );
    }

    let log = cli(&setup.db, &["decisions", "--team", "acme"]);
    let rows: Vec<&str> = log.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{log}");
    assert!(
        rows[0].contains("manual_rollback") && rows[0].contains("answers got worse"),
        "{log}"
    );
    assert!(
        rows[1].contains("manual_promote") && rows[1].contains("reviewed by hand"),
        "{log}"
    );
}

/// Flips bytes in the middle of `path`, keeping its size: a model file
/// damaged on disk.
fn corrupt(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 4096] {
        *b ^= 0xA5;
    }
    std::fs::write(path, bytes).unwrap();
}

#[tokio::test]
async fn a_corrupted_model_file_is_refused_at_load_and_the_team_keeps_its_model() {
    let setup = TinySetup::new("fw_corrupt_model").await;
    let key = setup.key("acme");
    let next = flywheel_model::testing::write_tiny_model(&setup.dir, 5).unwrap();
    cli(
        &setup.db,
        &[
            "models",
            "import",
            next.to_str().unwrap(),
            "--name",
            "tiny-next",
        ],
    );
    let pool = flywheel_store::connect(&setup.db).await.unwrap();
    let version = |name: &'static str| {
        let pool = pool.clone();
        async move {
            flywheel_store::models::by_name(&pool, name)
                .await
                .unwrap()
                .unwrap()
        }
    };
    let (base, cand) = (version("tiny").await, version("tiny-next").await);

    let port = flywheel_tests::free_port();
    let log_path = setup.dir.join("serve.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let env = [("FLYWHEEL_ROUTE_REFRESH_SECS", "3600")];
    let child = GatewayProcess::spawn(
        &setup.db,
        port,
        &setup.dir.join("journal"),
        &env,
        log.into(),
    );
    let gw = GatewayProcess {
        child,
        base: format!("http://127.0.0.1:{port}"),
    };
    assert!(flywheel_tests::ready(&gw.base).await);
    assert_eq!(served_by(&gw, &key, "ann").await, base.id.to_string());

    // The candidate's file is damaged after it was registered; then it is
    // promoted.
    corrupt(std::path::Path::new(&cand.path));
    cli(
        &setup.db,
        &[
            "models",
            "promote",
            "tiny-next",
            "--team",
            "acme",
            "--reason",
            "looked good",
        ],
    );
    let switched = eventually(10, || async {
        let models: serde_json::Value = reqwest::Client::new()
            .get(format!("{}/v1/models", gw.base))
            .bearer_auth(&key)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let champion = models["data"]
            .as_array()?
            .iter()
            .find(|m| m["role"] == "champion")
            .map(|m| m["id"].clone());
        (champion == Some(json!("tiny-next"))).then_some(())
    })
    .await;
    assert!(switched.is_some(), "the gateway never saw the promotion");

    // Every request of the team is still answered, by the model that
    // served it before; the damaged file is never loaded.
    for user in ["ann", "bob", "cyd", "dee"] {
        assert_eq!(served_by(&gw, &key, user).await, base.id.to_string());
    }
    // Named by its own name it is the team's champion route as well, and
    // is answered the same way.
    let (status, body) = gw
        .post(
            &key,
            "/v1/chat/completions",
            json!({"model": "tiny-next", "max_tokens": 2,
                   "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["system_fingerprint"], base.id.to_string());
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains("has sha256") && log.contains(&cand.sha256),
        "the gateway's log does not say why:\n{log}"
    );
    // What the team was served is recorded as the version that made it:
    // the six answers, all by the base.
    let made = eventually(10, || async {
        let rows: Vec<(uuid::Uuid,)> = sqlx::query_as(
            "select c.model_version_id from completions c join teams t on t.id = c.team_id
             where t.name = 'acme'",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        (rows.len() == 6).then_some(rows)
    })
    .await
    .expect("six completions recorded");
    assert!(made.iter().all(|(v,)| *v == base.id), "{made:?}");
}
