//! What every page shares: the header (who is signed in, the navigation,
//! the sign-out form with its CSRF token) and small formatting helpers for
//! templates.

use chrono::{DateTime, Utc};

use crate::auth::Signed;

/// The frame around every signed-in page.
pub struct Chrome {
    pub username: String,
    pub role: String,
    pub is_admin: bool,
    pub csrf: String,
    /// Which navigation entry is the current page.
    pub active: &'static str,
}

impl Chrome {
    pub fn new(s: &Signed, active: &'static str) -> Self {
        Self {
            username: s.session.username.clone(),
            role: s.session.role.clone(),
            is_admin: s.is_admin(),
            csrf: s.session.csrf_token.clone(),
            active,
        }
    }

    /// The navigation, with the current page marked.
    pub fn nav(&self) -> Vec<NavItem> {
        [
            ("/admin", "Overview", "overview"),
            ("/admin/completions", "Completions", "completions"),
            ("/admin/datasets", "Datasets", "datasets"),
            ("/admin/runs", "Training runs", "runs"),
            ("/admin/evaluations", "Evaluations", "evaluations"),
            ("/admin/models", "Models", "models"),
            ("/admin/decisions", "Audit log", "decisions"),
            ("/admin/teams", "Teams and keys", "teams"),
        ]
        .into_iter()
        .map(|(path, label, key)| NavItem {
            path,
            label,
            current: key == self.active,
        })
        .collect()
    }
}

pub struct NavItem {
    pub path: &'static str,
    pub label: &'static str,
    pub current: bool,
}

pub fn when(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

pub fn maybe_when(t: &Option<DateTime<Utc>>) -> String {
    t.as_ref().map_or_else(|| "-".into(), when)
}

pub fn short(id: &uuid::Uuid) -> String {
    id.to_string()[..8].to_string()
}

pub fn rate(up: i64, votes: i64) -> String {
    if votes == 0 {
        "-".into()
    } else {
        format!("{:.0}%", 100.0 * up as f64 / votes as f64)
    }
}

/// `?done=...`: what the action before the redirect did.
#[derive(serde::Deserialize)]
pub struct DoneQuery {
    pub done: Option<String>,
}

/// What a JSON action did.
#[derive(serde::Serialize, schemars::JsonSchema)]
pub struct Outcome {
    pub done: String,
}

/// The CSRF token of a JSON call.
pub fn header_csrf(h: &axum::http::HeaderMap) -> Option<&str> {
    h.get("x-csrf-token").and_then(|v| v.to_str().ok())
}
