//! Liveness and readiness probes.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use schemars::JsonSchema;
use serde::Serialize;

use crate::AppState;
use crate::journal::FlushState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(|| async { Json(Health { status: "ok" }) }))
        .route("/readyz", get(readyz))
}

/// `GET /healthz`: the process answers.
#[derive(Serialize, JsonSchema)]
pub struct Health {
    #[schemars(extend("const" = "ok"))]
    pub status: &'static str,
}

/// `GET /readyz`: whether this gateway can serve and keep what it is sent.
#[derive(Serialize, JsonSchema)]
pub struct Readiness {
    /// `ready`; `degraded` (writes go to the journal while the database is
    /// away: acknowledged, not lost); `not ready` (503: no model loaded, or
    /// the journal is full).
    #[schemars(extend("enum" = ["ready", "degraded", "not ready"]))]
    pub status: &'static str,
    /// The champion served, or `loading`.
    pub model: String,
    #[schemars(extend("enum" = ["ok", "unreachable"]))]
    pub database: &'static str,
    pub journal: JournalHealth,
}

#[derive(Serialize, JsonSchema)]
pub struct JournalHealth {
    /// Acknowledged records not yet in the database.
    pub pending: usize,
    pub full: bool,
    /// `ok`, or why records are not reaching the database.
    pub flush: String,
    /// Records the database refused, set aside.
    pub dead_letters: usize,
}

/// Ready when the model is loaded and writes can be accepted: straight into
/// Postgres, or into the journal while Postgres is away or refusing writes
/// ("degraded").
async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
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
        Json(Readiness {
            status,
            model: served.map_or("loading".to_string(), |m| m.name),
            database: if db_ok { "ok" } else { "unreachable" },
            journal: JournalHealth {
                pending: journal.pending,
                full: journal.full,
                flush,
                dead_letters: journal.dead_letters,
            },
        }),
    )
}
