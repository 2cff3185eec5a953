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
use schemars::JsonSchema;
use serde::Serialize;
use uuid::Uuid;

use crate::serving::Role;
use crate::{AppError, AppState};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/models", get(list))
        .route("/models/{name}", get(one))
}

/// A model the key's team may name.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Model {
    /// The version's name: what `model` takes.
    pub id: String,
    #[schemars(extend("const" = "model"))]
    pub object: &'static str,
    /// Unix seconds.
    pub created: i64,
    #[schemars(extend("const" = "flywheel"))]
    pub owned_by: &'static str,
    pub version_id: Uuid,
    /// Of the weights this version serves.
    pub sha256: String,
    /// Tokens of prompt and answer together.
    pub context_length: Option<i32>,
    pub role: Role,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct ModelList {
    #[schemars(extend("const" = "list"))]
    pub object: &'static str,
    pub data: Vec<Model>,
}

fn entry(v: &ModelVersion, role: Role) -> Model {
    Model {
        id: v.name.clone(),
        object: "model",
        created: v.created_at.timestamp(),
        owned_by: "flywheel",
        version_id: v.id,
        sha256: v.sha256.clone(),
        context_length: v.context_length,
        role,
    }
}

async fn list(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Json<ModelList> {
    let routes = state.routes();
    let data = routes
        .listed(principal.team_id)
        .into_iter()
        .map(|(v, role)| entry(v, role))
        .collect();
    Json(ModelList {
        object: "list",
        data,
    })
}

async fn one(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<Model>, AppError> {
    let routes = state.routes();
    let listed = routes.listed(principal.team_id);
    if let Some(&(v, role)) = listed.iter().find(|(v, _)| v.name == name) {
        return Ok(Json(entry(v, role)));
    }
    match routes.resolve(principal.team_id, &name, None, "") {
        Ok(r) => {
            let role = match r.kind {
                crate::serving::RouteKind::Named => Role::Named,
                _ => Role::Champion,
            };
            Ok(Json(entry(&r.version, role)))
        }
        Err(_) => Err(AppError::NotFound {
            message: format!("The model `{name}` does not exist or is not served here."),
            code: "model_not_found",
        }),
    }
}
