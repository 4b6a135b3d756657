//! Load generator for the application-service inbound path (`PUT /_matrix/app/v1/transactions`).
//!
//! Three subcommands:
//!
//! ```text
//! bench_inbound fake-hs [--port-file F]          # tiny homeserver stand-in for the bridge under test
//! bench_inbound load --target URL --hs-token T [--transactions N] [--events-per-txn 100]
//!                    [--in-flight 1|8] [--pid PID] [--count-url URL] [--label NAME] [--json-out F]
//! bench_inbound compare --results F              # side-by-side markdown table of `load` results
//! ```
//!
//! `load` sends Synapse-shaped `m.room.message` transactions (distinct event ids, 20 rooms round
//! robin, transaction ids unique per run) over a keep-alive pool with a fixed number of requests in
//! flight. A warm-up phase is excluded from every figure. It reports acknowledged events/s, PUT
//! latency percentiles, the bridge's peak RSS and CPU time (from `/proc/PID`) and, when a count URL
//! is given, events/s actually handled by the bridge: it polls the count until every measured event
//! has been handled. The count URL may answer JSON `{"handled": N}` or Prometheus text, in which case
//! every sample of `--count-metric` is summed.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use axum::{Json, Router, extract::State, http::Method, http::Uri};
use clap::{Parser, Subcommand};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Rooms the events are spread over, round robin.
const ROOMS: u64 = 20;
/// Distinct senders.
const SENDERS: u64 = 50;
/// Clock ticks per second of `/proc/PID/stat` (Linux `USER_HZ`, 100 on every common platform).
const CLK_TCK: f64 = 100.0;

#[derive(Parser, Debug)]
#[command(about = "Benchmark of the application-service inbound path")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a fake homeserver answering every request with 200 and a catch-all JSON body.
    FakeHs(FakeHsArgs),
    /// Send the load to a bridge and print the figures.
    Load(LoadArgs),
    /// Print a side-by-side table of results written by `load --json-out`.
    Compare(CompareArgs),
}

#[derive(clap::Args, Debug)]
struct FakeHsArgs {
    /// Port to listen on (127.0.0.1); 0 picks a free one.
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Write the chosen port to this file once listening.
    #[arg(long)]
    port_file: Option<PathBuf>,
    /// Server name used in the answers (user ids, room ids).
    #[arg(long, default_value = "localhost")]
    domain: String,
}

#[derive(clap::Args, Debug, Clone)]
struct LoadArgs {
    /// Base URL of the bridge's appservice listener.
    #[arg(long)]
    target: String,
    /// The registration's hs_token.
    #[arg(long)]
    hs_token: String,
    /// Measured transactions (warm-up comes on top).
    #[arg(long, default_value_t = 15_000)]
    transactions: u64,
    /// Events in each transaction.
    #[arg(long, default_value_t = 100)]
    events_per_txn: u64,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 1)]
    in_flight: u64,
    /// Warm-up transactions, excluded from the figures (default: 5 % of --transactions, 50..=1000).
    #[arg(long)]
    warmup: Option<u64>,
    /// Bridge process to sample peak RSS and CPU time from.
    #[arg(long)]
    pid: Option<u32>,
    /// URL answering the number of events the bridge has handled.
    #[arg(long)]
    count_url: Option<String>,
    /// Prometheus metric summed when the count URL answers text.
    #[arg(long, default_value = "trestle_events_processed_total")]
    count_metric: String,
    /// Give up waiting for the handled count after this many seconds without progress.
    #[arg(long, default_value_t = 60)]
    count_stall_secs: u64,
    /// Seconds to wait for the target to accept connections.
    #[arg(long, default_value_t = 30)]
    wait_secs: u64,
    /// Name of the bridge in the output.
    #[arg(long, default_value = "bridge")]
    label: String,
    /// Append the result as one JSON line to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Server name in the generated ids.
    #[arg(long, default_value = "localhost")]
    domain: String,
}

