//! `POST /v1/chat/completions`, streaming (SSE) and not.
//!
//! Generation runs in a task of its own that outlives the HTTP exchange, so
//! every completion is recorded exactly once whatever happens to it:
//! finished, cut by `max_tokens`, abandoned by the client, or failed. The
//! record is in the journal before the client sees the end of the answer.

mod request;
mod response;
mod text;
pub mod tokenize;

pub use request::ChatRequest;
pub use response::{ChatCompletion, ChatCompletionChunk, Usage};
pub use text::{TextCompletion, TextRequest};

use std::convert::Infallible;
use std::time::Instant;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};
use flywheel_engine::{
    AdapterId, ChatMessage, EngineHandle, Event, GenerateRequest, SamplingParams, SubmitError,
};
use flywheel_store::keys::Principal;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tokio_stream::{StreamExt, StreamMap};
use tracing::Instrument;

use crate::error::ApiJson;
use crate::journal::Record;
use crate::serving::{Backend, RouteKind};
use crate::{AppError, AppState, RETRY_AFTER, ServedModel};
use response::{Chunker, Collected, Failure};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/chat/completions", post(create))
        .route("/completions", post(text::create))
}

async fn create(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, AppError> {
    let span = gen_ai_span("chat", &principal);
    chat(state, principal, headers, body, span.clone())
        .instrument(span)
        .await
}

async fn chat(
    state: AppState,
    principal: Principal,
    headers: HeaderMap,
    body: Value,
    span: tracing::Span,
) -> Result<Response, AppError> {
    let started = Instant::now();
    let started_at = chrono::Utc::now();
    let req: ChatRequest = admit(&state, &principal, &body)?;
    // An empty `user` names nobody.
    let end_user = req.user.clone().filter(|u| !u.is_empty());
    let model = req.model.clone();
    let v = req.validate()?;
    traced_request(&span, "chat", &model, v.max_tokens, &v.params);
    let max_choices = state.config().max_choices;
    if v.n > max_choices {
        return Err(AppError::bad_request(
            format!("n may be at most {max_choices} on this server, not {}", v.n),
            Some("n"),
        ));
    }
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4());
    // The route is fixed here: a promotion or rollback from now on changes
    // the next request, not this one.
    // Which version answers (champion, canary or the one named), as a
    // span of its own: it may read the database.
    let (served, route) = state
        .route(&principal, &model, end_user.as_deref(), &id)
        .instrument(tracing::info_span!("route"))
        .await?;
    recordable(&state)?;
    traced_route(&span, &id, &served, route);

    let log = LogContext {
        state: state.clone(),
        id: id.clone(),
        principal,
        served: served.clone(),
        route,
        request: body.clone(),
        end_user,
        request_id: request_id(&headers),
        trace_id: crate::trace::trace_id(&span, &headers),
        span,
        started,
        started_at,
    };
    // Each choice is its own record: the first under the response's id,
    // choice i under `<id>-<i>`, each rated by that id.
    let logs: Vec<LogContext> = (0..v.n)
        .map(|i| LogContext {
            id: choice_id(&id, i),
            ..log.clone()
        })
        .collect();
    let events = match &served.backend {
        Backend::Engine { engine, adapter } => {
            let tenant = principal_tenant(&log.principal);
            let (messages, params) = (v.messages, v.params);
            submit_chat(
                &state,
                engine,
                (*adapter, tenant),
                messages,
                params,
                v.max_tokens,
                v.n,
            )
            .inspect_err(|e| count_queue_refusal(&state, &log.principal, e))?
        }
        Backend::Upstream(_) if v.n > 1 => {
            return Err(AppError::bad_request(
                format!(
                    "the model `{}` is served by an upstream, which answers one choice: n must be 1",
                    served.name
                ),
                Some("n"),
            ));
        }
        Backend::Upstream(client) => {
            let request =
                request::for_upstream(&body, &v.messages, state.config().default_max_tokens);
            vec![reach_upstream(client.clone(), request, log.clone()).await?]
        }
    };
    let chunker = Chunker::new(
        id,
        served.name.clone(),
        served.version_id.to_string(),
        v.include_usage,
    );
    if v.stream {
        return Ok(stream(events, chunker, logs).into_response());
    }
    // Collected and recorded by a task of its own, which records every
    // choice as cancelled if the client leaves first.
    let (tx, rx) = oneshot::channel();
    // In the request's span: the journal's append is its child.
    tokio::spawn(complete(events, logs, tx).in_current_span());
    let choices = rx
        .await
        .map_err(|_| AppError::Internal("the generation task ended early".into()))??;
    Ok(Json(chunker.full_response(&choices)).into_response())
}

