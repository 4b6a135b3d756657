//! Integration tests of the homeserver client against an in-process fake homeserver.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{Router, body::Bytes, extract::State, response::Response};
use prometheus::Registry;
use serde_json::{Value, json};
use tokio::{net::TcpListener, task::JoinHandle};
use trestle::client::{
    ClientConfig, ClientError, CreateRoom, HomeserverClient, Membership, MemoryCache, RetryConfig,
};

/// One request as the fake homeserver saw it.
#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    /// The raw (still percent-encoded) path.
    path: String,
    query: Vec<(String, String)>,
    auth: Option<String>,
    content_type: Option<String>,
    body: Bytes,
}

impl Recorded {
    fn q(&self, key: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// What the fake homeserver answers.
#[derive(Debug)]
struct Reply {
    status: u16,
    body: Vec<u8>,
    headers: Vec<(&'static str, String)>,
    delay: Duration,
}

impl Reply {
    #[allow(clippy::needless_pass_by_value)] // callers pass `json!` literals
    fn json(status: u16, body: Value) -> Self {
        Self {
            status,
            body: serde_json::to_vec(&body).unwrap_or_default(),
            headers: vec![("content-type", "application/json".to_owned())],
            delay: Duration::ZERO,
        }
    }

    fn ok(body: Value) -> Self {
        Self::json(200, body)
    }

    fn err(status: u16, errcode: &str) -> Self {
        Self::json(status, json!({ "errcode": errcode, "error": "fake" }))
    }

    fn header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.push((name, value.to_owned()));
        self
    }

    fn delay(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }
}

type Responder = Arc<dyn Fn(&Recorded) -> Reply + Send + Sync>;

#[derive(Clone)]
struct HsState {
    log: Arc<Mutex<Vec<Recorded>>>,
    responder: Responder,
}

/// An in-process fake homeserver on 127.0.0.1.
struct FakeHs {
    url: url::Url,
    log: Arc<Mutex<Vec<Recorded>>>,
    task: JoinHandle<()>,
}

impl Drop for FakeHs {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(State(st): State<HsState>, req: axum::extract::Request) -> Response {
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let query = url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
        .into_owned()
        .collect();
    let (auth, content_type) = {
        let header =
            |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        (header("authorization"), header("content-type"))
    };
    let body = axum::body::to_bytes(req.into_body(), 16 * 1024 * 1024).await.unwrap_or_default();
    let rec = Recorded { method, path, query, auth, content_type, body };
    st.log.lock().expect("log").push(rec.clone());
    let reply = (st.responder)(&rec);
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let mut builder = Response::builder().status(reply.status);
    for (k, v) in reply.headers {
        builder = builder.header(k, v);
    }
    builder.body(axum::body::Body::from(reply.body)).expect("response")
}

impl FakeHs {
    async fn start(responder: impl Fn(&Recorded) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Self::start_on(listener, responder)
    }

    fn start_on(
        listener: TcpListener,
        responder: impl Fn(&Recorded) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let addr: SocketAddr = listener.local_addr().expect("addr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let state = HsState { log: Arc::clone(&log), responder: Arc::new(responder) };
        let app = Router::new().fallback(handle).with_state(state);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url: url::Url::parse(&format!("http://{addr}")).expect("url"), log, task }
    }

    fn requests(&self) -> Vec<Recorded> {
        self.log.lock().expect("log").clone()
    }

    fn requests_to(&self, fragment: &str) -> Vec<Recorded> {
        self.requests().into_iter().filter(|r| r.path.contains(fragment)).collect()
    }
}

fn config(url: url::Url) -> ClientConfig {
    let mut cfg = ClientConfig::new(url, "as-secret", "trestle", "example.org", "bridgebot");
    cfg.retry = RetryConfig {
        max_attempts: 5,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(100),
    };
    cfg.request_timeout = Duration::from_secs(2);
    cfg
}

fn client_for(hs: &FakeHs) -> (HomeserverClient, Registry) {
    client_with(config(hs.url.clone()))
}

fn client_with(cfg: ClientConfig) -> (HomeserverClient, Registry) {
    let registry = Registry::new();
    let client =
        HomeserverClient::new(cfg, Arc::new(MemoryCache::new()), &registry).expect("client");
    (client, registry)
}

fn metric(registry: &Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    for family in registry.gather() {
        if family.name() != name {
            continue;
        }
        for m in family.get_metric() {
            let matches = labels
                .iter()
                .all(|(k, v)| m.get_label().iter().any(|l| l.name() == *k && l.value() == *v));
            if matches {
                return m.get_counter().get_value() + m.get_gauge().get_value();
            }
        }
    }
    0.0
}

const GHOST: &str = "@irc_alice:example.org";
const BOT: &str = "@bridgebot:example.org";
const ROOM: &str = "!room:example.org";

#[tokio::test]
async fn registration_is_idempotent_and_treats_user_in_use_as_success() {
    let hs = FakeHs::start(|r| {
        if r.path.ends_with("/register") {
            Reply::err(400, "M_USER_IN_USE")
        } else {
            Reply::ok(json!({}))
        }
    })
    .await;
    let (client, _) = client_for(&hs);
    let ghost = client.intent(GHOST);
    ghost.ensure_registered().await.expect("in use = ok");
    ghost.ensure_registered().await.expect("cached");
    client.intent_for_localpart("irc_alice").ensure_registered().await.expect("cached");
    // The bot never registers.
    client.bot().ensure_registered().await.expect("bot");

    let reqs = hs.requests();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    let r = &reqs[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/_matrix/client/v3/register");
    assert_eq!(r.auth.as_deref(), Some("Bearer as-secret"));
    assert!(r.q("access_token").is_none());
    assert!(r.q("user_id").is_none());
    assert_eq!(
        r.json(),
        json!({"type": "m.login.application_service", "username": "irc_alice", "inhibit_login": true})
    );
    assert!(client.cache().is_registered(GHOST).await.expect("cache"));

    // A user outside our server is refused without a request.
    let err = client.intent("@x:elsewhere.org").ensure_registered().await.expect_err("foreign");
    assert!(matches!(err, ClientError::InvalidInput(_)));
    assert_eq!(hs.requests().len(), 1);
}

#[tokio::test]
async fn rate_limit_retry_after_ms_then_success_reuses_txn_id() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&calls);
    let hs = FakeHs::start(move |_| {
        if c.fetch_add(1, Ordering::SeqCst) == 0 {
            Reply::json(
                429,
                json!({"errcode": "M_LIMIT_EXCEEDED", "error": "slow", "retry_after_ms": 50}),
            )
        } else {
            Reply::ok(json!({"event_id": "$ev1"}))
        }
    })
    .await;
    let (client, registry) = client_for(&hs);
    let started = Instant::now();
    let id = client
        .bot()
        .send_message(ROOM, json!({"msgtype": "m.text", "body": "hi"}))
        .await
        .expect("send");
    assert_eq!(id, "$ev1");
    assert!(started.elapsed() >= Duration::from_millis(50));
    let reqs = hs.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].path, reqs[1].path, "retry must reuse the txnId");
    assert_eq!(reqs[0].method, "PUT");
    assert!(
        reqs[0]
            .path
            .starts_with("/_matrix/client/v3/rooms/%21room%3Aexample.org/send/m.room.message/")
    );
    assert_eq!(
        metric(&registry, "trestle_homeserver_retries_total", &[("reason", "rate_limited")]),
        1.0
    );
    assert_eq!(
        metric(
            &registry,
            "trestle_homeserver_requests_total",
            &[
                ("endpoint", "PUT /v3/rooms/{roomId}/send/{eventType}/{txnId}"),
                ("outcome", "success")
            ]
        ),
        1.0
    );
}

