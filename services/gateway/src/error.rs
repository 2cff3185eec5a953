//! One error type for the HTTP API, rendered in OpenAI's shape:
//! `{"error": {"message", "type", "param", "code"}}`.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use schemars::JsonSchema;
use serde::Serialize;

/// Every error answer's body.
#[derive(Debug, Serialize, JsonSchema)]
#[schemars(rename = "Error")]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong, as OpenAI's API says it.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ErrorDetail {
    /// For people: what was wrong and, where it helps, what to do.
    pub message: String,
    /// `invalid_request_error`, `rate_limit_error` or `server_error`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The request field at fault, where one is.
    pub param: Option<String>,
    /// For programs: `invalid_api_key`, `model_not_found`, ...
    pub code: Option<&'static str>,
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<String>,
        code: Option<&'static str>,
    },
    #[error("{0}")]
    Unauthorized(String),
    /// The key is valid but lacks the scope this route needs.
    #[error("{0}")]
    Forbidden(String),
    #[error("{message}")]
    NotFound { message: String, code: &'static str },
    #[error("{0}")]
    Conflict(String),
    /// Data that can never be accepted as it is (a constraint refused it).
    #[error("{0}")]
    Unprocessable(String),
    #[error("the request body is larger than this server accepts")]
    PayloadTooLarge,
    #[error("the request body stopped arriving; send it whole")]
    RequestTimeout,
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("the server is at capacity; retry after {retry_after_s} s")]
    Overloaded { retry_after_s: u64 },
    /// The team's own rate limit (requests or tokens per minute).
    #[error("{message}")]
    RateLimited { message: String, retry_after_s: u64 },
    #[error("{0}")]
    Unavailable(String),
    /// Unavailable for a known while (an upstream's open circuit).
    #[error("{message}")]
    UnavailableFor { message: String, retry_after_s: u64 },
    /// The upstream serving the model failed.
    #[error("{0}")]
    BadGateway(String),
    /// The upstream serving the model did not answer in time.
    #[error("{0}")]
    GatewayTimeout(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl AppError {
    pub fn bad_request(message: impl Into<String>, param: Option<&str>) -> Self {
        Self::BadRequest {
            message: message.into(),
            param: param.map(str::to_string),
            code: None,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound { .. } => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Overloaded { .. } | Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) | Self::UnavailableFor { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::BadGateway(_) => StatusCode::BAD_GATEWAY,
            Self::GatewayTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::Overloaded { .. } | Self::RateLimited { .. } => "rate_limit_error",
            Self::Unavailable(_)
            | Self::UnavailableFor { .. }
            | Self::BadGateway(_)
            | Self::GatewayTimeout(_)
            | Self::Internal(_) => "server_error",
            _ => "invalid_request_error",
        }
    }

    fn code(&self) -> Option<&'static str> {
        match self {
            Self::BadRequest { code, .. } => *code,
            Self::Unauthorized(_) => Some("invalid_api_key"),
            Self::Forbidden(_) => Some("insufficient_permissions"),
            Self::NotFound { code, .. } => Some(code),
            Self::Conflict(_) => Some("conflict"),
            Self::Unprocessable(_) => Some("unprocessable"),
            Self::PayloadTooLarge => Some("request_too_large"),
            Self::RequestTimeout => Some("request_timeout"),
            Self::Overloaded { .. } | Self::RateLimited { .. } => Some("rate_limit_exceeded"),
            Self::Unavailable(_) | Self::UnavailableFor { .. } => Some("service_unavailable"),
            Self::BadGateway(_) => Some("upstream_error"),
            Self::GatewayTimeout(_) => Some("upstream_timeout"),
            _ => None,
        }
    }

    /// What clients are told.
    pub fn detail(&self) -> ErrorDetail {
        let message = match self {
            // Internals stay in the log, not in the response.
            Self::Internal(_) => "The server had an error while processing your request.".into(),
            other => other.to_string(),
        };
        let param = match self {
            Self::BadRequest { param, .. } => param.clone(),
            _ => None,
        };
        ErrorDetail {
            message,
            kind: self.kind(),
            param,
            code: self.code(),
        }
    }

    /// The error as the JSON object clients see (also used inside SSE streams).
    pub fn body(&self) -> serde_json::Value {
        serde_json::to_value(ErrorBody {
            error: self.detail(),
        })
        .expect("an error body serializes")
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        let mut resp = (status, axum::Json(self.body())).into_response();
        if let Self::Overloaded { retry_after_s }
        | Self::RateLimited { retry_after_s, .. }
        | Self::UnavailableFor { retry_after_s, .. } = self
        {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
        }
        resp
    }
}

