//! A real IRC server on a free port (ngIRCd, or InspIRCd 3 for IRCv3 message tags, both from
//! Debian), optionally with Atheme services linked to InspIRCd for SASL, and a raw IRC test
//! client.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpStream, tcp::OwnedWriteHalf},
    sync::mpsc,
};

use crate::{ChildGuard, free_port};

/// Which server runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrcdKind {
    /// ngIRCd: plain RFC IRC, no message tags.
    NgIrcd,
    /// InspIRCd 3 with the IRCv3 modules: `message-tags` (client tags, `TAGMSG`), `msgid`,
    /// `server-time`, `echo-message`, `batch`.
    InspIrcd,
}

/// A running IRC server, killed on drop.
#[derive(Debug)]
pub struct Ircd {
    child: Option<ChildGuard>,
    /// Atheme, linked to InspIRCd (see [`Ircd::start_inspircd_with_services`]).
    services: Option<ChildGuard>,
    port: u16,
    /// The TLS listener (with services), which asks for client certificates.
    tls_port: Option<u16>,
    dir: tempfile::TempDir,
    kind: IrcdKind,
}

/// InspIRCd 3 configuration: one loopback listener, limits high enough for many test clients
/// from one address, no DNS or ident lookups, and the IRCv3 modules.
const INSPIRCD_CONF: &str = r#"<config format="xml">
<server name="irc.inspircd.test" description="Trestle test server" network="TrestleTest">
<admin name="Trestle" nick="trestle" email="trestle@localhost">
<bind address="127.0.0.1" port="{port}" type="clients">
<connect allow="*" timeout="60" pingfreq="120" threshold="1000" commandrate="1000000"
         fakelag="off" hardsendq="1048576" softsendq="1048576" recvq="65536" localmax="20000"
         globalmax="20000" maxchans="100" resolvehostnames="no" limit="20000">
<files motd="{dir}/motd.txt">
<channels users="100" opers="100">
<dns server="127.0.0.1" timeout="1">
<pid file="{dir}/inspircd.pid">
<log method="file" type="* -USERINPUT -USEROUTPUT" level="default" target="{dir}/inspircd.log">
<options prefixquit="Quit: " syntaxhints="no" announcets="yes" hostintopic="yes" defaultmodes="nt">
<security hidesplits="no" maxtargets="20" userstats="Pu" runasuser="" runasgroup="">
<performance netbuffersize="10240" somaxconn="1024" softlimit="20000" quietbursts="yes">
<limits maxnick="30" maxchan="64" maxmodes="20" maxident="11" maxhost="64" maxquit="255"
        maxtopic="307" maxkick="255" maxreal="128" maxaway="200">
<module name="cap">
<module name="ircv3">
<module name="ircv3_msgid">
<module name="ircv3_ctctags">
<module name="ircv3_servertime">
<module name="ircv3_echomessage">
<module name="ircv3_batch">
"#;

/// What InspIRCd adds to [`INSPIRCD_CONF`] for Atheme: a server listener, the link and U-line
/// for the services server, SASL (offered to clients while the services are linked), and a TLS
/// listener asking for client certificates, whose SHA-256 fingerprints go to the services
/// (SASL EXTERNAL).
const INSPIRCD_SERVICES_CONF: &str = r#"
<module name="ssl_gnutls">
<module name="sslinfo">
<sslprofile name="trestle" provider="gnutls" certfile="{dir}/server.pem" keyfile="{dir}/server.key"
            hash="sha256" requestclientcert="yes">
<bind address="127.0.0.1" port="{tlsport}" type="clients" sslprofile="trestle">
<bind address="127.0.0.1" port="{sport}" type="servers">
<module name="spanningtree">
<module name="services_account">
<module name="sasl">
<sasl target="services.trestle.test" requiressl="no">
<link name="services.trestle.test" ipaddr="127.0.0.1" port="{sport}" allowmask="127.0.0.1/32"
      sendpass="{linkpass}" recvpass="{linkpass}">
<uline server="services.trestle.test" silent="yes">
"#;

