//! Model versions served by an OpenAI-compatible server elsewhere, through
//! the real `flywheel serve`: a team starts on "the big model it uses
//! today", and every answer is logged, rated and curated like one of its
//! own; the upstream's faults (5xx, a stall, a connection cut mid-answer, a
//! stopped server) reach clients as OpenAI-shaped errors without losing the
//! record.
//!
//! The upstream here is a **stand-in** ([`StandIn`], in the test support
//! crate): a small server speaking OpenAI's protocol with a canned answer,
//! so that each fault can be made to happen on cue. It is not vLLM nor llama.cpp's
//! server; `scripts/upstream-llamacpp.py` runs the same path against
//! llama.cpp's real server (`llama_cpp.server`, from PyPI).

use std::time::Duration;

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, ChatCompletionStreamOptions,
    CreateChatCompletionRequestArgs,
};
use flywheel_tests::process::{GatewayProcess, TinySetup, cli, free_port, ready};
use flywheel_tests::standin::{Behave, StandIn};
use flywheel_tests::{eventually, until};
use futures::StreamExt;
use serde_json::{Value, json};

/// Registers `name` as an upstream (model `teacher-7b`) on `url`, with
/// `extra` options.
fn register(db: &str, name: &str, url: &str, extra: &[&str]) {
    let args = [
        &[
            "models",
            "add-upstream",
            name,
            "--url",
            url,
            "--model",
            "teacher-7b",
        ][..],
        extra,
    ]
    .concat();
    cli(db, &args);
}

/// [`register`]s `name` for team `team` only and makes it the team's champion.
fn add_upstream(db: &str, name: &str, url: &str, team: &str, extra: &[&str]) {
    register(db, name, url, &[&["--team", team][..], extra].concat());
    cli(
        db,
        &[
            "models",
            "promote",
            name,
            "--team",
            team,
            "--reason",
            "start on the model we use today",
        ],
    );
}

/// Team `acme` served by `flywheel serve` on the tiny model, and the
/// stand-in registered as `name`, a model any team may ask (a teacher or a
/// judge the team is not served by).
struct Asked {
    setup: TinySetup,
    standin: StandIn,
    key: String,
    gw: GatewayProcess,
    pool: sqlx::PgPool,
}

async fn with_standin_as(db: &str, name: &str) -> Asked {
    let setup = TinySetup::new(db).await;
    let standin = StandIn::start();
    let key = setup.key("acme");
    register(&setup.db, name, &format!("{}/v1", standin.base), &[]);
    let gw = serve(&setup, &[], &setup.dir.join("gateway.log")).await;
    let pool = flywheel_store::connect(&setup.db).await.unwrap();
    Asked {
        setup,
        standin,
        key,
        gw,
        pool,
    }
}

/// A dashboard account `ops`, signed in.
async fn admin(setup: &TinySetup, gw: &GatewayProcess) -> flywheel_tests::admin::Client {
    let made = flywheel_tests::process::run(
        Some(&setup.db),
        &[],
        &["admin", "create", "ops", "--password-stdin"],
        Some(flywheel_tests::admin::PASSWORD),
    );
    assert!(made.ok(), "{}", made.stderr);
    let mut admin = flywheel_tests::admin::Client::at(&gw.base);
    let signed = admin.login("ops", flywheel_tests::admin::PASSWORD).await;
    assert_eq!(signed.status, 303, "{}", signed.body);
    admin
}

/// `flywheel serve` with `env`, its log (stderr) in `log`.
async fn serve(setup: &TinySetup, env: &[(&str, &str)], log: &std::path::Path) -> GatewayProcess {
    let port = free_port();
    let stderr = std::fs::File::create(log).unwrap();
    let child = GatewayProcess::spawn(
        &setup.db,
        port,
        &setup.dir.join("journal"),
        env,
        stderr.into(),
    );
    let base = format!("http://127.0.0.1:{port}");
    let gw = GatewayProcess { child, base };
    assert!(ready(&gw.base).await, "the gateway did not become ready");
    gw
}

fn openai(gw: &GatewayProcess, key: &str) -> Client<OpenAIConfig> {
    Client::with_config(
        OpenAIConfig::new()
            .with_api_base(format!("{}/v1", gw.base))
            .with_api_key(key),
    )
}

fn ask(text: &str) -> CreateChatCompletionRequestArgs {
    let mut args = CreateChatCompletionRequestArgs::default();
    args.model("default").messages(vec![
        ChatCompletionRequestUserMessageArgs::default()
            .content(text)
            .build()
            .unwrap()
            .into(),
    ]);
    args
}

