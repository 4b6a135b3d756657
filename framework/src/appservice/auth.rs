//! `hs_token` authentication: `Authorization: Bearer`, or the legacy `access_token` query
//! parameter; compared in constant time.

use axum::{
    extract::{Request, State},
    http::header::AUTHORIZATION,
    middleware::Next,
    response::{IntoResponse, Response},
};
use subtle::ConstantTimeEq;

use super::{ApiError, AppState};

/// Checks the request's token against the registration's `hs_token`.
pub(crate) fn check(
    expected: &str,
    header: Option<&str>,
    query: Option<&str>,
) -> Result<(), ApiError> {
    let bearer = match header {
        Some(h) => match h.strip_prefix("Bearer ") {
            Some(t) => Some(t.trim()),
            None => {
                return Err(ApiError::Forbidden("Authorization header must use the Bearer scheme"));
            }
        },
        None => None,
    };
    let token = match (bearer, query) {
        (Some(b), Some(q)) if b.as_bytes().ct_eq(q.as_bytes()).unwrap_u8() == 0 => {
            return Err(ApiError::Forbidden("header and query tokens differ"));
        }
        (Some(t), _) | (None, Some(t)) => t,
        (None, None) => return Err(ApiError::MissingToken),
    };
    if token.as_bytes().ct_eq(expected.as_bytes()).unwrap_u8() == 1 {
        Ok(())
    } else {
        Err(ApiError::Forbidden("invalid homeserver token"))
    }
}

fn query_token(query: Option<&str>) -> Option<String> {
    url::form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == "access_token")
        .map(|(_, v)| v.into_owned())
}

/// Middleware rejecting requests without the right token.
pub(crate) async fn require_hs_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let header = request.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok());
    let query = query_token(request.uri().query());
    match check(&state.hs_token, header, query.as_deref()) {
        Ok(()) => next.run(request).await,
        Err(e) => {
            state.metrics.auth_failures.inc();
            tracing::warn!(uri = %request.uri().path(), error = %e, "rejected homeserver request");
            e.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_rules() {
        assert_eq!(check("t", None, None), Err(ApiError::MissingToken));
        assert!(check("t", Some("Bearer t"), None).is_ok());
        assert!(check("t", None, Some("t")).is_ok());
        assert!(check("t", Some("Bearer t"), Some("t")).is_ok());
        assert!(matches!(check("t", Some("Bearer t"), Some("u")), Err(ApiError::Forbidden(_))));
        assert!(matches!(check("t", Some("Bearer u"), None), Err(ApiError::Forbidden(_))));
        assert!(matches!(check("t", Some("Foobar t"), None), Err(ApiError::Forbidden(_))));
        assert!(matches!(check("t", Some("Bearer "), None), Err(ApiError::Forbidden(_))));
    }
}
