//! Errors produced by the homeserver client, and their retry classification.

use std::time::Duration;

use http::StatusCode;

/// An error from the [`ClientCache`](super::ClientCache) backing the client.
///
/// Stores wrap their own error type with [`CacheError::new`].
#[derive(Debug, thiserror::Error)]
#[error("client cache error: {0}")]
pub struct CacheError(#[source] pub Box<dyn std::error::Error + Send + Sync + 'static>);

impl CacheError {
    /// Wraps any error (or a message string) as a cache error.
    pub fn new(err: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Self {
        Self(err.into())
    }
}

/// How a failed request may be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryKind {
    /// A temporary failure (5xx, timeout, network). The optional delay is a
    /// server-given hint (`Retry-After` on a 5xx); otherwise back off.
    Transient(Option<Duration>),
    /// The server rate-limited us (`429 M_LIMIT_EXCEEDED`) and asked us to wait
    /// this long before retrying.
    RateLimited(Duration),
    /// Retrying the same request will not help (4xx other than 429, decode errors,
    /// invalid input, cache failures).
    Permanent,
}

/// An error from a request to the homeserver.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The homeserver answered with a non-success status.
    #[error("homeserver returned {status}{}: {error}", errcode.as_deref().map(|c| format!(" {c}")).unwrap_or_default())]
    Matrix {
        /// HTTP status code.
        status: StatusCode,
        /// The Matrix `errcode` (e.g. `M_FORBIDDEN`), if the body was a Matrix error.
        errcode: Option<String>,
        /// The `error` message, or the (truncated) raw body when it was not JSON.
        error: String,
        /// How long the server asked us to wait (`Retry-After` header, else `retry_after_ms`).
        retry_after: Option<Duration>,
    },
    /// The connection failed (refused, reset, TLS, DNS, body stream error).
    #[error("network error talking to the homeserver: {0}")]
    Network(#[source] reqwest::Error),
    /// The request did not complete within the configured timeout.
    #[error("request to the homeserver timed out")]
    Timeout,
    /// The homeserver's success response could not be decoded.
    #[error("could not decode homeserver response for {endpoint}: {message}")]
    Decode {
        /// Endpoint template of the request.
        endpoint: &'static str,
        /// What went wrong.
        message: String,
    },
    /// The client cache failed.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// An argument (id, mxc URI, header value, …) was malformed; nothing was sent.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A response body exceeded the configured size limit.
    #[error("response body too large (more than {limit} bytes)")]
    TooLarge {
        /// The limit that was exceeded, in bytes.
        limit: u64,
    },
    /// The client could not be constructed (HTTP client or metrics registration).
    #[error("client setup failed: {0}")]
    Setup(String),
    /// The operation was cancelled by a shutdown signal.
    #[error("cancelled by shutdown")]
    Cancelled,
}

impl ClientError {
    /// Classifies the error for retry purposes.
    ///
    /// 429 `M_LIMIT_EXCEEDED` (or any 429) with a delay is [`RetryKind::RateLimited`];
    /// a 429 without any delay, 5xx, timeouts and network errors are
    /// [`RetryKind::Transient`]; everything else is [`RetryKind::Permanent`].
    pub fn retry_kind(&self) -> RetryKind {
        match self {
            Self::Matrix { status, retry_after, .. } => {
                if *status == StatusCode::TOO_MANY_REQUESTS {
                    match retry_after {
                        Some(d) => RetryKind::RateLimited(*d),
                        None => RetryKind::Transient(None),
                    }
                } else if status.is_server_error() {
                    RetryKind::Transient(*retry_after)
                } else {
                    RetryKind::Permanent
                }
            }
            Self::Network(_) | Self::Timeout => RetryKind::Transient(None),
            Self::Decode { .. }
            | Self::Cache(_)
            | Self::InvalidInput(_)
            | Self::TooLarge { .. }
            | Self::Setup(_)
            | Self::Cancelled => RetryKind::Permanent,
        }
    }

    /// True if this is a Matrix error with exactly this `errcode`.
    pub fn is_errcode(&self, code: &str) -> bool {
        matches!(self, Self::Matrix { errcode: Some(c), .. } if c == code)
    }

    /// The HTTP status, if the homeserver answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Matrix { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Short low-cardinality label used for metrics (`outcome` / `reason`).
    pub(crate) fn metric_label(&self) -> &'static str {
        match self {
            Self::Matrix { status, .. } if *status == StatusCode::TOO_MANY_REQUESTS => {
                "rate_limited"
            }
            Self::Matrix { status, .. } if status.is_server_error() => "server_error",
            Self::Matrix { .. } => "client_error",
            Self::Network(_) => "network",
            Self::Timeout => "timeout",
            Self::Decode { .. } => "decode",
            Self::TooLarge { .. } => "too_large",
            Self::Cache(_) | Self::InvalidInput(_) | Self::Setup(_) | Self::Cancelled => "other",
        }
    }

    /// Builds a [`ClientError::Matrix`] from a non-success response.
    pub(crate) fn from_response(
        status: StatusCode,
        headers: &http::HeaderMap,
        body: &[u8],
    ) -> Self {
        let header_delay = headers
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let json: Option<serde_json::Value> = serde_json::from_slice(body).ok();
        let (errcode, error, body_delay) = match json.as_ref().and_then(|v| v.as_object()) {
            Some(obj) if obj.get("errcode").and_then(|c| c.as_str()).is_some() => {
                let errcode = obj.get("errcode").and_then(|c| c.as_str()).map(str::to_owned);
                let error =
                    obj.get("error").and_then(|e| e.as_str()).unwrap_or_default().to_owned();
                let delay =
                    obj.get("retry_after_ms").and_then(|v| v.as_u64()).map(Duration::from_millis);
                (errcode, error, delay)
            }
            _ => (None, truncate_body(body), None),
        };
        Self::Matrix { status, errcode, error, retry_after: header_delay.or(body_delay) }
    }

    /// Maps a transport error from reqwest.
    pub(crate) fn from_reqwest(err: reqwest::Error) -> Self {
        if err.is_timeout() { Self::Timeout } else { Self::Network(err) }
    }
}

