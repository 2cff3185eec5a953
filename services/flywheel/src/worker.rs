//! `flywheel worker`: the job worker (`flywheel_jobs::worker`) and its own
//! listener, so that a worker can be watched and probed apart from any
//! gateway: `/metrics` (its jobs, in Prometheus' text format), `/healthz`
//! (the process answers) and `/readyz` (the database answers).

use std::time::Duration;

use anyhow::Context;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use flywheel_store::PgPool;
use serde_json::json;

use crate::Config;

/// Runs the worker until `shutdown`, with its listener on `jobs.addr`
/// unless that is empty.
pub async fn run(
    cfg: &Config,
    pool: PgPool,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let w = cfg.worker(&pool)?;
    let listener = listen(&cfg.jobs.addr, pool.clone()).await?;
    let result = flywheel_jobs::worker::run(pool, w, shutdown).await;
    if let Some(l) = listener {
        l.abort();
    }
    result
}

/// The listener on `addr` (none when it is empty), serving in a task.
pub async fn listen(
    addr: &str,
    pool: PgPool,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    if addr.is_empty() {
        return Ok(None);
    }
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("binding the worker's listener on {addr} (FLYWHEEL_WORKER_ADDR)")
    })?;
    tracing::info!(addr = %listener.local_addr()?, "worker listening");
    let app = Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(pool);
    Ok(Some(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the worker's listener stopped");
        }
    })))
}

async fn database_up(pool: &PgPool) -> bool {
    tokio::time::timeout(Duration::from_secs(1), flywheel_store::ping(pool))
        .await
        .is_ok_and(|r| r.is_ok())
}

async fn readyz(axum::extract::State(pool): axum::extract::State<PgPool>) -> impl IntoResponse {
    if database_up(&pool).await {
        (StatusCode::OK, Json(json!({"status": "ready"})))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not ready", "database": "unreachable"})),
        )
    }
}

async fn metrics(axum::extract::State(pool): axum::extract::State<PgPool>) -> impl IntoResponse {
    let mut out = format!(
        "# HELP flywheel_build_info The running build (its version as a label).\n\
         # TYPE flywheel_build_info gauge\n\
         flywheel_build_info{{version=\"{}\"}} 1\n\
         # HELP flywheel_database_up 0 while Postgres cannot be reached.\n\
         # TYPE flywheel_database_up gauge\n\
         flywheel_database_up {}\n",
        env!("CARGO_PKG_VERSION"),
        u8::from(database_up(&pool).await)
    );
    // Outcomes from the database, where every worker's cycles end: the
    // same figure on every worker (aggregate with max, not sum).
    if let Ok(counts) = flywheel_store::cycles::count_by_status(&pool).await {
        out.push_str(
            "# HELP flywheel_cycles Loop cycles by status, all teams (ended ones stay: a rise in `rejected` is a cycle rejected).\n\
             # TYPE flywheel_cycles gauge\n",
        );
        for (status, n) in counts {
            out.push_str(&format!("flywheel_cycles{{status=\"{status}\"}} {n}\n"));
        }
    }
    flywheel_jobs::meters::encode(&mut out);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