#[tokio::test]
async fn retry_after_header_takes_precedence_over_body() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&calls);
    let hs = FakeHs::start(move |_| {
        if c.fetch_add(1, Ordering::SeqCst) == 0 {
            // Header says 0 s, body says 60 s: the header wins, so this is fast.
            Reply::json(429, json!({"errcode": "M_LIMIT_EXCEEDED", "retry_after_ms": 60_000}))
                .header("retry-after", "0")
        } else {
            Reply::ok(json!({"event_id": "$ev"}))
        }
    })
    .await;
    let (client, _) = client_for(&hs);
    let started = Instant::now();
    client.bot().send_event(ROOM, "m.room.message", json!({}), None).await.expect("send");
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(hs.requests().len(), 2);
}

#[tokio::test]
async fn server_errors_are_retried_with_the_same_txn_id() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&calls);
    let hs = FakeHs::start(move |_| match c.fetch_add(1, Ordering::SeqCst) {
        0 => Reply::err(502, "M_UNKNOWN"),
        1 => Reply {
            status: 503,
            body: b"<html>upstream down</html>".to_vec(),
            headers: vec![],
            delay: Duration::ZERO,
        },
        _ => Reply::ok(json!({"event_id": "$ok"})),
    })
    .await;
    let (client, registry) = client_for(&hs);
    let id = client
        .bot()
        .send_event_with_txn(ROOM, "m.room.message", json!({"body": "x"}), "my-txn-1", Some(1234))
        .await
        .expect("send");
    assert_eq!(id, "$ok");
    let reqs = hs.requests();
    assert_eq!(reqs.len(), 3);
    for r in &reqs {
        assert_eq!(
            r.path,
            "/_matrix/client/v3/rooms/%21room%3Aexample.org/send/m.room.message/my-txn-1"
        );
        assert_eq!(r.q("ts"), Some("1234"));
    }
    assert_eq!(
        metric(&registry, "trestle_homeserver_retries_total", &[("reason", "server_error")]),
        2.0
    );
}

