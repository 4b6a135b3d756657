//! End-to-end tests of the XMPP bridge: a real Synapse, a real Prosody (the bridge is an
//! external component), a Matrix user on the client-server API and an XMPP user on a real c2s
//! connection (tokio-xmpp).

use std::time::Duration;

use serde_json::{Value, json};
use trestle_e2e::{
    BridgeProcess, Deployment, MatrixUser, Synapse, binary,
    prosody::{COMPONENT, MUC, Prosody, SECRET, XmppClient, payload, stanza},
};

const T: Duration = Duration::from_secs(30);
/// The bridge's file size limit in the tests.
const FILE_LIMIT: usize = 100_000;

struct Env {
    synapse: Synapse,
    prosody: Prosody,
    bridge: BridgeProcess,
    _dir: tempfile::TempDir,
}

async fn start() -> anyhow::Result<Env> {
    start_with(false).await
}

/// Like [`start`]; with `occupant_ids`, Prosody's rooms stamp XEP-0421 occupant-ids.
async fn start_with(occupant_ids: bool) -> anyhow::Result<Env> {
    let dir = tempfile::Builder::new().prefix("trestle-xmpp-").tempdir()?;
    let users = [("xalice", "secret-pass"), ("xbob", "secret-pass")];
    let prosody = if occupant_ids {
        Prosody::start_with_occupant_ids(&users).await?
    } else {
        Prosody::start(&users).await?
    };
    let d = Deployment::new(dir.path(), "xmpp");
    let config = |hs: &str| {
        format!(
            "{}database: {{ path: \"{}\" }}\n\
             logging: {{ level: \"info,trestle=debug,trestle_xmpp=debug\" }}\n\
             permissions: {{ \"*\": user }}\n\
             media_proxy: {{ public_url: \"http://127.0.0.1:{}/media\" }}\n\
             bridge:\n  component:\n    jid: {COMPONENT}\n    secret: {SECRET}\n    host: 127.0.0.1\n    port: {}\n\
             \x20 muc_services: [{MUC}]\n  connection:\n    reconnect_min_ms: 200\n    reconnect_max_ms: 2000\n\
             \x20 files:\n    max_bytes: {FILE_LIMIT}\n    allow_private_addresses: true\n",
            d.base_config(hs),
            d.database().display(),
            d.port,
            prosody.component_port()
        )
    };
    let (synapse, bridge) = d.start(&binary("trestle-xmpp")?, &config).await?;
    Ok(Env { synapse, prosody, bridge, _dir: dir })
}

fn body(e: &Value) -> &str {
    e["content"]["body"].as_str().unwrap_or_default()
}

const GHOST: &str = "@xmpp_test=40conference.localhost/_x_alice:localhost";

impl Env {
    /// The recent logs of the bridge and Prosody, for failure messages.
    fn logs(&self) -> String {
        format!(
            "--- bridge:\n{}\n--- prosody:\n{}",
            self.bridge.child.log_tail(60),
            self.prosody.log_tail(60)
        )
    }
}

/// Creates the portal from Matrix and has the XMPP user join the room.
async fn portal(env: &Env, room: &str) -> anyhow::Result<(MatrixUser, String, XmppClient)> {
    let alice = MatrixUser::register(&env.synapse.url(), "alice").await?;
    let room_id = alice.join(&format!("#xmpp_{room}_{MUC}:localhost")).await?;
    let xmpp = XmppClient::connect(env.prosody.c2s_port(), "xalice", "secret-pass").await?;
    // The bot is in the room (it created it); the Matrix user's occupant joins too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    xmpp.join(room, "XAlice").await?;
    let bot = format!("from=\"{room}@{MUC}/MatrixBridge\"");
    let puppet = format!("from=\"{room}@{MUC}/alice\"");
    xmpp.wait_presence(T, |p| p.contains(&bot)).await?;
    xmpp.wait_presence(T, |p| p.contains(&puppet)).await?;
    Ok((alice, room_id, xmpp))
}

#[tokio::test]
async fn portal_via_alias_and_messages_both_ways() -> anyhow::Result<()> {
    let mut env = start().await?;
    let r = portal_via_alias_and_messages_both_ways_body(&mut env).await;
    r.map_err(|e| e.context(env.logs()))
}

async fn portal_via_alias_and_messages_both_ways_body(env: &mut Env) -> anyhow::Result<()> {
    let (alice, room, xmpp) = portal(env, "test").await?;
    let ghost = GHOST.to_owned();
    // The bot created the room, not the XMPP user.
    let own = xmpp
        .presences()
        .into_iter()
        .find(|p| p.contains("/XAlice\"") && p.contains("code=\"110\""))
        .unwrap();
    assert!(!own.contains("code=\"201\""), "{own}");
    // The XMPP occupant is a ghost in the room, named after the nick.
    alice
        .wait_for_message(&room, T, |e| {
            e["type"] == "m.room.member" && e["state_key"] == ghost.as_str()
        })
        .await?;
    assert_eq!(alice.profile(&ghost).await?["displayname"], "XAlice");

    // XMPP → Matrix.
    xmpp.say("test", "x1", "hello from XMPP")?;
    let m = alice.wait_for_message(&room, T, |e| body(e) == "hello from XMPP").await?;
    assert_eq!(m["sender"], ghost.as_str());
    assert_eq!(m["content"]["msgtype"], "m.text");
    let first_event = m["event_id"].as_str().unwrap_or_default().to_owned();

    // Matrix → XMPP, from the Matrix user's own occupant.
    let hello = alice.send_text(&room, "hi from Matrix").await?;
    let seen = xmpp.wait_message(T, |s| s.body == "hi from Matrix").await?;
    assert_eq!(seen.nick, "alice");
    assert!(seen.xml.contains("urn:xmpp:sid:0"), "origin-id expected: {}", seen.xml);

    // Hostile text crosses intact, as text, both ways.
    let hostile = "<script>alert(1)</script> ]]> & \"q\" 'a' </body><body>";
    alice.send_text(&room, hostile).await?;
    let seen = xmpp.wait_message(T, |s| s.body.contains("alert(1)")).await?;
    assert_eq!(seen.body, hostile);
    assert!(!seen.xml.contains("<script>"), "{}", seen.xml);
    xmpp.say("test", "x2", &format!("back: {hostile}"))?;
    let m = alice.wait_for_message(&room, T, |e| body(e).starts_with("back: ")).await?;
    assert_eq!(body(&m), format!("back: {hostile}"));
    let back_event = m["event_id"].as_str().unwrap_or_default().to_owned();

    // Emotes both ways; HTML becomes plain text.
    alice.send(&room, "m.room.message", json!({"msgtype": "m.emote", "body": "waves"})).await?;
    xmpp.wait_message(T, |s| s.body == "/me waves" && s.nick == "alice").await?;
    xmpp.say("test", "x3", "/me dances")?;
    let m = alice.wait_for_message(&room, T, |e| body(e) == "dances").await?;
    assert_eq!(m["content"]["msgtype"], "m.emote");
    alice
        .send(
            &room,
            "m.room.message",
            json!({"msgtype": "m.text", "body": "x **bold**", "format": "org.matrix.custom.html",
                "formatted_body": "x <strong>bold</strong>"}),
        )
        .await?;
    let seen =
        xmpp.wait_message(T, |s| s.body.starts_with("x ") && s.body.contains("bold")).await?;
    assert!(!seen.body.contains("<strong>"), "{}", seen.body);

    // XEP-0308 correction → m.replace of the right event.
    xmpp.say_with(
        "test",
        "x4",
        "hello from XMPP (fixed)",
        vec![payload("replace", "urn:xmpp:message-correct:0", &[("id", "x1")])],
    )?;
    let m = alice
        .wait_for_message(&room, T, |e| {
            e["content"]["m.new_content"]["body"] == "hello from XMPP (fixed)"
        })
        .await?;
    assert_eq!(m["content"]["m.relates_to"]["event_id"], first_event.as_str());
    assert_eq!(m["content"]["m.relates_to"]["rel_type"], "m.replace");

    // m.replace → XEP-0308 correction; redaction → XEP-0424 retraction.
    alice
        .send(
            &room,
            "m.room.message",
            json!({"msgtype": "m.text", "body": "* hi from Matrix!", "m.new_content": {"msgtype": "m.text", "body": "hi from Matrix!"},
                "m.relates_to": {"rel_type": "m.replace", "event_id": hello}}),
        )
        .await?;
    let seen = xmpp.wait_message(T, |s| s.body == "hi from Matrix!").await?;
    assert!(
        seen.xml.contains("urn:xmpp:message-correct:0") && seen.xml.contains(&hello),
        "{}",
        seen.xml
    );
    alice.redact(&room, &hello).await?;
    let seen = xmpp.wait_message(T, |s| s.xml.contains("urn:xmpp:message-retract:1")).await?;
    assert_eq!(seen.nick, "alice");

    // XEP-0424 retraction (by the room's stanza-id) → redaction of the right event.
    let own = xmpp.wait_message(T, |s| s.body.starts_with("back: ") && s.nick == "XAlice").await?;
    let sid = own.stanza_id.clone().expect("the room stamps a stanza-id");
    xmpp.say_with(
        "test",
        "x5",
        "/me retracted a message",
        vec![payload("retract", "urn:xmpp:message-retract:1", &[("id", &sid)])],
    )?;
    trestle_e2e::wait_for("the redaction", T, || async {
        let events = alice.messages(&room, 100).await.ok()?;
        events
            .iter()
            .any(|e| e["type"] == "m.room.redaction" && e["redacts"] == back_event.as_str())
            .then_some(())
    })
    .await?;

    // An occupant's malformed presence (an invalid <show/>) reaches the bot: it is rejected and
    // logged, and the connection survives (no reconnect, messages keep flowing).
    xmpp.send(
        stanza("presence", &[("to", &format!("test@{MUC}/XAlice"))])
            .append(
                tokio_xmpp::minidom::Element::builder("show", "jabber:client")
                    .append("bogus")
                    .build(),
            )
            .build(),
    )?;
    xmpp.say("test", "x6", "still connected?")?;
    alice.wait_for_message(&room, T, |e| body(e) == "still connected?").await?;
    let log = env.bridge.child.log_tail(400);
    assert!(log.contains("rejecting a malformed stanza"), "{log}");
    assert!(!log.contains("component disconnected"), "{log}");

    // Nothing echoed back: one copy of each message on each side, no ghost for the Matrix user.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let events = alice.messages(&room, 100).await?;
    let count = |b: &str| events.iter().filter(|e| body(e) == b).count();
    assert_eq!(count("hello from XMPP"), 1);
    assert_eq!(count("waves"), 1);
    assert!(
        events.iter().all(|e| !e["sender"].as_str().unwrap_or_default().contains("/alice:")),
        "the Matrix user's occupant must never become a ghost"
    );
    let seen = xmpp.messages();
    assert_eq!(seen.iter().filter(|s| s.body == "hi from Matrix").count(), 1);
    assert_eq!(seen.iter().filter(|s| s.body == "hello from XMPP").count(), 1);

    // The subject becomes the Matrix topic, set by the bot.
    xmpp.set_subject("test", "All about <tests> & more")?;
    let topic = alice.wait_for_message(&room, T, |e| e["type"] == "m.room.topic").await?;
    assert_eq!(topic["content"]["topic"], "All about <tests> & more");
    assert_eq!(topic["sender"], "@xmppbot:localhost");

    // A displayname change becomes a nick change; leaving the room leaves the MUC.
    alice
        .put(
            &format!("/profile/{}/displayname", alice.user_id),
            json!({"displayname": "Alice Liddell"}),
        )
        .await?;
    let renamed = format!("from=\"test@{MUC}/Alice Liddell\"");
    xmpp.wait_presence(T, |p| p.contains(&renamed) && !p.contains("unavailable")).await?;
    alice.post(&format!("/rooms/{room}/leave"), json!({})).await?;
    xmpp.wait_presence(T, |p| p.contains(&renamed) && p.contains("type=\"unavailable\"")).await?;
    Ok(())
}

/// A bodyless groupchat message with `<reactions id=target>` holding `keys` (XEP-0444).
fn react(
    xmpp: &XmppClient,
    room: &str,
    id: &str,
    target: &str,
    keys: &[&str],
) -> anyhow::Result<()> {
    let mut r = payload("reactions", "urn:xmpp:reactions:0", &[("id", target)]);
    for k in keys {
        r.append_child(
            tokio_xmpp::minidom::Element::builder("reaction", "urn:xmpp:reactions:0")
                .append(*k)
                .build(),
        );
    }
    xmpp.send(
        stanza("message", &[("type", "groupchat"), ("to", &format!("{room}@{MUC}")), ("id", id)])
            .append(r)
            .append(payload("origin-id", "urn:xmpp:sid:0", &[("id", id)]))
            .build(),
    )
}

#[tokio::test]
async fn replies_and_reactions_both_ways() -> anyhow::Result<()> {
    let mut env = start().await?;
    let r = replies_and_reactions_body(&mut env).await;
    r.map_err(|e| e.context(env.logs()))
}