/// A generation request let in: within the team's rate limits, with no
/// NUL anywhere (Postgres could never store it), read as `R`.
fn admit<R: serde::de::DeserializeOwned>(
    state: &AppState,
    principal: &Principal,
    body: &Value,
) -> Result<R, AppError> {
    state.limiter().admit(principal)?;
    crate::input::refuse_nul(body)?;
    serde_json::from_value(body.clone())
        .map_err(|e| AppError::bad_request(format!("invalid request: {e}"), None))
}

/// Refuses a generation that could not be recorded: the journal is full.
fn recordable(state: &AppState) -> Result<(), AppError> {
    if state.config().log_completions && state.journal().stats().full {
        return Err(AppError::Unavailable(
            "completions cannot be recorded right now (the journal is full); retry later".into(),
        ));
    }
    Ok(())
}

/// The span of one generation request, named and described as OpenTelemetry's
/// GenAI semantic conventions say (`chat <model>`, `gen_ai.*` attributes;
/// the usage and finish reasons are recorded with the completion). It
/// lasts until the completion is in the journal, past the HTTP exchange
/// for a stream; the engine's queue, prefill and decode spans are its
/// children.
fn gen_ai_span(operation: &'static str, principal: &Principal) -> tracing::Span {
    use tracing::field::Empty;
    tracing::info_span!(
        "gen_ai",
        otel.name = operation,
        gen_ai.operation.name = operation,
        gen_ai.provider.name = "flywheel",
        gen_ai.request.model = Empty,
        gen_ai.request.max_tokens = Empty,
        gen_ai.request.temperature = Empty,
        gen_ai.request.top_p = Empty,
        gen_ai.response.id = Empty,
        gen_ai.response.model = Empty,
        gen_ai.response.finish_reasons = Empty,
        gen_ai.usage.input_tokens = Empty,
        gen_ai.usage.output_tokens = Empty,
        flywheel.model_version_id = Empty,
        flywheel.route = Empty,
        team = %principal.team_name,
    )
}

/// What was asked, on the request's span, named `<operation> <model>`.
fn traced_request(
    span: &tracing::Span,
    operation: &str,
    model: &str,
    max_tokens: Option<usize>,
    p: &SamplingParams,
) {
    crate::trace::rename(span, format!("{operation} {model}"));
    span.record("gen_ai.request.model", model);
    if let Some(n) = max_tokens {
        span.record("gen_ai.request.max_tokens", n as i64);
    }
    span.record("gen_ai.request.temperature", f64::from(p.temperature));
    span.record("gen_ai.request.top_p", f64::from(p.top_p));
}

/// Which model version answers, on the request's span.
fn traced_route(span: &tracing::Span, id: &str, served: &ServedModel, route: RouteKind) {
    span.record("gen_ai.response.id", id);
    span.record("gen_ai.response.model", served.name.as_str());
    span.record("flywheel.model_version_id", served.version_id.to_string());
    span.record("flywheel.route", route.label());
}

/// The client's `x-request-id`, kept with the record.
fn request_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get("x-request-id")
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
}

