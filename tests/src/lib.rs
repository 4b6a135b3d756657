//! End-to-end test harness: real servers on free loopback ports, cleaned up on drop.
//!
//! - [`Synapse`]: a homeserver from the virtualenv that `scripts/install-deps.sh` makes.
//! - [`MatrixUser`]: a test client on the client-server API (reqwest), with `/sync` waiting.
//! - [`prosody::Prosody`]: a real Prosody with a component and a MUC; [`prosody::XmppClient`].
//! - [`BridgeProcess`]: a bridge binary from the workspace's target directory.
//! - [`Deployment`]: a bridge's files, registered with a Synapse started for it.
//! - [`ChildGuard`]: kills its process (group) when dropped.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

pub mod ejabberd;
pub mod ircd;
pub mod kannel;
pub mod netsmpp;
pub mod prosody;
pub mod scripted_ircd;
pub mod smsc;
pub mod synapse;

pub use synapse::Synapse;

/// One bridge deployed for a test: its config, registration, database and log in `dir`, its
/// appservice listener on a free port, registered with a Synapse started for it.
///
/// Synapse needs the registration when it starts, and the bridge's config needs Synapse's URL:
/// the registration is generated from the config with a placeholder homeserver, then the config
/// is written again with Synapse's URL before the bridge starts.
#[derive(Debug)]
pub struct Deployment {
    /// Where the files are.
    pub dir: PathBuf,
    /// The appservice id (also the stem of the file names, and the bot is `{id}bot`).
    pub id: String,
    /// The appservice listener's port.
    pub port: u16,
}

impl Deployment {
    /// A deployment of appservice `id` with its files in `dir`.
    pub fn new(dir: &Path, id: &str) -> Self {
        Self { dir: dir.to_owned(), id: id.to_owned(), port: free_port() }
    }

    /// The config file.
    pub fn config(&self) -> PathBuf {
        self.dir.join(format!("{}.yaml", self.id))
    }

    /// The registration file.
    pub fn registration(&self) -> PathBuf {
        self.dir.join(format!("{}-registration.yaml", self.id))
    }

    /// The bridge's database.
    pub fn database(&self) -> PathBuf {
        self.dir.join(format!("{}.db", self.id))
    }

    /// The `homeserver:` and `appservice:` sections every config starts with, for the
    /// homeserver at `homeserver`.
    pub fn base_config(&self, homeserver: &str) -> String {
        let (id, port) = (&self.id, self.port);
        format!(
            "homeserver: {{ url: \"{homeserver}\", domain: localhost }}\n\
             appservice: {{ id: {id}, listen: \"127.0.0.1:{port}\", url: \"http://127.0.0.1:{port}\", \
             bot_localpart: {id}bot, registration: \"{}\" }}\n",
            self.registration().display()
        )
    }

    /// Writes the registration that `config` (given a homeserver URL, the whole config file)
    /// makes, and starts a Synapse that has it.
    pub async fn start_synapse(
        &self,
        binary: &Path,
        config: &dyn Fn(&str) -> String,
    ) -> anyhow::Result<Synapse> {
        std::fs::write(self.config(), config("http://127.0.0.1:1"))?;
        BridgeProcess::generate_registration(binary, &self.config(), &self.registration())?;
        Synapse::start(&[&self.registration()]).await
    }

    /// Writes the config for `synapse` and starts the bridge; its log goes to `bridge.log`.
    pub async fn start_bridge(
        &self,
        binary: &Path,
        synapse: &Synapse,
        config: &dyn Fn(&str) -> String,
    ) -> anyhow::Result<BridgeProcess> {
        std::fs::write(self.config(), config(&synapse.url()))?;
        let url = format!("http://127.0.0.1:{}", self.port);
        BridgeProcess::start(binary, &self.config(), &url, &self.dir.join("bridge.log")).await
    }

    /// [`start_synapse`](Self::start_synapse), then [`start_bridge`](Self::start_bridge).
    pub async fn start(
        &self,
        binary: &Path,
        config: &dyn Fn(&str) -> String,
    ) -> anyhow::Result<(Synapse, BridgeProcess)> {
        let synapse = self.start_synapse(binary, config).await?;
        let bridge = self.start_bridge(binary, &synapse, config).await?;
        Ok((synapse, bridge))
    }
}

