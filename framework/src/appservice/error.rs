//! Matrix errors of the application-service API, mapped to status codes and errcodes in this one
//! place. Every error body is `{"errcode": …, "error": …}`.

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};

/// An error answered to the homeserver.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// No token was given.
    #[error("missing access token")]
    MissingToken,
    /// The token is wrong, or the header and query token disagree.
    #[error("{0}")]
    Forbidden(&'static str),
    /// The body is not JSON.
    #[error("request body is not valid JSON: {0}")]
    NotJson(String),
    /// The body is JSON of the wrong shape.
    #[error("request body has the wrong shape: {0}")]
    BadJson(String),
    /// A parameter is missing or invalid.
    #[error("{0}")]
    InvalidParam(String),
    /// The body is larger than allowed.
    #[error("request body is larger than {0} bytes")]
    TooLarge(usize),
    /// The queried thing does not exist.
    #[error("{0}")]
    NotFound(String),
    /// No such endpoint.
    #[error("unrecognized request")]
    UnknownEndpoint,
    /// The endpoint exists but not for this method.
    #[error("method not allowed on this endpoint")]
    MethodNotAllowed,
    /// The bridge is overloaded; the homeserver should retry later.
    #[error("{0}")]
    Busy(String),
    /// Something failed on our side (details are logged, not sent).
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status and Matrix errcode of this error.
    pub fn status_and_errcode(&self) -> (StatusCode, &'static str) {
        match self {
            Self::MissingToken => (StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN"),
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, "M_FORBIDDEN"),
            Self::NotJson(_) => (StatusCode::BAD_REQUEST, "M_NOT_JSON"),
            Self::BadJson(_) => (StatusCode::BAD_REQUEST, "M_BAD_JSON"),
            Self::InvalidParam(_) => (StatusCode::BAD_REQUEST, "M_INVALID_PARAM"),
            Self::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "M_NOT_FOUND"),
            Self::UnknownEndpoint => (StatusCode::NOT_FOUND, "M_UNRECOGNIZED"),
            Self::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "M_UNRECOGNIZED"),
            Self::Busy(_) => (StatusCode::SERVICE_UNAVAILABLE, "M_LIMIT_EXCEEDED"),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "M_UNKNOWN"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, errcode) = self.status_and_errcode();
        let message = match &self {
            // Internal details go to the log, not to the peer.
            Self::Internal(detail) => {
                tracing::error!(%detail, "internal error answering the homeserver");
                "internal error".to_owned()
            }
            other => other.to_string(),
        };
        let mut body = serde_json::json!({ "errcode": errcode, "error": message });
        if matches!(self, Self::Busy(_)) {
            body["retry_after_ms"] = serde_json::json!(1000);
        }
        (status, Json(body)).into_response()
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        Self::Internal(e.to_string())
    }
}
