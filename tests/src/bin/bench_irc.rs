//! IRC scale benchmark (not a test): figures for the README.
//!
//! `bench_irc connections --n 1000`: a local ngIRCd, N puppet-style connections from Trestle's
//! connection layer (each registers, joins one channel of 50, and is drained like a puppet),
//! as fast as the server takes them. Prints the time to connect all and the memory per
//! connection (this process's RSS growth / N, and again after a minute idle).
//!
//! `bench_irc latency --messages 200`: Synapse, ngIRCd and `trestle-irc` in puppet mode, one
//! Matrix user and one IRC client in a portal; each message's time from the sender's call to
//! the other side's receipt (Matrix→IRC: the client-server API send to the IRC line; IRC→Matrix:
//! the IRC line written to the event arriving on a long-polling `/sync`). Includes Synapse's
//! own time on both paths.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use trestle_e2e::{
    Deployment, MatrixUser, binary,
    ircd::{IrcClient, Ircd},
};
use trestle_irc::conn::{ConnConfig, ConnectPacer, IrcConnection};

#[derive(Parser)]
struct Args {
    /// The IRC server to measure against.
    #[arg(long, value_enum, default_value_t = Server::Ngircd, global = true)]
    server: Server,
    #[command(subcommand)]
    cmd: Cmd,
}

/// The IRC servers the harness can start.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Server {
    Ngircd,
    Inspircd,
}