/// A port that was free a moment ago, and never handed out before in this process: a server
/// that needs several ports gets distinct ones, and tests running side by side never share one.
///
/// The port is taken from below the kernel's ephemeral range
/// (`/proc/sys/net/ipv4/ip_local_port_range`): ports there are what `bind(…:0)` and outgoing
/// connections get, so a port picked from that range could be taken by a test's own listener or
/// a client connection before the server meant to use it binds it.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .filter(|low| *low > 12_000)
        .unwrap_or(32_768);
    let mut given = GIVEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    for _ in 0..10_000 {
        let port = rand::random_range(10_000..low);
        if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    0
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// Where installed test dependencies live (`TRESTLE_E2E_HOME`, default `<repo>/.e2e`).
pub fn e2e_home() -> PathBuf {
    std::env::var_os("TRESTLE_E2E_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".e2e"))
}

/// The cargo target directory.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}

/// A binary built by cargo: `name` like `trestle-irc` or `examples/echo`. `TRESTLE_E2E_BIN_DIR`,
/// when set, is searched first (for a target directory shared by several checkouts, where another
/// build may replace a binary of the same name at any time); `TRESTLE_PROFILE=release` looks in
/// the release profile before the debug one (benchmarks).
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("TRESTLE_E2E_BIN_DIR") {
        let p = PathBuf::from(dir).join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    let profiles = match std::env::var("TRESTLE_PROFILE").as_deref() {
        Ok("release") => ["release", "debug"],
        _ => ["debug", "release"],
    };
    for profile in profiles {
        let p = target_dir().join(profile).join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    bail!("{name} is not built; run `cargo build --workspace --all-targets` first")
}

/// A child process killed (SIGKILL) when dropped, with its log kept for failure messages.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
    log: PathBuf,
    name: String,
}

impl ChildGuard {
    /// Spawns `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> anyhow::Result<Self> {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        #[cfg(unix)]
        {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        let child = cmd.spawn().with_context(|| format!("cannot start {name}"))?;
        Ok(Self { child: Some(child), log: log.to_owned(), name: name.to_owned() })
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL to the whole process group, then reap.
    pub fn kill_hard(&mut self) {
        if let Some(mut c) = self.child.take() {
            #[cfg(unix)]
            {
                // `--` matters: procps-ng reads `kill -9 -PID` as signal options and can end
                // up signalling process group 1 (every process) instead of the child's group.
                let _ = Command::new("kill")
                    .args(["-s", "KILL", "--", &format!("-{}", c.id())])
                    .status();
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait up to `timeout` for a clean exit (SIGKILL after).
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill").args(["-s", "TERM", "--", &c.id().to_string()]).status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = c.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("{} did not stop within {timeout:?}; killing it", self.name);
        self.child = Some(c);
        self.kill_hard();
        None
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.child.is_some() {
            if std::thread::panicking() {
                eprintln!(
                    "--- last lines of {} ({}):\n{}",
                    self.name,
                    self.log.display(),
                    self.log_tail(40)
                );
            }
            self.kill_hard();
        }
    }
}

/// Polls `f` until it returns `Some`, or fails after `timeout` with `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A Matrix test user on the client-server API.
#[derive(Debug, Clone)]
pub struct MatrixUser {
    /// The user id.
    pub user_id: String,
    token: String,
    base: String,
    http: reqwest::Client,
}

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

impl MatrixUser {
    /// Opens an admin room (a direct chat) with the bridge's `bot` and waits for its welcome.
    pub async fn admin_room(&self, bot: &str) -> anyhow::Result<String> {
        let room = self.create_room(json!({"invite": [bot], "is_direct": true})).await?;
        self.wait_for_message(&room, Duration::from_secs(30), |e| {
            e["sender"] == bot
                && e["content"]["body"].as_str().is_some_and(|b| b.contains("admin room"))
        })
        .await?;
        Ok(room)
    }

    /// Sends the command `line` in `room` and returns the `bot`'s next answer there.
    pub async fn command(&self, room: &str, bot: &str, line: &str) -> anyhow::Result<String> {
        let from_bot = |events: &[Value]| {
            events.iter().filter(|e| e["sender"] == bot && e["type"] == "m.room.message").count()
        };
        let before = from_bot(&self.messages(room, 200).await?);
        self.send_text(room, line).await?;
        wait_for("the bot's answer", Duration::from_secs(30), || async {
            let events = self.messages(room, 200).await.ok()?;
            if from_bot(&events) <= before {
                return None;
            }
            events
                .iter()
                .rev()
                .find(|e| e["sender"] == bot)
                .and_then(|e| e["content"]["body"].as_str().map(str::to_owned))
        })
        .await
        .map_err(|e| anyhow::anyhow!("{line}: {e}"))
    }

    /// Registers a user with the dummy flow (the test Synapse allows open registration).
    pub async fn register(homeserver: &str, localpart: &str) -> anyhow::Result<Self> {
        Self::register_with_password(homeserver, localpart, "correct-horse-battery").await
    }

    /// Registers a user with a chosen password.
    pub async fn register_with_password(
        homeserver: &str,
        localpart: &str,
        password: &str,
    ) -> anyhow::Result<Self> {
        let http = reqwest::Client::new();
        let r: Value = http
            .post(format!("{homeserver}/_matrix/client/v3/register"))
            .json(&json!({"username": localpart, "password": password, "auth": {"type": "m.login.dummy"}}))
            .send()
            .await?
            .json()
            .await?;
        let token = r["access_token"].as_str().with_context(|| format!("register failed: {r}"))?;
        Ok(Self {
            user_id: r["user_id"].as_str().unwrap_or_default().to_owned(),
            token: token.to_owned(),
            base: format!("{homeserver}/_matrix/client/v3"),
            http,
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("{method} {path} -> {status}: {v}");
        }
        Ok(v)
    }

    /// `GET` on the client API (path after `/_matrix/client/v3`).
    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(reqwest::Method::GET, path, None).await
    }

    /// `POST`.
    pub async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    /// `PUT`.
    pub async fn put(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.call(reqwest::Method::PUT, path, Some(body)).await
    }

    /// Joins a room id or alias; returns the room id.
    pub async fn join(&self, room: &str) -> anyhow::Result<String> {
        let v = self.post(&format!("/join/{}", enc(room)), json!({})).await?;
        Ok(v["room_id"].as_str().context("no room_id")?.to_owned())
    }

    /// Creates a room.
    pub async fn create_room(&self, body: Value) -> anyhow::Result<String> {
        let v = self.post("/createRoom", body).await?;
        Ok(v["room_id"].as_str().context("no room_id")?.to_owned())
    }

    /// Sends a text message; returns the event id.
    pub async fn send_text(&self, room: &str, body: &str) -> anyhow::Result<String> {
        self.send(room, "m.room.message", json!({"msgtype": "m.text", "body": body})).await
    }

    /// Sends an event; returns the event id.
    pub async fn send(
        &self,
        room: &str,
        event_type: &str,
        content: Value,
    ) -> anyhow::Result<String> {
        let txn = format!("t{}", rand::random::<u64>());
        let v = self.put(&format!("/rooms/{}/send/{event_type}/{txn}", enc(room)), content).await?;
        Ok(v["event_id"].as_str().context("no event_id")?.to_owned())
    }

    /// The homeserver's base URL.
    fn homeserver(&self) -> &str {
        self.base.trim_end_matches("/_matrix/client/v3")
    }

    /// Uploads media (`POST /_matrix/media/v3/upload`); returns its `mxc://` URI.
    pub async fn upload(&self, data: Vec<u8>, content_type: &str) -> anyhow::Result<String> {
        let resp = self
            .http
            .post(format!("{}/_matrix/media/v3/upload", self.homeserver()))
            .bearer_auth(&self.token)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(data)
            .send()
            .await?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("upload -> {status}: {v}");
        }
        Ok(v["content_uri"].as_str().context("no content_uri")?.to_owned())
    }

    /// Downloads media by `mxc://` URI (authenticated media); returns the bytes and the
    /// `Content-Type`.
    pub async fn download(&self, mxc: &str) -> anyhow::Result<(Vec<u8>, String)> {
        let (server, id) =
            mxc.strip_prefix("mxc://").and_then(|r| r.split_once('/')).context("not an mxc URI")?;
        let resp = self
            .http
            .get(format!(
                "{}/_matrix/client/v1/media/download/{}/{}",
                self.homeserver(),
                enc(server),
                enc(id)
            ))
            .bearer_auth(&self.token)
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!("download {mxc} -> {}", resp.status());
        }
        let ct = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        Ok((resp.bytes().await?.to_vec(), ct))
    }

    /// Redacts an event; returns the redaction's event id.
    pub async fn redact(&self, room: &str, event_id: &str) -> anyhow::Result<String> {
        let txn = format!("r{}", rand::random::<u64>());
        let v = self
            .put(&format!("/rooms/{}/redact/{}/{txn}", enc(room), enc(event_id)), json!({}))
            .await?;
        Ok(v["event_id"].as_str().context("no event_id")?.to_owned())
    }

    /// The room's most recent `limit` timeline events, oldest first.
    pub async fn messages(&self, room: &str, limit: u32) -> anyhow::Result<Vec<Value>> {
        let v = self.get(&format!("/rooms/{}/messages?dir=b&limit={limit}", enc(room))).await?;
        let mut events = v["chunk"].as_array().cloned().unwrap_or_default();
        events.reverse();
        Ok(events)
    }

    /// A state event's content, if set.
    pub async fn state(
        &self,
        room: &str,
        event_type: &str,
        state_key: &str,
    ) -> anyhow::Result<Option<Value>> {
        match self.get(&format!("/rooms/{}/state/{event_type}/{}", enc(room), enc(state_key))).await
        {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.to_string().contains("404") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Waits until the room's recent messages contain one matching `pred`.
    pub async fn wait_for_message(
        &self,
        room: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        wait_for("a matching event", timeout, || async {
            self.messages(room, 100).await.ok()?.into_iter().find(|e| pred(e))
        })
        .await
    }

    /// Waits for an invite (to a room this user is not in yet); returns the room id.
    pub async fn wait_for_invite(&self, timeout: Duration) -> anyhow::Result<String> {
        // Synapse caches identical sync requests for a while: follow `next_batch` instead of
        // asking the same initial sync again.
        let since = std::sync::Mutex::new(String::new());
        wait_for("an invite", timeout, || async {
            let from = since.lock().map(|s| s.clone()).unwrap_or_default();
            let path = if from.is_empty() {
                "/sync?timeout=0".to_owned()
            } else {
                format!("/sync?timeout=1000&since={}", enc(&from))
            };
            let v = self.get(&path).await.ok()?;
            if let (Ok(mut s), Some(next)) = (since.lock(), v["next_batch"].as_str()) {
                *s = next.to_owned();
            }
            v["rooms"]["invite"].as_object()?.keys().next().cloned()
        })
        .await
    }

    /// A user's profile.
    pub async fn profile(&self, user_id: &str) -> anyhow::Result<Value> {
        self.get(&format!("/profile/{}", enc(user_id))).await
    }
}

/// A bridge process with its config, registration and database in a temp dir.
#[derive(Debug)]
pub struct BridgeProcess {
    /// The running process.
    pub child: ChildGuard,
    binary: PathBuf,
    config: PathBuf,
    /// The bridge's appservice URL.
    pub url: String,
    log: PathBuf,
}

impl BridgeProcess {
    /// Writes the registration for `config` with the binary's `generate-registration`.
    pub fn generate_registration(binary: &Path, config: &Path, out: &Path) -> anyhow::Result<()> {
        let st = Command::new(binary)
            .args(["generate-registration", "-c"])
            .arg(config)
            .arg("-o")
            .arg(out)
            .arg("--force")
            .output()?;
        if !st.status.success() {
            bail!("generate-registration failed: {}", String::from_utf8_lossy(&st.stderr));
        }
        Ok(())
    }

    /// Starts `binary run -c config` and waits until `/health/ready` answers 200.
    pub async fn start(
        binary: &Path,
        config: &Path,
        url: &str,
        log: &Path,
    ) -> anyhow::Result<Self> {
        let mut cmd = Command::new(binary);
        cmd.args(["run", "-c"]).arg(config).env("RUST_LOG", "info,trestle=debug");
        let child = ChildGuard::spawn("bridge", cmd, log)?;
        let mut this = Self {
            child,
            binary: binary.to_owned(),
            config: config.to_owned(),
            url: url.to_owned(),
            log: log.to_owned(),
        };
        this.wait_ready().await?;
        Ok(this)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let http = reqwest::Client::new();
        let url = format!("{}/health/ready", self.url);
        let r = wait_for("the bridge to be ready", Duration::from_secs(60), || async {
            let ok = http.get(&url).send().await.ok()?.status().is_success();
            ok.then_some(())
        })
        .await;
        if let Err(e) = r {
            bail!("{e}\n--- bridge log:\n{}", self.child.log_tail(40));
        }
        Ok(())
    }

    /// Stops the bridge with SIGKILL (no chance to clean up).
    pub fn kill_hard(&mut self) {
        self.child.kill_hard();
    }

    /// Starts the same bridge again (same config, database and log).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.child.kill_hard();
        let mut cmd = Command::new(&self.binary);
        cmd.args(["run", "-c"]).arg(&self.config).env("RUST_LOG", "info,trestle=debug");
        self.child = ChildGuard::spawn("bridge", cmd, &self.log)?;
        self.wait_ready().await
    }

    /// Sum of a Prometheus counter family from `/metrics` (all label sets).
    pub async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        let text = reqwest::get(format!("{}/metrics", self.url)).await?.text().await?;
        Ok(text
            .lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }
}