/// Counts a refusal by the team's share of the engine's queue.
fn count_queue_refusal(state: &AppState, principal: &Principal, e: &AppError) {
    if let AppError::RateLimited { .. } = e {
        state
            .limiter()
            .count_refusal(&principal.team_name, "queue_share");
    }
}

/// The id choice `i` of completion `id` is recorded and rated under.
fn choice_id(id: &str, i: usize) -> String {
    if i == 0 {
        id.to_string()
    } else {
        format!("{id}-{i}")
    }
}

/// Asks the upstream, in a task of its own: the request is recorded
/// whether the upstream fails, or the client leaves while it is reached.
async fn reach_upstream(
    client: std::sync::Arc<flywheel_upstream::Client>,
    request: Value,
    log: LogContext,
) -> Result<mpsc::UnboundedReceiver<Event>, AppError> {
    let (tx, rx) = oneshot::channel();
    let span = log.span.clone();
    let task = async move {
        match client.chat(request).await {
            Ok(events) => {
                if let Err(Ok(events)) = tx.send(Ok(events)) {
                    drop(events); // ends the upstream's answer
                    let _ = log.record(&Collected::default(), Some("cancelled")).await;
                }
            }
            Err(e) => {
                let _ = log.record(&Collected::default(), Some("error")).await;
                let _ = tx.send(Err(e));
            }
        }
    };
    // The upstream's span, and the `traceparent` sent to it, under this
    // request's.
    tokio::spawn(task.instrument(span));
    match rx.await {
        Ok(r) => r.map_err(AppError::from),
        Err(_) => Err(AppError::Internal("the upstream task ended early".into())),
    }
}

/// A generation that failed part-way, as the client sees it: the
/// engine's failure is ours (500, detail logged), an upstream's is a bad
/// gateway (502); past its deadline, a gateway timeout (504).
fn failed(served: &ServedModel, failure: Failure) -> AppError {
    match (&served.backend, failure) {
        (_, Failure::TimedOut(detail)) => AppError::GatewayTimeout(detail),
        (Backend::Engine { .. }, Failure::Failed(detail)) => AppError::Internal(detail),
        (Backend::Upstream(_), Failure::Failed(detail)) => AppError::BadGateway(detail),
    }
}

/// The engine's fairness group for a team's requests.
fn principal_tenant(p: &Principal) -> u64 {
    let (high, low) = p.team_id.as_u64_pair();
    high ^ low
}

/// Queues `n` generations of a chat on `engine` with `adapter`, as
/// `tenant`, side by side in the batch; with a seed, choice i samples with
/// seed + i. If one cannot be queued none is kept (the others stop).
fn submit_chat(
    state: &AppState,
    engine: &EngineHandle,
    who: (Option<AdapterId>, u64),
    messages: Vec<ChatMessage>,
    mut params: SamplingParams,
    max_tokens: Option<usize>,
    n: usize,
) -> Result<Vec<mpsc::UnboundedReceiver<Event>>, AppError> {
    let prompt_ids = engine
        .prepare_chat(&messages)
        .map_err(|e| AppError::bad_request(e.to_string(), Some("messages")))?;
    let ctx = engine.info().context_length;
    let room = ctx.saturating_sub(prompt_ids.len());
    let too_long = |asked: usize| AppError::BadRequest {
        message: format!(
            "This model's maximum context length is {ctx} tokens. However, you requested {} tokens ({} in the messages, {asked} in the completion). Please reduce the length of the messages or completion.",
            prompt_ids.len() + asked,
            prompt_ids.len()
        ),
        param: Some("messages".into()),
        code: Some("context_length_exceeded"),
    };
    params.max_tokens = match max_tokens {
        _ if room == 0 => return Err(too_long(1)),
        Some(n) if n > room => return Err(too_long(n)),
        Some(n) => n,
        None => state.config().default_max_tokens.min(room),
    };
    (0..n)
        .map(|i| {
            let mut params = params.clone();
            params.seed = params.seed.map(|s| s.wrapping_add(i as u64));
            submit(engine, who, prompt_ids.clone(), params)
        })
        .collect()
}