/// An upstream's failure, as the client of the gateway should see it: the
/// request's own fault stays a 4xx, the upstream's is a 502 or 504, a
/// server Flywheel stopped calling a 503.
impl From<flywheel_upstream::UpstreamError> for AppError {
    fn from(e: flywheel_upstream::UpstreamError) -> Self {
        use flywheel_upstream::UpstreamError as U;
        match e {
            U::Status { status: 429, .. } => Self::Overloaded {
                retry_after_s: crate::RETRY_AFTER.as_secs(),
            },
            // Its message may quote the key it refused: not passed on.
            U::Status {
                status: status @ (401 | 403),
                ..
            } => Self::BadGateway(format!(
                "the upstream serving this model refused this server's credentials ({status})"
            )),
            // What the request asked for, refused: the client's to change.
            U::Status {
                status: 400 | 413 | 422,
                message,
            } => Self::BadRequest {
                message: format!("the upstream serving this model refused the request: {message}"),
                param: None,
                code: Some("upstream_rejected"),
            },
            // Anything else (404: a wrong URL or model name) is how the
            // upstream is set up, not the request.
            U::Timeout(_) => Self::GatewayTimeout(e.to_string()),
            U::CircuitOpen { retry_after } => Self::UnavailableFor {
                message: e.to_string(),
                retry_after_s: retry_after.as_secs().max(1),
            },
            U::MissingKey(_) => Self::Unavailable(e.to_string()),
            U::Status { .. } | U::Unreachable(_) | U::Protocol(_) => {
                Self::BadGateway(e.to_string())
            }
        }
    }
}

/// Store errors reach clients by their class, as on the dashboard
/// ([`flywheel_store::ErrorClass::status`]): not found 404, conflict 409,
/// refused 422, the database out of reach 503, anything else 500 with its
/// detail in the log only.
impl From<flywheel_store::StoreError> for AppError {
    fn from(e: flywheel_store::StoreError) -> Self {
        use flywheel_store::{ErrorClass, StoreError};
        match (e.class(), e) {
            (ErrorClass::NotFound, StoreError::NotFound(what)) => Self::NotFound {
                message: format!("{what} was not found."),
                code: "not_found",
            },
            (ErrorClass::NotFound, other) => Self::NotFound {
                message: other.to_string(),
                code: "not_found",
            },
            (ErrorClass::Conflict, StoreError::Conflict(why)) => Self::Conflict(why),
            (ErrorClass::Conflict, other) => Self::Conflict(match other.refusal() {
                Some(r) => r.message,
                None => other.to_string(),
            }),
            (ErrorClass::Refused, other) => Self::Unprocessable(match other.refusal() {
                Some(r) => format!("the database refused the data: {}", r.message),
                None => other.to_string(),
            }),
            (ErrorClass::Unreachable, other) => {
                tracing::error!(error = %other, "the database is unavailable");
                Self::Unavailable("the database is unavailable; try again shortly".into())
            }
            (ErrorClass::Internal, other) => Self::Internal(other.to_string()),
        }
    }
}

/// `Json` whose rejections are [`AppError`]s, so malformed bodies get the
/// same error shape as everything else.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    axum::Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Self(v)),
            Err(rejection) if timed_out(&rejection) => Err(AppError::RequestTimeout),
            Err(rejection) => Err(match rejection.status() {
                StatusCode::PAYLOAD_TOO_LARGE => AppError::PayloadTooLarge,
                StatusCode::UNSUPPORTED_MEDIA_TYPE => AppError::UnsupportedMediaType(
                    "expected a request with `Content-Type: application/json`".into(),
                ),
                _ => AppError::bad_request(
                    format!("could not parse the JSON body: {}", rejection.body_text()),
                    None,
                ),
            }),
        }
    }
}

/// Whether the body stopped arriving (the gateway's body timeout).
fn timed_out(rejection: &JsonRejection) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(rejection);
    while let Some(e) = cause {
        if e.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        cause = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use flywheel_store::StoreError;

    #[test]
    fn store_errors_keep_their_meaning_over_http() {
        let e = AppError::from(StoreError::NotFound("model version x".into()));
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            e.body()["error"]["message"],
            "model version x was not found."
        );
        let e = AppError::from(StoreError::Conflict("already running".into()));
        assert_eq!(e.status(), StatusCode::CONFLICT);
        assert_eq!(e.body()["error"]["code"], "conflict");
        // The database out of reach: 503, as on the dashboard.
        let e = AppError::from(StoreError::Db(sqlx_error()));
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        let e = AppError::from(StoreError::Db(flywheel_store::sqlx::Error::ColumnNotFound(
            "x".into(),
        )));
        assert_eq!(e.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!e.body().to_string().contains("ColumnNotFound"));
    }

    fn sqlx_error() -> flywheel_store::sqlx::Error {
        flywheel_store::sqlx::Error::PoolTimedOut
    }
}