#[tokio::test]
async fn retries_give_up_after_max_attempts() {
    let hs = FakeHs::start(|_| Reply::err(500, "M_UNKNOWN")).await;
    let (client, _) = client_for(&hs);
    let err = client.bot().send_message(ROOM, json!({})).await.expect_err("always 500");
    assert_eq!(err.status().map(|s| s.as_u16()), Some(500));
    assert_eq!(hs.requests().len(), 5);
}

#[tokio::test]
async fn forbidden_is_not_retried() {
    let hs = FakeHs::start(|_| Reply::err(403, "M_FORBIDDEN")).await;
    let (client, registry) = client_for(&hs);
    let err =
        client.intent(GHOST).send_message(ROOM, json!({"body": "x"})).await.expect_err("forbidden");
    assert!(err.is_errcode("M_FORBIDDEN"));
    assert_eq!(hs.requests().len(), 1);
    assert_eq!(
        metric(&registry, "trestle_homeserver_requests_total", &[("outcome", "client_error")]),
        1.0
    );
}

#[tokio::test]
async fn timeouts_are_transient() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&calls);
    let hs = FakeHs::start(move |_| {
        let reply = Reply::ok(json!({"user_id": BOT}));
        if c.fetch_add(1, Ordering::SeqCst) == 0 {
            reply.delay(Duration::from_millis(600))
        } else {
            reply
        }
    })
    .await;
    let mut cfg = config(hs.url.clone());
    cfg.request_timeout = Duration::from_millis(200);
    let (client, registry) = client_with(cfg);
    let who = client.bot().whoami().await.expect("second attempt");
    assert_eq!(who.user_id, BOT);
    assert_eq!(hs.requests().len(), 2);
    assert_eq!(
        metric(&registry, "trestle_homeserver_retries_total", &[("reason", "timeout")]),
        1.0
    );
}

#[tokio::test]
async fn per_room_sends_are_ordered_and_rooms_progress_in_parallel() {
    let seen_third = Arc::new(AtomicUsize::new(0));
    let s = Arc::clone(&seen_third);
    let hs = FakeHs::start(move |r| {
        let body = r.json();
        if r.path.contains("%21slow") {
            // The third message fails once with a 500 to show a retry keeps its place.
            if body["n"] == json!(3) && s.fetch_add(1, Ordering::SeqCst) == 0 {
                return Reply::err(500, "M_UNKNOWN");
            }
            Reply::ok(json!({"event_id": format!("$slow{}", body["n"])}))
                .delay(Duration::from_millis(15))
        } else {
            Reply::ok(json!({"event_id": "$fast"}))
        }
    })
    .await;
    let (client, registry) = client_for(&hs);
    let slow_room = "!slow:example.org";
    let ghost = client.intent(GHOST);
    let bot = client.bot();
    // Futures created in order and first polled in order by join_all.
    let sends: Vec<_> = (0..20)
        .map(|n| {
            // Alternate senders: ordering is per room, not per intent.
            let intent = if n % 2 == 0 { ghost.clone() } else { bot.clone() };
            async move { intent.send_message(slow_room, json!({"n": n})).await }
        })
        .collect();
    let slow = tokio::spawn(futures::future::join_all(sends));
    tokio::time::sleep(Duration::from_millis(20)).await;
    let started = Instant::now();
    bot.send_message("!fast:example.org", json!({"n": 0})).await.expect("fast room");
    let fast_elapsed = started.elapsed();
    assert!(fast_elapsed < Duration::from_millis(150), "other room blocked for {fast_elapsed:?}");
    let results = slow.await.expect("join");
    for (n, r) in results.iter().enumerate() {
        assert_eq!(r.as_ref().expect("send"), &format!("$slow{n}"));
    }
    let order: Vec<i64> =
        hs.requests_to("%21slow").iter().map(|r| r.json()["n"].as_i64().unwrap_or(-1)).collect();
    let mut expected: Vec<i64> = (0..20).collect();
    expected.insert(3, 3); // the retried one, immediately after itself
    assert_eq!(order, expected);
    // The fast room's request arrived while the slow room was still busy.
    let all = hs.requests();
    let fast_pos = all.iter().position(|r| r.path.contains("%21fast")).expect("fast request");
    assert!(fast_pos < all.len() - 5, "fast request at {fast_pos}");
    assert_eq!(
        metric(&registry, "trestle_outbound_queue_depth", &[]),
        0.0,
        "queue depth returns to zero"
    );
}

