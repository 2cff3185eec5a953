//! Bearer-key authentication: every `/v1` request acts for the team that
//! owns its key.

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;

use crate::{AppError, AppState};

pub async fn require_key(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Result<Response, AppError> {
    let key = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .ok_or_else(|| {
            AppError::Unauthorized(
                "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.".into(),
            )
        })?;
    let principal = flywheel_store::keys::authenticate(state.pool(), key)
        .await?
        .ok_or_else(|| AppError::Unauthorized("Incorrect or revoked API key provided.".into()))?;
    req.extensions_mut().insert(principal);
    Ok(next.run(req).await)
}