/// A team's completions: (output, finish_reason, prompt_tokens, completion_tokens), oldest first.
async fn completions(pool: &sqlx::PgPool, version: &str) -> Vec<(String, String, i32, i32)> {
    sqlx::query_as(
        "select c.output, c.finish_reason, c.prompt_tokens, c.completion_tokens
         from completions c join model_versions v on v.id = c.model_version_id
         where v.name = $1 order by c.created_at",
    )
    .bind(version)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_team_on_an_upstream_model_is_served_logged_rated_and_curated_as_on_its_own() {
    let setup = TinySetup::new("fw_upstream").await;
    let standin = StandIn::start();
    let key = setup.key("acme");
    let secret = format!("sk-upstream-{}", uuid::Uuid::new_v4());
    add_upstream(
        &setup.db,
        "big",
        &format!("{}/v1", standin.base),
        "acme",
        &["--api-key-env", "FW_TEST_UPSTREAM_KEY"],
    );
    let log = setup.dir.join("gateway.log");
    let gw = serve(
        &setup,
        &[("FW_TEST_UPSTREAM_KEY", &secret), ("RUST_LOG", "debug")],
        &log,
    )
    .await;
    let client = openai(&gw, &key);

    // A chat, as any OpenAI client sends it.
    let mut args = ask("My invoice charged me twice.");
    args.user("end-user-1").max_completion_tokens(40u32);
    let full = client.chat().create(args.build().unwrap()).await.unwrap();
    assert_eq!(
        full.choices[0].message.content.as_deref(),
        Some("Route to billing.")
    );
    assert_eq!(full.model, "big");
    let usage = full.usage.unwrap();
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (21, 4));

    // And a stream, with usage.
    let mut args = ask("Where do I change my password?");
    args.user("end-user-2")
        .stream_options(ChatCompletionStreamOptions {
            include_usage: Some(true),
            include_obfuscation: None,
        });
    let mut stream = client
        .chat()
        .create_stream(args.build().unwrap())
        .await
        .unwrap();
    let (mut text, mut streamed_usage, mut streamed_id) = (String::new(), None, None);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        streamed_id.get_or_insert(chunk.id.clone());
        for c in &chunk.choices {
            text.push_str(c.delta.content.as_deref().unwrap_or(""));
        }
        streamed_usage = streamed_usage.or(chunk.usage);
    }
    assert_eq!(text, "Route to billing.");
    assert_eq!(streamed_usage.map(|u| u.prompt_tokens), Some(21));

    // What the upstream got: its own model name, the key from the
    // gateway's environment, the request without the end user's id.
    let seen = standin.seen();
    assert_eq!(seen.len(), 2);
    for (auth, body) in &seen {
        assert_eq!(auth.as_deref(), Some(format!("Bearer {secret}").as_str()));
        assert_eq!(body["model"], "teacher-7b");
        assert_eq!(body["stream"], true);
        assert!(
            body.get("user").is_none(),
            "the end user's id stays here: {body}"
        );
    }
    // The length field the client used, passed on as it is.
    assert_eq!(seen[0].1["max_completion_tokens"], 40);
    assert!(seen[0].1.get("max_tokens").is_none());
    assert_eq!(seen[1].1["max_tokens"], 512, "the gateway's default length");

    // Logged with the version that answered, and rated.
    let pool = flywheel_store::connect(&setup.db).await.unwrap();
    let rows = eventually(20, || async {
        Some(completions(&pool, "big").await).filter(|r| r.len() == 2)
    })
    .await
    .expect("both answers logged");
    for row in &rows {
        assert_eq!(row, &("Route to billing.".into(), "stop".into(), 21, 4));
    }
    let votes = [
        (full.id.clone(), "up", "end-user-1"),
        (streamed_id.unwrap(), "down", "end-user-2"),
    ];
    for (id, rating, user) in votes {
        let (status, body) = gw
            .post(
                &key,
                "/v1/feedback",
                json!({"completion_id": id, "rating": rating, "user": user}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }
    assert!(votes_stored(&pool, 2).await, "2 votes stored");

    // What the team's use cost, in /metrics.
    let metrics = metrics_text(&gw).await;
    for line in [
        "flywheel_upstream_team_requests_total{version=\"big\",team=\"acme\"} 2",
        "flywheel_upstream_team_prompt_tokens_total{version=\"big\",team=\"acme\"} 42",
        "flywheel_upstream_team_completion_tokens_total{version=\"big\",team=\"acme\"} 8",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }

    // Curated like any other answers: the upstream's liked answer is a
    // KTO example of the team's dataset.
    cli(
        &setup.db,
        &["datasets", "build", "--team", "acme", "--inline"],
    );
    let kto = cli(
        &setup.db,
        &["datasets", "export", "acme@1", "--format", "trl-kto"],
    );
    let examples: Vec<Value> = kto
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(examples.len(), 2, "{kto}");
    assert!(kto.contains("Route to billing."), "{kto}");

    // The dashboard shows where it is served and what the team's use cost,
    // from the log.
    let page = admin(&setup, &gw).await.get("/admin/models").await;
    assert_eq!(page.status, 200);
    assert!(
        page.body
            .contains(&format!("upstream: <code>{}/v1</code>", standin.base)),
        "{}",
        page.body
    );
    assert!(
        page.body
            .contains("<td>big</td><td>acme</td><td>2</td><td>0</td><td>42</td><td>8</td>"),
        "{}",
        page.body
    );
    let page = page.body;

    // The key is never stored, logged or shown.
    let listed = cli(&setup.db, &["models", "list", "--json"]);
    let (_, models) = gw_get(&gw, &key, "/v1/models").await;
    let dump: String = sqlx::query_scalar(
        "select concat_ws(' ', (select string_agg(row_to_json(u)::text, ' ') from upstreams u),
                              (select string_agg(row_to_json(v)::text, ' ') from model_versions v),
                              (select string_agg(row_to_json(c)::text, ' ') from completions c))",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("DEBUG"),
        "the gateway logged at debug level"
    );
    for (place, text) in [
        ("models list", listed),
        ("/v1/models", models.to_string()),
        ("the database", dump),
        ("the gateway's log", logged),
        ("the dashboard", page),
    ] {
        assert!(
            !text.contains(&secret),
            "the upstream's key appears in {place}"
        );
    }
}

