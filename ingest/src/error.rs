//! [`ApiError`]: the one place DESIGN.md's status table lives. Bodies are
//! `{"error": "<code>", "message": "..."}` and never echo secrets, signatures
//! or internal error text. `IntoResponse` does not log; the handler does.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::verify::VerifyError;

/// Every non-2xx answer of ingest.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Signature verification failed.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// No `[[source]]` has this name.
    #[error("unknown source")]
    UnknownSource,
    /// Path exists, method does not.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// No such route.
    #[error("not found")]
    NotFound,
    /// Body over `server.max_body_bytes`.
    #[error("body too large")]
    BodyTooLarge { limit: usize },
    /// The client stopped sending or sent a broken body.
    #[error("could not read the request body")]
    BodyRead,
    /// Over `server.max_in_flight`.
    #[error("too many requests in flight")]
    TooManyRequests { retry_after_secs: u64 },
    /// Kafka did not acknowledge in time or is unreachable.
    #[error("event could not be stored")]
    Unavailable { retry_after_secs: u64 },
}

impl ApiError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Verify(VerifyError::MissingHeader(_) | VerifyError::Malformed(_)) => {
                StatusCode::BAD_REQUEST
            }
            Self::Verify(VerifyError::BadSignature | VerifyError::Timestamp) => {
                StatusCode::FORBIDDEN
            }
            Self::UnknownSource | Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyRead => StatusCode::BAD_REQUEST,
            Self::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Stable snake_case code for clients and metric labels.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Verify(VerifyError::MissingHeader(_)) => "missing_header",
            Self::Verify(VerifyError::Malformed(_)) => "malformed_header",
            Self::Verify(VerifyError::BadSignature) => "invalid_signature",
            Self::Verify(VerifyError::Timestamp) => "timestamp_out_of_tolerance",
            Self::UnknownSource => "unknown_source",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::BodyTooLarge { .. } => "body_too_large",
            Self::BodyRead => "body_unreadable",
            Self::TooManyRequests { .. } => "too_many_requests",
            Self::Unavailable { .. } => "kafka_unavailable",
        }
    }

    fn message(&self) -> String {
        match self {
            // Header *names* only; values are never echoed.
            Self::Verify(e) => e.to_string(),
            Self::BodyTooLarge { limit } => format!("body exceeds {limit} bytes"),
            Self::TooManyRequests { .. } => "too many requests in flight; retry later".into(),
            Self::Unavailable { .. } => "the event was not stored; retry later".into(),
            other => other.to_string(),
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            Self::TooManyRequests { retry_after_secs } | Self::Unavailable { retry_after_secs } => {
                Some(*retry_after_secs)
            }
            _ => None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status(),
            Json(json!({"error": self.code(), "message": self.message()})),
        )
            .into_response();
        if let Some(secs) = self.retry_after() {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}
