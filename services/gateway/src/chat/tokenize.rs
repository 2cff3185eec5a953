//! `POST /tokenize` and `POST /detokenize`, in the shape vLLM serves them:
//! the token ids of a text, or of a conversation rendered with the chat
//! template as a chat completion would be, under the model the request
//! would be served by; and the text of token ids. Clients count tokens
//! before they send and read back logprobs with them. The `chat` scope.

use axum::extract::State;
use axum::routing::post;
use axum::{Extension, Json, Router};
use flywheel_engine::EngineHandle;
use flywheel_store::keys::Principal;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::request::{InMessage, convert_messages};
use crate::error::ApiJson;
use crate::serving::Backend;
use crate::{AppError, AppState};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
}

/// A text (`prompt`) or a conversation (`messages`) to count: one of the
/// two.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Tokenize {
    #[serde(default)]
    model: Option<String>,
    /// A text, as it is.
    #[serde(default)]
    prompt: Option<String>,
    /// A conversation, rendered as a chat completion renders it (ending
    /// with the assistant's turn opened).
    #[serde(default)]
    messages: Option<Vec<InMessage>>,
}

/// Token ids to turn into text.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Detokenize {
    #[serde(default)]
    model: Option<String>,
    tokens: Vec<u32>,
}

/// Token ids, as `POST /tokenize` answers.
#[derive(Serialize, JsonSchema)]
pub struct Tokens {
    /// The version whose tokenizer counted.
    pub model: String,
    pub count: usize,
    /// The version's context window, in tokens.
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
}

/// A text, as `POST /detokenize` answers.
#[derive(Serialize, JsonSchema)]
pub struct Text {
    pub model: String,
    pub prompt: String,
}

/// The engine that serves `model` for this team (its champion, or the
/// version named; the team's versions share their base's tokenizer).
async fn engine_for(
    state: &AppState,
    principal: &Principal,
    model: Option<&str>,
) -> Result<(EngineHandle, String), AppError> {
    let (served, _) = state
        .route(principal, model.unwrap_or("default"), None, "tokenize")
        .await?;
    match &served.backend {
        Backend::Engine { engine, .. } => Ok((engine.clone(), served.name.clone())),
        Backend::Upstream(_) => Err(AppError::bad_request(
            format!(
                "`{}` is served by another server; its tokenizer is not here",
                served.name
            ),
            Some("model"),
        )),
    }
}

async fn tokenize(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Tokens>, AppError> {
    crate::input::refuse_nul(&body)?;
    let req: Tokenize = serde_json::from_value(body)
        .map_err(|e| AppError::bad_request(format!("invalid request: {e}"), None))?;
    let (engine, model) = engine_for(&state, &principal, req.model.as_deref()).await?;
    let ids = match (req.prompt, req.messages) {
        (Some(text), None) => engine.encode(&text),
        (None, Some(messages)) => engine.prepare_chat(&convert_messages(messages)?),
        _ => {
            return Err(AppError::bad_request(
                "give either `prompt` (a text) or `messages` (a conversation), not both",
                Some("prompt"),
            ));
        }
    }
    .map_err(|e| AppError::bad_request(e.to_string(), Some("prompt")))?;
    Ok(Json(Tokens {
        model,
        count: ids.len(),
        max_model_len: engine.info().context_length,
        tokens: ids,
    }))
}

async fn detokenize(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Text>, AppError> {
    let req: Detokenize = serde_json::from_value(body)
        .map_err(|e| AppError::bad_request(format!("invalid request: {e}"), None))?;
    let (engine, model) = engine_for(&state, &principal, req.model.as_deref()).await?;
    let text = engine
        .decode(&req.tokens)
        .map_err(|e| AppError::bad_request(e.to_string(), Some("tokens")))?;
    Ok(Json(Text {
        model,
        prompt: text,
    }))
}
