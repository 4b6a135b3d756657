//! Client for the homeserver's Client-Server API as an application service.
//!
//! # Layout
//! - [`HomeserverClient`]: the shared, cloneable HTTP client. Authenticates with
//!   `Authorization: Bearer <as_token>`, retries transient failures with capped
//!   exponential backoff and full jitter, honours rate-limit delays, serializes
//!   requests per room, and exports Prometheus metrics.
//! - [`Intent`]: acts as one user (the bot or a ghost in the namespace) through
//!   `?user_id=` identity assertion: registration, membership, sending, state,
//!   profiles, media, directory.
//! - [`ClientCache`]: what the client remembers (registrations, memberships,
//!   power levels); [`MemoryCache`] is the in-memory implementation.
//!
//! # Ordering
//! Every request that targets a room (messages, state, redactions, membership)
//! holds that room's permit from its first attempt through all its retries, so
//! requests to one room reach the homeserver in the order they were issued,
//! while different rooms proceed in parallel. Typing notifications and receipts
//! are not queued. Event sends use a transaction id that stays the same across
//! retries, so a retried `PUT` never duplicates an event.
//!
//! # Example
//! ```no_run
//! # async fn demo() -> Result<(), trestle::client::ClientError> {
//! use std::sync::Arc;
//! use trestle::client::{ClientConfig, HomeserverClient, MemoryCache};
//!
//! let url = url::Url::parse("http://localhost:8008").expect("static URL");
//! let config = ClientConfig::new(url, "as_token", "my-bridge", "example.org", "bridgebot");
//! let registry = prometheus::Registry::new();
//! let client = HomeserverClient::new(config, Arc::new(MemoryCache::new()), &registry)?;
//! // After the appservice HTTP listener is up:
//! client.wait_until_reachable(std::future::pending()).await?;
//! let ghost = client.intent_for_localpart("irc_alice");
//! ghost.ensure_joined("!room:example.org").await?;
//! ghost
//!     .send_message("!room:example.org", serde_json::json!({"msgtype": "m.text", "body": "hi"}))
//!     .await?;
//! # Ok(())
//! # }
//! ```

mod cache;
mod error;
mod intent;
mod queue;
mod retry;
mod types;

use std::{
    fmt,
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::{Bytes, BytesMut};
use http::{Method, StatusCode};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};
use serde::de::DeserializeOwned;
use tracing::{debug, error, info, warn};

use self::queue::RoomQueues;
pub use self::{
    cache::{ClientCache, Membership, MemoryCache, UnknownMembership},
    error::{CacheError, ClientError, RetryKind},
    intent::{Intent, parse_mxc},
    retry::RetryConfig,
    types::{
        CreateRoom, DirectoryVisibility, InitialStateEvent, JoinedMember, Presence, Profile,
        ResolvedAlias, RoomPreset, Versions, WhoAmI, room_version_has_privileged_creators,
    },
};

/// Configuration of a [`HomeserverClient`].
#[derive(Clone)]
pub struct ClientConfig {
    /// Base URL of the homeserver's client API (e.g. `http://localhost:8008`).
    pub homeserver_url: url::Url,
    /// The registration's `as_token`. Redacted in `Debug`.
    pub as_token: String,
    /// The registration's `id` (used by the ping endpoint).
    pub appservice_id: String,
    /// The homeserver's server name (the part after `:` in user ids).
    pub server_name: String,
    /// The registration's `sender_localpart` (the bot).
    pub bot_localpart: String,
    /// Retry policy.
    pub retry: RetryConfig,
    /// Timeout of one HTTP attempt, including reading the body (default 60 s).
    pub request_timeout: Duration,
    /// Largest media download accepted, in bytes (default 100 MiB).
    pub max_media_bytes: u64,
}

