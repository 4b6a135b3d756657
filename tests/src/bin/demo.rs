//! The demo: a local Synapse and IRC server (ngIRCd) with the Trestle IRC bridge registered, a
//! message crossing both ways, then everything left running for you to try with any Matrix and
//! IRC client. Ctrl-C stops it.
//!
//! Run it with `scripts/demo.sh` (which installs what is missing first).

use std::{io::Write, time::Duration};

use anyhow::Context as _;
use serde_json::Value;
use trestle_e2e::{
    BridgeProcess, MatrixUser, Synapse, binary, free_port,
    ircd::{IrcClient, Ircd},
    repo_root,
};

fn say(s: &str) {
    println!("\x1b[1m==>\x1b[0m {s}");
    let _ = std::io::stdout().flush();
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // A fresh state each run: the demo's servers are new every time, so old portals would point
    // at rooms that no longer exist.
    let dir = repo_root().join(".demo");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    say("starting an IRC server (ngIRCd)");
    let ircd = Ircd::start().await?;
    let port = free_port();
    let config = dir.join("irc.yaml");
    let reg = dir.join("irc-registration.yaml");
    let write = |hs: &str| {
        std::fs::write(
            &config,
            format!(
                "homeserver: {{ url: \"{hs}\", domain: localhost }}\n\
                 appservice: {{ id: irc, listen: \"127.0.0.1:{port}\", url: \"http://127.0.0.1:{port}\", \
                 bot_localpart: ircbot, bot_displayname: IRC bridge, registration: \"{}\" }}\n\
                 database: {{ path: \"{}\" }}\n\
                 permissions: {{ \"*\": user }}\n\
                 bridge:\n  networks:\n    local:\n      name: Demo IRC\n      host: 127.0.0.1\n      port: {}\n      tls: false\n      bot_nick: MatrixBridge\n",
                reg.display(),
                dir.join("irc.db").display(),
                ircd.port()
            ),
        )
    };
    let bin = binary("trestle-irc")?;
    write("http://127.0.0.1:1")?;
    say("generating the IRC bridge's registration file");
    BridgeProcess::generate_registration(&bin, &config, &reg)?;
    say("starting Synapse with the bridge registered");
    let synapse = Synapse::start(&[&reg]).await?;
    write(&synapse.url())?;
    say(&format!("starting trestle-irc on 127.0.0.1:{port}"));
    let mut bridge = BridgeProcess::start(
        &bin,
        &config,
        &format!("http://127.0.0.1:{port}"),
        &dir.join("bridge.log"),
    )
    .await?;

    say("IRC user 'ircfriend' joins #demo");
    let mut irc = IrcClient::connect(ircd.port(), "ircfriend").await?;
    irc.join("#demo").await?;
    say("Matrix user @demo:localhost (password: demo-password) joins #irc_local_#demo:localhost");
    let user = MatrixUser::register_with_password(&synapse.url(), "demo", "demo-password").await?;
    let room = user.join("#irc_local_#demo:localhost").await?;
    irc.wait_for(Duration::from_secs(30), |l| {
        l.command == "JOIN" && l.nick.as_deref() == Some("MatrixBridge")
    })
    .await?;

    say("Matrix → IRC: sending \"Hello from Matrix!\"");
    user.send_text(&room, "Hello from Matrix!").await?;
    let line = irc
        .wait_for(Duration::from_secs(30), |l| {
            l.command == "PRIVMSG"
                && l.params.get(1).is_some_and(|t| t.contains("Hello from Matrix"))
        })
        .await?;
    say(&format!("   IRC saw: <{}> {}", line.nick.as_deref().unwrap_or("?"), line.params[1]));

    say("IRC → Matrix: ircfriend says \"Hello from IRC!\"");
    irc.privmsg("#demo", "Hello from \x02IRC\x02!").await?;
    let ev = user
        .wait_for_message(&room, Duration::from_secs(30), |e: &Value| {
            e["content"]["body"] == "Hello from IRC!"
        })
        .await
        .context("the IRC message did not reach Matrix")?;
    say(&format!(
        "   Matrix saw: {}: {}",
        ev["sender"].as_str().unwrap_or("?"),
        ev["content"]["formatted_body"].as_str().unwrap_or("?")
    ));

    println!();
    println!("Everything is running. Try it:");
    println!("  Matrix client: homeserver {}, user demo, password demo-password", synapse.url());
    println!(
        "                 room #irc_local_#demo:localhost (or join #irc_local_#<anything>:localhost)"
    );
    println!("  IRC client:    server 127.0.0.1 port {} (no TLS), channel #demo", ircd.port());
    println!("  metrics:       http://127.0.0.1:{port}/metrics");
    println!("  bridge log:    {}", dir.join("bridge.log").display());
    println!("Press Ctrl-C to stop.");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
        // Keep answering the IRC server's PINGs for the demo's IRC user.
        _ = async { loop { let _ = irc.wait_for(Duration::from_secs(3600), |_| false).await; } } => {}
    }
    say("stopping");
    bridge.child.terminate(Duration::from_secs(10));
    drop(synapse);
    drop(ircd);
    Ok(())
}
