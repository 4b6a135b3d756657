//! End-to-end tests of the framework through its example bridge (`examples/echo`) and a real
//! Synapse: registration, user and alias queries, messages both ways, dedupe across a restart,
//! `kill -9` mid-stream, and the answers to bad input.

use std::{path::PathBuf, time::Duration};

use serde_json::{Value, json};
use trestle_e2e::{BridgeProcess, Deployment, MatrixUser, Synapse, binary, wait_for};

struct Env {
    synapse: Synapse,
    bridge: BridgeProcess,
    hs_token: String,
    _dir: tempfile::TempDir,
}

impl Env {
    async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("trestle-echo-").tempdir()?;
        let d = Deployment::new(dir.path(), "echo");
        let config = |hs: &str| {
            format!(
                "{}database: {{ path: \"{}\" }}\n\
                 logging: {{ level: \"info,trestle=debug\", format: human }}\n\
                 metrics: {{ enabled: true }}\n\
                 permissions: {{ \"*\": user }}\n\
                 bridge: {{ reply_prefix: \"echo: \" }}\n",
                d.base_config(hs),
                d.database().display()
            )
        };
        let (synapse, bridge) = d.start(&binary("examples/echo")?, &config).await?;
        let reg = d.registration();
        let reg_yaml: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(&reg)?)?;
        let hs_token = reg_yaml["hs_token"].as_str().unwrap_or_default().to_owned();
        Ok(Self { synapse, bridge, hs_token, _dir: dir })
    }

    fn db(&self) -> PathBuf {
        self._dir.path().join("echo.db")
    }
}

fn is_echo_of(e: &Value, event_id: &str) -> bool {
    e["sender"] == "@echo_echo:localhost"
        && e["content"]["m.relates_to"]["m.in_reply_to"]["event_id"] == event_id
}

