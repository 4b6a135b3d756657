//! The homeserver → application service HTTP API (spec v1.19), served with axum.
//!
//! Routes: transactions, user and alias queries, third-party lookups, ping — under
//! `/_matrix/app/v1` and the legacy unprefixed paths — plus `/health/live`, `/health/ready` and
//! `/metrics`, which need no token. Everything may sit under the path prefix of
//! `appservice.url`.

mod auth;
mod error;
#[cfg(test)]
mod tests;
pub mod txn;

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use async_trait::async_trait;
use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Path, Query, State, rejection::BytesRejection},
    http::{StatusCode, header},
    middleware,
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use serde_json::{Value, json};

pub use error::ApiError;

use crate::{inbound::Inbound, metrics::Metrics, registration::NamespaceMatcher};

/// Answers the homeserver's queries; the runtime implements it on top of the bridge.
#[async_trait]
pub(crate) trait QueryHandler: Send + Sync + 'static {
    /// Creates the user if the bridge knows it; `false` = does not exist.
    async fn query_user(&self, user_id: &str) -> Result<bool, ApiError>;
    /// Creates the room and alias if the bridge knows it; `false` = does not exist.
    async fn query_alias(&self, alias: &str) -> Result<bool, ApiError>;
    /// Protocol metadata, `None` if unknown.
    async fn thirdparty_protocol(&self, protocol: &str) -> Result<Option<Value>, ApiError>;
    /// Third-party users matching `fields` (or reverse lookup by `userid`).
    async fn thirdparty_users(
        &self,
        protocol: Option<&str>,
        fields: &BTreeMap<String, String>,
    ) -> Result<Vec<Value>, ApiError>;
    /// Third-party locations matching `fields` (or reverse lookup by `alias`).
    async fn thirdparty_locations(
        &self,
        protocol: Option<&str>,
        fields: &BTreeMap<String, String>,
    ) -> Result<Vec<Value>, ApiError>;
}

/// Shared state of the HTTP handlers.
#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) hs_token: Arc<str>,
    pub(crate) inbound: Arc<Inbound>,
    pub(crate) queries: Arc<dyn QueryHandler>,
    pub(crate) metrics: Metrics,
    pub(crate) matcher: Arc<NamespaceMatcher>,
    pub(crate) ready: Arc<AtomicBool>,
    pub(crate) max_body: usize,
    pub(crate) metrics_enabled: bool,
    /// Transaction ids of pings received, so the start-up self-ping can be confirmed.
    pub(crate) pings: Arc<Mutex<Vec<String>>>,
    /// Serves signed media links: the signer and the client that downloads.
    pub(crate) media: Option<(crate::media::MediaSigner, crate::client::HomeserverClient)>,
}

/// Builds the router. `prefix` is the path of `appservice.url` (may be empty or `/`).
pub(crate) fn router(state: AppState, prefix: &str) -> Router {
    let authed = Router::new()
        .route("/_matrix/app/v1/transactions/{txn_id}", put(put_transaction))
        .route("/transactions/{txn_id}", put(put_transaction))
        .route("/_matrix/app/v1/users/{user_id}", get(get_user))
        .route("/users/{user_id}", get(get_user))
        .route("/_matrix/app/v1/rooms/{alias}", get(get_room))
        .route("/rooms/{alias}", get(get_room))
        .route("/_matrix/app/v1/ping", post(ping))
        .route("/_matrix/app/unstable/fi.mau.msc2659/ping", post(ping));
    let mut authed = authed;
    for base in ["/_matrix/app/v1/thirdparty", "/_matrix/app/unstable/thirdparty"] {
        authed = authed
            .route(&format!("{base}/protocol/{{protocol}}"), get(tp_protocol))
            .route(&format!("{base}/user"), get(tp_user_reverse))
            .route(&format!("{base}/user/{{protocol}}"), get(tp_user))
            .route(&format!("{base}/location"), get(tp_location_reverse))
            .route(&format!("{base}/location/{{protocol}}"), get(tp_location));
    }
    let authed = authed
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require_hs_token))
        .layer(DefaultBodyLimit::max(state.max_body));
    let open = Router::new()
        .route("/health/live", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/media/{server}/{media_id}/{expires}/{sig}/{filename}", get(media));
    let inner = authed
        .merge(open)
        .fallback(|| async { ApiError::UnknownEndpoint })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .with_state(state);
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        inner
    } else {
        Router::new().nest(prefix, inner).fallback(|| async { ApiError::UnknownEndpoint })
    }
}

async fn ready(State(s): State<AppState>) -> Response {
    if s.ready.load(Ordering::Acquire) {
        Json(json!({"status": "ready"})).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "starting"}))).into_response()
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    if !s.metrics_enabled {
        return ApiError::UnknownEndpoint.into_response();
    }
    match s.metrics.render() {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        Err(e) => ApiError::Internal(e).into_response(),
    }
}

