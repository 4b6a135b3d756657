//! The XMPP bridge against a real **ejabberd**, configured as `docs/bridges/xmpp.md` tells
//! admins to (an `ejabberd_service` listener, `mod_muc`, `mod_mam`): the component logs in,
//! portals, messages, corrections, retractions and private chats work as with Prosody. The full
//! feature suite runs against Prosody (`tests/xmpp.rs`); this one proves the second server.

use std::time::Duration;

use serde_json::{Value, json};
use trestle_e2e::{
    BridgeProcess, Deployment, MatrixUser, Synapse, binary,
    ejabberd::Ejabberd,
    prosody::{COMPONENT, MUC, SECRET, XmppClient, payload, stanza},
};

const T: Duration = Duration::from_secs(30);

struct Env {
    synapse: Synapse,
    ejabberd: Ejabberd,
    bridge: BridgeProcess,
    _dir: tempfile::TempDir,
}

impl Env {
    /// The recent logs of the bridge and ejabberd, for failure messages.
    fn logs(&self) -> String {
        format!(
            "--- bridge:\n{}\n--- ejabberd:\n{}",
            self.bridge.child.log_tail(60),
            self.ejabberd.log_tail(60)
        )
    }
}

async fn start() -> anyhow::Result<Env> {
    let dir = tempfile::Builder::new().prefix("trestle-xmpp-ejabberd-").tempdir()?;
    let ejabberd = Ejabberd::start(&[("xalice", "secret-pass")]).await?;
    let d = Deployment::new(dir.path(), "xmpp");
    let config = |hs: &str| {
        format!(
            "{}database: {{ path: \"{}\" }}\n\
             logging: {{ level: \"info,trestle=debug,trestle_xmpp=debug\" }}\n\
             permissions: {{ \"*\": user }}\n\
             bridge:\n  component:\n    jid: {COMPONENT}\n    secret: {SECRET}\n    host: 127.0.0.1\n    port: {}\n\
             \x20 muc_services: [{MUC}]\n  connection:\n    reconnect_min_ms: 200\n    reconnect_max_ms: 2000\n",
            d.base_config(hs),
            d.database().display(),
            ejabberd.component_port()
        )
    };
    let (synapse, bridge) = d.start(&binary("trestle-xmpp")?, &config).await?;
    Ok(Env { synapse, ejabberd, bridge, _dir: dir })
}

fn body(e: &Value) -> &str {
    e["content"]["body"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn ejabberd_component_portals_messages_and_private_chats() -> anyhow::Result<()> {
    let mut env = start().await?;
    let r = body_of_test(&mut env).await;
    r.map_err(|e| e.context(env.logs()))
}

async fn body_of_test(env: &mut Env) -> anyhow::Result<()> {
    // A portal by alias: the bot creates the chat on ejabberd, both sides join.
    let alice = MatrixUser::register(&env.synapse.url(), "alice").await?;
    let room = alice.join(&format!("#xmpp_ej_{MUC}:localhost")).await?;
    let xmpp = XmppClient::connect(env.ejabberd.c2s_port(), "xalice", "secret-pass").await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    xmpp.join("ej", "XAlice").await?;
    xmpp.wait_presence(T, |p| p.contains(&format!("from=\"ej@{MUC}/MatrixBridge\""))).await?;
    xmpp.wait_presence(T, |p| p.contains(&format!("from=\"ej@{MUC}/alice\""))).await?;
    let ghost = "@xmpp_ej=40conference.localhost/_x_alice:localhost";
    alice
        .wait_for_message(&room, T, |e| e["type"] == "m.room.member" && e["state_key"] == ghost)
        .await?;

    // Messages both ways, hostile text intact.
    xmpp.say("ej", "e1", "hello from ejabberd <b>&</b>")?;
    let m = alice.wait_for_message(&room, T, |e| body(e) == "hello from ejabberd <b>&</b>").await?;
    assert_eq!(m["sender"], ghost);
    let first = m["event_id"].as_str().unwrap_or_default().to_owned();
    let hello = alice.send_text(&room, "hi from Matrix </body>").await?;
    let seen = xmpp.wait_message(T, |s| s.body == "hi from Matrix </body>").await?;
    assert_eq!(seen.nick, "alice");

    // A correction each way, and a retraction from Matrix.
    xmpp.say_with(
        "ej",
        "e2",
        "hello from ejabberd (fixed)",
        vec![payload("replace", "urn:xmpp:message-correct:0", &[("id", "e1")])],
    )?;
    let m = alice
        .wait_for_message(&room, T, |e| {
            e["content"]["m.new_content"]["body"] == "hello from ejabberd (fixed)"
        })
        .await?;
    assert_eq!(m["content"]["m.relates_to"]["event_id"], first.as_str());
    alice
        .send(
            &room,
            "m.room.message",
            json!({"msgtype": "m.text", "body": "* hi again", "m.new_content": {"msgtype": "m.text", "body": "hi again"},
                "m.relates_to": {"rel_type": "m.replace", "event_id": hello}}),
        )
        .await?;
    let seen = xmpp.wait_message(T, |s| s.body == "hi again").await?;
    assert!(seen.xml.contains("urn:xmpp:message-correct:0"), "{}", seen.xml);
    alice.redact(&room, &hello).await?;
    xmpp.wait_message(T, |s| s.xml.contains("urn:xmpp:message-retract:1")).await?;

    // The room's stanza-ids (ejabberd's MAM) dedupe: nothing was bridged twice, nothing echoed.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let events = alice.messages(&room, 100).await?;
    assert_eq!(events.iter().filter(|e| body(e) == "hello from ejabberd <b>&</b>").count(), 1);
    assert!(!events.iter().any(|e| e["sender"] == ghost && body(e).starts_with("hi ")));
    let echoes = xmpp.messages().iter().filter(|s| s.body == "hi from Matrix </body>").count();
    assert_eq!(echoes, 1);

    // A private chat from XMPP to a Matrix user's JID, and the answer.
    xmpp.send(stanza("presence", &[]).build())?;
    xmpp.send(
        stanza(
            "message",
            &[("type", "chat"), ("to", &format!("alice=3alocalhost@{COMPONENT}")), ("id", "d1")],
        )
        .append(
            tokio_xmpp::minidom::Element::builder("body", "jabber:client")
                .append("privately via ejabberd")
                .build(),
        )
        .build(),
    )?;
    let dm = alice.wait_for_invite(T).await?;
    alice.join(&dm).await?;
    let m = alice.wait_for_message(&dm, T, |e| body(e) == "privately via ejabberd").await?;
    assert_eq!(m["sender"], "@xmpp_xalice=40localhost:localhost");
    alice.send_text(&dm, "answer via ejabberd").await?;
    let from = format!("from=\"alice=3alocalhost@{COMPONENT}/trestle\"");
    xmpp.wait_stanza(T, |s| {
        s.starts_with("<message") && s.contains(&from) && s.contains(">answer via ejabberd</body>")
    })
    .await?;
    Ok(())
}
