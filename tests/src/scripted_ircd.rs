//! A small scripted IRC server, for the two IRCv3 drafts no packaged server offers:
//! `draft/relaymsg` (`RELAYMSG`, an Ergo extension) and `draft/message-redaction` (`REDACT`).
//! InspIRCd 3 and ngIRCd have neither, so the bridge's use of them is proven against this
//! in-process server, written from the two specifications (ircv3-specifications
//! `extensions/relaymsg.md` and `extensions/message-redaction.md`). Everything else is tested
//! against the real servers.
//!
//! It registers clients (CAP LS 302/REQ/END, NICK, USER), keeps channels (the first member is
//! an operator), relays PRIVMSG, NOTICE and TAGMSG with msgids (to clients with
//! `message-tags`; echoes with `echo-message`), and implements `RELAYMSG` (channel operators
//! only, the nick must hold a `/`) and `REDACT` (one's own messages, or any as an operator).
//! Every line it receives is kept for assertions.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex},
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::TcpListener,
    sync::mpsc,
};

use crate::ircd::{Line, parse};

/// What the server offers.
const CAPS: &str =
    "message-tags echo-message server-time draft/relaymsg=/ draft/message-redaction multi-prefix";

#[derive(Debug)]
struct Client {
    nick: String,
    user: String,
    caps: HashSet<String>,
    tx: mpsc::UnboundedSender<String>,
}

#[derive(Debug, Default)]
struct State {
    clients: HashMap<u64, Client>,
    /// Channel (lowercase) → members (client id → operator).
    channels: BTreeMap<String, BTreeMap<u64, bool>>,
    /// msgid → (channel or nick it went to, the nick that may delete it).
    messages: HashMap<String, (String, String)>,
    next_msgid: u64,
    /// Every line received, as `nick: line`.
    received: Vec<String>,
}

impl State {
    fn msgid(&mut self) -> String {
        self.next_msgid += 1;
        format!("m{}", self.next_msgid)
    }

    fn send(&self, id: u64, line: &str) {
        if let Some(c) = self.clients.get(&id) {
            let _ = c.tx.send(format!("{line}\r\n"));
        }
    }

    fn has(&self, id: u64, cap: &str) -> bool {
        self.clients.get(&id).is_some_and(|c| c.caps.contains(cap))
    }

    fn mask(&self, id: u64) -> String {
        self.clients
            .get(&id)
            .map(|c| format!("{}!{}@127.0.0.1", c.nick, c.user))
            .unwrap_or_default()
    }

    fn by_nick(&self, nick: &str) -> Option<u64> {
        self.clients.iter().find(|(_, c)| c.nick.eq_ignore_ascii_case(nick)).map(|(id, _)| *id)
    }

    /// Sends `body` (a line without tags) to `to`, with `tags` for those with message-tags.
    fn deliver(&self, to: &[u64], tags: &[(&str, &str)], body: &str) {
        for id in to {
            let mut line = String::new();
            if self.has(*id, "message-tags") {
                let t: Vec<String> = tags
                    .iter()
                    .filter(|(k, _)| *k != "draft/relaymsg" || self.has(*id, "draft/relaymsg"))
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                if !t.is_empty() {
                    line = format!("@{} ", t.join(";"));
                }
            }
            line.push_str(body);
            self.send(*id, &line);
        }
    }

    /// Who receives a message from `from` to `target`, and whether the target exists.
    fn recipients(&self, from: u64, target: &str, echo: bool) -> Option<Vec<u64>> {
        let mut to: Vec<u64> = if target.starts_with('#') {
            let members = self.channels.get(&target.to_ascii_lowercase())?;
            members.keys().copied().filter(|id| *id != from).collect()
        } else {
            vec![self.by_nick(target)?]
        };
        if echo && self.has(from, "echo-message") {
            to.push(from);
        }
        Some(to)
    }

    fn is_op(&self, id: u64, chan: &str) -> bool {
        self.channels.get(&chan.to_ascii_lowercase()).and_then(|m| m.get(&id)).copied()
            == Some(true)
    }
}

