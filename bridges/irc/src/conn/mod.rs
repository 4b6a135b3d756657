//! Our IRC connection: one actor per connection, on `irc-proto` for parsing.
//!
//! - TCP or TLS (rustls), an optional local bind address;
//! - `CAP LS 302` negotiation of what the server offers among [`WANTED_CAPS`], SASL PLAIN or
//!   EXTERNAL (a TLS client certificate), server password; nick collisions resolved with
//!   alternatives;
//! - ISUPPORT (`CASEMAPPING`, `PREFIX`, `CHANTYPES`, `NICKLEN`, `LINELEN`);
//! - PING keepalive and timeout; reconnect with capped exponential backoff and jitter, pacing
//!   shared by every connection to a network ([`ConnectPacer`]), and a rejoin of every channel;
//! - token-bucket flood control on a bounded outgoing queue (back-pressure, never unbounded
//!   memory); PONG bypasses it;
//! - nothing with CR, LF or NUL is ever written ([`line::IrcLine::to_wire`]), tags included;
//! - with `echo-message`, the server's echo of a message sent with an [`EchoRef`] comes back
//!   as [`ConnEvent::Echo`] (with the server's `msgid`), never as an ordinary line.

pub mod isupport;
pub mod line;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::Engine;
use rand::Rng;
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader},
    net::TcpSocket,
    sync::{Semaphore, mpsc},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

pub use isupport::{CaseMapping, Isupport};
pub use line::{IrcLine, LineError, Source};
pub use tls::{ClientCert, fingerprint};

/// Capabilities requested when the server offers them.
pub const WANTED_CAPS: &[&str] = &[
    "server-time",
    "message-tags",
    "multi-prefix",
    "away-notify",
    "account-tag",
    "chghost",
    "cap-notify",
    "batch",
    "labeled-response",
    "echo-message",
    RELAYMSG_CAP,
    REDACTION_CAP,
];

/// The capability of `RELAYMSG` (a draft): a channel operator's messages shown as from a nick
/// of the sender's own. Its value lists the characters a relayed nick must contain.
pub const RELAYMSG_CAP: &str = "draft/relaymsg";

/// The capability of `REDACT` (a draft): deleting a message by its msgid.
pub const REDACTION_CAP: &str = "draft/message-redaction";

/// Tags naming the relayer of a message sent with `RELAYMSG` (the draft's name and the
/// prefixed one servers use).
const RELAY_TAGS: &[&str] = &["draft/relaymsg", "relaymsg"];

/// Echoes awaited at most per connection; the oldest is forgotten beyond (a server that drops
/// a message, `+m` say, never echoes it).
const ECHO_PENDING_MAX: usize = 512;

/// What a message sent to IRC stands for, reported back with its echo: the bridge uses it to
/// learn the `msgid` the server gave the message. Opaque to the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EchoRef {
    /// The Matrix room.
    pub room_id: String,
    /// The Matrix event the message carries.
    pub event_id: String,
    /// The Matrix sender.
    pub sender: String,
    /// Which line of the event (one event can need several).
    pub part: u32,
}

/// Extras of an outgoing message: client tags for its first line, and what its lines stand
/// for (each next line gets the next `part`).
#[derive(Debug, Clone, Default)]
pub struct Outgoing {
    /// Tags of the first line only (`+draft/reply`, …).
    pub tags: Vec<(String, Option<String>)>,
    /// Reported with the echo of each line.
    pub echo: Option<EchoRef>,
}

impl Outgoing {
    /// Tags and echo reference for the next line.
    fn next_line(&mut self) -> (Vec<(String, Option<String>)>, Option<EchoRef>) {
        let echo = self.echo.clone();
        if let Some(e) = &mut self.echo {
            e.part += 1;
        }
        (std::mem::take(&mut self.tags), echo)
    }
}

/// Settings of one connection.
#[derive(Clone)]
pub struct ConnConfig {
    /// Server host.
    pub host: String,
    /// Server port.
    pub port: u16,
    /// Use TLS.
    pub tls: bool,
    /// Accept any certificate (tests only).
    pub tls_insecure: bool,
    /// Local address to bind.
    pub bind: Option<IpAddr>,
    /// Server password.
    pub password: Option<String>,
    /// Wanted nick.
    pub nick: String,
    /// User name.
    pub username: String,
    /// Real name.
    pub realname: String,
    /// SASL PLAIN account and password.
    pub sasl: Option<(String, String)>,
    /// A TLS client certificate: sent in the handshake, and SASL EXTERNAL logs in with it
    /// unless [`Self::sasl`] asks for PLAIN.
    pub client_cert: Option<Arc<ClientCert>>,
    /// Silence after which we PING.
    pub ping_interval: Duration,
    /// Silence after which the connection is considered dead.
    pub ping_timeout: Duration,
    /// Lines allowed in a burst.
    pub flood_burst: u32,
    /// Time one line costs.
    pub flood_penalty: Duration,
    /// Outgoing queue capacity.
    pub queue_capacity: usize,
    /// Whether echoes of our channel messages come back as [`ConnEvent::Echo`]. Off where
    /// another connection in the same channels claims them ([`IrcConnection::claim_echo`]), in
    /// order with the channel's other traffic (the bridge's bot, for its puppets).
    pub channel_echoes: bool,
}

