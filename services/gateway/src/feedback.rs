//! `POST /v1/feedback` and `POST /v1/feedback/batch`: end users' ratings.
//!
//! A vote is checked (fields, and that the completion exists and belongs
//! to the caller's team, else 404 whatever the reason), written to the
//! journal, and acknowledged with 201; it reaches Postgres in the
//! background. A vote may come before its completion's row is in Postgres:
//! the journal knows the completion, so the vote is accepted. In a batch,
//! votes identical to an earlier item (same completion, user, rating,
//! comment and correction) are stored once and answered with that vote.

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Extension, Json, Router};
use flywheel_store::feedback::Feedback;
use flywheel_store::keys::Principal;
use serde_json::{Map, Value, json};
use uuid::Uuid;

use crate::error::ApiJson;
use crate::input::{self, MAX_USER};
use crate::journal::{JournalError, Record};
use crate::{AppError, AppState};

pub const MAX_BATCH: usize = 1000;
const MAX_COMMENT: usize = 10_000;
const MAX_CORRECTION: usize = 100_000;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/feedback", post(create))
        .route("/feedback/batch", post(batch))
}

async fn create(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    ApiJson(body): ApiJson<Value>,
) -> Result<(StatusCode, Json<Value>), AppError> {
    let vote = accept(&state, &principal, &body).await?;
    Ok((StatusCode::CREATED, Json(to_json(&vote))))
}

async fn batch(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Value>, AppError> {
    let items = body.get("items").and_then(Value::as_array).ok_or_else(|| {
        AppError::bad_request(
            "`items` must be an array of feedback objects",
            Some("items"),
        )
    })?;
    if items.len() > MAX_BATCH {
        return Err(AppError::bad_request(
            format!("at most {MAX_BATCH} items per batch, got {}", items.len()),
            Some("items"),
        ));
    }
    let mut results = Vec::with_capacity(items.len());
    let (mut created, mut failed, mut duplicates) = (0, 0, 0);
    // What each accepted vote says, to its index: a repeat is not stored again.
    let mut seen: HashMap<String, (usize, Feedback)> = HashMap::new();
    for (index, item) in items.iter().enumerate() {
        let key = item.to_string();
        if let Some((first, vote)) = seen.get(&key) {
            duplicates += 1;
            results.push(json!({"index": index, "status": 200, "duplicate_of": first,
                                "feedback": to_json(vote)}));
            continue;
        }
        match accept(&state, &principal, item).await {
            Ok(vote) => {
                created += 1;
                results.push(json!({"index": index, "status": 201, "feedback": to_json(&vote)}));
                seen.insert(key, (index, vote));
            }
            Err(e) => {
                failed += 1;
                results.push(json!({"index": index, "status": e.status().as_u16(), "error": e.body()["error"]}));
            }
        }
    }
    Ok(Json(
        json!({"object": "list", "created": created, "duplicates": duplicates,
                   "failed": failed, "data": results}),
    ))
}

fn to_json(f: &Feedback) -> Value {
    json!({
        "id": f.id,
        "object": "feedback",
        "completion_id": f.completion_id,
        "rating": f.rating,
        "comment": f.comment,
        "correction": f.correction,
        "user": if f.end_user.is_empty() { Value::Null } else { json!(f.end_user) },
        "created_at": f.created_at.to_rfc3339(),
    })
}

fn bad(message: impl Into<String>, param: &str) -> AppError {
    AppError::bad_request(message, Some(param))
}

fn optional_text(
    obj: &Map<String, Value>,
    field: &str,
    max: usize,
) -> Result<Option<String>, AppError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.chars().count() > max => Err(bad(
            format!("`{field}` is longer than {max} characters"),
            field,
        )),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(bad(format!("`{field}` must be a string"), field)),
    }
}

/// Validates one vote, checks the completion, and journals it.
async fn accept(
    state: &AppState,
    principal: &Principal,
    body: &Value,
) -> Result<Feedback, AppError> {
    let obj = body
        .as_object()
        .ok_or_else(|| AppError::bad_request("feedback must be a JSON object", None))?;
    input::refuse_nul(body)?;
    if let Some(unknown) = obj.keys().find(|k| {
        !["completion_id", "rating", "comment", "correction", "user"].contains(&k.as_str())
    }) {
        return Err(bad(format!("unknown field `{unknown}`"), unknown));
    }
    let completion_id = match obj.get("completion_id") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        None | Some(Value::Null) => {
            return Err(bad("`completion_id` is required", "completion_id"));
        }
        Some(_) => {
            return Err(bad(
                "`completion_id` must be a non-empty string",
                "completion_id",
            ));
        }
    };
    let rating = match obj.get("rating") {
        Some(Value::String(r)) if r == "up" || r == "down" => r.clone(),
        None | Some(Value::Null) => {
            return Err(bad("`rating` is required: \"up\" or \"down\"", "rating"));
        }
        Some(other) => {
            return Err(bad(
                format!("`rating` must be \"up\" or \"down\", got {other}"),
                "rating",
            ));
        }
    };
    let comment = optional_text(obj, "comment", MAX_COMMENT)?;
    let correction = optional_text(obj, "correction", MAX_CORRECTION)?;
    let end_user = optional_text(obj, "user", MAX_USER)?.unwrap_or_default();

    if !input::plausible_id(&completion_id)
        || owner(state, &completion_id).await? != Some(principal.team_id)
    {
        // Another team's completion is indistinguishable from none at all.
        return Err(AppError::NotFound {
            message: format!("No completion `{completion_id}` was found."),
            code: "completion_not_found",
        });
    }
    let vote = Feedback {
        id: Uuid::new_v4(),
        completion_id,
        team_id: principal.team_id,
        end_user,
        rating,
        comment,
        correction,
        created_at: chrono::Utc::now(),
    };
    state
        .journal()
        .append(Record::Feedback(vote.clone()))
        .await
        .map_err(|e| match e {
            JournalError::Full(_) => AppError::Unavailable(
                "feedback cannot be accepted right now (the journal is full); retry later".into(),
            ),
            JournalError::Io(e) if e.kind() == std::io::ErrorKind::StorageFull => {
                tracing::error!(error = %e, "the journal's disk is full: refusing votes");
                AppError::Unavailable(
                    "feedback cannot be accepted right now (the journal's disk is full); retry later"
                        .into(),
                )
            }
            other => AppError::Internal(other.to_string()),
        })?;
    Ok(vote)
}

/// The team that owns a completion: from the journal, the completions this
/// gateway made or looked up lately, or Postgres. An error when none can
/// answer.
pub(crate) async fn owner(state: &AppState, id: &str) -> Result<Option<Uuid>, AppError> {
    if let Some(team) = state
        .journal()
        .pending_owner(id)
        .or_else(|| state.recent_owner(id))
    {
        return Ok(Some(team));
    }
    match tokio::time::timeout(
        Duration::from_secs(2),
        flywheel_store::completions::owner(state.pool(), id),
    )
    .await
    {
        // A completion's team never changes: later votes on it (often on
        // another gateway than the one that answered) need not ask again.
        Ok(Ok(Some(team))) => {
            state.remember_completion(id, team);
            Ok(Some(team))
        }
        Ok(Ok(None)) => Ok(None),
        _ => Err(AppError::Unavailable(
            "the database is unreachable and this completion is not known locally; retry shortly"
                .into(),
        )),
    }
}