/// A running scripted server.
#[derive(Debug)]
pub struct ScriptedIrcd {
    port: u16,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ScriptedIrcd {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ScriptedIrcd {
    /// Listens on a free loopback port.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(Mutex::new(State::default()));
        let shared = Arc::clone(&state);
        let task = tokio::spawn(async move {
            let mut next = 0u64;
            while let Ok((stream, _)) = listener.accept().await {
                next += 1;
                tokio::spawn(serve(next, stream, Arc::clone(&shared)));
            }
        });
        Ok(Self { port, state, task })
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Every line received so far, as `nick: line`.
    pub fn received(&self) -> Vec<String> {
        self.state.lock().unwrap().received.clone()
    }
}

async fn serve(id: u64, stream: tokio::net::TcpStream, state: Arc<Mutex<State>>) {
    let (read, mut write) = stream.into_split();
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    state
        .lock()
        .unwrap()
        .clients
        .insert(id, Client { nick: String::new(), user: String::new(), caps: HashSet::new(), tx });
    let writer = tokio::spawn(async move {
        while let Some(line) = rx.recv().await {
            if write.write_all(line.as_bytes()).await.is_err() {
                break;
            }
        }
    });
    let mut lines = BufReader::new(read).lines();
    let mut registered = false;
    let mut negotiating = false;
    while let Ok(Some(raw)) = lines.next_line().await {
        let line = parse(&raw);
        let mut st = state.lock().unwrap();
        let nick = st.clients.get(&id).map(|c| c.nick.clone()).unwrap_or_default();
        st.received.push(format!("{nick}: {raw}"));
        if handle(id, &line, &mut st, &mut negotiating) {
            break;
        }
        let ready = st.clients.get(&id).is_some_and(|c| !c.nick.is_empty() && !c.user.is_empty());
        if !registered && ready && !negotiating {
            registered = true;
            let n = st.clients[&id].nick.clone();
            st.send(id, &format!(":scripted 001 {n} :Welcome"));
            st.send(
                id,
                &format!(":scripted 005 {n} CASEMAPPING=ascii CHANTYPES=# PREFIX=(ov)@+ NICKLEN=30 CHANMODES=b,k,l,imnt :are supported"),
            );
            st.send(id, &format!(":scripted 422 {n} :No MOTD"));
        }
    }
    let mut st = state.lock().unwrap();
    let mask = st.mask(id);
    let chans: Vec<String> = st.channels.keys().cloned().collect();
    for chan in chans {
        if let Some(members) = st.channels.get_mut(&chan)
            && members.remove(&id).is_some()
        {
            let others: Vec<u64> = members.keys().copied().collect();
            st.deliver(&others, &[], &format!(":{mask} QUIT :Connection closed"));
        }
    }
    st.clients.remove(&id);
    writer.abort();
}

/// Handles one line; `true` to close the connection.
fn handle(id: u64, line: &Line, st: &mut State, negotiating: &mut bool) -> bool {
    let p = |i: usize| line.params.get(i).map(String::as_str).unwrap_or("");
    let nick = st.clients.get(&id).map(|c| c.nick.clone()).unwrap_or_default();
    let target_nick = if nick.is_empty() { "*".to_owned() } else { nick.clone() };
    match line.command.to_ascii_uppercase().as_str() {
        "CAP" => match p(0).to_ascii_uppercase().as_str() {
            "LS" => {
                *negotiating = true;
                st.send(id, &format!(":scripted CAP {target_nick} LS :{CAPS}"));
            }
            "REQ" => {
                let offered: Vec<&str> =
                    CAPS.split(' ').map(|c| c.split('=').next().unwrap_or(c)).collect();
                let wanted: Vec<&str> = p(1).split(' ').filter(|c| !c.is_empty()).collect();
                if wanted.iter().all(|c| offered.contains(c)) {
                    if let Some(c) = st.clients.get_mut(&id) {
                        c.caps.extend(wanted.iter().map(|c| (*c).to_owned()));
                    }
                    st.send(id, &format!(":scripted CAP {target_nick} ACK :{}", p(1)));
                } else {
                    st.send(id, &format!(":scripted CAP {target_nick} NAK :{}", p(1)));
                }
            }
            "END" => *negotiating = false,
            _ => {}
        },
        "NICK" => {
            if let Some(c) = st.clients.get_mut(&id) {
                c.nick = p(0).to_owned();
            }
        }
        "USER" => {
            if let Some(c) = st.clients.get_mut(&id) {
                c.user = p(0).to_owned();
            }
        }
        "PING" => st.send(id, &format!(":scripted PONG scripted :{}", p(0))),
        "QUIT" => return true,
        "JOIN" => {
            for chan in p(0).split(',').filter(|c| c.starts_with('#')) {
                let key = chan.to_ascii_lowercase();
                let members = st.channels.entry(key.clone()).or_default();
                let op = members.is_empty();
                members.insert(id, op);
                let everyone: Vec<u64> = members.keys().copied().collect();
                let mask = st.mask(id);
                st.deliver(&everyone, &[], &format!(":{mask} JOIN {chan}"));
                let names: Vec<String> = st.channels[&key]
                    .iter()
                    .filter_map(|(m, op)| {
                        let n = &st.clients.get(m)?.nick;
                        Some(if *op { format!("@{n}") } else { n.clone() })
                    })
                    .collect();
                st.send(id, &format!(":scripted 353 {nick} = {chan} :{}", names.join(" ")));
                st.send(id, &format!(":scripted 366 {nick} {chan} :End of /NAMES list."));
            }
        }
        "PART" => {
            let key = p(0).to_ascii_lowercase();
            let mask = st.mask(id);
            if let Some(members) = st.channels.get(&key) {
                let everyone: Vec<u64> = members.keys().copied().collect();
                st.deliver(&everyone, &[], &format!(":{mask} PART {}", p(0)));
            }
            if let Some(members) = st.channels.get_mut(&key) {
                members.remove(&id);
            }
        }
        "MODE" if p(0).starts_with('#') && line.params.len() == 1 => {
            st.send(id, &format!(":scripted 324 {nick} {} +nt", p(0)));
        }
        "WHO" => st.send(id, &format!(":scripted 315 {nick} {} :End of /WHO list.", p(0))),
        "PRIVMSG" | "NOTICE" | "TAGMSG" => {
            let command = line.command.to_ascii_uppercase();
            let (target, text) = (p(0).to_owned(), p(1).to_owned());
            let Some(to) = st.recipients(id, &target, true) else {
                st.send(id, &format!(":scripted 401 {nick} {target} :No such nick/channel"));
                return false;
            };
            let msgid = st.msgid();
            st.messages.insert(msgid.clone(), (target.to_ascii_lowercase(), nick));
            let mut tags: Vec<(String, String)> = line
                .tags
                .iter()
                .filter(|(k, _)| k.starts_with('+'))
                .map(|(k, v)| (k.clone(), v.clone().unwrap_or_default()))
                .collect();
            tags.push(("msgid".to_owned(), msgid));
            let tags: Vec<(&str, &str)> =
                tags.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let mask = st.mask(id);
            let body = if command == "TAGMSG" {
                format!(":{mask} TAGMSG {target}")
            } else {
                format!(":{mask} {command} {target} :{text}")
            };
            st.deliver(&to, &tags, &body);
        }
        "RELAYMSG" => {
            let (chan, spoofed, text) = (p(0).to_owned(), p(1).to_owned(), p(2).to_owned());
            if !st.has(id, "draft/relaymsg") || !st.is_op(id, &chan) {
                st.send(
                    id,
                    &format!(":scripted FAIL RELAYMSG PRIVS_NEEDED {chan} :Channel operators only"),
                );
                return false;
            }
            if !spoofed.contains('/') || spoofed.contains([' ', '!', '@', '#', ':', '*', '?']) {
                st.send(id, &format!(":scripted FAIL RELAYMSG INVALID_NICK {spoofed} :Bad nick"));
                return false;
            }
            // Everyone in the channel, the relayer too, with the tag naming the relayer.
            let Some(members) = st.channels.get(&chan.to_ascii_lowercase()) else {
                return false;
            };
            let everyone: Vec<u64> = members.keys().copied().collect();
            let msgid = st.msgid();
            st.messages.insert(msgid.clone(), (chan.to_ascii_lowercase(), nick.clone()));
            let body = format!(":{spoofed}!relay@relayed PRIVMSG {chan} :{text}");
            st.deliver(&everyone, &[("msgid", &msgid), ("draft/relaymsg", &nick)], &body);
        }
        "REDACT" => {
            let (target, msgid, reason) = (p(0).to_owned(), p(1).to_owned(), p(2).to_owned());
            let allowed = match st.messages.get(&msgid) {
                Some((t, owner)) => {
                    *t == target.to_ascii_lowercase()
                        && (owner.eq_ignore_ascii_case(&nick) || st.is_op(id, &target))
                }
                None => {
                    st.send(
                        id,
                        &format!(":scripted FAIL REDACT UNKNOWN_MSGID {target} {msgid} :Unknown"),
                    );
                    return false;
                }
            };
            if !allowed {
                st.send(
                    id,
                    &format!(":scripted FAIL REDACT REDACT_FORBIDDEN {target} {msgid} :Not yours"),
                );
                return false;
            }
            let Some(to) = st.recipients(id, &target, true) else { return false };
            let to: Vec<u64> =
                to.into_iter().filter(|c| st.has(*c, "draft/message-redaction")).collect();
            let mask = st.mask(id);
            let body = if reason.is_empty() {
                format!(":{mask} REDACT {target} {msgid}")
            } else {
                format!(":{mask} REDACT {target} {msgid} :{reason}")
            };
            let new = st.msgid();
            st.deliver(&to, &[("msgid", &new)], &body);
        }
        _ => {}
    }
    false
}