#[tokio::test]
async fn ensure_joined_falls_back_to_bot_invite() {
    let joins = Arc::new(AtomicUsize::new(0));
    let j = Arc::clone(&joins);
    let hs = FakeHs::start(move |r| {
        if r.path.ends_with("/register") {
            Reply::ok(json!({"user_id": GHOST}))
        } else if r.path.starts_with("/_matrix/client/v3/join/") {
            if j.fetch_add(1, Ordering::SeqCst) == 0 {
                Reply::err(403, "M_FORBIDDEN")
            } else {
                Reply::ok(json!({"room_id": ROOM}))
            }
        } else if r.path.ends_with("/invite") {
            Reply::ok(json!({}))
        } else {
            Reply::err(404, "M_UNRECOGNIZED")
        }
    })
    .await;
    let (client, _) = client_for(&hs);
    let ghost = client.intent(GHOST);
    ghost.ensure_joined(ROOM).await.expect("joined");
    ghost.ensure_joined(ROOM).await.expect("cached");

    let reqs = hs.requests();
    let summary: Vec<(String, String, Option<String>)> = reqs
        .iter()
        .map(|r| (r.method.clone(), r.path.clone(), r.q("user_id").map(str::to_owned)))
        .collect();
    let ghost_q = Some(GHOST.to_owned());
    assert_eq!(
        summary,
        vec![
            ("POST".into(), "/_matrix/client/v3/register".into(), None),
            (
                "POST".into(),
                "/_matrix/client/v3/join/%21room%3Aexample.org".into(),
                ghost_q.clone()
            ),
            ("POST".into(), "/_matrix/client/v3/rooms/%21room%3Aexample.org/invite".into(), None),
            ("POST".into(), "/_matrix/client/v3/join/%21room%3Aexample.org".into(), ghost_q),
        ]
    );
    assert_eq!(reqs[2].json(), json!({"user_id": GHOST}));
    assert_eq!(
        client.cache().membership(ROOM, GHOST).await.expect("cache"),
        Some(Membership::Join)
    );
}

#[tokio::test]
async fn ensure_joined_joins_the_bot_when_it_cannot_invite() {
    let ghost_joins = Arc::new(AtomicUsize::new(0));
    let invites = Arc::new(AtomicUsize::new(0));
    let (gj, inv) = (Arc::clone(&ghost_joins), Arc::clone(&invites));
    let hs = FakeHs::start(move |r| {
        if r.path.ends_with("/register") {
            Reply::ok(json!({}))
        } else if r.path.starts_with("/_matrix/client/v3/join/") {
            if r.q("user_id").is_some() && gj.fetch_add(1, Ordering::SeqCst) == 0 {
                Reply::err(403, "M_FORBIDDEN")
            } else {
                Reply::ok(json!({"room_id": ROOM}))
            }
        } else if r.path.ends_with("/invite") {
            if inv.fetch_add(1, Ordering::SeqCst) == 0 {
                Reply::err(403, "M_FORBIDDEN")
            } else {
                Reply::ok(json!({}))
            }
        } else {
            Reply::err(404, "M_UNRECOGNIZED")
        }
    })
    .await;
    let (client, _) = client_for(&hs);
    client.intent(GHOST).ensure_joined(ROOM).await.expect("joined");
    let paths: Vec<(String, bool)> = hs
        .requests()
        .iter()
        .map(|r| (r.path.rsplit('/').next().unwrap_or("").to_owned(), r.q("user_id").is_some()))
        .collect();
    let enc_room = "%21room%3Aexample.org".to_owned();
    assert_eq!(
        paths,
        vec![
            ("register".to_owned(), false),
            (enc_room.clone(), true),
            ("invite".to_owned(), false),
            (enc_room.clone(), false),
            ("invite".to_owned(), false),
            (enc_room, true),
        ]
    );
    assert_eq!(client.cache().membership(ROOM, BOT).await.expect("cache"), Some(Membership::Join));
}

