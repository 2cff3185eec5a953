//! What goes wrong in the dashboard: a page with the message and its
//! status, or (for `/admin/api`) the OpenAI-shaped JSON body the rest of
//! the API uses.

use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use flywheel_store::ErrorClass;
use serde_json::json;

/// A JSON body of the admin API; one that cannot be read (not JSON, the
/// wrong content type, a field missing) is answered in the API's error
/// shape with the status axum gives it, never as plain text.
pub struct ApiJson<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequest<S> for ApiJson<T> {
    type Rejection = AdminError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, AdminError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Self(v)),
            Err(e) => Err(AdminError::new(e.status(), e.body_text()).api()),
        }
    }
}

/// A path parameter of the admin API, answered in its error shape when it
/// does not parse (a run id that is no UUID).
pub struct ApiPath<T>(pub T);

impl<T: serde::de::DeserializeOwned + Send, S: Send + Sync> axum::extract::FromRequestParts<S>
    for ApiPath<T>
{
    type Rejection = AdminError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, AdminError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Self(v)),
            Err(e) => Err(AdminError::new(e.status(), e.body_text()).api()),
        }
    }
}

/// The page an error is shown on.
#[derive(askama::Template)]
#[template(path = "error.html")]
pub struct ErrorPage<'a> {
    pub status: u16,
    pub reason: &'a str,
    pub message: &'a str,
}

#[derive(Debug)]
pub struct AdminError {
    pub status: StatusCode,
    pub message: String,
    /// Rendered as JSON rather than as a page.
    pub api: bool,
}

impl AdminError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            api: false,
        }
    }
    pub fn bad_request(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, m)
    }
    pub fn unauthorized() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "sign in first")
    }
    pub fn forbidden(m: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, m)
    }
    pub fn conflict(m: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, m)
    }
    /// The same error, as JSON.
    pub fn api(mut self) -> Self {
        self.api = true;
        self
    }
    /// An error of a part below, answered as its class says
    /// ([`ErrorClass::status`], the same mapping the API uses): its message
    /// for what the asker can act on (not found, conflict, refused), a
    /// generic one for an outage or a bug, whose detail is logged instead.
    pub fn classified(class: ErrorClass, message: impl std::fmt::Display) -> Self {
        let status =
            StatusCode::from_u16(class.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        match class {
            ErrorClass::NotFound | ErrorClass::Conflict | ErrorClass::Refused => {
                Self::new(status, message.to_string())
            }
            ErrorClass::Unreachable => {
                tracing::error!(error = %message, "the database is unavailable");
                Self::new(status, "the database is unavailable; try again shortly")
            }
            ErrorClass::Internal => {
                tracing::error!(error = %message, "admin request failed");
                Self::new(status, "the server had an error; it is in the server's log")
            }
        }
    }
}

impl From<flywheel_store::StoreError> for AdminError {
    fn from(e: flywheel_store::StoreError) -> Self {
        Self::classified(e.class(), e)
    }
}

impl From<flywheel_loop::LoopError> for AdminError {
    fn from(e: flywheel_loop::LoopError) -> Self {
        Self::classified(e.class(), e)
    }
}

impl From<askama::Error> for AdminError {
    fn from(e: askama::Error) -> Self {
        tracing::error!(error = %e, "template failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the page could not be drawn",
        )
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        if self.api {
            let kind = if self.status.is_server_error() {
                "server_error"
            } else {
                "invalid_request_error"
            };
            let body = json!({"error": {
                "message": self.message, "type": kind, "param": null,
                "code": self.status.canonical_reason().map(|r| r.to_lowercase().replace(' ', "_")),
            }});
            return (self.status, axum::Json(body)).into_response();
        }
        let page = ErrorPage {
            status: self.status.as_u16(),
            reason: self.status.canonical_reason().unwrap_or("error"),
            message: &self.message,
        };
        match askama::Template::render(&page) {
            Ok(html) => (self.status, Html(html)).into_response(),
            Err(_) => (self.status, self.message).into_response(),
        }
    }
}