/// Queues `prompt_ids` on `engine` with `adapter`, as `tenant`; `params`
/// carry their `max_tokens`.
fn submit(
    engine: &EngineHandle,
    (adapter, tenant): (Option<AdapterId>, u64),
    prompt_ids: Vec<u32>,
    params: SamplingParams,
) -> Result<mpsc::UnboundedReceiver<Event>, AppError> {
    let vocab = engine.info().vocab_size;
    if let Some(&(id, _)) = params
        .logit_bias
        .iter()
        .find(|(id, _)| *id as usize >= vocab)
    {
        return Err(AppError::bad_request(
            format!(
                "logit_bias names token {id}, outside this model's vocabulary (0 to {})",
                vocab - 1
            ),
            Some("logit_bias"),
        ));
    }
    engine
        .submit(GenerateRequest {
            prompt_ids,
            params,
            adapter,
            tenant,
        })
        .map_err(|e| match e {
            SubmitError::QueueFull => AppError::Overloaded {
                retry_after_s: RETRY_AFTER.as_secs(),
            },
            SubmitError::TenantQueueFull => AppError::RateLimited {
                message: "This team's share of the model's queue is full (other teams' \
                          requests are still taken); retry shortly."
                    .into(),
                retry_after_s: RETRY_AFTER.as_secs(),
            },
            SubmitError::Stopped => {
                AppError::Unavailable("the inference engine has stopped".into())
            }
        })
}

/// Non-streaming: collects every choice, records them, then hands them to
/// the waiting handler. If the handler is gone (client disconnected), the
/// generations stop and are recorded as cancelled; if one fails, each is
/// recorded as failed, as the client sees the request.
async fn complete(
    events: Vec<mpsc::UnboundedReceiver<Event>>,
    logs: Vec<LogContext>,
    done: oneshot::Sender<Result<Vec<Collected>, AppError>>,
) {
    let n = logs.len();
    let mut collected: Vec<Collected> = (0..n).map(|_| Collected::default()).collect();
    let mut merged = StreamMap::new();
    for (i, e) in events.into_iter().enumerate() {
        merged.insert(i, UnboundedReceiverStream::new(e));
    }
    let mut done = done;
    let mut finished = 0;
    let outcome = loop {
        if finished == n {
            break Outcome::Finished;
        }
        tokio::select! {
            item = merged.next() => match item {
                Some((i, ev)) => match collected[i].push(ev) {
                    Ok(_) if collected[i].finish.is_some() => {
                        merged.remove(&i);
                        finished += 1;
                    }
                    Ok(_) => {}
                    Err(e) => break Outcome::Failed(failed(&logs[i].served, e)),
                },
                None => break Outcome::Failed(AppError::Internal("the engine ended the generation without finishing".into())),
            },
            _ = done.closed() => break Outcome::Cancelled,
        }
    };
    drop(merged); // stops the engine where it is still generating
    let mut recorded = Ok(());
    for (log, c) in logs.iter().zip(&collected) {
        let r = log.record(c, outcome.label()).await;
        if recorded.is_ok() {
            recorded = r;
        }
    }
    let reply = match (outcome, recorded) {
        (Outcome::Finished, Ok(())) => Ok(collected),
        (Outcome::Finished, Err(e)) | (Outcome::Failed(e), _) => Err(e),
        (Outcome::Cancelled, _) => return,
    };
    let _ = done.send(reply);
}

enum Outcome {
    Finished,
    Cancelled,
    Failed(AppError),
}

impl Outcome {
    fn label(&self) -> Option<&'static str> {
        match self {
            Self::Finished => None,
            Self::Cancelled => Some("cancelled"),
            Self::Failed(_) => Some("error"),
        }
    }
}