/// Atheme 7.2 configuration: uplink to InspIRCd's server port, NickServ (registration needs
/// no e-mail verification: `auth = none`) and SaslServ with PLAIN and EXTERNAL, an OpenSEX
/// database in the data directory.
const ATHEME_CONF: &str = r#"
loadmodule "modules/protocol/inspircd";
loadmodule "modules/backend/opensex";
loadmodule "modules/crypto/pbkdf2v2";
loadmodule "modules/nickserv/main";
loadmodule "modules/nickserv/register";
loadmodule "modules/nickserv/identify";
loadmodule "modules/nickserv/info";
loadmodule "modules/nickserv/cert";
loadmodule "modules/saslserv/main";
loadmodule "modules/saslserv/plain";
loadmodule "modules/saslserv/external";
serverinfo {
    name = "services.trestle.test";
    desc = "Trestle test services";
    numeric = "00A";
    recontime = 1;
    netname = "TrestleTest";
    hidehostsuffix = "users.test";
    adminname = "Trestle";
    adminemail = "trestle@localhost";
    registeremail = "trestle@localhost";
    loglevel = { error; info; admin; network; };
    maxlogins = 50;
    maxusers = 50;
    mdlimit = 30;
    emaillimit = 10;
    emailtime = 300;
    auth = none;
    casemapping = rfc1459;
};
uplink "irc.inspircd.test" {
    host = "127.0.0.1";
    password = "{linkpass}";
    port = {sport};
};
nickserv {
    nick = "NickServ";
    user = "NickServ";
    host = "services.trestle.test";
    real = "Nickname Services";
    maxnicks = 5;
    expire = 30;
};
saslserv {
    nick = "SaslServ";
    user = "SaslServ";
    host = "services.trestle.test";
    real = "SASL Authentication Agent";
};
general {
    flood_msgs = 0;
    flood_time = 10;
    ratelimit_uses = 0;
    ratelimit_period = 60;
    kline_time = 7;
    commit_interval = 5;
    uplink_sendq_limit = 1048576;
    language = "en";
    immune_level = immune;
};
"#;

/// What InspIRCd adds to [`INSPIRCD_CONF`] for channel moderation tests: a channel's creator
/// is its operator (`defaultmodes` with `o`), and every user's host is cloaked (`+x` on
/// connect, full cloaks prefixed `cloak-`), as many networks do.
const INSPIRCD_MODERATION_CONF: &str = r#"
<module name="md5">
<module name="cloaking">
<module name="conn_umodes">
<cloak mode="full" key="trestle-test-cloak-key-0123456789abcdef" prefix="cloak-" ignorecase="no">
"#;