impl ClientConfig {
    /// Creates a configuration with default retry policy and timeouts.
    pub fn new(
        homeserver_url: url::Url,
        as_token: impl Into<String>,
        appservice_id: impl Into<String>,
        server_name: impl Into<String>,
        bot_localpart: impl Into<String>,
    ) -> Self {
        Self {
            homeserver_url,
            as_token: as_token.into(),
            appservice_id: appservice_id.into(),
            server_name: server_name.into(),
            bot_localpart: bot_localpart.into(),
            retry: RetryConfig::default(),
            request_timeout: Duration::from_secs(60),
            max_media_bytes: 100 * 1024 * 1024,
        }
    }

    /// The bot's full user id, `@<bot_localpart>:<server_name>`.
    pub fn bot_user_id(&self) -> String {
        format!("@{}:{}", self.bot_localpart, self.server_name)
    }
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("homeserver_url", &self.homeserver_url.as_str())
            .field("as_token", &"<redacted>")
            .field("appservice_id", &self.appservice_id)
            .field("server_name", &self.server_name)
            .field("bot_localpart", &self.bot_localpart)
            .field("retry", &self.retry)
            .field("request_timeout", &self.request_timeout)
            .field("max_media_bytes", &self.max_media_bytes)
            .finish()
    }
}

/// Largest JSON response accepted (room state of huge rooms can be large).
const MAX_JSON_BYTES: u64 = 64 * 1024 * 1024;
/// How much of an error body is kept.
const MAX_ERROR_BYTES: u64 = 64 * 1024;

/// Characters that must be percent-encoded inside one path segment: everything
/// except RFC 3986 unreserved characters.
const PATH_SEGMENT: &AsciiSet =
    &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// Percent-encodes one path segment (room id, alias, event id, user id, …).
pub(crate) fn enc(segment: &str) -> String {
    utf8_percent_encode(segment, PATH_SEGMENT).to_string()
}

/// Checks that an identifier is non-empty, has one of the expected sigils and
/// carries no control characters.
pub(crate) fn check_id(kind: &str, id: &str, sigils: &[char]) -> Result<(), ClientError> {
    if id.len() > 255 * 4 {
        return Err(ClientError::InvalidInput(format!("{kind} is too long")));
    }
    if !id.starts_with(sigils) {
        return Err(ClientError::InvalidInput(format!(
            "{kind} {id:?} must start with one of {sigils:?}"
        )));
    }
    if id.len() < 2 || id.chars().any(char::is_control) {
        return Err(ClientError::InvalidInput(format!(
            "{kind} {id:?} is empty or contains control characters"
        )));
    }
    Ok(())
}

/// Checks a free-form path component such as an event type.
pub(crate) fn check_token(kind: &str, value: &str) -> Result<(), ClientError> {
    if value.is_empty() || value.len() > 1024 || value.chars().any(char::is_control) {
        return Err(ClientError::InvalidInput(format!(
            "{kind} {value:?} is empty, too long or contains control characters"
        )));
    }
    Ok(())
}

#[derive(Debug)]
struct Metrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    retries: IntCounterVec,
    queue_depth: IntGauge,
}

impl Metrics {
    fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let requests = IntCounterVec::new(
            Opts::new(
                "trestle_homeserver_requests_total",
                "HTTP attempts against the homeserver, by endpoint template and outcome",
            ),
            &["endpoint", "outcome"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "trestle_homeserver_request_duration_seconds",
                "Duration of one HTTP attempt against the homeserver",
            ),
            &["endpoint"],
        )?;
        let retries = IntCounterVec::new(
            Opts::new(
                "trestle_homeserver_retries_total",
                "Retries of homeserver requests, by reason",
            ),
            &["reason"],
        )?;
        let queue_depth = IntGauge::new(
            "trestle_outbound_queue_depth",
            "Room-targeted requests waiting for or holding their room's send permit",
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(retries.clone()))?;
        registry.register(Box::new(queue_depth.clone()))?;
        Ok(Self { requests, duration, retries, queue_depth })
    }
}

/// Body of an outgoing request.
#[derive(Debug, Clone)]
pub(crate) enum Body {
    /// No body.
    Empty,
    /// A JSON body.
    Json(serde_json::Value),
    /// Raw bytes with a content type (media upload).
    Bytes {
        /// The payload (cheap to clone for retries).
        data: Bytes,
        /// `Content-Type` header value.
        content_type: String,
    },
}

