//! The OpenAI-compatible HTTP API.
//!
//! [`router`] builds the whole API over an [`AppState`]; [`serve`] runs it
//! on a listener until `shutdown` resolves, so tests can bind port 0. The
//! gateway never touches the model directly: it talks to the engine through
//! [`flywheel_engine::EngineHandle`]. It owns the write path of the log (the
//! [`journal`]) and reads and writes the database only through the store.
//!
//! The gateway does not train, curate or schedule.

mod auth;
mod chat;
pub mod error;
mod feedback;
mod health;
mod input;
pub mod journal;
mod limits;
mod metrics;
mod models;
mod records;
pub mod serving;
mod state;

use std::future::Future;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, Request};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

pub use error::AppError;
pub use journal::{Journal, JournalConfig, SyncPolicy};
pub use serving::{Loader, ServedModel};
pub use state::{AppState, GatewayConfig};

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The complete HTTP API.
pub fn router(state: AppState) -> Router {
    use flywheel_store::keys::Scope;
    let scoped = |router: Router<AppState>, scope: Scope| {
        router.route_layer(axum::middleware::from_fn(move |req, next| {
            auth::require(scope, req, next)
        }))
    };
    let api = Router::new()
        .merge(scoped(chat::router(), Scope::Chat))
        .merge(scoped(feedback::router(), Scope::Feedback))
        .merge(scoped(records::read_router(), Scope::Read))
        .merge(scoped(records::delete_router(), Scope::Delete))
        // Any key may list the models it can name.
        .merge(models::router())
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_key,
        ));
    // vLLM's paths, outside `/v1`.
    let tokens = scoped(chat::tokenize::router(), Scope::Chat).route_layer(
        axum::middleware::from_fn_with_state(state.clone(), auth::require_key),
    );
    Router::new()
        .nest("/v1", api)
        .merge(tokens)
        .merge(health::router())
        .merge(metrics::router())
        .fallback(|| async {
            AppError::NotFound {
                message: "no such route".into(),
                code: "not_found",
            }
        })
        .layer(DefaultBodyLimit::max(state.config().max_body_bytes))
        .layer(
            TraceLayer::new_for_http().make_span_with(|req: &Request<_>| {
                let route = req
                    .extensions()
                    .get::<axum::extract::MatchedPath>()
                    .map(|p| p.as_str().to_string())
                    .unwrap_or_default();
                let id = req
                    .headers()
                    .get(&REQUEST_ID)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                tracing::info_span!("http", method = %req.method(), route, request_id = id)
            }),
        )
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .with_state(state)
}

/// Serves the API on `listener` until `shutdown` completes, then lets
/// in-flight requests finish.
/// Serves `app` (the [`router`], with whatever else the binary mounts
/// beside it, such as the admin dashboard) until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// How long clients are told to wait after a 429.
pub(crate) const RETRY_AFTER: Duration = Duration::from_secs(1);