#[tokio::test]
async fn room_v12_creator_is_stripped_from_power_level_users() {
    let hs = FakeHs::start(|r| {
        if r.path.ends_with("/capabilities") {
            Reply::ok(json!({"capabilities": {"m.room_versions": {"default": "12", "available": {"12": "stable"}}}}))
        } else {
            Reply::ok(json!({"room_id": "!newroomhash"}))
        }
    })
    .await;
    let (client, _) = client_for(&hs);
    let ghost = client.intent(GHOST);
    let pl = json!({"users": {GHOST: 100, "@co:example.org": 100, "@mod:example.org": 50}, "events_default": 0});
    let mut opts = CreateRoom {
        name: Some("Bridged".to_owned()),
        room_version: Some("12".to_owned()),
        power_level_content_override: Some(pl.clone()),
        creation_content: Some(json!({"additional_creators": ["@co:example.org"]})),
        invite: vec![BOT.to_owned()],
        is_direct: true,
        ..CreateRoom::default()
    };
    let room = ghost.create_room(&opts).await.expect("create");
    assert_eq!(room, "!newroomhash");
    // Explicit older version: kept.
    opts.room_version = Some("11".to_owned());
    ghost.create_room(&opts).await.expect("create v11");
    // Unspecified version: the server default (12) applies.
    opts.room_version = None;
    ghost.create_room(&opts).await.expect("create default");

    let creates = hs.requests_to("/createRoom");
    assert_eq!(creates.len(), 3);
    let users = |i: usize| creates[i].json()["power_level_content_override"]["users"].clone();
    assert_eq!(users(0), json!({"@mod:example.org": 50}));
    assert_eq!(users(1), pl["users"]);
    assert_eq!(users(2), json!({"@mod:example.org": 50}));
    let body = creates[0].json();
    assert_eq!(body["room_version"], json!("12"));
    assert_eq!(body["name"], json!("Bridged"));
    assert_eq!(body["is_direct"], json!(true));
    assert_eq!(body["invite"], json!([BOT]));
    assert_eq!(body["power_level_content_override"]["events_default"], json!(0));
    assert_eq!(creates[0].q("user_id"), Some(GHOST));
    assert_eq!(hs.requests_to("/capabilities").len(), 1, "default version is cached");
    assert_eq!(
        client.cache().membership("!newroomhash", GHOST).await.expect("cache"),
        Some(Membership::Join)
    );
}

#[tokio::test]
async fn weird_ids_are_percent_encoded_in_paths() {
    let hs = FakeHs::start(|r| {
        if r.method == "GET" && r.path.contains("/directory/room/") {
            Reply::ok(json!({"room_id": "!r:x", "servers": ["x"]}))
        } else {
            Reply::ok(json!({"event_id": "$e", "room_id": "!r:x"}))
        }
    })
    .await;
    let (client, _) = client_for(&hs);
    let ghost = client.intent("@we/ird?user#:example.org");
    let room = "!a/b?c#d:example.org";
    ghost
        .send_state(
            room,
            "m.room.member",
            "@we/ird?user#:example.org",
            json!({"membership": "join"}),
            None,
        )
        .await
        .expect("state");
    ghost.redact(room, "$ev/ent?id+=", Some("spam")).await.expect("redact");
    let resolved = ghost.resolve_alias("#al/ias?x:example.org").await.expect("alias");
    assert_eq!(resolved.map(|r| r.room_id).as_deref(), Some("!r:x"));
    ghost.join("#al/ias?x:example.org").await.expect("join alias");
    ghost.send_receipt(room, "$ev/ent?id+=").await.expect("receipt");

    let reqs = hs.requests();
    assert_eq!(
        reqs[0].path,
        "/_matrix/client/v3/rooms/%21a%2Fb%3Fc%23d%3Aexample.org/state/m.room.member/%40we%2Fird%3Fuser%23%3Aexample.org"
    );
    assert!(reqs[1].path.starts_with(
        "/_matrix/client/v3/rooms/%21a%2Fb%3Fc%23d%3Aexample.org/redact/%24ev%2Fent%3Fid%2B%3D/"
    ));
    assert_eq!(reqs[1].json(), json!({"reason": "spam"}));
    assert_eq!(reqs[2].path, "/_matrix/client/v3/directory/room/%23al%2Fias%3Fx%3Aexample.org");
    assert_eq!(reqs[3].path, "/_matrix/client/v3/join/%23al%2Fias%3Fx%3Aexample.org");
    assert_eq!(
        reqs[4].path,
        "/_matrix/client/v3/rooms/%21a%2Fb%3Fc%23d%3Aexample.org/receipt/m.read/%24ev%2Fent%3Fid%2B%3D"
    );
    for r in &reqs {
        assert_eq!(r.q("user_id"), Some("@we/ird?user#:example.org"));
        assert_eq!(r.query.len(), 1, "no stray query parameters: {:?}", r.query);
    }
    // The membership state event updated the cache.
    assert_eq!(
        client.cache().membership(room, "@we/ird?user#:example.org").await.expect("cache"),
        Some(Membership::Join)
    );
    // Control characters are refused before anything is sent.
    let err = ghost.send_message("!bad\r\nroom:example.org", json!({})).await.expect_err("CRLF");
    assert!(matches!(err, ClientError::InvalidInput(_)));
    let err = ghost.send_message("not-a-room", json!({})).await.expect_err("sigil");
    assert!(matches!(err, ClientError::InvalidInput(_)));
    assert_eq!(hs.requests().len(), 5);
}

