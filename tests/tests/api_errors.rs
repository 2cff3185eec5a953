//! Every error the chat API promises: OpenAI's shape, the right status,
//! never a 500 for bad input. Raw HTTP where a client library would refuse
//! to send the request, `async-openai` where it matters that a real client
//! understands the error.

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs,
};
use flywheel_engine::EngineConfig;
use flywheel_gateway::{AppState, GatewayConfig};
use flywheel_tests::{TestDb, TestGateway, load_engine, real_model};
use reqwest::StatusCode;
use serde_json::{Value, json};

async fn post(gw: &TestGateway, key: Option<&str>, body: Value) -> (StatusCode, Value) {
    let mut req = reqwest::Client::new().post(format!("{}/v1/chat/completions", gw.base));
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    let resp = req.json(&body).send().await.unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn chat(gw: &TestGateway, extra: Value) -> Value {
    let mut body = json!({"model": gw.model(), "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// A gateway on the real model with an engine of its own.
async fn real_with(cfg: EngineConfig) -> TestGateway {
    let model = real_model().await;
    let engine = load_engine(model, cfg).await;
    TestGateway::start(model, engine, GatewayConfig::default()).await
}

/// Asserts OpenAI's error shape and returns the error object.
fn error_of(body: &Value) -> &Value {
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(e["type"].is_string(), "{body}");
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "{body}"
    );
    e
}

#[tokio::test]
async fn invalid_parameters_are_400_naming_the_field() {
    let gw = TestGateway::real().await;
    let key = Some(gw.key.as_str());
    let cases = [
        (json!({"temperature": -0.5}), "temperature"),
        (json!({"messages": []}), "messages"),
        (json!({"top_p": 1.5}), "top_p"),
        (json!({"max_tokens": 0}), "max_tokens"),
        (json!({"n": 9}), "n"),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f"}}]}),
            "tools",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
            "response_format",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            "messages[0].content",
        ),
        (
            json!({"stream_options": {"include_usage": true}}),
            "stream_options",
        ),
        (json!({"mystery": 1}), "mystery"),
        (json!({"logit_bias": {"Paris": 5}}), "logit_bias"),
        (json!({"logit_bias": {"42": 101}}), "logit_bias"),
        (json!({"logit_bias": {"49152": 1}}), "logit_bias"),
    ];
    for (extra, param) in cases {
        let (status, body) = post(&gw, key, chat(&gw, extra.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{extra}: {body}");
        assert_eq!(error_of(&body)["param"], param, "{extra}");
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }
    // Wrong types and malformed JSON are 400 too.
    let (status, body) = post(&gw, key, chat(&gw, json!({"temperature": "hot"}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    error_of(&body);
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gw.base))
        .bearer_auth(&gw.key)
        .header("content-type", "application/json")
        .body("{\"model\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    error_of(&resp.json().await.unwrap());
}

#[tokio::test]
async fn prompt_longer_than_the_context_window_is_400() {
    let gw = TestGateway::real().await;
    let long = "hello ".repeat(9000); // > 8192 tokens
    let (status, body) = post(
        &gw,
        Some(&gw.key),
        chat(
            &gw,
            json!({"messages": [{"role": "user", "content": long}]}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(error_of(&body)["code"], "context_length_exceeded");
    // Fits, but not with the completion asked for.
    let (status, body) = post(&gw, Some(&gw.key), chat(&gw, json!({"max_tokens": 9000}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(error_of(&body)["code"], "context_length_exceeded");
}

#[tokio::test]
async fn bad_missing_and_revoked_keys_are_401() {
    let gw = TestGateway::real().await;
    let (status, body) = post(&gw, None, chat(&gw, json!({}))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_of(&body)["code"], "invalid_api_key");
    let (status, _) = post(&gw, Some("fw-not-a-key"), chat(&gw, json!({}))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let (info, key) = flywheel_store::keys::create_key(&gw.db.pool, "team-b")
        .await
        .unwrap();
    let (status, body) = post(&gw, Some(&key), chat(&gw, json!({}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Used once more, so the gateway has it cached as good...
    let (status, _) = post(&gw, Some(&key), chat(&gw, json!({}))).await;
    assert_eq!(status, StatusCode::OK);
    flywheel_store::keys::revoke_key(&gw.db.pool, &info.id.to_string())
        .await
        .unwrap();
    // ...yet refused once the gateway hears the revocation (LISTEN/NOTIFY).
    // While it listens, the cache trusts a key for 30 s without asking
    // Postgres; 10 s is well inside that, so a revocation the cache did not
    // drop would fail this.
    let refused = flywheel_tests::eventually(10, || async {
        let (status, _) = post(&gw, Some(&key), chat(&gw, json!({}))).await;
        (status == StatusCode::UNAUTHORIZED).then_some(())
    })
    .await;
    assert!(refused.is_some(), "a revoked key is refused");
}

#[tokio::test]
async fn unknown_model_is_404_and_the_sdk_understands_it() {
    let gw = TestGateway::real().await;
    let client = Client::with_config(
        OpenAIConfig::new()
            .with_api_base(format!("{}/v1", gw.base))
            .with_api_key(gw.key.clone()),
    );
    let req = CreateChatCompletionRequestArgs::default()
        .model("gpt-17")
        .messages(vec![
            ChatCompletionRequestUserMessageArgs::default()
                .content("Hi")
                .build()
                .unwrap()
                .into(),
        ])
        .build()
        .unwrap();
    match client.chat().create(req).await {
        Err(OpenAIError::ApiError(e)) => {
            assert_eq!(e.status_code.as_u16(), 404);
            assert_eq!(e.api_error.code.as_deref(), Some("model_not_found"));
            assert!(e.api_error.message.contains("gpt-17"));
        }
        other => panic!("expected a 404 ApiError, got {other:?}"),
    }
}

#[tokio::test]
async fn oversized_body_is_413_and_unknown_route_404() {
    let gw = TestGateway::real().await;
    let huge = "x".repeat(2 << 20);
    let (status, body) = post(
        &gw,
        Some(&gw.key),
        chat(
            &gw,
            json!({"messages": [{"role": "user", "content": huge}]}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    error_of(&body);

    let resp = reqwest::get(format!("{}/v2/nothing", gw.base))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    error_of(&resp.json().await.unwrap());
}

#[tokio::test]
async fn full_queue_answers_429_with_retry_after() {
    // One request runs, one waits, the rest are refused.
    let gw = real_with(EngineConfig {
        queue_capacity: 1,
        max_batch: 1,
        ..Default::default()
    })
    .await;
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let body = chat(&gw, json!({"max_tokens": 24, "seed": i, "messages": [{"role": "user", "content": "Tell me a story."}]}));
            let (url, key) = (format!("{}/v1/chat/completions", gw.base), gw.key.clone());
            tokio::spawn(async move {
                let resp = reqwest::Client::new().post(url).bearer_auth(key).json(&body).send().await.unwrap();
                let retry_after = resp.headers().get("retry-after").cloned();
                (resp.status(), retry_after, resp.json::<Value>().await.unwrap())
            })
        })
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        let (status, retry_after, body) = t.await.unwrap();
        match status {
            StatusCode::OK => {
                ok += 1;
                assert!(
                    body["usage"]["completion_tokens"].as_u64().unwrap() > 0,
                    "{body}"
                );
                assert!(body["choices"][0]["finish_reason"].is_string(), "{body}");
            }
            StatusCode::TOO_MANY_REQUESTS => {
                refused += 1;
                assert!(retry_after.is_some(), "429 without retry-after");
                assert_eq!(error_of(&body)["code"], "rate_limit_exceeded");
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(ok >= 1 && refused >= 1, "ok {ok}, refused {refused}");
}

#[tokio::test]
async fn not_ready_until_a_model_is_loaded() {
    let db = TestDb::new().await;
    let journal = flywheel_tests::open_journal(
        &db.pool,
        flywheel_gateway::JournalConfig::new(
            std::env::temp_dir().join(format!("fw-j-{}", uuid::Uuid::new_v4())),
        ),
    )
    .await;
    let state = AppState::new(db.pool.clone(), GatewayConfig::default(), journal);
    let (_, key) = flywheel_store::keys::create_key(&db.pool, "t")
        .await
        .unwrap();
    let base = flywheel_tests::spawn_gateway(state.clone(), std::future::pending()).await;

    assert_eq!(
        reqwest::get(format!("{base}/healthz"))
            .await
            .unwrap()
            .status(),
        200
    );
    let ready = reqwest::get(format!("{base}/readyz")).await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    error_of(&resp.json().await.unwrap());
}

/// Sends `method path` with `key`; the status and the error's code.
async fn call(gw: &TestGateway, key: &str, method: &str, path: &str, body: Value) -> (u16, Value) {
    let url = format!("{}{path}", gw.base);
    let client = reqwest::Client::new();
    let req = match method {
        "GET" => client.get(url),
        "DELETE" => client.delete(url),
        _ => client.post(url).json(&body),
    };
    let resp = req.bearer_auth(key).send().await.unwrap();
    (
        resp.status().as_u16(),
        resp.json().await.unwrap_or_default(),
    )
}

#[tokio::test]
async fn a_key_opens_only_the_routes_its_scopes_name() {
    use flywheel_store::keys::{Scope, create_key_with, set_scopes};
    let gw = TestGateway::tiny().await;
    let pool = &gw.db.pool;
    let (_, voter) = create_key_with(pool, "team-a", &[Scope::Feedback])
        .await
        .unwrap();
    let (chatter_info, chatter) = create_key_with(pool, "team-a", &[Scope::Chat])
        .await
        .unwrap();
    let id = gw.complete(&chatter, Some("ann")).await;
    let routes = [
        (
            "POST",
            "/v1/chat/completions".to_string(),
            chat(&gw, json!({})),
        ),
        (
            "POST",
            "/v1/feedback".into(),
            json!({"completion_id": id, "rating": "up", "user": "ann"}),
        ),
        ("GET", format!("/v1/completions/{id}"), Value::Null),
        ("GET", format!("/v1/completions/{id}/feedback"), Value::Null),
        ("DELETE", "/v1/users/bob/data".into(), Value::Null),
        ("POST", "/tokenize".into(), json!({"prompt": "hello"})),
    ];
    // (key, which of the routes above it may call)
    let keys = [
        (&voter, [false, true, false, false, false, false]),
        (&chatter, [true, false, false, false, false, true]),
        (&gw.key, [true, true, true, true, true, true]),
    ];
    for (key, allowed) in keys {
        for ((method, path, body), allowed) in routes.iter().zip(allowed) {
            let (status, body) = call(&gw, key, method, path, body.clone()).await;
            if allowed {
                assert!(
                    (200..300).contains(&status),
                    "{method} {path}: {status} {body}"
                );
            } else {
                assert_eq!(status, 403, "{method} {path}: {body}");
                let e = error_of(&body);
                assert_eq!(e["code"], "insufficient_permissions");
                assert!(e["message"].as_str().unwrap().contains("scope"), "{body}");
            }
        }
    }
    // Every key may list the models it can name.
    assert_eq!(
        call(&gw, &voter, "GET", "/v1/models", Value::Null).await.0,
        200
    );

    // A scope given later works from the key's next request (the change
    // is announced as revocations are); one taken away is refused.
    set_scopes(pool, &chatter_info.prefix, &[Scope::Read])
        .await
        .unwrap();
    let read = format!("/v1/completions/{id}");
    let changed = flywheel_tests::eventually(10, || async {
        (call(&gw, &chatter, "GET", &read, Value::Null).await.0 == 200).then_some(())
    })
    .await;
    assert!(changed.is_some(), "the new scope was never honoured");
    let (status, _) = call(
        &gw,
        &chatter,
        "POST",
        "/v1/chat/completions",
        chat(&gw, json!({})),
    )
    .await;
    assert_eq!(status, 403, "chat was taken away");
}

#[tokio::test]
async fn a_teams_rate_limits_answer_429_with_retry_after_and_spare_other_teams() {
    use flywheel_store::keys::{create_key, set_limits};
    let gw = TestGateway::tiny().await;
    let pool = &gw.db.pool;
    let (_, other) = create_key(pool, "team-b").await.unwrap();
    let (_, thrifty) = create_key(pool, "team-c").await.unwrap();
    // Set before any key is used, so no gateway has the old limits.
    assert!(
        set_limits(pool, "team-a", Some(Some(2)), None)
            .await
            .unwrap()
    );
    assert!(
        set_limits(pool, "team-c", None, Some(Some(1)))
            .await
            .unwrap()
    );

    let send = |key: String| {
        let (url, body) = (
            format!("{}/v1/chat/completions", gw.base),
            chat(&gw, json!({})),
        );
        async move {
            let resp = reqwest::Client::new()
                .post(url)
                .bearer_auth(key)
                .json(&body)
                .send()
                .await
                .unwrap();
            let retry_after = resp
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
            (
                resp.status(),
                retry_after,
                resp.json::<Value>().await.unwrap(),
            )
        }
    };
    // Two requests a minute: the third within the minute is refused.
    for _ in 0..2 {
        let (status, _, body) = send(gw.key.clone()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let (status, retry_after, body) = send(gw.key.clone()).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(error_of(&body)["code"], "rate_limit_exceeded");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("2 requests per minute"),
        "{body}"
    );
    // One request comes back every 30 s.
    let retry_after = retry_after.expect("retry-after");
    assert!((1..=30).contains(&retry_after), "retry-after {retry_after}");
    // Another team is not held back by team-a's limit.
    for _ in 0..3 {
        assert_eq!(send(other.clone()).await.0, StatusCode::OK);
    }
    // One token a minute: the first request is let in, and what it used
    // (its prompt and answer) puts the team in debt.
    let (status, _, first) = send(thrifty.clone()).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let used = first["usage"]["total_tokens"].as_u64().unwrap();
    let (status, retry_after, body) = send(thrifty.clone()).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("1 tokens per minute"),
        "{body}"
    );
    // /metrics counts each team's refusals and why.
    let metrics = reqwest::get(format!("{}/metrics", gw.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        r#"flywheel_team_requests_refused_total{team="team-a",why="requests_per_minute"} 1"#,
        r#"flywheel_team_requests_refused_total{team="team-c",why="tokens_per_minute"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    assert!(
        !metrics.contains(r#"flywheel_team_requests_refused_total{team="team-b""#),
        "{metrics}"
    );
    // In debt by used - 1 tokens (less what refilled in between, a few
    // milliseconds' worth) at one a minute.
    let debt = (used - 1) * 60;
    let retry_after = retry_after.expect("retry-after");
    assert!(
        (debt..=debt + 1).contains(&retry_after),
        "{retry_after} s for {used} tokens"
    );
}

#[tokio::test]
async fn a_flooding_team_fills_only_its_share_and_another_team_is_served_next() {
    // One sequence at a time; a team may have 3 waiting.
    let gw = real_with(EngineConfig {
        queue_capacity: 8,
        queue_per_tenant: 3,
        max_batch: 1,
        ..Default::default()
    })
    .await;
    let (_, quiet) = flywheel_store::keys::create_key(&gw.db.pool, "team-quiet")
        .await
        .unwrap();
    let long = json!({"max_tokens": 40, "temperature": 0.0, "messages": [{"role": "user", "content": "Count from 1 to 100, one number per line."}]});
    let spawn = |key: String| {
        let (url, body) = (
            format!("{}/v1/chat/completions", gw.base),
            chat(&gw, long.clone()),
        );
        tokio::spawn(async move {
            let resp = reqwest::Client::new()
                .post(url)
                .bearer_auth(key)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = resp.status();
            let body = resp.json::<Value>().await.unwrap();
            (status, body, std::time::Instant::now())
        })
    };
    let flood: Vec<_> = (0..8).map(|_| spawn(gw.key.clone())).collect();
    // The flood holds the running slot and its whole share of the queue.
    let full = flywheel_tests::eventually(30, || async {
        (gw.engine().queue_depth() >= 3).then_some(())
    })
    .await;
    assert!(full.is_some(), "the flood never filled its share");
    let quiet = spawn(quiet).await.unwrap();
    assert_eq!(quiet.0, StatusCode::OK, "{}", quiet.1);
    let (mut served_after_quiet, mut refused) = (0, 0);
    for t in flood {
        let (status, body, done) = t.await.unwrap();
        match status {
            StatusCode::OK if done > quiet.2 => served_after_quiet += 1,
            StatusCode::OK => {}
            StatusCode::TOO_MANY_REQUESTS => {
                refused += 1;
                assert!(
                    body["error"]["message"].as_str().unwrap().contains("share"),
                    "{body}"
                );
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    // The quiet team came after the one running, before the flood's queue
    // (3 waiting; 2 if the running one ended just as the quiet request
    // came). First come, first served, it would have come after all of them.
    assert!(refused >= 1, "the flood was never refused");
    let metrics = reqwest::get(format!("{}/metrics", gw.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line = format!(
        r#"flywheel_team_requests_refused_total{{team="team-a",why="queue_share"}} {refused}"#
    );
    assert!(metrics.contains(&line), "{line} in {metrics}");
    assert!(
        served_after_quiet >= 2,
        "only {served_after_quiet} of the flood's waiting requests ran after the quiet team's"
    );
}

#[tokio::test]
async fn clients_that_stall_are_timed_out() {
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    // Short timeouts, so that the test does not wait the default 30 s.
    let gw = TestGateway::tiny_with(GatewayConfig {
        timeouts: flywheel_gateway::Timeouts {
            header_read: Duration::from_secs(1),
            body_read: Duration::from_secs(1),
            response_write: Duration::from_secs(1),
        },
        ..Default::default()
    })
    .await;
    let addr = gw.base.trim_start_matches("http://").to_string();
    // Everything the server sends until it closes the connection (30 s at
    // most: the connection must not be held open).
    async fn until_closed(conn: &mut TcpStream) -> String {
        let mut got = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(30), conn.read_to_end(&mut got)).await;
        assert!(
            closed.is_ok(),
            "the server kept the connection open: {got:?}"
        );
        String::from_utf8_lossy(&got).into_owned()
    }

    // Half a request's headers, then nothing (slowloris): closed unserved.
    let mut slow = TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let got = until_closed(&mut slow).await;
    assert!(!got.contains("200 OK"), "{got}");

    // A kept-alive connection left idle after its request: closed.
    let mut idle = TcpStream::connect(&addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let got = until_closed(&mut idle).await;
    assert!(got.starts_with("HTTP/1.1 200 OK"), "{got}");

    // A body that stops arriving: 408 in OpenAI's shape.
    let mut dribble = TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"model\": ",
        gw.key
    );
    dribble.write_all(head.as_bytes()).await.unwrap();
    let got = until_closed(&mut dribble).await;
    assert!(got.starts_with("HTTP/1.1 408"), "{got}");
    assert!(got.contains(r#""code":"request_timeout""#), "{got}");

    // A client that keeps its pace is served.
    let (status, _) = post(&gw, Some(&gw.key), chat(&gw, json!({}))).await;
    assert_eq!(status, StatusCode::OK);
}

/// A streaming client that stops reading: the server cannot write the
/// next chunk, and after the write timeout it closes the connection and
/// records the completion as cancelled, with what was generated. Before,
/// the record waited for as long as the client kept the socket open.
#[tokio::test]
async fn a_stream_whose_client_stops_reading_is_cut_off_and_recorded() {
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A long answer is needed to fill the socket buffers and the server's
    // own between the engine and the socket (several MB on loopback): the
    // tiny model given an 8k context, its special tokens banned, every token
    // sent with 20 alternatives.
    let dir = std::env::temp_dir().join(format!("fw-long-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = flywheel_model::testing::write_tiny_variant(
        &dir,
        "tiny-long",
        3,
        &[(
            "llama.context_length",
            candle_core::quantized::gguf_file::Value::U32(8192),
        )],
    )
    .unwrap();
    let cache = flywheel_modelhub::ModelCache::new(dir.join("cache")).unwrap();
    let model = cache.import(&path, Some("tiny-long")).await.unwrap();
    let engine = load_engine(&model, EngineConfig::default()).await;
    let gw = TestGateway::start(
        &model,
        engine,
        GatewayConfig {
            timeouts: flywheel_gateway::Timeouts {
                response_write: Duration::from_secs(1),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await;
    let addr: std::net::SocketAddr = gw.base.trim_start_matches("http://").parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut conn = socket.connect(addr).await.unwrap();
    let body = json!({"model": "tiny-long", "stream": true, "max_tokens": 8000,
        "logprobs": true, "top_logprobs": 20, "logit_bias": {"0": -100, "1": -100, "2": -100},
        "messages": [{"role": "user", "content": "Hi"}]})
    .to_string();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        gw.key,
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut first = [0u8; 1024];
    let n = conn.read(&mut first).await.unwrap();
    assert!(
        first[..n].starts_with(b"HTTP/1.1 200 OK"),
        "{:?}",
        String::from_utf8_lossy(&first[..n])
    );

    // The client reads nothing more, and keeps the socket open.
    let recorded = flywheel_tests::eventually(60, || async {
        sqlx::query_as::<_, (String, i32)>(
            "select finish_reason, completion_tokens from completions",
        )
        .fetch_optional(&gw.db.pool)
        .await
        .unwrap()
    })
    .await;
    let (reason, tokens) = recorded.expect("the stream's completion was never recorded");
    assert_eq!(reason, "cancelled");
    assert!(tokens > 0 && tokens < 8000, "{tokens} tokens recorded");
    // The server closed the connection: what is left in the buffers, then
    // its end (or a reset).
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(30), conn.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the server kept the connection open");
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        !rest.contains("[DONE]"),
        "the stream was finished, not cut off"
    );
}

/// The contract fuzzed: schemathesis (from PyPI; `scripts/test.sh`
/// installs it) generates requests from `/openapi.json` for every `/v1`
/// operation and the tokenizer's, valid and not, with a team key, and for
/// every admin action with a key that has the `admin` scope. No answer may
/// be a 5xx, each must have a status and a content type the document
/// lists, and its body the schema the document gives it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_in_the_public_or_admin_api() {
    let gw = TestGateway::tiny().await;
    // The public API with the team's key, then the admin API with a key
    // that has the `admin` scope.
    let (_, admin) = flywheel_store::keys::create_key_with(
        &gw.db.pool,
        "platform",
        &[flywheel_store::keys::Scope::Admin],
    )
    .await
    .unwrap();
    for (paths, key, operations) in [
        ("^/(v1/|tokenize|detokenize)", gw.key.as_str(), 11),
        ("^/admin/api/", admin.as_str(), 11),
    ] {
        let auth = format!("Authorization: Bearer {key}");
        let out = tokio::process::Command::new("schemathesis")
            .args([
                "run",
                &format!("{}/openapi.json", gw.base),
                "--url",
                &gw.base,
                "--checks",
                "not_a_server_error,status_code_conformance,response_schema_conformance,content_type_conformance",
                "--max-examples",
                "30",
                "--generation-deterministic",
                "--request-timeout",
                "60",
                "--include-path-regex",
                paths,
                "--header",
                &auth,
            ])
            .output()
            .await
            .expect("run schemathesis (scripts/test.sh installs it from PyPI)");
        let report = format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("{report}");
        assert!(out.status.success(), "{paths}: {report}");
        // It ran, on every operation it selected.
        assert!(
            report.contains(&format!("Tested: {operations}")),
            "{paths}: {report}"
        );
    }
}
