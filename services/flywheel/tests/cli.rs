//! The `flywheel` binary's admin commands against real Postgres.

use std::process::Command;

mod common;

use common::fresh_database;

fn flywheel(db: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_flywheel"))
        .env("FLYWHEEL_HOME", common::test_home())
        .args(args)
        .env("DATABASE_URL", db)
        .env(
            "FLYWHEEL_MODEL_CACHE",
            std::env::temp_dir().join(format!("fw-cli-{}", std::process::id())),
        )
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[tokio::test]
async fn keys_create_list_revoke() {
    let db = fresh_database("fw_cli").await;
    let (ok, out, err) = flywheel(&db, &["migrate"]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = flywheel(&db, &["keys", "create", "--team", "search"]);
    assert!(ok, "{out}{err}");
    let key = out.lines().last().unwrap().trim().to_string();
    assert!(
        key.starts_with("fw-") && key.len() > 40,
        "last line is the key: {out}"
    );

    let pool = flywheel_store::connect(&db).await.unwrap();
    let who = flywheel_store::keys::authenticate(&pool, &key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(who.team_name, "search");

    let (ok, out, _) = flywheel(&db, &["keys", "list", "--team", "search"]);
    assert!(
        ok && out.contains(&key[..11]) && out.contains("active"),
        "{out}"
    );
    let (ok, out, err) = flywheel(&db, &["keys", "revoke", &key[..11]]);
    assert!(ok, "{out}{err}");
    assert!(
        flywheel_store::keys::authenticate(&pool, &key)
            .await
            .unwrap()
            .is_none()
    );
    // Team settings.
    let (ok, out, err) = flywheel(&db, &["teams", "set", "search", "--store-text", "false"]);
    assert!(ok && out.contains("store_text = false"), "{out}{err}");
    let stored: bool = sqlx::query_scalar("select store_text from teams where name = 'search'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(!stored);
    let (ok, _, err) = flywheel(&db, &["teams", "set", "nobody", "--store-text", "true"]);
    assert!(!ok && err.contains("no team named nobody"), "{err}");
    // Revoking again is an error with a message, not a crash.
    let (ok, _, err) = flywheel(&db, &["keys", "revoke", &key[..11]]);
    assert!(!ok && err.contains("no active key"), "{err}");
}

#[tokio::test]
async fn models_import_list_promote() {
    let db = fresh_database("fw_cli").await;
    let dir = std::env::temp_dir().join(format!("fw-cli-models-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let a = flywheel_model::testing::write_tiny_model(&dir, 1).unwrap();
    let b = flywheel_model::testing::write_tiny_model(&dir, 2).unwrap();
    let (ok, out, err) = flywheel(
        &db,
        &["models", "import", a.to_str().unwrap(), "--name", "tiny-a"],
    );
    assert!(
        ok && out.contains("tiny-a is now the champion"),
        "{out}{err}"
    );
    let (ok, out, err) = flywheel(
        &db,
        &["models", "import", b.to_str().unwrap(), "--name", "tiny-b"],
    );
    assert!(ok && !out.contains("champion"), "{out}{err}");
    let (ok, out, err) = flywheel(&db, &["models", "promote", "tiny-b"]);
    assert!(ok, "{out}{err}");
    let pool = flywheel_store::connect(&db).await.unwrap();
    let champion = flywheel_store::models::champion(&pool)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(champion.name, "tiny-b");
    let (ok, out, _) = flywheel(&db, &["models", "list"]);
    assert!(
        ok && out.contains("tiny-a") && out.contains("tiny-b"),
        "{out}"
    );
    let (ok, _, err) = flywheel(&db, &["models", "import", "/no/such/file.gguf"]);
    assert!(!ok && err.contains("No such file"), "{err}");
}
