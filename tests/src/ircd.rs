//! A real IRC server (ngIRCd from Debian) on a free port, and a raw IRC test client.

use std::{path::PathBuf, process::Command, time::Duration};

use anyhow::{Context as _, bail};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpStream, tcp::OwnedWriteHalf},
    sync::mpsc,
};

use crate::{ChildGuard, free_port};

/// A running ngIRCd.
#[derive(Debug)]
pub struct Ircd {
    child: Option<ChildGuard>,
    port: u16,
    dir: tempfile::TempDir,
}

impl Ircd {
    /// Starts ngIRCd on a free port with no connection limits and no DNS/ident lookups.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with_ident(false).await
    }

    /// Starts ngIRCd; with `ident`, it asks the client host's identd (port 113) for each
    /// connection's user name (ngIRCd does so only with DNS lookups on as well).
    pub async fn start_with_ident(ident: bool) -> anyhow::Result<Self> {
        // A "free" port can be taken by another test's server before ngIRCd binds it: then
        // try another one.
        let mut last = None;
        for _ in 0..3 {
            match Self::try_start(ident).await {
                Ok(this) => return Ok(this),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("ngIRCd did not start")))
    }

    async fn try_start(ident: bool) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("trestle-ircd-").tempdir()?;
        let port = free_port();
        let conf = dir.path().join("ngircd.conf");
        std::fs::write(
            &conf,
            format!(
                "[Global]\nName = irc.localhost\nInfo = Trestle test server\nListen = 127.0.0.1\nPorts = {port}\n\
                 PidFile = {pid}\nMotdPhrase = hello\n[Limits]\nMaxConnections = 0\nMaxConnectionsIP = 0\n\
                 MaxJoins = 0\nMaxNickLength = 30\nPingTimeout = 120\nPongTimeout = 20\n[Options]\nIdent = {ident}\n\
                 DNS = {ident}\nPAM = no\n",
                pid = dir.path().join("ngircd.pid").display(),
                ident = if ident { "yes" } else { "no" }
            ),
        )?;
        let mut this = Self { child: None, port, dir };
        this.launch().await?;
        Ok(this)
    }

    fn binary() -> PathBuf {
        ["/usr/sbin/ngircd", "/usr/bin/ngircd"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("ngircd"))
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new(Self::binary());
        cmd.args(["-n", "-f"]).arg(self.dir.path().join("ngircd.conf"));
        let log = self.dir.path().join("ngircd.log");
        // Ours is listening when its log says so (a connect alone could reach another test's
        // server that took the port); a restart appends to the same log, so count the lines.
        let marker = format!("Now listening on [127.0.0.1]:{}", self.port);
        let listening =
            || std::fs::read_to_string(&log).map(|t| t.matches(&marker).count()).unwrap_or(0);
        let before = listening();
        let mut child = ChildGuard::spawn("ngircd", cmd, &log)?;
        for _ in 0..100 {
            if listening() > before && TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
                self.child = Some(child);
                return Ok(());
            }
            if !child.is_running() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("ngIRCd did not start: {}", child.log_tail(20))
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server (SIGKILL: every client connection drops).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill_hard();
        }
    }

    /// Starts it again on the same port.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.launch().await
    }
}

/// A parsed line as the test client sees it.
#[derive(Debug, Clone)]
pub struct Line {
    /// The raw line.
    pub raw: String,
    /// Source nick, if a user.
    pub nick: Option<String>,
    /// Command.
    pub command: String,
    /// Parameters.
    pub params: Vec<String>,
}

fn parse(raw: &str) -> Line {
    let mut rest = raw;
    if rest.starts_with('@') {
        rest = rest.split_once(' ').map_or("", |x| x.1);
    }
    let mut nick = None;
    if let Some(r) = rest.strip_prefix(':') {
        let (src, r) = r.split_once(' ').unwrap_or((r, ""));
        nick = src.split('!').next().filter(|_| src.contains('!')).map(str::to_owned);
        rest = r;
    }
    let (cmd, mut r) = rest.split_once(' ').unwrap_or((rest, ""));
    let mut params = Vec::new();
    while !r.is_empty() {
        if let Some(t) = r.strip_prefix(':') {
            params.push(t.to_owned());
            break;
        }
        let (p, n) = r.split_once(' ').unwrap_or((r, ""));
        params.push(p.to_owned());
        r = n;
    }
    Line { raw: raw.to_owned(), nick, command: cmd.to_owned(), params }
}

/// A plain IRC client for tests (not ours: raw protocol over TCP). PINGs are answered while
/// it waits for lines.
#[derive(Debug)]
pub struct IrcClient {
    write: OwnedWriteHalf,
    lines: mpsc::UnboundedReceiver<Line>,
    /// Every line seen so far.
    pub seen: Vec<Line>,
    /// Our nick.
    pub nick: String,
}

impl IrcClient {
    /// Connects and registers as `nick`.
    pub async fn connect(port: u16, nick: &str) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(("127.0.0.1", port)).await?;
        let (read, write) = stream.into_split();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(read).lines();
            while let Ok(Some(l)) = reader.next_line().await {
                if tx.send(parse(&l)).is_err() {
                    break;
                }
            }
        });
        let mut c = Self { write, lines: rx, seen: Vec::new(), nick: nick.to_owned() };
        // Servers refuse some nick characters (`[`, `|`) in the user name.
        let user: String = nick.chars().filter(char::is_ascii_alphanumeric).collect();
        c.raw(&format!("NICK {nick}\r\nUSER {user} 0 * :{nick}\r\n")).await?;
        c.wait_for(Duration::from_secs(10), |l| l.command == "001")
            .await
            .context("registration")?;
        Ok(c)
    }

    /// Sends raw text.
    pub async fn raw(&mut self, text: &str) -> anyhow::Result<()> {
        self.write.write_all(text.as_bytes()).await?;
        Ok(())
    }

    /// Joins a channel and waits for the end of NAMES.
    pub async fn join(&mut self, chan: &str) -> anyhow::Result<()> {
        self.raw(&format!("JOIN {chan}\r\n")).await?;
        self.wait_for(Duration::from_secs(10), |l| l.command == "366").await?;
        Ok(())
    }

    /// Sends a PRIVMSG.
    pub async fn privmsg(&mut self, target: &str, text: &str) -> anyhow::Result<()> {
        self.raw(&format!("PRIVMSG {target} :{text}\r\n")).await
    }

    /// Waits for a line matching `pred` (lines seen before are checked first).
    pub async fn wait_for(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&Line) -> bool,
    ) -> anyhow::Result<Line> {
        if let Some(l) = self.seen.iter().find(|l| pred(l)) {
            return Ok(l.clone());
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.recv())
                .await
                .map_err(|_| {
                    anyhow::anyhow!(
                        "timed out; saw:\n{}",
                        self.seen
                            .iter()
                            .rev()
                            .take(15)
                            .map(|l| l.raw.as_str())
                            .collect::<Vec<_>>()
                            .join("\n")
                    )
                })?
                .context("connection closed")?;
            if line.command == "PING" {
                let token = line.params.first().cloned().unwrap_or_default();
                self.raw(&format!("PONG :{token}\r\n")).await?;
            }
            self.seen.push(line.clone());
            if pred(&line) {
                return Ok(line);
            }
        }
    }
}