impl Server {
    async fn start(self) -> anyhow::Result<Ircd> {
        match self {
            Self::Ngircd => Ircd::start().await,
            Self::Inspircd => Ircd::start_inspircd().await,
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Many connections: time to connect, memory per connection.
    Connections {
        /// Connections to open.
        #[arg(long, default_value_t = 1000)]
        n: usize,
        /// Seconds to stay idle before the second memory reading.
        #[arg(long, default_value_t = 60)]
        idle: u64,
    },
    /// Message latency through Synapse and the bridge, both ways.
    Latency {
        /// Messages each way.
        #[arg(long, default_value_t = 200)]
        messages: usize,
    },
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn connections(server: Server, n: usize, idle: u64) -> anyhow::Result<()> {
    let ircd = server.start().await?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    // The bridge's pacer, opened wide: the server's speed is what is measured.
    let pacer = ConnectPacer::new(200, Duration::from_millis(10), shutdown.clone());
    let base = rss_kib();
    let start = Instant::now();
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let cfg = ConnConfig {
            host: "127.0.0.1".to_owned(),
            port: ircd.port(),
            tls: false,
            tls_insecure: false,
            bind: None,
            password: None,
            nick: format!("p{i}"),
            username: "bench".to_owned(),
            realname: "bench".to_owned(),
            sasl: None,
            client_cert: None,
            ping_interval: Duration::from_secs(120),
            ping_timeout: Duration::from_secs(240),
            flood_burst: 5,
            flood_penalty: Duration::from_millis(2000),
            queue_capacity: 256,
            channel_echoes: true,
        };
        let (conn, mut events) = IrcConnection::spawn(cfg, Arc::clone(&pacer), &shutdown);
        conn.join(&format!("#c{}", i / 50), None).await?;
        // Drained as the bridge drains a puppet's events.
        tokio::spawn(async move { while events.recv().await.is_some() {} });
        conns.push(conn);
    }
    let mut last = 0;
    loop {
        let up = conns.iter().filter(|c| c.is_registered()).count();
        if up == n {
            break;
        }
        if up / 500 != last / 500 {
            eprintln!("{up}/{n} registered after {:.1} s", start.elapsed().as_secs_f64());
        }
        last = up;
        if start.elapsed() > Duration::from_secs(1800) {
            anyhow::bail!("only {up}/{n} connections registered after 30 min");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let connect_s = start.elapsed().as_secs_f64();
    // Let the joins and names lists settle.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = rss_kib();
    eprintln!("idle {idle} s…");
    tokio::time::sleep(Duration::from_secs(idle)).await;
    let idle_rss = rss_kib();
    let per = |kib: u64| kib.saturating_sub(base) as f64 / n as f64;
    println!(
        "| {n} | {connect_s:.1} | {:.0} | {:.1} | {:.1} | {:.1} |",
        n as f64 / connect_s,
        after as f64 / 1024.0,
        per(after),
        per(idle_rss)
    );
    shutdown.cancel();
    drop(ircd);
    Ok(())
}

/// Reads a `/sync` stream and reports the arrival time of every message body.
async fn sync_watch(user: MatrixUser, tx: tokio::sync::mpsc::UnboundedSender<(String, Instant)>) {
    let mut since = String::new();
    loop {
        let path = if since.is_empty() {
            "/sync?timeout=0".to_owned()
        } else {
            format!("/sync?timeout=30000&since={since}")
        };
        let Ok(v) = user.get(&path).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let now = Instant::now();
        if let Some(next) = v["next_batch"].as_str() {
            since = percent_encoding::utf8_percent_encode(next, percent_encoding::NON_ALPHANUMERIC)
                .to_string();
        }
        if let Some(rooms) = v["rooms"]["join"].as_object() {
            for room in rooms.values() {
                for e in room["timeline"]["events"].as_array().into_iter().flatten() {
                    if let Some(b) = e["content"]["body"].as_str()
                        && tx.send((b.to_owned(), now)).is_err()
                    {
                        return;
                    }
                }
            }
        }
    }
}

async fn latency(server: Server, messages: usize) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new().prefix("trestle-bench-irc-").tempdir()?;
    let ircd = server.start().await?;
    let d = Deployment::new(dir.path(), "irc");
    let config = |hs: &str| {
        format!(
            "{}database: {{ path: \"{}\" }}\n\
             logging: {{ level: \"warn\" }}\n\
             permissions: {{ \"*\": user }}\n\
             bridge:\n  networks:\n    local:\n      name: Local IRC\n      host: 127.0.0.1\n      port: {}\n      tls: false\n      mode: puppets\n      flood_burst: 1000\n      flood_penalty_ms: 1\n",
            d.base_config(hs),
            d.database().display(),
            ircd.port()
        )
    };
    let (synapse, _bridge) = d.start(&binary("trestle-irc")?, &config).await?;
    let mut irc = IrcClient::connect(ircd.port(), "ircbench").await?;
    irc.join("#bench").await?;
    let alice = MatrixUser::register(&synapse.url(), "alice").await?;
    let room = alice.join("#irc_local_#bench:localhost").await?;
    irc.wait_for(Duration::from_secs(60), |l| {
        l.command == "JOIN" && l.nick.as_deref() == Some("alice[m]")
    })
    .await?;

    // Matrix → IRC.
    let mut to_irc = Vec::with_capacity(messages);
    for i in 0..messages {
        // Spaced out: ngIRCd penalises clients that send faster (its PENALTY), which would
        // be measured instead of the bridge.
        tokio::time::sleep(Duration::from_millis(250)).await;
        let body = format!("m2i {i}");
        let t0 = Instant::now();
        alice.send_text(&room, &body).await?;
        irc.wait_for(Duration::from_secs(30), |l| l.params.get(1) == Some(&body)).await?;
        to_irc.push(t0.elapsed().as_secs_f64() * 1000.0);
    }

    // The bridge's own share of Matrix → IRC: from the transaction's receipt to the end of the
    // handler (the line queued on the puppet's connection), the framework's histogram.
    let metrics =
        reqwest::get(format!("http://127.0.0.1:{}/metrics", d.port)).await?.text().await?;
    let bucket = |le: &str| -> f64 {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("trestle_inbound_lag_seconds_bucket")
                    && l.contains(&format!("le=\"{le}\""))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(f64::NAN)
    };
    let total = bucket("+Inf");
    println!(
        "| bridge share, Matrix → IRC (all {total} events handled) | ≤ 1 ms: {:.1} % | ≤ 5 ms: {:.1} % | ≤ 10 ms: {:.1} % |",
        100.0 * bucket("0.001") / total,
        100.0 * bucket("0.005") / total,
        100.0 * bucket("0.01") / total
    );

    // IRC → Matrix.
    let watcher = MatrixUser::register(&synapse.url(), "watcher").await?;
    watcher.join(&room).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(sync_watch(watcher, tx));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut to_matrix = Vec::with_capacity(messages);
    for i in 0..messages {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let body = format!("i2m {i}");
        let t0 = Instant::now();
        irc.privmsg("#bench", &body).await?;
        loop {
            let (b, at) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .context("timed out waiting for the event")?
                .context("sync stopped")?;
            if b == body {
                to_matrix.push(at.duration_since(t0).as_secs_f64() * 1000.0);
                break;
            }
        }
    }
    for (name, v) in [("Matrix → IRC", &mut to_irc), ("IRC → Matrix", &mut to_matrix)] {
        v.sort_by(f64::total_cmp);
        println!(
            "| {name} | {} | {:.2} | {:.2} | {:.2} |",
            v.len(),
            percentile(v, 0.5),
            percentile(v, 0.99),
            v.last().copied().unwrap_or(f64::NAN)
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.cmd {
        Cmd::Connections { n, idle } => connections(args.server, n, idle).await,
        Cmd::Latency { messages } => latency(args.server, messages).await,
    }
}