/// Streaming: forwards each choice's deltas as they come; a choice's
/// record is written before its finishing chunk, the usage and `[DONE]`
/// come after the last; a client that leaves gets every unfinished choice
/// recorded as cancelled.
fn stream(
    events: Vec<mpsc::UnboundedReceiver<Event>>,
    chunker: Chunker,
    logs: Vec<LogContext>,
) -> impl IntoResponse {
    let (tx, rx) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
    tokio::spawn(
        async move {
            let send = |line: String| {
                let tx = tx.clone();
                async move { tx.send(Ok(SseEvent::default().data(line))).await.is_ok() }
            };
            let n = logs.len();
            let mut collected: Vec<Collected> = (0..n).map(|_| Collected::default()).collect();
            let mut recorded = vec![false; n];
            let mut merged = StreamMap::new();
            for (i, e) in events.into_iter().enumerate() {
                merged.insert(i, UnboundedReceiverStream::new(e));
            }
            let mut open = true;
            for i in 0..n {
                open = open && send(chunker.role_chunk(i)).await;
            }
            let mut failure = None;
            while open && recorded.iter().any(|done| !done) {
                let Some((i, ev)) = merged.next().await else {
                    failure = Some(AppError::Internal(
                        "the engine ended the generation without finishing".into(),
                    ));
                    break;
                };
                match collected[i].push(ev) {
                    Ok(Some(delta)) => open = send(chunker.delta_chunk(i, &delta)).await,
                    Ok(None) => {}
                    Err(e) => {
                        failure = Some(failed(&logs[i].served, e));
                        break;
                    }
                }
                if collected[i].finish.is_some() && !recorded[i] {
                    merged.remove(&i);
                    recorded[i] = true;
                    if let Err(e) = logs[i].record(&collected[i], None).await {
                        failure = Some(e);
                        break;
                    }
                    open = open && send(chunker.finish_chunk(i, &collected[i])).await;
                }
            }
            drop(merged); // stops the engine where it is still generating
            let why = if failure.is_some() {
                "error"
            } else {
                "cancelled"
            };
            for i in (0..n).filter(|&i| !recorded[i]) {
                let _ = logs[i].record(&collected[i], Some(why)).await;
            }
            if let Some(e) = failure {
                send(e.body().to_string()).await;
                return;
            }
            if !open {
                return;
            }
            if let Some(usage) = chunker.usage_chunk(&collected) {
                send(usage).await;
            }
            let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
        }
        .in_current_span(),
    );
    Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::default())
}

/// Everything needed to record a completion once it has ended.
#[derive(Clone)]
struct LogContext {
    state: AppState,
    id: String,
    principal: Principal,
    served: ServedModel,
    route: RouteKind,
    request: Value,
    end_user: Option<String>,
    request_id: Option<String>,
    /// The trace the request belongs to (exported or the caller's).
    trace_id: Option<String>,
    /// The request's GenAI span ([`gen_ai_span`]).
    span: tracing::Span,
    started: Instant,
    started_at: chrono::DateTime<chrono::Utc>,
}

fn sha256_hex(s: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(s.as_bytes())))
}

/// A model's output as Postgres can store it: text there cannot hold NUL,
/// which a model may generate (a byte token). Stored as U+FFFD, the
/// replacement character, rather than refused: a refused completion would
/// take its votes with it.
fn storable(text: &str) -> String {
    text.replace('\0', "\u{FFFD}")
}

