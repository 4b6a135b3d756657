//! End-to-end tests of the IRC bridge: a real Synapse, a real IRC server (ngIRCd; InspIRCd 3
//! for IRCv3 message tags), a Matrix user on the client-server API and an IRC user on a raw TCP
//! connection.

use std::time::Duration;

use serde_json::Value;
use trestle_e2e::{
    BridgeProcess, Deployment, MatrixUser, Synapse, binary,
    ircd::{IrcClient, Ircd},
};

struct Env {
    synapse: Synapse,
    ircd: Ircd,
    bridge: BridgeProcess,
    dir: tempfile::TempDir,
}

async fn start() -> anyhow::Result<Env> {
    start_mode("relay").await
}

async fn start_mode(mode: &str) -> anyhow::Result<Env> {
    start_with(mode, "").await
}

/// `extra` is appended to the `bridge:` section; an `identd` in it makes ngIRCd ask it.
async fn start_with(mode: &str, extra: &str) -> anyhow::Result<Env> {
    let ircd = Ircd::start_with_ident(extra.contains("identd")).await?;
    start_on(ircd, mode, extra).await
}

/// The bridge in `mode` on a server already running.
async fn start_on(ircd: Ircd, mode: &str, extra: &str) -> anyhow::Result<Env> {
    let port = ircd.port();
    start_on_port(ircd, port, false, mode, extra).await
}

/// The bridge in `mode` on a server already running, on its `port`, over TLS (any server
/// certificate accepted) with `tls`.
async fn start_on_port(
    ircd: Ircd,
    port: u16,
    tls: bool,
    mode: &str,
    extra: &str,
) -> anyhow::Result<Env> {
    let dir = tempfile::Builder::new().prefix("trestle-irc-").tempdir()?;
    let d = Deployment::new(dir.path(), "irc");
    let config = |hs: &str| {
        format!(
            "{}database: {{ path: \"{}\", secret_key: \"test-only-secret-key-0123456789\" }}\n\
             logging: {{ level: \"info,trestle=debug,trestle_irc=debug\" }}\n\
             media_proxy: {{ public_url: \"http://127.0.0.1:{}/media\" }}\n\
             permissions: {{ \"*\": user, \"@alice:localhost\": admin }}\n\
             bridge:\n  networks:\n    local:\n      name: Local IRC\n      host: 127.0.0.1\n      port: {port}\n      tls: {tls}\n      tls_insecure: {tls}\n      bot_nick: MatrixBridge\n      mode: {mode}\n      flood_burst: 20\n      flood_penalty_ms: 100\n      netsplit_debounce_secs: 8\n      redaction_fallback: notice\n{extra}",
            d.base_config(hs),
            d.database().display(),
            d.port,
        )
    };
    let (synapse, bridge) = d.start(&binary("trestle-irc")?, &config).await?;
    Ok(Env { synapse, ircd, bridge, dir })
}

