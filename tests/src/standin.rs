//! A **stand-in** for an OpenAI-compatible server ([`StandIn`]): a small
//! server speaking OpenAI's chat protocol with a canned answer, so that each
//! fault of an upstream (a 5xx, a stall, a connection cut mid-answer, a
//! stopped server) can be made to happen on cue, and a judge's habits
//! scripted. It is not vLLM nor llama.cpp's server;
//! `scripts/upstream-llamacpp.py` runs the upstream path against
//! llama.cpp's real server.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use futures::StreamExt;
use serde_json::{Value, json};

/// The stand-in's answer, one streamed piece each.
pub const ANSWER: [&str; 4] = ["Route ", "to ", "billing", "."];
/// The usage the stand-in reports for its whole answer.
pub const PROMPT_TOKENS: u64 = 21;

/// What the stand-in does with its next request (without a script: answers).
#[derive(Debug, Clone)]
pub enum Behave {
    /// Answers with this status and an OpenAI-shaped error.
    Status(u16),
    /// Waits this long before answering.
    Stall(Duration),
    /// Streams this many pieces, then breaks the connection.
    CutAfter(usize),
    /// Streams the whole answer, this long between pieces.
    Slow(Duration),
    /// Answers this text.
    Say(&'static str),
    /// Answers this text, cut at the request's length limit.
    SayCut(&'static str),
    /// A judge that prefers the answer holding this word: "A" when the
    /// prompt's `[Answer A]` section holds it, else "B".
    Prefer(&'static str),
    /// A judge that prefers the answer that is exactly this text, and
    /// calls it a tie when neither or both are.
    PreferExactly(&'static str),
}

#[derive(Default)]
struct Script {
    next: VecDeque<Behave>,
    /// What to do once `next` is empty (default: answer).
    always: Option<Behave>,
    /// Each request's `Authorization` header and body.
    seen: Vec<(Option<String>, Value)>,
    /// Each request's W3C `traceparent` header.
    traceparents: Vec<Option<String>>,
}

/// A stand-in for an OpenAI-compatible server, on its own runtime and
/// thread so that [`StandIn::stop`] stops it for real: the listener and
/// every open connection close.
pub struct StandIn {
    pub base: String,
    script: Arc<Mutex<Script>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StandIn {
    pub fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let script = Arc::new(Mutex::new(Script::default()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let state = script.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let app = Router::new()
                    .route("/v1/chat/completions", post(chat))
                    .with_state(state);
                tokio::spawn(async move { axum::serve(listener, app).await });
                let _ = stopped.await;
            });
            // Dropping the runtime drops every connection's task with it.
            drop(rt);
        });
        Self {
            base,
            script,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn then(&self, b: Behave) {
        self.script.lock().unwrap().next.push_back(b);
    }

    pub fn always(&self, b: Behave) {
        self.script.lock().unwrap().always = Some(b);
    }

    pub fn seen(&self) -> Vec<(Option<String>, Value)> {
        self.script.lock().unwrap().seen.clone()
    }

    /// The `traceparent` each request carried, in order.
    pub fn traceparents(&self) -> Vec<Option<String>> {
        self.script.lock().unwrap().traceparents.clone()
    }

    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn chat(
    State(script): State<Arc<Mutex<Script>>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let prompt = body["messages"][0]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let behave = {
        let mut s = script.lock().unwrap();
        let auth = headers
            .get(header::AUTHORIZATION)
            .map(|v| v.to_str().unwrap().to_string());
        s.seen.push((auth, body));
        let traceparent = headers
            .get("traceparent")
            .map(|v| v.to_str().unwrap().to_string());
        s.traceparents.push(traceparent);
        s.next.pop_front().or_else(|| s.always.clone())
    };
    match behave {
        Some(Behave::Status(code)) => (
            StatusCode::from_u16(code).unwrap(),
            Json(
                json!({"error": {"message": format!("the stand-in failed with {code}"),
                                  "type": "server_error", "param": null, "code": null}}),
            ),
        )
            .into_response(),
        Some(Behave::Stall(d)) => {
            tokio::time::sleep(d).await;
            events(ANSWER.len(), Duration::from_millis(20))
        }
        Some(Behave::CutAfter(n)) => events(n, Duration::from_millis(20)),
        Some(Behave::Slow(pause)) => events(ANSWER.len(), pause),
        Some(Behave::Say(text)) => said(text, "stop"),
        Some(Behave::SayCut(text)) => said(text, "length"),
        Some(Behave::Prefer(word)) => {
            let a = prompt.split("[Answer A]").nth(1).unwrap_or_default();
            let a = a.split("[Answer B]").next().unwrap_or_default();
            said(if a.contains(word) { "A" } else { "B" }, "stop")
        }
        Some(Behave::PreferExactly(text)) => {
            let a = prompt.split("[Answer A]").nth(1).unwrap_or_default();
            let (a, b) = a.split_once("[Answer B]").unwrap_or_default();
            let b = b.split("Reply with").next().unwrap_or_default();
            let verdict = match (a.trim() == text, b.trim() == text) {
                (true, false) => "A",
                (false, true) => "B",
                _ => "tie",
            };
            said(verdict, "stop")
        }
        None => events(ANSWER.len(), Duration::from_millis(20)),
    }
}

/// `text` as a streamed answer that ends for `finish`.
fn said(text: &str, finish: &str) -> Response {
    let chunk = |delta: Value, finish: Value| {
        json!({"id": "chatcmpl-standin", "object": "chat.completion.chunk", "created": 0,
               "model": "teacher-7b", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let body = format!(
        "data: {}\n\ndata: {}\n\ndata: [DONE]\n\n",
        chunk(json!({"content": text}), Value::Null),
        chunk(json!({}), json!(finish))
    );
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from(body))
        .unwrap()
}

/// `pieces` of the answer as server-sent events, `pause` before each; the
/// whole answer ends with its finish, usage and `[DONE]`, a shorter one
/// with a broken connection.
fn events(pieces: usize, pause: Duration) -> Response {
    let chunk = |delta: Value, finish: Value| {
        let c = json!({"id": "chatcmpl-standin", "object": "chat.completion.chunk", "created": 0,
                       "model": "teacher-7b",
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        Ok::<_, std::io::Error>(Bytes::from(format!("data: {c}\n\n")))
    };
    let mut out = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )];
    for p in &ANSWER[..pieces] {
        out.push(chunk(json!({"content": p}), Value::Null));
    }
    if pieces == ANSWER.len() {
        out.push(chunk(json!({}), json!("stop")));
        let usage = json!({"id": "chatcmpl-standin", "object": "chat.completion.chunk", "created": 0,
            "model": "teacher-7b", "choices": [],
            "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": ANSWER.len(),
                      "total_tokens": PROMPT_TOKENS + ANSWER.len() as u64}});
        out.push(Ok(Bytes::from(format!(
            "data: {usage}\n\ndata: [DONE]\n\n"
        ))));
    } else {
        out.push(Err(std::io::Error::other(
            "the stand-in cut the connection",
        )));
    }
    // A pause before each piece, as a server generating them: the headers
    // and the first pieces are on the wire before a cut (a connection
    // closed before any response is retried, rightly, as unreachable).
    let paced = futures::stream::iter(out).then(move |piece| async move {
        tokio::time::sleep(pause).await;
        piece
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from_stream(paced))
        .unwrap()
}
