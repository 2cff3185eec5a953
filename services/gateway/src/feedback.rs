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
use flywheel_store::completions::Owner;
use flywheel_store::feedback::Feedback;
use flywheel_store::keys::Principal;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::error::{ApiJson, ErrorDetail};
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

/// An end user's vote on a completion.
// Read field by field (`parse`), so that each refusal names its field;
// `FIELDS` is what it reads.
#[derive(Debug, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct FeedbackIn {
    /// The `id` of a chat or text completion (`<id>-<i>` for choice `i`).
    #[schemars(length(min = 1))]
    pub completion_id: String,
    pub rating: Rating,
    /// The end user who votes; their latest vote on a completion counts.
    #[schemars(length(max = MAX_USER))]
    pub user: Option<String>,
    #[schemars(length(max = MAX_COMMENT))]
    pub comment: Option<String>,
    /// The answer the end user wanted: what curation trains on.
    #[schemars(length(max = MAX_CORRECTION))]
    pub correction: Option<String>,
}

/// The fields [`FeedbackIn`] has: anything else is refused.
const FIELDS: [&str; 5] = ["completion_id", "rating", "comment", "correction", "user"];

#[derive(Debug, JsonSchema)]
#[schemars(rename_all = "lowercase")]
pub enum Rating {
    Up,
    Down,
}

impl Rating {
    fn as_str(&self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Down => "down",
        }
    }
}

/// Votes sent together.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct BatchIn {
    /// Each is checked on its own: a bad item fails alone.
    #[schemars(with = "Vec<FeedbackIn>", length(max = MAX_BATCH))]
    pub items: Vec<Value>,
}

/// A stored vote.
#[derive(Debug, Serialize, JsonSchema)]
#[schemars(rename = "Feedback")]
pub struct Vote {
    pub id: Uuid,
    #[schemars(extend("const" = "feedback"))]
    pub object: &'static str,
    pub completion_id: String,
    #[schemars(extend("enum" = ["up", "down"]))]
    pub rating: String,
    pub comment: Option<String>,
    pub correction: Option<String>,
    pub user: Option<String>,
    #[schemars(extend("format" = "date-time"))]
    pub created_at: String,
}

impl From<&Feedback> for Vote {
    fn from(f: &Feedback) -> Self {
        Self {
            id: f.id,
            object: "feedback",
            completion_id: f.completion_id.clone(),
            rating: f.rating.clone(),
            comment: f.comment.clone(),
            correction: f.correction.clone(),
            user: (!f.end_user.is_empty()).then(|| f.end_user.clone()),
            created_at: f.created_at.to_rfc3339(),
        }
    }
}

/// Each item's outcome, in order.
#[derive(Debug, Serialize, JsonSchema)]
pub struct FeedbackBatch {
    #[schemars(extend("const" = "list"))]
    pub object: &'static str,
    pub created: usize,
    pub duplicates: usize,
    pub failed: usize,
    pub data: Vec<BatchItem>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct BatchItem {
    pub index: usize,
    /// 201 stored, 200 the same as an earlier item (`duplicate_of`), else
    /// the status the vote alone would have got.
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feedback: Option<Vote>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duplicate_of: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDetail>,
}

async fn create(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    ApiJson(body): ApiJson<Value>,
) -> Result<(StatusCode, Json<Vote>), AppError> {
    let vote = accept(&state, &principal, &body).await?;
    Ok((StatusCode::CREATED, Json(Vote::from(&vote))))
}

async fn batch(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<FeedbackBatch>, AppError> {
    let BatchIn { items } = serde_json::from_value(body).map_err(|_| {
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
            results.push(BatchItem {
                index,
                status: 200,
                feedback: Some(Vote::from(vote)),
                duplicate_of: Some(*first),
                error: None,
            });
            continue;
        }
        match accept(&state, &principal, item).await {
            Ok(vote) => {
                created += 1;
                results.push(BatchItem {
                    index,
                    status: 201,
                    feedback: Some(Vote::from(&vote)),
                    duplicate_of: None,
                    error: None,
                });
                seen.insert(key, (index, vote));
            }
            Err(e) => {
                failed += 1;
                results.push(BatchItem {
                    index,
                    status: e.status().as_u16(),
                    feedback: None,
                    duplicate_of: None,
                    error: Some(e.detail()),
                });
            }
        }
    }
    Ok(Json(FeedbackBatch {
        object: "list",
        created,
        duplicates,
        failed,
        data: results,
    }))
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

/// One vote's fields, checked.
fn parse(body: &Value) -> Result<FeedbackIn, AppError> {
    let obj = body
        .as_object()
        .ok_or_else(|| AppError::bad_request("feedback must be a JSON object", None))?;
    input::refuse_nul(body)?;
    if let Some(unknown) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
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
    let rating = match obj.get("rating").and_then(Value::as_str) {
        Some("up") => Rating::Up,
        Some("down") => Rating::Down,
        None if obj.get("rating").is_none_or(Value::is_null) => {
            return Err(bad("`rating` is required: \"up\" or \"down\"", "rating"));
        }
        _ => {
            return Err(bad(
                format!("`rating` must be \"up\" or \"down\", got {}", obj["rating"]),
                "rating",
            ));
        }
    };
    Ok(FeedbackIn {
        completion_id,
        rating,
        comment: optional_text(obj, "comment", MAX_COMMENT)?,
        correction: optional_text(obj, "correction", MAX_CORRECTION)?,
        user: optional_text(obj, "user", MAX_USER)?,
    })
}

/// Validates one vote, checks the completion, and journals it.
async fn accept(
    state: &AppState,
    principal: &Principal,
    body: &Value,
) -> Result<Feedback, AppError> {
    let FeedbackIn {
        completion_id,
        rating,
        user,
        comment,
        correction,
    } = parse(body)?;
    let owner = match input::plausible_id(&completion_id) {
        true => owner(state, &completion_id).await?,
        false => None,
    };
    // Another team's completion is indistinguishable from none at all.
    let Some(owner) = owner.filter(|o| o.team_id == principal.team_id) else {
        return Err(AppError::NotFound {
            message: format!("No completion `{completion_id}` was found."),
            code: "completion_not_found",
        });
    };
    let vote = Feedback {
        id: Uuid::new_v4(),
        completion_id,
        team_id: principal.team_id,
        end_user: user.unwrap_or_default(),
        rating: rating.as_str().to_string(),
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
    state
        .meters()
        .observe_vote(owner.model_version_id, &vote.rating);
    Ok(vote)
}

/// The team that owns a completion and the version that made it: from the
/// journal, the completions this gateway made or looked up lately, or
/// Postgres. An error when none can answer.
pub(crate) async fn owner(state: &AppState, id: &str) -> Result<Option<Owner>, AppError> {
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
        Ok(Ok(Some(owner))) => {
            state.remember_completion(id, owner);
            Ok(Some(owner))
        }
        Ok(Ok(None)) => Ok(None),
        _ => Err(AppError::Unavailable(
            "the database is unreachable and this completion is not known locally; retry shortly"
                .into(),
        )),
    }
}
