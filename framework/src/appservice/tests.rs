//! In-process tests of the HTTP API: every answer to bad input, routing, prefix, dedupe.

use std::{collections::BTreeMap, sync::Mutex as StdMutex};

use async_trait::async_trait;
use axum::{body::Body, http::Request};
use http::StatusCode;
use tower::ServiceExt;

use super::*;
use crate::{
    config::QueueConfig,
    inbound::{HandleError, ItemHandler},
    registration::{Namespace, Namespaces, Registration},
    store::{SqliteStore, Store},
};

#[derive(Default)]
struct Fake {
    handled: StdMutex<Vec<String>>,
}

#[async_trait]
impl ItemHandler for Fake {
    async fn handle(&self, _t: &str, item: &txn::TxnItem) -> Result<(), HandleError> {
        self.handled.lock().unwrap().push(item.event_id.clone().unwrap_or_default());
        Ok(())
    }
    async fn dead_lettered(&self, _i: &txn::TxnItem, _e: &HandleError) {}
}

#[async_trait]
impl QueryHandler for Fake {
    async fn query_user(&self, user_id: &str) -> Result<bool, ApiError> {
        Ok(user_id.starts_with("@t_yes"))
    }
    async fn query_alias(&self, alias: &str) -> Result<bool, ApiError> {
        Ok(alias.starts_with("#t_yes"))
    }
    async fn thirdparty_protocol(&self, p: &str) -> Result<Option<Value>, ApiError> {
        Ok((p == "test").then(|| json!({"user_fields": ["nick"], "location_fields": [], "icon": "", "field_types": {}, "instances": []})))
    }
    async fn thirdparty_users(
        &self,
        _p: Option<&str>,
        f: &BTreeMap<String, String>,
    ) -> Result<Vec<Value>, ApiError> {
        Ok(f.get("nick").map(|n| vec![json!({"userid": format!("@t_{n}:x"), "protocol": "test", "fields": {"nick": n}})]).unwrap_or_default())
    }
    async fn thirdparty_locations(
        &self,
        _p: Option<&str>,
        _f: &BTreeMap<String, String>,
    ) -> Result<Vec<Value>, ApiError> {
        Ok(vec![])
    }
}

async fn app(prefix: &str) -> (Router, Arc<Fake>, Arc<dyn Store>) {
    let fake = Arc::new(Fake::default());
    let store: Arc<dyn Store> = Arc::new(SqliteStore::in_memory().await.unwrap());
    let reg = Registration::generate(
        "t",
        "http://x",
        "bot",
        Namespaces {
            users: vec![Namespace::prefixed('@', "t_", "x")],
            aliases: vec![Namespace::prefixed('#', "t_", "x")],
            rooms: vec![],
        },
        vec![],
        true,
    );
    let metrics = Metrics::new();
    let inbound = Inbound::new(
        Arc::clone(&store),
        fake.clone(),
        metrics.clone(),
        QueueConfig::default(),
        tokio_util::sync::CancellationToken::new(),
    );
    let state = AppState {
        hs_token: Arc::from("hs"),
        inbound,
        queries: fake.clone(),
        metrics,
        matcher: Arc::new(reg.matcher().unwrap()),
        ready: Arc::new(AtomicBool::new(true)),
        max_body: 64 * 1024,
        metrics_enabled: true,
        pings: Arc::default(),
        media: None,
    };
    (router(state, prefix), fake, store)
}

async fn call(
    app: &Router,
    method: &str,
    uri: &str,
    token: Option<&str>,
    body: &str,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = app.clone().oneshot(req.body(Body::from(body.to_owned())).unwrap()).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
    let v = serde_json::from_slice(&bytes)
        .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, v)
}

fn errcode(v: &Value) -> &str {
    v["errcode"].as_str().unwrap_or("<none>")
}

const TXN: &str = "/_matrix/app/v1/transactions/1";

