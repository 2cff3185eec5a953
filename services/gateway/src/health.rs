//! Liveness and readiness probes.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
}

/// Ready when the model is loaded and the database answers.
async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<serde_json::Value>) {
    let db_ok = sqlx_ping(&state).await;
    match state.served() {
        Some(m) if db_ok => (
            StatusCode::OK,
            Json(json!({"status": "ready", "model": m.name, "database": "ok"})),
        ),
        served => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "status": "not ready",
                "model": if served.is_some() { "loaded" } else { "loading" },
                "database": if db_ok { "ok" } else { "unreachable" },
            })),
        ),
    }
}

async fn sqlx_ping(state: &AppState) -> bool {
    flywheel_store::ping(state.pool()).await.is_ok()
}
