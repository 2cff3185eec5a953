//! Liveness and readiness probes.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::AppState;
use crate::journal::FlushState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
}

/// Ready when the model is loaded and writes can be accepted: straight into
/// Postgres, or into the journal while Postgres is away or refusing writes
/// ("degraded").
async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<serde_json::Value>) {
    let db_ok = tokio::time::timeout(
        std::time::Duration::from_secs(1),
        flywheel_store::ping(state.pool()),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    let journal = state.journal().stats();
    let flushing = journal.flush == FlushState::Ok;
    let served = state.served().filter(|_| state.routes().loaded);
    let status = match (&served, db_ok && flushing, journal.full) {
        (None, _, _) | (_, _, true) => "not ready",
        (Some(_), true, _) => "ready",
        (Some(_), false, _) => "degraded",
    };
    let code = if status == "not ready" {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    let flush = match &journal.flush {
        FlushState::Ok => "ok".to_string(),
        FlushState::Unreachable(e) => format!("database unreachable: {e}"),
        FlushState::Refusing(e) => format!("database refuses writes: {e}"),
    };
    (
        code,
        Json(json!({
            "status": status,
            "model": served.map_or("loading".to_string(), |m| m.name),
            "database": if db_ok { "ok" } else { "unreachable" },
            "journal": {"pending": journal.pending, "full": journal.full, "flush": flush,
                        "dead_letters": journal.dead_letters},
        })),
    )
}