/// One logical request (possibly several HTTP attempts).
#[derive(Debug, Clone)]
pub(crate) struct Request {
    method: Method,
    endpoint: &'static str,
    path: String,
    query: Vec<(&'static str, String)>,
    body: Body,
    room: Option<String>,
    retry: bool,
    max_body: u64,
}

impl Request {
    /// A request for `path` (already percent-encoded) labelled `endpoint` in metrics.
    pub(crate) fn new(method: Method, endpoint: &'static str, path: String) -> Self {
        Self {
            method,
            endpoint,
            path,
            query: Vec::new(),
            body: Body::Empty,
            room: None,
            retry: true,
            max_body: MAX_JSON_BYTES,
        }
    }

    /// Adds a query parameter.
    pub(crate) fn query(mut self, key: &'static str, value: impl Into<String>) -> Self {
        self.query.push((key, value.into()));
        self
    }

    /// Sets a JSON body.
    pub(crate) fn json(mut self, body: serde_json::Value) -> Self {
        self.body = Body::Json(body);
        self
    }

    /// Sets a raw body.
    pub(crate) fn bytes(mut self, data: Bytes, content_type: String) -> Self {
        self.body = Body::Bytes { data, content_type };
        self
    }

    /// Serializes this request in `room`'s outbound queue.
    pub(crate) fn in_room(mut self, room: &str) -> Self {
        self.room = Some(room.to_owned());
        self
    }

    /// Sends only one attempt.
    pub(crate) fn no_retry(mut self) -> Self {
        self.retry = false;
        self
    }

