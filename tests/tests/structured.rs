//! `response_format` through the public API: constrained decoding keeps a
//! model that knows nothing (the tiny random-weight model, whose free
//! answers are random bytes) to the schema a router asks for, so it cannot
//! invent an intent, and writes it compact; a schema outside the supported
//! subset is a 400 naming the keyword.

use flywheel_tests::TestGateway;
use serde_json::{Value, json};

const INTENTS: [&str; 3] = ["track_order", "refund", "cancel_order"];

fn router() -> Value {
    json!({
        "type": "json_schema",
        "json_schema": {
            "name": "route",
            "strict": true,
            "schema": {
                "type": "object",
                "properties": {
                    "intent": {"type": "string", "enum": INTENTS},
                    "order_id": {"type": "integer"},
                    "urgent": {"type": "boolean"}
                },
                "required": ["intent", "order_id", "urgent"],
                "additionalProperties": false
            }
        }
    })
}

async fn ask(gw: &TestGateway, prompt: &str, extra: Value) -> (u16, Value) {
    let mut body = json!({"model": gw.model(), "max_tokens": 200,
                          "messages": [{"role": "user", "content": prompt}]});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    gw.post(&gw.key, "/v1/chat/completions", body).await
}

#[tokio::test]
async fn a_schema_with_an_enum_keeps_a_random_model_to_the_listed_intents() {
    let gw = TestGateway::tiny().await;
    // Without the constraint the tiny model's answer is not JSON at all.
    let (status, free) = ask(&gw, "where is my parcel 1234", json!({"temperature": 0})).await;
    assert_eq!(status, 200);
    let text = free["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(serde_json::from_str::<Value>(text).is_err(), "{text}");

    let prompts = [
        "where is my parcel 1234",
        "I want my money back for order 77",
        "cancel 555 please",
        "hello",
    ];
    let mut seen = std::collections::BTreeSet::new();
    for (i, p) in prompts.iter().enumerate() {
        for extra in [
            json!({"temperature": 0}),
            json!({"temperature": 1.0, "seed": i}),
        ] {
            let mut extra = extra;
            extra["response_format"] = router();
            let (status, body) = ask(&gw, p, extra).await;
            assert_eq!(status, 200, "{body}");
            let choice = &body["choices"][0];
            let text = choice["message"]["content"].as_str().unwrap();
            assert_eq!(choice["finish_reason"], "stop", "{text:?} {body}");
            let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
            let intent = v["intent"].as_str().unwrap();
            assert!(INTENTS.contains(&intent), "{text}");
            assert!(v["order_id"].is_i64() || v["order_id"].is_u64(), "{text}");
            assert!(v["urgent"].is_boolean(), "{text}");
            assert_eq!(v.as_object().unwrap().len(), 3, "{text}");
            // Compact, as OpenAI returns it: no whitespace between tokens.
            assert_eq!(text, v.to_string());
            seen.insert(text.to_string());
        }
    }
    assert!(seen.len() > 1, "sampling still varies within the schema");
}

#[tokio::test]
async fn json_object_and_bad_schemas() {
    let gw = TestGateway::tiny().await;
    let (status, body) = ask(
        &gw,
        "hi",
        json!({"temperature": 0, "max_tokens": 4, "response_format": {"type": "json_object"}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let text = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.trim_start().starts_with('{'), "{text}");

    let pattern = json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]+$"}}}}});
    for (rf, says) in [
        (pattern, "`pattern`"),
        (
            json!({"type": "json_schema", "json_schema": {"name": "x"}}),
            "schema is required",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string"}}}),
            "root must be an object",
        ),
        (json!({"type": "yaml"}), "not supported"),
    ] {
        let (status, body) = ask(&gw, "hi", json!({"response_format": rf})).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["param"], "response_format");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{message}");
    }
}
