//! `GET /v1/completions/{id}` (a team's own completion with its feedback)
//! and `DELETE /v1/users/{user}/data` (one end user's data removed).

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::routing::{delete, get};
use axum::{Extension, Json, Router};
use flywheel_store::keys::Principal;
use serde_json::{Value, json};

use crate::{AppError, AppState};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/completions/{id}", get(completion))
        .route("/users/{user}/data", delete(delete_user))
}

fn not_found(id: &str) -> AppError {
    AppError::NotFound {
        message: format!("No completion `{id}` was found."),
        code: "completion_not_found",
    }
}

async fn completion(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<Value>, AppError> {
    // Read your writes: the completion and every vote acknowledged before
    // this request must be in Postgres first.
    if !state.journal().wait_flushed(Duration::from_secs(5)).await {
        return Err(AppError::Unavailable(
            "recent writes are not in the database yet; retry shortly".into(),
        ));
    }
    let c = flywheel_store::completions::get(state.pool(), principal.team_id, &id)
        .await?
        .ok_or_else(|| not_found(&id))?;
    let votes = flywheel_store::feedback::for_completion(state.pool(), &id).await?;
    let vote_json = |f: &flywheel_store::feedback::Feedback| {
        json!({
            "id": f.id, "user": if f.end_user.is_empty() { Value::Null } else { json!(f.end_user) },
            "rating": f.rating, "comment": f.comment, "correction": f.correction,
            "created_at": f.created_at.to_rfc3339(),
        })
    };
    // Latest vote per user wins.
    let mut current: BTreeMap<&str, Value> = BTreeMap::new();
    for f in &votes {
        current.insert(&f.end_user, vote_json(f));
    }
    Ok(Json(json!({
        "id": c.id,
        "object": "chat.completion.record",
        "model_version_id": c.model_version_id,
        "user": c.end_user,
        "request": c.request,
        "output": c.output,
        "finish_reason": c.finish_reason,
        "usage": {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                  "total_tokens": c.prompt_tokens + c.completion_tokens},
        "latency_ms": c.latency_ms,
        "ttft_ms": c.ttft_ms,
        "request_id": c.request_id,
        "started_at": c.started_at.map(|t| t.to_rfc3339()),
        "created_at": c.created_at.to_rfc3339(),
        "feedback": {
            "current": current.into_values().collect::<Vec<_>>(),
            "history": votes.iter().map(vote_json).collect::<Vec<_>>(),
        },
    })))
}

async fn delete_user(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(user): Path<String>,
) -> Result<Json<Value>, AppError> {
    // Anything of theirs still in the journal must land first, or it would
    // arrive after the delete.
    if !state.journal().wait_flushed(Duration::from_secs(10)).await {
        return Err(AppError::Unavailable(
            "the database is unreachable; retry the deletion later".into(),
        ));
    }
    let (completions, feedback) =
        flywheel_store::feedback::delete_user_data(state.pool(), principal.team_id, &user).await?;
    state.forget_completions(principal.team_id);
    Ok(Json(
        json!({"user": user, "deleted": {"completions": completions, "feedback": feedback}}),
    ))
}