impl std::fmt::Debug for ConnConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("nick", &self.nick)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("sasl", &self.sasl.as_ref().map(|(a, _)| (a, "<redacted>")))
            .field("client_cert", &self.client_cert.is_some())
            .finish_non_exhaustive()
    }
}

impl ConnConfig {
    /// The SASL mechanism this connection logs in with, if any.
    fn sasl_mechanism(&self) -> Option<&'static str> {
        if self.sasl.is_some() {
            Some("PLAIN")
        } else if self.tls && self.client_cert.is_some() {
            Some("EXTERNAL")
        } else {
            None
        }
    }
}

/// What a connection reports.
#[derive(Debug, Clone)]
pub enum ConnEvent {
    /// Registered (001 received, CAP and SASL done); `nick` is the nick we got.
    Registered {
        /// Our nick.
        nick: String,
    },
    /// A line from the server (PINGs and registration traffic are handled inside).
    Line(IrcLine),
    /// The server's echo (`echo-message`) of a line sent with an [`EchoRef`].
    Echo {
        /// What the line was sent for.
        sent: EchoRef,
        /// The echo, with the server's tags (`msgid`, `time`).
        line: IrcLine,
    },
    /// The connection dropped; it reconnects by itself unless it was told to quit.
    Disconnected {
        /// Why.
        reason: String,
    },
}

/// Shared state of a connection.
#[derive(Debug, Default)]
pub struct ConnState {
    /// Our current nick.
    pub nick: String,
    /// Capabilities enabled.
    pub caps: HashSet<String>,
    /// Values of the capabilities the server offered (`name=value`).
    pub cap_values: HashMap<String, String>,
    /// The server's ISUPPORT.
    pub isupport: Isupport,
    /// Channels we are in (folded name → (name, key)), rejoined after a reconnect.
    pub channels: BTreeMap<String, (String, Option<String>)>,
    /// Whether registration completed on the current socket.
    pub registered: bool,
    /// Messages sent with an [`EchoRef`] whose echo is awaited, oldest first.
    echo_pending: std::collections::VecDeque<(EchoKey, EchoRef)>,
}

/// What identifies an echo: command, folded target and text.
type EchoKey = (String, String, String);

impl ConnState {
    fn echo_key(&self, line: &IrcLine) -> EchoKey {
        // `RELAYMSG #chan nick :text` comes back as a PRIVMSG of that text from the nick.
        let (command, text) = if line.command == "RELAYMSG" {
            ("PRIVMSG".to_owned(), line.param(2))
        } else {
            (line.command.clone(), line.param(1))
        };
        (command, self.isupport.casemapping.fold(line.param(0)), text.to_owned())
    }

    /// Whether `line` is a message we relayed with `RELAYMSG` (its relay tag names us).
    fn relayed_by_us(&self, line: &IrcLine) -> bool {
        RELAY_TAGS
            .iter()
            .filter_map(|t| line.tag(t))
            .any(|by| self.isupport.casemapping.eq(by, &self.nick))
    }

    /// The reference of an awaited echo, if `line` is one (our own message, echo-message on).
    fn take_echo(&mut self, line: &IrcLine) -> Option<EchoRef> {
        let ours = line.nick().is_some_and(|n| self.isupport.casemapping.eq(n, &self.nick))
            || self.relayed_by_us(line);
        if !ours || !self.caps.contains("echo-message") || self.echo_pending.is_empty() {
            return None;
        }
        let key = self.echo_key(line);
        let i = self.echo_pending.iter().position(|(k, _)| *k == key)?;
        self.echo_pending.remove(i).map(|(_, r)| r)
    }
}

/// Limits how fast connections to one server are opened (token bucket), so that a restart or a
/// netsplit never floods the server with connection attempts.
#[derive(Debug)]
pub struct ConnectPacer {
    tokens: Arc<Semaphore>,
}