#[derive(clap::Args, Debug)]
struct CompareArgs {
    /// JSON-lines file written by `load --json-out`.
    #[arg(long)]
    results: PathBuf,
    /// Label of our bridge (numerator of the ratios).
    #[arg(long, default_value = "trestle")]
    ours: String,
    /// Label of the reference bridge (denominator of the ratios).
    #[arg(long, default_value = "mab")]
    theirs: String,
}

/// One `load` run's figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct BenchResult {
    label: String,
    in_flight: u64,
    transactions: u64,
    events_per_txn: u64,
    events: u64,
    warmup_transactions: u64,
    body_bytes_avg: u64,
    elapsed_s: f64,
    acked_events_per_s: f64,
    handled_events_per_s: Option<f64>,
    handled_elapsed_s: Option<f64>,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    mean_ms: f64,
    peak_rss_mib: Option<f64>,
    cpu_s: Option<f64>,
    errors: u64,
    first_error: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // One thread: the load generator must leave the other core to the bridge under test.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match cli.command {
        Cmd::FakeHs(a) => rt.block_on(fake_hs(a)),
        Cmd::Load(a) => {
            let result = rt.block_on(load(a.clone()))?;
            println!("{}", table_header());
            println!("{}", table_row(&result));
            let line = serde_json::to_string(&result)?;
            println!("{line}");
            if let Some(path) = &a.json_out {
                append_line(path, &line)?;
            }
            if result.errors > 0 {
                bail!("{} transactions failed; first: {:?}", result.errors, result.first_error);
            }
            if a.count_url.is_some() && result.handled_events_per_s.is_none() {
                bail!("the bridge did not report every event as handled");
            }
            Ok(())
        }
        Cmd::Compare(a) => {
            print!("{}", compare(&a)?);
            Ok(())
        }
    }
}