fn body(e: &Value) -> &str {
    e["content"]["body"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn registration_queries_and_messages_both_ways() -> anyhow::Result<()> {
    let env = Env::start().await?;
    // The bridge is ready only after Synapse answered its appservice ping, so the registration
    // was accepted.
    let alice = MatrixUser::register(&env.synapse.url(), "alice").await?;

    // User query: inviting a ghost that does not exist yet makes Synapse ask the bridge.
    let dm =
        alice.create_room(json!({"invite": ["@echo_bob:localhost"], "is_direct": true})).await?;
    let profile = wait_for("the ghost's displayname", Duration::from_secs(20), || async {
        let p = alice.profile("@echo_bob:localhost").await.ok()?;
        (p["displayname"] == "bob").then_some(p)
    })
    .await?;
    assert_eq!(profile["displayname"], "bob");
    assert!(!dm.is_empty());

    // Alias query: joining an alias in the namespace creates the portal on demand.
    let room = alice.join("#echo_lobby:localhost").await?;
    let info = alice.state(&room, "m.bridge", "echo/lobby").await?.expect("m.bridge state");
    assert_eq!(info["bridgebot"], "@echobot:localhost");
    assert_eq!(info["protocol"]["id"], "echo");
    assert!(alice.state(&room, "uk.half-shot.bridge", "echo/lobby").await?.is_some());

    // Matrix → bridge → Matrix: the ghost answers the user's message.
    let sent = alice.send_text(&room, "hello bridge").await?;
    let echo =
        alice.wait_for_message(&room, Duration::from_secs(30), |e| is_echo_of(e, &sent)).await?;
    assert_eq!(body(&echo), "echo: hello bridge");

    // A second join of the same alias finds the same room (no second portal).
    let again = alice.join("#echo_lobby:localhost").await?;
    assert_eq!(again, room);
    assert!(env.bridge.metric("trestle_transactions_total").await? >= 1.0);
    Ok(())
}

/// PUTs a transaction straight to the bridge, as Synapse would.
async fn put_txn(env: &Env, txn_id: &str, body: &Value) -> anyhow::Result<reqwest::StatusCode> {
    Ok(reqwest::Client::new()
        .put(format!("{}/_matrix/app/v1/transactions/{txn_id}", env.bridge.url))
        .bearer_auth(&env.hs_token)
        .json(body)
        .send()
        .await?
        .status())
}

#[tokio::test]
async fn repeated_transaction_is_a_no_op_across_a_restart() -> anyhow::Result<()> {
    let mut env = Env::start().await?;
    let alice = MatrixUser::register(&env.synapse.url(), "alice").await?;
    let room = alice.join("#echo_dedupe:localhost").await?;
    let event_id = "$trestle-dedupe-test-1";
    let txn = json!({"events": [{
        "type": "m.room.message", "room_id": room, "sender": alice.user_id, "event_id": event_id,
        "origin_server_ts": 1, "content": {"msgtype": "m.text", "body": "only once"}}]});
    assert_eq!(put_txn(&env, "dedupe-1", &txn).await?, 200);
    alice.wait_for_message(&room, Duration::from_secs(30), |e| is_echo_of(e, event_id)).await?;
    // The echo can reach the room a few milliseconds before the bridge records the event as
    // handled; a kill inside that window rightly handles it again (see the kill -9 test), so
    // restart only once the completion is on disk.
    // Every transaction received so far (Synapse's own pushes too: the portal's membership
    // events) must be complete, or the restart resumes them and counts them as processed.
    wait_for("every transaction recorded as complete", Duration::from_secs(30), || async {
        let done = env.bridge.metric("trestle_transactions_completed_total").await.ok()?;
        let new = env.bridge.metric("trestle_transactions_total{result=\"new\"}").await.ok()?;
        if done < 1.0 || done < new {
            return None;
        }
        // And nothing new arrives meanwhile.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let again = env.bridge.metric("trestle_transactions_total{result=\"new\"}").await.ok()?;
        (again == new).then_some(())
    })
    .await?;
    env.bridge.restart().await?;
    // Same id again after the restart: answered 200, recorded as a duplicate, handled never.
    assert_eq!(put_txn(&env, "dedupe-1", &txn).await?, 200);
    assert_eq!(env.bridge.metric("trestle_transactions_total{result=\"duplicate\"}").await?, 1.0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        env.bridge.metric("trestle_events_processed_total").await?,
        0.0,
        "the repeat was handled"
    );
    let echoes =
        alice.messages(&room, 100).await?.into_iter().filter(|e| is_echo_of(e, event_id)).count();
    assert_eq!(echoes, 1);
    Ok(())
}

#[tokio::test]
async fn kill_9_mid_stream_loses_nothing_and_duplicates_nothing() -> anyhow::Result<()> {
    let mut env = Env::start().await?;
    let alice = MatrixUser::register(&env.synapse.url(), "alice").await?;
    let room = alice.join("#echo_crash:localhost").await?;
    let mut sent = Vec::new();
    for i in 0..30 {
        sent.push(alice.send_text(&room, &format!("message {i}")).await?);
    }
    // Kill the bridge once some echoes are through, while the rest are in flight or queued.
    wait_for("ten echoes", Duration::from_secs(60), || async {
        let msgs = alice.messages(&room, 200).await.ok()?;
        let n = msgs.iter().filter(|e| e["sender"] == "@echo_echo:localhost").count();
        (n >= 10).then_some(())
    })
    .await?;
    env.bridge.kill_hard();
    alice.send_text(&room, "sent while the bridge is down").await.map(|id| sent.push(id))?;
    env.bridge.restart().await?;
    let all = wait_for("every message echoed", Duration::from_secs(120), || async {
        let msgs = alice.messages(&room, 300).await.ok()?;
        sent.iter().all(|id| msgs.iter().any(|e| is_echo_of(e, id))).then_some(msgs)
    })
    .await?;
    for id in &sent {
        let n = all.iter().filter(|e| is_echo_of(e, id)).count();
        assert_eq!(n, 1, "{id} was echoed {n} times");
    }
    assert!(env.db().exists());
    Ok(())
}

#[tokio::test]
async fn bad_input_gets_matrix_errors() -> anyhow::Result<()> {
    let env = Env::start().await?;
    let http = reqwest::Client::new();
    let url = |p: &str| format!("{}{p}", env.bridge.url);
    let txn = url("/_matrix/app/v1/transactions/bad-1");
    let check = |r: reqwest::Response, status: u16, errcode: &'static str| async move {
        assert_eq!(r.status().as_u16(), status);
        let v: Value = r.json().await.expect("a JSON error body");
        assert_eq!(v["errcode"], errcode, "{v}");
        assert!(v["error"].is_string());
    };
    check(http.put(&txn).json(&json!({"events": []})).send().await?, 401, "M_MISSING_TOKEN").await;
    check(
        http.put(&txn).bearer_auth("wrong").json(&json!({"events": []})).send().await?,
        403,
        "M_FORBIDDEN",
    )
    .await;
    check(
        http.put(&txn).bearer_auth(&env.hs_token).body("not json").send().await?,
        400,
        "M_NOT_JSON",
    )
    .await;
    check(
        http.put(&txn).bearer_auth(&env.hs_token).json(&json!({"events": 5})).send().await?,
        400,
        "M_BAD_JSON",
    )
    .await;
    check(
        http.put(&txn).bearer_auth(&env.hs_token).json(&json!({"events": [null]})).send().await?,
        400,
        "M_BAD_JSON",
    )
    .await;
    check(
        http.get(url("/_matrix/app/v1/nope")).bearer_auth(&env.hs_token).send().await?,
        404,
        "M_UNRECOGNIZED",
    )
    .await;
    check(http.get(&txn).bearer_auth(&env.hs_token).send().await?, 405, "M_UNRECOGNIZED").await;
    // After all that the bridge still works and handled nothing.
    assert_eq!(env.bridge.metric("trestle_events_processed_total").await?, 0.0);
    let r = http
        .post(url("/_matrix/app/v1/ping"))
        .bearer_auth(&env.hs_token)
        .json(&json!({}))
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    Ok(())
}
