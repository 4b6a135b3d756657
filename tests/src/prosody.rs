//! A real Prosody (Debian's) on free ports in a temp dir, with an external component for the
//! bridge, a MUC service, and a test user; and a small XMPP test client.
//!
//! The client speaks `jabber:client` with plain minidom elements over tokio-xmpp's XML stream:
//! the workspace enables xmpp-parsers' `component` feature (for the bridge), which makes its
//! typed stanzas use the component namespace, so they cannot serve a c2s client here.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use futures::{SinkExt, StreamExt};
use tokio::{io::BufStream, net::TcpStream, sync::mpsc};
use tokio_xmpp::{
    minidom::{Element, rxml::xml_ncname},
    xmlstream::{StreamHeader, Timeouts, XmlStream, initiate_stream},
};

use crate::{ChildGuard, free_port, wait_for};

/// The component's domain.
pub const COMPONENT: &str = "matrix.localhost";
/// The MUC service.
pub const MUC: &str = "conference.localhost";
/// The component secret.
pub const SECRET: &str = "component-secret";

/// A running Prosody.
#[derive(Debug)]
pub struct Prosody {
    child: Option<ChildGuard>,
    c2s_port: u16,
    component_port: u16,
    dir: tempfile::TempDir,
}

impl Prosody {
    /// Writes the config, registers `users` (`(name, password)` on `localhost`) and starts it.
    /// Its rooms do not stamp XEP-0421 occupant-ids (see [`Self::start_with_occupant_ids`]).
    pub async fn start(users: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::start_with(users, false).await
    }

    /// Like [`Self::start`], with XEP-0421 occupant-ids in the rooms: Prosody 0.12's MUC has
    /// them built in (`muc/occupant_id.lib.lua`, on unless `muc_occupant_id = false`): every
    /// occupant presence and groupchat message carries the room's `<occupant-id/>` (client ones
    /// stripped) and the rooms advertise `urn:xmpp:occupant-id:0`.
    pub async fn start_with_occupant_ids(users: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::start_with(users, true).await
    }

    async fn start_with(users: &[(&str, &str)], occupant_ids: bool) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("trestle-prosody-").tempdir()?;
        let (c2s_port, s2s_port, component_port) = (free_port(), free_port(), free_port());
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data)?;
        // XEP-0425 moderation comes with Debian's prosody-modules (installed by install-deps).
        let moderation = Path::new(MUC_MODERATION).exists();
        let muc_modules =
            if moderation { r#""muc_mam"; "muc_moderation""# } else { r#""muc_mam""# };
        let config = format!(
            r#"run_as_root = true
daemonize = false
pidfile = "{pid}"
data_path = "{data}"
log = {{ debug = "{log}" }}
interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {c2s_port} }}
s2s_ports = {{ {s2s_port} }}
http_ports = {{ }}
https_ports = {{ }}
component_ports = {{ {component_port} }}
component_interface = "127.0.0.1"
authentication = "internal_plain"
allow_registration = false
c2s_require_encryption = false
s2s_require_encryption = false
allow_unencrypted_plain_auth = true
modules_enabled = {{ "roster"; "saslauth"; "disco"; "ping"; "version"; "posix"; "pep"; "vcard_legacy" }}
modules_disabled = {{ "tls"; "s2s" }}
VirtualHost "localhost"
Component "{MUC}" "muc"
    modules_enabled = {{ {muc_modules} }}
    muc_log_by_default = true
    muc_room_default_change_subject = true
    muc_occupant_id = {occupant_ids}
Component "{COMPONENT}"
    component_secret = "{SECRET}"