#[tokio::test]
async fn bad_input_answers() {
    let (app, fake, _) = app("").await;
    let ok = r#"{"events": []}"#;
    let (s, v) = call(&app, "PUT", TXN, None, ok).await;
    assert_eq!((s, errcode(&v)), (StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN"));
    let (s, v) = call(&app, "PUT", TXN, Some("wrong"), ok).await;
    assert_eq!((s, errcode(&v)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"));
    // A wrong token is rejected before the body is even looked at.
    let (s, v) = call(&app, "PUT", TXN, Some("wrong"), "garbage").await;
    assert_eq!((s, errcode(&v)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"));
    let (s, v) = call(&app, "PUT", TXN, Some("hs"), "garbage").await;
    assert_eq!((s, errcode(&v)), (StatusCode::BAD_REQUEST, "M_NOT_JSON"));
    for shape in [r#"{"events": 5}"#, r#"{"events": "abc"}"#, r#"{"events": [null]}"#, "{}", "[]"] {
        let (s, v) = call(&app, "PUT", TXN, Some("hs"), shape).await;
        assert_eq!((s, errcode(&v)), (StatusCode::BAD_REQUEST, "M_BAD_JSON"), "{shape}");
        assert!(v["error"].is_string());
    }
    let big = format!(r#"{{"events": [], "pad": "{}"}}"#, "x".repeat(70 * 1024));
    let (s, v) = call(&app, "PUT", TXN, Some("hs"), &big).await;
    assert_eq!((s, errcode(&v)), (StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE"));
    let (s, v) = call(&app, "GET", "/_matrix/app/v1/nothing", Some("hs"), "").await;
    assert_eq!((s, errcode(&v)), (StatusCode::NOT_FOUND, "M_UNRECOGNIZED"));
    let (s, v) = call(&app, "GET", TXN, Some("hs"), "").await;
    assert_eq!((s, errcode(&v)), (StatusCode::METHOD_NOT_ALLOWED, "M_UNRECOGNIZED"));
    let (s, v) = call(&app, "DELETE", "/_matrix/app/v1/ping", Some("hs"), "").await;
    assert_eq!((s, errcode(&v)), (StatusCode::METHOD_NOT_ALLOWED, "M_UNRECOGNIZED"));
    // Nothing was handled by any of those.
    assert!(fake.handled.lock().unwrap().is_empty());
}

#[tokio::test]
async fn legacy_query_token_and_legacy_routes() {
    let (app, _, _) = app("").await;
    let (s, _) =
        call(&app, "PUT", "/transactions/9?access_token=hs", None, r#"{"events":[]}"#).await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) =
        call(&app, "PUT", "/transactions/9?access_token=nope", Some("hs"), r#"{"events":[]}"#)
            .await;
    assert_eq!((s, errcode(&v)), (StatusCode::FORBIDDEN, "M_FORBIDDEN"));
    let (s, _) = call(&app, "GET", "/users/@t_yes:x", Some("hs"), "").await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) =
        call(&app, "GET", "/_matrix/app/unstable/thirdparty/protocol/test", Some("hs"), "").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["user_fields"][0], "nick");
}

#[tokio::test]
async fn queries_ping_thirdparty_health_metrics() {
    let (app, _, _) = app("").await;
    let (s, v) = call(&app, "GET", "/_matrix/app/v1/users/@t_yes:x", Some("hs"), "").await;
    assert_eq!((s, v), (StatusCode::OK, json!({})));
    let (s, v) = call(&app, "GET", "/_matrix/app/v1/users/@t_no:x", Some("hs"), "").await;
    assert_eq!((s, errcode(&v)), (StatusCode::NOT_FOUND, "M_NOT_FOUND"));
    let (s, _) = call(&app, "GET", "/_matrix/app/v1/users/@other:x", Some("hs"), "").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = call(&app, "GET", "/_matrix/app/v1/rooms/%23t_yes_room:x", Some("hs"), "").await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = call(&app, "GET", "/_matrix/app/v1/rooms/%23t_no:x", Some("hs"), "").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, v) =
        call(&app, "POST", "/_matrix/app/v1/ping", Some("hs"), r#"{"transaction_id": null}"#).await;
    assert_eq!((s, v), (StatusCode::OK, json!({})));
    let (s, _) =
        call(&app, "POST", "/_matrix/app/v1/ping", Some("hs"), r#"{"transaction_id": "abc"}"#)
            .await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = call(
        &app,
        "GET",
        "/_matrix/app/v1/thirdparty/user/test?nick=bob&access_token=hs",
        None,
        "",
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v[0]["userid"], "@t_bob:x");
    let (s, _) = call(&app, "GET", "/_matrix/app/v1/thirdparty/user/test", Some("hs"), "").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) =
        call(&app, "GET", "/_matrix/app/v1/thirdparty/protocol/nope", Some("hs"), "").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, v) = call(&app, "GET", "/_matrix/app/v1/thirdparty/location", Some("hs"), "").await;
    assert_eq!((s, errcode(&v)), (StatusCode::BAD_REQUEST, "M_INVALID_PARAM"));
    let (s, _) = call(&app, "GET", "/health/live", None, "").await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = call(&app, "GET", "/health/ready", None, "").await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = call(&app, "GET", "/metrics", None, "").await;
    assert_eq!(s, StatusCode::OK);
    assert!(v.as_str().unwrap().contains("trestle_auth_failures_total"));
}

#[tokio::test]
async fn path_prefix_and_dedupe() {
    let (app, fake, store) = app("/bridge/").await;
    let body = r#"{"events": [{"type": "m.room.message", "room_id": "!r:x", "event_id": "$1", "sender": "@u:x", "content": {}}]}"#;
    let (s, v) = call(&app, "PUT", "/bridge/_matrix/app/v1/transactions/5", Some("hs"), body).await;
    assert_eq!((s, v), (StatusCode::OK, json!({})));
    let (s, _) = call(&app, "PUT", "/bridge/_matrix/app/v1/transactions/5", Some("hs"), body).await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = call(&app, "PUT", "/_matrix/app/v1/transactions/5", Some("hs"), body).await;
    assert_eq!((s, errcode(&v)), (StatusCode::NOT_FOUND, "M_UNRECOGNIZED"));
    for _ in 0..100 {
        if !fake.handled.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    assert_eq!(*fake.handled.lock().unwrap(), ["$1"]);
    // Persisted before the 200: the id is in the store.
    assert!(!store.insert_transaction("5", Bytes::new()).await.unwrap());
}