/// Parses a `Retry-After` header value given in seconds. HTTP dates are
/// ignored (we fall back to `retry_after_ms`).
fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    value
        .parse::<f64>()
        .ok()
        .filter(|f| f.is_finite() && *f >= 0.0 && *f < 1e9)
        .map(Duration::from_secs_f64)
}

/// Keeps at most 1 KiB of a non-JSON error body, lossily decoded.
fn truncate_body(body: &[u8]) -> String {
    const MAX: usize = 1024;
    let slice = &body[..body.len().min(MAX)];
    let mut s = String::from_utf8_lossy(slice).into_owned();
    if body.len() > MAX {
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(retry_after: Option<&str>) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        if let Some(v) = retry_after {
            h.insert(
                http::header::RETRY_AFTER,
                http::HeaderValue::from_str(v).expect("valid header"),
            );
        }
        h
    }

    #[test]
    fn rate_limit_prefers_header_over_body() {
        let body = br#"{"errcode":"M_LIMIT_EXCEEDED","error":"slow down","retry_after_ms":50}"#;
        let err =
            ClientError::from_response(StatusCode::TOO_MANY_REQUESTS, &headers(Some("2")), body);
        assert_eq!(err.retry_kind(), RetryKind::RateLimited(Duration::from_secs(2)));
        assert!(err.is_errcode("M_LIMIT_EXCEEDED"));
        let err = ClientError::from_response(StatusCode::TOO_MANY_REQUESTS, &headers(None), body);
        assert_eq!(err.retry_kind(), RetryKind::RateLimited(Duration::from_millis(50)));
    }

    #[test]
    fn classification() {
        let e = ClientError::from_response(
            StatusCode::BAD_GATEWAY,
            &headers(None),
            b"<html>oops</html>",
        );
        assert_eq!(e.retry_kind(), RetryKind::Transient(None));
        match &e {
            ClientError::Matrix { errcode, error, .. } => {
                assert!(errcode.is_none());
                assert_eq!(error, "<html>oops</html>");
            }
            other => panic!("unexpected {other:?}"),
        }
        let e = ClientError::from_response(
            StatusCode::FORBIDDEN,
            &headers(None),
            br#"{"errcode":"M_FORBIDDEN","error":"no"}"#,
        );
        assert_eq!(e.retry_kind(), RetryKind::Permanent);
        assert!(e.is_errcode("M_FORBIDDEN"));
        assert!(!e.is_errcode("M_NOT_FOUND"));
        assert_eq!(ClientError::Timeout.retry_kind(), RetryKind::Transient(None));
        let e = ClientError::from_response(StatusCode::TOO_MANY_REQUESTS, &headers(None), b"{}");
        assert_eq!(e.retry_kind(), RetryKind::Transient(None));
    }

    #[test]
    fn hostile_bodies_do_not_panic() {
        let big = vec![0xffu8; 10_000];
        let e = ClientError::from_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &headers(Some("nan")),
            &big,
        );
        assert!(e.to_string().len() < 4000);
        let e = ClientError::from_response(
            StatusCode::BAD_REQUEST,
            &headers(Some("-1")),
            br#"{"errcode":5}"#,
        );
        assert_eq!(e.retry_kind(), RetryKind::Permanent);
        assert_eq!(parse_retry_after("1e300"), None);
        assert_eq!(parse_retry_after("0.5"), Some(Duration::from_millis(500)));
    }
}