impl ConnectPacer {
    /// At most `burst` attempts at once, one more every `interval`.
    pub fn new(burst: u32, interval: Duration, shutdown: CancellationToken) -> Arc<Self> {
        let burst = burst.max(1) as usize;
        let tokens = Arc::new(Semaphore::new(burst));
        let refill = Arc::clone(&tokens);
        tokio::spawn(async move {
            let interval = interval.max(Duration::from_millis(1));
            let mut tick = tokio::time::interval_at(Instant::now() + interval, interval);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if refill.available_permits() < burst {
                            refill.add_permits(1);
                        }
                    }
                    () = shutdown.cancelled() => return,
                }
            }
        });
        Arc::new(Self { tokens })
    }

    /// Waits for the right to open one connection.
    pub async fn acquire(&self) {
        if let Ok(p) = self.tokens.acquire().await {
            p.forget();
        }
    }
}

/// A handle to a connection. Cheap to clone.
#[derive(Debug, Clone)]
pub struct IrcConnection {
    tx: mpsc::Sender<IrcLine>,
    state: Arc<Mutex<ConnState>>,
    quit: CancellationToken,
}

/// A send failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The line is invalid (would inject, too long, …).
    #[error(transparent)]
    Line(#[from] LineError),
    /// The connection is closed for good.
    #[error("the IRC connection is closed")]
    Closed,
}

impl IrcConnection {
    /// Starts a connection actor; events arrive on the returned receiver.
    pub fn spawn(
        config: ConnConfig,
        pacer: Arc<ConnectPacer>,
        shutdown: &CancellationToken,
    ) -> (Self, mpsc::Receiver<ConnEvent>) {
        let (tx, rx) = mpsc::channel(config.queue_capacity.max(1));
        let (ev_tx, ev_rx) = mpsc::channel(1024);
        let state =
            Arc::new(Mutex::new(ConnState { nick: config.nick.clone(), ..ConnState::default() }));
        let quit = shutdown.child_token();
        let handle = Self { tx, state: Arc::clone(&state), quit: quit.clone() };
        tokio::spawn(run(config, pacer, rx, ev_tx, state, quit));
        (handle, ev_rx)
    }

    /// Queues a line (waits while the queue is full: back-pressure). The line is validated
    /// here, so an injection attempt is an error to the caller, never bytes on the wire.
    pub async fn send(&self, line: IrcLine) -> Result<(), SendError> {
        line.to_wire()?;
        self.tx.send(line).await.map_err(|_| SendError::Closed)
    }

    /// Queues a message (PRIVMSG, NOTICE); with `echo`, and `echo-message` enabled, its echo
    /// comes back as [`ConnEvent::Echo`]. Before registration (a new connection's first
    /// message waits in the queue) the echo is awaited until the server's capabilities are
    /// known.
    pub async fn send_message(
        &self,
        line: IrcLine,
        echo: Option<EchoRef>,
    ) -> Result<(), SendError> {
        line.to_wire()?;
        if let Some(echo) = echo {
            let mut st = self.lock();
            if st.caps.contains("echo-message") || !st.registered {
                let key = st.echo_key(&line);
                if st.echo_pending.len() >= ECHO_PENDING_MAX {
                    st.echo_pending.pop_front();
                }
                st.echo_pending.push_back((key, echo));
            }
        }
        self.send(line).await
    }

    /// Claims the awaited echo `line` stands for, if any: for a copy of our own message seen
    /// on another connection (the bot in a channel sees a puppet's message there). A claimed
    /// echo is not reported again.
    pub fn claim_echo(&self, line: &IrcLine) -> Option<EchoRef> {
        self.lock().take_echo(line)
    }

    /// Our current nick.
    pub fn nick(&self) -> String {
        self.lock().nick.clone()
    }

    /// A copy of the server's ISUPPORT.
    pub fn isupport(&self) -> Isupport {
        self.lock().isupport.clone()
    }

    /// Whether the connection is registered right now.
    pub fn is_registered(&self) -> bool {
        self.lock().registered
    }

    /// Whether a capability is enabled.
    pub fn has_cap(&self, cap: &str) -> bool {
        self.lock().caps.contains(cap)
    }

    /// The value the server gave an enabled capability (`""` without one); `None` when the
    /// capability is not enabled.
    pub fn cap_value(&self, cap: &str) -> Option<String> {
        let st = self.lock();
        st.caps.contains(cap).then(|| st.cap_values.get(cap).cloned().unwrap_or_default())
    }

