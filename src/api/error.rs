//! The HTTP layer's one error type and its one JSON shape:
//! `{"error": {"code", "message", "problems"?}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

/// A problem with one event of a request, by index.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct EventProblem {
    /// Position of the event in the request (0 for a single event).
    pub event_index: usize,
    /// The event's id when it carried one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    /// Dotted path of the field.
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

/// Everything a handler can answer besides success.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not JSON.
    #[error("malformed JSON at line {line}, column {column}: {message}")]
    MalformedJson {
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// The parser's description.
        message: String,
    },
    /// The body is JSON but not a request we understand.
    #[error("{0}")]
    BadRequest(String),
    /// Missing or wrong secret.
    #[error("missing or invalid secret or signature: send Authorization: Bearer <WEBHOOK_SECRET> (or X-Webhook-Secret / X-API-Key), or sign the body with it (X-Signature-256: sha256=<hex>, or Standard Webhooks headers)")]
    Unauthorized,
    /// Refused credentials, with the reason (a source's URL token, a stale or forged
    /// signature).
    #[error("{0}")]
    Refused(String),
    /// Body or event count over the limit.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// One or more events break Meta's rules; nothing was queued.
    #[error("{} problem(s) in the events; nothing was queued", .0.len())]
    Invalid(Vec<EventProblem>),
    /// Not allowed for this caller (a page's origin, a site key).
    #[error("{0}")]
    Forbidden(String),
    /// Too many requests; retry after this many seconds.
    #[error("too many requests; retry after {0} s")]
    RateLimited(u64),
    /// No such resource.
    #[error("{0}")]
    NotFound(String),
    /// Storage is down or overloaded; the caller should retry.
    #[error("temporarily unavailable, retry shortly")]
    Unavailable(String),
    /// Every connection is in use (HTTP_MAX_CONNECTIONS); the caller should retry.
    #[error("too many connections (HTTP_MAX_CONNECTIONS); retry shortly")]
    Overloaded,
    /// The request did not arrive in time.
    #[error("{0}")]
    RequestTimeout(String),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::MalformedJson { .. } | ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized | ApiError::Refused(_) => StatusCode::UNAUTHORIZED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) | ApiError::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ApiError::MalformedJson { .. } => "malformed_json",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized | ApiError::Refused(_) => "unauthorized",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::Invalid(_) => "invalid_events",
            ApiError::NotFound(_) => "not_found",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::RateLimited(_) => "rate_limited",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Overloaded => "overloaded",
            ApiError::RequestTimeout(_) => "request_timeout",
        }
    }
}

/// Every error answer's body (also the OpenAPI schema of it).
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize, utoipa::ToSchema)]
struct ErrorDetail<'a> {
    /// `malformed_json`, `bad_request`, `unauthorized`, `payload_too_large`,
    /// `invalid_events`, `not_found`, `forbidden`, `rate_limited`, `unavailable`, `overloaded`
    /// or `request_timeout`.
    code: &'static str,
    /// What is wrong and what to do, for people.
    message: String,
    /// With `invalid_events`: every problem, by event index and field (never the value).
    #[serde(skip_serializing_if = "Option::is_none")]
    problems: Option<&'a [EventProblem]>,
    /// With `malformed_json`: 1-based line of the syntax error.
    #[serde(skip_serializing_if = "Option::is_none")]
    line: Option<usize>,
    /// With `malformed_json`: 1-based column of the syntax error.
    #[serde(skip_serializing_if = "Option::is_none")]
    column: Option<usize>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Unavailable(detail) = &self {
            // The detail is a storage error: codes and paths, never request data.
            tracing::error!(error = %detail, "request failed: storage unavailable");
        }
        let (line, column) = match &self {
            ApiError::MalformedJson { line, column, .. } => (Some(*line), Some(*column)),
            _ => (None, None),
        };
        let problems = match &self {
            ApiError::Invalid(problems) => Some(problems.as_slice()),
            _ => None,
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message: self.to_string(),
                problems,
                line,
                column,
            },
        };
        let mut response = (self.status(), Json(&body)).into_response();
        if matches!(self, ApiError::Unavailable(_) | ApiError::Overloaded) {
            response
                .headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("1"));
        }
        if let ApiError::RateLimited(seconds) = &self {
            if let Ok(value) = axum::http::HeaderValue::from_str(&seconds.to_string()) {
                response.headers_mut().insert("retry-after", value);
            }
        }
        if matches!(self, ApiError::Unauthorized) {
            response.headers_mut().insert(
                "www-authenticate",
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(err: crate::store::StoreError) -> Self {
        ApiError::Unavailable(err.to_string())
    }
}