"#,
            pid = dir.path().join("prosody.pid").display(),
            data = data.display(),
            log = dir.path().join("prosody-debug.log").display(),
        );
        std::fs::write(dir.path().join("prosody.cfg.lua"), config)?;
        let this = Self { child: None, c2s_port, component_port, dir };
        for (user, pass) in users {
            let out = Command::new("prosodyctl")
                .arg("--config")
                .arg(this.config_path())
                .args(["register", user, "localhost", pass])
                .output()
                .context("cannot run prosodyctl")?;
            if !out.status.success() {
                bail!(
                    "prosodyctl register {user} failed: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        let mut this = this;
        this.launch().await?;
        Ok(this)
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("prosody.cfg.lua")
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new("prosody");
        cmd.arg("--config").arg(self.config_path());
        let child = ChildGuard::spawn("prosody", cmd, &self.dir.path().join("prosody.log"))?;
        for _ in 0..100 {
            if TcpStream::connect(("127.0.0.1", self.component_port)).await.is_ok()
                && TcpStream::connect(("127.0.0.1", self.c2s_port)).await.is_ok()
            {
                self.child = Some(child);
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("Prosody did not start: {}", child.log_tail(30))
    }

    /// The client port.
    pub fn c2s_port(&self) -> u16 {
        self.c2s_port
    }

    /// The component port.
    pub fn component_port(&self) -> u16 {
        self.component_port
    }

    /// Stops the server with SIGKILL (every connection drops, non-persistent rooms vanish).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill_hard();
        }
    }

    /// Starts it again on the same ports.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.launch().await
    }

    /// The last lines of the debug log (for failure messages).
    pub fn log_tail(&self, n: usize) -> String {
        let text =
            std::fs::read_to_string(self.dir.path().join("prosody-debug.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// Where Debian's prosody-modules puts XEP-0425 message moderation.
pub const MUC_MODERATION: &str =
    "/usr/lib/prosody/modules/mod_muc_moderation/mod_muc_moderation.lua";

/// The client namespace.
const NS_CLIENT: &str = "jabber:client";

/// A groupchat message as the test client saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The sender's nick.
    pub nick: String,
    /// The body.
    pub body: String,
    /// Whether it carried `<delay/>` (history).
    pub delayed: bool,
    /// The stanza's XML, attribute quotes normalised to `"`.
    pub xml: String,
    /// The room's stanza-id (XEP-0359) for the message.
    pub stanza_id: Option<String>,
}

type Stream = XmlStream<BufStream<TcpStream>, Element>;

#[derive(Debug, Default)]
struct Log {
    messages: Vec<Seen>,
    presences: Vec<String>,
    all: Vec<String>,
    online: u32,
}

/// A test XMPP client (c2s, SASL PLAIN over loopback) that reconnects by itself.
#[derive(Debug)]
pub struct XmppClient {
    /// The account's bare JID.
    pub jid: String,
    tx: mpsc::UnboundedSender<Element>,
    log: Arc<Mutex<Log>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for XmppClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn header() -> StreamHeader<'static> {
    StreamHeader { to: Some("localhost".into()), ..StreamHeader::default() }
}

async fn next_element(s: &mut Stream) -> anyhow::Result<Element> {
    loop {
        match s.next().await {
            Some(Ok(e)) => return Ok(e),
            Some(Err(tokio_xmpp::xmlstream::ReadError::SoftTimeout)) => continue,
            Some(Err(e)) => bail!("read error: {e}"),
            None => bail!("stream closed"),
        }
    }
}

async fn login(port: u16, user: &str, password: &str) -> anyhow::Result<Stream> {
    let io = BufStream::new(TcpStream::connect(("127.0.0.1", port)).await?);
    let pending = initiate_stream(io, NS_CLIENT, header(), Timeouts::tight()).await?;
    let (_, mut s) =
        pending.recv_features::<Element>().await.map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let creds = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
    let auth = Element::builder("auth", "urn:ietf:params:xml:ns:xmpp-sasl")
        .attr(xml_ncname!("mechanism").into(), "PLAIN")
        .append(creds)
        .build();
    s.send(&auth).await?;
    let answer = next_element(&mut s).await?;
    if answer.name() != "success" {
        bail!("SASL failed: {}", String::from(&answer));
    }
    let pending = s.initiate_reset().send_header(header()).await?;
    let (_, mut s) =
        pending.recv_features::<Element>().await.map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let bind = Element::builder("iq", NS_CLIENT)
        .attr(xml_ncname!("type").into(), "set")
        .attr(xml_ncname!("id").into(), "bind")
        .append(
            Element::builder("bind", "urn:ietf:params:xml:ns:xmpp-bind")
                .append(
                    Element::builder("resource", "urn:ietf:params:xml:ns:xmpp-bind")
                        .append("test")
                        .build(),
                )
                .build(),
        )
        .build();
    s.send(&bind).await?;
    loop {
        let e = next_element(&mut s).await?;
        if e.name() == "iq" && e.attr("id") == Some("bind") {
            if e.attr("type") != Some("result") {
                bail!("bind failed: {}", String::from(&e));
            }
            return Ok(s);
        }
    }
}

fn record(log: &Mutex<Log>, e: &Element) {
    // Attribute quotes normalised to `"` so that assertions can match `name="value"` (apostrophes
    // in text change too: read text from the parsed fields, not from this string).
    let xml = String::from(e).replace('\'', "\"");
    let mut log = log.lock().unwrap();
    log.all.push(xml.clone());
    match e.name() {
        "message" if e.attr("type") == Some("groupchat") => {
            let nick = e
                .attr("from")
                .and_then(|f| f.split_once('/'))
                .map(|(_, n)| n.to_owned())
                .unwrap_or_default();
            let delayed = e.children().any(|c| c.is("delay", "urn:xmpp:delay"));
            let room = e.attr("from").map(|f| f.split('/').next().unwrap_or(f).to_owned());
            let stanza_id = e
                .children()
                .find(|c| c.is("stanza-id", "urn:xmpp:sid:0") && c.attr("by") == room.as_deref())
                .and_then(|c| c.attr("id").map(str::to_owned));
            if let Some(body) = e.get_child("body", NS_CLIENT) {
                log.messages.push(Seen { nick, body: body.text(), delayed, xml, stanza_id });
            }
        }
        "presence" => log.presences.push(xml),
        _ => {}
    }
}

async fn run(
    port: u16,
    user: String,
    password: String,
    mut rx: mpsc::UnboundedReceiver<Element>,
    log: Arc<Mutex<Log>>,
) {
    loop {
        match login(port, &user, &password).await {
            Ok(mut s) => {
                log.lock().unwrap().online += 1;
                loop {
                    tokio::select! {
                        e = next_element(&mut s) => match e {
                            Ok(e) => record(&log, &e),
                            Err(_) => break,
                        },
                        out = rx.recv() => match out {
                            Some(e) => if s.send(&e).await.is_err() { break },
                            None => return,
                        },
                    }
                }
            }
            Err(e) => eprintln!("test XMPP client: {e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn attrs(
    mut b: tokio_xmpp::minidom::ElementBuilder,
    attrs: &[(&str, &str)],
) -> tokio_xmpp::minidom::ElementBuilder {
    for (k, v) in attrs {
        let name = tokio_xmpp::minidom::rxml::NcName::try_from(*k).expect("attribute name");
        b = b.attr(name, *v);
    }
    b
}

/// An element in the client namespace with attributes.
pub fn stanza(name: &str, attributes: &[(&str, &str)]) -> tokio_xmpp::minidom::ElementBuilder {
    attrs(Element::builder(name, NS_CLIENT), attributes)
}

/// A payload element with attributes.
pub fn payload(name: &str, ns: &str, attributes: &[(&str, &str)]) -> Element {
    attrs(Element::builder(name, ns), attributes).build()
}

impl XmppClient {
    /// Connects `user@localhost` and waits until it is online.
    pub async fn connect(port: u16, user: &str, password: &str) -> anyhow::Result<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let log = Arc::new(Mutex::new(Log::default()));
        let task =
            tokio::spawn(run(port, user.to_owned(), password.to_owned(), rx, Arc::clone(&log)));
        let this = Self { jid: format!("{user}@localhost"), tx, log, task };
        this.wait_online(1).await?;
        Ok(this)
    }

    /// Waits until the client has been online `n` times (reconnects count).
    pub async fn wait_online(&self, n: u32) -> anyhow::Result<()> {
        wait_for("the XMPP client to be online", Duration::from_secs(30), || async {
            (self.log.lock().unwrap().online >= n).then_some(())
        })
        .await
    }

    /// Sends an element.
    pub fn send(&self, e: Element) -> anyhow::Result<()> {
        self.tx.send(e).map_err(|_| anyhow::anyhow!("the client task ended"))
    }

    /// Joins `room@conference.localhost` as `nick` (no history) and waits for the self-presence;
    /// unlocks the room if this join created it.
    pub async fn join(&self, room: &str, nick: &str) -> anyhow::Result<()> {
        let to = format!("{room}@{MUC}/{nick}");
        let before = self.log.lock().unwrap().presences.len();
        let x = Element::builder("x", "http://jabber.org/protocol/muc")
            .append(payload("history", "http://jabber.org/protocol/muc", &[("maxstanzas", "0")]))
            .build();
        self.send(stanza("presence", &[("to", &to)]).append(x).build())?;
        let from = format!("from=\"{to}\"");
        let me = wait_for("the MUC self-presence", Duration::from_secs(20), || async {
            let log = self.log.lock().unwrap();
            log.presences[before..]
                .iter()
                .find(|x| x.contains(&from) && x.contains("code=\"110\""))
                .cloned()
        })
        .await?;
        if me.contains("code=\"201\"") {
            // We created the room: accept the default configuration, as clients do.
            let query = Element::builder("query", "http://jabber.org/protocol/muc#owner")
                .append(payload("x", "jabber:x:data", &[("type", "submit")]))
                .build();
            self.send(
                stanza(
                    "iq",
                    &[("type", "set"), ("id", "unlock"), ("to", &format!("{room}@{MUC}"))],
                )
                .append(query)
                .build(),
            )?;
        }
        Ok(())
    }

    /// Stores the account's vCard (XEP-0054) with `photo` (PNG) as its only content and
    /// waits for the server's answer; returns the photo's hex SHA-1, which presences announce
    /// (XEP-0153).
    pub async fn publish_vcard_photo(&self, photo: &[u8]) -> anyhow::Result<String> {
        use sha1::Digest as _;
        let binval = base64::engine::general_purpose::STANDARD.encode(photo);
        let text = |name: &str, value: &str| {
            Element::builder(name, "vcard-temp").append(value.to_owned()).build()
        };
        let vcard = Element::builder("vCard", "vcard-temp")
            .append(
                Element::builder("PHOTO", "vcard-temp")
                    .append(text("TYPE", "image/png"))
                    .append(text("BINVAL", &binval))
                    .build(),
            )
            .build();
        let id = format!("vc{}", rand::random::<u32>());
        self.send(stanza("iq", &[("type", "set"), ("id", &id)]).append(vcard).build())?;
        let needle = format!("id=\"{id}\"");
        let answer = self
            .wait_stanza(Duration::from_secs(20), |s| s.starts_with("<iq") && s.contains(&needle))
            .await?;
        if !answer.contains("type=\"result\"") {
            bail!("the server refused the vCard: {answer}");
        }
        Ok(hex::encode(sha1::Sha1::digest(photo)))
    }

    /// Sends the occupant's presence in `room` again, announcing the vCard avatar `hash`
    /// (XEP-0153; `""` for none).
    pub fn announce_avatar(&self, room: &str, nick: &str, hash: &str) -> anyhow::Result<()> {
        let photo = Element::builder("photo", "vcard-temp:x:update").append(hash.to_owned());
        let x = Element::builder("x", "vcard-temp:x:update").append(photo.build()).build();
        self.send(stanza("presence", &[("to", &format!("{room}@{MUC}/{nick}"))]).append(x).build())
    }

    /// Sends a groupchat message with `id` (also its origin-id) and extra payloads.
    pub fn say_with(
        &self,
        room: &str,
        id: &str,
        body: &str,
        extra: Vec<Element>,
    ) -> anyhow::Result<()> {
        let mut m = stanza(
            "message",
            &[("type", "groupchat"), ("to", &format!("{room}@{MUC}")), ("id", id)],
        )
        .append(Element::builder("body", NS_CLIENT).append(body).build())
        .append(payload("origin-id", "urn:xmpp:sid:0", &[("id", id)]));
        for e in extra {
            m = m.append(e);
        }
        self.send(m.build())
    }

    /// Sets the room's subject.
    pub fn set_subject(&self, room: &str, subject: &str) -> anyhow::Result<()> {
        self.send(
            stanza("message", &[("type", "groupchat"), ("to", &format!("{room}@{MUC}"))])
                .append(Element::builder("subject", NS_CLIENT).append(subject).build())
                .build(),
        )
    }

    /// Sends a groupchat message with `id` (also its origin-id).
    pub fn say(&self, room: &str, id: &str, body: &str) -> anyhow::Result<()> {
        self.say_with(room, id, body, Vec::new())
    }

    /// Sends `<iq type='get'>` with an empty `<name xmlns=ns/>` to `to`; returns the answer (XML).
    pub async fn iq_get(&self, to: &str, name: &str, ns: &str) -> anyhow::Result<String> {
        let id = format!("q{}", rand::random::<u32>());
        self.send(
            stanza("iq", &[("type", "get"), ("id", &id), ("to", to)])
                .append(Element::bare(name, ns))
                .build(),
        )?;
        let needle = format!("id=\"{id}\"");
        self.wait_stanza(Duration::from_secs(20), |s| s.starts_with("<iq") && s.contains(&needle))
            .await
    }

    /// Waits for any stanza (XML) matching `pred`.
    pub async fn wait_stanza(
        &self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        wait_for("a matching stanza", timeout, || async {
            self.log.lock().unwrap().all.iter().find(|s| pred(s)).cloned()
        })
        .await
    }

    /// Every stanza seen so far (XML).
    pub fn stanzas(&self) -> Vec<String> {
        self.log.lock().unwrap().all.clone()
    }

    /// Every groupchat message seen so far.
    pub fn messages(&self) -> Vec<Seen> {
        self.log.lock().unwrap().messages.clone()
    }

    /// Every presence seen so far (XML).
    pub fn presences(&self) -> Vec<String> {
        self.log.lock().unwrap().presences.clone()
    }

    /// Waits for a groupchat message matching `pred`.
    pub async fn wait_message(
        &self,
        timeout: Duration,
        pred: impl Fn(&Seen) -> bool,
    ) -> anyhow::Result<Seen> {
        wait_for("a matching XMPP message", timeout, || async {
            self.log.lock().unwrap().messages.iter().find(|m| pred(m)).cloned()
        })
        .await
    }

    /// Waits for a presence (XML) matching `pred`.
    pub async fn wait_presence(
        &self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        wait_for("a matching XMPP presence", timeout, || async {
            self.log.lock().unwrap().presences.iter().find(|p| pred(p)).cloned()
        })
        .await
    }
}