fn body(e: &Value) -> &str {
    e["content"]["body"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn portal_via_alias_and_messages_both_ways() -> anyhow::Result<()> {
    let env = start().await?;
    let mut irc = IrcClient::connect(env.ircd.port(), "ircalice").await?;
    irc.join("#test").await?;
    let alice = MatrixUser::register(&env.synapse.url(), "alice").await?;

    // Joining the alias creates the portal; the bot joins the channel.
    let room = alice.join("#irc_local_#test:localhost").await?;
    irc.wait_for(Duration::from_secs(20), |l| {
        l.command == "JOIN" && l.nick.as_deref() == Some("MatrixBridge")
    })
    .await?;
    // The IRC member already in the channel is a ghost in the room.
    alice
        .wait_for_message(&room, Duration::from_secs(20), |e| {
            e["type"] == "m.room.member" && e["state_key"] == "@irc_local_ircalice:localhost"
        })
        .await?;

    // IRC → Matrix, with formatting.
    irc.privmsg("#test", "hello from \x02IRC\x02").await?;
    let m = alice
        .wait_for_message(&room, Duration::from_secs(20), |e| {
            e["sender"] == "@irc_local_ircalice:localhost" && e["type"] == "m.room.message"
        })
        .await?;
    assert_eq!(body(&m), "hello from IRC");
    assert_eq!(m["content"]["formatted_body"], "hello from <strong>IRC</strong>");

    // Matrix → IRC (relayed by the bot with the sender's name), with formatting.
    alice
        .send(
            &room,
            "m.room.message",
            serde_json::json!({"msgtype": "m.text", "body": "hi **there**",
            "format": "org.matrix.custom.html", "formatted_body": "hi <strong>there</strong>"}),
        )
        .await?;
    let l = irc
        .wait_for(Duration::from_secs(20), |l| {
            l.command == "PRIVMSG" && l.params.get(1).is_some_and(|t| t.contains("hi"))
        })
        .await?;
    assert_eq!(l.nick.as_deref(), Some("MatrixBridge"));
    assert!(
        l.params[1] == "<alice> hi \x02there\x0F" || l.params[1] == "<alice> hi \x02there\x02",
        "{}",
        l.params[1]
    );

    // Emote → ACTION-style line.
    alice
        .send(&room, "m.room.message", serde_json::json!({"msgtype": "m.emote", "body": "waves"}))
        .await?;
    irc.wait_for(Duration::from_secs(20), |l| {
        l.params.get(1).is_some_and(|t| t == "* alice waves")
    })
    .await?;

    // A long message is split within the line limit, nothing lost.
    let long: String = (0..120).map(|i| format!("word{i}")).collect::<Vec<_>>().join(" ");
    alice.send_text(&room, &long).await?;
    irc.wait_for(Duration::from_secs(20), |l| {
        l.params.get(1).is_some_and(|t| t.ends_with("word119"))
    })
    .await?;
    let got: Vec<String> = irc
        .seen
        .iter()
        .filter(|l| {
            l.command == "PRIVMSG" && l.params.get(1).is_some_and(|t| t.starts_with("<alice> word"))
        })
        .map(|l| l.params[1].trim_start_matches("<alice> ").to_owned())
        .collect();
    assert!(got.len() >= 2, "expected a split, got {got:?}");
    assert_eq!(got.join(" "), long);
    for l in &irc.seen {
        assert!(l.raw.len() <= 510);
    }
    Ok(())
}

#[tokio::test]
async fn injection_through_matrix_never_reaches_the_socket() -> anyhow::Result<()> {
    let env = start().await?;
    let mut irc = IrcClient::connect(env.ircd.port(), "watcher").await?;
    irc.join("#inject").await?;
    let mallory = MatrixUser::register(&env.synapse.url(), "mallory").await?;
    let room = mallory.join("#irc_local_#inject:localhost").await?;
    irc.wait_for(Duration::from_secs(20), |l| {
        l.command == "JOIN" && l.nick.as_deref() == Some("MatrixBridge")
    })
    .await?;
    // Through the body, the HTML and the displayname (topics go through the same one-line
    // cleaning, unit-tested in the bridge).
    mallory
        .put(
            "/profile/@mallory:localhost/displayname",
            serde_json::json!({"displayname": "evil\r\nQUIT :owned"}),
        )
        .await?;
    mallory.send_text(&room, "one\r\nQUIT :pwned\nPRIVMSG #inject :forged\0nul").await?;
    mallory
        .send(&room, "m.room.message", serde_json::json!({"msgtype": "m.text", "body": "x",
            "format": "org.matrix.custom.html", "formatted_body": "a<br>KICK #inject watcher\r\nb"}))
        .await?;
    irc.privmsg("#inject", "still here?").await?;
    // The bot never quit, nobody was kicked, and every forged command arrived as plain text.
    tokio::time::sleep(Duration::from_secs(2)).await;
    irc.wait_for(Duration::from_secs(5), |l| l.params.get(1).is_some_and(|t| t.contains("forged")))
        .await?;
    for l in &irc.seen {
        assert!(
            !(l.command == "QUIT" && l.nick.as_deref() == Some("MatrixBridge")),
            "bot quit: {}",
            l.raw
        );
        assert_ne!(l.command, "KICK", "{}", l.raw);
        assert!(!l.raw.contains('\0') && !l.raw.contains('\r'));
        if l.command == "PRIVMSG" {
            assert_eq!(l.params[0], "#inject", "{}", l.raw);
        }
    }
    let texts: Vec<&str> = irc
        .seen
        .iter()
        .filter(|l| l.command == "PRIVMSG")
        .filter_map(|l| l.params.get(1).map(String::as_str))
        .collect();
    assert!(texts.iter().any(|t| t.ends_with("QUIT :pwned")), "{texts:?}");
    Ok(())
}

#[tokio::test]
async fn irc_server_restart_reconnects_and_rejoins() -> anyhow::Result<()> {
    let mut env = start().await?;
    let alice = MatrixUser::register(&env.synapse.url(), "alice").await?;
    let room = alice.join("#irc_local_#restart:localhost").await?;
    {
        let mut irc = IrcClient::connect(env.ircd.port(), "early").await?;
        irc.join("#restart").await?;
        irc.wait_for(Duration::from_secs(20), |l| {
            l.command == "353" || l.nick.as_deref() == Some("MatrixBridge")
        })
        .await?;
    }
    env.ircd.restart().await?;
    // The bot reconnects (backoff starts at 1-2 s) and rejoins the channel by itself.
    let mut irc = IrcClient::connect(env.ircd.port(), "late").await?;
    irc.join("#restart").await?;
    irc.wait_for(Duration::from_secs(60), |l| {
        (l.command == "JOIN" && l.nick.as_deref() == Some("MatrixBridge"))
            || (l.command == "353" && l.params.get(3).is_some_and(|n| n.contains("MatrixBridge")))
    })
    .await?;
    irc.privmsg("#restart", "after the restart").await?;
    let m = alice
        .wait_for_message(&room, Duration::from_secs(30), |e| body(e) == "after the restart")
        .await?;
    assert_eq!(m["sender"], "@irc_local_late:localhost");
    Ok(())
}

#[tokio::test]
async fn harness_ircd_starts_and_stops() -> anyhow::Result<()> {
    let mut ircd = Ircd::start().await?;
    let mut a = IrcClient::connect(ircd.port(), "a1").await?;
    let mut b = IrcClient::connect(ircd.port(), "b1").await?;
    a.join("#h").await?;
    b.join("#h").await?;
    a.privmsg("#h", "ping from a").await?;
    b.wait_for(Duration::from_secs(5), |l| l.params.get(1).is_some_and(|t| t == "ping from a"))
        .await?;
    ircd.stop();
    Ok(())
}

#[tokio::test]
async fn puppets_speak_as_themselves_and_talk_privately() -> anyhow::Result<()> {
    let mut env = start_mode("puppets").await?;
    let port = env.ircd.port();
    // bob[m] is taken before bob arrives: his puppet gets another nick, and he is told.
    let _squatter = IrcClient::connect(port, "bob[m]").await?;
    let mut irc = IrcClient::connect(port, "ircalice").await?;
    irc.join("#pup").await?;
    let alice = MatrixUser::register(&env.synapse.url(), "alice").await?;
    let room = alice.join("#irc_local_#pup:localhost").await?;

    // Joining the portal connects alice's own IRC connection, which joins the channel.
    let join = Duration::from_secs(60);
    irc.wait_for(join, |l| l.command == "JOIN" && l.nick.as_deref() == Some("alice[m]")).await?;

    // Matrix → IRC: from her own nick, no relay prefix.
    alice.send_text(&room, "hello from my own connection").await?;
    let l = irc
        .wait_for(Duration::from_secs(20), |l| {
            l.command == "PRIVMSG" && l.params.get(1).is_some_and(|t| t.contains("own connection"))
        })
        .await?;
    assert_eq!(l.nick.as_deref(), Some("alice[m]"));
    assert_eq!(l.params, ["#pup", "hello from my own connection"]);

    // IRC addressing her nick becomes a mention with a pill.
    irc.privmsg("#pup", "alice[m]: welcome").await?;
    let m = alice
        .wait_for_message(&room, Duration::from_secs(20), |e| body(e) == "alice[m]: welcome")
        .await?;
    assert_eq!(m["sender"], "@irc_local_ircalice:localhost");
    assert_eq!(m["content"]["m.mentions"]["user_ids"], serde_json::json!(["@alice:localhost"]));
    assert!(
        m["content"]["formatted_body"]
            .as_str()
            .is_some_and(|h| h.contains("https://matrix.to/#/@alice:localhost")),
        "{m}"
    );

    // Her puppet is never bridged back as a ghost: no ghost joined, no echo of her message.
    let members = alice.get(&format!("/rooms/{room}/joined_members")).await?;
    let ids: Vec<&String> =
        members["joined"].as_object().map(|o| o.keys().collect()).unwrap_or_default();
    assert!(!ids.iter().any(|u| u.starts_with("@irc_local_alice")), "{ids:?}");
    let echoes = alice.messages(&room, 100).await?;
    assert_eq!(
        echoes.iter().filter(|e| body(e) == "hello from my own connection").count(),
        1,
        "the message came back from IRC"
    );

    // Nick collision: resolved, and told in the room.
    let bob = MatrixUser::register(&env.synapse.url(), "bob").await?;
    bob.join(&room).await?;
    irc.wait_for(join, |l| l.command == "JOIN" && l.nick.as_deref() == Some("bob[m]_")).await?;
    bob.wait_for_message(&room, Duration::from_secs(20), |e| {
        body(e).contains("bob[m] is taken") && body(e).contains("bob[m]_")
    })
    .await?;

    // IRC → Matrix privately: a DM room from the ghost, and the answer goes back privately.
    irc.privmsg("alice[m]", "psst, private").await?;
    let dm = match alice.wait_for_invite(Duration::from_secs(30)).await {
        Ok(dm) => dm,
        Err(e) => anyhow::bail!("{e}\n--- bridge log:\n{}", env.bridge.child.log_tail(60)),
    };
    alice.join(&dm).await?;
    let m = alice
        .wait_for_message(&dm, Duration::from_secs(20), |e| body(e) == "psst, private")
        .await?;
    assert_eq!(m["sender"], "@irc_local_ircalice:localhost");
    alice.send_text(&dm, "private reply").await?;
    irc.wait_for(Duration::from_secs(20), |l| {
        l.command == "PRIVMSG"
            && l.nick.as_deref() == Some("alice[m]")
            && l.params == ["ircalice", "private reply"]
    })
    .await?;

    // Matrix → IRC privately: inviting a ghost to a DM reaches that nick.
    let mut carol = IrcClient::connect(port, "carol").await?;
    let dm2 = alice
        .create_room(
            serde_json::json!({"invite": ["@irc_local_carol:localhost"], "is_direct": true,
            "preset": "trusted_private_chat"}),
        )
        .await?;
    // (A client waits for the invitee to join: the homeserver only tells the bridge about a
    // room's messages once one of its users is in the room.)
    trestle_e2e::wait_for("the ghost to join the DM", Duration::from_secs(30), || async {
        let m = alice.state(&dm2, "m.room.member", "@irc_local_carol:localhost").await.ok()??;
        (m["membership"] == "join").then_some(())
    })
    .await?;
    alice.send_text(&dm2, "hi carol").await?;
    carol
        .wait_for(Duration::from_secs(30), |l| {
            l.command == "PRIVMSG"
                && l.nick.as_deref() == Some("alice[m]")
                && l.params == ["carol", "hi carol"]
        })
        .await?;

    // After a crash, recently active puppets come back and rejoin their channels.
    irc.seen.clear();
    env.bridge.restart().await?;
    irc.wait_for(Duration::from_secs(90), |l| {
        l.command == "JOIN" && l.nick.as_deref() == Some("alice[m]")
    })
    .await?;
    Ok(())
}

fn leaves_of(events: &[Value], user: &str) -> usize {
    events
        .iter()
        .filter(|e| {
            e["type"] == "m.room.member"
                && e["state_key"] == user
                && e["content"]["membership"] == "leave"
        })
        .count()
}

async fn power_of(user: &MatrixUser, room: &str, who: &str) -> Option<i64> {
    let pl = user.state(room, "m.room.power_levels", "").await.ok()??;
    pl["users"][who].as_i64()
}

#[tokio::test]
async fn modes_kicks_bans_and_netsplits() -> anyhow::Result<()> {
    let env = start().await?;
    let port = env.ircd.port();
    let t = Duration::from_secs(30);
    let mut op = IrcClient::connect(port, "ircop").await?;
    op.join("#mod").await?; // first in: channel operator
    let mut victim = IrcClient::connect(port, "victim").await?;
    victim.join("#mod").await?;
    let alice = MatrixUser::register(&env.synapse.url(), "alice").await?;
    let room = alice.join("#irc_local_#mod:localhost").await?;

    // Channel modes become power levels: @ → 50 from the names list, +v → 1 from MODE.
    trestle_e2e::wait_for("ircop at 50", t, || async {
        (power_of(&alice, &room, "@irc_local_ircop:localhost").await == Some(50)).then_some(())
    })
    .await?;
    op.raw("MODE #mod +v victim\r\n").await?;
    trestle_e2e::wait_for("victim at 1", t, || async {
        (power_of(&alice, &room, "@irc_local_victim:localhost").await == Some(1)).then_some(())
    })
    .await?;

    // An IRC kick: the bot kicks the ghost, naming who kicked and why.
    op.raw("KICK #mod victim :behave\r\n").await?;
    let kick = alice
        .wait_for_message(&room, t, |e| {
            e["type"] == "m.room.member"
                && e["state_key"] == "@irc_local_victim:localhost"
                && e["content"]["membership"] == "leave"
        })
        .await?;
    assert_eq!(kick["sender"], "@ircbot:localhost");
    let reason = kick["content"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("ircop") && reason.contains("behave"), "{reason}");

    // A Matrix kick and ban of a ghost: the bot (made operator) does them on IRC.
    op.raw("MODE #mod +o MatrixBridge\r\n").await?;
    victim.join("#mod").await?;
    let ghost = "@irc_local_victim:localhost";
    trestle_e2e::wait_for("the ghost back", t, || async {
        let m = alice.state(&room, "m.room.member", ghost).await.ok()??;
        (m["membership"] == "join").then_some(())
    })
    .await?;
    alice
        .post(
            &format!("/rooms/{room}/kick"),
            serde_json::json!({"user_id": ghost, "reason": "spam"}),
        )
        .await?;
    let l = op
        .wait_for(t, |l| {
            l.command == "KICK"
                && l.nick.as_deref() == Some("MatrixBridge")
                && l.params.get(1).is_some_and(|n| n == "victim")
        })
        .await?;
    assert!(l.params[2].contains("alice") && l.params[2].contains("spam"), "{}", l.raw);
    victim.join("#mod").await?;
    trestle_e2e::wait_for("the ghost back again", t, || async {
        let m = alice.state(&room, "m.room.member", ghost).await.ok()??;
        (m["membership"] == "join").then_some(())
    })
    .await?;
    alice
        .post(
            &format!("/rooms/{room}/ban"),
            serde_json::json!({"user_id": ghost, "reason": "enough"}),
        )
        .await?;
    op.wait_for(t, |l| {
        l.command == "MODE"
            && l.params.get(1).is_some_and(|m| m == "+b")
            && l.params.get(2).is_some_and(|m| m == "victim!*@*")
    })
    .await?;
    victim
        .wait_for(t, |l| {
            l.command == "KICK" && l.params.get(2).is_some_and(|r| r.contains("enough"))
        })
        .await?;
    victim.raw("JOIN #mod\r\n").await?;
    victim.wait_for(t, |l| l.command == "474").await?; // banned on IRC too

    // A netsplit (here: a wave of quits): ghosts stay; those back in time never leave.
    let mut wave = Vec::new();
    for i in 0..6 {
        let mut c = IrcClient::connect(port, &format!("split{i}")).await?;
        c.join("#mod").await?;
        wave.push(c);
    }
    for i in 0..6 {
        let g = format!("@irc_local_split{i}:localhost");
        trestle_e2e::wait_for("split ghosts in", t, || async {
            let m = alice.state(&room, "m.room.member", &g).await.ok()??;
            (m["membership"] == "join").then_some(())
        })
        .await?;
    }
    for c in &mut wave {
        c.raw("QUIT :bye\r\n").await?;
    }
    drop(wave);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut back = Vec::new();
    for i in 0..3 {
        let mut c = IrcClient::connect(port, &format!("split{i}")).await?;
        c.join("#mod").await?;
        back.push(c);
    }
    // After the debounce (8 s here) those not back leave; the others never did.
    trestle_e2e::wait_for("the lost ghosts to leave", Duration::from_secs(40), || async {
        let events = alice.messages(&room, 300).await.ok()?;
        (3..6)
            .all(|i| leaves_of(&events, &format!("@irc_local_split{i}:localhost")) == 1)
            .then_some(())
    })
    .await?;
    let events = alice.messages(&room, 300).await?;
    for i in 0..3 {
        assert_eq!(
            leaves_of(&events, &format!("@irc_local_split{i}:localhost")),
            0,
            "split{i} left"
        );
    }
    Ok(())
}

/// Sends the command `line` in `room` and checks that the bot's answer contains `expect`.
async fn command(
    user: &MatrixUser,
    room: &str,
    line: &str,
    expect: &str,
) -> anyhow::Result<String> {
    let reply = user.command(room, "@ircbot:localhost", line).await?;
    anyhow::ensure!(reply.contains(expect), "{line}: answer {reply:?} lacks {expect:?}");
    Ok(reply)
}

#[tokio::test]
async fn admin_room_commands() -> anyhow::Result<()> {
    let env = start_mode("puppets").await?;
    let port = env.ircd.port();
    let t = Duration::from_secs(30);
    let mut irc = IrcClient::connect(port, "ircalice").await?;
    irc.join("#pup").await?;
    let alice = MatrixUser::register(&env.synapse.url(), "alice").await?;
    let portal = alice.join("#irc_local_#pup:localhost").await?;
    irc.wait_for(t, |l| l.command == "JOIN" && l.nick.as_deref() == Some("alice[m]")).await?;
    let admin = alice
        .create_room(serde_json::json!({"invite": ["@ircbot:localhost"], "is_direct": true}))
        .await?;
    trestle_e2e::wait_for("the bot in the admin room", t, || async {
        let m = alice.state(&admin, "m.room.member", "@ircbot:localhost").await.ok()??;
        (m["membership"] == "join").then_some(())
    })
    .await?;

    alice
        .wait_for_message(&admin, t, |e| {
            e["sender"] == "@ircbot:localhost" && body(e).contains("admin room")
        })
        .await?;
    // !nick: the puppet changes nick, and keeps being recognised (no ghost for it).
    command(&alice, &admin, "!nick alicia", "alicia").await?;
    irc.wait_for(t, |l| {
        l.command == "NICK" && l.nick.as_deref() == Some("alice[m]") && l.params == ["alicia"]
    })
    .await?;
    alice.send_text(&portal, "renamed").await?;
    irc.wait_for(t, |l| {
        l.nick.as_deref() == Some("alicia") && l.params.get(1).is_some_and(|m| m == "renamed")
    })
    .await?;
    // Invalid or hostile nicks are refused.
    let refused = command(&alice, &admin, "!nick \"bad\r\nQUIT :x\"", "").await?;
    assert!(!refused.contains("Asked"), "{refused}");

    // !whois through the bot.
    let whois = command(&alice, &admin, "!whois ircalice", "ircalice is").await?;
    assert!(whois.contains("127.0.0.1") && whois.contains("#pup"), "{whois}");

    // !cmd: a raw command through her own connection; connection-managing commands refused.
    command(&alice, &admin, "!cmd local PRIVMSG ircalice :raw hello", "Sent").await?;
    irc.wait_for(t, |l| {
        l.nick.as_deref() == Some("alicia") && l.params == ["ircalice", "raw hello"]
    })
    .await?;
    command(&alice, &admin, "!cmd local QUIT :bye", "managed by the bridge").await?;

    // !storepass: kept encrypted (the plaintext is nowhere in the database).
    command(&alice, &admin, "!storepass local hunter2-very-secret", "Stored").await?;
    // Once handled, the transaction that carried the command is zeroed, and the checkpointer
    // (every second) brings that into the database file.
    trestle_e2e::wait_for("no plaintext in the database", Duration::from_secs(20), || async {
        let bytes = std::fs::read(env.dir.path().join("irc.db")).ok()?;
        (!bytes.windows(19).any(|w| w == b"hunter2-very-secret")).then_some(())
    })
    .await?;
    command(&alice, &admin, "!removepass local", "forgotten").await?;

    // !part, then !quit.
    command(&alice, &admin, "!part #pup", "Left #pup").await?;
    irc.wait_for(t, |l| l.command == "PART" && l.nick.as_deref() == Some("alicia")).await?;
    command(&alice, &admin, "!quit", "Disconnected").await?;
    // (No channel in common any more, so no QUIT line reaches us: ask the server.)
    let mut gone = false;
    for _ in 0..30 {
        irc.raw("WHOIS alicia\r\n").await?;
        let reply = irc
            .wait_for(Duration::from_secs(2), |l| {
                matches!(l.command.as_str(), "401" | "311")
                    && l.params.get(1).is_some_and(|n| n == "alicia")
            })
            .await?;
        irc.seen.retain(|l| {
            !matches!(l.command.as_str(), "401" | "311" | "312" | "318" | "319" | "317")
        });
        if reply.command == "401" {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(gone, "alicia still connected after !quit");

    // !plumb an existing room (alice is a bridge admin), then !unlink it.
    let mut other = IrcClient::connect(port, "plumber").await?;
    other.join("#plumbed").await?;
    let room = alice.create_room(serde_json::json!({"invite": ["@ircbot:localhost"]})).await?;
    trestle_e2e::wait_for("the bot invited", t, || async {
        let m = alice.state(&room, "m.room.member", "@ircbot:localhost").await.ok()??;
        (m["membership"] == "invite" || m["membership"] == "join").then_some(())
    })
    .await?;
    command(&alice, &admin, &format!("!plumb {room} #plumbed"), "now bridged").await?;
    other.wait_for(t, |l| l.command == "JOIN" && l.nick.as_deref() == Some("MatrixBridge")).await?;
    other.privmsg("#plumbed", "into the plumbed room").await?;
    alice.wait_for_message(&room, t, |e| body(e) == "into the plumbed room").await?;
    // A user who is no bridge admin may plumb a room of their own, not unlink someone else's.
    let carol = MatrixUser::register(&env.synapse.url(), "carol").await?;
    let carol_admin = carol.admin_room("@ircbot:localhost").await?;
    let r = carol.command(&carol_admin, "@ircbot:localhost", &format!("!unlink {room}")).await?;
    assert!(r.contains("only an admin"), "{r}");
    // The bot needs power in a plumbed room (to invite ghosts, to mark the room bridged).
    let own = carol
        .create_room(serde_json::json!({"invite": ["@ircbot:localhost"],
            "power_level_content_override": {"users": {"@ircbot:localhost": 100}}}))
        .await?;
    command(&carol, &carol_admin, &format!("!plumb {own} #carols"), "now bridged").await?;
    other.join("#carols").await?;
    // The bot is in the channel: its JOIN after ours, or its name in the NAMES we got.
    other
        .wait_for(t, |l| {
            let bot_joined = l.command == "JOIN"
                && l.nick.as_deref() == Some("MatrixBridge")
                && l.params.first().is_some_and(|c| c == "#carols");
            let bot_named = l.command == "353"
                && l.params.get(2).is_some_and(|c| c == "#carols")
                && l.params.get(3).is_some_and(|n| {
                    n.split(' ').any(|n| n.trim_start_matches(['@', '+']) == "MatrixBridge")
                });
            bot_joined || bot_named
        })
        .await?;
    other.privmsg("#carols", "into carol's room").await?;
    carol
        .wait_for_message(&own, t, |e| body(e) == "into carol's room")
        .await
        .map_err(|e| e.context(env.bridge.child.log_tail(150)))?;
    command(&carol, &carol_admin, &format!("!unlink {own}"), "unlinked").await?;

    command(&alice, &admin, &format!("!unlink {room}"), "unlinked").await?;
    other.wait_for(t, |l| l.command == "PART" && l.nick.as_deref() == Some("MatrixBridge")).await?;
    Ok(())
}

#[tokio::test]
async fn replies_reactions_and_redactions_reach_irc() -> anyhow::Result<()> {
    let env = start().await?;
    let t = Duration::from_secs(30);
    let mut irc = IrcClient::connect(env.ircd.port(), "ircalice").await?;
    irc.join("#rr").await?;
    let alice = MatrixUser::register(&env.synapse.url(), "alice").await?;
    let room = alice.join("#irc_local_#rr:localhost").await?;
    irc.wait_for(t, |l| l.command == "JOIN" && l.nick.as_deref() == Some("MatrixBridge")).await?;
    irc.privmsg("#rr", "the original words, and a few more to make it long").await?;
    let orig = alice.wait_for_message(&room, t, |e| body(e).starts_with("the original")).await?;
    let orig_id = orig["event_id"].as_str().unwrap_or_default().to_owned();

    // A reply carries a short quote of what it answers.
    let reply = alice
        .send(
            &room,
            "m.room.message",
            serde_json::json!({
                "msgtype": "m.text",
                "body": "> <@irc_local_ircalice:localhost> the original words\n\nI agree",
                "m.relates_to": {"m.in_reply_to": {"event_id": orig_id}}
            }),
        )
        .await?;
    let l = irc.wait_for(t, |l| l.params.get(1).is_some_and(|m| m.contains("I agree"))).await?;
    assert_eq!(
        l.params[1],
        "<alice> <ircalice> \"the original words, and a few more to ma…\" <- I agree"
    );

    // A reaction becomes an action line naming what it reacts to.
    alice
        .send(
            &room,
            "m.reaction",
            serde_json::json!({
                "m.relates_to": {"rel_type": "m.annotation", "event_id": orig_id, "key": "👍"}
            }),
        )
        .await?;
    irc.wait_for(t, |l| {
        l.params
            .get(1)
            .is_some_and(|m| m.starts_with("* alice reacted with 👍 to <ircalice> \"the original"))
    })
    .await?;

    // A redaction (redaction_fallback: notice) says a message was deleted, not what it said.
    alice.put(&format!("/rooms/{room}/redact/{reply}/r1"), serde_json::json!({})).await?;
    let l = irc
        .wait_for(t, |l| l.params.get(1).is_some_and(|m| m.contains("deleted a message")))
        .await?;
    assert_eq!(l.params[1], "* alice deleted a message from alice");

    // More lines than max_lines (5): four lines, then a link to the whole text.
    let long: Vec<String> = (1..=8).map(|i| format!("line number {i}")).collect();
    alice.send_text(&room, &long.join("\n")).await?;
    let l =
        irc.wait_for(t, |l| l.params.get(1).is_some_and(|m| m.contains("full message"))).await?;
    let url = l.params[1]
        .split_whitespace()
        .find(|w| w.starts_with("http"))
        .map(|w| w.trim_end_matches(')'))
        .unwrap_or_default()
        .to_owned();
    assert!(l.params[1].contains("8 lines"), "{}", l.raw);
    let shown: Vec<&str> = irc
        .seen
        .iter()
        .filter_map(|l| l.params.get(1).map(String::as_str))
        .filter(|m| m.starts_with("<alice> line number"))
        .collect();
    assert_eq!(shown.len(), 4, "{shown:?}");
    let full = reqwest::get(&url).await?;
    assert!(full.status().is_success(), "{url}: {}", full.status());
    assert_eq!(full.text().await?, long.join("\n"));
    Ok(())
}

#[tokio::test]
async fn identd_answers_for_the_bridge_connections() -> anyhow::Result<()> {
    // ngIRCd asks 127.0.0.1:113 for every connection; only the bridge's are answered.
    let env =
        start_with("puppets", "  identd: { enabled: true, listen: \"127.0.0.1:113\" }\n").await?;
    let t = Duration::from_secs(30);
    let mut irc = IrcClient::connect(env.ircd.port(), "watcher").await?;
    irc.join("#ident").await?;
    let alice = MatrixUser::register(&env.synapse.url(), "alice").await?;
    alice.join("#irc_local_#ident:localhost").await?;
    // No `~`: the user name was confirmed by our identd (the bot's and alice's puppet's).
    let bot = irc
        .wait_for(t, |l| l.command == "JOIN" && l.nick.as_deref() == Some("MatrixBridge"))
        .await?;
    assert!(bot.raw.starts_with(":MatrixBridge!trestle@"), "{}", bot.raw);
    let puppet =
        irc.wait_for(t, |l| l.command == "JOIN" && l.nick.as_deref() == Some("alice[m]")).await?;
    assert!(puppet.raw.starts_with(":alice[m]!alice@"), "{}", puppet.raw);
    // Our own client has no ident answer: the server marks it with `~`.
    irc.raw("WHOIS watcher\r\n").await?;
    let me = irc.wait_for(t, |l| l.command == "311").await?;
    assert_eq!(me.params.get(2).map(String::as_str), Some("~watcher"), "{}", me.raw);
    Ok(())
}

/// The capabilities the IRCv3 tests' IRC user asks for.
const V3_CAPS: &[&str] = &["message-tags", "server-time", "echo-message"];

fn event_id(e: &Value) -> String {
    e["event_id"].as_str().unwrap_or_default().to_owned()
}

fn in_reply_to(e: &Value) -> &str {
    e["content"]["m.relates_to"]["m.in_reply_to"]["event_id"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn harness_inspircd_relays_client_tags() -> anyhow::Result<()> {
    let mut ircd = Ircd::start_inspircd().await?;
    let mut a = IrcClient::connect_with_caps(ircd.port(), "a1", V3_CAPS).await?;
    let mut b = IrcClient::connect_with_caps(ircd.port(), "b1", V3_CAPS).await?;
    // A client without capabilities still works, and sees no tags.
    let mut plain = IrcClient::connect(ircd.port(), "c1").await?;
    for c in [&mut a, &mut b, &mut plain] {
        c.join("#h").await?;
    }
    a.raw("@+draft/reply=x\\sy PRIVMSG #h :tagged\r\n").await?;
    let echo = a.wait_for(Duration::from_secs(5), |l| l.command == "PRIVMSG").await?;
    let got = b.wait_for(Duration::from_secs(5), |l| l.command == "PRIVMSG").await?;
    assert_eq!(got.tag("+draft/reply"), Some("x y"));
    assert!(got.tag("time").is_some(), "{}", got.raw);
    assert_eq!(got.tag("msgid"), echo.tag("msgid"));
    let untagged = plain.wait_for(Duration::from_secs(5), |l| l.command == "PRIVMSG").await?;
    assert!(untagged.tags.is_empty(), "{}", untagged.raw);
    ircd.stop();
    Ok(())
}

/// Relay mode on InspIRCd: msgids map both ways, so replies and reactions travel as
/// `+draft/reply` and `+draft/react`, and server-time is the events' timestamp.
#[tokio::test]
async fn ircv3_replies_reactions_and_server_time_relay() -> anyhow::Result<()> {
    let env = start_on(Ircd::start_inspircd().await?, "relay", "").await?;
    let t = Duration::from_secs(30);
    let mut irc = IrcClient::connect_with_caps(env.ircd.port(), "ircbob", V3_CAPS).await?;
    irc.join("#v3").await?;
    let alice = MatrixUser::register(&env.synapse.url(), "alice").await?;
    let room = alice.join("#irc_local_#v3:localhost").await?;
    irc.wait_for(t, |l| l.command == "JOIN" && l.nick.as_deref() == Some("MatrixBridge")).await?;

    // IRC → Matrix: the event's timestamp is the server's time of the message.
    irc.privmsg("#v3", "a question from IRC").await?;
    let echo =
        irc.wait_for(t, |l| l.command == "PRIVMSG" && l.nick.as_deref() == Some("ircbob")).await?;
    let q_msgid = echo.tag("msgid").unwrap_or_default().to_owned();
    assert!(!q_msgid.is_empty(), "no msgid: {}", echo.raw);
    let q = alice.wait_for_message(&room, t, |e| body(e) == "a question from IRC").await?;
    let time = echo.tag("time").unwrap_or_default();
    let expected = trestle_irc::bridge::parse_server_time(time);
    assert_eq!(q["origin_server_ts"].as_u64(), expected, "server-time {time}");

    // Matrix reply → `+draft/reply` with the msgid, and no quote in the text.
    let answer = alice
        .send(
            &room,
            "m.room.message",
            serde_json::json!({
                "msgtype": "m.text",
                "body": "> <@irc_local_ircbob:localhost> a question from IRC\n\nthe answer",
                "m.relates_to": {"m.in_reply_to": {"event_id": event_id(&q)}}
            }),
        )
        .await?;
    let l = irc.wait_for(t, |l| l.params.get(1).is_some_and(|m| m.contains("the answer"))).await?;
    assert_eq!(l.params[1], "<alice> the answer");
    assert_eq!(l.tag("+draft/reply"), Some(q_msgid.as_str()), "{}", l.raw);
    let a_msgid = l.tag("msgid").unwrap_or_default().to_owned();

    // IRC reply to the bridged Matrix message → a Matrix reply to that event.
    irc.raw(&format!("@+draft/reply={a_msgid} PRIVMSG #v3 :thanks for that\r\n")).await?;
    let r = alice.wait_for_message(&room, t, |e| body(e) == "thanks for that").await?;
    assert_eq!(in_reply_to(&r), answer, "{r}");

    // An edit's line maps to the message edited: a reply to it answers that message.
    alice
        .send(
            &room,
            "m.room.message",
            serde_json::json!({
                "msgtype": "m.text", "body": "* the better answer",
                "m.new_content": {"msgtype": "m.text", "body": "the better answer"},
                "m.relates_to": {"rel_type": "m.replace", "event_id": answer}
            }),
        )
        .await?;
    let l = irc.wait_for(t, |l| l.params.get(1).is_some_and(|m| m.contains("better"))).await?;
    assert_eq!(l.params[1], "<alice> * the better answer");
    let e_msgid = l.tag("msgid").unwrap_or_default().to_owned();
    irc.raw(&format!("@+draft/reply={e_msgid} PRIVMSG #v3 :better indeed\r\n")).await?;
    let r = alice.wait_for_message(&room, t, |e| body(e) == "better indeed").await?;
    assert_eq!(in_reply_to(&r), answer, "{r}");

    // IRC reaction (TAGMSG) → m.reaction of the ghost on the mapped event.
    irc.raw(&format!("@+draft/react=🎉;+draft/reply={a_msgid} TAGMSG #v3\r\n")).await?;
    let re = alice.wait_for_message(&room, t, |e| e["type"] == "m.reaction").await?;
    assert_eq!(re["sender"], "@irc_local_ircbob:localhost");
    assert_eq!(re["content"]["m.relates_to"]["event_id"], answer.as_str());
    assert_eq!(re["content"]["m.relates_to"]["key"], "🎉");
    assert_eq!(re["content"]["m.relates_to"]["rel_type"], "m.annotation");

    // Matrix reaction → TAGMSG with `+draft/react` and `+draft/reply`; a key with CR/LF is
    // escaped inside the tag, never a new line.
    for key in ["👍", "x\r\nQUIT :boom"] {
        alice
            .send(
                &room,
                "m.reaction",
                serde_json::json!({"m.relates_to": {
                    "rel_type": "m.annotation", "event_id": event_id(&q), "key": key}}),
            )
            .await?;
        let l = irc
            .wait_for(t, |l| l.command == "TAGMSG" && l.tag("+draft/react") == Some(key))
            .await?;
        assert_eq!(l.nick.as_deref(), Some("MatrixBridge"));
        assert_eq!(l.tag("+draft/reply"), Some(q_msgid.as_str()));
    }
    assert!(!irc.seen.iter().any(|l| l.command == "QUIT"));

    // Our own echoes are never bridged back.
    alice.send_text(&room, "the last word").await?;
    irc.wait_for(t, |l| l.params.get(1).is_some_and(|m| m == "<alice> the last word")).await?;
    irc.privmsg("#v3", "after the last word").await?;
    alice.wait_for_message(&room, t, |e| body(e) == "after the last word").await?;
    let events = alice.messages(&room, 100).await?;
    let echoed: Vec<&Value> = events.iter().filter(|e| body(e).contains("<alice>")).collect();
    assert!(echoed.is_empty(), "echoes bridged back: {echoed:?}");
    Ok(())
}

/// Puppet mode on InspIRCd: a puppet learns its messages' msgids from its own echoes, and
/// reacts through its own connection.
#[tokio::test]
async fn ircv3_replies_and_reactions_through_puppets() -> anyhow::Result<()> {
    let env = start_on(Ircd::start_inspircd().await?, "puppets", "").await?;
    let t = Duration::from_secs(30);
    let mut irc = IrcClient::connect_with_caps(env.ircd.port(), "irccarol", V3_CAPS).await?;
    irc.join("#pv3").await?;
    let alice = MatrixUser::register(&env.synapse.url(), "alice").await?;
    let room = alice.join("#irc_local_#pv3:localhost").await?;
    let said = alice.send_text(&room, "hello from my puppet").await?;
    let l =
        irc.wait_for(t, |l| l.params.get(1).is_some_and(|m| m == "hello from my puppet")).await?;
    let puppet = l.nick.clone().unwrap_or_default();
    assert_ne!(puppet, "MatrixBridge");
    assert!(l.tag("msgid").is_some(), "{}", l.raw);
    let msgid = l.tag("msgid").unwrap_or_default().to_owned();

    irc.raw(&format!("@+reply={msgid} PRIVMSG #pv3 :{puppet}: hi back\r\n")).await?;
    let r = alice.wait_for_message(&room, t, |e| body(e).ends_with("hi back")).await?;
    assert_eq!(in_reply_to(&r), said, "{r}");

    alice
        .send(
            &room,
            "m.reaction",
            serde_json::json!({"m.relates_to": {
                "rel_type": "m.annotation", "event_id": event_id(&r), "key": "❤️"}}),
        )
        .await?;
    let tag = irc.wait_for(t, |l| l.command == "TAGMSG").await?;
    assert_eq!(tag.nick.as_deref(), Some(puppet.as_str()));
    assert_eq!(tag.tag("+draft/react"), Some("❤️"));
    let theirs = irc
        .wait_for(t, |l| {
            l.command == "PRIVMSG"
                && l.nick.as_deref() == Some("irccarol")
                && l.params.get(1).is_some_and(|m| m.ends_with("hi back"))
        })
        .await?;
    let their_msgid = theirs.tag("msgid").unwrap_or_default().to_owned();
    assert_eq!(tag.tag("+draft/reply"), Some(their_msgid.as_str()));

    // Private messages: msgids map in the DM room too.
    irc.privmsg(&puppet, "psst, a secret").await?;
    let psst = irc
        .wait_for(t, |l| {
            l.command == "PRIVMSG" && l.params.get(1).is_some_and(|m| m == "psst, a secret")
        })
        .await?;
    let psst_msgid = psst.tag("msgid").unwrap_or_default().to_owned();
    let dm = alice.wait_for_invite(t).await?;
    alice.join(&dm).await?;
    let secret = alice.wait_for_message(&dm, t, |e| body(e) == "psst, a secret").await?;
    irc.raw(&format!("@+draft/react=👀;+draft/reply={psst_msgid} TAGMSG {puppet}\r\n")).await?;
    let re = alice.wait_for_message(&dm, t, |e| e["type"] == "m.reaction").await?;
    assert_eq!(re["content"]["m.relates_to"]["event_id"], event_id(&secret).as_str());
    assert_eq!(re["content"]["m.relates_to"]["key"], "👀");
    alice
        .send(
            &dm,
            "m.room.message",
            serde_json::json!({"msgtype": "m.text", "body": "safe with me",
                "m.relates_to": {"m.in_reply_to": {"event_id": event_id(&secret)}}}),
        )
        .await?;
    let l = irc.wait_for(t, |l| l.params.get(1).is_some_and(|m| m == "safe with me")).await?;
    assert_eq!(l.params[0], "irccarol");
    assert_eq!(l.tag("+draft/reply"), Some(psst_msgid.as_str()));

    // The puppet's own messages (and their echoes) never come back as a ghost's.
    for r in [&room, &dm] {
        let events = alice.messages(r, 100).await?;
        let back: Vec<&Value> = events
            .iter()
            .filter(|e| {
                e["type"] == "m.room.message"
                    && e["sender"] != "@alice:localhost"
                    && ["hello from my puppet", "safe with me"].contains(&body(e))
            })
            .collect();
        assert!(back.is_empty(), "bridged back: {back:?}");
    }
    Ok(())
}

/// The account `nick` is logged in to, by the server's WHOIS (330), if any.
async fn whois_account(irc: &mut IrcClient, nick: &str) -> anyhow::Result<Option<String>> {
    irc.seen.clear();
    irc.raw(&format!("WHOIS {nick}\r\n")).await?;
    irc.wait_for(Duration::from_secs(10), |l| l.command == "318").await?;
    let account = irc.seen.iter().find(|l| l.command == "330").and_then(|l| l.params.get(2));
    Ok(account.cloned())
}

/// Waits for the user's puppet (re)joining `chan` after `!reconnect`; returns its nick (the
/// old connection's nick may still be taken for a moment).
async fn puppet_rejoined(irc: &mut IrcClient, chan: &str) -> anyhow::Result<String> {
    let l = irc
        .wait_for(Duration::from_secs(30), |l| {
            l.command == "JOIN"
                && l.params.first().is_some_and(|c| c == chan)
                && l.nick.as_deref().is_some_and(|n| n.starts_with("alice"))
        })
        .await?;
    Ok(l.nick.unwrap_or_default())
}

/// Registers the account `nick` with NickServ (no e-mail verification on the test network)
/// from a client of that nick, which stays connected.
async fn nickserv_register(port: u16, nick: &str, password: &str) -> anyhow::Result<IrcClient> {
    let mut owner = IrcClient::connect(port, nick).await?;
    owner.privmsg("NickServ", &format!("REGISTER {password} {nick}@example.org")).await?;
    owner
        .wait_for(Duration::from_secs(30), |l| {
            l.command == "NOTICE"
                && l.nick.as_deref() == Some("NickServ")
                && l.params.get(1).is_some_and(|m| m.contains("is now registered"))
        })
        .await?;
    Ok(owner)
}

/// SASL PLAIN against InspIRCd with Atheme: the bot logs in to its configured account; the
/// user stores `account:password` with `!storepass` and reconnects, and the server then shows
/// the puppet logged in to the account. A wrong password does not stop the connection, and
/// the user is told.
#[tokio::test]
async fn sasl_plain_through_storepass() -> anyhow::Result<()> {
    let ircd = Ircd::start_inspircd_with_services().await?;
    let port = ircd.port();
    let t = Duration::from_secs(30);
    let _bot_owner = nickserv_register(port, "bridgeacct", "bot-secret-pass").await?;
    let mut owner = nickserv_register(port, "aliceacct", "correct-horse-battery").await?;
    let bot_sasl = "      sasl_account: bridgeacct\n      sasl_password: bot-secret-pass\n";
    let env = start_on(ircd, "puppets", bot_sasl).await?;

    let mut irc = IrcClient::connect(port, "ircwatch").await?;
    assert_eq!(whois_account(&mut irc, "MatrixBridge").await?.as_deref(), Some("bridgeacct"));
    irc.join("#sasl").await?;
    let alice = MatrixUser::register(&env.synapse.url(), "alice").await?;
    let portal = alice.join("#irc_local_#sasl:localhost").await?;
    let first = puppet_rejoined(&mut irc, "#sasl").await?;
    assert_eq!(whois_account(&mut irc, &first).await?, None);
    let admin = alice
        .create_room(serde_json::json!({"invite": ["@ircbot:localhost"], "is_direct": true}))
        .await?;
    alice
        .wait_for_message(&admin, t, |e| {
            e["sender"] == "@ircbot:localhost" && body(e).contains("admin room")
        })
        .await?;

    // A wrong password: the puppet connects all the same, without the account, and the user
    // hears why where the puppet speaks to them.
    command(&alice, &admin, "!storepass local aliceacct:wrong-password", "Stored").await?;
    irc.seen.clear();
    command(&alice, &admin, "!reconnect local", "Reconnecting").await?;
    let nick = puppet_rejoined(&mut irc, "#sasl").await?;
    assert_eq!(whois_account(&mut irc, &nick).await?, None);
    let told = alice
        .wait_for_message(&portal, t, |e| {
            e["sender"] == "@ircbot:localhost" && body(e).contains("SASL")
        })
        .await?;
    assert!(body(&told).contains("!storepass local"), "{told}");

    // The right one: the server has the puppet logged in to the account.
    command(&alice, &admin, "!storepass local aliceacct:correct-horse-battery", "Stored").await?;
    irc.seen.clear();
    command(&alice, &admin, "!reconnect local", "Reconnecting").await?;
    let nick = puppet_rejoined(&mut irc, "#sasl").await?;
    assert_eq!(whois_account(&mut irc, &nick).await?.as_deref(), Some("aliceacct"));
    // Its owner hears of the login from SaslServ, too.
    owner
        .wait_for(t, |l| {
            l.nick.as_deref() == Some("SaslServ")
                && l.params.get(1).is_some_and(|m| m.contains("has just authenticated as you"))
        })
        .await?;
    Ok(())
}

/// SASL EXTERNAL: the bot connects over TLS with the client certificate of its config, whose
/// fingerprint the account's owner added with NickServ `CERT ADD`; the server shows the bot
/// logged in to the account.
#[tokio::test]
async fn sasl_external_with_the_bots_certificate() -> anyhow::Result<()> {
    let ircd = Ircd::start_inspircd_with_services().await?;
    let port = ircd.port();
    let tls_port = ircd.tls_port().ok_or_else(|| anyhow::anyhow!("no TLS listener"))?;
    let certs = tempfile::Builder::new().prefix("trestle-cert-").tempdir()?;
    let (pem, fingerprint) = trestle_e2e::ircd::client_certificate(certs.path(), "bridge")?;
    let mut owner = nickserv_register(port, "bridgecert", "unused-pass-1234").await?;
    owner.privmsg("NickServ", &format!("CERT ADD {fingerprint}")).await?;
    owner
        .wait_for(Duration::from_secs(30), |l| {
            l.nick.as_deref() == Some("NickServ")
                && l.params.get(1).is_some_and(|m| m.contains(&fingerprint))
        })
        .await?;
    let extra = format!("      tls_client_cert: \"{}\"\n", pem.display());
    let _env = start_on_port(ircd, tls_port, true, "relay", &extra).await?;
    let mut irc = IrcClient::connect(port, "ircwatch").await?;
    // (The bridge is ready once its bot has registered, so one WHOIS would do; a few spare
    // a slow machine.)
    let mut logged_in = None;
    for _ in 0..30 {
        logged_in = whois_account(&mut irc, "MatrixBridge").await?;
        if logged_in.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(logged_in.as_deref(), Some("bridgecert"));
    Ok(())
}

/// A member's membership event in `room`, as `user` sees it.
async fn member_event(user: &MatrixUser, room: &str, who: &str) -> Option<Value> {
    user.state(room, "m.room.member", who).await.ok()?
}

/// Waits until `who` has `membership` in `room` (as `user` sees it); returns the event content.
async fn wait_membership(
    user: &MatrixUser,
    room: &str,
    who: &str,
    membership: &str,
) -> anyhow::Result<Value> {
    trestle_e2e::wait_for(&format!("{who} {membership}"), Duration::from_secs(30), || async {
        let m = member_event(user, room, who).await?;
        (m["membership"] == membership).then_some(m)
    })
    .await
}

/// Reads what `irc` receives for `d`, without waiting for anything in particular.
async fn drain(irc: &mut IrcClient, d: Duration) {
    let _ = irc.wait_for(d, |_| false).await;
}

/// Creates alice's admin room with the bot and waits for its welcome.
async fn admin_room(alice: &MatrixUser) -> anyhow::Result<String> {
    alice.admin_room("@ircbot:localhost").await
}

/// IRC bans become Matrix bans: masks of a ghost's and of a puppet's `user@host` ban them in
/// the portal (by the bot, naming who banned and the mask), `-b` lifts them; bans the bot
/// sets for a Matrix moderator never come back as a second Matrix action.
#[tokio::test]
async fn irc_bans_mirror_as_matrix_bans() -> anyhow::Result<()> {
    let mut env = start_on(Ircd::start_inspircd_moderated().await?, "puppets", "").await?;
    let port = env.ircd.port();
    let t = Duration::from_secs(30);
    let mut op = IrcClient::connect(port, "ircop").await?;
    op.join("#bans").await?; // first in: channel operator
    let mut victim = IrcClient::connect(port, "victim").await?;
    victim.join("#bans").await?;
    // bob watches (his own puppet is never matched); alice is the one banned.
    let bob = MatrixUser::register(&env.synapse.url(), "bob").await?;
    let room = bob.join("#irc_local_#bans:localhost").await?;
    op.wait_for(t, |l| l.command == "JOIN" && l.nick.as_deref() == Some("MatrixBridge")).await?;
    op.raw("MODE #bans +o MatrixBridge\r\n").await?;
    op.wait_for(t, |l| l.command == "JOIN" && l.nick.as_deref() == Some("bob[m]")).await?;
    let alice = MatrixUser::register(&env.synapse.url(), "alice").await?;
    alice.join(&room).await?;
    let joined =
        op.wait_for(t, |l| l.command == "JOIN" && l.nick.as_deref() == Some("alice[m]")).await?;
    // The host other users see: a cloak, never the address.
    let host = joined.raw.split_once('@').and_then(|(_, r)| r.split(' ').next()).unwrap_or("");
    assert!(host.starts_with("cloak-"), "{}", joined.raw);
    let mask = format!("*!*alice@{host}");
    let ghost = "@irc_local_victim:localhost";
    wait_membership(&bob, &room, ghost, "join").await?;

    // A mask of a ghost's user name and cloaked host (known to the bridge from its WHO when it
    // joined: victim has said nothing since): the ghost is banned in the room, by the bot,
    // saying who and what.
    op.raw("MODE #bans +b *!*victim@cloak-*\r\n").await?;
    let ban = wait_membership(&bob, &room, ghost, "ban").await?;
    let reason = ban["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("ircop") && reason.contains("*!*victim@cloak-*"), "{ban}");
    // The bot (an operator) does not kick or ban on IRC in return.
    drain(&mut victim, Duration::from_secs(3)).await;
    assert!(
        !victim.seen.iter().any(|l| l.command == "KICK"),
        "victim kicked: {:?}",
        victim.seen.iter().map(|l| &l.raw).collect::<Vec<_>>()
    );

    // A mask of alice's puppet's cloaked host (bob's puppet has the same host, another user
    // name): alice is banned, bob is not, and her puppet leaves the channel.
    op.raw(&format!("MODE #bans +b {mask}\r\n")).await?;
    let ban = wait_membership(&bob, &room, "@alice:localhost", "ban").await?;
    let reason = ban["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("ircop") && reason.contains(&mask), "{ban}");
    let ev = member_event(&bob, &room, "@alice:localhost").await.unwrap_or_default();
    assert_eq!(ev["membership"], "ban");
    op.wait_for(t, |l| l.command == "PART" && l.nick.as_deref() == Some("alice[m]")).await?;
    assert_eq!(
        member_event(&bob, &room, "@bob:localhost").await.unwrap_or_default()["membership"],
        "join"
    );
    // An extended ban is no hostmask: ignored.
    op.raw("MODE #bans +b R:someaccount\r\n").await?;

    // What the mask banned survives a restart of the bridge.
    op.seen.clear();
    env.bridge.restart().await?;
    op.wait_for(Duration::from_secs(60), |l| {
        l.command == "JOIN" && l.nick.as_deref() == Some("MatrixBridge")
    })
    .await?;
    op.raw("MODE #bans +o MatrixBridge\r\n").await?;
    // `-b`: unbanned; she can come back, and her puppet with her.
    op.raw(&format!("MODE #bans -b {mask}\r\n")).await?;
    let unban = wait_membership(&bob, &room, "@alice:localhost", "leave").await?;
    assert!(unban["reason"].as_str().is_some_and(|r| r.contains("ircop")), "{unban}");
    alice.join(&room).await?;
    op.seen.clear();
    op.wait_for(t, |l| l.command == "JOIN" && l.nick.as_deref() == Some("alice[m]")).await?;
    op.raw("MODE #bans -b *!*victim@cloak-*\r\n").await?;
    wait_membership(&bob, &room, ghost, "leave").await?;
    assert_eq!(
        member_event(&bob, &room, "@bob:localhost").await.unwrap_or_default()["membership"],
        "join"
    );

    // A Matrix ban of the ghost (alice is a bridge admin): the bot bans on IRC once, and its
    // own MODE +b coming back changes nothing on Matrix.
    victim.raw("PART #bans\r\n").await?;
    victim.join("#bans").await?;
    wait_membership(&bob, &room, ghost, "join").await?;
    op.seen.clear();
    alice
        .post(
            &format!("/rooms/{room}/ban"),
            serde_json::json!({"user_id": ghost, "reason": "spam"}),
        )
        .await?;
    op.wait_for(t, |l| {
        l.command == "MODE"
            && l.nick.as_deref() == Some("MatrixBridge")
            && l.params.get(1).is_some_and(|m| m == "+b")
            && l.params.get(2).is_some_and(|m| m == "victim!*@*")
    })
    .await?;
    alice.post(&format!("/rooms/{room}/unban"), serde_json::json!({"user_id": ghost})).await?;
    op.wait_for(t, |l| {
        l.command == "MODE"
            && l.nick.as_deref() == Some("MatrixBridge")
            && l.params.get(1).is_some_and(|m| m == "-b")
    })
    .await?;
    drain(&mut op, Duration::from_secs(4)).await;
    let modes = op
        .seen
        .iter()
        .filter(|l| l.command == "MODE" && l.nick.as_deref() == Some("MatrixBridge"))
        .count();
    assert_eq!(modes, 2, "{:?}", op.seen.iter().map(|l| &l.raw).collect::<Vec<_>>());
    let events = bob.messages(&room, 300).await?;
    let by_bot_after: Vec<&Value> = events
        .iter()
        .filter(|e| {
            e["type"] == "m.room.member"
                && e["state_key"] == ghost
                && e["sender"] == "@ircbot:localhost"
                && matches!(e["content"]["membership"].as_str(), Some("ban" | "leave"))
        })
        .collect();
    // Only the IRC ban and unban of earlier, none for alice's Matrix ban and unban.
    assert_eq!(by_bot_after.len(), 2, "{by_bot_after:?}");
    assert_eq!(member_event(&bob, &room, ghost).await.unwrap_or_default()["membership"], "leave");
    Ok(())
}

/// Invite-only channels: where the bot is no operator, the user is told who can let their
/// puppet in, and an IRC invite then does; where the bot is operator, it invites the puppet
/// itself. An IRC invite to a channel not bridged yet is a Matrix invite to its new portal.
#[tokio::test]
async fn invite_only_channels_and_irc_invites() -> anyhow::Result<()> {
    let env = start_on(Ircd::start_inspircd_moderated().await?, "puppets", "").await?;
    let port = env.ircd.port();
    let t = Duration::from_secs(30);
    let mut op = IrcClient::connect(port, "ircop").await?;
    op.join("#inv").await?;
    op.raw("MODE #inv +i\r\nINVITE MatrixBridge #inv\r\n").await?;
    let alice = MatrixUser::register(&env.synapse.url(), "alice").await?;
    let room = alice.join("#irc_local_#inv:localhost").await?;
    op.wait_for(t, |l| l.command == "JOIN" && l.nick.as_deref() == Some("MatrixBridge")).await?;

    // The bot is no operator: alice is told, with her nick and the channel.
    let told = alice
        .wait_for_message(&room, t, |e| {
            e["sender"] == "@ircbot:localhost" && body(e).contains("invite-only")
        })
        .await?;
    assert!(body(&told).contains("#inv") && body(&told).contains("/invite alice[m]"), "{told}");
    // An operator invites her puppet: it joins.
    op.raw("INVITE alice[m] #inv\r\n").await?;
    op.wait_for(t, |l| l.command == "JOIN" && l.nick.as_deref() == Some("alice[m]")).await?;

    // The bot made operator: bob's puppet is invited by the bot, and joins.
    op.raw("MODE #inv +o MatrixBridge\r\n").await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let bob = MatrixUser::register(&env.synapse.url(), "bob").await?;
    bob.join(&room).await?;
    op.wait_for(t, |l| l.command == "JOIN" && l.nick.as_deref() == Some("bob[m]")).await?;
    let events = bob.messages(&room, 100).await?;
    assert!(
        !events.iter().any(|e| body(e).contains("invite-only") && body(e).contains("bob[m]")),
        "bob was told he could not join"
    );

    // An IRC invite to a channel with no portal: a Matrix invite; accepting it joins.
    op.join("#elsewhere").await?;
    op.raw("INVITE alice[m] #elsewhere\r\n").await?;
    let invited = alice.wait_for_invite(t).await?;
    let portal = alice.join(&invited).await?;
    op.wait_for(t, |l| {
        l.command == "JOIN"
            && l.nick.as_deref() == Some("alice[m]")
            && l.params.first().is_some_and(|c| c == "#elsewhere")
    })
    .await?;
    op.privmsg("#elsewhere", "welcome in").await?;
    alice.wait_for_message(&portal, t, |e| body(e) == "welcome in").await?;
    Ok(())
}

/// Keyed channels: `!join #chan key` has the bot join with the key, puppets join with it too,
/// both rejoin with it after a restart, and a key changed with `MODE +k` is learnt for the next
/// puppet.
#[tokio::test]
async fn keyed_channel_puppets_join_with_the_key() -> anyhow::Result<()> {
    let mut env = start_on(Ircd::start_inspircd_moderated().await?, "puppets", "").await?;
    let port = env.ircd.port();
    let t = Duration::from_secs(30);
    let mut op = IrcClient::connect(port, "ircop").await?;
    op.join("#keyed").await?;
    op.raw("MODE #keyed +k sekrit\r\n").await?;
    let alice = MatrixUser::register(&env.synapse.url(), "alice").await?;
    let admin = admin_room(&alice).await?;
    command(&alice, &admin, "!join #keyed sekrit", "Invited you to #keyed").await?;
    op.wait_for(t, |l| l.command == "JOIN" && l.nick.as_deref() == Some("MatrixBridge")).await?;
    let room = alice.wait_for_invite(t).await?;
    alice.join(&room).await?;
    op.wait_for(t, |l| l.command == "JOIN" && l.nick.as_deref() == Some("alice[m]")).await?;

    // After a restart the bot and alice's puppet come back in with the key.
    op.seen.clear();
    env.bridge.restart().await?;
    let back = Duration::from_secs(90);
    op.wait_for(back, |l| l.command == "JOIN" && l.nick.as_deref() == Some("MatrixBridge")).await?;
    op.wait_for(back, |l| l.command == "JOIN" && l.nick.as_deref() == Some("alice[m]")).await?;

    // A new key: the bot sees the change, and bob's puppet joins with it.
    op.raw("MODE #keyed -k sekrit\r\nMODE #keyed +k changed\r\n").await?;
    op.wait_for(t, |l| l.command == "MODE" && l.params.get(2).is_some_and(|k| k == "changed"))
        .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let bob = MatrixUser::register(&env.synapse.url(), "bob").await?;
    bob.join("#irc_local_#keyed:localhost").await?;
    op.wait_for(t, |l| l.command == "JOIN" && l.nick.as_deref() == Some("bob[m]")).await?;
    let events = bob.messages(&room, 100).await?;
    assert!(!events.iter().any(|e| body(e).contains("Cannot join")), "a puppet was refused");
    Ok(())
}

/// The bodies of a room's recent messages (for failure reports).
async fn bodies(user: &MatrixUser, room: &str) -> Vec<String> {
    let events = user.messages(room, 50).await.unwrap_or_default();
    events.iter().filter(|e| e["type"] == "m.room.message").map(|e| body(e).to_owned()).collect()
}

/// The 64-hex-digit fingerprint in a `!certfp` answer.
fn fingerprint_in(text: &str) -> Option<String> {
    text.split(|c: char| !c.is_ascii_hexdigit())
        .find(|w| w.len() == 64 && w.chars().all(|c| c.is_ascii_digit() || c.is_ascii_lowercase()))
        .map(str::to_owned)
}

/// WHOIS `nick`: the account it is logged in to (330) and the certificate fingerprint the
/// server reports for it (276), if any.
async fn whois_account_and_certfp(
    irc: &mut IrcClient,
    nick: &str,
) -> anyhow::Result<(Option<String>, Option<String>)> {
    let account = whois_account(irc, nick).await?;
    let fp = irc
        .seen
        .iter()
        .find(|l| l.command == "276")
        .and_then(|l| l.params.last())
        .and_then(|m| fingerprint_in(m));
    Ok((account, fp))
}

/// CertFP for puppets: over TLS to InspIRCd with Atheme, a Matrix user registers her nick
/// with NickServ through her puppet (`!cmd`), makes a certificate with `!certfp`, adds its
/// fingerprint with `CERT ADD` in her private chat with NickServ, reconnects, and the server
/// shows her puppet presenting that certificate and logged in to the account (SASL EXTERNAL,
/// no password stored). A certificate not added to any account does not stop the connection,
/// and she is told why. `!certfp` refuses a network reached without TLS.
#[tokio::test]
async fn sasl_external_with_a_users_certfp() -> anyhow::Result<()> {
    let ircd = Ircd::start_inspircd_with_services().await?;
    let port = ircd.port();
    let tls_port = ircd.tls_port().ok_or_else(|| anyhow::anyhow!("no TLS listener"))?;
    let t = Duration::from_secs(30);
    // A second network on the same server, reached without TLS.
    let plain = format!(
        "    plain:\n      name: Plain IRC\n      host: 127.0.0.1\n      port: {port}\n      tls: false\n      bot_nick: PlainBridge\n      mode: puppets\n"
    );
    let env = start_on_port(ircd, tls_port, true, "puppets", &plain).await?;
    let mut irc = IrcClient::connect(port, "ircwatch").await?;
    irc.join("#certfp").await?;
    let alice = MatrixUser::register(&env.synapse.url(), "alice").await?;
    let portal = alice.join("#irc_local_#certfp:localhost").await?;
    let nick = puppet_rejoined(&mut irc, "#certfp").await?;
    let (account, fp) = whois_account_and_certfp(&mut irc, &nick).await?;
    assert_eq!((account, fp), (None, None), "no certificate yet");
    let admin = alice
        .create_room(serde_json::json!({"invite": ["@ircbot:localhost"], "is_direct": true}))
        .await?;
    alice
        .wait_for_message(&admin, t, |e| {
            e["sender"] == "@ircbot:localhost" && body(e).contains("admin room")
        })
        .await?;

    command(&alice, &admin, "!help", "!certfp <network> [remove] — ").await?;
    // Checked arguments; no CertFP without TLS.
    command(&alice, &admin, "!certfp", "usage: certfp").await?;
    command(&alice, &admin, "!certfp local bogus", "usage: certfp").await?;
    command(&alice, &admin, "!certfp plain", "without TLS").await?;
    command(&alice, &admin, "!certfp nowhere", "no network nowhere").await?;

    // She registers her nick; NickServ answers in a private chat.
    command(
        &alice,
        &admin,
        "!cmd local PRIVMSG NickServ :REGISTER certfp-pass-1234 alice@example.org",
        "Sent",
    )
    .await?;
    let dm = alice.wait_for_invite(t).await?;
    alice.join(&dm).await?;
    let nickserv = "@irc_local_nickserv:localhost";
    let answer = alice
        .wait_for_message(&dm, t, |e| {
            e["sender"] == nickserv && body(e).contains("is now registered")
        })
        .await;
    if let Err(e) = answer {
        anyhow::bail!("{e}; the private chat holds {:?}", bodies(&alice, &dm).await);
    }

    // Her certificate: made once, then shown again; the same fingerprint both times.
    let made = command(&alice, &admin, "!certfp local", "Made your certificate").await?;
    let fp = fingerprint_in(&made).ok_or_else(|| anyhow::anyhow!("no fingerprint: {made}"))?;
    assert!(
        made.contains(&format!("CERT ADD {fp}")) && made.contains("!reconnect local"),
        "{made}"
    );
    let shown = command(&alice, &admin, "!certfp local", "Your certificate").await?;
    assert_eq!(fingerprint_in(&shown).as_deref(), Some(fp.as_str()), "{shown}");
    // Its private key is sealed in the database (no PEM in the clear).
    let db = std::fs::read(env.dir.path().join("irc.db"))?;
    assert!(!db.windows(11).any(|w| w == b"PRIVATE KEY"), "a clear private key in the database");
    // Stored SASL PLAIN credentials would win: she is told.
    command(&alice, &admin, &format!("!storepass local {nick}:certfp-pass-1234"), "Stored").await?;
    command(&alice, &admin, "!certfp local", "SASL PLAIN wins").await?;
    command(&alice, &admin, "!removepass local", "forgotten").await?;

    // CERT ADD through her private chat with NickServ (she is identified since REGISTER).
    alice.send_text(&dm, &format!("CERT ADD {fp}")).await?;
    let answer = alice
        .wait_for_message(&dm, t, |e| {
            e["sender"] == nickserv && body(e).contains(&fp) && body(e).contains("Added")
        })
        .await;
    if let Err(e) = answer {
        anyhow::bail!("{e}; the private chat holds {:?}", bodies(&alice, &dm).await);
    }

    // Reconnected, her puppet presents the certificate and is logged in to her account.
    irc.seen.clear();
    command(&alice, &admin, "!reconnect local", "Reconnecting").await?;
    let nick2 = puppet_rejoined(&mut irc, "#certfp").await?;
    let (account, seen_fp) = whois_account_and_certfp(&mut irc, &nick2).await?;
    assert_eq!(seen_fp.as_deref(), Some(fp.as_str()), "the server saw another certificate");
    assert_eq!(account.as_deref(), Some(nick.as_str()), "not logged in by SASL EXTERNAL");

    // A new certificate, not added to any account: connected without the account, and told.
    let removed = command(&alice, &admin, "!certfp local remove", "forgotten").await?;
    assert!(removed.contains(&format!("CERT DEL {fp}")), "{removed}");
    let made = command(&alice, &admin, "!certfp local", "Made your certificate").await?;
    let fp2 = fingerprint_in(&made).ok_or_else(|| anyhow::anyhow!("no fingerprint: {made}"))?;
    assert_ne!(fp2, fp);
    irc.seen.clear();
    command(&alice, &admin, "!reconnect local", "Reconnecting").await?;
    let nick3 = puppet_rejoined(&mut irc, "#certfp").await?;
    let (account, seen_fp) = whois_account_and_certfp(&mut irc, &nick3).await?;
    assert_eq!(seen_fp.as_deref(), Some(fp2.as_str()));
    assert_eq!(account, None);
    let told = alice
        .wait_for_message(&portal, t, |e| {
            e["sender"] == "@ircbot:localhost" && body(e).contains("SASL EXTERNAL")
        })
        .await;
    let told = match told {
        Ok(told) => told,
        Err(e) => anyhow::bail!(
            "{e}; the portal holds {:?}\n--- bridge log:\n{}",
            bodies(&alice, &portal).await,
            env.bridge.child.log_tail(40)
        ),
    };
    assert!(body(&told).contains(&format!("CERT ADD {fp2}")), "{told}");
    Ok(())
}