    /// Sets the largest accepted success body.
    pub(crate) fn max_body(mut self, limit: u64) -> Self {
        self.max_body = limit;
        self
    }
}

/// A successful raw response.
#[derive(Debug)]
pub(crate) struct RawResponse {
    pub(crate) headers: http::HeaderMap,
    pub(crate) body: Bytes,
}

struct Inner {
    http: reqwest::Client,
    base: String,
    config: ClientConfig,
    cache: Arc<dyn ClientCache>,
    metrics: Metrics,
    queues: RoomQueues,
    /// Serializes power-level read-modify-write cycles per room.
    pl_edits: RoomQueues,
    txn_prefix: String,
    txn_counter: AtomicU64,
    default_room_version: tokio::sync::OnceCell<String>,
}

/// The application service's client to the homeserver. Cheap to clone.
#[derive(Clone)]
pub struct HomeserverClient {
    inner: Arc<Inner>,
}

impl fmt::Debug for HomeserverClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HomeserverClient")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl HomeserverClient {
    /// Builds the client and registers its metrics in `registry`.
    ///
    /// Fails if the HTTP client cannot be built or the metrics are already
    /// registered in `registry`.
    pub fn new(
        config: ClientConfig,
        cache: Arc<dyn ClientCache>,
        registry: &Registry,
    ) -> Result<Self, ClientError> {
        match config.homeserver_url.scheme() {
            "http" | "https" => {}
            other => {
                return Err(ClientError::Setup(format!(
                    "homeserver_url must be http or https, not {other:?}"
                )));
            }
        }
        check_token("appservice_id", &config.appservice_id)
            .map_err(|e| ClientError::Setup(e.to_string()))?;
        if config.as_token.is_empty()
            || http::HeaderValue::from_str(&format!("Bearer {}", config.as_token)).is_err()
        {
            return Err(ClientError::Setup(
                "as_token is empty or not a valid header value".to_owned(),
            ));
        }
        let http = reqwest::Client::builder()
            .timeout(config.request_timeout)
            .connect_timeout(config.request_timeout.min(Duration::from_secs(30)))
            .user_agent(concat!("trestle/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientError::Setup(format!("building HTTP client: {e}")))?;
        let metrics =
            Metrics::new(registry).map_err(|e| ClientError::Setup(format!("metrics: {e}")))?;
        let queues = RoomQueues::new(metrics.queue_depth.clone());
        // Deliberately unregistered: power-level edits also pass through `queues`.
        let pl_gauge = IntGauge::new("trestle_pl_edit_depth", "power-level edits in progress")
            .map_err(|e| ClientError::Setup(format!("metrics: {e}")))?;
        let pl_edits = RoomQueues::new(pl_gauge);
        let base = config.homeserver_url.as_str().trim_end_matches('/').to_owned();
        let start_ms =
            SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        let txn_prefix = format!("trestle.{start_ms}.{:08x}", rand::random::<u32>());
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                base,
                config,
                cache,
                metrics,
                queues,
                pl_edits,
                txn_prefix,
                txn_counter: AtomicU64::new(0),
                default_room_version: tokio::sync::OnceCell::new(),
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// The cache shared by all intents.
    pub fn cache(&self) -> &Arc<dyn ClientCache> {
        &self.inner.cache
    }

    /// The bot's full user id.
    pub fn bot_user_id(&self) -> String {
        self.inner.config.bot_user_id()
    }

    /// An intent acting as `user_id` (asserted with `?user_id=` unless it is the bot).
    pub fn intent(&self, user_id: impl Into<String>) -> Intent {
        Intent::new(self.clone(), user_id.into())
    }

    /// An intent for `@<localpart>:<server_name>`.
    pub fn intent_for_localpart(&self, localpart: &str) -> Intent {
        self.intent(format!("@{}:{}", localpart, self.inner.config.server_name))
    }

    /// The bot's intent.
    pub fn bot(&self) -> Intent {
        self.intent(self.bot_user_id())
    }

    /// A fresh, globally unique transaction id (unique across restarts).
    pub fn new_txn_id(&self) -> String {
        let n = self.inner.txn_counter.fetch_add(1, Ordering::Relaxed);
        format!("{}.{n}", self.inner.txn_prefix)
    }

    /// `GET /_matrix/client/versions`.
    pub async fn versions(&self) -> Result<Versions, ClientError> {
        self.send_json(Request::new(
            Method::GET,
            "GET /versions",
            "/_matrix/client/versions".to_owned(),
        ))
        .await
    }

    /// Asks the homeserver to ping this application service (MSC2659,
    /// `POST /_matrix/client/v1/appservice/{appserviceId}/ping`) and returns
    /// the round-trip time the homeserver measured. One attempt, no retries.
    /// Falls back to the unstable `fi.mau.msc2659` path on `404 M_UNRECOGNIZED`.
    pub async fn ping_appservice(
        &self,
        transaction_id: Option<&str>,
    ) -> Result<Duration, ClientError> {
        #[derive(serde::Deserialize)]
        struct Pong {
            duration_ms: u64,
        }
        let body = match transaction_id {
            Some(t) => serde_json::json!({ "transaction_id": t }),
            None => serde_json::json!({}),
        };
        let id = enc(&self.inner.config.appservice_id);
        let stable = Request::new(
            Method::POST,
            "POST /v1/appservice/{appserviceId}/ping",
            format!("/_matrix/client/v1/appservice/{id}/ping"),
        )
        .json(body.clone())
        .no_retry();
        let pong: Pong = match self.send_json(stable).await {
            Err(e) if is_unrecognized(&e) => {
                debug!("stable ping endpoint unknown, trying fi.mau.msc2659");
                let unstable = Request::new(
                    Method::POST,
                    "POST /unstable/fi.mau.msc2659/appservice/{appserviceId}/ping",
                    format!("/_matrix/client/unstable/fi.mau.msc2659/appservice/{id}/ping"),
                )
                .json(body)
                .no_retry();
                self.send_json(unstable).await?
            }
            other => other?,
        };
        Ok(Duration::from_millis(pong.duration_ms))
    }

    /// Waits until the homeserver is up and can reach this application
    /// service, pinging with backoff (not limited by `max_attempts`) while it
    /// is down: connection refused, timeouts, 429 and 5xx (including
    /// `M_CONNECTION_FAILED` / `M_CONNECTION_TIMEOUT`, i.e. the homeserver
    /// cannot reach us yet) are retried and logged.
    ///
    /// Returns `Some(round_trip)` once a ping succeeds, or `None` if the
    /// homeserver does not implement the ping endpoint but answers
    /// `/versions`. Permanent failures (`M_FORBIDDEN`: wrong token or
    /// appservice id; `M_URL_NOT_SET`: registration has no `url`) return the
    /// error. Resolving `shutdown` returns [`ClientError::Cancelled`].
    ///
    /// Start serving the appservice API before calling this: the homeserver's
    /// ping reaches back to us, and until we answer it reports
    /// `M_CONNECTION_FAILED`, which is retried forever.
    pub async fn wait_until_reachable(
        &self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<Option<Duration>, ClientError> {
        let mut shutdown = std::pin::pin!(shutdown);
        let started = Instant::now();
        let mut retry: u32 = 0;
        loop {
            let txn = self.new_txn_id();
            let result = tokio::select! {
                () = &mut shutdown => return Err(ClientError::Cancelled),
                r = self.ping_appservice(Some(&txn)) => r,
            };
            let err = match result {
                Ok(rtt) => {
                    info!(
                        round_trip_ms = rtt.as_millis() as u64,
                        "homeserver reached us through ping"
                    );
                    return Ok(Some(rtt));
                }
                Err(e) if is_unrecognized(&e) => {
                    warn!(
                        "homeserver does not support the appservice ping endpoint; checking /versions instead"
                    );
                    match self.versions().await {
                        Ok(_) => return Ok(None),
                        Err(e) => e,
                    }
                }
                Err(e) => e,
            };
            let hint = if err.is_errcode("M_URL_NOT_SET") {
                " (the registration file has no `url`, so the homeserver cannot push to us)"
            } else if err.is_errcode("M_FORBIDDEN") || err.is_errcode("M_UNKNOWN_TOKEN") {
                " (check as_token and the registration id)"
            } else {
                ""
            };
            let delay = match err.retry_kind() {
                RetryKind::Permanent => {
                    error!(error = %err, "homeserver rejected the appservice ping{hint}");
                    return Err(err);
                }
                RetryKind::RateLimited(d) | RetryKind::Transient(Some(d)) => {
                    d.min(self.inner.config.retry.max_backoff)
                }
                RetryKind::Transient(None) => self.inner.config.retry.jittered(retry),
            };
            retry = retry.saturating_add(1);
            warn!(
                attempt = retry,
                waited_s = started.elapsed().as_secs(),
                next_try_ms = delay.as_millis() as u64,
                error = %err,
                "homeserver not reachable yet (or cannot reach us); retrying"
            );
            tokio::select! {
                () = &mut shutdown => return Err(ClientError::Cancelled),
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// The server's default room version (`GET /v3/capabilities`), cached.
    pub(crate) async fn default_room_version(&self) -> Result<String, ClientError> {
        self.inner
            .default_room_version
            .get_or_try_init(|| async {
                let caps: serde_json::Value = self
                    .send_json(Request::new(
                        Method::GET,
                        "GET /v3/capabilities",
                        "/_matrix/client/v3/capabilities".to_owned(),
                    ))
                    .await?;
                caps.pointer("/capabilities/m.room_versions/default")
                    .and_then(|v| v.as_str())
                    .map(str::to_owned)
                    .ok_or_else(|| ClientError::Decode {
                        endpoint: "GET /v3/capabilities",
                        message: "missing m.room_versions.default".to_owned(),
                    })
            })
            .await
            .cloned()
    }

    /// Sends a request and decodes a JSON success body.
    pub(crate) async fn send_json<T: DeserializeOwned>(
        &self,
        req: Request,
    ) -> Result<T, ClientError> {
        let endpoint = req.endpoint;
        let raw = self.execute(req).await?;
        let body: &[u8] = if raw.body.is_empty() { b"{}" } else { &raw.body };
        serde_json::from_slice(body)
            .map_err(|e| ClientError::Decode { endpoint, message: e.to_string() })
    }

    /// Sends a request, with room ordering and retries as configured.
    pub(crate) async fn execute(&self, req: Request) -> Result<RawResponse, ClientError> {
        // Taking the permit is the first await, so the queue position is fixed
        // on the first poll.
        let _permit = match &req.room {
            Some(room) => Some(self.inner.queues.acquire(room).await),
            None => None,
        };
        let retry_cfg = &self.inner.config.retry;
        let max_attempts = if req.retry { retry_cfg.max_attempts.max(1) } else { 1 };
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let err = match self.attempt(&req).await {
                Ok(resp) => return Ok(resp),
                Err(e) => e,
            };
            if attempt >= max_attempts {
                if req.retry && max_attempts > 1 && err.retry_kind() != RetryKind::Permanent {
                    warn!(endpoint = req.endpoint, attempts = attempt, error = %err, "giving up on homeserver request");
                }
                return Err(err);
            }
            let Some(delay) = retry_cfg.delay_for(err.retry_kind(), attempt - 1) else {
                return Err(err);
            };
            let reason = err.metric_label();
            self.inner.metrics.retries.with_label_values(&[reason]).inc();
            warn!(
                endpoint = req.endpoint,
                attempt,
                max_attempts,
                delay_ms = delay.as_millis() as u64,
                reason,
                error = %err,
                "retrying homeserver request"
            );
            tokio::time::sleep(delay).await;
        }
    }

    fn url_for(&self, req: &Request) -> Result<url::Url, ClientError> {
        let mut url = url::Url::parse(&format!("{}{}", self.inner.base, req.path))
            .map_err(|e| ClientError::InvalidInput(format!("bad request URL: {e}")))?;
        if !req.query.is_empty() {
            let mut pairs = url.query_pairs_mut();
            for (k, v) in &req.query {
                pairs.append_pair(k, v);
            }
        }
        Ok(url)
    }

    /// One HTTP attempt.
    async fn attempt(&self, req: &Request) -> Result<RawResponse, ClientError> {
        let url = self.url_for(req)?;
        let mut builder = self
            .inner
            .http
            .request(req.method.clone(), url)
            .bearer_auth(&self.inner.config.as_token);
        builder = match &req.body {
            Body::Empty => builder,
            Body::Json(v) => builder.json(v),
            Body::Bytes { data, content_type } => {
                builder.header(http::header::CONTENT_TYPE, content_type.as_str()).body(data.clone())
            }
        };
        let started = Instant::now();
        let result = self.attempt_inner(builder, req.max_body).await;
        let elapsed = started.elapsed().as_secs_f64();
        let m = &self.inner.metrics;
        m.duration.with_label_values(&[req.endpoint]).observe(elapsed);
        let outcome = match &result {
            Ok(_) => "success",
            Err(e) => e.metric_label(),
        };
        m.requests.with_label_values(&[req.endpoint, outcome]).inc();
        result
    }

    async fn attempt_inner(
        &self,
        builder: reqwest::RequestBuilder,
        max_body: u64,
    ) -> Result<RawResponse, ClientError> {
        let resp = builder.send().await.map_err(ClientError::from_reqwest)?;
        let status = resp.status();
        let headers = resp.headers().clone();
        if status.is_success() {
            let body = read_limited(resp, max_body, false).await?;
            Ok(RawResponse { headers, body })
        } else {
            let body = read_limited(resp, MAX_ERROR_BYTES, true).await?;
            Err(ClientError::from_response(status, &headers, &body))
        }
    }

    /// Takes the per-room lock for a power-level read-modify-write cycle.
    pub(crate) async fn lock_power_levels(&self, room_id: &str) -> queue::RoomPermit {
        self.inner.pl_edits.acquire(room_id).await
    }

    #[cfg(test)]
    pub(crate) fn queues(&self) -> &RoomQueues {
        &self.inner.queues
    }
}

/// True for `404 M_UNRECOGNIZED` (or a bare 404/405 without errcode): the
/// endpoint is not implemented.
pub(crate) fn is_unrecognized(err: &ClientError) -> bool {
    match err {
        ClientError::Matrix { status, errcode, .. } => {
            (*status == StatusCode::NOT_FOUND || *status == StatusCode::METHOD_NOT_ALLOWED)
                && errcode.as_deref().is_none_or(|c| c == "M_UNRECOGNIZED")
        }
        _ => false,
    }
}

/// Reads a body up to `limit` bytes. With `truncate`, extra bytes are dropped;
/// otherwise exceeding the limit is an error.
async fn read_limited(
    mut resp: reqwest::Response,
    limit: u64,
    truncate: bool,
) -> Result<Bytes, ClientError> {
    if !truncate && resp.content_length().is_some_and(|len| len > limit) {
        return Err(ClientError::TooLarge { limit });
    }
    let cap = usize::try_from(limit).unwrap_or(usize::MAX);
    let mut buf = BytesMut::new();
    while let Some(chunk) = resp.chunk().await.map_err(ClientError::from_reqwest)? {
        if buf.len().saturating_add(chunk.len()) > cap {
            if truncate {
                let room = cap - buf.len();
                buf.extend_from_slice(&chunk[..room]);
                break;
            }
            return Err(ClientError::TooLarge { limit });
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_path_segments() {
        assert_eq!(enc("!abc:example.org"), "%21abc%3Aexample.org");
        assert_eq!(enc("#a/b?c:d"), "%23a%2Fb%3Fc%3Ad");
        assert_eq!(enc("@u:x"), "%40u%3Ax");
        assert_eq!(enc("$ev/+="), "%24ev%2F%2B%3D");
        assert_eq!(enc("a b\r\n\0é"), "a%20b%0D%0A%00%C3%A9");
        assert_eq!(enc("m.room.message"), "m.room.message");
    }

    #[test]
    fn id_checks() {
        assert!(check_id("room id", "!abc:x", &['!']).is_ok());
        assert!(check_id("room id", "!abc", &['!']).is_ok());
        assert!(check_id("room id", "abc", &['!']).is_err());
        assert!(check_id("room id", "!", &['!']).is_err());
        assert!(check_id("room id", "!a\r\nb", &['!']).is_err());
        assert!(check_id("room", "#a:b", &['!', '#']).is_ok());
        assert!(check_token("event type", "m.room.message").is_ok());
        assert!(check_token("event type", "").is_err());
        assert!(check_token("event type", "a\0").is_err());
    }

    #[test]
    fn config_debug_redacts_token() {
        let cfg = ClientConfig::new(
            url::Url::parse("http://localhost:8008").expect("url"),
            "secret-token",
            "trestle",
            "example.org",
            "bot",
        );
        let dbg = format!("{cfg:?}");
        assert!(!dbg.contains("secret-token"));
        assert!(dbg.contains("<redacted>"));
        assert_eq!(cfg.bot_user_id(), "@bot:example.org");
    }

    #[test]
    fn rejects_duplicate_metrics_and_bad_config() {
        let registry = Registry::new();
        let cfg = ClientConfig::new(
            url::Url::parse("http://localhost:8008").expect("url"),
            "tok",
            "trestle",
            "example.org",
            "bot",
        );
        let cache: Arc<dyn ClientCache> = Arc::new(MemoryCache::new());
        assert!(HomeserverClient::new(cfg.clone(), Arc::clone(&cache), &registry).is_ok());
        assert!(matches!(
            HomeserverClient::new(cfg.clone(), Arc::clone(&cache), &registry),
            Err(ClientError::Setup(_))
        ));
        let mut bad = cfg;
        bad.as_token = "a\nb".to_owned();
        assert!(HomeserverClient::new(bad, cache, &Registry::new()).is_err());
    }

    #[tokio::test]
    async fn txn_ids_are_unique() {
        let cfg = ClientConfig::new(
            url::Url::parse("http://localhost:8008").expect("url"),
            "tok",
            "trestle",
            "example.org",
            "bot",
        );
        let client = HomeserverClient::new(cfg, Arc::new(MemoryCache::new()), &Registry::new())
            .expect("client");
        let a = client.new_txn_id();
        let b = client.new_txn_id();
        assert_ne!(a, b);
        assert!(a.starts_with("trestle."));
        assert_eq!(client.queues().tracked_rooms(), 0);
    }
}
