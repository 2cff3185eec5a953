//! `GET /v1/completions/{id}` (a team's own completion with its feedback),
//! `GET /v1/completions/{id}/feedback` (its votes, a page at a time) and
//! `DELETE /v1/users/{user}/data` (one end user's data removed).

use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::routing::{delete, get};
use axum::{Extension, Json, Router};
use flywheel_store::feedback::{Feedback, View};
use flywheel_store::keys::Principal;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::chat::Usage;
use crate::feedback::Vote;
use crate::{AppError, AppState, input};

/// Votes shown with a completion, and the default page size.
const PAGE: i64 = 100;
const MAX_PAGE: i64 = 1000;

/// Reading back the log (the `read` scope).
pub fn read_router() -> Router<AppState> {
    Router::new()
        .route("/completions/{id}", get(completion))
        .route("/completions/{id}/feedback", get(feedback))
}

/// Deleting an end user's data (the `delete` scope).
pub fn delete_router() -> Router<AppState> {
    Router::new().route("/users/{user}/data", delete(delete_user))
}

fn not_found(id: &str) -> AppError {
    AppError::NotFound {
        message: format!("No completion `{id}` was found."),
        code: "completion_not_found",
    }
}

/// A stored completion, as `GET /v1/completions/{id}` reads it back.
#[derive(Debug, Serialize, JsonSchema)]
pub struct CompletionRecord {
    pub id: String,
    #[schemars(extend("enum" = ["chat.completion.record", "text_completion.record"]))]
    pub object: &'static str,
    /// The exact version that answered.
    pub model_version_id: Uuid,
    pub user: Option<String>,
    /// The request as it came (a prompt's text is hashed where the team
    /// keeps no text).
    pub request: Value,
    pub output: String,
    pub finish_reason: String,
    pub usage: Usage,
    pub latency_ms: f64,
    /// Time to the first token.
    pub ttft_ms: Option<f64>,
    /// The `x-request-id` it came with.
    pub request_id: Option<String>,
    #[schemars(extend("format" = "date-time"))]
    pub started_at: Option<String>,
    #[schemars(extend("format" = "date-time"))]
    pub created_at: String,
    /// The first page of each view of its votes; the rest from
    /// `/feedback`.
    pub feedback: Votes,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct Votes {
    /// Every vote ever cast.
    pub votes: i64,
    /// End users who voted.
    pub users: i64,
    /// Latest vote per user, up and down.
    pub up: i64,
    pub down: i64,
    pub current: Vec<Vote>,
    pub current_has_more: bool,
    pub history: Vec<Vote>,
    pub history_has_more: bool,
}

/// A page of a completion's votes, in OpenAI's list shape.
#[derive(Debug, Serialize, JsonSchema)]
pub struct FeedbackPage {
    #[schemars(extend("const" = "list"))]
    pub object: &'static str,
    pub data: Vec<Vote>,
    pub first_id: Option<Uuid>,
    pub last_id: Option<Uuid>,
    pub has_more: bool,
}

/// What `DELETE /v1/users/{user}/data` removed.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Deleted {
    pub user: String,
    pub deleted: DeletedCounts,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct DeletedCounts {
    pub completions: u64,
    pub feedback: u64,
}

/// Read your writes: the completion and every vote acknowledged before this
/// request must be in Postgres first.
async fn flushed(state: &AppState) -> Result<(), AppError> {
    if state.journal().wait_flushed(Duration::from_secs(5)).await {
        Ok(())
    } else {
        Err(AppError::Unavailable(
            "recent writes are not in the database yet; retry shortly".into(),
        ))
    }
}

/// The caller's own completion, or 404.
async fn own_completion(
    state: &AppState,
    principal: &Principal,
    id: &str,
) -> Result<flywheel_store::completions::Completion, AppError> {
    if !input::plausible_id(id) {
        return Err(not_found(id));
    }
    flushed(state).await?;
    flywheel_store::completions::get(state.pool(), principal.team_id, id)
        .await?
        .ok_or_else(|| not_found(id))
}

async fn completion(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<CompletionRecord>, AppError> {
    let c = own_completion(&state, &principal, &id).await?;
    let pool = state.pool();
    let summary = flywheel_store::feedback::summary(pool, &id).await?;
    let (current, current_more) =
        flywheel_store::feedback::page(pool, &id, View::Current, None, PAGE).await?;
    let (history, history_more) =
        flywheel_store::feedback::page(pool, &id, View::History, None, PAGE).await?;
    let votes = |v: &[Feedback]| v.iter().map(Vote::from).collect();
    let object = if c.request.get("prompt").is_some() {
        "text_completion.record"
    } else {
        "chat.completion.record"
    };
    Ok(Json(CompletionRecord {
        object,
        model_version_id: c.model_version_id,
        user: c.end_user,
        usage: Usage::new(c.prompt_tokens as usize, c.completion_tokens as usize),
        latency_ms: c.latency_ms,
        ttft_ms: c.ttft_ms,
        request_id: c.request_id,
        started_at: c.started_at.map(|t| t.to_rfc3339()),
        created_at: c.created_at.to_rfc3339(),
        feedback: Votes {
            votes: summary.votes,
            users: summary.users,
            up: summary.up,
            down: summary.down,
            current: votes(&current),
            current_has_more: current_more,
            history: votes(&history),
            history_has_more: history_more,
        },
        id: c.id,
        request: c.request,
        output: c.output,
        finish_reason: c.finish_reason,
    }))
}

#[derive(Debug, Deserialize)]
struct PageQuery {
    /// `history` (every vote, the default) or `current` (latest per user).
    view: Option<String>,
    limit: Option<String>,
    /// The id of the last vote of the previous page.
    after: Option<String>,
}

/// One page of a completion's votes in OpenAI's list shape.
async fn feedback(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
    Query(q): Query<PageQuery>,
) -> Result<Json<FeedbackPage>, AppError> {
    let view = match q.view.as_deref() {
        None | Some("history") => View::History,
        Some("current") => View::Current,
        Some(other) => {
            return Err(AppError::bad_request(
                format!("view must be history or current, not {other:?}"),
                Some("view"),
            ));
        }
    };
    let limit = match q.limit.as_deref() {
        None => PAGE,
        Some(l) => l.parse().unwrap_or(0),
    };
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(AppError::bad_request(
            format!("limit must be between 1 and {MAX_PAGE}"),
            Some("limit"),
        ));
    }
    let after =
        match q.after.as_deref() {
            None => None,
            Some(a) => Some(Uuid::parse_str(a).map_err(|_| {
                AppError::bad_request("after must be the id of a vote", Some("after"))
            })?),
        };
    own_completion(&state, &principal, &id).await?;
    let (votes, has_more) =
        flywheel_store::feedback::page(state.pool(), &id, view, after, limit).await?;
    Ok(Json(FeedbackPage {
        object: "list",
        data: votes.iter().map(Vote::from).collect(),
        first_id: votes.first().map(|v| v.id),
        last_id: votes.last().map(|v| v.id),
        has_more,
    }))
}

async fn delete_user(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(user): Path<String>,
) -> Result<Json<Deleted>, AppError> {
    input::end_user(&user, "user")?;
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
    Ok(Json(Deleted {
        user,
        deleted: DeletedCounts {
            completions,
            feedback,
        },
    }))
}
