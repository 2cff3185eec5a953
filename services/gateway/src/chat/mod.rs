//! `POST /v1/chat/completions`, streaming (SSE) and not.

mod request;
mod response;

use std::convert::Infallible;
use std::time::Instant;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};
use flywheel_engine::{Event, GenerateRequest, SubmitError};
use flywheel_store::keys::Principal;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::error::ApiJson;
use crate::{AppError, AppState, RETRY_AFTER, ServedModel};
use request::ChatRequest;
use response::{Chunker, Collected};

pub fn router() -> Router<AppState> {
    Router::new().route("/chat/completions", post(create))
}

#[tracing::instrument(skip_all, fields(team = %principal.team_name))]
async fn create(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, AppError> {
    let started = Instant::now();
    let req: ChatRequest = serde_json::from_value(body.clone())
        .map_err(|e| AppError::bad_request(format!("invalid request: {e}"), None))?;
    let end_user = req.user.clone();
    let model = req.model.clone();
    let v = req.validate()?;
    let served = resolve_model(&state, &model).await?;

    let prompt_ids = served
        .engine
        .prepare_chat(&v.messages)
        .map_err(|e| AppError::bad_request(e.to_string(), Some("messages")))?;
    let ctx = served.engine.info().context_length;
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
    let mut params = v.params;
    params.max_tokens = match v.max_tokens {
        _ if room == 0 => return Err(too_long(1)),
        Some(n) if n > room => return Err(too_long(n)),
        Some(n) => n,
        None => state.config().default_max_tokens.min(room),
    };

    let events = served
        .engine
        .submit(GenerateRequest { prompt_ids, params })
        .map_err(|e| match e {
            SubmitError::QueueFull => AppError::Overloaded {
                retry_after_s: RETRY_AFTER.as_secs(),
            },
            SubmitError::Stopped => {
                AppError::Unavailable("the inference engine has stopped".into())
            }
        })?;
    let log = LogContext {
        state: state.clone(),
        principal,
        served: served.clone(),
        request: body,
        end_user,
        started,
    };
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4());
    let chunker = Chunker::new(id, served.name.clone(), v.include_usage);
    if v.stream {
        Ok(stream(events, chunker, log).into_response())
    } else {
        let collected = Collected::drain(events).await?;
        let body = chunker.full_response(&collected);
        log.record(&chunker.id, &collected);
        Ok(Json(body).into_response())
    }
}

/// The served model if `name` names it; 404 otherwise, 503 while loading.
async fn resolve_model(state: &AppState, name: &str) -> Result<ServedModel, AppError> {
    let served = state
        .served()
        .ok_or_else(|| AppError::Unavailable("the model is still loading; retry shortly".into()))?;
    if served.name == name {
        return Ok(served);
    }
    let known = flywheel_store::models::by_name(state.pool(), name).await?;
    Err(AppError::NotFound {
        message: match known {
            Some(_) => format!(
                "The model `{name}` is registered but not served by this gateway (it serves `{}`).",
                served.name
            ),
            None => format!("The model `{name}` does not exist."),
        },
        code: "model_not_found",
    })
}

/// Runs the generation in its own task so the completion is logged even if
/// the client stops reading; the client leaving drops the engine's channel,
/// which stops generation.
fn stream(
    mut events: mpsc::UnboundedReceiver<Event>,
    chunker: Chunker,
    log: LogContext,
) -> impl IntoResponse {
    let (tx, rx) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
    tokio::spawn(async move {
        let send = |v: Value| {
            let tx = tx.clone();
            async move {
                tx.send(Ok(SseEvent::default().data(v.to_string())))
                    .await
                    .is_ok()
            }
        };
        let mut collected = Collected::default();
        let mut open = send(chunker.role_chunk()).await;
        while open {
            let Some(ev) = events.recv().await else { break };
            match collected.push(ev) {
                Ok(Some(delta)) => open = send(chunker.delta_chunk(&delta)).await,
                Ok(None) => {}
                Err(e) => {
                    send(e.body()).await;
                    return;
                }
            }
            if collected.finish.is_some() {
                break;
            }
        }
        if !open || collected.finish.is_none() {
            // The client left; the engine stops when `events` drops.
            return;
        }
        for chunk in chunker.final_chunks(&collected) {
            send(chunk).await;
        }
        let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
        log.record(&chunker.id, &collected);
    });
    Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::default())
}

/// Everything needed to store a completion once it is finished.
struct LogContext {
    state: AppState,
    principal: Principal,
    served: ServedModel,
    request: Value,
    end_user: Option<String>,
    started: Instant,
}

impl LogContext {
    fn record(self, id: &str, c: &Collected) {
        if !self.state.config().log_completions {
            return;
        }
        let row = flywheel_store::completions::NewCompletion {
            id: id.to_string(),
            team_id: self.principal.team_id,
            model_version_id: self.served.version_id,
            end_user: self.end_user,
            request: self.request,
            output: c.text.clone(),
            finish_reason: c.finish.map_or("unknown", |f| f.as_str()).to_string(),
            prompt_tokens: c.prompt_tokens as i32,
            completion_tokens: c.completion_tokens as i32,
            latency_ms: self.started.elapsed().as_secs_f64() * 1000.0,
        };
        let pool = self.state.pool().clone();
        tokio::spawn(async move {
            if let Err(e) = flywheel_store::completions::insert(&pool, &row).await {
                tracing::error!(error = %e, id = row.id, "could not log completion");
            }
        });
    }
}
