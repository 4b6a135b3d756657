//! The demo: a local Synapse with a Trestle bridge registered, a message crossing both ways,
//! then everything left running for you to try with any Matrix client. Ctrl-C stops it.
//!
//! Run it with `scripts/demo.sh` (which installs what is missing first).

use std::{io::Write, time::Duration};

use anyhow::Context as _;
use serde_json::Value;
use trestle_e2e::{BridgeProcess, MatrixUser, Synapse, binary, free_port, repo_root};

fn say(s: &str) {
    println!("\x1b[1m==>\x1b[0m {s}");
    let _ = std::io::stdout().flush();
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // A fresh state each run: the demo's Synapse is new every time, so old portals would point
    // at rooms that no longer exist.
    let dir = repo_root().join(".demo");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let port = free_port();
    let config = dir.join("echo.yaml");
    let reg = dir.join("echo-registration.yaml");
    let write = |hs: &str| {
        std::fs::write(
            &config,
            format!(
                "homeserver: {{ url: \"{hs}\", domain: localhost }}\n\
                 appservice: {{ id: echo, listen: \"127.0.0.1:{port}\", url: \"http://127.0.0.1:{port}\", \
                 bot_localpart: echobot, bot_displayname: Echo bridge, registration: \"{}\" }}\n\
                 database: {{ path: \"{}\" }}\n\
                 permissions: {{ \"*\": user }}\n\
                 bridge: {{ reply_prefix: \"echo: \" }}\n",
                reg.display(),
                dir.join("echo.db").display()
            ),
        )
    };
    let bin = binary("examples/echo")?;
    write("http://127.0.0.1:1")?;
    say("generating the bridge's registration file");
    BridgeProcess::generate_registration(&bin, &config, &reg)?;
    say("starting Synapse with the bridge registered");
    let synapse = Synapse::start(&[&reg]).await?;
    write(&synapse.url())?;
    say(&format!("starting the echo bridge on 127.0.0.1:{port}"));
    let mut bridge = BridgeProcess::start(
        &bin,
        &config,
        &format!("http://127.0.0.1:{port}"),
        &dir.join("bridge.log"),
    )
    .await?;
    say("registering the user @demo:localhost (password: demo-password)");
    let user = register_demo(&synapse.url()).await?;
    say("joining #echo_lobby:localhost — the bridge creates the portal room on demand");
    let room = user.join("#echo_lobby:localhost").await?;
    say("sending \"Hello from Matrix!\"");
    let sent = user.send_text(&room, "Hello from Matrix!").await?;
    let echo = user
        .wait_for_message(&room, Duration::from_secs(30), |e: &Value| {
            e["content"]["m.relates_to"]["m.in_reply_to"]["event_id"] == sent.as_str()
        })
        .await
        .context("no answer from the bridge")?;
    say(&format!(
        "the bridge answered as {}: \"{}\"",
        echo["sender"].as_str().unwrap_or("?"),
        echo["content"]["body"].as_str().unwrap_or("?")
    ));
    println!();
    println!("Everything is running. Try it with any Matrix client (e.g. Element):");
    println!("  homeserver: {}", synapse.url());
    println!("  user:       demo    password: demo-password");
    println!("  room:       #echo_lobby:localhost (or join #echo_<anything>:localhost)");
    println!("  metrics:    http://127.0.0.1:{port}/metrics");
    println!("  bridge log: {}", dir.join("bridge.log").display());
    println!("Press Ctrl-C to stop.");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    say("stopping");
    bridge.child.terminate(Duration::from_secs(10));
    drop(synapse);
    Ok(())
}

async fn register_demo(hs: &str) -> anyhow::Result<MatrixUser> {
    MatrixUser::register_with_password(hs, "demo", "demo-password").await
}