/// The link password between InspIRCd and Atheme (loopback only).
const LINK_PASSWORD: &str = "trestle-link";

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

    /// Starts InspIRCd 3 on a free port (see [`IrcdKind::InspIrcd`]).
    pub async fn start_inspircd() -> anyhow::Result<Self> {
        Self::start_inspircd_inner(false, false).await
    }

    /// Starts InspIRCd 3 (see [`IrcdKind::InspIrcd`]) where a channel's creator is its
    /// operator and every user's host is cloaked (`cloak-…`; other users see only that).
    pub async fn start_inspircd_moderated() -> anyhow::Result<Self> {
        Self::start_inspircd_inner(false, true).await
    }

    /// Starts InspIRCd 3 (see [`IrcdKind::InspIrcd`]) with Atheme services linked to it:
    /// NickServ for accounts, SASL PLAIN and EXTERNAL through SaslServ, and a TLS listener
    /// ([`Ircd::tls_port`]) asking for client certificates. Returns once NickServ answers.
    pub async fn start_inspircd_with_services() -> anyhow::Result<Self> {
        Self::start_inspircd_inner(true, false).await
    }

    async fn start_inspircd_inner(services: bool, moderated: bool) -> anyhow::Result<Self> {
        let mut last = None;
        for _ in 0..3 {
            match Self::try_start_inspircd(services, moderated).await {
                Ok(this) => return Ok(this),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("InspIRCd did not start")))
    }

    async fn try_start_inspircd(services: bool, moderated: bool) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("trestle-inspircd-").tempdir()?;
        let port = free_port();
        let sport = free_port().to_string();
        let tls_port = services.then(free_port);
        let mut conf = INSPIRCD_CONF.to_owned();
        if moderated {
            conf = conf
                .replace("defaultmodes=\"nt\"", "defaultmodes=\"not\"")
                .replace("limit=\"20000\">", "limit=\"20000\" modes=\"+x\">");
            conf.push_str(INSPIRCD_MODERATION_CONF);
        }
        if services {
            conf.push_str(INSPIRCD_SERVICES_CONF);
            self_signed(
                &dir.path().join("server.pem"),
                &dir.path().join("server.key"),
                "irc.inspircd.test",
            )?;
        }
        let conf = conf
            .replace("{port}", &port.to_string())
            .replace("{tlsport}", &tls_port.unwrap_or_default().to_string())
            .replace("{sport}", &sport)
            .replace("{linkpass}", LINK_PASSWORD)
            .replace("{dir}", &dir.path().display().to_string());
        std::fs::write(dir.path().join("inspircd.conf"), conf)?;
        std::fs::write(dir.path().join("motd.txt"), "hello\n")?;
        let mut this =
            Self { child: None, services: None, port, tls_port, dir, kind: IrcdKind::InspIrcd };
        this.launch().await?;
        if services {
            let conf = ATHEME_CONF.replace("{sport}", &sport).replace("{linkpass}", LINK_PASSWORD);
            std::fs::write(this.dir.path().join("atheme.conf"), conf)?;
            this.launch_services().await?;
        }
        Ok(this)
    }

    /// Starts Atheme in the foreground (`-n`) on the configuration, data directory, log and
    /// pid file in our directory, and waits until NickServ is on the network.
    async fn launch_services(&mut self) -> anyhow::Result<()> {
        let dir = self.dir.path();
        let mut cmd = Command::new(Self::binary("atheme-services"));
        cmd.arg("-n")
            .arg("-c")
            .arg(dir.join("atheme.conf"))
            .arg("-D")
            .arg(dir)
            .arg("-l")
            .arg(dir.join("atheme-file.log"))
            .arg("-p")
            .arg(dir.join("atheme.pid"))
            .current_dir(dir);
        let mut child = ChildGuard::spawn("atheme", cmd, &dir.join("atheme.log"))?;
        let mut probe = IrcClient::connect(self.port, "svcprobe").await?;
        for _ in 0..100 {
            if !child.is_running() {
                break;
            }
            probe.raw("WHOIS NickServ\r\n").await?;
            let reply = probe
                .wait_for(Duration::from_secs(2), |l| matches!(l.command.as_str(), "311" | "401"))
                .await?;
            if reply.command == "311" {
                self.services = Some(child);
                return probe.raw("QUIT\r\n").await;
            }
            probe.seen.clear();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("Atheme did not link: {}", child.log_tail(20))
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
        let mut this =
            Self { child: None, services: None, port, tls_port: None, dir, kind: IrcdKind::NgIrcd };
        this.launch().await?;
        Ok(this)
    }

    fn binary(name: &str) -> PathBuf {
        ["/usr/sbin", "/usr/bin"]
            .iter()
            .map(|d| PathBuf::from(d).join(name))
            .find(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from(name))
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        let (name, mut cmd, log, marker) = match self.kind {
            IrcdKind::NgIrcd => {
                let mut cmd = Command::new(Self::binary("ngircd"));
                cmd.args(["-n", "-f"]).arg(self.dir.path().join("ngircd.conf"));
                let marker = format!("Now listening on [127.0.0.1]:{}", self.port);
                ("ngircd", cmd, self.dir.path().join("ngircd.log"), marker)
            }
            IrcdKind::InspIrcd => {
                // In the foreground; `--runasroot` lets it start where tests run as root (it
                // changes nothing otherwise). Its own log and its output share one file.
                let mut cmd = Command::new(Self::binary("inspircd"));
                cmd.args(["--nofork", "--runasroot", "--config"])
                    .arg(self.dir.path().join("inspircd.conf"));
                let marker = format!("Added a listener on 127.0.0.1:{}", self.port);
                ("inspircd", cmd, self.dir.path().join("inspircd.log"), marker)
            }
        };
        // Ours is listening when its log says so (a connect alone could reach another test's
        // server that took the port); a restart appends to the same log, so count the lines.
        let listening =
            || std::fs::read_to_string(&log).map(|t| t.matches(&marker).count()).unwrap_or(0);
        let before = listening();
        cmd.current_dir(self.dir.path());
        let mut child = ChildGuard::spawn(name, cmd, &log)?;
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
        bail!("{name} did not start: {}", child.log_tail(20))
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The TLS port, which asks for client certificates (InspIRCd with services only).
    pub fn tls_port(&self) -> Option<u16> {
        self.tls_port
    }

    /// Stops the server (SIGKILL: every client connection drops; linked services reconnect
    /// once it is back).
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

/// Writes a self-signed certificate (P-256) for `name` to `cert` and its key to `key`, with
/// `openssl`.
fn self_signed(cert: &Path, key: &Path, name: &str) -> anyhow::Result<()> {
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"])
        .args(["-nodes", "-days", "2", "-subj", &format!("/CN={name}"), "-keyout"])
        .arg(key)
        .arg("-out")
        .arg(cert)
        .output()
        .context("running openssl")?;
    if !out.status.success() {
        bail!("openssl req failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// A TLS client certificate in `dir`: a PEM file holding the certificate and its key, and its
/// SHA-256 fingerprint as InspIRCd reports it to services (lowercase hex, no colons).
pub fn client_certificate(dir: &Path, name: &str) -> anyhow::Result<(PathBuf, String)> {
    let (cert, key) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
    self_signed(&cert, &key, name)?;
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(&cert)
        .output()
        .context("running openssl")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let Some((_, hex)) = text.trim().split_once('=') else {
        bail!("openssl x509 -fingerprint: {text}");
    };
    let fingerprint = hex.replace(':', "").to_ascii_lowercase();
    let pem = dir.join(format!("{name}.pem"));
    std::fs::write(&pem, [std::fs::read(&cert)?, std::fs::read(&key)?].concat())?;
    Ok((pem, fingerprint))
}

/// A parsed line as the test client sees it.
#[derive(Debug, Clone)]
pub struct Line {
    /// The raw line.
    pub raw: String,
    /// Message tags, values unescaped (only with the `message-tags` capability).
    pub tags: Vec<(String, Option<String>)>,
    /// Source nick, if a user.
    pub nick: Option<String>,
    /// Command.
    pub command: String,
    /// Parameters.
    pub params: Vec<String>,
}

impl Line {
    /// A tag's value (`Some("")` for a tag without one).
    pub fn tag(&self, name: &str) -> Option<&str> {
        self.tags.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_deref().unwrap_or(""))
    }
}

/// Unescapes a tag value (message-tags: `\:` `\s` `\\` `\r` `\n`; other escaped characters
/// stand for themselves, a lone trailing backslash is dropped).
fn unescape_tag(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some(':') => out.push(';'),
            Some('s') => out.push(' '),
            Some('r') => out.push('\r'),
            Some('n') => out.push('\n'),
            Some(c) => out.push(c),
            None => {}
        }
    }
    out
}

pub(crate) fn parse(raw: &str) -> Line {
    let mut rest = raw;
    let mut tags = Vec::new();
    if let Some(r) = rest.strip_prefix('@') {
        let (t, r) = r.split_once(' ').unwrap_or((r, ""));
        for tag in t.split(';').filter(|t| !t.is_empty()) {
            let (k, v) = match tag.split_once('=') {
                Some((k, v)) => (k, Some(unescape_tag(v))),
                None => (tag, None),
            };
            tags.push((k.to_owned(), v));
        }
        rest = r.trim_start_matches(' ');
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
    Line { raw: raw.to_owned(), tags, nick, command: cmd.to_owned(), params }
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
        Self::connect_with_caps(port, nick, &[]).await
    }

    /// Connects, requests the capabilities `caps` (`message-tags`, `server-time`,
    /// `echo-message`, …) and registers as `nick`; fails unless the server grants them all.
    pub async fn connect_with_caps(port: u16, nick: &str, caps: &[&str]) -> anyhow::Result<Self> {
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
        if !caps.is_empty() {
            c.raw(&format!("CAP LS 302\r\nCAP REQ :{}\r\n", caps.join(" "))).await?;
        }
        c.raw(&format!("NICK {nick}\r\nUSER {user} 0 * :{nick}\r\n")).await?;
        if !caps.is_empty() {
            let reply = c
                .wait_for(Duration::from_secs(10), |l| {
                    l.command == "CAP"
                        && matches!(l.params.get(1).map(String::as_str), Some("ACK" | "NAK"))
                })
                .await
                .context("capability negotiation")?;
            if reply.params[1] != "ACK" {
                bail!("the server refused the capabilities {caps:?}: {}", reply.raw);
            }
            c.raw("CAP END\r\n").await?;
        }
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