#[tokio::test]
async fn identity_assertion_only_for_non_bot_intents() {
    let hs = FakeHs::start(|r| {
        if r.path.ends_with("/whoami") {
            Reply::ok(json!({"user_id": r.q("user_id").unwrap_or(BOT)}))
        } else {
            Reply::ok(json!({"event_id": "$e"}))
        }
    })
    .await;
    let (client, _) = client_for(&hs);
    client.intent(GHOST).send_message(ROOM, json!({})).await.expect("ghost");
    client.bot().send_message(ROOM, json!({})).await.expect("bot");
    client.intent(BOT).set_typing(ROOM, true, Duration::from_secs(5)).await.expect("typing");
    let who = client.intent(GHOST).whoami().await.expect("whoami");
    assert_eq!(who.user_id, GHOST);
    let reqs = hs.requests();
    assert_eq!(reqs[0].q("user_id"), Some(GHOST));
    assert_eq!(reqs[1].q("user_id"), None);
    assert_eq!(reqs[2].q("user_id"), None);
    assert_eq!(reqs[2].json(), json!({"typing": true, "timeout": 5000}));
    for r in &reqs {
        assert_eq!(r.auth.as_deref(), Some("Bearer as-secret"));
        assert!(r.q("access_token").is_none());
    }
}

#[tokio::test]
async fn ping_reports_duration() {
    let hs = FakeHs::start(|r| {
        if r.path == "/_matrix/client/v1/appservice/trestle/ping" && r.method == "POST" {
            Reply::ok(json!({"duration_ms": 42}))
        } else {
            Reply::err(404, "M_UNRECOGNIZED")
        }
    })
    .await;
    let (client, _) = client_for(&hs);
    let rtt = client.ping_appservice(Some("txn-1")).await.expect("ping");
    assert_eq!(rtt, Duration::from_millis(42));
    let reqs = hs.requests();
    assert_eq!(reqs[0].json(), json!({"transaction_id": "txn-1"}));
    assert_eq!(reqs[0].auth.as_deref(), Some("Bearer as-secret"));
}

#[tokio::test]
async fn ping_falls_back_to_unstable_endpoint() {
    let hs = FakeHs::start(|r| {
        if r.path == "/_matrix/client/unstable/fi.mau.msc2659/appservice/trestle/ping" {
            Reply::ok(json!({"duration_ms": 7}))
        } else {
            Reply::err(404, "M_UNRECOGNIZED")
        }
    })
    .await;
    let (client, _) = client_for(&hs);
    assert_eq!(client.ping_appservice(None).await.expect("ping"), Duration::from_millis(7));
}

#[tokio::test]
async fn wait_until_reachable_tolerates_a_late_homeserver() {
    // Reserve a port, then free it so connections are refused at first.
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = probe.local_addr().expect("addr");
    drop(probe);
    let (client, _) = client_with(config(url::Url::parse(&format!("http://{addr}")).expect("url")));
    let started = Instant::now();
    let waiter = tokio::spawn({
        let client = client.clone();
        async move { client.wait_until_reachable(std::future::pending()).await }
    });
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(!waiter.is_finished());
    let listener = TcpListener::bind(addr).await.expect("rebind");
    let pings = Arc::new(AtomicUsize::new(0));
    let p = Arc::clone(&pings);
    let hs = FakeHs::start_on(listener, move |_| {
        // The homeserver is up but cannot reach the appservice yet once.
        if p.fetch_add(1, Ordering::SeqCst) == 0 {
            Reply::err(502, "M_CONNECTION_FAILED")
        } else {
            Reply::ok(json!({"duration_ms": 3}))
        }
    });
    let result = tokio::time::timeout(Duration::from_secs(2), waiter)
        .await
        .expect("finishes")
        .expect("join");
    assert_eq!(result.expect("reachable"), Some(Duration::from_millis(3)));
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert_eq!(hs.requests().len(), 2);
}

#[tokio::test]
async fn wait_until_reachable_fails_clearly_on_permanent_errors() {
    let hs = FakeHs::start(|_| Reply::err(400, "M_URL_NOT_SET")).await;
    let (client, _) = client_for(&hs);
    let err = client.wait_until_reachable(std::future::pending()).await.expect_err("permanent");
    assert!(err.is_errcode("M_URL_NOT_SET"));
    assert_eq!(hs.requests().len(), 1);

    let hs = FakeHs::start(|_| Reply::err(403, "M_FORBIDDEN")).await;
    let (client, _) = client_for(&hs);
    let err = client.wait_until_reachable(std::future::pending()).await.expect_err("forbidden");
    assert!(err.is_errcode("M_FORBIDDEN"));
}