fn append_line(path: &Path, line: &str) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    writeln!(f, "{line}").with_context(|| format!("cannot write {}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// Fake homeserver

#[derive(Debug, Clone)]
struct FakeHs {
    body: Arc<Value>,
    seen: Arc<Mutex<BTreeMap<String, u64>>>,
}

/// Replaces the ids and numbers in a path so requests group by endpoint.
fn normalize_path(path: &str) -> String {
    path.split('/')
        .map(|seg| {
            let decoded = seg.replace("%21", "!").replace("%40", "@").replace("%24", "$");
            let sigil = decoded.chars().next();
            if matches!(sigil, Some('!' | '@' | '$' | '#')) || decoded.contains("%3A") {
                "{id}".to_owned()
            } else if !seg.is_empty() && seg.len() > 12 && seg.chars().any(|c| c.is_ascii_digit()) {
                "{txn}".to_owned()
            } else {
                seg.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

async fn fake_hs_handler(State(s): State<FakeHs>, method: Method, uri: Uri) -> Json<Value> {
    let key = format!("{method} {}", normalize_path(uri.path()));
    let first = {
        let mut seen = s.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = seen.entry(key.clone()).or_insert(0);
        *n += 1;
        *n == 1
    };
    if first {
        eprintln!("fake-hs: first {key}");
    }
    Json((*s.body).clone())
}

/// The catch-all answer: carries the fields of every endpoint a bridge calls at start-up or when
/// sending (versions, whoami, register, ping, send, join, createRoom, profile).
fn catch_all_body(domain: &str) -> Value {
    json!({
        "versions": ["r0.6.1", "v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6", "v1.7", "v1.8",
                     "v1.9", "v1.10", "v1.11"],
        "unstable_features": {},
        "user_id": format!("@benchbot:{domain}"),
        "device_id": "BENCH",
        "is_guest": false,
        "event_id": format!("$fakeevent:{domain}"),
        "room_id": format!("!fakeroom:{domain}"),
        "duration_ms": 1,
        "joined": {},
        "chunk": [],
        "flows": [{"type": "m.login.application_service"}],
    })
}

async fn fake_hs(a: FakeHsArgs) -> anyhow::Result<()> {
    let state = FakeHs {
        body: Arc::new(catch_all_body(&a.domain)),
        seen: Arc::new(Mutex::new(BTreeMap::new())),
    };
    let app = Router::new().fallback(fake_hs_handler).with_state(state.clone());
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], a.port)))
        .await
        .context("cannot bind the fake homeserver")?;
    let port = listener.local_addr()?.port();
    if let Some(path) = &a.port_file {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, format!("{port}\n"))
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    }
    eprintln!("fake-hs: listening on http://127.0.0.1:{port}");
    axum::serve(listener, app).with_graceful_shutdown(shutdown_signal()).await?;
    let seen = state.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    for (k, n) in seen.iter() {
        eprintln!("fake-hs: {n:>8} {k}");
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Load

/// Builds transaction bodies: Synapse-shaped `m.room.message` events of about 500 bytes.
#[derive(Debug, Clone)]
struct TxnBuilder {
    nonce: String,
    domain: String,
    events_per_txn: u64,
    text: String,
    ts0: u64,
}

impl TxnBuilder {
    fn new(nonce: String, domain: String, events_per_txn: u64) -> Self {
        let ts0 = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let text = "The quick brown fox jumps over the lazy dog, and then it does it again, \
                    because benchmarks need bodies of a realistic length; this sentence is about \
                    as long as a chat message someone types in a busy room. "
            .to_owned();
        Self { nonce, domain, events_per_txn, text, ts0 }
    }

    fn txn_id(&self, txn: u64) -> String {
        format!("bench-{}-{txn}", self.nonce)
    }

    /// The JSON body of transaction number `txn`.
    fn body(&self, txn: u64) -> String {
        let mut s = String::with_capacity(self.events_per_txn as usize * 560 + 16);
        s.push_str("{\"events\":[");
        for j in 0..self.events_per_txn {
            let n = txn * self.events_per_txn + j;
            if j > 0 {
                s.push(',');
            }
            let room = n % ROOMS;
            let user = n % SENDERS;
            let ts = self.ts0 + n / 10;
            // 43 characters after the `$`, like a room v4+ event id.
            let id = format!("{}{n:x}", self.nonce);
            let _ = write!(
                s,
                "{{\"type\":\"m.room.message\",\"room_id\":\"!benchroom{room:02}:{d}\",\
                 \"sender\":\"@user{user:02}:{d}\",\"content\":{{\"msgtype\":\"m.text\",\
                 \"body\":\"{text}#{n}\",\"m.mentions\":{{}}}},\"origin_server_ts\":{ts},\
                 \"unsigned\":{{\"age\":{age}}},\"event_id\":\"${id:A>43}\"}}",
                d = self.domain,
                text = self.text,
                age = 20 + n % 100,
            );
        }
        s.push_str("]}");
        s
    }
}

/// Latencies and errors of one worker.
#[derive(Debug, Default)]
struct WorkerStats {
    latencies_us: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
    body_bytes: u64,
}

async fn worker(
    client: reqwest::Client,
    base: Arc<str>,
    auth: Arc<str>,
    builder: Arc<TxnBuilder>,
    next: Arc<AtomicU64>,
    end: u64,
) -> WorkerStats {
    let mut st = WorkerStats::default();
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= end {
            return st;
        }
        let body = builder.body(i);
        st.body_bytes += body.len() as u64;
        let url = format!("{base}/_matrix/app/v1/transactions/{}", builder.txn_id(i));
        let t0 = Instant::now();
        let res = client
            .put(&url)
            .header("Authorization", &*auth)
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await;
        let outcome = match res {
            Ok(r) => {
                let status = r.status();
                match r.bytes().await {
                    Ok(_) if status.is_success() => Ok(()),
                    Ok(b) => Err(format!(
                        "HTTP {status}: {}",
                        String::from_utf8_lossy(&b[..b.len().min(200)])
                    )),
                    Err(e) => Err(format!("reading the answer: {e}")),
                }
            }
            Err(e) => Err(format!("request: {e}")),
        };
        let us = t0.elapsed().as_micros() as u64;
        match outcome {
            Ok(()) => st.latencies_us.push(us),
            Err(e) => {
                st.errors += 1;
                if st.first_error.is_none() {
                    st.first_error = Some(e);
                }
            }
        }
    }
}

/// Runs transactions `start..end` with `in_flight` workers.
async fn run_phase(
    client: &reqwest::Client,
    a: &LoadArgs,
    builder: &Arc<TxnBuilder>,
    start: u64,
    end: u64,
) -> WorkerStats {
    let next = Arc::new(AtomicU64::new(start));
    let base: Arc<str> = Arc::from(a.target.trim_end_matches('/'));
    let auth: Arc<str> = Arc::from(format!("Bearer {}", a.hs_token));
    let tasks: Vec<_> = (0..a.in_flight.max(1))
        .map(|_| {
            tokio::spawn(worker(
                client.clone(),
                Arc::clone(&base),
                Arc::clone(&auth),
                Arc::clone(builder),
                Arc::clone(&next),
                end,
            ))
        })
        .collect();
    let mut all = WorkerStats::default();
    for t in tasks {
        match t.await {
            Ok(mut st) => {
                all.latencies_us.append(&mut st.latencies_us);
                all.errors += st.errors;
                all.body_bytes += st.body_bytes;
                if all.first_error.is_none() {
                    all.first_error = st.first_error;
                }
            }
            Err(e) => {
                all.errors += 1;
                all.first_error.get_or_insert_with(|| format!("worker panicked: {e}"));
            }
        }
    }
    all
}

/// Parses a handled-events count: JSON `{"handled": N}` or Prometheus text summing `metric`.
fn parse_count(body: &str, metric: &str) -> Option<u64> {
    if let Ok(v) = serde_json::from_str::<Value>(body) {
        return v.get("handled").and_then(Value::as_u64);
    }
    let mut found = false;
    let mut sum = 0.0_f64;
    for line in body.lines() {
        let Some(rest) = line.strip_prefix(metric) else { continue };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        let value = rest.rsplit(' ').next().and_then(|v| v.trim().parse::<f64>().ok());
        if let Some(v) = value {
            found = true;
            sum += v;
        }
    }
    // Counter values are integers; the f64 only comes from the text format.
    found.then_some(sum.round() as u64)
}

async fn fetch_count(client: &reqwest::Client, url: &str, metric: &str) -> anyhow::Result<u64> {
    let body = client.get(url).send().await?.error_for_status()?.text().await?;
    // A Prometheus counter with no sample yet simply is not listed: that is zero.
    Ok(parse_count(&body, metric).unwrap_or(0))
}

/// Polls until the count reaches `target`; `None` if it stalls for `stall`.
async fn wait_for_count(
    client: &reqwest::Client,
    url: &str,
    metric: &str,
    target: u64,
    stall: Duration,
) -> anyhow::Result<Option<(u64, Instant)>> {
    let mut last = 0;
    let mut last_progress = Instant::now();
    loop {
        let n = fetch_count(client, url, metric).await?;
        let now = Instant::now();
        if n >= target {
            return Ok(Some((n, now)));
        }
        if n != last {
            last = n;
            last_progress = now;
        } else if now.duration_since(last_progress) > stall {
            eprintln!("count stalled at {n}, wanted {target}");
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `(VmHWM in KiB, utime + stime in ticks)` of a process.
fn proc_sample(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the `(comm)`, which may contain spaces: state is field 3, utime 14, stime 15.
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let utime = f.get(11)?.parse::<u64>().ok()?;
    let stime = f.get(12)?.parse::<u64>().ok()?;
    Some((hwm, utime + stime))
}

async fn wait_reachable(client: &reqwest::Client, target: &str, secs: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        // Any HTTP answer at all means the listener is up.
        match client.get(target).send().await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => bail!("{target} is not reachable: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    let idx = rank.clamp(1, sorted.len()) - 1;
    sorted[idx] as f64 / 1000.0
}

async fn load(a: LoadArgs) -> anyhow::Result<BenchResult> {
    if a.transactions == 0 || a.events_per_txn == 0 {
        bail!("--transactions and --events-per-txn must be positive");
    }
    let warmup = a.warmup.unwrap_or_else(|| (a.transactions / 20).clamp(50, 1000));
    let nonce = {
        let ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
        format!("{ms:x}{:04x}", rand::random::<u16>())
    };
    let builder = Arc::new(TxnBuilder::new(nonce, a.domain.clone(), a.events_per_txn));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(a.in_flight.max(1) as usize + 2)
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(120))
        .build()?;
    wait_reachable(&client, &a.target, a.wait_secs).await?;
    let stall = Duration::from_secs(a.count_stall_secs);

    let count_before = match &a.count_url {
        Some(u) => Some(fetch_count(&client, u, &a.count_metric).await?),
        None => None,
    };
    eprintln!(
        "{}: warm-up {warmup} transactions, then {} x {} events, {} in flight",
        a.label, a.transactions, a.events_per_txn, a.in_flight
    );
    let w = run_phase(&client, &a, &builder, 0, warmup).await;
    if w.errors > 0 {
        bail!("warm-up: {} transactions failed; first: {:?}", w.errors, w.first_error);
    }
    let mut baseline = None;
    if let (Some(u), Some(c0)) = (&a.count_url, count_before) {
        match wait_for_count(&client, u, &a.count_metric, c0 + warmup * a.events_per_txn, stall)
            .await?
        {
            Some((n, _)) => baseline = Some(n),
            None => bail!("the bridge did not handle the warm-up events"),
        }
    }

    let proc0 = a.pid.and_then(proc_sample);
    let t0 = Instant::now();
    let mut st = run_phase(&client, &a, &builder, warmup, warmup + a.transactions).await;
    let elapsed = t0.elapsed();
    let events = a.transactions * a.events_per_txn;

    let mut handled = None;
    if let (Some(u), Some(base)) = (&a.count_url, baseline) {
        let ok_events = st.latencies_us.len() as u64 * a.events_per_txn;
        if let Some((_, at)) =
            wait_for_count(&client, u, &a.count_metric, base + ok_events, stall).await?
        {
            handled = Some(at.duration_since(t0).as_secs_f64());
        }
    }
    let proc1 = a.pid.and_then(proc_sample);

    st.latencies_us.sort_unstable();
    let lat = &st.latencies_us;
    let mean_ms = if lat.is_empty() {
        0.0
    } else {
        lat.iter().sum::<u64>() as f64 / lat.len() as f64 / 1000.0
    };
    let ok_events = lat.len() as u64 * a.events_per_txn;
    Ok(BenchResult {
        label: a.label.clone(),
        in_flight: a.in_flight,
        transactions: a.transactions,
        events_per_txn: a.events_per_txn,
        events,
        warmup_transactions: warmup,
        body_bytes_avg: st.body_bytes / a.transactions,
        elapsed_s: elapsed.as_secs_f64(),
        acked_events_per_s: ok_events as f64 / elapsed.as_secs_f64(),
        handled_events_per_s: handled.map(|s| ok_events as f64 / s),
        handled_elapsed_s: handled,
        p50_ms: percentile(lat, 50.0),
        p99_ms: percentile(lat, 99.0),
        max_ms: lat.last().map_or(0.0, |&m| m as f64 / 1000.0),
        mean_ms,
        peak_rss_mib: proc1.map(|(hwm, _)| hwm as f64 / 1024.0),
        cpu_s: match (proc0, proc1) {
            (Some((_, c0)), Some((_, c1))) => Some(c1.saturating_sub(c0) as f64 / CLK_TCK),
            _ => None,
        },
        errors: st.errors,
        first_error: st.first_error,
    })
}

// ---------------------------------------------------------------------------------------------
// Output

fn table_header() -> String {
    "| bridge | in flight | events | acked ev/s | handled ev/s | p50 ms | p99 ms | max ms | \
     peak RSS MiB | CPU s | errors |\n|---|---|---|---|---|---|---|---|---|---|---|"
        .to_owned()
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.digits$}"))
}

fn table_row(r: &BenchResult) -> String {
    format!(
        "| {} | {} | {} | {:.0} | {} | {:.2} | {:.2} | {:.1} | {} | {} | {} |",
        r.label,
        r.in_flight,
        r.events,
        r.acked_events_per_s,
        opt(r.handled_events_per_s, 0),
        r.p50_ms,
        r.p99_ms,
        r.max_ms,
        opt(r.peak_rss_mib, 0),
        opt(r.cpu_s, 1),
        r.errors,
    )
}

fn ratio(ours: Option<f64>, theirs: Option<f64>) -> String {
    match (ours, theirs) {
        (Some(o), Some(t)) if t > 0.0 => format!("{:.2}x", o / t),
        _ => "n/a".to_owned(),
    }
}

fn compare(a: &CompareArgs) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(&a.results)
        .with_context(|| format!("cannot read {}", a.results.display()))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let r: BenchResult = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not a result line", a.results.display(), i + 1))?;
        rows.push(r);
    }
    let mut out = String::new();
    let _ = writeln!(out, "{}", table_header());
    for r in &rows {
        let _ = writeln!(out, "{}", table_row(r));
    }
    let mut flights: Vec<u64> = rows.iter().map(|r| r.in_flight).collect();
    flights.sort_unstable();
    flights.dedup();
    let mut ratios = String::new();
    for f in flights {
        // The last run of each bridge at this concurrency.
        let ours = rows.iter().rev().find(|r| r.in_flight == f && r.label == a.ours);
        let theirs = rows.iter().rev().find(|r| r.in_flight == f && r.label == a.theirs);
        let (Some(o), Some(t)) = (ours, theirs) else { continue };
        let _ = writeln!(
            ratios,
            "| {f} | {} | {} | {} | {} | {} | {} |",
            ratio(Some(o.acked_events_per_s), Some(t.acked_events_per_s)),
            ratio(o.handled_events_per_s, t.handled_events_per_s),
            ratio(Some(o.p50_ms), Some(t.p50_ms)),
            ratio(Some(o.p99_ms), Some(t.p99_ms)),
            ratio(o.peak_rss_mib, t.peak_rss_mib),
            ratio(o.cpu_s, t.cpu_s),
        );
    }
    if !ratios.is_empty() {
        let _ = writeln!(
            out,
            "\nRatio {ours} / {theirs} (throughput: higher is better; latency, RSS, CPU: lower \
             is better)\n\n| in flight | acked ev/s | handled ev/s | p50 | p99 | peak RSS | CPU \
             |\n|---|---|---|---|---|---|---|\n{ratios}",
            ours = a.ours,
            theirs = a.theirs,
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_valid_synapse_shaped_json_of_the_expected_size() {
        let b = TxnBuilder::new("abc123".into(), "localhost".into(), 100);
        let body = b.body(7);
        let v: Value = serde_json::from_str(&body).expect("valid JSON");
        let events = v["events"].as_array().expect("events array");
        assert_eq!(events.len(), 100);
        let per_event = body.len() / 100;
        assert!((450..=600).contains(&per_event), "{per_event} bytes per event");
        let mut ids: Vec<&str> = events.iter().filter_map(|e| e["event_id"].as_str()).collect();
        assert!(ids.iter().all(|id| id.len() == 44 && id.starts_with('$')), "{ids:?}");
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 100);
        let rooms: std::collections::BTreeSet<&str> =
            events.iter().filter_map(|e| e["room_id"].as_str()).collect();
        assert_eq!(rooms.len(), 20);
        assert_eq!(events[0]["type"], "m.room.message");
        assert_eq!(events[0]["content"]["msgtype"], "m.text");
    }

    #[test]
    fn event_ids_differ_between_transactions_and_runs() {
        let a = TxnBuilder::new("run1".into(), "localhost".into(), 3);
        let b = TxnBuilder::new("run2".into(), "localhost".into(), 3);
        let ids = |t: &TxnBuilder, n| -> Vec<String> {
            let v: Value = serde_json::from_str(&t.body(n)).expect("json");
            v["events"]
                .as_array()
                .expect("array")
                .iter()
                .map(|e| e["event_id"].as_str().unwrap_or_default().to_owned())
                .collect()
        };
        let mut all = [ids(&a, 0), ids(&a, 1), ids(&b, 0)].concat();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 9);
        assert_ne!(a.txn_id(0), b.txn_id(0));
    }

    #[test]
    fn count_parses_json_and_sums_prometheus_samples() {
        assert_eq!(parse_count(r#"{"handled": 42}"#, "x_total"), Some(42));
        let prom = "# HELP trestle_events_processed_total Events.\n\
                    # TYPE trestle_events_processed_total counter\n\
                    trestle_events_processed_total{outcome=\"ok\"} 1500\n\
                    trestle_events_processed_total{outcome=\"dead_letter\"} 2\n\
                    trestle_events_processed_total_other 99\n";
        assert_eq!(parse_count(prom, "trestle_events_processed_total"), Some(1502));
        assert_eq!(parse_count("nothing here\n", "trestle_events_processed_total"), None);
    }

    #[test]
    fn percentiles_pick_ranks() {
        let v: Vec<u64> = (1..=100).map(|i| i * 1000).collect();
        assert!((percentile(&v, 50.0) - 50.0).abs() < 1e-9);
        assert!((percentile(&v, 99.0) - 99.0).abs() < 1e-9);
        assert!((percentile(&v, 100.0) - 100.0).abs() < 1e-9);
        assert!((percentile(&[], 50.0)).abs() < 1e-9);
    }

    #[test]
    fn paths_group_by_endpoint() {
        assert_eq!(
            normalize_path(
                "/_matrix/client/v3/rooms/!abc:localhost/send/m.room.message/1234567890123"
            ),
            "/_matrix/client/v3/rooms/{id}/send/m.room.message/{txn}"
        );
        assert_eq!(normalize_path("/_matrix/client/versions"), "/_matrix/client/versions");
    }

    #[test]
    fn compare_prints_ratios() {
        let mk = |label: &str, f: u64, eps: f64| BenchResult {
            label: label.into(),
            in_flight: f,
            transactions: 10,
            events_per_txn: 100,
            events: 1000,
            warmup_transactions: 5,
            body_bytes_avg: 50_000,
            elapsed_s: 1.0,
            acked_events_per_s: eps,
            handled_events_per_s: Some(eps),
            handled_elapsed_s: Some(1.0),
            p50_ms: 1.0,
            p99_ms: 2.0,
            max_ms: 3.0,
            mean_ms: 1.1,
            peak_rss_mib: Some(100.0),
            cpu_s: Some(1.0),
            errors: 0,
            first_error: None,
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("r.jsonl");
        for r in [mk("mab", 1, 100_000.0), mk("trestle", 1, 250_000.0)] {
            append_line(&path, &serde_json::to_string(&r).expect("json")).expect("write");
        }
        let out =
            compare(&CompareArgs { results: path, ours: "trestle".into(), theirs: "mab".into() })
                .expect("compare");
        assert!(out.contains("| 1 | 2.50x | 2.50x | 1.00x"), "{out}");
    }
}
