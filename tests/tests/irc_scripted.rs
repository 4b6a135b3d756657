//! The IRC bridge's use of two IRCv3 drafts that no packaged IRC server offers —
//! `draft/relaymsg` (`RELAYMSG`) and `draft/message-redaction` (`REDACT`) — proven end to end
//! through a real Synapse against the scripted server in `trestle_e2e::scripted_ircd` (written
//! from the two specifications). Everything else the IRC bridge does is tested against InspIRCd
//! and ngIRCd in `tests/irc.rs`.

use std::time::Duration;

use serde_json::{Value, json};
use trestle_e2e::{
    BridgeProcess, Deployment, MatrixUser, Synapse, binary, ircd::IrcClient,
    scripted_ircd::ScriptedIrcd,
};

const T: Duration = Duration::from_secs(20);

struct Env {
    synapse: Synapse,
    ircd: ScriptedIrcd,
    bridge: BridgeProcess,
    _dir: tempfile::TempDir,
}

async fn start() -> anyhow::Result<Env> {
    let ircd = ScriptedIrcd::start().await?;
    let dir = tempfile::Builder::new().prefix("trestle-irc-scripted-").tempdir()?;
    let d = Deployment::new(dir.path(), "irc");
    let port = ircd.port();
    let config = |hs: &str| {
        format!(
            "{}database: {{ path: \"{}\", secret_key: \"test-only-secret-key-0123456789\" }}\n\
             logging: {{ level: \"info,trestle=debug,trestle_irc=debug\" }}\n\
             permissions: {{ \"*\": user }}\n\
             bridge:\n  networks:\n    local:\n      name: Scripted IRC\n      host: 127.0.0.1\n      port: {port}\n      tls: false\n      bot_nick: MatrixBridge\n      mode: relay\n      flood_burst: 20\n      flood_penalty_ms: 100\n      redaction_fallback: notice\n",
            d.base_config(hs),
            d.database().display(),
        )
    };
    let (synapse, bridge) = d.start(&binary("trestle-irc")?, &config).await?;
    Ok(Env { synapse, ircd, bridge, _dir: dir })
}