#[tokio::test]
async fn wait_until_reachable_stops_on_shutdown_and_handles_missing_ping() {
    let hs = FakeHs::start(|_| Reply::err(504, "M_CONNECTION_TIMEOUT")).await;
    let (client, _) = client_for(&hs);
    let err = client
        .wait_until_reachable(tokio::time::sleep(Duration::from_millis(150)))
        .await
        .expect_err("cancelled");
    assert!(matches!(err, ClientError::Cancelled));
    assert!(hs.requests().len() >= 2, "kept retrying until shutdown");

    let hs = FakeHs::start(|r| {
        if r.path == "/_matrix/client/versions" {
            Reply::ok(json!({"versions": ["v1.5"]}))
        } else {
            Reply::err(404, "M_UNRECOGNIZED")
        }
    })
    .await;
    let (client, _) = client_for(&hs);
    assert_eq!(
        client.wait_until_reachable(std::future::pending()).await.expect("versions ok"),
        None
    );
    let versions = client.versions().await.expect("versions");
    assert!(versions.supports("v1.5", "x"));
}

#[tokio::test]
async fn media_upload_and_download_with_legacy_fallback() {
    let hs = FakeHs::start(|r| {
        if r.path == "/_matrix/media/v3/upload" {
            Reply::ok(json!({"content_uri": "mxc://example.org/AbC123"}))
        } else if r.path.starts_with("/_matrix/client/v1/media/download/") {
            Reply::err(404, "M_UNRECOGNIZED")
        } else if r.path == "/_matrix/media/v3/download/example.org/AbC123" {
            Reply {
                status: 200,
                body: b"\x89PNG data".to_vec(),
                headers: vec![("content-type", "image/png".to_owned())],
                delay: Duration::ZERO,
            }
        } else {
            Reply::err(404, "M_NOT_FOUND")
        }
    })
    .await;
    let (client, _) = client_for(&hs);
    let ghost = client.intent(GHOST);
    let mxc = ghost
        .upload_media(&b"\x89PNG data"[..], "image/png", Some("cat pic.png"))
        .await
        .expect("upload");
    assert_eq!(mxc, "mxc://example.org/AbC123");
    let (data, ct) = ghost.download_media(&mxc).await.expect("download");
    assert_eq!(&data[..], b"\x89PNG data");
    assert_eq!(ct.as_deref(), Some("image/png"));

    let reqs = hs.requests();
    assert_eq!(reqs[0].content_type.as_deref(), Some("image/png"));
    assert_eq!(reqs[0].q("filename"), Some("cat pic.png"));
    assert_eq!(&reqs[0].body[..], b"\x89PNG data");
    assert_eq!(reqs[1].path, "/_matrix/client/v1/media/download/example.org/AbC123");
    assert_eq!(reqs[2].path, "/_matrix/media/v3/download/example.org/AbC123");

    // Not-found media does not fall back; bad URIs and content types are refused.
    let err = ghost.download_media("mxc://example.org/missing").await.expect_err("404");
    assert!(err.is_errcode("M_UNRECOGNIZED") || err.is_errcode("M_NOT_FOUND"));
    assert!(ghost.download_media("mxc://example.org/../etc").await.is_err());
    assert!(ghost.upload_media(&b"x"[..], "text/plain\r\nX-Evil: 1", None).await.is_err());
}

#[tokio::test]
async fn media_download_respects_size_limit() {
    let hs = FakeHs::start(|_| Reply {
        status: 200,
        body: vec![0u8; 4096],
        headers: vec![("content-type", "application/octet-stream".to_owned())],
        delay: Duration::ZERO,
    })
    .await;
    let mut cfg = config(hs.url.clone());
    cfg.max_media_bytes = 1024;
    let (client, _) = client_with(cfg);
    let err = client.bot().download_media("mxc://example.org/big").await.expect_err("too large");
    assert!(matches!(err, ClientError::TooLarge { limit: 1024 }));
}

#[tokio::test]
async fn power_levels_are_cached_and_updated() {
    let hs = FakeHs::start(|r| {
        if r.path.contains("/state/m.room.create/") {
            Reply::ok(json!({"room_version": "10", "creator": BOT}))
        } else if r.method == "GET" && r.path.contains("/state/m.room.power_levels/") {
            Reply::ok(json!({"users": {BOT: 100}, "users_default": 0}))
        } else {
            Reply::ok(json!({"event_id": "$pl"}))
        }
    })
    .await;
    let (client, _) = client_for(&hs);
    let bot = client.bot();
    let pl = bot.power_levels(ROOM).await.expect("pl");
    assert_eq!(pl["users"][BOT], json!(100));
    bot.power_levels(ROOM).await.expect("cached");
    assert_eq!(hs.requests().len(), 1);
    bot.set_user_power_level(ROOM, GHOST, 50).await.expect("set");
    let puts: Vec<_> = hs.requests().into_iter().filter(|r| r.method == "PUT").collect();
    assert_eq!(puts.len(), 1);
    assert_eq!(puts[0].json()["users"], json!({BOT: 100, GHOST: 50}));
    let cached = bot.power_levels(ROOM).await.expect("cached pl");
    assert_eq!(cached["users"][GHOST], json!(50));
}

