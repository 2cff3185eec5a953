//! Traces as a platform team collects them: `flywheel serve` and `flywheel
//! worker` with the standard `OTEL_EXPORTER_OTLP_ENDPOINT` send their spans
//! over OTLP/HTTP (protobuf) to a receiver in this test, which decodes them
//! with OpenTelemetry's own protobuf types. A chat request's spans join the
//! caller's trace (`traceparent`), carry the GenAI attributes, and reach
//! down into the engine and the journal; the completion keeps the trace id
//! and its dashboard page shows it. A job's attempt is a trace of its own.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;
use serde_json::json;

use flywheel_tests::{GatewayProcess, TinySetup};

/// What the receiver got: every span, with its service's name.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<(String, Span)>>>);

impl Received {
    fn spans(&self) -> Vec<(String, Span)> {
        self.0.lock().unwrap().clone()
    }

    /// Waits up to 30 s for a span `pick` accepts.
    async fn wait_for(&self, what: &str, pick: impl Fn(&Span) -> bool) -> Span {
        for _ in 0..300 {
            if let Some((_, s)) = self.spans().into_iter().find(|(_, s)| pick(s)) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let names: Vec<String> = self.spans().into_iter().map(|(_, s)| s.name).collect();
        panic!("no {what} span arrived; got {names:?}");
    }
}

/// An OTLP/HTTP receiver (`POST /v1/traces`, protobuf) on a free port;
/// returns its base URL.
async fn receiver(got: Received) -> String {
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| {
            let got = got.clone();
            async move {
                let req = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                let mut spans = got.0.lock().unwrap();
                for rs in req.resource_spans {
                    let service = rs
                        .resource
                        .as_ref()
                        .and_then(|r| attr(&r.attributes, "service.name"))
                        .and_then(|v| text(&v))
                        .unwrap_or_default();
                    for ss in rs.scope_spans {
                        for s in ss.spans {
                            spans.push((service.clone(), s));
                        }
                    }
                }
                // An empty ExportTraceServiceResponse.
                (
                    [("content-type", "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

fn attr(attrs: &[opentelemetry_proto::tonic::common::v1::KeyValue], key: &str) -> Option<Any> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.clone())
}

fn text(v: &Any) -> Option<String> {
    match v {
        Any::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn int(v: &Any) -> Option<i64> {
    match v {
        Any::IntValue(i) => Some(*i),
        _ => None,
    }
}

fn str_attr(s: &Span, key: &str) -> Option<String> {
    attr(&s.attributes, key).and_then(|v| text(&v))
}

fn int_attr(s: &Span, key: &str) -> Option<i64> {
    attr(&s.attributes, key).and_then(|v| int(&v))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The caller's trace and span, as a W3C `traceparent` would carry them.
const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

fn otel_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.to_string()),
        // Batches sent every 100 ms rather than every 5 s.
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_string()),
    ]
}

fn as_env<'a>(v: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    v.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// A chat with the caller's `traceparent`; returns the response's body.
async fn traced_chat(gw: &GatewayProcess, key: &str, trace: &str) -> serde_json::Value {
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gw.base))
        .bearer_auth(key)
        .header("traceparent", format!("00-{trace}-{CALLER_SPAN}-01"))
        .json(&json!({"model": "tiny", "max_tokens": 4,
                       "messages": [{"role": "user", "content": "hello there"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

/// The completion's stored trace id, once the journal has flushed it.
async fn stored_trace_id(db: &str, id: &str) -> Option<String> {
    let pool = flywheel_store::connect(db).await.unwrap();
    for _ in 0..100 {
        let row: Option<(Option<String>,)> =
            sqlx::query_as("select trace_id from completions where id = $1")
                .bind(id)
                .fetch_optional(&pool)
                .await
                .unwrap();
        if let Some((trace,)) = row {
            return trace;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("completion {id} never reached Postgres");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_is_traced_into_the_callers_trace_with_genai_attributes() {
    let s = TinySetup::new("fw_traces").await;
    let key = s.key("acme");
    let got = Received::default();
    let endpoint = receiver(got.clone()).await;
    let env = otel_env(&endpoint);
    let gw = GatewayProcess::start(&s.db, &s.dir.join("journal"), &as_env(&env)).await;

    let body = traced_chat(&gw, &key, CALLER_TRACE).await;
    let id = body["id"].as_str().unwrap().to_string();

    // The request's server span, a child of the caller's span.
    let server = got
        .wait_for("server", |s| s.name == "POST /v1/chat/completions")
        .await;
    assert_eq!(hex(&server.trace_id), CALLER_TRACE);
    assert_eq!(hex(&server.parent_span_id), CALLER_SPAN);
    assert_eq!(server.kind, SpanKind::Server as i32);
    assert_eq!(
        str_attr(&server, "http.route").as_deref(),
        Some("/v1/chat/completions")
    );
    assert_eq!(int_attr(&server, "http.response.status_code"), Some(200));

    // The GenAI span under it, with what was asked and what was answered.
    let chat = got.wait_for("chat", |s| s.name == "chat tiny").await;
    assert_eq!(chat.parent_span_id, server.span_id);
    assert_eq!(hex(&chat.trace_id), CALLER_TRACE);
    assert_eq!(
        str_attr(&chat, "gen_ai.operation.name").as_deref(),
        Some("chat")
    );
    assert_eq!(
        str_attr(&chat, "gen_ai.request.model").as_deref(),
        Some("tiny")
    );
    assert_eq!(
        str_attr(&chat, "gen_ai.response.model"),
        body["model"].as_str().map(str::to_string)
    );
    assert_eq!(str_attr(&chat, "gen_ai.response.id").as_deref(), Some(&*id));
    assert_eq!(int_attr(&chat, "gen_ai.request.max_tokens"), Some(4));
    assert_eq!(
        int_attr(&chat, "gen_ai.usage.input_tokens"),
        body["usage"]["prompt_tokens"].as_i64()
    );
    assert_eq!(
        int_attr(&chat, "gen_ai.usage.output_tokens"),
        body["usage"]["completion_tokens"].as_i64()
    );
    assert_eq!(
        str_attr(&chat, "gen_ai.response.finish_reasons"),
        body["choices"][0]["finish_reason"]
            .as_str()
            .map(str::to_string)
    );
    assert_eq!(str_attr(&chat, "team").as_deref(), Some("acme"));

    // The routing, the engine's phases and the journal's append, under the
    // chat span.
    for name in [
        "route",
        "engine.queue",
        "engine.prefill",
        "engine.decode",
        "journal.append",
    ] {
        let child = got
            .wait_for(name, |s| s.name == name && s.parent_span_id == chat.span_id)
            .await;
        assert_eq!(hex(&child.trace_id), CALLER_TRACE, "{name}");
        assert!(child.end_time_unix_nano >= child.start_time_unix_nano);
    }
    let prefill = got
        .wait_for("prefill", |s| s.name == "engine.prefill")
        .await;
    assert_eq!(
        int_attr(&prefill, "prompt_tokens"),
        body["usage"]["prompt_tokens"].as_i64()
    );
    // The flush to Postgres: a trace of its own, storing many requests'
    // records at once.
    let flush = got
        .wait_for("flush", |s| {
            s.name == "journal.flush" && int_attr(s, "stored") == Some(1)
        })
        .await;
    assert_ne!(hex(&flush.trace_id), CALLER_TRACE);
    let services: Vec<String> = got.spans().into_iter().map(|(svc, _)| svc).collect();
    assert!(services.iter().all(|s| s == "flywheel"), "{services:?}");

    // The completion keeps the trace id; its dashboard page shows it.
    assert_eq!(
        stored_trace_id(&s.db, &id).await.as_deref(),
        Some(CALLER_TRACE)
    );
    let pool = flywheel_store::connect(&s.db).await.unwrap();
    let hash = flywheel_admin::hash_password(flywheel_tests::admin::PASSWORD).unwrap();
    flywheel_store::admins::upsert(&pool, "ada", &hash, "admin")
        .await
        .unwrap();
    let mut admin = flywheel_tests::admin::Client::at(&gw.base);
    let r = admin.login("ada", flywheel_tests::admin::PASSWORD).await;
    assert_eq!(r.status, 303, "{}", r.body);
    let page = admin.get(&format!("/admin/completions/{id}")).await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(
        page.body
            .contains(&format!("<code class=\"trace-id\">{CALLER_TRACE}</code>")),
        "{}",
        page.body
    );
}

/// A request answered by an upstream passes the trace on: the upstream
/// gets a `traceparent` in the caller's trace whose parent is Flywheel's
/// client span for the call. The upstream is a stand-in (a small
/// OpenAI-compatible server in the test support crate), not vLLM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_call_carries_the_trace_on() {
    let s = TinySetup::new("fw_traces_upstream").await;
    let key = s.key("acme");
    let standin = flywheel_tests::standin::StandIn::start();
    let url = format!("{}/v1", standin.base);
    flywheel_tests::cli(
        &s.db,
        &[
            "models",
            "add-upstream",
            "teacher",
            "--url",
            &url,
            "--model",
            "teacher-7b",
        ],
    );
    let got = Received::default();
    let endpoint = receiver(got.clone()).await;
    let env = otel_env(&endpoint);
    let gw = GatewayProcess::start(&s.db, &s.dir.join("journal"), &as_env(&env)).await;
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gw.base))
        .bearer_auth(&key)
        .header("traceparent", format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01"))
        .json(&json!({"model": "teacher", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    let client = got
        .wait_for("upstream", |s| s.name == "chat teacher-7b")
        .await;
    assert_eq!(client.kind, SpanKind::Client as i32);
    assert_eq!(hex(&client.trace_id), CALLER_TRACE);
    let chat = got.wait_for("chat", |s| s.name == "chat teacher").await;
    assert_eq!(client.parent_span_id, chat.span_id);
    let sent = standin.traceparents();
    assert_eq!(
        sent,
        [Some(format!(
            "00-{CALLER_TRACE}-{}-01",
            hex(&client.span_id)
        ))]
    );
}

/// Without an exporter the caller's trace id is still kept, so a record can
/// be found from the caller's side; a request without `traceparent` keeps
/// none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_exporter_the_callers_trace_id_is_still_kept() {
    let s = TinySetup::new("fw_traces_off").await;
    let key = s.key("acme");
    let gw = GatewayProcess::start(&s.db, &s.dir.join("journal"), &[]).await;
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let body = traced_chat(&gw, &key, trace).await;
    let id = body["id"].as_str().unwrap();
    assert_eq!(stored_trace_id(&s.db, id).await.as_deref(), Some(trace));
    let plain = gw.complete(&key, None).await;
    assert_eq!(stored_trace_id(&s.db, &plain).await, None);
}

/// A job attempt on a worker is a trace: the job's span, its stage's span
/// under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_traces_each_job_and_its_stage() {
    let s = TinySetup::new("fw_traces_worker").await;
    let _key = s.key("acme");
    let got = Received::default();
    let endpoint = receiver(got.clone()).await;
    let mut env = otel_env(&endpoint);
    env.push(("OTEL_SERVICE_NAME", "flywheel-worker".to_string()));
    env.push(("FLYWHEEL_CURATION_SCHEDULE", "off".to_string()));
    env.push((
        "FLYWHEEL_WORKER_ADDR",
        format!("127.0.0.1:{}", flywheel_tests::free_port()),
    ));
    let out = flywheel_tests::cli(&s.db, &["datasets", "build", "--team", "acme", "--no-wait"]);
    assert!(out.contains("queued curation job"), "{out}");
    let mut worker = flywheel_tests::spawn(&s.db, &as_env(&env), &["worker"]);

    let job = got.wait_for("job", |s| s.name == "job curate").await;
    let curate = got
        .wait_for("curate", |s| {
            s.name == "curate" && s.parent_span_id == job.span_id
        })
        .await;
    assert_eq!(curate.trace_id, job.trace_id);
    assert_eq!(str_attr(&job, "job.kind").as_deref(), Some("curate"));
    assert_eq!(int_attr(&job, "job.attempt"), Some(1));
    assert_eq!(
        str_attr(&job, "job.outcome").as_deref(),
        Some("succeeded"),
        "{job:?}"
    );
    let services: Vec<String> = got.spans().into_iter().map(|(svc, _)| svc).collect();
    assert!(
        services.iter().all(|s| s == "flywheel-worker"),
        "OTEL_SERVICE_NAME names the service: {services:?}"
    );
    let _ = worker.kill();
    let _ = worker.wait();
}