async fn replies_and_reactions_body(env: &mut Env) -> anyhow::Result<()> {
    let (alice, room, xmpp) = portal(env, "rr").await?;
    let ghost = "@xmpp_rr=40conference.localhost/_x_alice:localhost";
    let reactions_of = |events: &[Value], sender: &str| -> Vec<(String, String)> {
        let redacted: Vec<&str> = events
            .iter()
            .filter(|e| e["type"] == "m.room.redaction")
            .filter_map(|e| e["redacts"].as_str())
            .collect();
        let mut v: Vec<(String, String)> = events
            .iter()
            .filter(|e| e["type"] == "m.reaction" && e["sender"] == sender)
            .filter(|e| !redacted.contains(&e["event_id"].as_str().unwrap_or_default()))
            .map(|e| {
                let r = &e["content"]["m.relates_to"];
                (
                    r["event_id"].as_str().unwrap_or_default().to_owned(),
                    r["key"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        v.sort();
        v
    };

    // XMPP reply (XEP-0461, quote marked as a XEP-0428 fallback) → m.in_reply_to, quote removed.
    let question = alice.send_text(&room, "question from Matrix").await?;
    let q = xmpp.wait_message(T, |s| s.body == "question from Matrix").await?;
    let q_sid = q.stanza_id.clone().expect("the room stamps a stanza-id");
    let quote = "> alice: question from Matrix\n";
    let end = quote.chars().count().to_string();
    let mut fallback = payload("fallback", "urn:xmpp:fallback:0", &[("for", "urn:xmpp:reply:0")]);
    fallback.append_child(payload("body", "urn:xmpp:fallback:0", &[("start", "0"), ("end", &end)]));
    xmpp.say_with(
        "rr",
        "y1",
        &format!("{quote}answer from XMPP ✓"),
        vec![
            payload(
                "reply",
                "urn:xmpp:reply:0",
                &[("to", &format!("rr@{MUC}/alice")), ("id", &q_sid)],
            ),
            fallback,
        ],
    )?;
    let m = alice.wait_for_message(&room, T, |e| body(e).contains("answer from XMPP")).await?;
    assert_eq!(body(&m), "answer from XMPP ✓");
    assert_eq!(m["sender"], ghost);
    assert_eq!(m["content"]["m.relates_to"]["m.in_reply_to"]["event_id"], question.as_str());

    // Matrix reply → XEP-0461 reply to the room's stanza-id, with a quote as fallback.
    xmpp.say("rr", "y2", "original from XMPP")?;
    let orig = alice.wait_for_message(&room, T, |e| body(e) == "original from XMPP").await?;
    let orig_event = orig["event_id"].as_str().unwrap_or_default().to_owned();
    let own = xmpp.wait_message(T, |s| s.body == "original from XMPP").await?;
    let o_sid = own.stanza_id.clone().expect("the room stamps a stanza-id");
    alice
        .send(
            &room,
            "m.room.message",
            json!({"msgtype": "m.text", "body": "reply from Matrix",
                "m.relates_to": {"m.in_reply_to": {"event_id": orig_event}}}),
        )
        .await?;
    let seen = xmpp.wait_message(T, |s| s.body.ends_with("reply from Matrix")).await?;
    assert_eq!(seen.body, "> XAlice: original from XMPP\nreply from Matrix");
    assert_eq!(seen.nick, "alice");
    assert!(seen.xml.contains("urn:xmpp:reply:0"), "{}", seen.xml);
    assert!(seen.xml.contains(&format!("id=\"{o_sid}\"")), "{}", seen.xml);
    assert!(seen.xml.contains(&format!("to=\"rr@{MUC}/XAlice\"")), "{}", seen.xml);
    assert!(
        seen.xml.contains("urn:xmpp:fallback:0") && seen.xml.contains("end=\"29\""),
        "{}",
        seen.xml
    );

    // XMPP reactions (the full set each time) → m.reaction, and a removed one is redacted.
    react(&xmpp, "rr", "y3", &q_sid, &["👍", "🎉"])?;
    let want = vec![(question.clone(), "🎉".to_owned()), (question.clone(), "👍".to_owned())];
    trestle_e2e::wait_for("the ghost's two reactions", T, || async {
        let events = alice.messages(&room, 100).await.ok()?;
        (reactions_of(&events, ghost) == want).then_some(())
    })
    .await?;
    react(&xmpp, "rr", "y4", &q_sid, &["🎉"])?;
    let want = vec![(question.clone(), "🎉".to_owned())];
    trestle_e2e::wait_for("the 👍 redacted", T, || async {
        let events = alice.messages(&room, 100).await.ok()?;
        (reactions_of(&events, ghost) == want).then_some(())
    })
    .await?;

    // Matrix reactions → the user's full set on XMPP; redacting one sends the rest.
    let heart = alice
        .send(
            &room,
            "m.reaction",
            json!({"m.relates_to": {"rel_type": "m.annotation", "event_id": orig_event, "key": "❤️"}}),
        )
        .await?;
    let has = |s: &str, k: &str| s.contains(&format!(">{k}</reaction>"));
    let target = format!("id=\"{o_sid}\"");
    let s =
        xmpp.wait_stanza(T, |s| s.contains("urn:xmpp:reactions:0") && s.contains(&target)).await?;
    assert!(has(&s, "❤️") && s.contains(&format!("rr@{MUC}/alice")), "{s}");
    alice
        .send(
            &room,
            "m.reaction",
            json!({"m.relates_to": {"rel_type": "m.annotation", "event_id": orig_event, "key": "😂"}}),
        )
        .await?;
    xmpp.wait_stanza(T, |s| s.contains(&target) && has(s, "😂") && has(s, "❤️")).await?;
    alice.redact(&room, &heart).await?;
    xmpp.wait_stanza(T, |s| s.contains(&target) && has(s, "😂") && !has(s, "❤️")).await?;

    // No echoes: the Matrix user's reactions never come back as the ghost's, and nothing is
    // bridged twice.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let events = alice.messages(&room, 100).await?;
    assert_eq!(reactions_of(&events, ghost), want);
    assert_eq!(events.iter().filter(|e| e["type"] == "m.reaction").count(), 4);
    assert_eq!(events.iter().filter(|e| body(e) == "answer from XMPP ✓").count(), 1);
    assert_eq!(xmpp.messages().iter().filter(|s| s.body.ends_with("reply from Matrix")).count(), 1);
    Ok(())
}

/// An initial sync (a new `timeout` each time, so that Synapse does not answer from its cache).
async fn sync(user: &MatrixUser) -> anyhow::Result<Value> {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    user.get(&format!("/sync?timeout={n}")).await
}

/// Who Synapse says is typing in `room`.
async fn typing(user: &MatrixUser, room: &str) -> Option<Vec<String>> {
    let s = sync(user).await.ok()?;
    let eph = s["rooms"]["join"][room]["ephemeral"]["events"].as_array()?.clone();
    let t = eph.iter().find(|e| e["type"] == "m.typing")?;
    Some(
        t["content"]["user_ids"]
            .as_array()?
            .iter()
            .filter_map(|u| u.as_str().map(str::to_owned))
            .collect(),
    )
}

#[tokio::test]
async fn chat_states_and_typing_both_ways() -> anyhow::Result<()> {
    let mut env = start().await?;
    let r = chat_states_body(&mut env).await;
    r.map_err(|e| e.context(env.logs()))
}

async fn chat_states_body(env: &mut Env) -> anyhow::Result<()> {
    let (alice, room, xmpp) = portal(env, "cs").await?;
    let ghost = "@xmpp_cs=40conference.localhost/_x_alice:localhost";
    let state = |s: &str| {
        stanza("message", &[("type", "groupchat"), ("to", &format!("cs@{MUC}"))])
            .append(payload(s, "http://jabber.org/protocol/chatstates", &[]))
            .build()
    };
    alice
        .wait_for_message(&room, T, |e| e["type"] == "m.room.member" && e["state_key"] == ghost)
        .await?;

    // XMPP composing → the ghost types on Matrix; paused → it stops.
    xmpp.send(state("composing"))?;
    trestle_e2e::wait_for("the ghost typing", T, || async {
        typing(&alice, &room).await?.iter().any(|u| u == ghost).then_some(())
    })
    .await?;
    xmpp.send(state("paused"))?;
    trestle_e2e::wait_for("the ghost no longer typing", T, || async {
        (!typing(&alice, &room).await?.iter().any(|u| u == ghost)).then_some(())
    })
    .await?;

    // Matrix typing → composing from the user's occupant; stopping → paused.
    let from = format!("from=\"cs@{MUC}/alice\"");
    let path = format!("/rooms/{room}/typing/{}", alice.user_id);
    alice.put(&path, json!({"typing": true, "timeout": 30000})).await?;
    xmpp.wait_stanza(T, |s| {
        s.starts_with("<message") && s.contains(&from) && s.contains("<composing")
    })
    .await?;
    alice.put(&path, json!({"typing": false})).await?;
    xmpp.wait_stanza(T, |s| {
        s.starts_with("<message") && s.contains(&from) && s.contains("<paused")
    })
    .await?;

    // The occupant's own chat states never come back as the ghost's typing, and carry no body.
    let ours: Vec<String> = xmpp
        .stanzas()
        .into_iter()
        .filter(|s| s.contains(&from) && s.contains("chatstates"))
        .collect();
    assert!(ours.iter().all(|s| !s.contains("<body")), "{ours:?}");
    assert!(
        !typing(&alice, &room).await.unwrap_or_default().iter().any(|u| u.contains("/alice:")),
        "the Matrix user's occupant must never become a typing ghost"
    );
    Ok(())
}

/// A `chat` message from the test client.
fn chat(xmpp: &XmppClient, to: &str, id: &str, body: &str) -> anyhow::Result<()> {
    xmpp.send(
        stanza("message", &[("type", "chat"), ("to", to), ("id", id)])
            .append(
                tokio_xmpp::minidom::Element::builder("body", "jabber:client").append(body).build(),
            )
            .build(),
    )
}

#[tokio::test]
async fn private_chats_both_ways() -> anyhow::Result<()> {
    let mut env = start().await?;
    let r = private_chats_body(&mut env).await;
    r.map_err(|e| e.context(env.logs()))
}

async fn private_chats_body(env: &mut Env) -> anyhow::Result<()> {
    let alice = MatrixUser::register(&env.synapse.url(), "alice").await?;
    let bob = MatrixUser::register(&env.synapse.url(), "bob").await?;
    let xmpp = XmppClient::connect(env.prosody.c2s_port(), "xalice", "secret-pass").await?;
    // Available, so that the server delivers messages to the bare JID to this resource.
    xmpp.send(stanza("presence", &[]).build())?;
    let ghost = "@xmpp_xalice=40localhost:localhost";
    let chat_from = |who: &str, text: &str| {
        let from = format!("from=\"{who}=3alocalhost@{COMPONENT}/trestle\"");
        let body = format!(">{text}</body>");
        move |s: &str| {
            s.starts_with("<message")
                && s.contains("type=\"chat\"")
                && s.contains(&from)
                && s.contains(&body)
        }
    };

    // XMPP → a Matrix user's JID: the ghost creates a direct chat and invites them.
    chat(&xmpp, &format!("alice=3alocalhost@{COMPONENT}"), "dm1", "hello privately")?;
    let room = alice.wait_for_invite(T).await?;
    alice.join(&room).await?;
    let m = alice.wait_for_message(&room, T, |e| body(e) == "hello privately").await?;
    assert_eq!(m["sender"], ghost);
    let invite = alice
        .wait_for_message(&room, T, |e| {
            e["type"] == "m.room.member"
                && e["state_key"] == alice.user_id.as_str()
                && e["content"]["membership"] == "invite"
        })
        .await?;
    assert_eq!(invite["sender"], ghost);
    assert_eq!(invite["content"]["is_direct"], true);

    // Matrix → XMPP: a chat message from the user's own JID to the XMPP user.
    alice.send_text(&room, "hello back").await?;
    xmpp.wait_stanza(T, chat_from("alice", "hello back")).await?;
    // The next message uses the same room.
    chat(&xmpp, &format!("alice=3alocalhost@{COMPONENT}"), "dm2", "/me is still here")?;
    let m = alice.wait_for_message(&room, T, |e| body(e) == "is still here").await?;
    assert_eq!(m["content"]["msgtype"], "m.emote");

    // A Matrix user inviting the ghost of a bare JID to a DM reaches that JID, and answers come
    // back to that room.
    let bob_room = bob
        .create_room(
            json!({"invite": [ghost], "is_direct": true, "preset": "trusted_private_chat"}),
        )
        .await?;
    bob.wait_for_message(&bob_room, T, |e| {
        e["type"] == "m.room.member"
            && e["state_key"] == ghost
            && e["content"]["membership"] == "join"
    })
    .await?;
    bob.send_text(&bob_room, "bob here <b>&</b>").await?;
    xmpp.wait_stanza(T, chat_from("bob", "bob here &lt;b&gt;&amp;&lt;/b&gt;")).await?;
    chat(&xmpp, &format!("bob=3alocalhost@{COMPONENT}"), "dm3", "hi bob")?;
    let m = bob.wait_for_message(&bob_room, T, |e| body(e) == "hi bob").await?;
    assert_eq!(m["sender"], ghost);

    // Nothing duplicated or echoed.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let events = alice.messages(&room, 100).await?;
    assert_eq!(events.iter().filter(|e| body(e) == "hello privately").count(), 1);
    assert_eq!(events.iter().filter(|e| e["type"] == "m.room.message").count(), 3);
    let n = xmpp.stanzas().iter().filter(|s| chat_from("alice", "hello back")(s)).count();
    assert_eq!(n, 1);

    // When the Matrix user leaves the direct chat, the next message opens a new one.
    alice.post(&format!("/rooms/{room}/leave"), json!({})).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    chat(&xmpp, &format!("alice=3alocalhost@{COMPONENT}"), "dm4", "are you there?")?;
    // (Our own sync: Synapse caches the identical initial sync `wait_for_invite` starts with.)
    let again = trestle_e2e::wait_for("a new invite", T, || async {
        let s = sync(&alice).await.ok()?;
        s["rooms"]["invite"].as_object()?.keys().find(|r| **r != room).cloned()
    })
    .await?;
    alice.join(&again).await?;
    alice.wait_for_message(&again, T, |e| body(e) == "are you there?").await?;
    Ok(())
}

#[tokio::test]
async fn restarts_of_prosody_and_the_bridge_rejoin_and_duplicate_nothing() -> anyhow::Result<()> {
    let mut env = start().await?;
    let r = restarts_of_prosody_and_the_bridge_rejoin_and_duplicate_nothing_body(&mut env).await;
    r.map_err(|e| e.context(env.logs()))
}

async fn restarts_of_prosody_and_the_bridge_rejoin_and_duplicate_nothing_body(
    env: &mut Env,
) -> anyhow::Result<()> {
    let (alice, room, xmpp) = portal(env, "restart").await?;
    xmpp.say("restart", "b1", "before restart x")?;
    alice.wait_for_message(&room, T, |e| body(e) == "before restart x").await?;
    alice.send_text(&room, "before restart m").await?;
    xmpp.wait_message(T, |s| s.body == "before restart m").await?;

    env.prosody.restart().await?;
    xmpp.wait_online(2).await?;
    // The bridge reconnects and rejoins: the bot and the Matrix user's occupant come back.
    let presences_before = xmpp.presences().len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    xmpp.join("restart", "XAlice").await?;
    let back = |who: &'static str| {
        let xmpp = &xmpp;
        async move {
            let from = format!("from=\"restart@{MUC}/{who}\"");
            trestle_e2e::wait_for("an occupant to come back", T, || async {
                xmpp.presences()[presences_before..].iter().any(|p| p.contains(&from)).then_some(())
            })
            .await
        }
    };
    back("MatrixBridge").await?;
    back("alice").await?;

    xmpp.say("restart", "a1", "after restart x")?;
    alice.wait_for_message(&room, T, |e| body(e) == "after restart x").await?;
    alice.send_text(&room, "after restart m").await?;
    xmpp.wait_message(T, |s| s.body == "after restart m").await?;

    tokio::time::sleep(Duration::from_secs(3)).await;
    let events = alice.messages(&room, 100).await?;
    for b in ["before restart x", "after restart x", "before restart m", "after restart m"] {
        assert_eq!(events.iter().filter(|e| body(e) == b).count(), 1, "{b} on Matrix");
    }
    let seen = xmpp.messages();
    for b in ["before restart m", "after restart m"] {
        assert_eq!(seen.iter().filter(|s| s.body == b && !s.delayed).count(), 1, "{b} on XMPP");
    }

    // The bridge itself killed (SIGKILL) and started again: it logs in, rejoins, and the
    // Matrix member comes back from the stored membership; still nothing doubled.
    env.bridge.restart().await?;
    xmpp.say("restart", "k1", "after bridge restart x")?;
    alice.wait_for_message(&room, T, |e| body(e) == "after bridge restart x").await?;
    alice.send_text(&room, "after bridge restart m").await?;
    let seen = xmpp.wait_message(T, |s| s.body == "after bridge restart m").await?;
    assert_eq!(seen.nick, "alice");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let events = alice.messages(&room, 100).await?;
    for b in
        ["before restart x", "after restart x", "after bridge restart x", "after bridge restart m"]
    {
        assert_eq!(
            events.iter().filter(|e| body(e) == b).count(),
            1,
            "{b} on Matrix after the bridge restart"
        );
    }
    let seen = xmpp.messages();
    for b in ["before restart m", "after restart m", "after bridge restart m"] {
        assert_eq!(
            seen.iter().filter(|s| s.body == b).count(),
            1,
            "{b} on XMPP after the bridge restart"
        );
    }
    Ok(())
}

#[tokio::test]
async fn portals_by_command_and_plumbing_by_room_admins() -> anyhow::Result<()> {
    let mut env = start().await?;
    let r = commands_body(&mut env).await;
    r.map_err(|e| e.context(env.logs()))
}

/// `!join` creates a chat's portal and invites the user; `!plumb` bridges a room its admin
/// already has (refused to anyone else), messages cross both ways, and `!unlink` ends it.
async fn commands_body(env: &mut Env) -> anyhow::Result<()> {
    const BOT: &str = "@xmppbot:localhost";
    let alice = MatrixUser::register(&env.synapse.url(), "alice").await?;
    let bob = MatrixUser::register(&env.synapse.url(), "bob").await?;
    let xmpp = XmppClient::connect(env.prosody.c2s_port(), "xalice", "secret-pass").await?;
    let admin = alice.admin_room(BOT).await?;

    // Bad input gets a clear answer.
    let r = alice.command(&admin, BOT, "!join not-a-chat").await?;
    assert!(r.contains("not a chat address"), "{r}");
    let r = alice.command(&admin, BOT, "!join room@elsewhere.example").await?;
    assert!(r.contains("does not bridge chats of elsewhere.example"), "{r}");

    // !join: the portal is created and alice invited; the bot is in the chat.
    let r = alice.command(&admin, BOT, &format!("!join bycmd@{MUC}")).await?;
    assert!(r.contains("Invited you"), "{r}");
    let portal = alice.wait_for_invite(T).await?;
    alice.join(&portal).await?;
    xmpp.join("bycmd", "XAlice").await?;
    xmpp.wait_presence(T, |p| p.contains(&format!("from=\"bycmd@{MUC}/MatrixBridge\""))).await?;
    xmpp.say("bycmd", "c1", "hello via !join")?;
    alice.wait_for_message(&portal, T, |e| body(e) == "hello via !join").await?;

    // !plumb of alice's own room; bob, who does not administer it, is refused.
    let own =
        alice.create_room(json!({"preset": "public_chat", "invite": [BOT, bob.user_id]})).await?;
    bob.join(&own).await?;
    let bob_admin = bob.admin_room(BOT).await?;
    let r = bob.command(&bob_admin, BOT, &format!("!plumb {own} plumbed@{MUC}")).await?;
    assert!(r.contains("only an admin"), "{r}");
    // The bot gets the power to mark the room as bridged (m.bridge state).
    let mut pl = alice.state(&own, "m.room.power_levels", "").await?.unwrap_or_default();
    pl["users"][BOT] = json!(50);
    alice.put(&format!("/rooms/{own}/state/m.room.power_levels/"), pl).await?;
    let r = alice.command(&admin, BOT, &format!("!plumb {own} plumbed@{MUC}")).await?;
    assert!(r.contains("is now bridged") && !r.contains("could not mark"), "{r}");
    let r = alice.command(&admin, BOT, &format!("!plumb {own} bycmd@{MUC}")).await?;
    assert!(r.contains("bridged already"), "{r}");
    let states = alice.get(&format!("/rooms/{own}/state")).await?;
    assert!(
        states.as_array().is_some_and(|a| a.iter().any(|e| {
            e["type"] == "m.bridge" && e["content"]["channel"]["id"] == format!("plumbed@{MUC}")
        })),
        "no m.bridge state: {states}"
    );
    xmpp.join("plumbed", "XAlice").await?;
    xmpp.wait_presence(T, |p| p.contains(&format!("from=\"plumbed@{MUC}/MatrixBridge\""))).await?;
    xmpp.say("plumbed", "p1", "into the plumbed room")?;
    alice.wait_for_message(&own, T, |e| body(e) == "into the plumbed room").await?;
    alice.send_text(&own, "out of the plumbed room").await?;
    xmpp.wait_message(T, |s| s.body == "out of the plumbed room").await?;

    // !unlink: bob may not; alice may. The bot leaves the chat and the room is told.
    let r = bob.command(&bob_admin, BOT, &format!("!unlink {own}")).await?;
    assert!(r.contains("only an admin"), "{r}");
    let before = xmpp.presences().len();
    let r = alice.command(&admin, BOT, &format!("!unlink plumbed@{MUC}")).await?;
    assert!(r.contains("is unlinked"), "{r}");
    alice.wait_for_message(&own, T, |e| body(e).contains("no longer bridged")).await?;
    trestle_e2e::wait_for("the bot leaving the chat", T, || async {
        xmpp.presences()[before..]
            .iter()
            .any(|p| {
                p.contains(&format!("from=\"plumbed@{MUC}/MatrixBridge\""))
                    && p.contains("type=\"unavailable\"")
            })
            .then_some(())
    })
    .await?;
    let r = alice.command(&admin, BOT, &format!("!unlink {own}")).await?;
    assert!(r.contains("is not bridged"), "{r}");
    Ok(())
}

#[tokio::test]
async fn entity_capabilities_are_announced_and_answered() -> anyhow::Result<()> {
    let mut env = start().await?;
    let r = entity_capabilities_body(&mut env).await;
    r.map_err(|e| e.context(env.logs()))
}

/// XEP-0115: the presence of a Matrix user's occupant carries the caps of what puppets support;
/// disco#info at `node#ver` answers exactly that (the XMPP client can check the hash), and an
/// unknown node is `item-not-found`.
async fn entity_capabilities_body(env: &mut Env) -> anyhow::Result<()> {
    let (_alice, _room, xmpp) = portal(env, "caps").await?;
    let from = format!("from=\"caps@{MUC}/alice\"");
    let presence = xmpp
        .wait_presence(T, |p| p.contains(&from) && p.contains("http://jabber.org/protocol/caps"))
        .await?;
    let attr = |name: &str| {
        let key = format!("{name}=\"");
        let start = presence.find(&key)? + key.len();
        Some(presence[start..].split('"').next()?.to_owned())
    };
    let (node, ver) = (attr("node").expect("a node"), attr("ver").expect("a ver"));
    assert_eq!(attr("hash").as_deref(), Some("sha-1"), "{presence}");
    let puppet = format!("alice=3alocalhost@{COMPONENT}/trestle");
    let ask = |id: &'static str, node: String| {
        xmpp.send(
            stanza("iq", &[("type", "get"), ("id", id), ("to", &puppet)])
                .append(payload(
                    "query",
                    "http://jabber.org/protocol/disco#info",
                    &[("node", &node)],
                ))
                .build(),
        )
    };
    ask("caps1", format!("{node}#{ver}"))?;
    let info = xmpp.wait_stanza(T, |s| s.contains("id=\"caps1\"")).await?;
    assert!(info.contains("type=\"result\"") && info.contains(&format!("#{ver}")), "{info}");
    // The client's own check (XEP-0115 §5.4): the hash of the identities and features answered.
    let mut features: Vec<&str> = info
        .split("<feature ")
        .skip(1)
        .filter_map(|f| f.split("var=\"").nth(1)?.split('"').next())
        .collect();
    features.sort_unstable();
    assert!(features.contains(&"http://jabber.org/protocol/caps"), "{info}");
    let mut s = "client/bot//<".to_owned();
    for f in &features {
        s.push_str(f);
        s.push('<');
    }
    use sha1::Digest as _;
    let expected =
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, sha1::Sha1::digest(s));
    assert_eq!(ver, expected, "{info}");
    ask("caps2", format!("{node}#not-our-ver"))?;
    let wrong = xmpp.wait_stanza(T, |s| s.contains("id=\"caps2\"")).await?;
    assert!(wrong.contains("type=\"error\"") && wrong.contains("item-not-found"), "{wrong}");
    Ok(())
}

#[tokio::test]
async fn component_answers_disco_version_and_ping_and_rejects_private_messages()
-> anyhow::Result<()> {
    let mut env = start().await?;
    let r =
        component_answers_disco_version_and_ping_and_rejects_private_messages_body(&mut env).await;
    r.map_err(|e| e.context(env.logs()))
}

async fn component_answers_disco_version_and_ping_and_rejects_private_messages_body(
    env: &mut Env,
) -> anyhow::Result<()> {
    let xmpp = XmppClient::connect(env.prosody.c2s_port(), "xalice", "secret-pass").await?;
    // disco#info on the component lists what it implements.
    let info = xmpp.iq_get(COMPONENT, "query", "http://jabber.org/protocol/disco#info").await?;
    assert!(info.contains("type=\"result\""), "{info}");
    for f in [
        "urn:xmpp:ping",
        "jabber:iq:version",
        "urn:xmpp:message-correct:0",
        "urn:xmpp:message-retract:1",
        "urn:xmpp:reply:0",
        "urn:xmpp:fallback:0",
        "urn:xmpp:reactions:0",
        "http://jabber.org/protocol/chatstates",
        "urn:xmpp:chat-markers:0",
        "jabber:x:oob",
    ] {
        assert!(info.contains(f), "{f} missing: {info}");
    }
    // Nothing that is not implemented (delivery receipts, uploads to the component).
    for f in ["urn:xmpp:receipts", "urn:xmpp:http:upload:0"] {
        assert!(!info.contains(f), "{f} announced: {info}");
    }
    let version = xmpp.iq_get(COMPONENT, "query", "jabber:iq:version").await?;
    assert!(version.contains("Trestle XMPP bridge"), "{version}");
    let ping = xmpp.iq_get(&format!("bridge@{COMPONENT}/trestle"), "ping", "urn:xmpp:ping").await?;
    assert!(ping.contains("type=\"result\""), "{ping}");
    // An unknown user and an unsupported query get stanza errors.
    let unknown = xmpp.iq_get(&format!("nobody@{COMPONENT}"), "query", "jabber:iq:version").await?;
    assert!(unknown.contains("type=\"error\"") && unknown.contains("item-not-found"), "{unknown}");
    let unsupported = xmpp.iq_get(COMPONENT, "query", "jabber:iq:last").await?;
    assert!(unsupported.contains("type=\"error\""), "{unsupported}");
    // A stanza the parsers reject (an iq get without a payload) gets bad-request, not a
    // dropped connection.
    xmpp.send(stanza("iq", &[("type", "get"), ("id", "bad1"), ("to", COMPONENT)]).build())?;
    let bad = xmpp.wait_stanza(T, |s| s.contains("id=\"bad1\"")).await?;
    assert!(bad.contains("type=\"error\"") && bad.contains("bad-request"), "{bad}");
    let ping = xmpp.iq_get(COMPONENT, "ping", "urn:xmpp:ping").await?;
    assert!(ping.contains("type=\"result\""), "{ping}");
    // A private message to the bot is refused with an error, not silently dropped.
    let to = format!("bridge@{COMPONENT}");
    xmpp.send(
        stanza("message", &[("type", "chat"), ("to", &to), ("id", "pm1")])
            .append(
                tokio_xmpp::minidom::Element::builder("body", "jabber:client")
                    .append("psst")
                    .build(),
            )
            .build(),
    )?;
    let err =
        xmpp.wait_stanza(T, |s| s.contains("id=\"pm1\"") && s.contains("type=\"error\"")).await?;
    assert!(err.contains("feature-not-implemented"), "{err}");
    // A "groupchat" message that does not come from a bridged room is refused as spoofed.
    xmpp.send(
        stanza(
            "message",
            &[
                ("type", "groupchat"),
                ("to", &format!("bridge@{COMPONENT}/trestle")),
                ("id", "spoof1"),
            ],
        )
        .append(
            tokio_xmpp::minidom::Element::builder("body", "jabber:client").append("fake").build(),
        )
        .build(),
    )?;
    let err = xmpp
        .wait_stanza(T, |s| s.contains("id=\"spoof1\"") && s.contains("type=\"error\""))
        .await?;
    assert!(err.contains("not-acceptable"), "{err}");
    Ok(())
}

#[tokio::test]
async fn nick_conflict_gets_a_suffix_and_the_user_is_told() -> anyhow::Result<()> {
    let mut env = start().await?;
    let r = nick_conflict_body(&mut env).await;
    r.map_err(|e| e.context(env.logs()))
}

async fn nick_conflict_body(env: &mut Env) -> anyhow::Result<()> {
    // The XMPP user holds the nick "alice" before the Matrix user alice arrives.
    let xmpp = XmppClient::connect(env.prosody.c2s_port(), "xalice", "secret-pass").await?;
    xmpp.join("clash", "alice").await?;
    let alice = MatrixUser::register(&env.synapse.url(), "alice").await?;
    let room = alice.join(&format!("#xmpp_clash_{MUC}:localhost")).await?;
    let suffixed = format!("from=\"clash@{MUC}/alice[m]\"");
    xmpp.wait_presence(T, |p| p.contains(&suffixed)).await?;
    let notice = alice
        .wait_for_message(&room, T, |e| {
            e["content"]["msgtype"] == "m.notice" && body(e).contains("alice[m]")
        })
        .await?;
    assert!(body(&notice).contains("taken"), "{}", body(&notice));
    // Messages go out under the suffixed nick, and the XMPP "alice" is a ghost, not the user.
    alice.send_text(&room, "which alice?").await?;
    let seen = xmpp.wait_message(T, |s| s.body == "which alice?").await?;
    assert_eq!(seen.nick, "alice[m]");
    xmpp.say("clash", "c1", "the XMPP one")?;
    let m = alice.wait_for_message(&room, T, |e| body(e) == "the XMPP one").await?;
    assert_eq!(m["sender"], "@xmpp_clash=40conference.localhost/alice:localhost");
    Ok(())
}

/// Serves `files` (path, content type, bytes) over HTTP on loopback, as an XMPP user's upload
/// service (XEP-0363) would; returns the base URL.
async fn serve_files(files: Vec<(&'static str, &'static str, Vec<u8>)>) -> anyhow::Result<String> {
    let mut app = axum::Router::new();
    for (path, content_type, data) in files {
        app = app.route(
            path,
            axum::routing::get(move || {
                let data = data.clone();
                async move { ([(axum::http::header::CONTENT_TYPE, content_type)], data) }
            }),
        );
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(format!("http://{addr}"))
}

/// A 1×1 PNG.
const PNG: &[u8] = &[
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x06, 0x00, 0x00, 0x00, 0x1f, 0x15, 0xc4,
    0x89, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x44, 0x41, 0x54, 0x78, 0xda, 0x63, 0xf8, 0xff, 0xff, 0x3f,
    0x00, 0x05, 0xfe, 0x02, 0xfe, 0xa7, 0x35, 0x81, 0x84, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4e,
    0x44, 0xae, 0x42, 0x60, 0x82,
];

/// The text of the first `<name>` element in `xml` (entities for `&` unescaped).
fn element_text(xml: &str, name: &str) -> Option<String> {
    let start = xml.find(&format!("<{name}"))?;
    let open_end = start + xml[start..].find('>')? + 1;
    let close = open_end + xml[open_end..].find(&format!("</{name}>"))?;
    Some(xml[open_end..close].replace("&amp;", "&"))
}

#[tokio::test]
async fn files_both_ways() -> anyhow::Result<()> {
    let mut env = start().await?;
    let r = files_body(&mut env).await;
    r.map_err(|e| e.context(env.logs()))
}

async fn files_body(env: &mut Env) -> anyhow::Result<()> {
    let (alice, room, xmpp) = portal(env, "files").await?;
    let ghost = "@xmpp_files=40conference.localhost/_x_alice:localhost";
    let big = vec![7u8; FILE_LIMIT + 1];
    let base = serve_files(vec![
        ("/up/cat.png", "image/png", PNG.to_vec()),
        ("/up/big.bin", "application/octet-stream", big),
    ])
    .await?;
    let oob = |url: &str| {
        let mut x = payload("x", "jabber:x:oob", &[]);
        x.append_child(
            tokio_xmpp::minidom::Element::builder("url", "jabber:x:oob").append(url).build(),
        );
        x
    };

    // XMPP → Matrix: an OOB URL (body = URL, as XEP-0363 clients send it) becomes an m.image
    // uploaded to the homeserver, with its MIME type and size.
    let url = format!("{base}/up/cat.png");
    xmpp.say_with("files", "f1", &url, vec![oob(&url)])?;
    let m = alice.wait_for_message(&room, T, |e| e["content"]["msgtype"] == "m.image").await?;
    assert_eq!(m["sender"], ghost);
    assert_eq!(body(&m), "cat.png");
    assert_eq!(m["content"]["info"]["mimetype"], "image/png");
    assert_eq!(m["content"]["info"]["size"], PNG.len());
    let mxc = m["content"]["url"].as_str().unwrap_or_default();
    assert!(mxc.starts_with("mxc://localhost/"), "{m}");
    let (bytes, _) = alice.download(mxc).await?;
    assert_eq!(bytes, PNG);

    // Too large: the link arrives as text with the reason, nothing is uploaded.
    let big_url = format!("{base}/up/big.bin");
    xmpp.say_with("files", "f2", &big_url, vec![oob(&big_url)])?;
    let m = alice.wait_for_message(&room, T, |e| body(e).contains("big.bin")).await?;
    assert_eq!(m["content"]["msgtype"], "m.text");
    assert!(body(&m).contains("too large") && body(&m).contains(&big_url), "{m}");

    // Matrix → XMPP: an m.file goes as a signed media link, in the body and as XEP-0066 OOB;
    // fetching it returns the same bytes.
    let data = b"%PDF-1.4 not really a PDF \x00\x01\x02".to_vec();
    let mxc = alice.upload(data.clone(), "application/pdf").await?;
    alice
        .send(
            &room,
            "m.room.message",
            json!({"msgtype": "m.file", "body": "report.pdf", "filename": "report.pdf", "url": mxc,
                "info": {"mimetype": "application/pdf", "size": data.len()}}),
        )
        .await?;
    let seen =
        xmpp.wait_message(T, |s| s.nick == "alice" && s.xml.contains("jabber:x:oob")).await?;
    let link = element_text(&seen.xml, "url").expect("an OOB url");
    assert_eq!(seen.body, link);
    assert!(link.contains("/media/") && link.ends_with("/report%2Epdf"), "{link}");
    assert_eq!(element_text(&seen.xml, "desc").as_deref(), Some("report.pdf"));
    let resp = reqwest::get(&link).await?;
    assert!(resp.status().is_success(), "{}", resp.status());
    assert_eq!(resp.bytes().await?.to_vec(), data);

    // Private chats carry files too: an OOB URL sent to the Matrix user's JID arrives as an
    // m.image in the direct chat, and a Matrix file there goes back as a chat message with OOB.
    // (Available, so that the server delivers messages to the bare JID to this resource.)
    xmpp.send(stanza("presence", &[]).build())?;
    xmpp.send(
        stanza(
            "message",
            &[("type", "chat"), ("to", &format!("alice=3alocalhost@{COMPONENT}")), ("id", "fdm1")],
        )
        .append(
            tokio_xmpp::minidom::Element::builder("body", "jabber:client").append(&*url).build(),
        )
        .append(oob(&url))
        .build(),
    )?;
    let dm = alice.wait_for_invite(T).await?;
    alice.join(&dm).await?;
    let m = alice.wait_for_message(&dm, T, |e| e["content"]["msgtype"] == "m.image").await?;
    assert_eq!(m["sender"], "@xmpp_xalice=40localhost:localhost");
    assert_eq!(m["content"]["info"]["size"], PNG.len());
    alice
        .send(
            &dm,
            "m.room.message",
            json!({"msgtype": "m.file", "body": "report.pdf", "filename": "report.pdf", "url": mxc,
                "info": {"mimetype": "application/pdf", "size": data.len()}}),
        )
        .await?;
    let s = xmpp
        .wait_stanza(T, |s| {
            s.starts_with("<message") && s.contains("type=\"chat\"") && s.contains("jabber:x:oob")
        })
        .await?;
    assert!(element_text(&s, "url").is_some_and(|u| u.ends_with("/report%2Epdf")), "{s}");
    Ok(())
}

const NS_MARKERS: &str = "urn:xmpp:chat-markers:0";

#[tokio::test]
async fn read_markers_and_receipts_both_ways() -> anyhow::Result<()> {
    let mut env = start().await?;
    let r = markers_body(&mut env).await;
    r.map_err(|e| e.context(env.logs()))
}

async fn markers_body(env: &mut Env) -> anyhow::Result<()> {
    let (alice, room, xmpp) = portal(env, "mk").await?;
    let ghost = "@xmpp_mk=40conference.localhost/_x_alice:localhost";

    // Matrix messages ask for markers; an XMPP displayed marker (by the room's stanza-id) is
    // the ghost's read receipt on the event.
    let ev = alice.send_text(&room, "read me please").await?;
    let seen = xmpp.wait_message(T, |s| s.body == "read me please").await?;
    assert!(seen.xml.contains(&format!("<markable xmlns=\"{NS_MARKERS}\"")), "{}", seen.xml);
    let sid = seen.stanza_id.clone().expect("the room stamps a stanza-id");
    xmpp.send(
        stanza("message", &[("type", "groupchat"), ("to", &format!("mk@{MUC}")), ("id", "d1")])
            .append(payload("displayed", NS_MARKERS, &[("id", &sid)]))
            .build(),
    )?;
    trestle_e2e::wait_for("the ghost's read receipt", T, || async {
        let s = sync(&alice).await.ok()?;
        let eph = s["rooms"]["join"][&room]["ephemeral"]["events"].as_array()?.clone();
        eph.iter()
            .any(|e| e["type"] == "m.receipt" && e["content"][&ev]["m.read"][ghost].is_object())
            .then_some(())
    })
    .await?;

    // A Matrix read receipt on a markable XMPP message → a displayed marker from the user's
    // occupant, for the room's stanza-id.
    xmpp.say_with("mk", "m2", "did you read this?", vec![payload("markable", NS_MARKERS, &[])])?;
    let m = alice.wait_for_message(&room, T, |e| body(e) == "did you read this?").await?;
    let own = xmpp.wait_message(T, |s| s.body == "did you read this?").await?;
    let sid2 = own.stanza_id.clone().expect("the room stamps a stanza-id");
    let event = m["event_id"].as_str().unwrap_or_default();
    alice.post(&format!("/rooms/{room}/receipt/m.read/{event}"), json!({})).await?;
    let from = format!("from=\"mk@{MUC}/alice\"");
    let marker = format!("id=\"{sid2}\"");
    let s = xmpp
        .wait_stanza(T, |s| {
            s.starts_with("<message") && s.contains(&from) && s.contains("<displayed")
        })
        .await?;
    assert!(s.contains(&marker) && !s.contains("<body"), "{s}");
    // The ghost's own receipt never comes back as a marker from the Matrix user.
    let markers = xmpp
        .stanzas()
        .into_iter()
        .filter(|s| s.contains(&from) && s.contains("<displayed"))
        .count();
    assert_eq!(markers, 1);
    Ok(())
}

#[tokio::test]
async fn presence_both_ways() -> anyhow::Result<()> {
    let mut env = start().await?;
    let r = presence_body(&mut env).await;
    r.map_err(|e| e.context(env.logs()))
}

async fn presence_body(env: &mut Env) -> anyhow::Result<()> {
    let (alice, room, xmpp) = portal(env, "pr").await?;
    let ghost = "@xmpp_pr=40conference.localhost/_x_alice:localhost";
    let to = format!("pr@{MUC}/XAlice");
    let show = |show: &str, status: &str| {
        let mut p = stanza("presence", &[("to", &to)]);
        if !show.is_empty() {
            p = p.append(
                tokio_xmpp::minidom::Element::builder("show", "jabber:client").append(show).build(),
            );
        }
        p.append(
            tokio_xmpp::minidom::Element::builder("status", "jabber:client").append(status).build(),
        )
        .build()
    };
    let presence_is = |want: &'static str, status: &'static str| {
        let alice = &alice;
        async move {
            trestle_e2e::wait_for("the ghost's presence", T, || async {
                let id = percent_encoding::utf8_percent_encode(
                    ghost,
                    percent_encoding::NON_ALPHANUMERIC,
                );
                let p = alice.get(&format!("/presence/{id}/status")).await.ok()?;
                (p["presence"] == want && p["status_msg"] == status).then_some(())
            })
            .await
        }
    };

    // XMPP <show/> → the ghost's Matrix presence, with the status message.
    xmpp.send(show("away", "at lunch"))?;
    presence_is("unavailable", "at lunch").await?;
    xmpp.send(show("dnd", "in a meeting"))?;
    presence_is("unavailable", "in a meeting").await?;
    xmpp.send(show("", "back"))?;
    presence_is("online", "back").await?;

    // Matrix presence → the occupant's <show/>.
    alice
        .put(
            &format!("/presence/{}/status", alice.user_id),
            json!({"presence": "unavailable", "status_msg": "brb"}),
        )
        .await?;
    let from = format!("from=\"pr@{MUC}/alice\"");
    xmpp.wait_presence(T, |p| {
        p.contains(&from) && p.contains(">away</show>") && p.contains(">brb<")
    })
    .await?;
    let _ = room;
    Ok(())
}

/// Sets `user`'s power level in `room` as the bridge bot (with the registration's token: the
/// test users have no power in portals the bot created), read through `reader`.
async fn set_power_as_bot(
    env: &Env,
    reader: &MatrixUser,
    room: &str,
    user: &str,
    level: i64,
) -> anyhow::Result<()> {
    let reg: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(
        env._dir.path().join("xmpp-registration.yaml"),
    )?)?;
    let as_token = reg["as_token"].as_str().unwrap_or_default().to_owned();
    let mut pl = reader.state(room, "m.room.power_levels", "").await?.unwrap_or_default();
    pl["users"][user] = json!(level);
    let resp = reqwest::Client::new()
        .put(format!(
            "{}/_matrix/client/v3/rooms/{room}/state/m.room.power_levels/?user_id=@xmppbot:localhost",
            env.synapse.url()
        ))
        .bearer_auth(&as_token)
        .json(&pl)
        .send()
        .await?;
    anyhow::ensure!(resp.status().is_success(), "setting power levels: {}", resp.status());
    Ok(())
}

#[tokio::test]
async fn matrix_power_levels_become_affiliations_and_roles() -> anyhow::Result<()> {
    let mut env = start().await?;
    let r = matrix_power_body(&mut env).await;
    r.map_err(|e| e.context(env.logs()))
}

async fn matrix_power_body(env: &mut Env) -> anyhow::Result<()> {
    // The bot created the room, so it is its owner and may change roles. The bot makes alice
    // an admin on Matrix (the bridge ignores its own changes); alice then promotes bob.
    let (alice, room, xmpp) = portal(env, "pl").await?;
    set_power_as_bot(env, &alice, &room, &alice.user_id, 100).await?;
    let bob = MatrixUser::register(&env.synapse.url(), "bob").await?;
    bob.join(&room).await?;
    let from = format!("from=\"pl@{MUC}/bob\"");
    xmpp.wait_presence(T, |p| p.contains(&from)).await?;
    let set_bob = |level: i64| {
        let (alice, bob, room) = (&alice, &bob, &room);
        async move {
            let mut pl = alice.state(room, "m.room.power_levels", "").await?.unwrap_or_default();
            pl["users"][bob.user_id.as_str()] = json!(level);
            alice.put(&format!("/rooms/{room}/state/m.room.power_levels/"), pl).await
        }
    };
    let has = |p: &str, attrs: &[(&str, &str)]| {
        p.contains(&from) && attrs.iter().all(|(k, v)| p.contains(&format!("{k}=\"{v}\"")))
    };
    // Each change is seen by the XMPP user as a new presence of bob's occupant.
    let expect = |what: &'static str, attrs: &'static [(&'static str, &'static str)]| {
        let (xmpp, has) = (&xmpp, &has);
        let before = xmpp.presences().len();
        async move {
            trestle_e2e::wait_for(what, T, || async {
                xmpp.presences()[before..].iter().any(|p| has(p, attrs)).then_some(())
            })
            .await
        }
    };

    // Power level 50 → admin (and so moderator); back to 0 → a member participant; 100 → owner
    // (last: alice, at 100 herself, could not lower bob from there).
    let admin = expect("bob an admin", &[("affiliation", "admin"), ("role", "moderator")]);
    set_bob(50).await?;
    admin.await?;
    let member =
        expect("bob a member again", &[("affiliation", "member"), ("role", "participant")]);
    set_bob(0).await?;
    member.await?;
    let owner = expect("bob an owner", &[("affiliation", "owner"), ("role", "moderator")]);
    set_bob(100).await?;
    owner.await?;

    // A user given 50 before joining is an admin as soon as their occupant joins.
    let carol = MatrixUser::register(&env.synapse.url(), "carol").await?;
    let mut pl = alice.state(&room, "m.room.power_levels", "").await?.unwrap_or_default();
    pl["users"][carol.user_id.as_str()] = json!(50);
    alice.put(&format!("/rooms/{room}/state/m.room.power_levels/"), pl).await?;
    let carol_from = format!("from=\"pl@{MUC}/carol\"");
    let before = xmpp.presences().len();
    carol.join(&room).await?;
    trestle_e2e::wait_for("carol an admin on joining", T, || async {
        xmpp.presences()[before..]
            .iter()
            .any(|p| p.contains(&carol_from) && p.contains("affiliation=\"admin\""))
            .then_some(())
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn affiliations_become_power_levels_and_kicks_and_bans_are_bridged() -> anyhow::Result<()> {
    let mut env = start().await?;
    let r = moderation_body(&mut env).await;
    r.map_err(|e| e.context(env.logs()))
}

/// A MUC admin change (XEP-0045 §8/§9) of one `<item>` with `attrs`, from the test client.
fn admin(xmpp: &XmppClient, room: &str, id: &str, attrs: &[(&str, &str)]) -> anyhow::Result<()> {
    let mut item = payload("item", "http://jabber.org/protocol/muc#admin", attrs);
    item.append_child(
        tokio_xmpp::minidom::Element::builder("reason", "http://jabber.org/protocol/muc#admin")
            .append("enough")
            .build(),
    );
    let mut q = payload("query", "http://jabber.org/protocol/muc#admin", &[]);
    q.append_child(item);
    xmpp.send(
        stanza("iq", &[("type", "set"), ("id", id), ("to", &format!("{room}@{MUC}"))])
            .append(q)
            .build(),
    )
}

async fn moderation_body(env: &mut Env) -> anyhow::Result<()> {
    // The XMPP user creates the room (its owner), another XMPP user joins, then the portal.
    let owner = XmppClient::connect(env.prosody.c2s_port(), "xalice", "secret-pass").await?;
    owner.join("mod", "XAlice").await?;
    let bob = XmppClient::connect(env.prosody.c2s_port(), "xbob", "secret-pass").await?;
    bob.join("mod", "XBob").await?;
    let alice = MatrixUser::register(&env.synapse.url(), "alice").await?;
    let room = alice.join(&format!("#xmpp_mod_{MUC}:localhost")).await?;
    let owner_ghost = "@xmpp_mod=40conference.localhost/_x_alice:localhost";
    let bob_ghost = "@xmpp_mod=40conference.localhost/_x_bob:localhost";
    let level = |user: &'static str| {
        let alice = &alice;
        let room = &room;
        async move {
            let pl = alice.state(room, "m.room.power_levels", "").await.ok()??;
            pl["users"][user].as_i64()
        }
    };

    // The owner's ghost gets 100; a participant stays at the default; a moderator gets 50.
    trestle_e2e::wait_for("the owner's power level", T, || async {
        (level(owner_ghost).await == Some(100)).then_some(())
    })
    .await?;
    alice
        .wait_for_message(&room, T, |e| {
            e["type"] == "m.room.member"
                && e["state_key"] == bob_ghost
                && e["content"]["membership"] == "join"
        })
        .await?;
    assert_eq!(level(bob_ghost).await.unwrap_or(0), 0);
    admin(&owner, "mod", "mod1", &[("nick", "XBob"), ("role", "moderator")])?;
    trestle_e2e::wait_for("the moderator's power level", T, || async {
        (level(bob_ghost).await == Some(50)).then_some(())
    })
    .await?;

    // A kick (status 307) → the ghost is kicked on Matrix by the bot, with the reason.
    admin(&owner, "mod", "kick1", &[("nick", "XBob"), ("role", "none")])?;
    let kick = alice
        .wait_for_message(&room, T, |e| {
            e["type"] == "m.room.member"
                && e["state_key"] == bob_ghost
                && e["content"]["membership"] == "leave"
        })
        .await?;
    assert_eq!(kick["sender"], "@xmppbot:localhost");
    let reason = kick["content"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("Kicked") && reason.contains("enough"), "{kick}");

    // The user comes back; a ban (status 301) → the ghost is banned on Matrix.
    bob.join("mod", "XBob").await?;
    let kick_id = kick["event_id"].clone();
    trestle_e2e::wait_for("the ghost back in the room", T, || async {
        let events = alice.messages(&room, 100).await.ok()?;
        let after = events.iter().position(|e| e["event_id"] == kick_id)?;
        events[after..]
            .iter()
            .any(|e| {
                e["type"] == "m.room.member"
                    && e["state_key"] == bob_ghost
                    && e["content"]["membership"] == "join"
            })
            .then_some(())
    })
    .await?;
    // Back as a participant: the ghost's power level goes back to 0.
    trestle_e2e::wait_for("the ghost's power level back to 0", T, || async {
        (level(bob_ghost).await.unwrap_or(0) == 0).then_some(())
    })
    .await?;

    // A Matrix kick of the ghost by a user with the power to → the occupant is kicked on XMPP
    // by the user's own occupant (a moderator there).
    set_power_as_bot(env, &alice, &room, &alice.user_id, 50).await?;
    // Refused on XMPP while the user's occupant is only a participant there: told in a notice;
    // the occupant's next message brings its ghost back.
    alice
        .post(&format!("/rooms/{room}/kick"), json!({"user_id": bob_ghost, "reason": "first try"}))
        .await?;
    let notice = alice
        .wait_for_message(&room, T, |e| {
            e["content"]["msgtype"] == "m.notice" && body(e).contains("Could not kick XBob")
        })
        .await?;
    assert_eq!(notice["sender"], "@xmppbot:localhost");
    assert!(
        body(&notice).contains("not-allowed") || body(&notice).contains("forbidden"),
        "{notice}"
    );
    bob.say("mod", "b1", "still here")?;
    let m = alice.wait_for_message(&room, T, |e| body(e) == "still here").await?;
    assert_eq!(m["sender"], bob_ghost);

    admin(&owner, "mod", "mod2", &[("nick", "alice"), ("role", "moderator")])?;
    owner
        .wait_presence(T, |p| {
            p.contains(&format!("from=\"mod@{MUC}/alice\"")) && p.contains("role=\"moderator\"")
        })
        .await?;
    alice
        .post(&format!("/rooms/{room}/kick"), json!({"user_id": bob_ghost, "reason": "bye"}))
        .await?;
    let kicked = bob
        .wait_presence(T, |p| {
            p.contains(&format!("from=\"mod@{MUC}/XBob\""))
                && p.contains("code=\"307\"")
                && p.contains(">bye</reason>")
        })
        .await?;
    assert!(kicked.contains("type=\"unavailable\""), "{kicked}");
    bob.join("mod", "XBob").await?;

    admin(&owner, "mod", "ban1", &[("jid", "xbob@localhost"), ("affiliation", "outcast")])?;
    let ban = alice
        .wait_for_message(&room, T, |e| {
            e["type"] == "m.room.member"
                && e["state_key"] == bob_ghost
                && e["content"]["membership"] == "ban"
        })
        .await?;
    assert_eq!(ban["sender"], "@xmppbot:localhost");
    Ok(())
}

#[tokio::test]
async fn vcard_avatars_become_ghost_avatars() -> anyhow::Result<()> {
    let mut env = start().await?;
    let r = vcard_avatars_body(&mut env).await;
    r.map_err(|e| e.context(env.logs()))
}

async fn vcard_avatars_body(env: &mut Env) -> anyhow::Result<()> {
    let (alice, room, xmpp) = portal(env, "avatars").await?;
    let ghost = "@xmpp_avatars=40conference.localhost/_x_alice:localhost";
    alice
        .wait_for_message(&room, T, |e| e["type"] == "m.room.member" && e["state_key"] == ghost)
        .await?;
    let avatar = |alice: &MatrixUser| {
        let alice = alice.clone();
        async move {
            let p = alice.profile(ghost).await.ok()?;
            Some(p["avatar_url"].as_str().unwrap_or_default().to_owned())
        }
    };
    assert_eq!(avatar(&alice).await.as_deref(), Some(""));

    // The XMPP user stores a vCard with a photo and announces its hash in the room: the
    // bridge fetches the vCard through the room, and the ghost gets the photo as its avatar.
    let hash = xmpp.publish_vcard_photo(PNG).await?;
    xmpp.announce_avatar("avatars", "XAlice", &hash)?;
    xmpp.say("avatars", "a1", "right after the avatar")?;
    let mxc = trestle_e2e::wait_for("the ghost's avatar", T, || async {
        avatar(&alice).await.filter(|u| u.starts_with("mxc://"))
    })
    .await?;
    let (bytes, content_type) = alice.download(&mxc).await?;
    assert_eq!(bytes, PNG);
    assert_eq!(content_type, "image/png");
    // Messages are not held up, nor lost.
    alice.wait_for_message(&room, T, |e| body(e) == "right after the avatar").await?;

    // The same hash again changes nothing (no new upload).
    xmpp.announce_avatar("avatars", "XAlice", &hash)?;
    xmpp.say("avatars", "a2", "same avatar")?;
    alice.wait_for_message(&room, T, |e| body(e) == "same avatar").await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(avatar(&alice).await, Some(mxc.clone()));

    // A hash the vCard's photo does not have is not believed.
    xmpp.announce_avatar("avatars", "XAlice", &"ab".repeat(20))?;
    xmpp.say("avatars", "a3", "wrong hash")?;
    alice.wait_for_message(&room, T, |e| body(e) == "wrong hash").await?;
    trestle_e2e::wait_for("the wrong hash refused", T, || async {
        env.bridge.child.log_tail(200).contains("the vCard's photo has the hash").then_some(())
    })
    .await?;
    assert_eq!(avatar(&alice).await, Some(mxc.clone()));

    // An empty <photo/> clears the avatar.
    xmpp.announce_avatar("avatars", "XAlice", "")?;
    trestle_e2e::wait_for("the ghost's avatar cleared", T, || async {
        avatar(&alice).await.filter(String::is_empty).map(drop)
    })
    .await?;

    // A presence that says nothing: Prosody's mod_vcard_legacy adds the stored avatar's hash
    // (as it does for clients that publish XEP-0084 avatars), and the avatar comes back.
    xmpp.send(stanza("presence", &[("to", &format!("avatars@{MUC}/XAlice"))]).build())?;
    let mxc = trestle_e2e::wait_for("the ghost's avatar again", T, || async {
        avatar(&alice).await.filter(|u| u.starts_with("mxc://"))
    })
    .await?;
    assert_eq!(alice.download(&mxc).await?.0, PNG);
    Ok(())
}

#[tokio::test]
async fn matrix_avatars_become_vcard_avatars() -> anyhow::Result<()> {
    let mut env = start().await?;
    let r = matrix_avatars_body(&mut env).await;
    r.map_err(|e| e.context(env.logs()))
}

async fn matrix_avatars_body(env: &mut Env) -> anyhow::Result<()> {
    use base64::Engine as _;
    use sha1::Digest as _;
    let sha1 = |data: &[u8]| hex::encode(sha1::Sha1::digest(data));
    // The Matrix user has an avatar before joining the portal.
    let alice = MatrixUser::register(&env.synapse.url(), "alice").await?;
    let mxc = alice.upload(PNG.to_vec(), "image/png").await?;
    let profile = format!("/profile/{}/avatar_url", alice.user_id);
    alice.put(&profile, json!({"avatar_url": mxc})).await?;
    let room = alice.join(&format!("#xmpp_mxav_{MUC}:localhost")).await?;
    let xmpp = XmppClient::connect(env.prosody.c2s_port(), "xalice", "secret-pass").await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    xmpp.join("mxav", "XAlice").await?;

    // Their occupant's presence announces the photo's hash (XEP-0153)…
    let puppet = format!("from=\"mxav@{MUC}/alice\"");
    let hash = sha1(PNG);
    xmpp.wait_presence(T, |p| p.contains(&puppet) && p.contains(&hash)).await?;
    // …and their vCard, asked for through the room, has the photo.
    let answer = xmpp.iq_get(&format!("mxav@{MUC}/alice"), "vCard", "vcard-temp").await?;
    assert!(answer.contains("type=\"result\""), "{answer}");
    let b64 = base64::engine::general_purpose::STANDARD.encode(PNG);
    assert!(answer.contains(&format!("<BINVAL>{b64}</BINVAL>")), "{answer}");
    assert!(answer.contains("<TYPE>image/png</TYPE>"), "{answer}");

    // A new avatar is announced with a new presence, and the vCard follows.
    let mut other = PNG.to_vec();
    other.extend_from_slice(b"changed");
    let mxc2 = alice.upload(other.clone(), "image/png").await?;
    alice.put(&profile, json!({"avatar_url": mxc2})).await?;
    let hash2 = sha1(&other);
    xmpp.wait_presence(T, |p| p.contains(&puppet) && p.contains(&hash2)).await?;
    let answer = xmpp.iq_get(&format!("mxav@{MUC}/alice"), "vCard", "vcard-temp").await?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&other);
    assert!(answer.contains(&format!("<BINVAL>{b64}</BINVAL>")), "{answer}");

    // Removing it announces an empty photo; the vCard has none.
    alice.put(&profile, json!({"avatar_url": ""})).await?;
    xmpp.wait_presence(T, |p| {
        p.contains(&puppet) && (p.contains("<photo/>") || p.contains("<photo></photo>"))
    })
    .await?;
    let answer = xmpp.iq_get(&format!("mxav@{MUC}/alice"), "vCard", "vcard-temp").await?;
    assert!(answer.contains("type=\"result\"") && !answer.contains("BINVAL"), "{answer}");
    // Messages still flow.
    alice.send_text(&room, "after the avatars").await?;
    xmpp.wait_message(T, |s| s.body == "after the avatars").await?;
    Ok(())
}

#[tokio::test]
async fn matrix_bans_and_unbans_of_ghosts_ban_and_unban_on_xmpp() -> anyhow::Result<()> {
    let mut env = start().await?;
    let r = matrix_unban_body(&mut env).await;
    r.map_err(|e| e.context(env.logs()))
}

async fn matrix_unban_body(env: &mut Env) -> anyhow::Result<()> {
    // The bot created the room, so it is its owner and sees real JIDs.
    let (alice, room, xmpp) = portal(env, "unban").await?;
    let ghost = "@xmpp_unban=40conference.localhost/_x_alice:localhost";
    let member = |what: &'static str| {
        move |e: &Value| {
            e["type"] == "m.room.member"
                && e["state_key"] == ghost
                && e["content"]["membership"] == what
        }
    };
    alice.wait_for_message(&room, T, member("join")).await?;
    set_power_as_bot(env, &alice, &room, &alice.user_id, 50).await?;

    // A Matrix ban: the occupant is banned on XMPP (the user's occupant is only a moderator
    // there, so the bot does it) and cannot come back.
    alice.post(&format!("/rooms/{room}/ban"), json!({"user_id": ghost, "reason": "spam"})).await?;
    let from = format!("from=\"unban@{MUC}/XAlice\"");
    xmpp.wait_presence(T, |p| p.contains(&from) && p.contains("code=\"301\"")).await?;
    xmpp.send(
        stanza("presence", &[("to", &format!("unban@{MUC}/XAlice"))])
            .append(payload("x", "http://jabber.org/protocol/muc", &[]))
            .build(),
    )?;
    let refused =
        xmpp.wait_presence(T, |p| p.contains(&from) && p.contains("type=\"error\"")).await?;
    assert!(refused.contains("forbidden"), "{refused}");

    // A Matrix unban lifts the XMPP ban: the user can join again and their ghost is back.
    alice.post(&format!("/rooms/{room}/unban"), json!({"user_id": ghost})).await?;
    trestle_e2e::wait_for("the ban lifted", T, || async {
        env.bridge.child.log_tail(200).contains("lifted a ban").then_some(())
    })
    .await?;
    xmpp.join("unban", "XAlice").await?;
    let unban = alice.wait_for_message(&room, T, member("leave")).await?;
    let unban_id = unban["event_id"].clone();
    trestle_e2e::wait_for("the ghost back in the room", T, || async {
        let events = alice.messages(&room, 100).await.ok()?;
        let after = events.iter().position(|e| e["event_id"] == unban_id)?;
        events[after..].iter().any(|e| member("join")(e)).then_some(())
    })
    .await?;
    xmpp.say("unban", "u1", "back again")?;
    let m = alice.wait_for_message(&room, T, |e| body(e) == "back again").await?;
    assert_eq!(m["sender"], ghost);
    Ok(())
}

#[tokio::test]
async fn harness_client_logs_in_to_prosody() -> anyhow::Result<()> {
    let prosody = Prosody::start(&[("xbob", "pw-bob")]).await?;
    let r = XmppClient::connect(prosody.c2s_port(), "xbob", "pw-bob").await;
    if r.is_err() {
        eprintln!("{}", prosody.log_tail(60));
    }
    let client = r?;
    assert_eq!(client.jid, "xbob@localhost");
    Ok(())
}

#[tokio::test]
async fn xmpp_moderation_redacts_in_matrix() -> anyhow::Result<()> {
    if !std::path::Path::new(trestle_e2e::prosody::MUC_MODERATION).exists() {
        eprintln!("skipping: Prosody's mod_muc_moderation (prosody-modules) is not installed");
        return Ok(());
    }
    let mut env = start().await?;
    let r = xmpp_moderation_body(&mut env).await;
    r.map_err(|e| e.context(env.logs()))
}

/// A moderation request (XEP-0425 0.2, as Prosody's mod_muc_moderation takes it) from `xmpp`.
fn moderate(xmpp: &XmppClient, room: &str, stanza_id: &str, reason: &str) -> anyhow::Result<()> {
    let mut moderate = payload("moderate", "urn:xmpp:message-moderate:0", &[]);
    moderate.append_child(payload("retract", "urn:xmpp:message-retract:0", &[]));
    moderate.append_child(
        tokio_xmpp::minidom::Element::builder("reason", "urn:xmpp:message-moderate:0")
            .append(reason)
            .build(),
    );
    let mut apply_to = payload("apply-to", "urn:xmpp:fasten:0", &[("id", stanza_id)]);
    apply_to.append_child(moderate);
    xmpp.send(
        stanza("iq", &[("type", "set"), ("id", "mod-1"), ("to", &format!("{room}@{MUC}"))])
            .append(apply_to)
            .build(),
    )
}

async fn xmpp_moderation_body(env: &mut Env) -> anyhow::Result<()> {
    // The XMPP user who creates the room owns it, so may moderate.
    let owner = XmppClient::connect(env.prosody.c2s_port(), "xalice", "secret-pass").await?;
    owner.join("mda", "XAlice").await?;
    let bob = XmppClient::connect(env.prosody.c2s_port(), "xbob", "secret-pass").await?;
    bob.join("mda", "XBob").await?;
    let alice = MatrixUser::register(&env.synapse.url(), "alice").await?;
    let room = alice.join(&format!("#xmpp_mda_{MUC}:localhost")).await?;
    let bob_ghost = "@xmpp_mda=40conference.localhost/_x_bob:localhost";
    tokio::time::sleep(Duration::from_millis(500)).await;
    bob.say("mda", "spam-1", "buy cheap watches")?;
    let event = alice
        .wait_for_message(&room, T, |e| e["sender"] == bob_ghost && body(e) == "buy cheap watches")
        .await?;
    let event_id = event["event_id"].as_str().unwrap_or_default().to_owned();
    let seen = owner.wait_message(T, |m| m.body == "buy cheap watches").await?;
    let sid = seen.stanza_id.clone().expect("the room's stanza-id");

    // The owner moderates it: the Matrix event is redacted, with who and why.
    moderate(&owner, "mda", &sid, "spam")?;
    let redacted = trestle_e2e::wait_for("the moderated message redacted", T, || async {
        let e = alice.get(&format!("/rooms/{room}/event/{event_id}")).await.ok()?;
        e["unsigned"]["redacted_because"].is_object().then_some(e)
    })
    .await?;
    assert_eq!(redacted["content"], json!({}), "{redacted}");
    let reason = redacted["unsigned"]["redacted_because"]["content"]["reason"].as_str();
    assert_eq!(reason, Some("moderated by XAlice on XMPP: spam"), "{redacted}");
    Ok(())
}

#[tokio::test]
async fn matrix_redaction_of_others_moderates_on_xmpp() -> anyhow::Result<()> {
    if !std::path::Path::new(trestle_e2e::prosody::MUC_MODERATION).exists() {
        eprintln!("skipping: Prosody's mod_muc_moderation (prosody-modules) is not installed");
        return Ok(());
    }
    let mut env = start().await?;
    let r = matrix_moderation_body(&mut env).await;
    r.map_err(|e| e.context(env.logs()))
}

async fn matrix_moderation_body(env: &mut Env) -> anyhow::Result<()> {
    let (alice, room, xmpp) = portal(env, "mdb").await?;
    let ghost = "@xmpp_mdb=40conference.localhost/_x_alice:localhost";
    xmpp.say("mdb", "rude-1", "something rude")?;
    let event = alice
        .wait_for_message(&room, T, |e| e["sender"] == ghost && body(e) == "something rude")
        .await?;
    let event_id = event["event_id"].as_str().unwrap_or_default().to_owned();
    let seen = xmpp.wait_message(T, |m| m.body == "something rude").await?;
    let sid = seen.stanza_id.clone().expect("the room's stanza-id");

    // The bot makes alice an admin on Matrix (the bridge ignores the bot's own changes); she
    // gives bob 50, which makes his occupant a moderator on XMPP.
    set_power_as_bot(env, &alice, &room, &alice.user_id, 100).await?;
    let bob = MatrixUser::register(&env.synapse.url(), "bob").await?;
    bob.join(&room).await?;
    let bob_occupant = format!("from=\"mdb@{MUC}/bob\"");
    xmpp.wait_presence(T, |p| p.contains(&bob_occupant)).await?;
    let mut pl = alice.state(&room, "m.room.power_levels", "").await?.unwrap_or_default();
    pl["users"][bob.user_id.as_str()] = json!(50);
    alice.put(&format!("/rooms/{room}/state/m.room.power_levels/"), pl).await?;
    xmpp.wait_presence(T, |p| p.contains(&bob_occupant) && p.contains("role=\"moderator\""))
        .await?;

    // Bob redacts the XMPP user's message: the room retracts it for everyone, naming his
    // occupant and his reason.
    let txn = format!("r{}", rand::random::<u64>());
    bob.put(&format!("/rooms/{room}/redact/{event_id}/{txn}"), json!({"reason": "not here"}))
        .await?;
    let announcement = xmpp
        .wait_stanza(T, |s| s.contains("urn:xmpp:message-moderate:0") && s.contains(&sid))
        .await?;
    assert!(announcement.contains(&format!("by=\"mdb@{MUC}/bob\"")), "{announcement}");
    assert!(announcement.contains("not here"), "{announcement}");
    Ok(())
}

#[tokio::test]
async fn matrix_topic_becomes_the_subject() -> anyhow::Result<()> {
    let mut env = start().await?;
    let r = matrix_topic_body(&mut env).await;
    r.map_err(|e| e.context(env.logs()))
}

async fn matrix_topic_body(env: &mut Env) -> anyhow::Result<()> {
    let (alice, room, xmpp) = portal(env, "tpc").await?;
    // Matrix lets only power 50 set the topic; the chat lets any occupant set the subject.
    set_power_as_bot(env, &alice, &room, &alice.user_id, 100).await?;
    alice
        .put(&format!("/rooms/{room}/state/m.room.topic/"), json!({"topic": "Release <day> & co"}))
        .await?;
    // The subject comes from alice's own occupant, text escaped, not markup.
    let from = format!("from=\"tpc@{MUC}/alice\"");
    let seen = xmpp.wait_stanza(T, |s| s.contains(&from) && s.contains("<subject")).await?;
    assert_eq!(
        element_text(&seen, "subject").as_deref(),
        Some("Release &lt;day&gt; & co"),
        "{seen}"
    );
    // The room's echo of that subject does not come back as a second topic change.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let topics = alice
        .messages(&room, 100)
        .await?
        .into_iter()
        .filter(|e| e["type"] == "m.room.topic")
        .count();
    assert_eq!(topics, 1, "the topic was set again from XMPP");
    Ok(())
}

#[tokio::test]
async fn xmpp_message_styling_becomes_html() -> anyhow::Result<()> {
    let mut env = start().await?;
    let r = styling_body(&mut env).await;
    r.map_err(|e| e.context(env.logs()))
}

async fn styling_body(env: &mut Env) -> anyhow::Result<()> {
    let (alice, room, xmpp) = portal(env, "sty").await?;
    let ghost = "@xmpp_sty=40conference.localhost/_x_alice:localhost";
    let text = "*bold*, _it_ and `<code>`\n> quoted";
    xmpp.say("sty", "st-1", text)?;
    let m = alice.wait_for_message(&room, T, |e| e["sender"] == ghost && body(e) == text).await?;
    assert_eq!(m["content"]["format"], "org.matrix.custom.html");
    assert_eq!(
        m["content"]["formatted_body"],
        "<strong>bold</strong>, <em>it</em> and <code>&lt;code&gt;</code><blockquote>quoted</blockquote>"
    );
    // Plain text stays plain.
    xmpp.say("sty", "st-2", "2 * 3 = 6")?;
    let m = alice
        .wait_for_message(&room, T, |e| e["sender"] == ghost && body(e) == "2 * 3 = 6")
        .await?;
    assert!(m["content"].get("formatted_body").is_none(), "{m}");
    Ok(())
}

#[tokio::test]
async fn mediated_invitations_both_ways() -> anyhow::Result<()> {
    let mut env = start().await?;
    let r = invitations_body(&mut env).await;
    r.map_err(|e| e.context(env.logs()))
}

async fn invitations_body(env: &mut Env) -> anyhow::Result<()> {
    // Matrix → XMPP: alice invites xbob's ghost to the portal; the room invites xbob for her.
    let (alice, room, xmpp) = portal(env, "inv").await?;
    let bob = XmppClient::connect(env.prosody.c2s_port(), "xbob", "secret-pass").await?;
    // Available, so that the server delivers the invitation rather than storing it offline.
    bob.send(stanza("presence", &[]).build())?;
    set_power_as_bot(env, &alice, &room, &alice.user_id, 100).await?; // portals need 50 to invite
    alice
        .post(
            &format!("/rooms/{room}/invite"),
            json!({"user_id": "@xmpp_xbob=40localhost:localhost", "reason": "come and see"}),
        )
        .await?;
    let invite = bob
        .wait_stanza(T, |s| s.contains("<invite") && s.contains(&format!("from=\"inv@{MUC}\"")))
        .await?;
    // The room names the inviter by her occupant (it does not show real JIDs).
    assert!(invite.contains(&format!("<invite from=\"inv@{MUC}/alice\"")), "{invite}");
    assert!(invite.contains("come and see"), "{invite}");

    // XMPP → Matrix: xalice invites carol's JID on the component to another chat; the bot
    // bridges that chat and invites carol to its portal.
    let carol = MatrixUser::register(&env.synapse.url(), "carol").await?;
    xmpp.join("inv2", "XAlice").await?;
    let mut x = payload("x", "http://jabber.org/protocol/muc#user", &[]);
    let mut inv = payload(
        "invite",
        "http://jabber.org/protocol/muc#user",
        &[("to", &format!("carol=3alocalhost@{COMPONENT}"))],
    );
    inv.append_child(
        tokio_xmpp::minidom::Element::builder("reason", "http://jabber.org/protocol/muc#user")
            .append("join us")
            .build(),
    );
    x.append_child(inv);
    xmpp.send(
        stanza("message", &[("to", &format!("inv2@{MUC}")), ("id", "inv-1")]).append(x).build(),
    )?;
    let invited = carol.wait_for_invite(T).await?;
    let alias = carol
        .get(&format!("/directory/room/{}", urlencode(&format!("#xmpp_inv2_{MUC}:localhost"))))
        .await?;
    assert_eq!(alias["room_id"].as_str(), Some(invited.as_str()));
    let joined = carol.join(&invited).await?;
    assert_eq!(joined, invited);
    Ok(())
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `log` without its ANSI colours.
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut escape = false;
    for c in log.chars() {
        match (escape, c) {
            (false, '\x1b') => escape = true,
            (true, 'm') => escape = false,
            (true, _) => {}
            (false, c) => out.push(c),
        }
    }
    out
}

/// The position of the only event of `events` matching `pred`; fails when there is none or more
/// than one.
fn only(events: &[Value], what: &str, pred: impl Fn(&Value) -> bool) -> anyhow::Result<usize> {
    let found: Vec<usize> =
        events.iter().enumerate().filter(|(_, e)| pred(e)).map(|(i, _)| i).collect();
    match found.as_slice() {
        [i] => Ok(*i),
        _ => anyhow::bail!("{what}: {} matching events, one expected", found.len()),
    }
}

#[tokio::test]
async fn history_of_a_room_is_backfilled_when_its_portal_is_created() -> anyhow::Result<()> {
    let mut env = start().await?;
    let r = backfill_body(&mut env).await;
    r.map_err(|e| e.context(env.logs()))
}

async fn backfill_body(env: &mut Env) -> anyhow::Result<()> {
    // XMPP users talk before the room has a portal (the room archives it, XEP-0313).
    let xa = XmppClient::connect(env.prosody.c2s_port(), "xalice", "secret-pass").await?;
    let xb = XmppClient::connect(env.prosody.c2s_port(), "xbob", "secret-pass").await?;
    xa.join("hist", "XAlice").await?;
    // xalice created the room: it is locked until her configuration is accepted.
    xa.wait_stanza(T, |s| s.contains("id=\"unlock\"") && s.contains("type=\"result\"")).await?;
    xb.join("hist", "XBob").await?;
    xa.say("hist", "h1", "history one")?;
    xa.wait_message(T, |s| s.body == "history one").await?;
    xb.say("hist", "h2", "history two <b>&amp;</b>")?;
    xa.wait_message(T, |s| s.body == "history two <b>&amp;</b>").await?;
    xa.say("hist", "h3", "history three")?;
    xa.wait_message(T, |s| s.body == "history three").await?;
    // A correction in the archive edits the message, it is not a new one.
    xa.say_with(
        "hist",
        "h4",
        "history one (fixed)",
        vec![payload("replace", "urn:xmpp:message-correct:0", &[("id", "h1")])],
    )?;
    xa.wait_message(T, |s| s.body == "history one (fixed)").await?;
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // A Matrix user joins through the alias: the portal is created and the history comes first.
    let alice = MatrixUser::register(&env.synapse.url(), "alice").await?;
    let room = alice.join(&format!("#xmpp_hist_{MUC}:localhost")).await?;
    alice.wait_for_message(&room, T, |e| body(e) == "history three").await?;
    xb.wait_presence(T, |p| p.contains(&format!("from=\"hist@{MUC}/MatrixBridge\""))).await?;
    xb.say("hist", "l1", "live after the portal")?;
    alice.wait_for_message(&room, T, |e| body(e) == "live after the portal").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let events = alice.messages(&room, 200).await?;
    let created = events
        .iter()
        .find(|e| e["type"] == "m.room.create")
        .and_then(|e| e["origin_server_ts"].as_u64())
        .ok_or_else(|| anyhow::anyhow!("no m.room.create in {events:?}"))?;
    let ghost = |nick: &str| format!("@xmpp_hist=40conference.localhost/_x_{nick}:localhost");
    let mut at = Vec::new();
    for (text, nick) in
        [("history one", "alice"), ("history two <b>&amp;</b>", "bob"), ("history three", "alice")]
    {
        let i = only(&events, text, |e| body(e) == text)?;
        let e = &events[i];
        assert_eq!(e["sender"], ghost(nick).as_str(), "{text}: {e}");
        let ts = e["origin_server_ts"].as_u64().unwrap_or(u64::MAX);
        assert!(ts < created, "{text} keeps its original time: {ts} < {created}");
        at.push(i);
    }
    assert!(at.windows(2).all(|w| w[0] < w[1]), "the history in order: {at:?}");
    // Text stays text (XEP-0393 styling only, no HTML from XMPP).
    assert!(events[at[1]]["content"].get("formatted_body").is_none(), "{}", events[at[1]]);
    // The correction edits the first message.
    let first = events[at[0]]["event_id"].as_str().unwrap_or_default();
    let edit = only(&events, "the correction", |e| {
        e["content"]["m.new_content"]["body"] == "history one (fixed)"
    })?;
    assert_eq!(events[edit]["content"]["m.relates_to"]["event_id"], first);
    assert_eq!(events[edit]["content"]["m.relates_to"]["rel_type"], "m.replace");
    assert!(events.iter().all(|e| body(e) != "history one (fixed)"), "no plain duplicate");
    // The live message comes after the history.
    let live = only(&events, "the live message", |e| body(e) == "live after the portal")?;
    assert!(live > at[2] && live > edit, "live {live} after the history {at:?}");
    // It came from the room's archive (XEP-0313).
    let log = plain(&env.bridge.child.log_tail(400));
    assert!(log.contains("bridging the room's history room=\"hist@"), "{log}");
    assert!(log.contains("archive=true"), "{log}");
    Ok(())
}

#[tokio::test]
async fn messages_said_while_the_bridge_was_down_are_caught_up_once() -> anyhow::Result<()> {
    let mut env = start().await?;
    let r = catch_up_body(&mut env).await;
    r.map_err(|e| e.context(env.logs()))
}

async fn catch_up_body(env: &mut Env) -> anyhow::Result<()> {
    let (alice, room, xmpp) = portal(env, "down").await?;
    xmpp.say("down", "d0", "before the downtime")?;
    alice.wait_for_message(&room, T, |e| body(e) == "before the downtime").await?;
    alice.send_text(&room, "from Matrix before the downtime").await?;
    xmpp.wait_message(T, |s| s.body == "from Matrix before the downtime").await?;

    // The bridge dies (the room only notices when messages to its occupants bounce).
    env.bridge.kill_hard();
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (id, text) in [("w1", "while down 1"), ("w2", "while down 2"), ("w3", "while down 3")] {
        xmpp.say("down", id, text)?;
        xmpp.wait_message(T, |s| s.body == text).await?;
    }
    xmpp.say_with(
        "down",
        "w4",
        "before the downtime (fixed)",
        vec![payload("replace", "urn:xmpp:message-correct:0", &[("id", "d0")])],
    )?;
    xmpp.wait_message(T, |s| s.body == "before the downtime (fixed)").await?;

    // It comes back: what was said meanwhile arrives once, in order, then live messages.
    let presences = xmpp.presences().len();
    env.bridge.restart().await?;
    trestle_e2e::wait_for("the bot to come back", T, || async {
        let from = format!("from=\"down@{MUC}/MatrixBridge\"");
        xmpp.presences()[presences..]
            .iter()
            .any(|p| p.contains(&from) && !p.contains("unavailable"))
            .then_some(())
    })
    .await?;
    xmpp.say("down", "l1", "live after the restart")?;
    alice.wait_for_message(&room, T, |e| body(e) == "live after the restart").await?;

    let check = |events: &[Value]| -> anyhow::Result<()> {
        let ghost = "@xmpp_down=40conference.localhost/_x_alice:localhost";
        let mut at = Vec::new();
        for text in ["before the downtime", "while down 1", "while down 2", "while down 3"] {
            let i = only(events, text, |e| body(e) == text)?;
            assert_eq!(events[i]["sender"], ghost, "{text}");
            at.push(i);
        }
        let live = only(events, "live", |e| body(e) == "live after the restart")?;
        at.push(live);
        assert!(at.windows(2).all(|w| w[0] < w[1]), "in order: {at:?}");
        // The Matrix user's own message, in the archive too, is not bridged back.
        let own = only(events, "own", |e| body(e) == "from Matrix before the downtime")?;
        assert_eq!(events[own]["sender"], alice.user_id.as_str());
        // The correction made while the bridge was away edits the message.
        let edit = only(events, "the correction", |e| {
            e["content"]["m.new_content"]["body"] == "before the downtime (fixed)"
        })?;
        assert_eq!(events[edit]["content"]["m.relates_to"]["event_id"], events[at[0]]["event_id"]);
        assert!(edit > at[3] && edit < live, "the correction in order: {edit}");
        Ok(())
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    check(&alice.messages(&room, 200).await?)?;
    let log = plain(&env.bridge.child.log_tail(400));
    assert!(
        log.contains("bridging the room's history room=\"down@") && log.contains("count=4"),
        "{log}"
    );

    // Another restart with nothing said meanwhile: nothing is posted again.
    let presences = xmpp.presences().len();
    env.bridge.restart().await?;
    trestle_e2e::wait_for("the bot to come back again", T, || async {
        let from = format!("from=\"down@{MUC}/MatrixBridge\"");
        xmpp.presences()[presences..]
            .iter()
            .any(|p| p.contains(&from) && !p.contains("unavailable"))
            .then_some(())
    })
    .await?;
    xmpp.say("down", "l2", "live after the second restart")?;
    alice.wait_for_message(&room, T, |e| body(e) == "live after the second restart").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let events = alice.messages(&room, 200).await?;
    check(&events)?;
    only(&events, "live 2", |e| body(e) == "live after the second restart")?;
    // Nothing from Matrix went to XMPP twice either.
    let seen = xmpp.messages();
    assert_eq!(seen.iter().filter(|s| s.body == "from Matrix before the downtime").count(), 1);
    Ok(())
}

#[tokio::test]
async fn rooms_without_an_archive_use_the_join_history() -> anyhow::Result<()> {
    let mut env = start().await?;
    let r = join_history_body(&mut env).await;
    r.map_err(|e| e.context(env.logs()))
}

async fn join_history_body(env: &mut Env) -> anyhow::Result<()> {
    // xalice creates a room and turns its archive off: the room has no XEP-0313.
    let xa = XmppClient::connect(env.prosody.c2s_port(), "xalice", "secret-pass").await?;
    xa.join("nomam", "XAlice").await?;
    xa.wait_stanza(T, |s| s.contains("id=\"unlock\"") && s.contains("type=\"result\"")).await?;
    let field = |var: &str, value: &str| {
        let mut f = payload("field", "jabber:x:data", &[("var", var)]);
        f.append_child(
            tokio_xmpp::minidom::Element::builder("value", "jabber:x:data")
                .append(value.to_owned())
                .build(),
        );
        f
    };
    let mut form = payload("x", "jabber:x:data", &[("type", "submit")]);
    form.append_child(field("FORM_TYPE", "http://jabber.org/protocol/muc#roomconfig"));
    form.append_child(field("muc#roomconfig_enablearchiving", "0"));
    let mut query = payload("query", "http://jabber.org/protocol/muc#owner", &[]);
    query.append_child(form);
    xa.send(
        stanza("iq", &[("type", "set"), ("id", "noarchive"), ("to", &format!("nomam@{MUC}"))])
            .append(query)
            .build(),
    )?;
    let answer = xa.wait_stanza(T, |s| s.contains("id=\"noarchive\"")).await?;
    assert!(answer.contains("type=\"result\""), "{answer}");
    let info = xa
        .iq_get(&format!("nomam@{MUC}"), "query", "http://jabber.org/protocol/disco#info")
        .await?;
    assert!(!info.contains("urn:xmpp:mam:2"), "the room must have no archive: {info}");

    xa.say("nomam", "n1", "join history one")?;
    xa.wait_message(T, |s| s.body == "join history one").await?;
    xa.say("nomam", "n2", "join history two")?;
    xa.wait_message(T, |s| s.body == "join history two").await?;
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // The portal is created: the join history is bridged once, in order, with its times.
    let alice = MatrixUser::register(&env.synapse.url(), "alice").await?;
    let room = alice.join(&format!("#xmpp_nomam_{MUC}:localhost")).await?;
    alice.wait_for_message(&room, T, |e| body(e) == "join history two").await?;
    let puppet = format!("from=\"nomam@{MUC}/alice\"");
    xa.wait_presence(T, |p| p.contains(&puppet)).await?;
    alice.send_text(&room, "from Matrix in nomam").await?;
    xa.wait_message(T, |s| s.body == "from Matrix in nomam").await?;
    xa.say("nomam", "n3", "live in nomam")?;
    alice.wait_for_message(&room, T, |e| body(e) == "live in nomam").await?;

    // Down, two messages, up: caught up from the join history since the last message.
    env.bridge.kill_hard();
    tokio::time::sleep(Duration::from_secs(1)).await;
    xa.say("nomam", "n4", "while away one")?;
    xa.wait_message(T, |s| s.body == "while away one").await?;
    xa.say("nomam", "n5", "while away two")?;
    xa.wait_message(T, |s| s.body == "while away two").await?;
    env.bridge.restart().await?;
    alice.wait_for_message(&room, T, |e| body(e) == "while away two").await?;
    xa.wait_presence(T, |p| p.contains(&puppet)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    xa.say("nomam", "n6", "live after the restart")?;
    alice.wait_for_message(&room, T, |e| body(e) == "live after the restart").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let events = alice.messages(&room, 200).await?;
    let created = events
        .iter()
        .find(|e| e["type"] == "m.room.create")
        .and_then(|e| e["origin_server_ts"].as_u64())
        .unwrap_or_default();
    let ghost = "@xmpp_nomam=40conference.localhost/_x_alice:localhost";
    let mut at = Vec::new();
    for text in [
        "join history one",
        "join history two",
        "live in nomam",
        "while away one",
        "while away two",
        "live after the restart",
    ] {
        let i = only(&events, text, |e| body(e) == text)?;
        assert_eq!(events[i]["sender"], ghost, "{text}");
        at.push(i);
    }
    assert!(at.windows(2).all(|w| w[0] < w[1]), "in order: {at:?}");
    for i in &at[..2] {
        assert!(events[*i]["origin_server_ts"].as_u64().unwrap_or(u64::MAX) < created);
    }
    // The Matrix user's own message, in the join history too, is not bridged back.
    let own = only(&events, "own", |e| body(e) == "from Matrix in nomam")?;
    assert_eq!(events[own]["sender"], alice.user_id.as_str());
    let log = plain(&env.bridge.child.log_tail(400));
    assert!(log.contains("archive=false"), "{log}");
    Ok(())
}

#[tokio::test]
async fn nick_changes_keep_the_ghost_in_rooms_with_occupant_ids() -> anyhow::Result<()> {
    let mut env = start_with(true).await?;
    let r = occupant_ids_body(&mut env).await;
    r.map_err(|e| e.context(env.logs()))
}

/// The `id` of the XEP-0421 `<occupant-id/>` in a stanza (XML with `"` quotes).
fn occupant_id_in(xml: &str) -> Option<String> {
    let at = xml.find("<occupant-id ")?;
    let tag = &xml[at..at + xml[at..].find('>')?];
    let id = tag.split("id=\"").nth(1)?;
    Some(id.split('"').next()?.to_owned())
}

async fn occupant_ids_body(env: &mut Env) -> anyhow::Result<()> {
    let (alice, room, xmpp) = portal(env, "occ").await?;
    // The room really stamps occupant-ids (Prosody's own XEP-0421).
    let own = xmpp
        .wait_presence(T, |p| {
            p.contains(&format!("occ@{MUC}/XAlice\"")) && p.contains("code=\"110\"")
        })
        .await?;
    let id = occupant_id_in(&own).ok_or_else(|| anyhow::anyhow!("no occupant-id in {own}"))?;
    let members = |events: &[Value], who: &str| -> Vec<(String, String)> {
        events
            .iter()
            .filter(|e| e["type"] == "m.room.member" && e["state_key"] == who)
            .map(|e| {
                (
                    e["content"]["membership"].as_str().unwrap_or_default().to_owned(),
                    e["content"]["displayname"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    };
    // The occupant's ghost is keyed by its occupant-id, not by its nick.
    let m = alice
        .wait_for_message(&room, T, |e| {
            e["type"] == "m.room.member"
                && e["content"]["displayname"] == "XAlice"
                && e["state_key"].as_str().is_some_and(|k| k.starts_with("@xmpp_occ"))
        })
        .await?;
    let ghost = m["state_key"].as_str().unwrap_or_default().to_owned();
    assert!(
        ghost.starts_with("@xmpp_occ=3a") && ghost.ends_with("=40conference.localhost:localhost"),
        "{ghost}"
    );
    assert_eq!(ghost, ghost.to_lowercase());
    let nick_ghost = |nick: &str| format!("@xmpp_occ=40conference.localhost/{nick}:localhost");
    assert_eq!(alice.profile(&ghost).await?["displayname"], "XAlice");

    // A message before the nick change.
    xmpp.say("occ", "o1", "before the change")?;
    let before = alice.wait_for_message(&room, T, |e| body(e) == "before the change").await?;
    assert_eq!(before["sender"], ghost.as_str());
    let before_event = before["event_id"].as_str().unwrap_or_default().to_owned();
    let before_sid = xmpp
        .wait_message(T, |s| s.body == "before the change")
        .await?
        .stanza_id
        .expect("the room stamps a stanza-id");

    // The nick change: the same ghost, renamed; nobody leaves or joins.
    xmpp.send(stanza("presence", &[("to", &format!("occ@{MUC}/XAlice2"))]).build())?;
    let renamed = xmpp
        .wait_presence(T, |p| {
            p.contains(&format!("occ@{MUC}/XAlice2\"")) && p.contains("code=\"110\"")
        })
        .await?;
    assert_eq!(occupant_id_in(&renamed).as_deref(), Some(id.as_str()), "{renamed}");
    alice
        .wait_for_message(&room, T, |e| {
            e["type"] == "m.room.member"
                && e["state_key"] == ghost.as_str()
                && e["content"]["displayname"] == "XAlice2"
        })
        .await?;
    assert_eq!(alice.profile(&ghost).await?["displayname"], "XAlice2");

    // A message after it comes from the same ghost; so does a correction of the earlier one.
    xmpp.say("occ", "o2", "after the change")?;
    let after = alice.wait_for_message(&room, T, |e| body(e) == "after the change").await?;
    assert_eq!(after["sender"], ghost.as_str());
    xmpp.say_with(
        "occ",
        "o3",
        "before the change (fixed)",
        vec![payload("replace", "urn:xmpp:message-correct:0", &[("id", "o1")])],
    )?;
    let fixed = alice
        .wait_for_message(&room, T, |e| {
            e["content"]["m.new_content"]["body"] == "before the change (fixed)"
        })
        .await?;
    assert_eq!(fixed["sender"], ghost.as_str());
    assert_eq!(fixed["content"]["m.relates_to"]["event_id"], before_event.as_str());

    // A Matrix reply to the message from before the change reaches the occupant's new nick.
    alice
        .send(
            &room,
            "m.room.message",
            json!({"msgtype": "m.text", "body": "reply from Matrix",
                "m.relates_to": {"m.in_reply_to": {"event_id": before_event}}}),
        )
        .await?;
    let seen = xmpp.wait_message(T, |s| s.body.ends_with("reply from Matrix")).await?;
    assert_eq!(seen.nick, "alice");
    assert!(seen.xml.contains(&format!("to=\"occ@{MUC}/XAlice2\"")), "{}", seen.xml);
    assert!(seen.xml.contains(&format!("id=\"{before_sid}\"")), "{}", seen.xml);
    assert!(seen.body.starts_with("> XAlice2: "), "{}", seen.body);
    // A reaction on it goes to the room's stanza-id of that message.
    alice
        .send(
            &room,
            "m.reaction",
            json!({"m.relates_to": {"rel_type": "m.annotation", "event_id": before_event, "key": "👍"}}),
        )
        .await?;
    let target = format!("id=\"{before_sid}\"");
    xmpp.wait_stanza(T, |s| s.contains("urn:xmpp:reactions:0") && s.contains(&target)).await?;

    // XMPP reactions from the renamed occupant are its ghost's.
    react(&xmpp, "occ", "o4", &before_sid, &["🎉"])?;
    let r = alice
        .wait_for_message(&room, T, |e| {
            e["type"] == "m.reaction" && e["content"]["m.relates_to"]["key"] == "🎉"
        })
        .await?;
    assert_eq!(r["sender"], ghost.as_str());

    // In Matrix, one ghost all along: joined once, renamed, never left; no nick ghosts; the
    // Matrix user's own occupant (known by its occupant-id) never came back as a ghost.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let events = alice.messages(&room, 200).await?;
    let ours = members(&events, &ghost);
    assert!(ours.iter().all(|(m, _)| m == "join"), "{ours:?}");
    assert!(ours.iter().any(|(_, n)| n == "XAlice2"), "{ours:?}");
    for nick in ["_x_alice", "_x_alice2"] {
        assert!(members(&events, &nick_ghost(nick)).is_empty(), "{nick}");
    }
    let senders: std::collections::HashSet<&str> = events
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .filter_map(|e| e["sender"].as_str())
        .collect();
    assert!(senders.iter().all(|s| *s == ghost || *s == alice.user_id), "{senders:?}");
    assert_eq!(events.iter().filter(|e| body(e) == "reply from Matrix").count(), 1);

    // A Matrix kick of the ghost (by a user with the power to on Matrix) is asked of the room
    // for the occupant's current nick; the room refuses it (the user's occupant is only a
    // participant there, the bridge ignores its bot's own power changes), which names the nick.
    set_power_as_bot(env, &alice, &room, &alice.user_id, 50).await?;
    alice.post(&format!("/rooms/{room}/kick"), json!({"user_id": ghost, "reason": "bye"})).await?;
    let notice = alice
        .wait_for_message(&room, T, |e| {
            e["content"]["msgtype"] == "m.notice" && body(e).starts_with("Could not kick")
        })
        .await?;
    assert!(body(&notice).starts_with("Could not kick XAlice2 on XMPP"), "{notice}");
    assert!(
        body(&notice).contains("not-allowed") || body(&notice).contains("forbidden"),
        "{notice}"
    );
    Ok(())
}

#[tokio::test]
async fn forged_occupant_ids_are_ignored_in_rooms_without_them() -> anyhow::Result<()> {
    let mut env = start().await?;
    let r = forged_occupant_ids_body(&mut env).await;
    r.map_err(|e| e.context(env.logs()))
}

async fn forged_occupant_ids_body(env: &mut Env) -> anyhow::Result<()> {
    // This room does not advertise XEP-0421, so it passes a client's own <occupant-id/> on:
    // the bridge must not trust it (the ghost stays the nick's).
    let (alice, room, xmpp) = portal(env, "forge").await?;
    let forged = payload("occupant-id", "urn:xmpp:occupant-id:0", &[("id", "someone-else")]);
    xmpp.say_with("forge", "f1", "with a forged occupant-id", vec![forged])?;
    let seen = xmpp.wait_message(T, |s| s.body == "with a forged occupant-id").await?;
    assert!(seen.xml.contains("someone-else"), "the room passes it on: {}", seen.xml);
    let m = alice.wait_for_message(&room, T, |e| body(e) == "with a forged occupant-id").await?;
    assert_eq!(m["sender"], "@xmpp_forge=40conference.localhost/_x_alice:localhost");
    Ok(())
}
