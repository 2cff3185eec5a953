//! `GET /v1/models`: what the key's team can use, from the routes in memory
//! (it answers while Postgres is down): its champion and any canary, in
//! OpenAI's list shape, with each version's context window and sha256.
//! `GET /v1/models/{name}` also accepts the names that route to the
//! champion (`default`, the base model's name).

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Extension, Json, Router};
use flywheel_store::keys::Principal;
use flywheel_store::models::ModelVersion;
use serde_json::{Value, json};

use crate::{AppError, AppState};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/models", get(list))
        .route("/models/{name}", get(one))
}

fn entry(v: &ModelVersion, role: &str) -> Value {
    json!({
        "id": v.name,
        "object": "model",
        "created": v.created_at.timestamp(),
        "owned_by": "flywheel",
        "version_id": v.id,
        "sha256": v.sha256,
        "context_length": v.context_length,
        "role": role,
    })
}

async fn list(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Json<Value> {
    let routes = state.routes();
    let data: Vec<Value> = routes
        .listed(principal.team_id)
        .into_iter()
        .map(|(v, role)| entry(v, role))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

async fn one(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<Value>, AppError> {
    let routes = state.routes();
    let listed = routes.listed(principal.team_id);
    if let Some((v, role)) = listed.iter().find(|(v, _)| v.name == name) {
        return Ok(Json(entry(v, role)));
    }
    match routes.resolve(principal.team_id, &name, None, "") {
        Ok(r) => {
            let role = match r.kind {
                crate::serving::RouteKind::Named => "named",
                _ => "champion",
            };
            Ok(Json(entry(&r.version, role)))
        }
        Err(_) => Err(AppError::NotFound {
            message: format!("The model `{name}` does not exist or is not served here."),
            code: "model_not_found",
        }),
    }
}
