//! The IRC bridge on top of Trestle: portals, ghosts, and messages both ways.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use trestle::{
    bridge::{
        Bridge, BridgeError, BridgeInfo, GhostProfile, PortalSpec, RoomContext, retry_remote,
    },
    commands::{CommandRegistry, PermissionLevel},
    config::Config,
    context::Context,
    event::{MatrixEvent, Message, MessageType},
    registration::{Namespace, Namespaces},
    store::Portal,
    util::{
        escape::escape_localpart,
        format::{html_to_runs, runs_to_html},
        split::{Budget, split_text},
        template::Template,
    },
};

use crate::{
    config::{BridgeMode, IrcConfig, MembershipSync, NetworkConfig},
    conn::{
        ConnConfig, ConnEvent, ConnectPacer, EchoRef, IrcConnection, IrcLine, Outgoing,
        line::one_line,
    },
    format::{irc_to_runs, runs_to_irc},
};

mod bans;
mod commands;
mod ircv3;
mod puppet;

/// One IRC network.
struct Network {
    id: String,
    config: NetworkConfig,
    bot: IrcConnection,
    user_template: Template,
    alias_template: Template,
    excluded: Vec<regex::Regex>,
    /// Paces every connection to this network: the bot's and the puppets'.
    pacer: Arc<ConnectPacer>,
    /// Connection settings the puppets start from.
    conn_base: ConnConfig,
    /// Parsed `ipv6_prefix`.
    ipv6_prefix: Option<(std::net::Ipv6Addr, u8)>,
    /// Matrix users' own connections (mode `puppets`).
    puppets: puppet::Puppets,
    /// Member modes per channel: portal id → folded nick → modes (`o`, `v`, …).
    member_modes: Mutex<HashMap<String, HashMap<String, std::collections::BTreeSet<char>>>>,
    /// Netsplits: nicks lost in a split (folded) → when, and the rooms their ghosts are in.
    split: Mutex<HashMap<String, (std::time::Instant, Vec<String>)>>,
    /// Recent QUITs, for the quit-rate netsplit heuristic.
    recent_quits: Mutex<std::collections::VecDeque<std::time::Instant>>,
    /// `!whois` in flight: folded nick → replies so far, and who waits for them.
    whois: Mutex<WhoisWaiters>,
    /// `user@host` of the nicks the bot has seen (folded nick →), for ban masks.
    hosts: Mutex<HashMap<String, String>>,
}

/// A recent message of a room: (event id, sender's name, text).
type Recent = (String, String, String);

type WhoisWaiters =
    HashMap<String, (Vec<String>, Option<tokio::sync::oneshot::Sender<Vec<String>>>)>;

/// Quits within [`SPLIT_WINDOW`] that make a wave a netsplit, whatever their reasons say.
const SPLIT_QUITS: usize = 5;
const SPLIT_WINDOW: Duration = Duration::from_secs(2);

/// Whether a QUIT reason has the shape servers give netsplits: two server names.
fn is_split_reason(reason: &str) -> bool {
    let mut parts = reason.split(' ');
    let server = |p: Option<&str>| {
        p.is_some_and(|s| {
            s.contains('.')
                && !s.starts_with('.')
                && !s.ends_with('.')
                && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '*')
        })
    };
    server(parts.next()) && server(parts.next()) && parts.next().is_none()
}

/// Where a portal's messages go on IRC.
#[derive(Debug)]
enum Target {
    /// A channel.
    Channel(String),
    /// A private conversation of a Matrix user with a nick.
    Direct {
        /// The Matrix user.
        user: String,
        /// The IRC nick.
        nick: String,
    },
}

/// How a Matrix user's message reaches IRC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// Through the user's own connection (mode `puppets`).
    Puppet,
    /// Relayed by the bot with the user's name.
    Relay,
}

