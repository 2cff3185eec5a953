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
mod meters;
mod metrics;
mod models;
pub mod openapi;
mod records;
pub mod serving;
mod stalled;
mod state;
mod trace;

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
    let routes = Router::new()
        .nest("/v1", api)
        .merge(tokens)
        .merge(health::router())
        .merge(metrics::router())
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            observe_route,
        ))
        .fallback(|| async {
            AppError::NotFound {
                message: "no such route".into(),
                code: "not_found",
            }
        })
        .layer(DefaultBodyLimit::max(state.config().max_body_bytes))
        .layer(axum::middleware::map_request_with_state(
            state.config().timeouts.body_read,
            body_timeout,
        ));
    with_access_log(routes)
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .with_state(state)
}

/// The access log: a line per request at `info` when its answer starts
/// (`finished processing request`, with its status and latency in ms), in
/// a span that names the method, the route (its pattern, never the raw
/// path), the team, the request id and the trace id. Never a body, a key or
/// a password. Exported as a trace, the span is the request's server span
/// (`POST /v1/chat/completions`), a child of the caller's `traceparent`.
fn with_access_log(router: Router<AppState>) -> Router<AppState> {
    let layer = TraceLayer::new_for_http()
        .make_span_with(|req: &Request<_>| {
            let id = req
                .headers()
                .get(&REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let span = tracing::info_span!(
                "http",
                method = %req.method(),
                route = tracing::field::Empty,
                team = tracing::field::Empty,
                request_id = %id,
                trace_id = tracing::field::Empty,
                "otel.kind" = "server",
            );
            trace::join_caller(&span, req.headers());
            // HTTP's semantic conventions, on the exported span only (the
            // access line has them as `method`, `route` and `status`).
            trace::rename(&span, req.method().to_string());
            trace::set(&span, "http.request.method", req.method().to_string());
            if let Some(trace) = trace::trace_id(&span, req.headers()) {
                span.record("trace_id", tracing::field::display(trace));
            }
            span
        })
        .on_response(
            |resp: &axum::http::Response<_>, latency: Duration, span: &tracing::Span| {
                trace::set(
                    span,
                    "http.response.status_code",
                    i64::from(resp.status().as_u16()),
                );
                use tower_http::trace::OnResponse;
                tower_http::trace::DefaultOnResponse::new()
                    .level(tracing::Level::INFO)
                    .latency_unit(tower_http::LatencyUnit::Millis)
                    .on_response(resp, latency, span)
            },
        )
        // A server error is logged where it happens, with its detail.
        .on_failure(());
    router.layer(layer)
}

/// The route's pattern (`/v1/models/{name}`), on the access log line, and
/// the request's time to its answer's headers in `/metrics`.
async fn observe_route(
    axum::extract::State(state): axum::extract::State<AppState>,
    path: axum::extract::MatchedPath,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let span = tracing::Span::current();
    span.record("route", tracing::field::display(path.as_str()));
    trace::set(&span, "http.route", path.as_str().to_string());
    trace::rename(&span, format!("{} {}", req.method(), path.as_str()));
    let started = std::time::Instant::now();
    let method = req.method().clone();
    let resp = next.run(req).await;
    state.meters().observe_http(
        method.as_str(),
        path.as_str(),
        resp.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    resp
}

/// How long the server waits on a client before it gives up on it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timeouts {
    /// For a request's headers, from the first byte of the connection or
    /// from the end of the previous response on a kept-alive one: a client
    /// that dribbles its headers (slowloris) or a connection left idle is
    /// closed.
    pub header_read: Duration,
    /// Between two pieces of a request body: a body that stops arriving is
    /// answered 408.
    pub body_read: Duration,
    /// For a client to take the next bytes of a response: one that stops
    /// reading (a stream it no longer drains) is disconnected, and a
    /// stream's completion recorded as cancelled with what was generated,
    /// instead of waiting for it forever.
    pub response_write: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            header_read: Duration::from_secs(30),
            body_read: Duration::from_secs(30),
            response_write: Duration::from_secs(30),
        }
    }
}

/// Serves `app` (the [`router`], with whatever else the binary mounts
/// beside it, such as the admin dashboard) on `listener` until `shutdown`
/// completes, then lets in-flight requests finish. HTTP/1.1 through hyper
/// directly rather than `axum::serve`, which sets no timer and so never
/// times out a client's headers.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    timeouts: Timeouts,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    let (closing, closing_rx) = tokio::sync::watch::channel(());
    // Each connection holds a sender; all dropped: every connection ended.
    let (open, mut all_closed) = tokio::sync::mpsc::channel::<()>(1);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, or a connection reset while
                    // queued: wait a moment rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let (mut closing, open) = (closing_rx.clone(), open.clone());
        tokio::spawn(async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(timeouts.header_read);
            let conn = http
                .serve_connection(
                    TokioIo::new(stalled::WriteDeadline::new(stream, timeouts.response_write)),
                    service,
                )
                .with_upgrades();
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                done = conn.as_mut() => {
                    if let Err(e) = done {
                        tracing::debug!(error = %e, "connection ended");
                    }
                }
                _ = closing.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            drop(open);
        });
    }
    drop(listener);
    let _ = closing.send(());
    drop(open);
    let _ = all_closed.recv().await;
    Ok(())
}

/// A request whose body must keep arriving: at most `limit` between two
/// pieces (the handler reading it gets an error, answered 408).
async fn body_timeout(
    axum::extract::State(limit): axum::extract::State<Duration>,
    req: Request<axum::body::Body>,
) -> Request<axum::body::Body> {
    req.map(|body| axum::body::Body::new(tower_http::timeout::TimeoutBody::new(limit, body)))
}

/// How long clients are told to wait after a 429.
pub(crate) const RETRY_AFTER: Duration = Duration::from_secs(1);