fn body(e: &Value) -> &str {
    e["content"]["body"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn relaymsg_and_message_redaction_both_ways() -> anyhow::Result<()> {
    let env = start().await?;
    let r = body_of_test(&env).await;
    r.map_err(|e| {
        e.context(format!(
            "--- bridge:\n{}\n--- server received:\n{}",
            env.bridge.child.log_tail(60),
            env.ircd.received().join("\n")
        ))
    })
}

async fn body_of_test(env: &Env) -> anyhow::Result<()> {
    // The portal first: the bot creates the channel, so it is its operator.
    let alice = MatrixUser::register(&env.synapse.url(), "alice").await?;
    let room = alice.join("#irc_local_#relay:localhost").await?;
    let caps = ["message-tags", "echo-message", "draft/message-redaction"];
    let mut irc = IrcClient::connect_with_caps(env.ircd.port(), "ircbob", &caps).await?;
    irc.join("#relay").await?;
    let names = irc.wait_for(T, |l| l.command == "353").await?;
    assert!(names.params[3].contains("@MatrixBridge"), "{}", names.raw);
    let ghost = "@irc_local_ircbob:localhost";

    // Matrix → IRC with RELAYMSG: from a nick of alice's own, without a name prefix.
    let hello = alice.send_text(&room, "hello relayed").await?;
    let l = irc
        .wait_for(T, |l| {
            l.command == "PRIVMSG" && l.params.get(1).is_some_and(|t| t == "hello relayed")
        })
        .await?;
    assert_eq!(l.nick.as_deref(), Some("alice/m"), "{}", l.raw);
    let hello_msgid = l.tag("msgid").expect("a msgid").to_owned();
    assert!(
        env.ircd
            .received()
            .iter()
            .any(|r| r == "MatrixBridge: RELAYMSG #relay alice/m :hello relayed"),
        "{:?}",
        env.ircd.received()
    );
    alice.send(&room, "m.room.message", json!({"msgtype": "m.emote", "body": "waves"})).await?;
    let l =
        irc.wait_for(T, |l| l.params.get(1).is_some_and(|t| t == "\u{1}ACTION waves\u{1}")).await?;
    assert_eq!(l.nick.as_deref(), Some("alice/m"));
    // Hostile text cannot break out of the line or the nick.
    alice.send_text(&room, "two\r\nlines\0 here").await?;
    irc.wait_for(T, |l| l.params.get(1).is_some_and(|t| t.starts_with("two"))).await?;
    assert!(env.ircd.received().iter().all(|r| !r.contains('\r') && !r.contains('\0')));

    // The bridge's own relayed copies come back to it; none is bridged back as a ghost.
    irc.privmsg("#relay", "from IRC").await?;
    let from_irc =
        alice.wait_for_message(&room, T, |e| body(e) == "from IRC" && e["sender"] == ghost).await?;
    let events = alice.messages(&room, 100).await?;
    assert_eq!(events.iter().filter(|e| body(e) == "hello relayed").count(), 1);
    assert!(
        !events
            .iter()
            .any(|e| { e["sender"].as_str().is_some_and(|s| s.starts_with("@irc_local_alice")) }),
        "a relayed message came back as a ghost"
    );

    // Matrix redaction → REDACT of the relayed message's msgid (learnt from its echo).
    alice.redact(&room, &hello).await?;
    let l = irc.wait_for(T, |l| l.command == "REDACT").await?;
    assert_eq!(l.params[..2], ["#relay".to_owned(), hello_msgid]);
    assert_eq!(l.nick.as_deref(), Some("MatrixBridge"));

    // IRC REDACT of one's own message → redaction by the ghost, with the reason.
    let own = irc
        .wait_for(T, |l| l.command == "PRIVMSG" && l.params.get(1).is_some_and(|t| t == "from IRC"))
        .await?;
    let own_msgid = own.tag("msgid").expect("a msgid").to_owned();
    irc.raw(&format!("REDACT #relay {own_msgid} :typo\r\n")).await?;
    let event_id = from_irc["event_id"].as_str().unwrap_or_default().to_owned();
    let redaction = alice
        .wait_for_message(&room, T, |e| {
            e["type"] == "m.room.redaction" && e["redacts"] == event_id.as_str()
        })
        .await?;
    assert_eq!(redaction["sender"], ghost);
    assert_eq!(redaction["content"]["reason"], "deleted on IRC by ircbob: typo");

    // An IRC reaction, then its REDACT: the Matrix reaction is taken back.
    let target = alice.send_text(&room, "react to me").await?;
    let relayed = irc.wait_for(T, |l| l.params.get(1).is_some_and(|t| t == "react to me")).await?;
    let msgid = relayed.tag("msgid").expect("a msgid").to_owned();
    irc.raw(&format!("@+draft/react=👍;+draft/reply={msgid} TAGMSG #relay\r\n")).await?;
    let reaction = alice
        .wait_for_message(&room, T, |e| {
            e["type"] == "m.reaction" && e["content"]["m.relates_to"]["event_id"] == target.as_str()
        })
        .await?;
    let tagmsg = irc.wait_for(T, |l| l.command == "TAGMSG").await?;
    let tag_msgid = tagmsg.tag("msgid").expect("a msgid").to_owned();
    irc.raw(&format!("REDACT #relay {tag_msgid}\r\n")).await?;
    let reaction_id = reaction["event_id"].as_str().unwrap_or_default().to_owned();
    alice
        .wait_for_message(&room, T, |e| {
            e["type"] == "m.room.redaction" && e["redacts"] == reaction_id.as_str()
        })
        .await?;
    Ok(())
}