impl Target {
    /// The channel or nick to send to.
    fn name(&self) -> &str {
        match self {
            Self::Channel(chan) => chan,
            Self::Direct { nick, .. } => nick,
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The Matrix msgtype and text of a PRIVMSG/NOTICE (`None` for CTCP other than ACTION).
fn classify_text<'a>(command: &str, text: &'a str) -> Option<(&'static str, &'a str)> {
    match text.strip_prefix("\x01ACTION ").map(|t| t.trim_end_matches('\x01')) {
        Some(action) => Some(("m.emote", action)),
        None if text.starts_with('\x01') => None,
        None if command == "NOTICE" => Some(("m.notice", text)),
        None => Some(("m.text", text)),
    }
}

/// Matrix content for IRC text: formatting codes become HTML, the body is plain.
fn content_from_irc(msgtype: &str, text: &str) -> Value {
    let runs = irc_to_runs(text);
    let plain: String = runs.iter().map(|r| r.text.as_str()).collect();
    let mut content = json!({"msgtype": msgtype, "body": plain});
    if runs.iter().any(|r| r.style != Default::default()) {
        content["format"] = json!("org.matrix.custom.html");
        content["formatted_body"] = json!(runs_to_html(&runs));
    }
    content
}

/// The IRC bridge.
pub struct IrcBridge {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for IrcBridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

/// The bridge's state, shared with the network tasks.
pub struct Inner {
    ctx: Context<IrcConfig>,
    networks: BTreeMap<String, Arc<Network>>,
    /// Displaynames of Matrix users, from member events (relay prefixes).
    names: Mutex<HashMap<String, String>>,
    /// Recent messages per room (event id, sender's name, text) for reply quotes, reactions
    /// and redactions; scoped per room, so nothing of one room reaches another.
    recent: Mutex<HashMap<String, std::collections::VecDeque<Recent>>>,
    /// `trestle_irc_puppets{network}`: puppet connections.
    puppet_gauge: trestle::metrics::prometheus::IntGaugeVec,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IrcBridge").field("networks", &self.networks.keys()).finish()
    }
}

fn bridge_err(e: impl std::fmt::Display) -> BridgeError {
    BridgeError::Retryable(e.to_string())
}

/// `2026-01-02T03:04:05.678Z` → ms since the epoch (server-time).
pub fn parse_server_time(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || !s.ends_with('Z') {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (n(0..4)?, n(5..7)?, n(8..10)?);
    let (hh, mm, ss) = (n(11..13)?, n(14..16)?, n(17..19)?);
    let ms = if b.get(19) == Some(&b'.') {
        s.get(20..23).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0)
    } else {
        0
    };
    // Days from civil (proleptic Gregorian).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1000) + ms).ok()
}

/// The nick a Matrix user's messages show under with `RELAYMSG`: their displayname kept to
/// the characters nicks may hold (letters, digits, `-_[]\\^{}|` and backquote; a leading digit
/// or `-` gets an `m` before it), cut to fit, then the server's first separator (`/` when it
/// names none) and `m`. The separator is not allowed in real nicks, so this one can never be
/// an IRC user's.
pub fn relay_nick(displayname: &str, separators: &str, nicklen: usize) -> String {
    let sep = separators.chars().find(|c| !c.is_whitespace() && *c != ',').unwrap_or('/');
    let mut base: String = displayname
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-_[]\\^{}|`".contains(*c))
        .collect();
    if base.is_empty() {
        base = "matrix".to_owned();
    }
    if base.starts_with(|c: char| c.is_ascii_digit() || c == '-') {
        base.insert(0, 'm');
    }
    let room = nicklen.max(4) - 1 - sep.len_utf8();
    base.truncate(room);
    format!("{base}{sep}m")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Network {
    /// Records mode changes of a member; returns the power level their modes now give.
    fn set_modes(&self, channel: &str, nick: &str, changes: &[(bool, char)]) -> i64 {
        let mut all = lock(&self.member_modes);
        let modes =
            all.entry(self.portal_id(channel)).or_default().entry(self.fold(nick)).or_default();
        for (set, m) in changes {
            if *set {
                modes.insert(*m);
            } else {
                modes.remove(m);
            }
        }
        modes
            .iter()
            .filter_map(|m| self.config.mode_power_levels.get(m))
            .copied()
            .max()
            .unwrap_or(0)
    }

    /// Whether `nick` holds one of the channel `modes` (`o`, `h`, …) in `channel`, as far as
    /// the modes seen tell.
    fn has_mode(&self, channel: &str, nick: &str, modes: &[char]) -> bool {
        lock(&self.member_modes)
            .get(&self.portal_id(channel))
            .and_then(|members| members.get(&self.fold(nick)))
            .is_some_and(|held| held.iter().any(|m| modes.contains(m)))
    }

    /// Forgets a member's modes (in one channel, or everywhere).
    fn forget_modes(
        &self,
        channel: Option<&str>,
        nick: &str,
    ) -> Vec<(String, std::collections::BTreeSet<char>)> {
        let folded = self.fold(nick);
        let mut all = lock(&self.member_modes);
        let mut removed = Vec::new();
        for (portal, members) in all.iter_mut() {
            if channel.is_none_or(|c| *portal == self.portal_id(c))
                && let Some(m) = members.remove(&folded)
            {
                removed.push((portal.clone(), m));
            }
        }
        removed
    }

    /// Records a QUIT (for the wave heuristic).
    fn record_quit(&self, at: std::time::Instant) {
        let mut q = lock(&self.recent_quits);
        q.push_back(at);
        while q.len() > 256 {
            q.pop_front();
        }
    }

    /// Whether the quit at `at` was part of a wave: enough quits within [`SPLIT_WINDOW`].
    fn in_quit_wave(&self, at: std::time::Instant) -> bool {
        let q = lock(&self.recent_quits);
        let near = q
            .iter()
            .filter(|t| {
                let d = if **t > at { **t - at } else { at - **t };
                d <= SPLIT_WINDOW
            })
            .count();
        near >= SPLIT_QUITS
    }

    fn fold(&self, s: &str) -> String {
        self.bot.isupport().casemapping.fold(s)
    }

    fn portal_id(&self, channel: &str) -> String {
        format!("{}/{}", self.id, self.fold(channel))
    }

    fn ghost_user_id(&self, nick: &str, domain: &str) -> String {
        let lp = self
            .user_template
            .render(&[("network", &self.id), ("nick", &escape_localpart(&self.fold(nick)))])
            .unwrap_or_default();
        format!("@{lp}:{domain}")
    }

    /// The nick behind one of this network's ghost user ids.
    fn nick_of_ghost(&self, user_id: &str) -> Option<String> {
        let local = user_id.strip_prefix('@')?.rsplit_once(':')?.0;
        let vars = self.user_template.extract(local, &[("network", &self.id)])?;
        let (_, nick) = vars.into_iter().find(|(k, _)| k == "nick")?;
        trestle::util::escape::unescape_localpart(&nick).ok()
    }

    fn puppets_all(&self) -> Vec<Arc<puppet::Puppet>> {
        self.puppets.all()
    }

    fn is_channel(&self, name: &str) -> bool {
        self.bot.isupport().is_channel(name) || name.starts_with(['#', '&'])
    }
}

fn valid_channel(name: &str) -> bool {
    name.len() > 1
        && name.len() <= 200
        && name.starts_with(['#', '&', '+', '!'])
        && !name.contains([' ', ',', '\x07', '\r', '\n', '\0'])
}

impl Inner {
    fn network_of(&self, portal: &Portal) -> Option<(Arc<Network>, String)> {
        match self.target_of(portal)? {
            (net, Target::Channel(chan)) => Some((net, chan)),
            _ => None,
        }
    }

    fn target_of(&self, portal: &Portal) -> Option<(Arc<Network>, Target)> {
        let m = &portal.metadata;
        let net = Arc::clone(self.networks.get(m.get("network")?.as_str()?)?);
        if let Some(chan) = m.get("channel").and_then(Value::as_str) {
            return Some((net, Target::Channel(chan.to_owned())));
        }
        let nick = m.get("nick")?.as_str()?.to_owned();
        let user = m.get("user")?.as_str()?.to_owned();
        Some((net, Target::Direct { user, nick }))
    }

    async fn displayname(&self, user_id: &str) -> String {
        if let Some(n) =
            self.names.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(user_id)
        {
            return n.clone();
        }
        let name = self
            .ctx
            .bot()
            .get_profile(user_id)
            .await
            .ok()
            .and_then(|p| p.displayname)
            .unwrap_or_else(|| {
                user_id.trim_start_matches('@').split(':').next().unwrap_or(user_id).to_owned()
            });
        self.remember_name(user_id, &name);
        name
    }

    fn remember_name(&self, user_id: &str, name: &str) {
        let mut names = self.names.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if names.len() > 10_000 {
            names.clear();
        }
        names.insert(user_id.to_owned(), one_line(name));
    }

    /// Creates (or finds) the portal for a channel and has the bot join it (with `key`, for a
    /// keyed channel: then also when the portal existed, as the bot may have failed to join).
    async fn open_portal(
        &self,
        net: &Network,
        channel: &str,
        alias: Option<&str>,
        key: Option<&str>,
    ) -> Result<(Portal, bool), BridgeError> {
        let spec = self.portal_spec(net, channel);
        let (portal, created) = self.ctx.ensure_portal(&spec, alias).await?;
        if created || key.is_some() {
            net.bot.join(channel, key).await.map_err(bridge_err)?;
        }
        if key.is_some() {
            self.remember_channel_key(net, channel, key).await?;
        }
        Ok((portal, created))
    }

    /// A channel's key (from `!join #chan key`, `MODE +k` or the channel's modes): the bot
    /// rejoins with it after a reconnect, puppets join with it, and it is kept in the portal's
    /// metadata for the bot's join at the next start.
    async fn remember_channel_key(
        &self,
        net: &Network,
        channel: &str,
        key: Option<&str>,
    ) -> Result<(), BridgeError> {
        net.bot.remember_key(channel, key);
        let Some(mut portal) = self.ctx.store().portal_by_remote(&net.portal_id(channel)).await?
        else {
            return Ok(());
        };
        if portal.metadata.get("key").and_then(Value::as_str) == key {
            return Ok(());
        }
        match key {
            Some(k) => portal.metadata["key"] = json!(k),
            None => {
                if let Some(m) = portal.metadata.as_object_mut() {
                    m.remove("key");
                }
            }
        }
        self.ctx.store().upsert_portal(&portal).await?;
        Ok(())
    }

    fn portal_spec(&self, net: &Network, channel: &str) -> PortalSpec {
        let mut spec = PortalSpec::new(net.portal_id(channel), channel);
        spec.name = Some(channel.to_owned());
        spec.public = true;
        spec.channel_name = Some(channel.to_owned());
        spec.network = Some((net.id.clone(), net.config.name.clone()));
        spec.metadata = json!({"network": net.id, "channel": channel});
        // Bridge admins named in `permissions` moderate every portal.
        spec.power_levels = self
            .ctx
            .config()
            .permissions
            .iter()
            .filter(|(who, level)| who.starts_with('@') && **level == PermissionLevel::Admin)
            .map(|(who, _)| (who.clone(), 100))
            .collect();
        spec
    }

    fn alias_for(&self, net: &Network, channel: &str) -> Option<String> {
        let lp = net
            .alias_template
            .render(&[("network", &net.id), ("channel", &net.fold(channel))])
            .ok()?;
        Some(format!("#{lp}:{}", self.ctx.domain()))
    }

    /// Text for IRC from a Matrix message (formatting converted, media as links).
    fn irc_text(&self, msg: &Message) -> String {
        if let Some(media) = &msg.media {
            let link = self
                .ctx
                .media_link(&media.url, &media.filename)
                .unwrap_or_else(|_| media.url.clone());
            return format!("{} {link}", msg.body);
        }
        match &msg.html {
            Some(h) => runs_to_irc(&html_to_runs(h)),
            None => msg.body.clone(),
        }
    }

    /// The IRC lines of a Matrix message: NUL and CR dropped, one line per LF (the connection
    /// refuses any line that still holds one, so nothing can inject either way). Beyond
    /// `max_lines` lines the whole text is uploaded to the homeserver and the last line is a
    /// signed link to it (the media proxy), so nothing is lost; without a `media_proxy`
    /// public URL the rest is cut with a note saying how much.
    async fn irc_lines(&self, net: &Network, msg: &Message) -> Vec<String> {
        let text = self.irc_text(msg).replace(['\0', '\r'], "");
        let mut lines: Vec<String> =
            text.lines().filter(|l| !l.trim().is_empty()).map(str::to_owned).collect();
        let max = net.config.max_lines.max(1);
        if lines.len() > max {
            let total = lines.len();
            lines.truncate(max.saturating_sub(1).max(1));
            let link = match self.upload_text(&msg.body).await {
                Ok(link) => format!("(full message, {total} lines: {link})"),
                Err(e) => {
                    tracing::warn!(network = net.id, error = %e, "long message not uploaded; cut");
                    format!("(… {} more lines not shown)", total - lines.len())
                }
            };
            lines.push(link);
        }
        lines
    }

    /// Uploads text as a file and returns the media proxy's link to it.
    async fn upload_text(&self, text: &str) -> Result<String, String> {
        let mxc = self
            .ctx
            .bot()
            .upload_media(
                text.as_bytes().to_vec(),
                "text/plain; charset=utf-8",
                Some("message.txt"),
            )
            .await
            .map_err(|e| e.to_string())?;
        self.ctx.media_link(&mxc, "message.txt").map_err(|e| e.to_string())
    }

    /// Remembers a bridged message of a room (for reply quotes, reactions, redactions).
    fn remember_message(&self, room_id: &str, event_id: &str, name: &str, text: &str) {
        let mut recent = lock(&self.recent);
        if recent.len() > 10_000 && !recent.contains_key(room_id) {
            recent.clear();
        }
        let q = recent.entry(room_id.to_owned()).or_default();
        if q.len() >= 256 {
            q.pop_front();
        }
        q.push_back((event_id.to_owned(), name.to_owned(), text.to_owned()));
    }

    /// A message of this room seen recently: (sender's name, a short quote).
    fn recall(&self, room_id: &str, event_id: &str) -> Option<(String, String)> {
        let recent = lock(&self.recent);
        let (_, name, text) = recent.get(room_id)?.iter().rev().find(|(e, _, _)| e == event_id)?;
        let first = text.lines().next().unwrap_or_default();
        let mut quote: String = first.chars().take(40).collect();
        if quote.len() < first.len() || text.lines().nth(1).is_some() {
            quote.push('…');
        }
        Some((name.clone(), quote))
    }

    /// How `sender`'s messages reach `target`, or `None` where they may not.
    fn route(&self, net: &Network, target: &Target, sender: &str) -> Option<Route> {
        if net.excluded.iter().any(|r| r.is_match(sender)) {
            return None;
        }
        let level = self.ctx.permission(sender);
        match target {
            Target::Channel(_)
                if net.config.mode == BridgeMode::Puppets && level >= PermissionLevel::User =>
            {
                Some(Route::Puppet)
            }
            Target::Channel(_) if level >= PermissionLevel::Relay => Some(Route::Relay),
            Target::Channel(_) => None,
            Target::Direct { user, .. } => {
                (sender == user && level >= PermissionLevel::User).then_some(Route::Puppet)
            }
        }
    }

    /// A Matrix message (or edit) in a portal, to IRC: through the sender's puppet where the
    /// network runs puppets and the sender may have one, else relayed by the bot. A reply to a
    /// message with a known IRC msgid carries `+draft/reply`; otherwise it carries a short
    /// quote of what it answers: `<alice> "the quote…" <- the reply`. With `echo-message`,
    /// the msgids of the lines sent are learnt from their echoes, and mapped to the message
    /// (for an edit, `edit_of`, to the message edited).
    async fn matrix_message(
        self: &Arc<Self>,
        room: &RoomContext,
        event: &MatrixEvent,
        msg: &Message,
        edit_of: Option<&str>,
    ) -> Result<(), BridgeError> {
        let edit = edit_of.is_some();
        let Some((net, target)) = room.portal.as_ref().and_then(|p| self.target_of(p)) else {
            return Ok(());
        };
        let name = match net.puppets.get(&event.sender) {
            Some(p) => p.conn.nick(),
            None => self.displayname(&event.sender).await,
        };
        self.remember_message(&event.room_id, &event.event_id, &name, &msg.body);
        let mut out = Outgoing {
            tags: Vec::new(),
            echo: Some(EchoRef {
                room_id: event.room_id.clone(),
                event_id: edit_of.unwrap_or(&event.event_id).to_owned(),
                sender: event.sender.clone(),
                part: 0,
            }),
        };
        let reply_to = msg.reply_to.as_deref().filter(|_| !edit);
        let reply_msgid = match reply_to {
            Some(r) => self.msgid_of_event(&net, &event.room_id, r).await?,
            None => None,
        };
        let quoted;
        let msg = match (reply_msgid, reply_to.and_then(|r| self.recall(&event.room_id, r))) {
            (Some(msgid), _) => {
                out.tags.push((ircv3::REPLY_TAG.to_owned(), Some(msgid)));
                msg
            }
            (None, Some((who, quote))) => {
                let prefix = format!("<{who}> \"{quote}\" <- ");
                let esc =
                    |t: &str| t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
                let mut m = msg.clone();
                m.body = format!("{prefix}{}", msg.body);
                m.html = msg.html.as_ref().map(|h| format!("{}{h}", esc(&prefix)));
                quoted = m;
                &quoted
            }
            (None, None) => msg,
        };
        let dest = target.name().to_owned();
        match self.route(&net, &target, &event.sender) {
            Some(Route::Puppet) => self.puppet_say(&net, &dest, event, msg, edit, &mut out).await,
            Some(Route::Relay) => self.relay(&net, &dest, &event.sender, msg, edit, &mut out).await,
            None => Ok(()),
        }
    }

    async fn relay(
        &self,
        net: &Network,
        channel: &str,
        sender: &str,
        msg: &Message,
        edit: bool,
        out: &mut Outgoing,
    ) -> Result<(), BridgeError> {
        let name = self.displayname(sender).await;
        let lines = self.irc_lines(net, msg).await;
        // RELAYMSG where the server offers it and the bot may use it (a channel operator):
        // the message shows as from a nick of the sender's own, without a prefix. Notices
        // have no RELAYMSG form.
        if msg.msgtype != MessageType::Notice
            && let Some(separators) = net.bot.cap_value(crate::conn::RELAYMSG_CAP)
            && net.has_mode(channel, &net.bot.nick(), &['q', 'a', 'o'])
        {
            let nicklen = net.bot.isupport().nicklen.unwrap_or(30);
            let nick = relay_nick(&name, &separators, nicklen);
            let budget = net.bot.text_budget(channel).saturating_sub(nick.len() + 9).max(16);
            for line in lines {
                let line = if edit { format!("* {line}") } else { line };
                for chunk in split_text(&line, Budget::bytes(budget)) {
                    let text = match msg.msgtype {
                        MessageType::Emote => format!("\u{1}ACTION {chunk}\u{1}"),
                        _ => chunk,
                    };
                    net.bot
                        .send_line_with(IrcLine::new("RELAYMSG", &[channel, &nick, &text]), out)
                        .await
                        .map_err(bridge_err)?;
                }
            }
            return Ok(());
        }
        let command = if msg.msgtype == MessageType::Notice { "NOTICE" } else { "PRIVMSG" };
        let wrap = |chunk: &str| match msg.msgtype {
            MessageType::Emote => format!("* {name} {chunk}"),
            _ => net
                .config
                .relay_template
                .replace("{displayname}", &name)
                .replace("{message}", chunk),
        };
        // Every chunk of a long line carries the sender's name: split within what the prefix
        // leaves of the line budget.
        let overhead = wrap("").len();
        let budget = net.bot.text_budget(channel).saturating_sub(overhead).max(16);
        for line in lines {
            let line = if edit { format!("* {line}") } else { line };
            for chunk in split_text(&line, Budget::bytes(budget)) {
                net.bot
                    .send_line_with(IrcLine::new(command, &[channel, &wrap(&chunk)]), out)
                    .await
                    .map_err(bridge_err)?;
            }
        }
        Ok(())
    }

    /// Handles one line from a network.
    async fn irc_line(
        self: &Arc<Self>,
        net: &Arc<Network>,
        line: IrcLine,
    ) -> Result<(), BridgeError> {
        let domain = self.ctx.domain().to_owned();
        let me = net.bot.nick();
        let cm = net.bot.isupport().casemapping;
        let from_me = line.nick().is_some_and(|n| cm.eq(n, &me));
        // Every prefix tells a nick's `user@host` (puppets' too), as other users see it.
        net.note_host(&line);
        match line.command.as_str() {
            "NICK" => net.move_host(line.nick().unwrap_or_default(), Some(line.param(0))),
            "QUIT" => net.move_host(line.nick().unwrap_or_default(), None),
            "CHGHOST" if !line.param(1).is_empty() => {
                net.set_host(
                    line.nick().unwrap_or_default(),
                    &format!("{}@{}", line.param(0), line.param(1)),
                );
            }
            _ => {}
        }
        // What our puppets do on IRC is what Matrix users did: never bridged back. The msgid of
        // a puppet's channel message is learnt here, from the bot's copy: it comes before any
        // IRC reply to it (one connection, in order), which the puppet's echo would not.
        if line.command != "KICK"
            && let Some(nick) = line.nick()
            && net.is_puppet_nick(nick)
        {
            let sent = net
                .puppets
                .user_of(&net.fold(nick))
                .and_then(|user| net.puppets.get(&user))
                .and_then(|p| p.conn.claim_echo(&line));
            if let Some(sent) = sent {
                self.echoed(&sent, &line).await;
            }
            return Ok(());
        }
        match line.command.as_str() {
            "PRIVMSG" | "NOTICE" => {
                let (target, text) = (line.param(0), line.param(1));
                let Some(nick) = line.nick() else { return Ok(()) };
                if from_me || !net.is_channel(target) || net.bot.relayed_by_us(&line) {
                    return Ok(());
                }
                let Some(portal) =
                    self.ctx.store().portal_by_remote(&net.portal_id(target)).await?
                else {
                    return Ok(());
                };
                let Some((msgtype, text)) = classify_text(&line.command, text) else {
                    return Ok(());
                };
                let content = self.with_mentions(net, content_from_irc(msgtype, text), text);
                let content = self.with_irc_reply(&portal.room_id, &line, content).await?;
                let ghost = net.ghost_user_id(nick, &domain);
                self.ensure_nick_ghost(net, &ghost, nick).await?;
                let cause = cause_of(net, &line);
                let ts = line.tag("time").and_then(parse_server_time);
                let txn = self.ctx.txn_id_for(&cause, 0);
                let plain = content["body"].as_str().unwrap_or_default().to_owned();
                let event_id = self
                    .ctx
                    .send_as(&ghost, &portal.room_id, "m.room.message", content, &txn, ts)
                    .await?;
                self.remember_message(&portal.room_id, &event_id, nick, &plain);
                self.map_irc_message(&portal.room_id, &line, &event_id, &ghost, 0).await?;
            }
            // A reaction (client tags), or a message deleted on IRC (draft message redaction).
            "TAGMSG" | "REDACT" => {
                let Some(nick) = line.nick() else { return Ok(()) };
                if from_me || !net.is_channel(line.param(0)) {
                    return Ok(());
                }
                let Some(portal) =
                    self.ctx.store().portal_by_remote(&net.portal_id(line.param(0))).await?
                else {
                    return Ok(());
                };
                let ghost = net.ghost_user_id(nick, &domain);
                if line.command == "REDACT" {
                    self.irc_redaction(&ghost, nick, &portal.room_id, &line).await?;
                } else {
                    self.ensure_nick_ghost(net, &ghost, nick).await?;
                    self.irc_reaction(net, &portal.room_id, &ghost, &line).await?;
                }
            }
            "JOIN" => {
                let Some(nick) = line.nick() else { return Ok(()) };
                if from_me {
                    // Who is there, with their hosts (for bans), and the channel's modes
                    // (its key).
                    let chan = line.param(0);
                    net.bot.send(IrcLine::new("WHO", &[chan])).await.map_err(bridge_err)?;
                    net.bot.send(IrcLine::new("MODE", &[chan])).await.map_err(bridge_err)?;
                    return Ok(());
                }
                // Back from a netsplit: their ghost never left.
                if lock(&net.split).remove(&net.fold(nick)).is_some() {
                    tracing::debug!(network = net.id, nick, "back from the netsplit");
                }
                if let Some(portal) =
                    self.ctx.store().portal_by_remote(&net.portal_id(line.param(0))).await?
                {
                    self.ghost_join(net, nick, &portal.room_id).await?;
                }
            }
            "PART" | "KICK" => {
                let (chan, nick) = if line.command == "KICK" {
                    (line.param(0), line.param(1).to_owned())
                } else {
                    (line.param(0), line.nick().unwrap_or_default().to_owned())
                };
                if cm.eq(&nick, &me) || net.is_puppet_nick(&nick) {
                    return Ok(());
                }
                net.forget_modes(Some(chan), &nick);
                if let Some(portal) =
                    self.ctx.store().portal_by_remote(&net.portal_id(chan)).await?
                {
                    let ghost = net.ghost_user_id(&nick, &domain);
                    // Banned in the room already (an IRC ban mirrored): nothing left to do.
                    if self.ctx.store().membership(&portal.room_id, &ghost).await?.as_deref()
                        == Some("ban")
                    {
                        return Ok(());
                    }
                    if line.command == "KICK" {
                        // The bot kicks the ghost, saying who kicked on IRC and why.
                        let by = line.nick().unwrap_or("the server");
                        let reason = match line.param(2) {
                            "" => format!("kicked on IRC by {by}"),
                            r => {
                                format!("kicked on IRC by {by}: {}", crate::format::strip_codes(r))
                            }
                        };
                        if let Err(e) =
                            self.ctx.bot().kick(&portal.room_id, &ghost, Some(&reason)).await
                        {
                            tracing::warn!(error = %e, ghost, "could not kick; the ghost leaves instead");
                            let _ = self.ctx.intent(&ghost).leave(&portal.room_id).await;
                        }
                    } else {
                        let _ = self.ctx.intent(&ghost).leave(&portal.room_id).await;
                    }
                }
            }
            "MODE" if net.is_channel(line.param(0)) => {
                let chan = line.param(0);
                let isupport = net.bot.isupport();
                let changes =
                    isupport.mode_changes(line.param(1), &line.params[2.min(line.params.len())..]);
                let Some(portal) = self.ctx.store().portal_by_remote(&net.portal_id(chan)).await?
                else {
                    return Ok(());
                };
                for (set, mode, arg) in changes {
                    match (mode, arg) {
                        (m, Some(nick)) if isupport.is_prefix_mode(m) => {
                            let level = net.set_modes(chan, &nick, &[(set, m)]);
                            if !cm.eq(&nick, &me) && !net.is_puppet_nick(&nick) {
                                self.ghost_power(net, &nick, &portal.room_id, level).await;
                            }
                        }
                        ('k', key) => {
                            let key = if set { key.as_deref() } else { None };
                            self.remember_channel_key(net, chan, key).await?;
                        }
                        // Bans the bot sets are a Matrix moderator's, mirrored already.
                        ('b', Some(mask)) if !from_me => {
                            let by = line.nick().unwrap_or("the server");
                            if set {
                                self.irc_ban(net, chan, &portal, by, &mask).await?;
                            } else {
                                self.irc_unban(net, chan, &portal, by, &mask).await?;
                            }
                        }
                        _ => {}
                    }
                }
            }
            "QUIT" | "NICK" => {
                let Some(nick) = line.nick() else { return Ok(()) };
                if from_me {
                    return Ok(());
                }
                let old = net.ghost_user_id(nick, &domain);
                let moved = net.forget_modes(None, nick);
                // Every QUIT waits out a short window (was it part of a wave?); netsplit quits
                // wait `netsplit_debounce_secs`.
                let split = line.command == "QUIT";
                let mut held = Vec::new();
                for portal in self.ctx.store().portals().await? {
                    if portal.metadata.get("network").and_then(Value::as_str) != Some(&net.id) {
                        continue;
                    }
                    if self.ctx.store().membership(&portal.room_id, &old).await?.as_deref()
                        != Some("join")
                    {
                        continue;
                    }
                    if split {
                        held.push(portal.room_id.clone());
                        continue;
                    }
                    let _ = self.ctx.intent(&old).leave(&portal.room_id).await;
                    if line.command == "NICK" {
                        let new = line.param(0);
                        self.ghost_join(net, new, &portal.room_id).await?;
                        let chan = portal.metadata.get("channel").and_then(Value::as_str);
                        if let Some((_, modes)) = moved.iter().find(|(p, _)| *p == portal.remote_id)
                            && let Some(chan) = chan
                        {
                            let changes: Vec<(bool, char)> =
                                modes.iter().map(|m| (true, *m)).collect();
                            let level = net.set_modes(chan, new, &changes);
                            self.ghost_power(net, new, &portal.room_id, level).await;
                        }
                    }
                }
                if !held.is_empty() {
                    self.hold_split(net, nick, line.param(0), held);
                }
            }
            // The channel's modes, asked for when the bot joins: its key, if any.
            "324" => {
                let changes = net
                    .bot
                    .isupport()
                    .mode_changes(line.param(2), &line.params[3.min(line.params.len())..]);
                for (set, mode, key) in changes {
                    if set && mode == 'k' && key.as_deref().is_some_and(|k| k != "*") {
                        self.remember_channel_key(net, line.param(1), key.as_deref()).await?;
                    }
                }
            }
            // WHO replies: hosts of the members of a channel the bot joined.
            "352" => net.set_host(line.param(5), &format!("{}@{}", line.param(2), line.param(3))),
            // WHOIS replies, for `!whois`.
            "311" | "312" | "319" | "330" | "301" | "317" | "318" | "401" => {
                let nick = line.param(1);
                let mut waiters = lock(&net.whois);
                let Some((lines, tx)) = waiters.get_mut(&net.fold(nick)) else { return Ok(()) };
                let text = match line.command.as_str() {
                    "311" => Some(format!(
                        "{nick} is {}@{} ({})",
                        line.param(2),
                        line.param(3),
                        line.param(5)
                    )),
                    "312" => Some(format!("on server {} ({})", line.param(2), line.param(3))),
                    "319" => Some(format!("in {}", line.param(2))),
                    "330" => Some(format!("logged in as {}", line.param(2))),
                    "301" => Some(format!("away: {}", line.param(2))),
                    "317" => Some(format!("idle {} s", line.param(2))),
                    _ => None,
                };
                lines.extend(text.map(|t| crate::format::strip_codes(&t)));
                if matches!(line.command.as_str(), "318" | "401")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(std::mem::take(lines));
                }
            }
            "TOPIC" | "332" => {
                let (chan, topic) = if line.command == "332" {
                    (line.param(1), line.param(2))
                } else {
                    (line.param(0), line.param(1))
                };
                if line.command == "TOPIC" && from_me {
                    return Ok(());
                }
                if let Some(portal) =
                    self.ctx.store().portal_by_remote(&net.portal_id(chan)).await?
                {
                    let topic = crate::format::strip_codes(topic);
                    self.ctx
                        .bot()
                        .send_state(
                            &portal.room_id,
                            "m.room.topic",
                            "",
                            json!({"topic": topic}),
                            None,
                        )
                        .await?;
                }
            }
            // NAMES: members and their modes (those with modes only, and the bot's own, when
            // membership is synced lazily).
            "353" => {
                let chan = line.param(2);
                let all = net.config.membership_sync == MembershipSync::All;
                if let Some(portal) =
                    self.ctx.store().portal_by_remote(&net.portal_id(chan)).await?
                {
                    let isupport = net.bot.isupport();
                    for entry in line.param(3).split(' ').filter(|e| !e.is_empty()) {
                        let (modes, nick) = isupport.split_prefixes(entry);
                        if !all && modes.is_empty() {
                            continue;
                        }
                        let changes: Vec<(bool, char)> = modes.iter().map(|m| (true, *m)).collect();
                        let level = net.set_modes(chan, nick, &changes);
                        if all && !cm.eq(nick, &me) && !net.is_puppet_nick(nick) {
                            self.ghost_join(net, nick, &portal.room_id).await?;
                            if level > 0 {
                                self.ghost_power(net, nick, &portal.room_id, level).await;
                            }
                        }
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Puppet nicks named in IRC text become Matrix mentions; `nick: …` at the start (how IRC
    /// addresses someone) becomes a pill.
    fn with_mentions(&self, net: &Network, mut content: Value, text: &str) -> Value {
        let nick_char = |c: char| c.is_ascii_alphanumeric() || "[]\\`_^{|}-".contains(c);
        let mut users: Vec<String> = Vec::new();
        for word in text.split(|c: char| !nick_char(c)).filter(|w| !w.is_empty()) {
            if let Some(u) = net.puppets.user_of(&net.fold(word))
                && !users.contains(&u)
            {
                users.push(u);
            }
        }
        if users.is_empty() {
            return content;
        }
        content["m.mentions"] = json!({"user_ids": users});
        let plain = content["body"].as_str().unwrap_or_default().to_owned();
        let lead: String = plain.chars().take_while(|c| nick_char(*c)).collect();
        let rest = &plain[lead.len()..];
        if !lead.is_empty()
            && (rest.starts_with(": ") || rest.starts_with(", "))
            && content.get("formatted_body").is_none()
            && let Some(user) = net.puppets.user_of(&net.fold(&lead))
        {
            let esc = |t: &str| t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
            content["format"] = json!("org.matrix.custom.html");
            content["formatted_body"] = json!(format!(
                "<a href=\"https://matrix.to/#/{user}\">{}</a>{}",
                esc(&lead),
                esc(rest)
            ));
        }
        content
    }

    /// Gives a ghost the power level its channel modes map to (best effort: logged).
    async fn ghost_power(&self, net: &Network, nick: &str, room_id: &str, level: i64) {
        let ghost = net.ghost_user_id(nick, self.ctx.domain());
        let current = self
            .ctx
            .store()
            .power_levels(room_id)
            .await
            .ok()
            .flatten()
            .and_then(|pl| pl["users"][&ghost].as_i64())
            .unwrap_or(0);
        if current == level {
            return;
        }
        if let Err(e) = self.ctx.bot().set_user_power_level(room_id, &ghost, level).await {
            tracing::warn!(network = net.id, ghost, level, error = %e, "could not set a power level");
        }
    }

    /// A netsplit took `nick`: its ghost stays in `rooms` for `netsplit_debounce_secs`; if
    /// the nick has not come back by then, it leaves them. A split and its rejoin wave cost
    /// the rooms nothing.
    fn hold_split(
        self: &Arc<Self>,
        net: &Arc<Network>,
        nick: &str,
        reason: &str,
        rooms: Vec<String>,
    ) {
        let at = std::time::Instant::now();
        net.record_quit(at);
        let named_split = is_split_reason(reason);
        let folded = net.fold(nick);
        lock(&net.split).insert(folded.clone(), (at, rooms));
        let (b, net, nick) = (Arc::clone(self), Arc::clone(net), nick.to_owned());
        tokio::spawn(async move {
            let debounce = Duration::from_secs(net.config.netsplit_debounce_secs);
            if named_split {
                tokio::time::sleep(debounce).await;
            } else {
                tokio::time::sleep(SPLIT_WINDOW).await;
                if net.in_quit_wave(at) {
                    tracing::info!(network = net.id, nick, "quit wave: treated as a netsplit");
                    tokio::time::sleep(debounce.saturating_sub(SPLIT_WINDOW)).await;
                }
            }
            let rooms = {
                let mut split = lock(&net.split);
                match split.get(&folded) {
                    Some((t, _)) if *t == at => split.remove(&folded).map(|(_, r)| r),
                    _ => None,
                }
            };
            let ghost = net.ghost_user_id(&nick, b.ctx.domain());
            for room in rooms.unwrap_or_default() {
                let _ = b.ctx.intent(&ghost).leave(&room).await;
            }
        });
    }

    /// Registers `ghost`, the ghost of `nick`, with the nick as its displayname.
    async fn ensure_nick_ghost(
        &self,
        net: &Network,
        ghost: &str,
        nick: &str,
    ) -> Result<(), BridgeError> {
        let profile = GhostProfile {
            remote_id: format!("{}/{}", net.id, net.fold(nick)),
            displayname: Some(nick.to_owned()),
            avatar_url: None,
        };
        self.ctx.ensure_ghost(ghost, &profile).await?;
        Ok(())
    }

    async fn ghost_join(
        &self,
        net: &Network,
        nick: &str,
        room_id: &str,
    ) -> Result<(), BridgeError> {
        let ghost = net.ghost_user_id(nick, self.ctx.domain());
        if self.ctx.store().membership(room_id, &ghost).await?.as_deref() == Some("ban") {
            tracing::debug!(
                network = net.id,
                nick,
                room_id,
                "ghost banned from the room; not joined"
            );
            return Ok(());
        }
        self.ensure_nick_ghost(net, &ghost, nick).await?;
        self.ctx.intent(&ghost).ensure_joined(room_id).await?;
        Ok(())
    }
}

/// What caused a Matrix event sent for an IRC line (its transaction id derives from it): the
/// line's `msgid` where the server tags one, so a line seen twice is sent once.
fn cause_of(net: &Network, line: &IrcLine) -> String {
    match line.tag("msgid") {
        Some(id) => format!("irc:{}:{id}", net.id),
        None => format!("irc:{}:{}", net.id, rand::random::<u128>()),
    }
}

/// Receives one network's events; lines are handled in order, retried a few times on errors.
async fn network_loop(b: Arc<Inner>, net: Arc<Network>, mut events: mpsc::Receiver<ConnEvent>) {
    while let Some(ev) = events.recv().await {
        match ev {
            ConnEvent::Registered { nick } => {
                tracing::info!(network = net.id, nick, "bot connected")
            }
            ConnEvent::Disconnected { reason } => {
                tracing::warn!(network = net.id, %reason, "bot disconnected; reconnecting")
            }
            ConnEvent::Echo { sent, line } => b.echoed(&sent, &line).await,
            ConnEvent::Line(line) => {
                let handled = retry_remote(|| b.irc_line(&net, line.clone())).await;
                if let Err(e) = handled {
                    tracing::error!(network = net.id, error = %e, command = line.command, "could not bridge an IRC line");
                }
            }
        }
    }
}

#[async_trait]
impl Bridge for IrcBridge {
    type Config = IrcConfig;

    fn info() -> BridgeInfo {
        BridgeInfo {
            name: "irc",
            network_name: "IRC",
            default_port: 9898,
            protocols: &["irc"],
            version: env!("CARGO_PKG_VERSION"),
        }
    }

    fn namespaces(config: &Config<IrcConfig>) -> Namespaces {
        let domain = &config.homeserver.domain;
        let mut ns = Namespaces::default();
        for (id, n) in &config.bridge.networks {
            for (tpl, sigil, list) in
                [(&n.user_template, '@', &mut ns.users), (&n.alias_template, '#', &mut ns.aliases)]
            {
                let allowed = ["network", "nick", "channel"];
                if let Ok(t) = Template::parse(tpl, &allowed) {
                    let re = t.to_regex(&[("network", id)]);
                    let body = re.trim_start_matches('^').trim_end_matches('$');
                    list.push(Namespace {
                        regex: format!(
                            "^{}{body}:{}$",
                            regex::escape(&sigil.to_string()),
                            regex::escape(domain)
                        ),
                        exclusive: true,
                    });
                }
            }
        }
        ns
    }

    async fn start(ctx: Context<IrcConfig>) -> Result<Self, BridgeError> {
        let cfg = ctx.config().bridge.clone();
        let pace = Duration::from_millis(cfg.connect_pace.interval_ms);
        // Before any connection: servers ask identd as soon as they accept one.
        if cfg.identd.enabled {
            let listen = cfg.identd.listen.unwrap_or_else(|| ([0, 0, 0, 0], 113).into());
            let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
                BridgeError::Permanent(format!(
                    "bridge.identd.listen: cannot listen on {listen}: {e} (port 113 needs privileges or a redirect)"
                ))
            })?;
            tracing::info!(%listen, "identd listening");
            tokio::spawn(crate::conn::ident::serve(listener, ctx.shutdown().clone()));
        }
        let mut networks = BTreeMap::new();
        let mut receivers = Vec::new();
        for (id, n) in &cfg.networks {
            let pacer = ConnectPacer::new(cfg.connect_pace.burst, pace, ctx.shutdown().clone());
            let client_cert = match &n.tls_client_cert {
                Some(path) => Some(Arc::new(
                    crate::conn::ClientCert::from_pem_file(path).map_err(BridgeError::Permanent)?,
                )),
                None => None,
            };
            let conn = ConnConfig {
                host: n.host.clone(),
                port: n.port,
                tls: n.tls,
                tls_insecure: n.tls_insecure,
                bind: n.bind_address,
                password: n.password.clone(),
                nick: n.bot_nick.clone(),
                username: "trestle".to_owned(),
                realname: "Trestle Matrix bridge".to_owned(),
                sasl: n.sasl_account.clone().zip(n.sasl_password.clone()),
                client_cert,
                ping_interval: Duration::from_secs(60),
                ping_timeout: Duration::from_secs(120),
                flood_burst: n.flood_burst,
                flood_penalty: Duration::from_millis(n.flood_penalty_ms),
                queue_capacity: 1024,
                channel_echoes: true,
            };
            let (bot, events) =
                IrcConnection::spawn(conn.clone(), Arc::clone(&pacer), ctx.shutdown());
            let allowed = ["network", "nick", "channel"];
            let net = Arc::new(Network {
                id: id.clone(),
                config: n.clone(),
                bot,
                user_template: Template::parse(&n.user_template, &allowed)
                    .map_err(|e| BridgeError::Permanent(e.to_string()))?,
                alias_template: Template::parse(&n.alias_template, &allowed)
                    .map_err(|e| BridgeError::Permanent(e.to_string()))?,
                excluded: n
                    .excluded_users
                    .iter()
                    .filter_map(|r| regex::Regex::new(r).ok())
                    .collect(),
                pacer,
                conn_base: conn,
                ipv6_prefix: n.ipv6_prefix.as_deref().and_then(crate::addr::parse_prefix),
                puppets: puppet::Puppets::default(),
                member_modes: Mutex::default(),
                split: Mutex::default(),
                recent_quits: Mutex::default(),
                whois: Mutex::default(),
                hosts: Mutex::default(),
            });
            receivers.push((Arc::clone(&net), events));
            networks.insert(id.clone(), net);
        }
        // Rejoin every bridged channel (queued until each bot is registered).
        for portal in ctx.store().portals().await? {
            let (Some(net), Some(chan)) = (
                portal
                    .metadata
                    .get("network")
                    .and_then(Value::as_str)
                    .and_then(|n| networks.get(n)),
                portal.metadata.get("channel").and_then(Value::as_str),
            ) else {
                continue;
            };
            let key = portal.metadata.get("key").and_then(Value::as_str);
            net.bot.join(chan, key).await.map_err(bridge_err)?;
        }
        let puppet_gauge = trestle::metrics::prometheus::IntGaugeVec::new(
            trestle::metrics::prometheus::Opts::new(
                "trestle_irc_puppets",
                "Matrix users' own IRC connections, by network",
            ),
            &["network"],
        )
        .map_err(|e| BridgeError::Permanent(e.to_string()))?;
        ctx.metrics()
            .registry()
            .register(Box::new(puppet_gauge.clone()))
            .map_err(|e| BridgeError::Permanent(e.to_string()))?;
        let inner = Arc::new(Inner {
            ctx,
            networks,
            names: Mutex::new(HashMap::new()),
            recent: Mutex::default(),
            puppet_gauge,
        });
        for (net, events) in receivers {
            if net.config.mode == BridgeMode::Puppets {
                let (b, n) = (Arc::clone(&inner), Arc::clone(&net));
                tokio::spawn(async move { b.restore_puppets(&n).await });
                tokio::spawn(puppet::reaper(Arc::clone(&inner), Arc::clone(&net)));
            }
            tokio::spawn(network_loop(Arc::clone(&inner), net, events));
        }
        // Static mappings from the config: linked at every start (a no-op when unchanged), in
        // the background so an unreachable room does not hold the bridge up.
        for (id, n) in &cfg.networks {
            let Some(net) = inner.networks.get(id).cloned() else { continue };
            for (chan, room) in n.static_channels.clone() {
                let b = Arc::clone(&inner);
                let net = Arc::clone(&net);
                tokio::spawn(async move {
                    let linked = b.ctx.store().portal_by_remote(&net.portal_id(&chan)).await;
                    if matches!(&linked, Ok(Some(p)) if p.room_id == room) {
                        return;
                    }
                    match b.link_room(&net, &chan, &room).await {
                        Ok(()) => {
                            tracing::info!(network = net.id, chan, room, "static channel linked")
                        }
                        Err(e) => {
                            tracing::error!(network = net.id, chan, room, error = %e, "bridge.networks.{}.static_channels: {chan} not linked", net.id)
                        }
                    }
                });
            }
        }
        Ok(Self { inner })
    }

    async fn stop(&self) {
        for net in self.inner.networks.values() {
            let quits = net.puppets_all().into_iter().map(|p| async move {
                p.conn.quit("Bridge shutting down").await;
            });
            futures::future::join_all(quits).await;
            net.bot.quit("Bridge shutting down").await;
        }
    }

    fn commands(&self, registry: &mut CommandRegistry<Self>) {
        commands::register(registry);
    }

    async fn query_alias(&self, alias: &str) -> Result<Option<PortalSpec>, BridgeError> {
        let Some(local) = alias.strip_prefix('#').and_then(|a| a.rsplit_once(':')).map(|(l, _)| l)
        else {
            return Ok(None);
        };
        for net in self.inner.networks.values() {
            let Some(vars) = net.alias_template.extract(local, &[("network", &net.id)]) else {
                continue;
            };
            let Some((_, chan)) = vars.into_iter().find(|(k, _)| k == "channel") else { continue };
            if !net.config.dynamic_channels || !valid_channel(&chan) {
                return Ok(None);
            }
            return Ok(Some(self.inner.portal_spec(net, &chan)));
        }
        Ok(None)
    }

    async fn portal_created(&self, portal: &Portal) -> Result<(), BridgeError> {
        if let Some((net, chan)) = self.inner.network_of(portal) {
            net.bot.join(&chan, None).await.map_err(bridge_err)?;
        }
        Ok(())
    }

    async fn query_user(&self, user_id: &str) -> Result<Option<GhostProfile>, BridgeError> {
        let Some(local) =
            user_id.strip_prefix('@').and_then(|a| a.rsplit_once(':')).map(|(l, _)| l)
        else {
            return Ok(None);
        };
        for net in self.inner.networks.values() {
            if let Some(vars) = net.user_template.extract(local, &[("network", &net.id)])
                && let Some((_, nick)) = vars.into_iter().find(|(k, _)| k == "nick")
                && let Ok(nick) = trestle::util::escape::unescape_localpart(&nick)
            {
                return Ok(Some(GhostProfile {
                    remote_id: format!("{}/{nick}", net.id),
                    displayname: Some(nick),
                    avatar_url: None,
                }));
            }
        }
        Ok(None)
    }

    async fn on_message(
        &self,
        room: &RoomContext,
        event: &MatrixEvent,
        msg: &Message,
    ) -> Result<(), BridgeError> {
        self.inner.matrix_message(room, event, msg, None).await
    }

    async fn on_edit(
        &self,
        room: &RoomContext,
        event: &MatrixEvent,
        target: &str,
        new: &Message,
    ) -> Result<(), BridgeError> {
        self.inner.matrix_message(room, event, new, Some(target)).await
    }

    async fn on_reaction(
        &self,
        room: &RoomContext,
        event: &MatrixEvent,
        target: &str,
        key: &str,
    ) -> Result<(), BridgeError> {
        let b = &self.inner;
        // With message tags: a `TAGMSG` with `+draft/react` on the message's msgid, from the
        // connection the reacting user's messages go through.
        if let Some((net, dest)) = room.portal.as_ref().and_then(|p| b.target_of(p))
            && let Some(msgid) = b.msgid_of_event(&net, &event.room_id, target).await?
        {
            let line = ircv3::reaction_line(dest.name(), &msgid, key);
            let conn = match b.route(&net, &dest, &event.sender) {
                Some(Route::Puppet) => b.puppet_for(&net, dest.name(), event).await?.conn.clone(),
                Some(Route::Relay) => net.bot.clone(),
                None => return Ok(()),
            };
            conn.send(line).await.map_err(bridge_err)?;
            return Ok(());
        }
        // Without (ngIRCd and many servers): an action line saying what was reacted to, for
        // messages this bridge saw.
        let Some((who, quote)) = self.inner.recall(&event.room_id, target) else { return Ok(()) };
        let body = format!("reacted with {} to <{who}> \"{quote}\"", one_line(key));
        let Some(msg) = Message::from_content(&json!({"msgtype": "m.emote", "body": body})) else {
            return Ok(());
        };
        self.inner.matrix_message(room, event, &msg, None).await
    }

    async fn on_redaction(
        &self,
        room: &RoomContext,
        event: &MatrixEvent,
        target: &str,
        reason: Option<&str>,
    ) -> Result<(), BridgeError> {
        let Some((net, dest)) = room.portal.as_ref().and_then(|p| self.inner.target_of(p)) else {
            return Ok(());
        };
        // A server with message redaction (a draft): `REDACT` of each line the event became.
        if self.inner.redact_on_irc(&net, &dest, event, target, reason).await? {
            return Ok(());
        }
        if net.config.redaction_fallback != crate::config::RedactionFallback::Notice {
            return Ok(());
        }
        // Only for messages this bridge carried, and without repeating what was deleted.
        let Some((who, _)) = self.inner.recall(&event.room_id, target) else { return Ok(()) };
        let body = format!("deleted a message from {who}");
        let Some(msg) = Message::from_content(&json!({"msgtype": "m.emote", "body": body})) else {
            return Ok(());
        };
        self.inner.matrix_message(room, event, &msg, None).await
    }

    async fn on_membership(
        &self,
        room: &RoomContext,
        event: &MatrixEvent,
        user_id: &str,
        membership: &str,
        prev: Option<&str>,
    ) -> Result<(), BridgeError> {
        let b = &self.inner;
        let name = event.content.get("displayname").and_then(Value::as_str);
        if membership == "join"
            && let Some(name) = name
        {
            b.remember_name(user_id, name);
        }
        // A Matrix user invites a ghost: a private conversation with that nick.
        if membership == "invite" && room.portal.is_none() && event.sender != user_id {
            for net in b.networks.values() {
                if let Some(nick) = net.nick_of_ghost(user_id) {
                    return b
                        .matrix_direct(net, &event.sender, user_id, &nick, &event.room_id)
                        .await;
                }
            }
            return Ok(());
        }
        let Some((net, Target::Channel(chan))) = room.portal.as_ref().and_then(|p| b.target_of(p))
        else {
            return Ok(());
        };
        // A Matrix moderator kicks or bans a ghost: the bot does the same on IRC (it needs
        // channel operator status there; the server's refusal is logged).
        if event.sender != user_id
            && let Some(nick) = net.nick_of_ghost(user_id)
        {
            let by = b.displayname(&event.sender).await;
            let reason = event.content.get("reason").and_then(Value::as_str).unwrap_or("");
            let reason = one_line(&format!(
                "{by} on Matrix{}{reason}",
                if reason.is_empty() { "" } else { ": " }
            ));
            let mask = format!("{nick}!*@*");
            let lines = match (membership, prev) {
                ("leave", Some("join")) => vec![IrcLine::new("KICK", &[&chan, &nick, &reason])],
                ("ban", _) => vec![
                    IrcLine::new("MODE", &[&chan, "+b", &mask]),
                    IrcLine::new("KICK", &[&chan, &nick, &reason]),
                ],
                ("leave", Some("ban")) => vec![IrcLine::new("MODE", &[&chan, "-b", &mask])],
                _ => Vec::new(),
            };
            for l in lines {
                net.bot.send(l).await.map_err(bridge_err)?;
            }
            return Ok(());
        }
        if net.config.mode != BridgeMode::Puppets
            || b.ctx.is_bridge_user(user_id)
            || net.excluded.iter().any(|r| r.is_match(user_id))
        {
            return Ok(());
        }
        match membership {
            "join" if b.ctx.permission(user_id) >= PermissionLevel::User => {
                if prev == Some("join") {
                    if let Some(name) = name {
                        b.puppet_rename(&net, user_id, name).await;
                    }
                    return Ok(());
                }
                if let Err(e) = b.puppet_join(&net, user_id, &chan, &event.room_id).await {
                    b.ctx.notice(&event.room_id, &format!("{user_id}: {e}")).await;
                }
            }
            "leave" | "ban" => b.puppet_part(&net, user_id, &chan).await,
            _ => {}
        }
        Ok(())
    }

    async fn on_room_state(
        &self,
        room: &RoomContext,
        event: &MatrixEvent,
    ) -> Result<(), BridgeError> {
        let Some((net, Target::Channel(chan))) =
            room.portal.as_ref().and_then(|p| self.inner.target_of(p))
        else {
            return Ok(());
        };
        if event.event_type == "m.room.topic"
            && self.inner.ctx.permission(&event.sender) >= PermissionLevel::User
        {
            let topic = event.content.get("topic").and_then(Value::as_str).unwrap_or_default();
            net.bot
                .send(IrcLine::new("TOPIC", &[&chan, &one_line(topic)]))
                .await
                .map_err(bridge_err)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_nicks_hold_a_separator_and_only_nick_characters() {
        assert_eq!(relay_nick("Alice", "/", 30), "Alice/m");
        // The server's first separator; `/` when it names none.
        assert_eq!(relay_nick("Alice", "|/", 30), "Alice|m");
        assert_eq!(relay_nick("Alice", "", 30), "Alice/m");
        // Spaces, control characters, prefixes and reserved characters go; nothing left gives
        // a fallback; a leading digit or dash gets a letter.
        assert_eq!(relay_nick("Bob Smith!@#:\r\n", "/", 30), "BobSmith/m");
        assert_eq!(relay_nick("ℬ🙂", "/", 30), "matrix/m");
        assert_eq!(relay_nick("1337", "/", 30), "m1337/m");
        assert_eq!(relay_nick("-x", "/", 30), "m-x/m");
        // Cut to the server's NICKLEN, separator and suffix included.
        let long = relay_nick(&"a".repeat(50), "/", 16);
        assert_eq!(long.len(), 16);
        assert!(long.ends_with("/m"));
    }

    #[test]
    fn server_time() {
        assert_eq!(parse_server_time("1970-01-01T00:00:00.000Z"), Some(0));
        assert_eq!(parse_server_time("2026-11-22T16:35:27.359Z"), Some(1_795_365_327_359));
        assert_eq!(parse_server_time("2000-02-29T12:00:00Z"), Some(951_825_600_000));
        assert_eq!(parse_server_time("garbage"), None);
    }

    #[test]
    fn split_reasons() {
        assert!(is_split_reason("irc.example.net hub.example.net"));
        assert!(is_split_reason("*.net *.split"));
        assert!(!is_split_reason("Quit: bye"));
        assert!(!is_split_reason("Ping timeout: 240 seconds"));
        assert!(!is_split_reason("see you.later folks.bye now"));
        assert!(!is_split_reason("a. .b"));
    }

    #[test]
    fn channels() {
        assert!(valid_channel("#rust"));
        assert!(!valid_channel("#a b"));
        assert!(!valid_channel("#a,#b"));
        assert!(!valid_channel("rust"));
        assert!(!valid_channel("#x\r\nQUIT"));
    }
}
