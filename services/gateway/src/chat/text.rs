//! `POST /v1/completions`: OpenAI's text completions, the API evaluation
//! tools still call (lm-evaluation-harness, HELM): the prompt is continued
//! as given, with no chat template. `echo` puts the prompt before the
//! answer; with `logprobs` as well, every prompt token after the first
//! comes with its log-probability, which is how a continuation is scored
//! (`max_tokens: 0`: nothing written, only the prompt scored).
//!
//! The prompt's tokens are scored by the engine's forced tokens: after its
//! first token, each is taken instead of sampled, one step each, in the
//! batch with everything else (not in one prefill: scoring N tokens costs
//! N steps). Recorded like a chat completion, the request with its prompt
//! and the written text only; curation, which builds chat datasets, passes
//! text completions by.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use flywheel_engine::{EngineHandle, Event, FinishReason, TokenLogprob};
use flywheel_store::keys::Principal;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use super::request::{Sampling, Stop};
use super::response::{Collected, Finish, Usage};
use super::{LogContext, Outcome, failed, principal_tenant};
use crate::error::ApiJson;
use crate::serving::Backend;
use crate::{AppError, AppState};

/// What `max_tokens` is when the request gives none (OpenAI's default).
const DEFAULT_MAX_TOKENS: usize = 16;

/// Most alternatives `logprobs` may ask for per token.
const MAX_LOGPROBS: i64 = 20;

/// A text completion request: OpenAI's fields that this server reads or
/// ignores; any other field is refused.
#[derive(Debug, Deserialize, JsonSchema)]
#[schemars(transform = closed)]
pub struct TextRequest {
    /// A version the team may use, its base's name, or `default`.
    #[schemars(length(min = 1), example = &"default")]
    model: String,
    /// Text or token ids, one prompt per request.
    #[schemars(required)]
    prompt: Option<Prompt>,
    /// Default 16; 0 with `echo` and `logprobs` scores the prompt.
    #[schemars(range(min = 0))]
    max_tokens: Option<i64>,
    #[schemars(range(min = 0.0, max = 2.0))]
    temperature: Option<f32>,
    #[schemars(range(max = 1.0), extend("exclusiveMinimum" = 0))]
    top_p: Option<f32>,
    #[schemars(range(min = 0))]
    top_k: Option<i64>,
    seed: Option<i64>,
    #[schemars(range(min = -2.0, max = 2.0))]
    presence_penalty: Option<f32>,
    #[schemars(range(min = -2.0, max = 2.0))]
    frequency_penalty: Option<f32>,
    stop: Option<Stop>,
    /// How many alternatives to report per token (0: only the chosen one);
    /// with `echo`, the prompt's tokens are scored too.
    #[schemars(range(min = 0, max = 20))]
    logprobs: Option<i64>,
    echo: Option<bool>,
    /// Only 1.
    #[schemars(extend("enum" = [1, null]))]
    n: Option<i64>,
    /// Only 1.
    #[schemars(extend("enum" = [1, null]))]
    best_of: Option<i64>,
    /// Text completions are not streamed.
    #[schemars(extend("enum" = [false, null]))]
    stream: Option<bool>,
    /// The end user, for their votes and their data's deletion.
    #[schemars(length(max = 256))]
    user: Option<String>,
    /// Token id (as a string) to a bias from -100 to 100 added to its logit.
    #[schemars(extend("maxProperties" = 300, "additionalProperties" = {"type": "number", "minimum": -100, "maximum": 100}))]
    logit_bias: Option<HashMap<String, f32>>,
    #[serde(flatten)]
    #[schemars(skip)]
    rest: HashMap<String, Value>,
}

/// The schema closed to what the request reads, with the fields it
/// accepts and ignores.
fn closed(schema: &mut schemars::Schema) {
    super::request::closed_schema(schema, IGNORED);
}

