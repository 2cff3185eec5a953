//! Bearer-key authentication: every `/v1` request acts for the team that
//! owns its key. Keys Postgres confirmed are trusted for a while without
//! asking again, but only while the gateway is listening for revocations,
//! which clear that trust the moment they commit. Keys confirmed earlier
//! keep working while Postgres is unreachable.
//!
//! A key opens only the routes its scopes name ([`require`]): a key that
//! only sends votes cannot read the log or delete a user's data. Keys are
//! looked up by their SHA-256, never compared as secrets, and never logged.

use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;

use flywheel_store::keys::{Principal, Scope, scope_list};

use crate::{AppError, AppState};

const DB_WAIT: Duration = Duration::from_millis(800);

pub async fn require_key(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Result<Response, AppError> {
    let key = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        // The scheme is case-insensitive (RFC 9110, section 11.1).
        .and_then(|v| v.trim_start().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key.trim())
        .filter(|k| !k.is_empty())
        .ok_or_else(|| {
            AppError::Unauthorized(
                "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.".into(),
            )
        })?;
    let hash = flywheel_store::keys::hash_key(key);
    if let Some(principal) = state.fresh_principal(&hash) {
        log_team(&principal);
        req.extensions_mut().insert(principal);
        return Ok(next.run(req).await);
    }
    let looked_up = if state.journal().database_ok() || state.cached_principal(&hash).is_none() {
        tokio::time::timeout(
            DB_WAIT,
            flywheel_store::keys::authenticate(state.pool(), key),
        )
        .await
        .ok()
        .and_then(Result::ok)
    } else {
        None
    };
    let principal = match looked_up {
        Some(found) => {
            state.remember_principal(hash, found.as_ref());
            found.ok_or_else(|| {
                AppError::Unauthorized("Incorrect or revoked API key provided.".into())
            })?
        }
        None => state.cached_principal(&hash).ok_or_else(|| {
            AppError::Unavailable(
                "the database is unreachable and this key has not been seen yet; retry shortly"
                    .into(),
            )
        })?,
    };
    log_team(&principal);
    req.extensions_mut().insert(principal);
    Ok(next.run(req).await)
}

/// The team, on the request's access log line.
fn log_team(principal: &Principal) {
    tracing::Span::current().record("team", tracing::field::display(&principal.team_name));
}

/// Refuses (403) a request whose key lacks `scope`; runs after
/// [`require_key`], which put the key's principal on the request.
pub async fn require(scope: Scope, req: Request, next: Next) -> Result<Response, AppError> {
    let principal = req
        .extensions()
        .get::<Principal>()
        .ok_or_else(|| AppError::Internal("a scoped route without a key".into()))?;
    if !principal.may(scope) {
        return Err(AppError::Forbidden(format!(
            "This API key lacks the `{}` scope ({}); it has: {}. An admin can give it \
             with `flywheel keys scopes <prefix> {},{}` or on the dashboard's Teams page.",
            scope.as_str(),
            scope.opens(),
            scope_list(&principal.scopes),
            scope_list(&principal.scopes),
            scope.as_str(),
        )));
    }
    Ok(next.run(req).await)
}
