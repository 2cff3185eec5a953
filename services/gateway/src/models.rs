//! `GET /v1/models`: the models this gateway serves, in OpenAI's list shape.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::{AppError, AppState};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/models", get(list))
        .route("/models/{name}", get(one))
}

async fn list(State(state): State<AppState>) -> Result<Json<serde_json::Value>, AppError> {
    let data: Vec<_> = served_models(&state).await?;
    Ok(Json(json!({"object": "list", "data": data})))
}

async fn one(
    State(state): State<AppState>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Result<Json<serde_json::Value>, AppError> {
    served_models(&state)
        .await?
        .into_iter()
        .find(|m| m["id"] == name.as_str())
        .map(Json)
        .ok_or_else(|| AppError::NotFound {
            message: format!("The model `{name}` does not exist or is not served here."),
            code: "model_not_found",
        })
}

async fn served_models(state: &AppState) -> Result<Vec<serde_json::Value>, AppError> {
    let Some(served) = state.served() else {
        return Ok(Vec::new());
    };
    let Some(v) = flywheel_store::models::by_name(state.pool(), &served.name).await? else {
        return Ok(Vec::new());
    };
    Ok(vec![json!({
        "id": v.name,
        "object": "model",
        "created": v.created_at.timestamp(),
        "owned_by": "flywheel",
        "version_id": v.id,
        "sha256": v.sha256,
        "champion": v.is_champion,
    })])
}