async fn gw_get(gw: &GatewayProcess, key: &str, path: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .get(format!("{}{path}", gw.base))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// A chat through the gateway's HTTP API (no client library: the faults
/// below are read off the raw response).
async fn raw_chat(gw: &GatewayProcess, key: &str, stream: bool) -> (u16, String) {
    let r = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gw.base))
        .bearer_auth(key)
        .json(&json!({"model": "default", "stream": stream,
                      "messages": [{"role": "user", "content": "My invoice charged me twice."}]}))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn error_of(body: &str) -> Value {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    v["error"].clone()
}

#[tokio::test]
async fn upstream_faults_reach_clients_as_openai_errors_and_every_request_is_recorded() {
    let setup = TinySetup::new("fw_upstream_faults").await;
    let mut standin = StandIn::start();
    let key = setup.key("acme");
    add_upstream(
        &setup.db,
        "big",
        &format!("{}/v1", standin.base),
        "acme",
        &["--timeout-secs", "2"],
    );
    let log = setup.dir.join("gateway.log");
    // The circuit opens after four failures in a row and stays open for
    // the rest of the test.
    let gw = serve(
        &setup,
        &[
            ("FLYWHEEL_UPSTREAM_BREAKER_FAILURES", "4"),
            ("FLYWHEEL_UPSTREAM_BREAKER_COOLDOWN_SECS", "600"),
        ],
        &log,
    )
    .await;
    let pool = flywheel_store::connect(&setup.db).await.unwrap();
    let mut expect = Vec::new();

    // 500 three times: the first attempt and both retries fail; a 502.
    for _ in 0..3 {
        standin.then(Behave::Status(500));
    }
    let (status, body) = raw_chat(&gw, &key, false).await;
    assert_eq!(status, 502, "{body}");
    let e = error_of(&body);
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("server_error"), Some("upstream_error"))
    );
    assert!(e["message"].as_str().unwrap().contains("500"), "{e}");
    assert_eq!(standin.seen().len(), 3);
    expect.push(("", "error"));

    // An answer ends the run of failures (three so far).
    let (status, body) = raw_chat(&gw, &key, false).await;
    assert_eq!(status, 200, "{body}");
    expect.push(("Route to billing.", "stop"));

    // A 503 once: the retry answers (and the answer closes the count of
    // failures in a row).
    standin.then(Behave::Status(503));
    let (status, body) = raw_chat(&gw, &key, false).await;
    assert_eq!(status, 200, "{body}");
    expect.push(("Route to billing.", "stop"));

    // A request the upstream refuses is the client's fault, and not retried.
    let before = standin.seen().len();
    standin.then(Behave::Status(400));
    let (status, body) = raw_chat(&gw, &key, false).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(error_of(&body)["code"], "upstream_rejected");
    assert_eq!(standin.seen().len(), before + 1);
    expect.push(("", "error"));

    // A stall past the version's 2 s: a 504.
    standin.then(Behave::Stall(Duration::from_secs(5)));
    let (status, body) = raw_chat(&gw, &key, false).await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(error_of(&body)["code"], "upstream_timeout");
    expect.push(("", "error"));

    // A connection cut mid-answer: the client has the pieces streamed so
    // far, then an error event; the record keeps what was said.
    standin.then(Behave::CutAfter(2));
    let (status, body) = raw_chat(&gw, &key, true).await;
    assert_eq!(status, 200, "a stream has started before the cut");
    assert!(
        body.contains("\"content\":\"Route \"") && body.contains("\"content\":\"to \""),
        "{body}"
    );
    let last: Value = body
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .unwrap();
    assert_eq!(last["error"]["code"], "upstream_error", "{body}");
    assert!(!body.contains("[DONE]"), "{body}");
    expect.push(("Route to ", "error"));

    // An answer still coming when the version's 2 s are up: a 504, and
    // the record keeps what had come.
    standin.then(Behave::Slow(Duration::from_millis(700)));
    let (status, body) = raw_chat(&gw, &key, false).await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(error_of(&body)["code"], "upstream_timeout");
    let slow = expect.len();
    expect.push(("(a part of the answer)", "error"));

    // Every request, answered or not, is in the log with what it produced.
    let rows = eventually(20, || async {
        Some(completions(&pool, "big").await).filter(|r| r.len() == expect.len())
    })
    .await
    .unwrap_or_else(|| panic!("{} records expected", expect.len()));
    let mut got: Vec<(&str, &str)> = rows.iter().map(|r| (r.0.as_str(), r.1.as_str())).collect();
    // How much of the slow answer came before the deadline is up to the clock.
    assert!(
        !got[slow].0.is_empty()
            && "Route to billing.".starts_with(got[slow].0)
            && got[slow].0 != "Route to billing.",
        "{:?}",
        got[slow]
    );
    got[slow].0 = expect[slow].0;
    assert_eq!(got, expect);

    // The server stops for real: refused connections, retried, then the
    // circuit opens and the gateway stops calling it (503 at once).
    let mut after = 0;
    let (status, body) = {
        after += 1;
        raw_chat(&gw, &key, false).await
    };
    assert_eq!(status, 200, "{body}");
    standin.stop();
    let (status, body) = {
        after += 1;
        raw_chat(&gw, &key, false).await
    };
    assert_eq!(status, 502, "{body}");
    assert!(
        error_of(&body)["message"]
            .as_str()
            .unwrap()
            .contains("could not be reached"),
        "{body}"
    );
    let mut opened = false;
    for _ in 0..3 {
        let (status, body) = {
            after += 1;
            raw_chat(&gw, &key, false).await
        };
        if status == 503 {
            assert_eq!(error_of(&body)["code"], "service_unavailable");
            opened = true;
            break;
        }
        assert_eq!(status, 502, "{body}");
    }
    assert!(opened, "four failures in a row open the circuit");
    let attempts = metric(&gw, "flywheel_upstream_attempts_total").await;
    after += 1;
    let r = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gw.base))
        .bearer_auth(&key)
        .json(&json!({"model": "default", "stream": true,
                      "messages": [{"role": "user", "content": "Still there?"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    // When to come back: within the 600 s cooldown.
    let retry_after: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1..=600).contains(&retry_after),
        "retry-after {retry_after}"
    );
    assert_eq!(
        metric(&gw, "flywheel_upstream_attempts_total").await,
        attempts,
        "an open circuit calls nobody"
    );
    assert_eq!(metric(&gw, "flywheel_upstream_circuit_open").await, 1.0);
    assert!(metric(&gw, "flywheel_upstream_refused_total").await >= 2.0);

    // Those requests too are recorded, each once: refused or failed.
    let sent = expect.len() + after;
    let rows = eventually(20, || async {
        Some(completions(&pool, "big").await).filter(|r| r.len() >= sent)
    })
    .await
    .unwrap_or_else(|| panic!("{sent} records expected"));
    assert_eq!(rows.len(), sent);
    assert!(
        rows[expect.len() + 1..]
            .iter()
            .all(|r| r.1 == "error" && r.0.is_empty())
    );
}

async fn metrics_text(gw: &GatewayProcess) -> String {
    reqwest::get(format!("{}/metrics", gw.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Whether `n` votes are in Postgres within 20 s.
async fn votes_stored(pool: &sqlx::PgPool, n: i64) -> bool {
    until(20, || async {
        sqlx::query_scalar::<_, i64>("select count(*) from feedback")
            .fetch_one(pool)
            .await
            .unwrap()
            == n
    })
    .await
}

/// `name`'s series for the upstream version `big`.
async fn metric(gw: &GatewayProcess, name: &str) -> f64 {
    let text = metrics_text(gw).await;
    let series = format!("{name}{{version=\"big\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
        .parse()
        .unwrap()
}

/// A chat by `user` through the gateway (the team's champion, the tiny
/// model, answers); returns its id.
async fn chat_as(gw: &GatewayProcess, key: &str, user: &str, text: &str) -> String {
    let (status, body) = gw
        .post(
            key,
            "/v1/chat/completions",
            json!({"model": "default", "max_tokens": 3, "user": user,
                   "messages": [{"role": "user", "content": text}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body["id"].as_str().unwrap().to_string()
}

async fn delete_user(gw: &GatewayProcess, key: &str, user: &str) {
    let r = reqwest::Client::new()
        .delete(format!("{}/v1/users/{user}/data", gw.base))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn distillation_asks_the_teacher_the_teams_own_prompts_and_makes_a_dataset_version() {
    // The teacher: an upstream the team is not served by (its champion is
    // the tiny model).
    let Asked {
        setup,
        standin,
        key,
        gw,
        pool,
    } = with_standin_as("fw_distill", "big").await;
    let billing = "My invoice charged me twice, write to ann@example.com";
    chat_as(&gw, &key, "u1", billing).await;
    chat_as(&gw, &key, "u2", billing).await;
    chat_as(&gw, &key, "u3", "Where do I change my password?").await;
    chat_as(&gw, &key, "gone", "Please forget everything about me").await;
    chat_as(&gw, &key, "u4", "How do I export my reports?").await;
    assert!(
        until(20, || async { completions_of_team(&pool).await == 5 }).await,
        "the chats are logged"
    );
    delete_user(&gw, &key, "gone").await;

    // The teacher takes its time over the first prompt (the newest, u4's);
    // meanwhile u4 has their data deleted.
    standin.then(Behave::Stall(Duration::from_millis(1500)));
    let db = setup.db.clone();
    let run = std::thread::spawn(move || {
        flywheel_tests::process::run(
            Some(&db),
            &[],
            &[
                "distill",
                "--team",
                "acme",
                "--teacher",
                "big",
                "--concurrency",
                "1",
            ],
            None,
        )
    });
    assert!(
        until(20, || async { !standin.seen().is_empty() }).await,
        "the teacher was asked"
    );
    delete_user(&gw, &key, "u4").await;
    let ran = run.join().unwrap();
    assert!(ran.ok(), "{}", ran.stderr);
    assert!(
        ran.stdout.starts_with("acme@1: 2 SFT examples from big"),
        "{}",
        ran.stdout
    );
    assert!(ran.stdout.contains("1 duplicates"), "{}", ran.stdout);
    assert!(
        ran.stderr.contains("answered 3 of 3 prompts"),
        "progress: {}",
        ran.stderr
    );

    // What the teacher was asked: each distinct prompt once, redacted,
    // greedy; never the deleted user's.
    let asked: Vec<String> = standin
        .seen()
        .iter()
        .map(|(_, body)| {
            assert_eq!(body["temperature"], 0);
            body["messages"][0]["content"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(
        asked,
        [
            "How do I export my reports?",
            "Where do I change my password?",
            "My invoice charged me twice, write to [EMAIL]",
        ]
    );

    // The answers are the team's next dataset version, u4's left out.
    let sft = cli(
        &setup.db,
        &["datasets", "export", "acme@1", "--format", "trl-sft"],
    );
    let examples: Vec<Value> = sft
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(examples.len(), 2, "{sft}");
    assert!(!sft.contains("export my reports"), "{sft}");
    assert!(
        examples
            .iter()
            .all(|e| e.to_string().contains("Route to billing.")),
        "{sft}"
    );
    let shown = cli(&setup.db, &["datasets", "show", "acme@1"]);
    assert!(
        ran.stdout.contains("1 dropped as deleted"),
        "{}",
        ran.stdout
    );
    // Made by distillation from three logged requests, no votes.
    let shown: Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(
        shown["manifest"]["builder"], "flywheel-distill/1",
        "{shown}"
    );
    assert_eq!(
        (
            shown["lineage_rows"]["completions"].as_u64(),
            shown["lineage_rows"]["votes"].as_u64()
        ),
        (Some(3), Some(0)),
        "{shown}"
    );
    let listed = cli(&setup.db, &["datasets", "list", "--team", "acme", "--json"]);
    let v1: Value = listed
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|v| v["version"] == 1)
        .unwrap();
    let d = &v1["manifest"]["distillation"];
    assert_eq!(d["teacher"]["name"], "big", "{v1}");
    assert_eq!(d["prompts"], "log");
    assert_eq!(
        (
            d["outcome"]["duplicates"].as_u64(),
            d["outcome"]["deleted_meanwhile"].as_u64()
        ),
        (Some(1), Some(1)),
        "{d}"
    );

    // Its lineage names the requests it used: deleting u3's data marks it.
    let marked = || async {
        sqlx::query_scalar::<_, bool>(
            "select user_data_deleted_at is not null from dataset_versions where version = 1",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    assert!(!marked().await);
    delete_user(&gw, &key, "u3").await;
    assert!(marked().await);

    // A token budget stops the asking: the first answer costs 25 tokens.
    chat_as(&gw, &key, "u5", "Can I pay by card?").await;
    chat_as(&gw, &key, "u6", "Is there a mobile app?").await;
    // u1's and u2's, u5's and u6's: the others' were deleted.
    assert!(
        until(20, || async { completions_of_team(&pool).await == 4 }).await,
        "the chats are logged"
    );
    let out = cli(
        &setup.db,
        &[
            "distill",
            "--team",
            "acme",
            "--teacher",
            "big",
            "--concurrency",
            "1",
            "--budget-tokens",
            "20",
        ],
    );
    assert!(out.starts_with("acme@2: 1 SFT examples from big"), "{out}");
    assert!(out.contains("stopped at the token budget"), "{out}");

    // Prompts from a file; an answer cut at the length limit is left out.
    let file = setup.dir.join("prompts.jsonl");
    std::fs::write(
        &file,
        "{\"prompt\": \"Where is my parcel?\"}\n\n{\"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\"}, {\"role\": \"user\", \"content\": \"Can I get a refund?\"}]}\n",
    )
    .unwrap();
    standin.then(Behave::SayCut("Your parcel is"));
    let out = cli(
        &setup.db,
        &[
            "distill",
            "--team",
            "acme",
            "--teacher",
            "big",
            "--concurrency",
            "1",
            "--prompts",
            file.to_str().unwrap(),
        ],
    );
    assert!(out.starts_with("acme@3: 1 SFT examples from big"), "{out}");
    assert!(out.contains("1 cut at --max-tokens"), "{out}");
    let sft = cli(
        &setup.db,
        &["datasets", "export", "acme@3", "--format", "messages"],
    );
    assert!(
        sft.contains("Can I get a refund?") && sft.contains("Be brief."),
        "{sft}"
    );
    assert!(!sft.contains("parcel"), "{sft}");
    let bad = setup.dir.join("bad.jsonl");
    std::fs::write(&bad, "{\"question\": \"no\"}\n").unwrap();
    let ran = flywheel_tests::process::run(
        Some(&setup.db),
        &[],
        &[
            "distill",
            "--team",
            "acme",
            "--teacher",
            "big",
            "--prompts",
            bad.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(ran.code, Some(1));
    assert!(
        ran.stderr
            .contains("line 1: expected \"messages\" or \"prompt\""),
        "{}",
        ran.stderr
    );

    // What the team's distillations spent on the upstream is recorded, and
    // a budget for the team's jobs stops the next one where it runs out.
    let spent: i64 = sqlx::query_scalar(
        "select coalesce(sum(tokens), 0)::bigint from upstream_spend where purpose = 'distill'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(spent >= 3 * 25, "three distillations asked: {spent}");
    let budget = (spent + 20).to_string();
    let set = cli(
        &setup.db,
        &["teams", "set", "acme", "--upstream-budget-tokens", &budget],
    );
    assert!(
        set.contains(&format!("upstream_budget_tokens = {budget} per 30 days")),
        "{set}"
    );
    let two = setup.dir.join("two.jsonl");
    std::fs::write(
        &two,
        "{\"prompt\": \"What are your opening hours?\"}\n{\"prompt\": \"Do you ship abroad?\"}\n",
    )
    .unwrap();
    let distill_two = || {
        flywheel_tests::process::run(
            Some(&setup.db),
            &[],
            &[
                "distill",
                "--team",
                "acme",
                "--teacher",
                "big",
                "--concurrency",
                "1",
                "--prompts",
                two.to_str().unwrap(),
            ],
            None,
        )
    };
    let ran = distill_two();
    assert!(ran.ok(), "{}", ran.stderr);
    assert!(
        ran.stdout.starts_with("acme@4: 1 SFT examples from big"),
        "{}",
        ran.stdout
    );
    assert!(
        ran.stdout.contains("stopped at the team's upstream budget"),
        "{}",
        ran.stdout
    );
    // Spent now: the next job is refused before it asks anything.
    let asked = standin.seen().len();
    let ran = distill_two();
    assert_eq!(ran.code, Some(1), "{}", ran.stdout);
    assert!(
        ran.stderr.contains(&format!(
            "the team's upstream budget is spent: {} of {budget} tokens in the last 30 days",
            spent + 25
        )),
        "{}",
        ran.stderr
    );
    assert_eq!(standin.seen().len(), asked, "nothing was asked");
    let zero = flywheel_tests::process::run(
        Some(&setup.db),
        &[],
        &["teams", "set", "acme", "--upstream-budget-tokens", "0"],
        None,
    );
    assert_eq!(zero.code, Some(2), "{}", zero.stderr);

    // So do /metrics, every worker's from the database, and the dashboard,
    // beside what the team's requests cost.
    let (calls, tokens): (i64, i64) = sqlx::query_as(
        "select sum(calls)::bigint, sum(tokens)::bigint from upstream_spend where purpose = 'distill'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(tokens, spent + 25);
    let scraped = metrics_text(&gw).await;
    for line in [
        format!(
            "flywheel_upstream_job_calls_total{{version=\"big\",team=\"acme\",job=\"distill\"}} {calls}"
        ),
        format!(
            "flywheel_upstream_job_tokens_total{{version=\"big\",team=\"acme\",job=\"distill\"}} {tokens}"
        ),
    ] {
        assert!(scraped.lines().any(|l| l == line), "{line}\n{scraped}");
    }
    let page = admin(&setup, &gw).await.get("/admin/models").await;
    assert!(
        page.body.contains(&format!(
            "<td>big</td><td>acme</td><td>distill</td><td>{calls}</td><td>{tokens}</td>"
        )),
        "{}",
        page.body
    );
}

/// Three end users ask; u3's answer (the invoice) is voted down and
/// corrected to the billing desk; the vote is stored.
async fn three_asked_one_corrected(gw: &GatewayProcess, key: &str, pool: &sqlx::PgPool) {
    chat_as(gw, key, "u1", "Where do I change my password?").await;
    chat_as(gw, key, "u2", "How do I export my reports?").await;
    let invoice = chat_as(gw, key, "u3", "My invoice was charged twice").await;
    let (status, body) = gw
        .post(
            key,
            "/v1/feedback",
            json!({"completion_id": invoice, "rating": "down", "user": "u3",
                   "correction": "Send it to the billing desk."}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert!(votes_stored(pool, 1).await, "the vote is stored");
}

/// Distillation mixed with the team's own votes: the team's next curated
/// version holds the teacher's answers beside its users' examples (the
/// users' own answer where both have one), carries the distillation's
/// lineage (so deleting an end user's data marks it), and a distillation
/// that holds a deleted user's data is mixed into nothing more.
#[tokio::test]
async fn curation_mixes_the_newest_distillation_with_the_teams_own_votes() {
    // The teacher answers while `_standin` lives.
    let Asked {
        setup,
        standin: _standin,
        key,
        gw,
        pool,
    } = with_standin_as("fw_distill_mix", "big").await;
    three_asked_one_corrected(&gw, &key, &pool).await;
    let out = cli(
        &setup.db,
        &["distill", "--team", "acme", "--teacher", "big"],
    );
    assert!(out.starts_with("acme@1: 3 SFT examples from big"), "{out}");

    let built = cli(
        &setup.db,
        &["datasets", "build", "--team", "acme", "--inline"],
    );
    assert!(built.contains("dataset version 2"), "{built}");
    let all = |v: &str| {
        ["train", "eval"]
            .iter()
            .map(|split| {
                cli(
                    &setup.db,
                    &[
                        "datasets", "export", v, "--format", "messages", "--split", split,
                    ],
                )
            })
            .collect::<String>()
    };
    let sft = all("acme@2");
    // Taught, never held out: the gate's evidence stays the users'.
    let held_out = cli(
        &setup.db,
        &[
            "datasets", "export", "acme@2", "--format", "messages", "--split", "eval",
        ],
    );
    assert!(!held_out.contains("Route to billing."), "{held_out}");
    // The teacher's answers to the prompts no user answered...
    for prompt in ["change my password", "export my reports"] {
        let line = sft
            .lines()
            .find(|l| l.contains(prompt))
            .unwrap_or_else(|| panic!("{prompt}: {sft}"));
        assert!(line.contains("Route to billing."), "{line}");
    }
    // ...and the user's own correction where the teacher answered too.
    let invoice_lines: Vec<&str> = sft
        .lines()
        .filter(|l| l.contains("charged twice"))
        .collect();
    assert_eq!(invoice_lines.len(), 1, "{sft}");
    assert!(
        invoice_lines[0].contains("Send it to the billing desk."),
        "{sft}"
    );
    let shown: Value =
        serde_json::from_str(&cli(&setup.db, &["datasets", "show", "acme@2"])).unwrap();
    let d = &shown["manifest"]["distilled"];
    assert_eq!(
        (d["version"].as_i64(), d["teacher"].as_str()),
        (Some(1), Some("big")),
        "{shown}"
    );
    assert_eq!(d["left_out_for_the_users_own"], 1, "{shown}");
    assert_eq!(d["sft_added_to_train"], 2, "{shown}");
    assert_eq!(shown["sft_count"], 3, "{shown}");
    // The same votes and the same distillation: the same version.
    let again = cli(
        &setup.db,
        &["datasets", "build", "--team", "acme", "--inline"],
    );
    assert!(
        again.contains("already holds this input") && again.contains("version 2"),
        "{again}"
    );

    // u1 had no vote, only a prompt the teacher answered: deleting their
    // data marks the mixed version as well as the distilled one.
    delete_user(&gw, &key, "u1").await;
    let marked: Vec<i32> = sqlx::query_scalar(
        "select version from dataset_versions where user_data_deleted_at is not null order by version",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(marked, [1, 2]);
    // The marked distillation is mixed into nothing more.
    let built = cli(
        &setup.db,
        &["datasets", "build", "--team", "acme", "--inline"],
    );
    assert!(built.contains("dataset version 3"), "{built}");
    let sft = all("acme@3");
    assert!(!sft.contains("Route to billing."), "{sft}");
    let shown: Value =
        serde_json::from_str(&cli(&setup.db, &["datasets", "show", "acme@3"])).unwrap();
    assert!(shown["manifest"]["distilled"].is_null(), "{shown}");
}

/// The loop distils by itself (`FLYWHEEL_TRAIN_DISTILL_TEACHER`): a
/// cycle's curation first asks the teacher the team's newest prompts while
/// the team's votes are few, and the cycle's dataset mixes the answers in;
/// with no prompt logged since, or once the team has votes enough, it asks
/// nothing. The real worker and CLI, the stand-in as the teacher.
#[tokio::test]
async fn the_loop_distils_by_itself_while_the_teams_data_is_thin() {
    let Asked {
        setup,
        standin,
        key,
        gw,
        pool,
    } = with_standin_as("fw_loop_distill", "big").await;
    three_asked_one_corrected(&gw, &key, &pool).await;
    let mut worker = flywheel_tests::spawn(
        &setup.db,
        &[
            ("FLYWHEEL_JOB_HEARTBEAT_SECS", "1"),
            ("FLYWHEEL_CURATION_SCHEDULE", "off"),
        ],
        &["worker"],
    );
    // A cycle, as `flywheel loop` starts one with these settings, run to its
    // end (it is skipped after curation: a handful of examples is too few
    // to train on); what its curation's distillation did.
    let cycle = |env: &[(&str, &str)]| {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let (db, pool) = (setup.db.clone(), pool.clone());
        async move {
            let env: Vec<(&str, &str)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let started = flywheel_tests::process::run(
                Some(&db),
                &env,
                &["loop", "--team", "acme", "--no-wait"],
                None,
            );
            assert!(started.ok(), "{}", started.stderr);
            // The cycle ends inside its curation job, a moment before the
            // job's own run is recorded as finished: wait for both.
            let ended = until(60, || async {
                sqlx::query_scalar::<_, i64>(
                    "select (select count(*) from cycles where finished_at is null)
                          + (select count(*) from job_runs where status = 'running')",
                )
                .fetch_one(&pool)
                .await
                .unwrap()
                    == 0
            })
            .await;
            assert!(ended, "the cycle and its jobs ended");
            sqlx::query_scalar::<_, Option<String>>(
                "select result->>'distilled' from job_runs
                 where kind = 'curate' and status = 'succeeded' order by id desc limit 1",
            )
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let teacher = [("FLYWHEEL_TRAIN_DISTILL_TEACHER", "big")];
    let did = cycle(&teacher).await.unwrap_or_default();
    assert!(
        did.starts_with("distilled version 1: 3 answers of 3 from big"),
        "{did}"
    );
    let versions: Vec<(i32, String, Value)> = sqlx::query_as(
        "select version, manifest->>'builder', manifest from dataset_versions order by version",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(versions.len(), 2, "{versions:?}");
    assert_eq!(versions[0].1, "flywheel-distill/1");
    assert_eq!(
        versions[1].2["distilled"]["version"], 1,
        "{:?}",
        versions[1]
    );
    assert_eq!(standin.seen().len(), 3, "each logged prompt once");

    // Nothing logged since: the teacher is not asked again.
    let did = cycle(&teacher).await.unwrap_or_default();
    assert!(
        did.contains("no prompt logged since the newest distillation"),
        "{did}"
    );
    assert_eq!(standin.seen().len(), 3);

    // A new prompt, but the team's own votes are enough now.
    chat_as(&gw, &key, "u4", "Can I pay by card?").await;
    assert!(
        until(20, || async { completions_of_team(&pool).await == 4 }).await,
        "the chat is logged"
    );
    let did = cycle(&[
        ("FLYWHEEL_TRAIN_DISTILL_TEACHER", "big"),
        ("FLYWHEEL_TRAIN_DISTILL_BELOW_VOTES", "1"),
    ])
    .await
    .unwrap_or_default();
    assert!(did.contains("the team has 1 vote(s) of its own"), "{did}");
    assert_eq!(standin.seen().len(), 3);
    // Without the setting the loop distils nothing and says nothing of it.
    assert_eq!(cycle(&[]).await, None);
    assert_eq!(standin.seen().len(), 3);
    // With it, and votes still few: the new prompt is reason to ask again
    // (the newest prompts, the new one among them).
    let did = cycle(&teacher).await.unwrap_or_default();
    assert!(
        did.starts_with("distilled version 3: 4 answers of 4 from big"),
        "{did}"
    );
    assert_eq!(standin.seen().len(), 7);
    let _ = worker.kill();
    let _ = worker.wait();
}

async fn completions_of_team(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("select count(*) from completions")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_judge_is_checked_against_the_users_own_choices_and_a_position_biased_one_is_found_out() {
    let Asked {
        setup,
        standin,
        key,
        gw,
        pool,
    } = with_standin_as("fw_judge", "judge").await;
    // Twelve requests the tiny model answers badly; each user corrects it
    // to the billing desk: twelve pairs, the correction chosen.
    // Requests unlike each other, so curation keeps each as its own pair.
    let requests = [
        "My invoice was charged twice this month",
        "Why is there a late fee on my statement?",
        "The card payment failed but money left my account",
        "Can you refund the duplicate subscription charge?",
        "I was billed for a plan I cancelled in March",
        "Where can I download last year's receipts?",
        "Our company VAT number is missing from the bill",
        "Please change the billing address to Berlin",
        "The discount code was not applied at checkout",
        "How do I switch from monthly to yearly payments?",
        "A wire transfer from us has not been credited",
        "Tax on the order looks wrong for Canada",
    ];
    for (i, text) in requests.iter().enumerate() {
        let user = format!("u{i}");
        let id = chat_as(&gw, &key, &user, text).await;
        let (status, body) = gw
            .post(
                &key,
                "/v1/feedback",
                json!({"completion_id": id, "rating": "down", "user": user,
                       "correction": format!("Send invoice {i} to the billing desk.")}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }
    assert!(votes_stored(&pool, 12).await, "12 votes stored");
    cli(
        &setup.db,
        &["datasets", "build", "--team", "acme", "--inline"],
    );
    // As many pairs as curation kept (near-duplicate requests may go).
    let pairs = cli(
        &setup.db,
        &["datasets", "export", "acme@1", "--format", "trl-dpo"],
    )
    .lines()
    .count();
    // Enough that a judge right on all of them clears the 0.6 bar (6 do).
    assert!(pairs >= 8, "{pairs} pairs");
    let check = |extra: &[&str]| {
        let args = [
            &[
                "judges",
                "check",
                "--judge",
                "judge",
                "--dataset",
                "acme@1",
                "--json",
            ][..],
            extra,
        ]
        .concat();
        flywheel_tests::process::run(Some(&setup.db), &[], &args, None)
    };

    // A judge that prefers what the users chose, in either position.
    standin.always(Behave::Prefer("billing"));
    let ran = check(&[]);
    assert!(ran.ok(), "{}", ran.stderr);
    let r: Value = serde_json::from_str(&ran.stdout).unwrap();
    let report = &r["report"];
    assert_eq!(report["pairs"], pairs, "{r}");
    assert_eq!(
        (report["chosen"].as_u64(), report["inconsistent"].as_u64()),
        (Some(pairs as u64), Some(0))
    );
    assert_eq!(report["trusted"], true);
    assert!(report["agreement_low"].as_f64().unwrap() > 0.6, "{r}");
    assert_eq!(report["first_position_share"], 0.5);
    // Each pair was asked twice, once with each answer first.
    let asked = standin.seen();
    assert_eq!(asked.len(), 2 * pairs);
    let shown_first = |body: &Value| {
        let p = body["messages"][0]["content"].as_str().unwrap();
        p.split("[Answer A]")
            .nth(1)
            .unwrap()
            .split("[Answer B]")
            .next()
            .unwrap()
            .contains("billing")
    };
    assert_eq!(asked.iter().filter(|(_, b)| shown_first(b)).count(), pairs);

    // One that answers "A" whatever it is shown: found out and not trusted
    // (exit 3, a decision's no).
    standin.always(Behave::Say("A"));
    let ran = check(&[]);
    assert_eq!(ran.code, Some(3), "{}{}", ran.stdout, ran.stderr);
    let r: Value = serde_json::from_str(&ran.stdout).unwrap();
    assert_eq!(r["report"]["inconsistent"], pairs, "{r}");
    assert_eq!(r["report"]["first_position_share"], 1.0);
    assert_eq!(r["report"]["trusted"], false);
    assert!(ran.stderr.contains("not to be trusted"), "{}", ran.stderr);

    // Made the team's judge in its evaluations (the gate's use of it is
    // tested in tests/tests/promotion.rs); a bar at or below chance, or a
    // prompt without the answers' places, is refused.
    let added = cli(&setup.db, &["judges", "add", "judge", "--team", "acme"]);
    assert!(added.contains("judge judges acme's candidates"), "{added}");
    let listed = cli(&setup.db, &["judges", "list"]);
    assert!(
        listed.contains("acme\tjudge\tbar 0.6\tno budget"),
        "{listed}"
    );
    let run = |args: &[&str]| flywheel_tests::process::run(Some(&setup.db), &[], args, None);
    let low = run(&["judges", "add", "judge", "--team", "acme", "--bar", "0.5"]);
    assert!(low.ok(), "0.5 is the least bar: {}", low.stderr);
    let chance = run(&["judges", "add", "judge", "--team", "acme", "--bar", "0.4"]);
    assert_eq!(chance.code, Some(1), "{}", chance.stdout);
    assert!(
        chance.stderr.contains("--bar must be from 0.5"),
        "{}",
        chance.stderr
    );
    let no_places = setup.dir.join("judge-prompt.txt");
    std::fs::write(&no_places, "Which is better? Say A or B.").unwrap();
    let bad = run(&[
        "judges",
        "add",
        "judge",
        "--team",
        "acme",
        "--prompt",
        no_places.to_str().unwrap(),
    ]);
    assert!(bad.stderr.contains("has no {question}"), "{}", bad.stderr);
    assert!(
        cli(&setup.db, &["judges", "remove", "--team", "acme"]).contains("acme has no judge now")
    );
    assert!(cli(&setup.db, &["judges", "list"]).contains("no team has a judge"));

    // Once an end user in it has their data deleted, the version's pairs go
    // to no judge.
    let before = standin.seen().len();
    delete_user(&gw, &key, "u0").await;
    let ran = check(&[]);
    assert_eq!(ran.code, Some(1), "{}", ran.stdout);
    assert!(ran.stderr.contains("had it deleted"), "{}", ran.stderr);
    assert_eq!(standin.seen().len(), before, "the judge was asked nothing");
}