/// A team that keeps no message text: contents become hashes and sizes.
fn redact_request(mut request: Value) -> Value {
    if let Some(messages) = request.get_mut("messages").and_then(Value::as_array_mut) {
        for m in messages.iter_mut() {
            let text = match &m["content"] {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            m["content"] = json!({"sha256": sha256_hex(&text), "chars": text.chars().count()});
        }
    }
    // A text completion's prompt: text, token ids, or a list of either.
    if let Some(prompt) = request.get_mut("prompt") {
        let text = match &*prompt {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        *prompt = json!({"sha256": sha256_hex(&text), "chars": text.chars().count()});
    }
    if request.get("stop").is_some() {
        request["stop"] = json!("[redacted]");
    }
    request
}

impl LogContext {
    /// Writes the completion to the journal; `reason` overrides the
    /// engine's finish reason for cancelled and failed generations.
    async fn record(&self, c: &Collected, reason: Option<&str>) -> Result<(), AppError> {
        self.state.meters().observe_completion(
            &self.served.name,
            c.first_token_after
                .map(|t| (t - self.started).as_secs_f64()),
            self.started.elapsed().as_secs_f64(),
            c.completion_tokens,
        );
        self.state.limiter().spend(
            self.principal.team_id,
            c.prompt_tokens + c.completion_tokens,
        );
        if let Backend::Upstream(_) = self.served.backend {
            self.state.count_upstream_use(
                &self.served.name,
                &self.principal.team_name,
                c.prompt_tokens,
                c.completion_tokens,
            );
        }
        let finish = reason.or(c.finish.map(|f| f.as_str())).unwrap_or("error");
        // Counts as integers: `tracing` hands unsigned values to the
        // exporter as text.
        self.span
            .record("gen_ai.usage.input_tokens", c.prompt_tokens as i64);
        self.span
            .record("gen_ai.usage.output_tokens", c.completion_tokens as i64);
        self.span.record("gen_ai.response.finish_reasons", finish);
        if !self.state.config().log_completions {
            return Ok(());
        }
        let (request, output) = if self.principal.store_text {
            (self.request.clone(), storable(&c.text))
        } else {
            (redact_request(self.request.clone()), sha256_hex(&c.text))
        };
        let row = flywheel_store::completions::NewCompletion {
            id: self.id.clone(),
            team_id: self.principal.team_id,
            model_version_id: self.served.version_id,
            end_user: self.end_user.clone(),
            request,
            output,
            finish_reason: finish.to_string(),
            prompt_tokens: c.prompt_tokens as i32,
            completion_tokens: c.completion_tokens as i32,
            latency_ms: self.started.elapsed().as_secs_f64() * 1000.0,
            request_id: self.request_id.clone(),
            trace_id: self.trace_id.clone(),
            ttft_ms: c
                .first_token_after
                .map(|d| (d - self.started).as_secs_f64() * 1000.0),
            started_at: Some(self.started_at),
            route: self.route.label().into(),
            canary_id: match self.route {
                RouteKind::Canary(id) => Some(id),
                _ => None,
            },
        };
        self.state
            .journal()
            .append(Record::Completion(row))
            .await
            .map_err(|e| {
                tracing::error!(error = %e, id = self.id, "could not record a completion");
                AppError::Unavailable(format!("the completion could not be recorded: {e}"))
            })?;
        self.state.remember_completion(
            &self.id,
            flywheel_store::completions::Owner {
                team_id: self.principal.team_id,
                model_version_id: self.served.version_id,
            },
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::storable;
    use serde_json::json;

    #[test]
    fn a_team_that_keeps_no_text_keeps_no_prompt_of_a_text_completion() {
        for prompt in [json!("my secret"), json!([17, 4, 9]), json!(["my secret"])] {
            let kept = super::redact_request(
                json!({"model": "m", "prompt": prompt.clone(), "max_tokens": 3}),
            );
            assert!(!kept.to_string().contains("secret"), "{kept}");
            let mut fields: Vec<&String> = kept["prompt"].as_object().unwrap().keys().collect();
            fields.sort();
            assert_eq!(fields, ["chars", "sha256"], "{kept}");
            assert!(
                kept["prompt"]["sha256"]
                    .as_str()
                    .unwrap()
                    .starts_with("sha256:")
            );
            assert_eq!(kept["max_tokens"], 3);
        }
    }

    #[test]
    fn a_nul_the_model_generated_is_stored_as_the_replacement_character() {
        assert_eq!(storable("a\0b\0"), "a\u{FFFD}b\u{FFFD}");
        assert_eq!(storable("plain"), "plain");
    }
}