/// A prompt as OpenAI's API takes it: text or token ids, alone or in a
/// list (of one: a request answers one prompt here).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(untagged)]
enum Prompt {
    Text(#[schemars(length(min = 1))] String),
    Ids(#[schemars(length(min = 1))] Vec<u32>),
    Texts(#[schemars(length(min = 1, max = 1))] Vec<String>),
    IdLists(#[schemars(length(min = 1, max = 1))] Vec<Vec<u32>>),
}

/// Fields OpenAI defines that change nothing here.
const IGNORED: &[&str] = &["user", "stream_options"];

fn bad(message: impl Into<String>, param: &str) -> AppError {
    AppError::bad_request(message, Some(param))
}

/// A validated text completion.
struct Validated {
    prompt: PromptIn,
    params: flywheel_engine::SamplingParams,
    max_tokens: usize,
    echo: bool,
    /// Alternatives per token, when log-probabilities were asked for.
    logprobs: Option<usize>,
}

enum PromptIn {
    Text(String),
    Ids(Vec<u32>),
}

impl TextRequest {
    fn validate(self) -> Result<Validated, AppError> {
        if let Some(field) = self
            .rest
            .iter()
            .find(|(k, v)| !v.is_null() && !IGNORED.contains(&k.as_str()))
            .map(|(k, _)| k)
        {
            let why = match field.as_str() {
                "suffix" => "suffix (insertion) is not supported by this server".to_string(),
                "messages" => {
                    "text completions take a prompt; send messages to /v1/chat/completions".into()
                }
                _ => format!("Unrecognized request argument supplied: {field}"),
            };
            return Err(bad(why, field));
        }
        if self.model.trim().is_empty() {
            return Err(bad("model must not be empty", "model"));
        }
        if self.n.is_some_and(|n| n != 1) {
            return Err(bad("only n=1 is supported", "n"));
        }
        if self.best_of.is_some_and(|n| n != 1) {
            return Err(bad("only best_of=1 is supported", "best_of"));
        }
        if self.stream == Some(true) {
            return Err(bad(
                "streaming text completions are not supported; stream chat completions instead",
                "stream",
            ));
        }
        if let Some(user) = self.user.as_deref().filter(|u| !u.is_empty()) {
            crate::input::end_user(user, "user")?;
        }
        let prompt = match self.prompt {
            None => return Err(bad("prompt is required", "prompt")),
            Some(Prompt::Text(t)) => PromptIn::Text(t),
            Some(Prompt::Ids(ids)) => PromptIn::Ids(ids),
            Some(Prompt::Texts(mut v)) if v.len() == 1 => PromptIn::Text(v.remove(0)),
            Some(Prompt::IdLists(mut v)) if v.len() == 1 => PromptIn::Ids(v.remove(0)),
            Some(_) => {
                return Err(bad(
                    "one prompt per request: send a string, or a list of one",
                    "prompt",
                ));
            }
        };
        if matches!(&prompt, PromptIn::Text(t) if t.is_empty())
            || matches!(&prompt, PromptIn::Ids(ids) if ids.is_empty())
        {
            return Err(bad("prompt must not be empty", "prompt"));
        }
        let max_tokens = match self.max_tokens {
            None => DEFAULT_MAX_TOKENS,
            Some(n) if n < 0 => {
                return Err(bad(
                    format!("max_tokens must not be negative, got {n}"),
                    "max_tokens",
                ));
            }
            Some(n) => n as usize,
        };
        let logprobs = match self.logprobs {
            None => None,
            Some(n) if !(0..=MAX_LOGPROBS).contains(&n) => {
                return Err(bad(
                    format!("logprobs must be between 0 and {MAX_LOGPROBS}"),
                    "logprobs",
                ));
            }
            Some(n) => Some(n as usize),
        };
        let params = Sampling {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            stop: self.stop,
            logit_bias: self.logit_bias,
        }
        .params(logprobs.is_some(), logprobs.unwrap_or(0), None)?;
        Ok(Validated {
            prompt,
            params,
            max_tokens,
            echo: self.echo.unwrap_or(false),
            logprobs,
        })
    }
}

pub(super) async fn create(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, AppError> {
    let span = super::gen_ai_span("text_completion", &principal);
    complete_text(state, principal, headers, body, span.clone())
        .instrument(span)
        .await
}

async fn complete_text(
    state: AppState,
    principal: Principal,
    headers: HeaderMap,
    body: Value,
    span: tracing::Span,
) -> Result<Response, AppError> {
    let started = Instant::now();
    let started_at = chrono::Utc::now();
    let req: TextRequest = super::admit(&state, &principal, &body)?;
    let end_user = req.user.clone().filter(|u| !u.is_empty());
    let model = req.model.clone();
    let v = req.validate()?;
    super::traced_request(
        &span,
        "text_completion",
        &model,
        Some(v.max_tokens),
        &v.params,
    );
    let id = format!("cmpl-{}", uuid::Uuid::new_v4());
    // Which version answers (champion, canary or the one named), as a
    // span of its own: it may read the database.
    let (served, route) = state
        .route(&principal, &model, end_user.as_deref(), &id)
        .instrument(tracing::info_span!("route"))
        .await?;
    super::traced_route(&span, &id, &served, route);
    let Backend::Engine { engine, adapter } = &served.backend else {
        return Err(bad(
            format!(
                "the model `{}` is served by an upstream; text completions are answered by models served here",
                served.name
            ),
            "model",
        ));
    };
    super::recordable(&state)?;
    let prompt_ids = match &v.prompt {
        PromptIn::Text(t) => engine.encode(t).map_err(|e| bad(e.to_string(), "prompt"))?,
        PromptIn::Ids(ids) => ids.clone(),
    };
    if prompt_ids.is_empty() {
        return Err(bad("the prompt reads as no tokens", "prompt"));
    }
    let prompt_text = match &v.prompt {
        PromptIn::Text(t) => t.clone(),
        PromptIn::Ids(ids) => engine
            .decode(ids)
            .map_err(|e| bad(e.to_string(), "prompt"))?,
    };
    let ctx = engine.info().context_length;
    if prompt_ids.len() + v.max_tokens > ctx {
        return Err(AppError::BadRequest {
            message: format!(
                "This model's maximum context length is {ctx} tokens, however you requested {} tokens ({} in your prompt; {} for the completion). Please reduce your prompt; or completion length.",
                prompt_ids.len() + v.max_tokens,
                prompt_ids.len(),
                v.max_tokens
            ),
            param: Some("prompt".into()),
            code: Some("context_length_exceeded"),
        });
    }

    let log = LogContext {
        state: state.clone(),
        id: id.clone(),
        principal,
        served: served.clone(),
        route,
        request: body,
        end_user,
        request_id: super::request_id(&headers),
        trace_id: crate::trace::trace_id(&span, &headers),
        span,
        started,
        started_at,
    };
    // With echo and logprobs the prompt after its first token is scored:
    // forced, each token's log-probability reported.
    let score_prompt = v.echo && v.logprobs.is_some();
    let forced = if score_prompt {
        prompt_ids[1..].to_vec()
    } else {
        Vec::new()
    };
    let answer = if forced.is_empty() && v.max_tokens == 0 {
        // Nothing to generate or score.
        let answer = Answer {
            prompt_tokens: prompt_ids.len(),
            finish: Some(FinishReason::Length),
            ..Default::default()
        };
        record(&log, &answer, None).await?;
        answer
    } else {
        let mut params = v.params.clone();
        params.max_tokens = forced.len() + v.max_tokens;
        params.forced = forced.clone();
        let submitted = if forced.is_empty() {
            prompt_ids.clone()
        } else {
            prompt_ids[..1].to_vec()
        };
        let events = super::submit(
            engine,
            (*adapter, principal_tenant(&log.principal)),
            submitted,
            params,
        )
        .inspect_err(|e| super::count_queue_refusal(&state, &log.principal, e))?;
        let (tx, rx) = oneshot::channel();
        tokio::spawn(collect(events, log, forced.len(), prompt_ids.len(), tx).in_current_span());
        rx.await
            .map_err(|_| AppError::Internal("the generation task ended early".into()))??
    };
    let first = score_prompt.then(|| token_text(engine, prompt_ids[0]));
    Ok(Json(response(
        &id,
        &served.name,
        &served.version_id.to_string(),
        &v,
        &prompt_text,
        first,
        &answer,
    ))
    .into_response())
}

fn token_text(engine: &EngineHandle, id: u32) -> String {
    engine.decode(&[id]).unwrap_or_default()
}

/// What a text completion produced: the prompt's scored tokens (echo with
/// logprobs) and what the model wrote.
#[derive(Debug, Default)]
struct Answer {
    scored: Vec<TokenLogprob>,
    text: String,
    written: Vec<TokenLogprob>,
    finish: Option<FinishReason>,
    prompt_tokens: usize,
    completion_tokens: usize,
    /// When the engine's first token (scored or written) arrived.
    first_token_after: Option<Instant>,
}

/// Folds the engine's events into an [`Answer`] (the first `n_forced`
/// deltas are the prompt's scored tokens), records it, then hands it to
/// the waiting handler; a client that left gets it recorded as cancelled.
async fn collect(
    mut events: mpsc::UnboundedReceiver<Event>,
    log: LogContext,
    n_forced: usize,
    prompt_tokens: usize,
    done: oneshot::Sender<Result<Answer, AppError>>,
) {
    let mut a = Answer {
        prompt_tokens,
        ..Default::default()
    };
    let mut deltas = 0usize;
    let mut done = done;
    let outcome = loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Some(Event::Delta { text, logprobs }) => {
                    deltas += 1;
                    a.first_token_after.get_or_insert_with(Instant::now);
                    if deltas <= n_forced {
                        a.scored.extend(logprobs);
                    } else {
                        a.text.push_str(&text);
                        a.written.extend(logprobs);
                        a.completion_tokens += 1;
                    }
                }
                Some(Event::Done { finish_reason, completion_tokens, .. }) => {
                    a.finish = Some(finish_reason);
                    a.completion_tokens = completion_tokens.saturating_sub(n_forced);
                    break Outcome::Finished;
                }
                Some(Event::Error(e)) => break Outcome::Failed(failed(&log.served, super::response::Failure::Failed(e))),
                Some(Event::TimedOut(e)) => break Outcome::Failed(failed(&log.served, super::response::Failure::TimedOut(e))),
                None => break Outcome::Failed(AppError::Internal("the engine ended the generation without finishing".into())),
            },
            _ = done.closed() => break Outcome::Cancelled,
        }
    };
    drop(events);
    let recorded = record(&log, &a, outcome.label()).await;
    let reply = match (outcome, recorded) {
        (Outcome::Finished, Ok(())) => Ok(a),
        (Outcome::Finished, Err(e)) | (Outcome::Failed(e), _) => Err(e),
        (Outcome::Cancelled, _) => return,
    };
    let _ = done.send(reply);
}

/// Records what the model wrote (not the echoed prompt).
async fn record(log: &LogContext, a: &Answer, reason: Option<&str>) -> Result<(), AppError> {
    let c = Collected {
        text: a.text.clone(),
        finish: a.finish,
        prompt_tokens: a.prompt_tokens,
        completion_tokens: a.completion_tokens,
        first_token_after: a.first_token_after,
        ..Default::default()
    };
    log.record(&c, reason).await
}

/// `POST /v1/completions`' answer.
#[derive(Debug, Serialize, JsonSchema)]
pub struct TextCompletion {
    pub id: String,
    #[schemars(extend("const" = "text_completion"))]
    pub object: &'static str,
    /// Unix seconds.
    pub created: i64,
    pub model: String,
    /// The model version that answered.
    pub system_fingerprint: String,
    /// One: a request answers one prompt here.
    #[schemars(length(min = 1, max = 1))]
    pub choices: Vec<TextChoice>,
    pub usage: Usage,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct TextChoice {
    /// The written text, after the prompt with `echo`.
    pub text: String,
    pub index: usize,
    pub logprobs: Option<TextLogprobs>,
    pub finish_reason: Option<Finish>,
}

/// The legacy API's log-probabilities, column by column: one entry per
/// token of `text`.
#[derive(Debug, Default, Serialize, JsonSchema)]
pub struct TextLogprobs {
    pub tokens: Vec<String>,
    /// Null for the prompt's first token, which nothing before it scores.
    pub token_logprobs: Vec<Option<f32>>,
    /// The likeliest alternatives (as many as `logprobs` asked) and their
    /// log-probabilities; null where the token is not scored.
    pub top_logprobs: Vec<Option<BTreeMap<String, f32>>>,
    /// Where each token starts in `text`, in characters.
    pub text_offset: Vec<usize>,
    #[serde(skip)]
    at: usize,
}

/// OpenAI's `text_completion` object.
fn response(
    id: &str,
    model: &str,
    fingerprint: &str,
    v: &Validated,
    prompt: &str,
    first: Option<String>,
    a: &Answer,
) -> TextCompletion {
    let text = if v.echo {
        format!("{prompt}{}", a.text)
    } else {
        a.text.clone()
    };
    let logprobs = v.logprobs.map(|_| {
        let mut lp = TextLogprobs::default();
        if let Some(first) = first {
            // The first token has nothing before it to be scored on.
            lp.push(first, None, None);
            for t in &a.scored {
                lp.token(t);
            }
        }
        for t in &a.written {
            lp.token(t);
        }
        lp
    });
    TextCompletion {
        id: id.to_string(),
        object: "text_completion",
        created: chrono::Utc::now().timestamp(),
        model: model.to_string(),
        system_fingerprint: fingerprint.to_string(),
        choices: vec![TextChoice {
            text,
            index: 0,
            logprobs,
            finish_reason: a.finish.map(Finish::from),
        }],
        usage: Usage::new(a.prompt_tokens, a.completion_tokens),
    }
}

impl TextLogprobs {
    fn push(&mut self, token: String, logprob: Option<f32>, top: Option<BTreeMap<String, f32>>) {
        self.text_offset.push(self.at);
        self.at += token.chars().count();
        self.tokens.push(token);
        self.token_logprobs.push(logprob);
        self.top_logprobs.push(top);
    }

    fn token(&mut self, t: &TokenLogprob) {
        let top = t.top.iter().map(|a| (a.token.clone(), a.logprob)).collect();
        self.push(t.token.clone(), Some(t.logprob), Some(top));
    }
}
