//! The admin dashboard: askama pages under `/admin` for the people who run
//! Flywheel (is each model version better than the last? promote, start a
//! canary, roll back), and the same actions as JSON under `/admin/api`.
//! Templates and the stylesheet live in `web/` and are compiled into the
//! binary; there is no JavaScript.

mod auth;
mod chart;
mod completions;
mod cycles;
mod datasets;
mod error;
mod evaluations;
mod models;
pub mod openapi;
mod overview;
mod pages;
mod runs;
mod teams;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use flywheel_store::PgPool;

pub use auth::hash_password;
pub use error::AdminError;

/// The dashboard's settings (`[admin]` in the config file).
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Bad passwords in a row before an account locks.
    pub max_failed_logins: i32,
    /// The first lock's length; each further bad password doubles it.
    pub lock_seconds: f64,
    /// How long a session lasts.
    pub session_hours: f64,
    /// Mark the cookie Secure even without `X-Forwarded-Proto: https`.
    pub secure_cookies: bool,
    /// A canary started from the dashboard: the share of users it serves
    /// and its deadline.
    pub canary_share: f64,
    pub canary_deadline_hours: f64,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            max_failed_logins: 5,
            lock_seconds: 300.0,
            session_hours: 12.0,
            secure_cookies: false,
            canary_share: 0.1,
            canary_deadline_hours: 24.0,
        }
    }
}

/// What the process that serves the dashboard knows about its own health
/// (the gateway's journal: records waiting, stored, set aside), as
/// labelled values for the overview.
pub type Health = std::sync::Arc<dyn Fn() -> Vec<(&'static str, String)> + Send + Sync>;

#[derive(Clone)]
pub struct AdminState {
    pub pool: PgPool,
    pub config: AdminConfig,
    pub health: Option<Health>,
}

const STYLESHEET: &str = include_str!("../../../web/static/admin.css");

async fn stylesheet() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        STYLESHEET,
    )
}

/// Every dashboard route, for merging into the gateway's router.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/admin/login", get(auth::login_page).post(auth::login))
        .route("/admin/logout", post(auth::logout))
        .route("/admin/static/admin.css", get(stylesheet))
        .route("/admin", get(overview::page))
        .route("/admin/completions", get(completions::list))
        .route("/admin/completions/{id}", get(completions::one))
        .route("/admin/models", get(models::page))
        .route("/admin/models/promote", post(models::promote_form))
        .route("/admin/models/canary", post(models::canary_form))
        .route("/admin/models/rollback", post(models::rollback_form))
        .route("/admin/decisions", get(models::decisions))
        .route("/admin/evaluations", get(evaluations::list))
        .route("/admin/evaluations/{id}", get(evaluations::one))
        .route("/admin/datasets", get(datasets::list))
        .route("/admin/datasets/{id}", get(datasets::one))
        .route("/admin/datasets/{id}/export", get(datasets::export))
        .route("/admin/cycles/{id}", get(cycles::one))
        .route("/admin/runs", get(runs::list))
        .route("/admin/runs/{id}", get(runs::one))
        .route("/admin/runs/{id}/cancel", post(runs::cancel))
        .route("/admin/teams", get(teams::page))
        .route("/admin/teams/keys", post(teams::create_key))
        .route("/admin/teams/keys/revoke", post(teams::revoke_key))
        .route("/admin/teams/settings", post(teams::settings))
        .route("/admin/teams/keys/scopes", post(teams::scopes_form))
        .route("/admin/teams/limits", post(teams::limits_form))
        .route("/admin/api/overview", get(overview::api))
        .route("/admin/api/promote", post(models::promote_api))
        .route("/admin/api/canary", post(models::canary_api))
        .route("/admin/api/rollback", post(models::rollback_api))
        .route("/admin/api/decisions", get(models::decisions_api))
        .route("/admin/api/runs/{id}/cancel", post(runs::cancel_api))
        .route("/admin/api/keys", post(teams::create_key_api))
        .route("/admin/api/keys/revoke", post(teams::revoke_key_api))
        .route("/admin/api/teams/settings", post(teams::settings_api))
        .route("/admin/api/keys/scopes", post(teams::scopes_api))
        .route("/admin/api/teams/limits", post(teams::limits_api))
        .layer(axum::middleware::map_response(no_store))
        .layer(axum::middleware::from_fn(server_timing))
        .with_state(state)
}

/// `Server-Timing: app;dur=<ms>` on every response: the time the page took
/// on the server (what `scripts/bench-dashboard.sh` reports).
async fn server_timing(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let t = std::time::Instant::now();
    let mut resp = next.run(req).await;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    if let Ok(v) = format!("app;dur={ms:.1}").parse() {
        resp.headers_mut().insert("server-timing", v);
    }
    resp
}

/// Pages carry live data and per-session tokens: never cached, never
/// framed.
async fn no_store(mut resp: axum::response::Response) -> axum::response::Response {
    let h = resp.headers_mut();
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, "no-store".parse().expect("static"));
    }
    h.insert(header::X_FRAME_OPTIONS, "DENY".parse().expect("static"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'"
            .parse()
            .expect("static"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        "nosniff".parse().expect("static"),
    );
    resp
}