#[tokio::test]
async fn v12_creator_power_level_is_left_alone() {
    let hs = FakeHs::start(|r| {
        if r.path.contains("/state/m.room.create/") {
            assert_eq!(r.q("format"), Some("event"));
            Reply::ok(
                json!({"type": "m.room.create", "sender": BOT, "content": {"room_version": "12"}}),
            )
        } else {
            Reply::ok(json!({"users": {}}))
        }
    })
    .await;
    let (client, _) = client_for(&hs);
    client.bot().set_user_power_level("!v12room", BOT, 100).await.expect("no-op");
    assert!(hs.requests().iter().all(|r| r.method == "GET"));
}

#[tokio::test]
async fn directory_and_membership_helpers() {
    let hs = FakeHs::start(|_| Reply::ok(json!({}))).await;
    let (client, _) = client_for(&hs);
    let ghost = client.intent(GHOST);
    ghost.set_room_directory_visibility("irc.libera", ROOM, true).await.expect("dir");
    ghost.kick(ROOM, "@bob:example.org", Some("bye")).await.expect("kick");
    ghost.ban(ROOM, "@bob:example.org", None).await.expect("ban");
    ghost.leave(ROOM).await.expect("leave");
    let reqs = hs.requests();
    assert_eq!(
        reqs[0].path,
        "/_matrix/client/v3/directory/list/appservice/irc.libera/%21room%3Aexample.org"
    );
    assert_eq!(reqs[0].json(), json!({"visibility": "public"}));
    assert_eq!(reqs[0].q("user_id"), None, "directory acts as the appservice");
    assert_eq!(reqs[1].json(), json!({"user_id": "@bob:example.org", "reason": "bye"}));
    assert_eq!(reqs[3].json(), json!({}));
    let cache = client.cache();
    assert_eq!(cache.membership(ROOM, "@bob:example.org").await.expect("c"), Some(Membership::Ban));
    assert_eq!(cache.membership(ROOM, GHOST).await.expect("c"), Some(Membership::Leave));
}

#[tokio::test]
async fn concurrent_power_level_edits_do_not_clobber_each_other() {
    let state = Arc::new(Mutex::new(json!({"users": {BOT: 100}})));
    let st = Arc::clone(&state);
    let hs = FakeHs::start(move |r| {
        if r.path.contains("/state/m.room.create/") {
            Reply::ok(json!({"room_version": "10"}))
        } else if r.path.contains("/state/m.room.power_levels/") && r.method == "GET" {
            // A slow read widens the race window.
            Reply::ok(st.lock().expect("pl").clone()).delay(Duration::from_millis(30))
        } else if r.path.contains("/state/m.room.power_levels/") {
            *st.lock().expect("pl") = r.json();
            Reply::ok(json!({"event_id": "$pl"}))
        } else {
            Reply::err(404, "M_UNRECOGNIZED")
        }
    })
    .await;
    let (client, _) = client_for(&hs);
    let bot = client.bot();
    let (a, b) = tokio::join!(
        bot.set_user_power_level(ROOM, "@a:example.org", 10),
        bot.set_user_power_level(ROOM, "@b:example.org", 20),
    );
    a.expect("a");
    b.expect("b");
    let users = state.lock().expect("pl")["users"].clone();
    assert_eq!(users, json!({BOT: 100, "@a:example.org": 10, "@b:example.org": 20}));
}

#[tokio::test]
async fn forbidden_send_invalidates_cached_join() {
    let hs = FakeHs::start(|r| {
        if r.path.contains("/send/") {
            Reply::err(403, "M_FORBIDDEN")
        } else {
            Reply::ok(json!({"room_id": ROOM}))
        }
    })
    .await;
    let (client, _) = client_for(&hs);
    client.cache().set_membership(ROOM, GHOST, Membership::Join).await.expect("seed");
    client.cache().mark_registered(GHOST).await.expect("seed");
    let ghost = client.intent(GHOST);
    ghost.ensure_joined(ROOM).await.expect("cached, no request");
    assert!(hs.requests().is_empty());
    assert!(ghost.send_message(ROOM, json!({})).await.is_err());
    assert_eq!(
        client.cache().membership(ROOM, GHOST).await.expect("cache"),
        Some(Membership::Leave)
    );
    ghost.ensure_joined(ROOM).await.expect("re-join");
    assert_eq!(hs.requests_to("/join/").len(), 1);
}
