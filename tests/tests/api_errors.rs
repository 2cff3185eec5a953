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
        (json!({"n": 3}), "n"),
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
    let model = real_model().await;
    // One request runs, one waits, the rest are refused.
    let engine = load_engine(
        model,
        EngineConfig {
            queue_capacity: 1,
            max_batch: 1,
            ..Default::default()
        },
    )
    .await;
    let gw = TestGateway::start(model, engine, GatewayConfig::default()).await;
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