async fn media(
    State(s): State<AppState>,
    Path((server, media_id, expires, sig, _filename)): Path<(String, String, u64, String, String)>,
) -> Response {
    let Some((signer, client)) = &s.media else {
        return ApiError::UnknownEndpoint.into_response();
    };
    let mxc = match signer.verify(&server, &media_id, expires, &sig, crate::media::now_secs()) {
        Ok(m) => m,
        Err(e) => return ApiError::NotFound(format!("media link refused: {e}")).into_response(),
    };
    match client.bot().download_media(&mxc).await {
        Ok((bytes, content_type)) => {
            let ct = content_type.unwrap_or_else(|| "application/octet-stream".to_owned());
            // Never let a browser render HTML or scripts from our origin.
            let safe =
                if ct.starts_with("text/html") || ct.contains("javascript") || ct.contains("svg") {
                    "application/octet-stream".to_owned()
                } else {
                    ct
                };
            (
                [
                    (header::CONTENT_TYPE, safe),
                    (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_owned()),
                    (header::CONTENT_SECURITY_POLICY, "sandbox; default-src 'none'".to_owned()),
                    (header::CACHE_CONTROL, "public, max-age=86400".to_owned()),
                ],
                bytes,
            )
                .into_response()
        }
        Err(e) => {
            tracing::warn!(%mxc, error = %e, "media download for a proxy link failed");
            ApiError::NotFound("media not available".into()).into_response()
        }
    }
}

async fn put_transaction(
    State(s): State<AppState>,
    Path(txn_id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let started = std::time::Instant::now();
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge(s.max_body)
        } else {
            ApiError::BadJson(e.body_text())
        }
    })?;
    let result = s.inbound.ingest(&txn_id, body).await;
    s.metrics.put_duration.observe(started.elapsed().as_secs_f64());
    if let Err(e) = &result {
        s.metrics.transactions.with_label_values(&["rejected"]).inc();
        tracing::warn!(txn_id, error = %e, "rejected transaction");
    }
    result.map(|()| Json(json!({})))
}

async fn get_user(
    State(s): State<AppState>,
    Path(user_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if !s.matcher.is_user(&user_id) {
        return Err(ApiError::NotFound(format!("{user_id} is not in this bridge's namespace")));
    }
    if s.queries.query_user(&user_id).await? {
        Ok(Json(json!({})))
    } else {
        Err(ApiError::NotFound(format!("{user_id} does not exist")))
    }
}

async fn get_room(
    State(s): State<AppState>,
    Path(alias): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if !s.matcher.is_alias(&alias) {
        return Err(ApiError::NotFound(format!("{alias} is not in this bridge's namespace")));
    }
    if s.queries.query_alias(&alias).await? {
        Ok(Json(json!({})))
    } else {
        Err(ApiError::NotFound(format!("{alias} does not exist")))
    }
}

async fn ping(State(s): State<AppState>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let v: Value = if body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::NotJson(e.to_string()))?
    };
    if !v.is_object() {
        return Err(ApiError::BadJson("ping body must be an object".into()));
    }
    if let Some(id) = v.get("transaction_id").and_then(Value::as_str) {
        let mut pings = s.pings.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if pings.len() >= 16 {
            pings.remove(0);
        }
        pings.push(id.to_owned());
    }
    Ok(Json(json!({})))
}

async fn tp_protocol(
    State(s): State<AppState>,
    Path(protocol): Path<String>,
) -> Result<Json<Value>, ApiError> {
    s.queries
        .thirdparty_protocol(&protocol)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("unknown protocol {protocol}")))
}

fn non_empty(list: Vec<Value>, what: &str) -> Result<Json<Value>, ApiError> {
    if list.is_empty() {
        Err(ApiError::NotFound(format!("no {what} found")))
    } else {
        Ok(Json(Value::Array(list)))
    }
}

async fn tp_user(
    State(s): State<AppState>,
    Path(protocol): Path<String>,
    Query(fields): Query<BTreeMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    non_empty(s.queries.thirdparty_users(Some(&protocol), &without_token(fields)).await?, "users")
}

async fn tp_user_reverse(
    State(s): State<AppState>,
    Query(fields): Query<BTreeMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    if !fields.contains_key("userid") {
        return Err(ApiError::InvalidParam("the userid parameter is required".into()));
    }
    non_empty(s.queries.thirdparty_users(None, &without_token(fields)).await?, "users")
}

async fn tp_location(
    State(s): State<AppState>,
    Path(protocol): Path<String>,
    Query(fields): Query<BTreeMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    non_empty(
        s.queries.thirdparty_locations(Some(&protocol), &without_token(fields)).await?,
        "locations",
    )
}

async fn tp_location_reverse(
    State(s): State<AppState>,
    Query(fields): Query<BTreeMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    if !fields.contains_key("alias") {
        return Err(ApiError::InvalidParam("the alias parameter is required".into()));
    }
    non_empty(s.queries.thirdparty_locations(None, &without_token(fields)).await?, "locations")
}

fn without_token(mut fields: BTreeMap<String, String>) -> BTreeMap<String, String> {
    fields.remove("access_token");
    fields
}
