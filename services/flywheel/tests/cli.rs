//! The `flywheel` binary's admin commands against real Postgres.

use flywheel_tests::fresh_database;

fn flywheel(db: &str, args: &[&str]) -> (bool, String, String) {
    let cache = std::env::temp_dir().join(format!("fw-cli-{}", std::process::id()));
    let cache = cache.display().to_string();
    let ran = flywheel_tests::run(Some(db), &[("FLYWHEEL_MODEL_CACHE", &cache)], args, None);
    (ran.ok(), ran.stdout, ran.stderr)
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
async fn keys_carry_scopes_and_teams_carry_rate_limits() {
    use flywheel_store::keys::{Scope, authenticate};
    let db = fresh_database("fw_cli").await;
    let (ok, out, err) = flywheel(&db, &["migrate"]);
    assert!(ok, "{out}{err}");
    let pool = flywheel_store::connect(&db).await.unwrap();
    // By default a key may do everything; --scopes narrows it.
    let (ok, out, err) = flywheel(&db, &["keys", "create", "--team", "shop"]);
    assert!(
        ok && out.contains("scopes chat,feedback,read,delete"),
        "{out}{err}"
    );
    let (ok, out, err) = flywheel(
        &db,
        &["keys", "create", "--team", "shop", "--scopes", "feedback"],
    );
    assert!(ok, "{out}{err}");
    let voter = out.lines().last().unwrap().trim().to_string();
    let who = authenticate(&pool, &voter).await.unwrap().unwrap();
    assert_eq!(who.scopes, vec![Scope::Feedback]);
    let (ok, out, _) = flywheel(&db, &["keys", "list", "--team", "shop"]);
    let line = out
        .lines()
        .find(|l| l.contains(&voter[..11]))
        .unwrap_or_default();
    assert!(ok && line.contains(" feedback "), "{out}");
    // Set later, by prefix.
    let (ok, out, err) = flywheel(&db, &["keys", "scopes", &voter[..11], "feedback,read"]);
    assert!(ok && out.contains("scopes feedback,read"), "{out}{err}");
    let who = authenticate(&pool, &voter).await.unwrap().unwrap();
    assert_eq!(who.scopes, vec![Scope::Feedback, Scope::Read]);
    // Bad lists are refused with the list of scopes; nothing changes.
    for bad in ["", "feedback,superuser", ","] {
        let (ok, _, err) = flywheel(&db, &["keys", "scopes", &voter[..11], bad]);
        assert!(
            !ok && err.contains("chat,feedback,read,delete,admin"),
            "{bad:?}: {err}"
        );
    }
    let (ok, _, err) = flywheel(
        &db,
        &["keys", "create", "--team", "shop", "--scopes", "everything"],
    );
    assert!(!ok && err.contains("no scope is called"), "{err}");
    let who = authenticate(&pool, &voter).await.unwrap().unwrap();
    assert_eq!(who.scopes, vec![Scope::Feedback, Scope::Read]);

    // Rate limits: one at a time, the other kept; none removes one.
    let (ok, out, err) = flywheel(
        &db,
        &["teams", "set", "shop", "--requests-per-minute", "120"],
    );
    assert!(
        ok && out.contains("requests_per_minute = 120"),
        "{out}{err}"
    );
    let (ok, out, err) = flywheel(
        &db,
        &["teams", "set", "shop", "--tokens-per-minute", "50000"],
    );
    assert!(
        ok && out.contains("tokens_per_minute = 50000"),
        "{out}{err}"
    );
    let limits = authenticate(&pool, &voter).await.unwrap().unwrap().limits;
    assert_eq!(
        (limits.requests_per_minute, limits.tokens_per_minute),
        (Some(120), Some(50_000))
    );
    let (ok, out, err) = flywheel(
        &db,
        &["teams", "set", "shop", "--requests-per-minute", "none"],
    );
    assert!(
        ok && out.contains("requests_per_minute = none"),
        "{out}{err}"
    );
    let limits = authenticate(&pool, &voter).await.unwrap().unwrap().limits;
    assert_eq!(
        (limits.requests_per_minute, limits.tokens_per_minute),
        (None, Some(50_000))
    );
    let (ok, _, err) = flywheel(&db, &["teams", "set", "shop", "--tokens-per-minute", "0"]);
    assert!(!ok && err.contains("above 0"), "{err}");
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

// A Hugging Face folder (the tiny Llama 3's: config.json, sharded
// safetensors, tokenizer.json, chat template) is converted and registered
// under the folder's whole name; a folder of a family Flywheel does not
// read, or without its tokenizer, is refused naming what is wrong, and
// nothing is registered for it.
#[tokio::test]
async fn a_hugging_face_folder_is_converted_and_registered() {
    let db = fresh_database("fw_cli").await;
    let dir = std::env::temp_dir().join(format!("fw-cli-hf-{}", uuid::Uuid::new_v4()));
    let folder = dir.join("Tiny-Llama-3.2-1B-Instruct");
    std::fs::create_dir_all(&folder).unwrap();
    let source = flywheel_tests::reference::family_dir("llama3").join("hf");
    for f in std::fs::read_dir(&source).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, folder.join(f.file_name().unwrap())).unwrap();
    }
    let (ok, out, err) = flywheel(&db, &["models", "import", folder.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("registered Tiny-Llama-3.2-1B-Instruct")
            && out.contains("serving it takes about"),
        "{out}"
    );
    let pool = flywheel_store::connect(&db).await.unwrap();
    let v = flywheel_store::models::by_name(&pool, "Tiny-Llama-3.2-1B-Instruct")
        .await
        .unwrap()
        .unwrap();
    let gguf = flywheel_model::gguf::GgufFile::open(std::path::Path::new(&v.path)).unwrap();
    assert_eq!(gguf.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(
        gguf.tensor_dtype("blk.0.attn_q.weight"),
        Some(candle_core::quantized::GgmlDType::F32)
    );
    // Its matrices quantized as it is converted; a GGUF file is not.
    let (ok, out, err) = flywheel(
        &db,
        &[
            "models",
            "import",
            folder.to_str().unwrap(),
            "--name",
            "q8",
            "--quantize",
            "q8_0",
        ],
    );
    assert!(ok, "{out}{err}");
    let v = flywheel_store::models::by_name(&pool, "q8")
        .await
        .unwrap()
        .unwrap();
    let gguf = flywheel_model::gguf::GgufFile::open(std::path::Path::new(&v.path)).unwrap();
    assert_eq!(
        gguf.tensor_dtype("blk.0.attn_q.weight"),
        Some(candle_core::quantized::GgmlDType::Q8_0)
    );
    let (ok, _, err) = flywheel(
        &db,
        &[
            "models",
            "import",
            &v.path,
            "--name",
            "again",
            "--quantize",
            "q4_1",
        ],
    );
    assert!(!ok && err.contains("FLYWHEEL_QUANTIZE"), "{err}");

    let refused = |name: &str, why: &str| {
        let (ok, out, err) = flywheel(
            &db,
            &["models", "import", folder.to_str().unwrap(), "--name", name],
        );
        assert!(!ok && err.contains(why), "{out}{err}");
    };
    std::fs::remove_file(folder.join("tokenizer.json")).unwrap();
    refused("no-tok", "tokenizer.json");
    std::fs::copy(source.join("tokenizer.json"), folder.join("tokenizer.json")).unwrap();
    let config = folder.join("config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("\"llama\"", "\"gemma3\"")).unwrap();
    refused("gemma", "model_type `gemma3`");
    let (_, listed, _) = flywheel(&db, &["models", "list"]);
    assert!(
        !listed.contains("no-tok") && !listed.contains("gemma"),
        "{listed}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

// A model is registered with what serving it takes; a gateway allowed
// less refuses it before loading, saying what it needs and what to change.
#[tokio::test]
async fn a_model_that_does_not_fit_is_refused_with_what_it_needs() {
    let db = fresh_database("fw_cli").await;
    let dir = std::env::temp_dir().join(format!("fw-cli-memory-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let tiny = flywheel_model::testing::write_tiny_model(&dir, 1).unwrap();
    let (ok, out, err) = flywheel(
        &db,
        &["models", "import", tiny.to_str().unwrap(), "--name", "tiny"],
    );
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("serving it takes about") && out.contains("for one sequence of 256 tokens"),
        "{out}"
    );
    // 256 MiB of prefix cache alone is more than a budget of 100 MiB.
    let ran = flywheel_tests::run(
        Some(&db),
        &[
            ("FLYWHEEL_MEMORY_MB", "100"),
            ("FLYWHEEL_ADDR", "127.0.0.1:0"),
        ],
        &["serve"],
        None,
    );
    assert!(!ran.ok(), "{}", ran.stderr);
    for part in [
        "tiny does not fit in memory",
        "prefix cache up to 256 MiB",
        "100 MiB is available (the configured budget, FLYWHEEL_MEMORY_MB)",
        "FLYWHEEL_PREFIX_CACHE_MB",
    ] {
        assert!(ran.stderr.contains(part), "{part:?} in {}", ran.stderr);
    }
}

/// Runs the binary with `env` and `args` and no database; returns whether
/// it succeeded and its stderr.
fn start_with(env: &[(&str, &str)], args: &[&str]) -> (bool, String) {
    let ran = flywheel_tests::run(None, env, args, None);
    (ran.ok(), ran.stderr)
}

#[test]
fn bad_configuration_stops_the_start_and_names_the_setting() {
    let file = std::env::temp_dir().join(format!("fw-{}.toml", uuid::Uuid::new_v4()));
    std::fs::write(&file, "[gateway]\nadr = \"0.0.0.0:8080\"\n").unwrap();
    let (ok, err) = start_with(&[], &["--config", file.to_str().unwrap(), "serve"]);
    assert!(!ok);
    assert!(err.contains("unknown setting `gateway.adr`"), "{err}");

    let (ok, err) = start_with(&[("FLYWHEEL_LOG_COMPLETIONS", "flase")], &["serve"]);
    assert!(!ok);
    assert!(
        err.contains("FLYWHEEL_LOG_COMPLETIONS = \"flase\": expected true or false"),
        "{err}"
    );

    let (ok, err) = start_with(&[("FLYWHEEL_PG_PORT", "70000")], &["up"]);
    assert!(!ok);
    assert!(
        err.contains("FLYWHEEL_PG_PORT = \"70000\": expected a number from 1 to 65535"),
        "{err}"
    );

    // The same settings, valid, are shown with where they came from.
    std::fs::write(&file, "[gateway]\naddr = \"0.0.0.0:9999\"\n").unwrap();
    let out = flywheel_tests::run(
        Some("postgres://fw:s3cret@db/fw"),
        &[("FLYWHEEL_PG_PORT", "6543")],
        &["--config", file.to_str().unwrap(), "config", "show"],
        None,
    );
    let shown = &out.stdout;
    assert!(out.ok());
    let line = |key: &str| {
        shown
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("no {key} in\n{shown}"))
            .to_string()
    };
    assert!(line("gateway.addr").contains("0.0.0.0:9999"));
    assert!(line("gateway.addr").ends_with(file.to_str().unwrap()));
    assert!(line("database.local_port").contains("environment (FLYWHEEL_PG_PORT)"));
    assert!(line("database.url").contains("postgres://fw:***@db/fw"));
    assert!(!shown.contains("s3cret"));
    assert!(line("journal.sync").ends_with("default"));
}

#[tokio::test]
async fn eval_exits_3_when_the_gate_says_no_and_1_when_it_cannot_run() {
    let db = fresh_database("fw_cli_eval").await;
    let dir = std::env::temp_dir().join(format!("fw-cli-eval-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let a = flywheel_model::testing::write_tiny_model(&dir, 1).unwrap();
    let b = flywheel_model::testing::write_tiny_model(&dir, 2).unwrap();
    for (path, name) in [(&a, "tiny-a"), (&b, "tiny-b")] {
        let (ok, out, err) = flywheel(
            &db,
            &["models", "import", path.to_str().unwrap(), "--name", name],
        );
        assert!(ok, "{out}{err}");
    }
    // Another random model, no task suite, no held-out votes: nothing shows
    // it better, so the gate says no, and the exit code says it.
    let cache = std::env::temp_dir().join(format!("fw-cli-{}", std::process::id()));
    let cache = cache.display().to_string();
    let ran = flywheel_tests::run(
        Some(&db),
        &[("FLYWHEEL_MODEL_CACHE", &cache)],
        &["eval", "tiny-b", "--against", "tiny-a"],
        None,
    );
    assert_eq!(ran.code, Some(3), "{}{}", ran.stdout, ran.stderr);
    assert!(
        ran.stdout
            .contains("FAIL: no evidence the candidate is better"),
        "{}",
        ran.stdout
    );
    assert!(
        ran.stderr
            .contains("tiny-b did not pass the gate against tiny-a"),
        "{}",
        ran.stderr
    );
    // A candidate that does not exist: an error, not a "no".
    let ran = flywheel_tests::run(
        Some(&db),
        &[],
        &["eval", "nothing", "--against", "tiny-a"],
        None,
    );
    assert_eq!(ran.code, Some(1), "{}", ran.stderr);
    // --json lists.
    let (ok, lines, _) = flywheel(&db, &["eval", "list", "--json"]);
    assert!(ok && lines.lines().count() == 1, "{lines}");
    let (ok, models, _) = flywheel(&db, &["models", "list", "--json"]);
    let names: Vec<String> = models
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["name"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(ok && names.contains(&"tiny-b".to_string()), "{models}");
}

#[tokio::test]
async fn loop_starts_one_cycle_per_team_and_cycles_lists_it() {
    let db = fresh_database("fw_cli_loop").await;
    let (ok, out, err) = flywheel(&db, &["migrate"]);
    assert!(ok, "{out}{err}");
    let (ok, _, err) = flywheel(&db, &["keys", "create", "--team", "acme"]);
    assert!(ok, "{err}");
    let (ok, out, err) = flywheel(&db, &["loop", "--team", "acme", "--no-wait"]);
    assert!(ok, "{out}{err}");
    let id = out
        .strip_prefix("cycle ")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("{out}"))
        .to_string();
    // A second start finds the one running.
    let (ok, again, err) = flywheel(&db, &["loop", "--team", "acme", "--no-wait"]);
    assert!(ok, "{err}");
    assert!(
        again.contains(&format!("already has cycle {id} running (at curate)")),
        "{again}"
    );
    let (ok, list, _) = flywheel(&db, &["cycles", "list", "--team", "acme"]);
    assert!(ok);
    let row = list
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("{list}"));
    assert!(row.contains("manual") && row.contains("running"), "{row}");
    assert_eq!(list.lines().count(), 2, "a header and one cycle: {list}");
    let (ok, shown, _) = flywheel(&db, &["cycles", "show", &id]);
    assert!(ok && shown.contains("team       acme"), "{shown}");
    // The loop's table, every move a line, the ones open to it now marked.
    assert!(
        shown.contains("? curate    --train------> train"),
        "{shown}"
    );
    assert!(
        shown.contains("  canary    --roll_back--> done (rolled_back)"),
        "{shown}"
    );
    let (ok, json, _) = flywheel(&db, &["cycles", "show", &id, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(
        ok && v["status"] == "running" && v["stage"] == "curate",
        "{json}"
    );
    assert_eq!(v["path"], serde_json::json!([]));
    let (ok, lines, _) = flywheel(&db, &["cycles", "list", "--json"]);
    assert!(ok);
    let listed: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], id.as_str());
    let (ok, _, err) = flywheel(&db, &["loop", "--team", "nobody", "--no-wait"]);
    assert!(!ok && err.contains("nobody"), "{err}");
}

fn flywheel_stdin(db: &str, args: &[&str], stdin: &str) -> (bool, String, String) {
    let ran = flywheel_tests::run(Some(db), &[], args, Some(stdin));
    (ran.ok(), ran.stdout, ran.stderr)
}

#[tokio::test]
async fn admin_create_stores_an_argon2_hash_and_refuses_weak_input() {
    let db = fresh_database("fw_cli").await;
    let (ok, out, err) = flywheel(&db, &["migrate"]);
    assert!(ok, "{out}{err}");
    let create = ["admin", "create", "ada", "--password-stdin"];
    let (ok, out, err) = flywheel_stdin(&db, &create, "a long enough password\n");
    assert!(ok && out.contains("account ada (admin)"), "{out}{err}");
    let pool = flywheel_store::connect(&db).await.unwrap();
    let a = flywheel_store::admins::by_username(&pool, "ada")
        .await
        .unwrap()
        .unwrap();
    assert!(
        a.password_hash.starts_with("$argon2id$"),
        "{}",
        a.password_hash
    );
    assert!(!a.password_hash.contains("a long enough password"));
    let (ok, _, err) = flywheel_stdin(&db, &create, "short\n");
    assert!(!ok && err.contains("at least 10 characters"), "{err}");
    let (ok, _, err) = flywheel_stdin(
        &db,
        &[
            "admin",
            "create",
            "vic",
            "--role",
            "root",
            "--password-stdin",
        ],
        "a long enough password\n",
    );
    assert!(!ok && err.contains("role must be viewer or admin"), "{err}");
    // No password anywhere: an error that says where to give it.
    let (ok, _, err) = flywheel_stdin(&db, &["admin", "create", "vic"], "");
    assert!(!ok && err.contains("FLYWHEEL_ADMIN_PASSWORD"), "{err}");
    let (ok, out, _) = flywheel(&db, &["admin", "list"]);
    assert!(ok && out.contains("ada") && !out.contains("vic"), "{out}");
}