    /// Whether `line` is a message this connection relayed with `RELAYMSG` (the server shows
    /// it from another nick, with a tag naming us): never to be bridged back.
    pub fn relayed_by_us(&self, line: &IrcLine) -> bool {
        self.lock().relayed_by_us(line)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ConnState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Joins a channel (remembered, and rejoined after reconnects).
    pub async fn join(&self, channel: &str, key: Option<&str>) -> Result<(), SendError> {
        let folded = self.isupport().casemapping.fold(channel);
        self.lock().channels.insert(folded, (channel.to_owned(), key.map(str::to_owned)));
        let params: Vec<&str> = std::iter::once(channel).chain(key).collect();
        self.send(IrcLine::new("JOIN", &params)).await
    }

    /// Whether we are in (or joining) a channel.
    pub fn in_channel(&self, channel: &str) -> bool {
        let st = self.lock();
        st.channels.contains_key(&st.isupport.casemapping.fold(channel))
    }

    /// The channels we are in (or joining), as given to [`join`](Self::join).
    pub fn channels(&self) -> Vec<String> {
        self.lock().channels.values().map(|(name, _)| name.clone()).collect()
    }

    /// Remembers a channel's key (`MODE +k`), used when rejoining after a reconnect.
    pub fn remember_key(&self, channel: &str, key: Option<&str>) {
        let mut st = self.lock();
        let folded = st.isupport.casemapping.fold(channel);
        if let Some(entry) = st.channels.get_mut(&folded) {
            entry.1 = key.map(str::to_owned);
        }
    }

    /// The key we join a channel with, if any (given to [`join`](Self::join), or learnt from
    /// `MODE +k`).
    pub fn key(&self, channel: &str) -> Option<String> {
        let st = self.lock();
        st.channels.get(&st.isupport.casemapping.fold(channel)).and_then(|(_, k)| k.clone())
    }

    /// Leaves a channel.
    pub async fn part(&self, channel: &str, reason: &str) -> Result<(), SendError> {
        let folded = self.isupport().casemapping.fold(channel);
        self.lock().channels.remove(&folded);
        self.send(IrcLine::new("PART", &[channel, &line::one_line(reason)])).await
    }

    /// The byte budget of a PRIVMSG/NOTICE text to `target` (the 512-byte line, CRLF, our
    /// `:nick!user@host ` prefix as other clients receive it, and `PRIVMSG target :`).
    pub fn text_budget(&self, target: &str) -> usize {
        let st = self.lock();
        let linelen = st.isupport.linelen.unwrap_or(512);
        // Prefix: ":" nick "!" user(≤10) "@" host(≤63) " ".
        let prefix = 1 + st.nick.len() + 1 + 10 + 1 + 63 + 1;
        linelen.saturating_sub(2 + prefix + "PRIVMSG ".len() + target.len() + 2).max(16)
    }

    /// Sends text as PRIVMSG (or NOTICE), split on newlines and to the byte budget.
    pub async fn send_text(
        &self,
        command: &str,
        target: &str,
        text: &str,
    ) -> Result<usize, SendError> {
        self.send_text_with(command, target, text, &mut Outgoing::default()).await
    }

    /// [`send_text`](Self::send_text) with tags on the first line and echo references.
    pub async fn send_text_with(
        &self,
        command: &str,
        target: &str,
        text: &str,
        out: &mut Outgoing,
    ) -> Result<usize, SendError> {
        let budget = self.text_budget(target);
        let parts =
            trestle::util::split::split_text(text, trestle::util::split::Budget::bytes(budget));
        for p in &parts {
            self.send_line_with(IrcLine::new(command, &[target, p]), out).await?;
        }
        Ok(parts.len())
    }

    /// Sends a CTCP ACTION (`/me`).
    pub async fn send_action(&self, target: &str, text: &str) -> Result<(), SendError> {
        self.send_action_with(target, text, &mut Outgoing::default()).await
    }

    /// [`send_action`](Self::send_action) with tags on the first line and echo references.
    pub async fn send_action_with(
        &self,
        target: &str,
        text: &str,
        out: &mut Outgoing,
    ) -> Result<(), SendError> {
        let budget = self.text_budget(target).saturating_sub(9);
        for p in trestle::util::split::split_text(text, trestle::util::split::Budget::bytes(budget))
        {
            let line = IrcLine::new("PRIVMSG", &[target, &format!("\x01ACTION {p}\x01")]);
            self.send_line_with(line, out).await?;
        }
        Ok(())
    }

    /// Sends one line of a message with the next tags and echo reference of `out`.
    pub async fn send_line_with(
        &self,
        mut line: IrcLine,
        out: &mut Outgoing,
    ) -> Result<(), SendError> {
        let (tags, echo) = out.next_line();
        line.tags = tags;
        self.send_message(line, echo).await
    }

    /// Quits for good (no reconnect).
    pub async fn quit(&self, reason: &str) {
        let _ = self.send(IrcLine::new("QUIT", &[&line::one_line(reason)])).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.quit.cancel();
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

async fn connect(config: &ConnConfig) -> std::io::Result<(Box<dyn Stream>, ident::Entry)> {
    let addrs: Vec<SocketAddr> =
        tokio::net::lookup_host((config.host.as_str(), config.port)).await?.collect();
    let mut last = std::io::Error::other("no address");
    for addr in addrs {
        let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        // Bound before connecting, so that the ident entry exists before the server can ask:
        // servers query identd the moment they accept.
        let ip = config.bind.unwrap_or(if addr.is_ipv4() {
            std::net::Ipv4Addr::UNSPECIFIED.into()
        } else {
            std::net::Ipv6Addr::UNSPECIFIED.into()
        });
        socket.bind(SocketAddr::new(ip, 0))?;
        let entry = ident::Entry::new(socket.local_addr()?.port(), addr.port(), &config.username);
        match tokio::time::timeout(Duration::from_secs(20), socket.connect(addr)).await {
            Ok(Ok(tcp)) => {
                tcp.set_nodelay(true)?;
                if !config.tls {
                    return Ok((Box::new(tcp), entry));
                }
                let stream = tls::wrap(
                    tcp,
                    &config.host,
                    config.tls_insecure,
                    config.client_cert.as_deref(),
                )
                .await?;
                return Ok((stream, entry));
            }
            Ok(Err(e)) => last = e,
            Err(_) => last = std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
        }
    }
    Err(last)
}

pub mod ident;
mod tls;

/// Backoff before reconnect attempt `n` (1-based): 2 s doubling to 5 min, "equal jitter".
fn reconnect_delay(n: u32) -> Duration {
    let cap = (2_000u64 << n.min(8).saturating_sub(1)).min(300_000);
    Duration::from_millis(cap / 2 + rand::rng().random_range(0..=cap / 2))
}

async fn run(
    config: ConnConfig,
    pacer: Arc<ConnectPacer>,
    mut out_rx: mpsc::Receiver<IrcLine>,
    events: mpsc::Sender<ConnEvent>,
    state: Arc<Mutex<ConnState>>,
    quit: CancellationToken,
) {
    let mut failures = 0u32;
    loop {
        tokio::select! {
            () = pacer.acquire() => {}
            () = quit.cancelled() => return,
        }
        let started = Instant::now();
        let reason = match connect(&config).await {
            // The ident entry lives as long as the socket: the server may ask at any time.
            Ok((stream, _ident)) => {
                session(&config, stream, &mut out_rx, &events, &state, &quit).await
            }
            Err(e) => format!("cannot connect to {}:{}: {e}", config.host, config.port),
        };
        state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).registered = false;
        if quit.is_cancelled() {
            return;
        }
        tracing::warn!(host = config.host, nick = config.nick, %reason, "IRC connection lost");
        if events.send(ConnEvent::Disconnected { reason }).await.is_err() {
            return;
        }
        // A connection that lived a while resets the backoff.
        failures = if started.elapsed() > Duration::from_secs(120) { 1 } else { failures + 1 };
        tokio::select! {
            () = tokio::time::sleep(reconnect_delay(failures)) => {}
            () = quit.cancelled() => return,
        }
    }
}

struct Bucket {
    tokens: f64,
    burst: f64,
    per_line: Duration,
    last: Instant,
}

impl Bucket {
    fn new(burst: u32, per_line: Duration) -> Self {
        Self {
            tokens: f64::from(burst.max(1)),
            burst: f64::from(burst.max(1)),
            per_line,
            last: Instant::now(),
        }
    }

    /// How long until one line may go.
    fn wait(&mut self) -> Duration {
        let now = Instant::now();
        let refill =
            now.duration_since(self.last).as_secs_f64() / self.per_line.as_secs_f64().max(1e-6);
        self.tokens = (self.tokens + refill).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 { Duration::ZERO } else { self.per_line.mul_f64(1.0 - self.tokens) }
    }

    fn take(&mut self) {
        self.tokens -= 1.0;
    }
}

/// One socket's life: registration, then the read/write loop. Returns why it ended.
async fn session(
    config: &ConnConfig,
    stream: Box<dyn Stream>,
    out_rx: &mut mpsc::Receiver<IrcLine>,
    events: &mpsc::Sender<ConnEvent>,
    state: &Arc<Mutex<ConnState>>,
    quit: &CancellationToken,
) -> String {
    let (read, mut write) = tokio::io::split(stream);
    let mut reader = BufReader::new(read);
    let lock = || state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut nick = config.nick.clone();
    let mut nick_attempt = 0u32;
    let mut hello: Vec<IrcLine> = vec![IrcLine::new("CAP", &["LS", "302"])];
    if let Some(p) = &config.password {
        hello.push(IrcLine::new("PASS", &[p]));
    }
    hello.push(IrcLine::new("NICK", &[&nick]));
    hello.push(IrcLine::new("USER", &[&config.username, "0", "*", &config.realname]));
    for l in &hello {
        if let Err(e) = write_line(&mut write, l).await {
            return e;
        }
    }
    // Capabilities are negotiated again on every socket: a restarted server may offer others.
    {
        let mut st = lock();
        st.caps.clear();
        st.cap_values.clear();
    }
    let mut offered: Vec<String> = Vec::new();
    let mut cap_done = false;
    let mut registered = false;
    let mut bucket = Bucket::new(config.flood_burst, config.flood_penalty);
    let mut last_rx = Instant::now();
    let mut ping_sent: Option<Instant> = None;
    let mut buf = Vec::with_capacity(1024);
    loop {
        let flood_wait = if registered { bucket.wait() } else { Duration::from_secs(3600) };
        tokio::select! {
            biased;
            () = quit.cancelled() => return "quit".to_owned(),
            r = reader.read_until(b'\n', &mut buf) => {
                match r {
                    Ok(0) => return "the server closed the connection".to_owned(),
                    Err(e) => return format!("read error: {e}"),
                    Ok(_) => {}
                }
                last_rx = Instant::now();
                ping_sent = None;
                if buf.len() > 16 * 1024 {
                    return "line too long from server".to_owned();
                }
                let text = String::from_utf8_lossy(&buf).into_owned();
                buf.clear();
                let Some(line) = IrcLine::parse(&text) else { continue };
                match line.command.as_str() {
                    "PING" => {
                        if let Err(e) = write_line(&mut write, &IrcLine::new("PONG", &[line.param(0)])).await {
                            return e;
                        }
                        continue;
                    }
                    "PONG" => continue,
                    "CAP" => {
                        let sub = line.param(1).to_ascii_uppercase();
                        let list = line.params.last().cloned().unwrap_or_default();
                        match sub.as_str() {
                            "LS" => {
                                for c in list.split(' ').filter(|s| !s.is_empty()) {
                                    let (name, value) = c.split_once('=').unwrap_or((c, ""));
                                    offered.push(name.to_owned());
                                    lock().cap_values.insert(name.to_owned(), value.to_owned());
                                }
                                if line.param(2) == "*" {
                                    continue;
                                }
                                let mut want: Vec<&str> = WANTED_CAPS.iter().copied().filter(|c| offered.iter().any(|o| o == c)).collect();
                                if config.sasl_mechanism().is_some() && offered.iter().any(|o| o == "sasl") {
                                    want.push("sasl");
                                }
                                let r = if want.is_empty() {
                                    cap_done = true;
                                    write_line(&mut write, &IrcLine::new("CAP", &["END"])).await
                                } else {
                                    write_line(&mut write, &IrcLine::new("CAP", &["REQ", &want.join(" ")])).await
                                };
                                if let Err(e) = r {
                                    return e;
                                }
                            }
                            "ACK" => {
                                let acked: Vec<String> = list.split(' ').filter(|s| !s.is_empty()).map(str::to_owned).collect();
                                let sasl = acked.iter().any(|c| c == "sasl");
                                lock().caps.extend(acked.into_iter().filter(|c| !c.starts_with('-')));
                                if !cap_done {
                                    let r = if let Some(mechanism) = config.sasl_mechanism().filter(|_| sasl) {
                                        write_line(&mut write, &IrcLine::new("AUTHENTICATE", &[mechanism])).await
                                    } else {
                                        cap_done = true;
                                        write_line(&mut write, &IrcLine::new("CAP", &["END"])).await
                                    };
                                    if let Err(e) = r {
                                        return e;
                                    }
                                }
                            }
                            "NAK" if !cap_done => {
                                cap_done = true;
                                if let Err(e) = write_line(&mut write, &IrcLine::new("CAP", &["END"])).await {
                                    return e;
                                }
                            }
                            "DEL" => {
                                let mut st = lock();
                                for c in list.split(' ') {
                                    st.caps.remove(c);
                                }
                            }
                            _ => {}
                        }
                        continue;
                    }
                    "AUTHENTICATE" if line.param(0) == "+" => {
                        if config.sasl_mechanism().is_none() {
                            continue;
                        }
                        // PLAIN: the credentials; EXTERNAL: an empty response (the server
                        // takes the account from the certificate).
                        let payload = match &config.sasl {
                            Some((account, password)) => base64::engine::general_purpose::STANDARD.encode(format!("{account}\0{account}\0{password}")),
                            None => String::new(),
                        };
                        for l in sasl_chunks(&payload) {
                            if let Err(e) = write_line(&mut write, &IrcLine::new("AUTHENTICATE", &[&l])).await {
                                return e;
                            }
                        }
                        continue;
                    }
                    // SASL done, one way or the other: registration goes on. A failure (bad
                    // account or password, too long, nick locked) also goes to the owner of
                    // the connection, to tell the user.
                    "902" | "903" | "904" | "905" | "906" | "907" | "908" => {
                        let failed = matches!(line.command.as_str(), "902" | "904" | "905");
                        if failed {
                            tracing::error!(host = config.host, nick, reply = line.params.last().map(String::as_str).unwrap_or(""), "SASL authentication failed");
                        }
                        if !cap_done {
                            cap_done = true;
                            if let Err(e) = write_line(&mut write, &IrcLine::new("CAP", &["END"])).await {
                                return e;
                            }
                        }
                        if !failed {
                            continue;
                        }
                    }
                    "433" | "432" | "437" if !registered => {
                        let max = lock().isupport.nicklen.unwrap_or(30);
                        nick = crate::nick::alternative(&config.nick, nick_attempt, max);
                        nick_attempt += 1;
                        if nick_attempt > 50 {
                            return "no free nick".to_owned();
                        }
                        if let Err(e) = write_line(&mut write, &IrcLine::new("NICK", &[&nick])).await {
                            return e;
                        }
                        continue;
                    }
                    "001" => {
                        registered = true;
                        nick = line.param(0).to_owned();
                        let rejoin: Vec<(String, Option<String>)> = {
                            let mut st = lock();
                            st.nick = nick.clone();
                            st.registered = true;
                            if !st.caps.contains("echo-message") {
                                st.echo_pending.clear();
                            }
                            st.channels.values().cloned().collect()
                        };
                        tracing::info!(host = config.host, nick, "IRC connection registered");
                        for (chan, key) in rejoin {
                            let params: Vec<&str> = std::iter::once(chan.as_str()).chain(key.as_deref()).collect();
                            if let Err(e) = write_line(&mut write, &IrcLine::new("JOIN", &params)).await {
                                return e;
                            }
                        }
                        if events.send(ConnEvent::Registered { nick: nick.clone() }).await.is_err() {
                            return "closed".to_owned();
                        }
                        continue;
                    }
                    "005" => lock().isupport.apply(&line.params[1.min(line.params.len())..]),
                    "NICK" if line.nick().is_some_and(|n| lock().isupport.casemapping.eq(n, &nick)) => {
                        nick = line.param(0).to_owned();
                        lock().nick = nick.clone();
                    }
                    "ERROR" => return format!("server error: {}", line.param(0)),
                    "PRIVMSG" | "NOTICE" => {
                        let sent = {
                            let mut st = lock();
                            if config.channel_echoes || !st.isupport.is_channel(line.param(0)) {
                                st.take_echo(&line)
                            } else {
                                None
                            }
                        };
                        if let Some(sent) = sent {
                            if events.send(ConnEvent::Echo { sent, line }).await.is_err() {
                                return "closed".to_owned();
                            }
                            continue;
                        }
                    }
                    _ => {}
                }
                if events.send(ConnEvent::Line(line)).await.is_err() {
                    return "closed".to_owned();
                }
            }
            () = tokio::time::sleep(flood_wait), if registered && flood_wait > Duration::ZERO => {}
            out = out_rx.recv(), if registered && flood_wait == Duration::ZERO => {
                let Some(out) = out else { return "closed".to_owned() };
                bucket.take();
                let is_quit = out.command == "QUIT";
                if let Err(e) = write_line(&mut write, &out).await {
                    return e;
                }
                if is_quit {
                    let _ = write.flush().await;
                }
            }
            () = tokio::time::sleep(config.ping_interval.saturating_sub(last_rx.elapsed())), if ping_sent.is_none() => {
                ping_sent = Some(Instant::now());
                if let Err(e) = write_line(&mut write, &IrcLine::new("PING", &["trestle"])).await {
                    return e;
                }
            }
            () = tokio::time::sleep(config.ping_timeout.saturating_sub(ping_sent.map(|p| p.elapsed()).unwrap_or_default())), if ping_sent.is_some() => {
                return format!("no answer to PING within {:?}", config.ping_timeout);
            }
        }
    }
}

/// Splits a base64 SASL payload into 400-byte AUTHENTICATE chunks (`+` ends an exact multiple).
fn sasl_chunks(payload: &str) -> Vec<String> {
    let mut out: Vec<String> =
        payload.as_bytes().chunks(400).map(|c| String::from_utf8_lossy(c).into_owned()).collect();
    if payload.is_empty() || payload.len().is_multiple_of(400) {
        out.push("+".to_owned());
    }
    out
}

async fn write_line<W: AsyncWrite + Unpin>(w: &mut W, line: &IrcLine) -> Result<(), String> {
    let wire = match line.to_wire() {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, command = line.command, "refused to send an invalid IRC line");
            return Ok(());
        }
    };
    w.write_all(wire.as_bytes()).await.map_err(|e| format!("write error: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sasl_chunking() {
        assert_eq!(sasl_chunks("abc"), ["abc"]);
        let exact = "a".repeat(400);
        assert_eq!(sasl_chunks(&exact), [exact.as_str(), "+"]);
        assert_eq!(sasl_chunks(&"b".repeat(401)).len(), 2);
    }

    #[test]
    fn echoes_match_what_was_sent_once() {
        let mut st = ConnState { nick: "Me".into(), ..ConnState::default() };
        let sent = IrcLine::new("PRIVMSG", &["#Chan", "hello"]);
        let r =
            EchoRef { room_id: "!r".into(), event_id: "$e".into(), sender: "@a:x".into(), part: 0 };
        let key = st.echo_key(&sent);
        st.echo_pending.push_back((key, r.clone()));
        let echo = IrcLine::parse("@msgid=1 :me!u@h PRIVMSG #CHAN :hello").unwrap();
        // Not without echo-message.
        assert_eq!(st.take_echo(&echo), None);
        st.caps.insert("echo-message".into());
        // Someone else's identical line is not our echo; other text is not this echo.
        assert_eq!(st.take_echo(&IrcLine::parse(":other!u@h PRIVMSG #chan :hello").unwrap()), None);
        assert_eq!(st.take_echo(&IrcLine::parse(":me!u@h PRIVMSG #chan :hello!").unwrap()), None);
        assert_eq!(st.take_echo(&echo), Some(r));
        assert_eq!(st.take_echo(&echo), None);
    }

    #[test]
    fn relayed_messages_are_ours_and_echo_as_privmsg() {
        let mut st = ConnState { nick: "Bot".into(), ..ConnState::default() };
        st.caps.insert("echo-message".into());
        let sent = IrcLine::new("RELAYMSG", &["#Chan", "alice/m", "hello"]);
        let r =
            EchoRef { room_id: "!r".into(), event_id: "$e".into(), sender: "@a:x".into(), part: 0 };
        let key = st.echo_key(&sent);
        st.echo_pending.push_back((key, r.clone()));
        // Another relayer's message, or an untagged one from the same nick, is not ours.
        let other = IrcLine::parse("@draft/relaymsg=OtherBot :alice/m!r@h PRIVMSG #chan :hello");
        assert!(!st.relayed_by_us(&other.clone().unwrap()));
        assert_eq!(st.take_echo(&other.unwrap()), None);
        let untagged = IrcLine::parse(":alice/m!r@h PRIVMSG #chan :hello").unwrap();
        assert_eq!(st.take_echo(&untagged), None);
        // The draft tag and the spec's name both name the relayer (casemapped).
        let ours = IrcLine::parse("@msgid=9;draft/relaymsg=bot :alice/m!r@h PRIVMSG #CHAN :hello");
        let ours = ours.unwrap();
        assert!(st.relayed_by_us(&ours));
        assert!(
            st.relayed_by_us(&IrcLine::parse("@relaymsg=Bot :x/m!r@h PRIVMSG #chan :hi").unwrap())
        );
        assert_eq!(st.take_echo(&ours), Some(r));
        assert_eq!(st.take_echo(&ours), None);
    }

    #[test]
    fn outgoing_tags_go_on_the_first_line_only() {
        let r =
            EchoRef { room_id: "!r".into(), event_id: "$e".into(), sender: "@a:x".into(), part: 0 };
        let mut out =
            Outgoing { tags: vec![("+draft/reply".into(), Some("m1".into()))], echo: Some(r) };
        let (tags, echo) = out.next_line();
        assert_eq!((tags.len(), echo.map(|e| e.part)), (1, Some(0)));
        let (tags, echo) = out.next_line();
        assert_eq!((tags.len(), echo.map(|e| e.part)), (0, Some(1)));
    }

    #[test]
    fn backoff_bounds() {
        for n in 1..20 {
            let d = reconnect_delay(n).as_millis() as u64;
            let cap = (2_000u64 << (n.min(8) - 1)).min(300_000);
            assert!(d >= cap / 2 && d <= cap);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn pacer_limits_connection_rate() {
        let token = CancellationToken::new();
        let pacer = ConnectPacer::new(2, Duration::from_secs(1), token.clone());
        let start = Instant::now();
        for _ in 0..5 {
            pacer.acquire().await;
        }
        // Two at once, then one per second.
        assert!(start.elapsed() >= Duration::from_secs(3), "{:?}", start.elapsed());
        token.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn bucket_paces_lines() {
        let mut b = Bucket::new(3, Duration::from_millis(500));
        for _ in 0..3 {
            assert_eq!(b.wait(), Duration::ZERO);
            b.take();
        }
        assert!(b.wait() > Duration::ZERO);
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(b.wait(), Duration::ZERO);
    }
}
