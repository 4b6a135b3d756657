//! The XMPP bridge on top of Trestle: MUC rooms as portals, occupants as ghosts, Matrix users as
//! puppet occupants of the component, messages both ways.

mod commands;

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha1::{Digest as _, Sha1};
use tokio::sync::{mpsc, oneshot};
use trestle::{
    bridge::{
        Bridge, BridgeError, BridgeInfo, GhostProfile, PortalSpec, RoomContext, retry_remote,
    },
    client::{CreateRoom, Presence as MatrixPresence, RoomPreset},
    config::{Config, PermissionLevel},
    context::Context,
    event::{EphemeralEvent, MatrixEvent, Message, MessageType},
    fetch::{FetchError, Fetcher, file_content},
    registration::{Namespace, Namespaces},
    store::{MessageMapping, Portal},
    util::{
        format::html_to_plain,
        reply::{strip_reply_fallback, strip_reply_fallback_html},
    },
};
use xmpp_parsers::{
    disco::DiscoItemsResult,
    iq::Iq,
    jid::{FullJid, Jid},
    message::{Message as XMessage, MessageType as XMessageType},
    minidom::Element,
    ns,
    presence::{Presence, Show},
    stanza::Stanza,
    stanza_error::DefinedCondition,
    version::VersionResult,
};

use crate::{
    config::{Standing, XmppConfig},
    conn::{self, ConnConfig, ConnError, ConnEvent, XmppSender},
    ids::{Ids, OccupantKey, RoomJid, mxid_of_puppet, puppet_localpart, sanitise_nick},
    stanzas::{self, ArchiveFrom, ArchivedMessage, JoinHistory, MucMessage, MucPresence},
};

/// How long a join or a message reflection is waited for.
const WAIT: Duration = Duration::from_secs(15);
/// The resource of every JID the bridge uses.
const RESOURCE: &str = "trestle";
/// Failed joins of the bot to a room before it gives up until the next reconnect.
const BOT_JOIN_TRIES: u32 = 5;
/// How long a ghost's typing notification lasts on Matrix without a new `composing`.
const TYPING: Duration = Duration::from_secs(30);
/// Stanza ids remembered for dedupe.
const SEEN: usize = 10_000;
/// Messages asked for per page of a room's archive (Prosody answers at most 50 by default).
const ARCHIVE_PAGE: u32 = 50;
/// How much earlier than the cursor's time a catch-up by time starts (the cursor's time is the
/// bridge's clock, the history's the server's); what is repeated is dropped as bridged before.
const CLOCK_MARGIN_MS: i64 = 5_000;
/// Live messages of one room held while its catch-up runs; more are dropped (and logged).
const HELD: usize = 10_000;

/// The XMPP bridge.
pub struct XmppBridge {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for XmppBridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XmppBridge").field("component", &self.inner.component).finish()
    }
}

/// How a join ended.
#[derive(Debug)]
enum Joined {
    /// In the room with this nick.
    Ok(String),
    /// The nick is taken.
    Conflict,
    /// Refused for another reason (the error condition).
    Refused(String),
}

/// A Matrix user's occupant in one room.
#[derive(Debug, Clone)]
struct Puppet {
    nick: String,
    /// The connection generation the join was confirmed on.
    joined: Option<u64>,
    /// Its affiliation, from its last self-presence.
    affiliation: Option<String>,
}

#[derive(Debug, Default)]
struct RoomState {
    /// The connection generation the bot's join was confirmed on (and the room unlocked).
    bot_joined: Option<u64>,
    /// The bot's failed joins since the last success or reconnect.
    bot_failures: u32,
    puppets: HashMap<String, Puppet>,
    subject: Option<String>,
    /// Matrix users whose occupants were last told to be composing.
    typing: HashSet<String>,
    /// Ghosts last shown typing on Matrix.
    ghosts_typing: HashSet<String>,
    /// Matrix user → the stanza-id their occupant last sent a displayed marker for.
    marked: HashMap<String, String>,
    /// Occupant nick → real bare JID, for occupants the room shows it for (needed to ban).
    real_jids: HashMap<String, String>,
    /// The connection generation whose history catch-up runs for the room: live messages wait
    /// in `held` until it is done, so that they come after the history.
    catchup: Option<u64>,
    /// Live messages held while the catch-up runs, in order.
    held: Vec<MucMessage>,
    /// What the bot's join asks for.
    join_history: JoinHistory,
    /// Whether delayed messages (the join history the bot asked for) are bridged: until the
    /// first live message or the subject, which ends the history (XEP-0045 §7.2.15).
    accept_history: bool,
    /// Whether the room advertises XEP-0421 occupant-ids in its disco#info (`None`: not known
    /// yet). Only then are occupant-ids trusted and occupants' ghosts keyed by them.
    occupant_ids: Option<bool>,
    /// Occupant-id → the occupant's current nick (rooms with occupant-ids), from presences.
    nicks: HashMap<String, String>,
    /// The occupant-ids of the bridge's own occupants (the bot, the puppets): a stanza that
    /// carries one is never bridged back.
    own_ids: HashSet<String>,
}

/// Where the bridge is in a room's history: the last message it bridged (its stanza-id, when
/// it had one) and when it was sent. Kept per room (`xmpp.cursor:<room>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Cursor {
    sid: Option<String>,
    ts: i64,
}

/// What a room's history sync asks for, and at most how many messages: a new portal's last
/// messages, or what came after the cursor; nothing when the config says none or there is no
/// cursor yet.
fn history_wanted(
    cursor: Option<&Cursor>,
    backfill: bool,
    cfg: &crate::config::HistoryConfig,
) -> (Option<ArchiveFrom>, u32) {
    let (wanted, limit) = match (cursor, backfill) {
        (_, true) => (ArchiveFrom::Before(None), cfg.initial_messages),
        (Some(c), false) => (
            c.sid.clone().map_or(ArchiveFrom::Start(c.ts - CLOCK_MARGIN_MS), ArchiveFrom::After),
            cfg.max_catchup,
        ),
        (None, false) => return (None, 0),
    };
    if limit == 0 { (None, 0) } else { (Some(wanted), limit) }
}

/// What the bot's join asks for: nothing when the room's archive has the history (or none is
/// wanted), else the join history (the last `limit` messages, or those since the cursor).
fn join_history(
    wanted: Option<&ArchiveFrom>,
    archive: bool,
    cursor: Option<&Cursor>,
    limit: u32,
) -> JoinHistory {
    match (wanted, archive) {
        (None, _) | (Some(_), true) => JoinHistory::None,
        (Some(ArchiveFrom::Before(_)), false) => JoinHistory::Last(limit),
        (Some(_), false) => {
            JoinHistory::Since { ms: cursor.map_or(0, |c| c.ts - CLOCK_MARGIN_MS), max: limit }
        }
    }
}

/// Now, in Unix milliseconds.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Resolves with the room's stanza-id for a reflected message, or the error condition.
type Reflection = oneshot::Sender<Result<Option<String>, String>>;

/// Resolves with an iq result's payload, or the error's description.
type IqWaiter = oneshot::Sender<Result<Option<Element>, String>>;

#[derive(Debug, Default)]
struct State {
    rooms: HashMap<String, RoomState>,
    /// (room, puppet bare JID) → join waiter.
    joins: HashMap<(String, String), oneshot::Sender<Joined>>,
    /// (room, origin-id) → waiter for the reflected message (its stanza-id) or an error.
    reflections: HashMap<(String, String), Reflection>,
    seen: HashSet<String>,
    seen_order: VecDeque<String>,
    /// Ghost → the Matrix presence last set for it.
    presences: HashMap<String, String>,
    /// Iq id → the room it went to (or whose occupant it went to) and the waiter for its
    /// answer: the result's payload, or an error's description.
    iqs: HashMap<String, (String, IqWaiter)>,
    /// Ghost → the avatar hash (XEP-0153) being fetched for it.
    avatars: HashMap<String, String>,
    /// Matrix user → the avatar hash their occupants announce (`""`: none).
    photos: HashMap<String, String>,
    /// Archive query id → its room and the results received so far.
    archive: HashMap<String, (String, Vec<ArchivedMessage>)>,
    /// Iq id → the room whose disco#info (XEP-0030) it asks for.
    discos: HashMap<String, String>,
}

impl State {
    /// Records a stanza key; `false` if it was seen before.
    fn first_time(&mut self, key: String) -> bool {
        if !self.seen.insert(key.clone()) {
            return false;
        }
        self.seen_order.push_back(key);
        if self.seen_order.len() > SEEN
            && let Some(old) = self.seen_order.pop_front()
        {
            self.seen.remove(&old);
        }
        true
    }

    /// Forgets a stanza key recorded by [`Self::first_time`] (its bridging failed).
    fn forget(&mut self, key: &str) {
        if self.seen.remove(key) {
            self.seen_order.retain(|k| k != key);
        }
    }

    fn is_ours(&self, room: &str, nick: &str) -> bool {
        self.rooms.get(room).is_some_and(|r| r.puppets.values().any(|p| p.nick == nick))
    }

    /// Whether `occupant_id` (trusted) is one of the bridge's own occupants in `room`.
    fn is_own_id(&self, room: &str, occupant_id: Option<&str>) -> bool {
        occupant_id.is_some_and(|id| self.rooms.get(room).is_some_and(|r| r.own_ids.contains(id)))
    }
}

/// The occupant a ghost stands for in a room.
#[derive(Debug, Clone)]
struct GhostOccupant {
    /// Its current nick, when the bridge knows it (an occupant-id ghost whose occupant is not
    /// in the room has none).
    nick: Option<String>,
    /// The ghost's remote id (also what its bans are remembered by).
    remote_id: String,
}

/// The bridge's state, shared with the connection task.
struct Inner {
    ctx: Context<XmppConfig>,
    ids: Ids,
    xmpp: XmppSender,
    /// Downloads files shared from XMPP.
    files: Fetcher,
    component: String,
    bot: FullJid,
    state: Mutex<State>,
    /// Woken when the bot's join of a room is confirmed.
    bot_ready: tokio::sync::Notify,
    /// A handle on itself, for tasks spawned from `&self`.
    me: std::sync::OnceLock<std::sync::Weak<Inner>>,
}

fn retry(e: impl std::fmt::Display) -> BridgeError {
    BridgeError::Retryable(e.to_string())
}

fn send_err(e: &ConnError) -> BridgeError {
    BridgeError::Retryable(e.to_string())
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn cfg(&self) -> &XmppConfig {
        &self.ctx.config().bridge
    }

    fn room_of(portal: &Portal) -> Option<RoomJid> {
        RoomJid::parse(portal.metadata.get("room")?.as_str()?)
    }

    /// The room's portal and its chat, when the room is a chat's portal.
    fn muc_portal(room: &RoomContext) -> Option<(&Portal, RoomJid)> {
        room.portal.as_ref().and_then(|p| Some((p, Self::room_of(p)?)))
    }

    fn puppet_jid(&self, mxid: &str) -> Option<FullJid> {
        FullJid::new(&format!("{}@{}/{RESOURCE}", puppet_localpart(mxid), self.component)).ok()
    }

    fn portal_spec(&self, room: &RoomJid) -> PortalSpec {
        let mut spec = PortalSpec::new(room.remote_id(), room.bare());
        spec.name = Some(room.room.clone());
        spec.public = true;
        spec.channel_name = Some(room.bare());
        spec.network = Some((room.service.clone(), room.service.clone()));
        spec.metadata = json!({"room": room.bare()});
        spec
    }

    fn join_bot(&self, room: &RoomJid) {
        // The room's features first (unless the history sync just learnt them): sent before
        // the join, the answer comes before the occupants' presences (for a room that does not
        // exist yet, after the bot's join).
        let (known, history) = {
            let st = self.state();
            let r = st.rooms.get(&room.bare());
            (r.is_some_and(|r| r.occupant_ids.is_some()), r.map(|r| r.join_history))
        };
        if !known {
            self.query_features(room);
        }
        if let Some(to) = stanzas::occupant(room, &self.cfg().bot_nick)
            && let Err(e) =
                self.xmpp.send(stanzas::bot_join(&self.bot, &to, history.unwrap_or_default()))
        {
            tracing::warn!(room = room.bare(), error = %e, "could not join the room");
        }
    }

    /// A portal was created for `room`: its recent history is bridged first (when
    /// `history.initial_messages` asks for any), then what is said live.
    fn portal_new(&self, room: &RoomJid) {
        let Some(me) = self.me.get().and_then(std::sync::Weak::upgrade) else { return };
        let room = room.clone();
        // The mark survives a restart before the bot is in the room.
        tokio::spawn(async move {
            let key = format!("xmpp.backfill:{}", room.bare());
            if me.cfg().history.initial_messages > 0
                && let Err(e) = me.ctx.store().kv_set(&key, "1").await
            {
                tracing::warn!(room = room.bare(), error = %e, "cannot mark a room for backfill");
            }
            if let Some(generation) = me.xmpp.generation() {
                me.start_sync(&room, generation);
            }
        });
    }

    /// Joins the bot to `room` on connection `generation`, bridging the room's history first
    /// (see [`Self::sync_room`]); live messages of the room wait until it is done.
    fn start_sync(&self, room: &RoomJid, generation: u64) {
        let Some(me) = self.me.get().and_then(std::sync::Weak::upgrade) else { return };
        self.state().rooms.entry(room.bare()).or_default().catchup = Some(generation);
        let room = room.clone();
        tokio::spawn(async move { me.sync_room(&room, generation).await });
    }

    /// Joins the bot to `room` and bridges what the room said that the bridge has not seen:
    /// for a new portal (marked `xmpp.backfill:<room>`) its last `history.initial_messages`
    /// messages, otherwise what was said after the room's cursor (the last message bridged),
    /// at most `history.max_catchup`. From the room's archive (XEP-0313) when it has one, else
    /// from the join history. Then the live messages held meanwhile are bridged, in order.
    async fn sync_room(&self, room: &RoomJid, generation: u64) {
        if let Err(e) = self.catch_up(room, generation).await {
            tracing::warn!(room = room.bare(), error = %e, "could not bridge the room's history");
        }
        self.release_held(room, generation).await;
    }

    async fn catch_up(&self, room: &RoomJid, generation: u64) -> Result<(), BridgeError> {
        let key = room.bare();
        let cfg = self.cfg().history.clone();
        let backfill_key = format!("xmpp.backfill:{key}");
        let backfill = self.ctx.store().kv_get(&backfill_key).await?.is_some();
        let cursor = self.cursor(&key).await?;
        let (wanted, limit) = history_wanted(cursor.as_ref(), backfill, &cfg);
        let archive = match &wanted {
            Some(_) => self.has_archive(room, generation).await,
            None => false,
        };
        let history = join_history(wanted.as_ref(), archive, cursor.as_ref(), limit);
        {
            let mut st = self.state();
            let r = st.rooms.entry(key.clone()).or_default();
            r.join_history = history;
            r.accept_history = history != JoinHistory::None;
        }
        tracing::info!(room = key, ?wanted, archive, ?history, "joining the room");
        self.join_bot(room);
        self.wait_for_bot_patiently(&key, generation).await?;
        if let (Some(from), true) = (wanted, archive) {
            self.bridge_archive(room, generation, from, limit, cursor.as_ref()).await?;
        }
        if backfill {
            self.ctx.store().kv_delete(&backfill_key).await?;
        }
        if self.cursor(&key).await?.is_none() {
            // From now on what is said here is caught up after downtime.
            self.move_cursor(&key, None, now_ms()).await;
        }
        Ok(())
    }

    /// Waits for the bot's join of `room` while the bridge still tries it (see
    /// `BOT_JOIN_TRIES`) on connection `generation`.
    async fn wait_for_bot_patiently(&self, room: &str, generation: u64) -> Result<(), BridgeError> {
        loop {
            match self.wait_for_bot(room, generation).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    let failures = self.state().rooms.get(room).map_or(0, |r| r.bot_failures);
                    if self.xmpp.generation() != Some(generation) || failures > BOT_JOIN_TRIES {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// Whether `room` advertises an archive (XEP-0313) in its disco#info. A room that does not
    /// exist yet has none. The same answer tells whether it stamps occupant-ids (XEP-0421),
    /// which is recorded, so that the bot's join does not ask again.
    async fn has_archive(&self, room: &RoomJid, generation: u64) -> bool {
        let id = format!("disco-{}", rand::random::<u64>());
        let Some(iq) = stanzas::disco_info_get(&self.bot, room, &id) else { return false };
        let answer = self.request(room, iq, generation).await;
        if let Ok(Ok(info)) = &answer {
            let ids =
                info.as_ref().is_some_and(|i| stanzas::has_feature(i, stanzas::NS_OCCUPANT_ID));
            self.state().rooms.entry(room.bare()).or_default().occupant_ids = Some(ids);
        }
        match answer {
            Ok(Ok(Some(info))) => stanzas::has_feature(&info, stanzas::NS_MAM),
            Ok(Ok(None)) => false,
            Ok(Err(why)) => {
                tracing::debug!(room = room.bare(), why, "no disco#info from the room");
                false
            }
            Err(e) => {
                tracing::debug!(room = room.bare(), error = %e, "cannot ask the room's disco#info");
                false
            }
        }
    }

    /// One page of `room`'s archive: its messages (oldest first) and its end, or `Err(why)`
    /// when the room refuses the query.
    async fn archive_page(
        &self,
        room: &RoomJid,
        generation: u64,
        at: &ArchiveFrom,
        max: u32,
    ) -> Result<Result<(Vec<ArchivedMessage>, stanzas::ArchiveFin), String>, BridgeError> {
        let n = rand::random::<u64>();
        let (id, queryid) = (format!("mam-{n}"), format!("q{n}"));
        let Some(iq) = stanzas::mam_query(&self.bot, room, &id, &queryid, at, max) else {
            return Err(BridgeError::Permanent("cannot address the room".to_owned()));
        };
        self.state().archive.insert(queryid.clone(), (room.bare(), Vec::new()));
        let answer = self.request(room, iq, generation).await;
        let messages = self.state().archive.remove(&queryid).map(|(_, m)| m).unwrap_or_default();
        Ok(match answer? {
            Ok(Some(fin)) => match stanzas::read_mam_fin(&fin) {
                Some(fin) => Ok((messages, fin)),
                None => Err("the answer has no <fin/>".to_owned()),
            },
            Ok(None) => Err("the answer is empty".to_owned()),
            Err(why) => Err(why),
        })
    }

    /// Bridges `room`'s archive from `from` (at most `limit` messages, oldest first): the last
    /// `limit` messages for `Before(None)`, else forward from the cursor (by time when the
    /// room no longer knows the cursor's message). When more were said than `limit`, the rest
    /// is left out and the room is told.
    async fn bridge_archive(
        &self,
        room: &RoomJid,
        generation: u64,
        from: ArchiveFrom,
        limit: u32,
        cursor: Option<&Cursor>,
    ) -> Result<(), BridgeError> {
        let key = room.bare();
        let mut messages: Vec<ArchivedMessage> = Vec::new();
        let mut at = from;
        let mut more = false;
        let backwards = matches!(at, ArchiveFrom::Before(_));
        loop {
            let want = limit.saturating_sub(u32::try_from(messages.len()).unwrap_or(u32::MAX));
            let page =
                match self.archive_page(room, generation, &at, want.min(ARCHIVE_PAGE)).await? {
                    Ok(p) => p,
                    Err(why) => {
                        if let (ArchiveFrom::After(_), Some(c)) = (&at, cursor)
                            && why.contains("item-not-found")
                        {
                            // The cursor's message is gone from the archive: go by its time.
                            tracing::info!(
                                room = key,
                                "the archive lost the cursor; catching up by time"
                            );
                            at = ArchiveFrom::Start(c.ts - CLOCK_MARGIN_MS);
                            continue;
                        }
                        tracing::warn!(room = key, why, "the room's archive refused a query");
                        break;
                    }
                };
            let (mut got, fin) = page;
            let count = u32::try_from(got.len()).unwrap_or(u32::MAX);
            if backwards {
                got.append(&mut messages);
                messages = got;
            } else {
                messages.append(&mut got);
            }
            let full = u32::try_from(messages.len()).unwrap_or(u32::MAX) >= limit;
            let next = if backwards { fin.first.clone() } else { fin.last.clone() };
            if fin.complete || count == 0 || next.is_none() {
                break;
            }
            if full {
                more = !backwards;
                break;
            }
            at = match (backwards, next) {
                (true, n) => ArchiveFrom::Before(n),
                (false, Some(n)) => ArchiveFrom::After(n),
                (false, None) => break,
            };
        }
        if backwards && messages.len() > limit as usize {
            messages.drain(..messages.len() - limit as usize);
        }
        messages.truncate(limit as usize);
        tracing::info!(room = key, count = messages.len(), more, "bridging the room's history");
        for a in messages {
            if self.xmpp.generation() != Some(generation) {
                return Err(retry("the XMPP connection dropped during the catch-up"));
            }
            if let Err(e) = retry_remote(|| self.bridge_archived(room, &a)).await {
                tracing::warn!(room = key, sid = a.archive_id, error = %e, "could not bridge a message of the history");
            }
        }
        if more && let Some(portal) = self.ctx.store().portal_by_remote(&room.remote_id()).await? {
            self.ctx
                .notice(
                    &portal.room_id,
                    &format!("More than {limit} messages were said in {key} while the bridge was away; the later ones were not bridged (history.max_catchup)."),
                )
                .await;
        }
        Ok(())
    }

    /// One message of the room's archive: bridged like a live one, with its original time,
    /// unless it is the bot's or a Matrix user's own (see [`Self::bridged_before`]).
    async fn bridge_archived(
        &self,
        room: &RoomJid,
        a: &ArchivedMessage,
    ) -> Result<(), BridgeError> {
        let m = &a.message;
        let from_room = m.from.as_ref().is_some_and(|f| f.to_bare().to_string() == room.bare());
        let Some(mut msg) = stanzas::read_muc_message(m, room).filter(|_| from_room) else {
            return Ok(());
        };
        if !matches!(m.type_, XMessageType::Groupchat) {
            return Ok(());
        }
        // The archive's id is the room's stanza-id.
        msg.stanza_id = Some(a.archive_id.clone());
        msg.stamp_ms = a.stamp_ms.or(msg.stamp_ms);
        msg.delayed = true;
        let key = room.bare();
        if msg.nick == self.cfg().bot_nick || self.state().is_ours(&key, &msg.nick) {
            let ts = msg.stamp_ms.unwrap_or_else(now_ms);
            self.move_cursor(&key, Some(&a.archive_id), ts).await;
            return Ok(());
        }
        self.room_message(room, msg, true).await
    }

    /// Bridges the live messages of `room` held while its catch-up ran (in order), then lets
    /// new ones through; unless a newer catch-up (a reconnect) took over the room.
    async fn release_held(&self, room: &RoomJid, generation: u64) {
        let key = room.bare();
        loop {
            let batch = {
                let mut st = self.state();
                let r = st.rooms.entry(key.clone()).or_default();
                if r.catchup != Some(generation) {
                    return;
                }
                if r.held.is_empty() {
                    r.catchup = None;
                    return;
                }
                std::mem::take(&mut r.held)
            };
            for msg in batch {
                if let Err(e) = retry_remote(|| self.room_message(room, msg.clone(), false)).await {
                    tracing::error!(room = key, error = %e, "could not bridge an XMPP message");
                }
            }
        }
    }

    /// Asks `room` for its disco#info, to learn whether it stamps XEP-0421 occupant-ids (see
    /// [`Self::on_iq`]).
    fn query_features(&self, room: &RoomJid) {
        let id = format!("disco-{}", rand::random::<u64>());
        let Some(iq) = stanzas::disco_info_get(&self.bot, room, &id) else { return };
        self.state().discos.insert(id.clone(), room.bare());
        if let Err(e) = self.xmpp.send(iq) {
            self.state().discos.remove(&id);
            tracing::debug!(room = room.bare(), error = %e, "could not ask for the room's features");
        }
    }

    /// `occupant_id` (as a stanza from `room` carried it) if the room advertises occupant-ids:
    /// only then is it the room's and not a client's forgery.
    fn trusted_id<'a>(&self, room: &RoomJid, occupant_id: Option<&'a str>) -> Option<&'a str> {
        occupant_id.filter(|_| {
            self.state().rooms.get(&room.bare()).is_some_and(|r| r.occupant_ids == Some(true))
        })
    }

    /// The ghost of the occupant `nick` of `room` whose stanza carried `occupant_id`, and the
    /// ghost's remote id: keyed by the XEP-0421 occupant-id when the room advertises them (so a
    /// nick change keeps the ghost), else by the nick. Every way from an occupant to its ghost
    /// goes through here.
    fn occupant_ghost(
        &self,
        room: &RoomJid,
        nick: &str,
        occupant_id: Option<&str>,
    ) -> (String, String) {
        if let Some(id) = self.trusted_id(room, occupant_id) {
            let ghost = self.ids.ghost_of_occupant_id(room, id);
            // Matrix user ids are at most 255 bytes; a room with a longer one keeps the nick.
            if ghost.len() <= 255 {
                return (ghost, format!("{}:{id}@{}", room.room, room.service));
            }
        }
        (self.ids.ghost_of(room, nick), format!("{}/{nick}", room.bare()))
    }

    /// The ghost of whoever has `nick` in `room` now (by their occupant-id when the room has
    /// them and the bridge saw their presence).
    fn ghost_of_nick(&self, room: &RoomJid, nick: &str) -> String {
        let id = self.state().rooms.get(&room.bare()).and_then(|r| {
            r.nicks.iter().find(|(_, n)| n.as_str() == nick).map(|(id, _)| id.clone())
        });
        self.occupant_ghost(room, nick, id.as_deref()).0
    }

    /// The occupant of `room` that `ghost` stands for, with its current nick; `None` when it
    /// is not an occupant's ghost of this room.
    fn occupant_of_ghost(&self, room: &RoomJid, ghost: &str) -> Option<GhostOccupant> {
        let (groom, key) = self.ids.occupant_key_of_ghost(ghost)?;
        if groom != *room {
            return None;
        }
        Some(match key {
            OccupantKey::Nick(nick) => {
                GhostOccupant { remote_id: format!("{}/{nick}", room.bare()), nick: Some(nick) }
            }
            OccupantKey::Id(id) => GhostOccupant {
                nick: self.state().rooms.get(&room.bare()).and_then(|r| r.nicks.get(&id).cloned()),
                remote_id: format!("{}:{id}@{}", room.room, room.service),
            },
        })
    }

    async fn displayname(&self, room_id: &str, mxid: &str) -> String {
        let name = match self.ctx.bot().get_state_event(room_id, "m.room.member", mxid).await {
            Ok(Some(v)) => v.get("displayname").and_then(Value::as_str).map(str::to_owned),
            _ => None,
        };
        let name = match name {
            Some(n) => Some(n),
            None => self.ctx.bot().get_profile(mxid).await.ok().and_then(|p| p.displayname),
        };
        name.unwrap_or_else(|| {
            mxid.trim_start_matches('@').split(':').next().unwrap_or(mxid).to_owned()
        })
    }

    /// Makes sure `mxid`'s puppet is in the room on the current connection; returns its JID and
    /// the generation. Nick conflicts are resolved with the configured suffix and told.
    async fn ensure_puppet(
        &self,
        room: &RoomJid,
        room_id: &str,
        mxid: &str,
        displayname: Option<&str>,
    ) -> Result<(FullJid, u64), BridgeError> {
        let generation = self.xmpp.generation().ok_or_else(|| send_err(&ConnError::Offline))?;
        let jid = self
            .puppet_jid(mxid)
            .ok_or_else(|| BridgeError::Permanent(format!("{mxid} has no valid JID")))?;
        let key = room.bare();
        if self
            .state()
            .rooms
            .get(&key)
            .and_then(|r| r.puppets.get(mxid))
            .is_some_and(|p| p.joined == Some(generation))
        {
            return Ok((jid, generation));
        }
        self.wait_for_bot(&key, generation).await?;
        let name = match displayname {
            Some(n) => n.to_owned(),
            None => self.displayname(room_id, mxid).await,
        };
        let avatar = match self.ctx.bot().get_profile(mxid).await {
            Ok(p) => self.avatar_hash(mxid, p.avatar_url.as_deref()).await,
            Err(e) => {
                tracing::debug!(mxid, error = %e, "cannot read a profile");
                None
            }
        };
        let fallback = mxid.trim_start_matches('@').split(':').next().unwrap_or("matrix");
        let cfg = self.cfg();
        let base = sanitise_nick(&name, fallback, cfg.max_nick_chars);
        for attempt in 0..5u32 {
            let nick = match attempt {
                0 => base.clone(),
                1 => format!("{base}{}", cfg.nick_conflict_suffix),
                n => format!("{base}{}{n}", cfg.nick_conflict_suffix),
            };
            let Some(to) = stanzas::occupant(room, &nick) else {
                return Err(BridgeError::Permanent(format!("{nick:?} is not a valid nick")));
            };
            let (tx, rx) = oneshot::channel();
            {
                let mut st = self.state();
                st.joins.insert((key.clone(), jid.to_bare().to_string()), tx);
                st.rooms.entry(key.clone()).or_default().puppets.insert(
                    mxid.to_owned(),
                    Puppet { nick: nick.clone(), joined: None, affiliation: None },
                );
            }
            let mut join = stanzas::join(&jid, &to);
            if let Some(hash) = &avatar {
                stanzas::add_avatar_hash(&mut join, hash);
            }
            self.xmpp.send_for(join, generation).map_err(|e| send_err(&e))?;
            match tokio::time::timeout(WAIT, rx).await {
                Ok(Ok(Joined::Ok(actual))) => {
                    self.standing_on_join(room_id, room, mxid, &actual);
                    if actual != base {
                        self.ctx
                            .notice(
                                room_id,
                                &format!(
                                    "{name}: the nick {base:?} is taken in {}, so you appear there as {actual:?}.",
                                    room.bare()
                                ),
                            )
                            .await;
                    }
                    return Ok((jid, generation));
                }
                Ok(Ok(Joined::Conflict)) => continue,
                Ok(Ok(Joined::Refused(cond))) => {
                    self.forget_puppet(&key, mxid);
                    return Err(BridgeError::Permanent(format!(
                        "{} refused {name} ({cond})",
                        room.bare()
                    )));
                }
                Ok(Err(_)) | Err(_) => {
                    self.forget_puppet(&key, mxid);
                    return Err(retry(format!("no answer from {} to {name}'s join", room.bare())));
                }
            }
        }
        self.forget_puppet(&key, mxid);
        Err(BridgeError::Permanent(format!(
            "every nick tried for {name} is taken in {}",
            room.bare()
        )))
    }

    /// The avatar hash (XEP-0153) for a Matrix user whose avatar is `avatar_url`: the hex SHA-1
    /// of the image, `""` without an avatar, `None` when it cannot be had (not downloadable,
    /// larger than `files.max_bytes`; logged). The image's address, hash and type are kept
    /// (`xmpp.mxavatar:<mxid>`) for vCard requests, so it is downloaded once per change.
    async fn avatar_hash(&self, mxid: &str, avatar_url: Option<&str>) -> Option<String> {
        let key = format!("xmpp.mxavatar:{mxid}");
        let hash = match avatar_url.filter(|u| u.starts_with("mxc://")) {
            None => {
                let _ = self.ctx.store().kv_delete(&key).await;
                String::new()
            }
            Some(url) => {
                let stored = self.ctx.store().kv_get(&key).await.ok().flatten();
                let stored = stored.and_then(|v| serde_json::from_str::<Value>(&v).ok());
                match stored.filter(|v| v["mxc"] == url) {
                    Some(v) => v["sha1"].as_str().unwrap_or_default().to_owned(),
                    None => {
                        let (data, mimetype) = self.matrix_avatar(mxid, url).await?;
                        let hash = hex::encode(Sha1::digest(&data));
                        let record = json!({"mxc": url, "sha1": hash, "type": mimetype});
                        if let Err(e) = self.ctx.store().kv_set(&key, &record.to_string()).await {
                            tracing::warn!(mxid, error = %e, "cannot record an avatar");
                        }
                        hash
                    }
                }
            }
        };
        self.state().photos.insert(mxid.to_owned(), hash.clone());
        Some(hash)
    }

    /// Downloads a Matrix user's avatar `url` as the bot: the image and its MIME type, `None`
    /// (logged) when it fails, is too large (`files.max_bytes`) or is not an image.
    async fn matrix_avatar(&self, mxid: &str, url: &str) -> Option<(Vec<u8>, String)> {
        let (data, mimetype) = match self.ctx.bot().download_media(url).await {
            Ok(d) => d,
            Err(e) => {
                tracing::info!(mxid, url, error = %e, "cannot download an avatar");
                return None;
            }
        };
        let mimetype = mimetype
            .and_then(|m| m.split(';').next().map(|m| m.trim().to_ascii_lowercase()))
            .filter(|m| m.starts_with("image/"));
        let Some(mimetype) = mimetype else {
            tracing::info!(mxid, url, "an avatar that is not an image is not sent to XMPP");
            return None;
        };
        if data.len() as u64 > self.cfg().files.max_bytes {
            tracing::info!(mxid, url, size = data.len(), "an avatar too large for XMPP");
            return None;
        }
        Some((data.to_vec(), mimetype))
    }

    /// A Matrix user's vCard (XEP-0054) for XMPP: the photo recorded by [`Self::avatar_hash`],
    /// or an empty vCard.
    async fn puppet_vcard(&self, mxid: &str) -> Element {
        let stored = self.ctx.store().kv_get(&format!("xmpp.mxavatar:{mxid}")).await.ok().flatten();
        let url = stored
            .and_then(|v| serde_json::from_str::<Value>(&v).ok())
            .and_then(|v| v["mxc"].as_str().map(str::to_owned));
        let photo = match url {
            Some(url) => self.matrix_avatar(mxid, &url).await,
            None => None,
        };
        let photo = photo.map(|(data, mimetype)| stanzas::VcardPhoto { mimetype, data });
        stanzas::vcard(photo.as_ref())
    }

    /// Joins every Matrix member of every portal as an occupant again (after a reconnect).
    async fn rejoin_puppets(&self, portals: Vec<Portal>, generation: u64) {
        for portal in portals {
            let Some(room) = Self::room_of(&portal) else { continue };
            let members = match self.ctx.store().members(&portal.room_id, "join").await {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(room = room.bare(), error = %e, "cannot list the room's members");
                    continue;
                }
            };
            for mxid in members {
                if self.xmpp.generation() != Some(generation) {
                    return;
                }
                if self.ctx.is_bridge_user(&mxid)
                    || self.ctx.permission(&mxid) < PermissionLevel::Relay
                {
                    continue;
                }
                let known = self
                    .state()
                    .rooms
                    .get(&room.bare())
                    .and_then(|r| r.puppets.get(&mxid))
                    .map(|p| p.nick.clone());
                if let Err(e) =
                    self.ensure_puppet(&room, &portal.room_id, &mxid, known.as_deref()).await
                {
                    tracing::warn!(room = room.bare(), mxid, error = %e, "could not rejoin a Matrix user");
                }
            }
        }
    }

    /// Waits until the bot is in `room` on connection `generation` (so the room exists and is
    /// unlocked before a Matrix user's occupant joins).
    async fn wait_for_bot(&self, room: &str, generation: u64) -> Result<(), BridgeError> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let notified = self.bot_ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.state().rooms.get(room).is_some_and(|r| r.bot_joined == Some(generation)) {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(retry(format!("the bridge bot is not in {room} yet")));
            }
        }
    }

    fn forget_puppet(&self, room: &str, mxid: &str) {
        if let Some(r) = self.state().rooms.get_mut(room) {
            r.puppets.remove(mxid);
        }
    }

    /// Text for XMPP from a Matrix message.
    fn xmpp_text(&self, msg: &Message) -> String {
        self.xmpp_content(msg).0
    }

    /// Text for XMPP from a Matrix message, and for a file its out-of-band link (XEP-0066) and
    /// name. A file's text is the link itself (so that clients show the file inline), a signed
    /// `media_proxy` link; without one configured it is `name: mxc://…` and no link.
    fn xmpp_content(&self, msg: &Message) -> (String, Option<(String, String)>) {
        if let Some(media) = &msg.media {
            return match self.ctx.media_link(&media.url, &media.filename) {
                Ok(link) => (link.clone(), Some((link, media.filename.clone()))),
                Err(e) => {
                    tracing::debug!(error = %e, "no public link for a Matrix file");
                    (format!("{}: {}", media.filename, media.url), None)
                }
            };
        }
        let text = match &msg.html {
            Some(h) => html_to_plain(&strip_reply_fallback_html(h)),
            None => strip_reply_fallback(&msg.body).to_owned(),
        };
        let text = if msg.msgtype == MessageType::Emote { format!("/me {text}") } else { text };
        (text, None)
    }

    /// Sends a groupchat message as `sender` and waits for the room to reflect it; returns the
    /// room's stanza-id for it.
    async fn send_groupchat(
        &self,
        room: &RoomJid,
        room_id: &str,
        sender: &str,
        build: impl Fn(&FullJid) -> Option<XMessage>,
        id: &str,
    ) -> Result<Option<String>, BridgeError> {
        let (jid, generation) = self.ensure_puppet(room, room_id, sender, None).await?;
        let msg =
            build(&jid).ok_or_else(|| BridgeError::Permanent("cannot address the room".into()))?;
        let (tx, rx) = oneshot::channel();
        let key = (room.bare(), id.to_owned());
        self.state().reflections.insert(key.clone(), tx);
        if let Err(e) = self.xmpp.send_for(msg, generation) {
            self.state().reflections.remove(&key);
            return Err(send_err(&e));
        }
        match tokio::time::timeout(WAIT, rx).await {
            Ok(Ok(Ok(sid))) => Ok(sid),
            Ok(Ok(Err(cond))) => {
                Err(BridgeError::Permanent(format!("{} refused the message: {cond}", room.bare())))
            }
            Ok(Err(_)) | Err(_) => {
                self.state().reflections.remove(&key);
                if self.xmpp.generation() == Some(generation) {
                    // Sent on a live connection but not reflected: retrying could duplicate it.
                    tracing::warn!(room = room.bare(), id, "the room did not reflect a message");
                    Ok(None)
                } else {
                    Err(retry("the XMPP connection dropped while sending"))
                }
            }
        }
    }

    async fn record(
        &self,
        room_id: &str,
        remote_id: &str,
        event_id: &str,
        sender: &str,
        sid: Option<&str>,
        room: &RoomJid,
    ) -> Result<(), BridgeError> {
        self.ctx
            .store()
            .insert_message(&MessageMapping::now(room_id, remote_id, 0, event_id, sender))
            .await?;
        if let Some(sid) = sid {
            self.ctx.store().kv_set(&format!("xmpp.sid:{}:{sid}", room.bare()), event_id).await?;
            self.ctx.store().kv_set(&format!("xmpp.ev:{event_id}"), sid).await?;
        }
        Ok(())
    }

    /// Keeps the start of a message's text, quoted by replies to it for clients without
    /// XEP-0461.
    async fn remember_text(&self, event_id: &str, text: &str) -> Result<(), BridgeError> {
        let excerpt: String = text.chars().take(100).collect();
        self.ctx.store().kv_set(&format!("xmpp.txt:{event_id}"), &excerpt).await?;
        Ok(())
    }

    /// The Matrix content for a file an XMPP user shared at `url` (XEP-0066): downloaded and
    /// uploaded to the homeserver as `ghost`, as `m.image`/`m.video`/`m.audio`/`m.file` with its
    /// MIME type and size. When it cannot be fetched (too large, refused, unreachable) the
    /// content is a text with the link and the reason, so that nothing is lost silently.
    /// Returns the content and its text (quoted by replies).
    async fn file_content(
        &self,
        ghost: &str,
        url: &str,
        caption: Option<&str>,
    ) -> Result<(Value, String), BridgeError> {
        let why = match self.files.fetch(url, None, None).await {
            Ok(f) => {
                let size = f.data.len();
                let intent = self.ctx.intent(ghost);
                let upload = intent.upload_media(f.data, &f.mimetype, Some(&f.filename));
                let mxc = match upload.await.map_err(BridgeError::from) {
                    Ok(mxc) => mxc,
                    Err(e) if e.is_retryable() => return Err(e),
                    // Refused for good (too large for the homeserver, say): the link instead.
                    Err(e) => {
                        tracing::info!(url, error = %e, "the homeserver refused a file");
                        return Ok(Self::file_link(
                            url,
                            caption,
                            &format!("could not be uploaded to Matrix: {e}"),
                        ));
                    }
                };
                let content = file_content(&mxc, &f.filename, &f.mimetype, size, caption);
                let body = caption.unwrap_or(&f.filename).to_owned();
                return Ok((content, body));
            }
            Err(FetchError::TooLarge { limit, .. }) => {
                format!("is too large to bridge (the limit is {})", human_size(limit))
            }
            Err(e) => format!("could not be bridged: {e}"),
        };
        tracing::info!(url, why, "could not bridge a file");
        Ok(Self::file_link(url, caption, &why))
    }

    /// A text with a file's link (and caption) and why the file itself is not there.
    fn file_link(url: &str, caption: Option<&str>, why: &str) -> (Value, String) {
        let text = match caption {
            Some(c) => format!("{c}\n{url}\n(the file {why})"),
            None => format!("{url}\n(the file {why})"),
        };
        (json!({"msgtype": "m.text", "body": text}), text)
    }

    /// An occupant's displayed marker (XEP-0333) for the message the room knows as `id` (its
    /// stanza-id, or for a message from Matrix its own id, the event id): a read receipt from
    /// the occupant's ghost.
    async fn xmpp_displayed(
        &self,
        room_id: &str,
        room: &RoomJid,
        ghost: &str,
        id: &str,
    ) -> Result<(), BridgeError> {
        let mut event = self.target_event(room_id, room, id, None).await?;
        if event.is_none()
            && id.starts_with('$')
            && self.ctx.store().message_by_event(room_id, id).await?.is_some()
        {
            event = Some(id.to_owned());
        }
        let Some(event) = event else {
            tracing::debug!(room = room.bare(), id, "ignoring a marker for an unknown message");
            return Ok(());
        };
        let intent = self.ctx.intent(ghost);
        intent.ensure_joined(room_id).await?;
        intent.send_receipt(room_id, &event).await?;
        Ok(())
    }

    /// Brings the occupant `nick` of the Matrix user `mxid` in `xroom` from one standing to
    /// another (`change`: before, now; see [`PowerLevelsConfig`](crate::config::PowerLevelsConfig)):
    /// owner and admin are affiliations of the puppet's address, moderator and participant
    /// roles of the occupant, and leaving owner or admin makes the address a `member` again.
    /// The bot asks the room; a refusal is told in `room_id` with a notice.
    async fn set_standing(
        &self,
        room_id: &str,
        xroom: &RoomJid,
        mxid: &str,
        nick: &str,
        (before, now): (Standing, Standing),
        generation: u64,
    ) -> Result<(), BridgeError> {
        let Some(jid) = self.puppet_jid(mxid) else { return Ok(()) };
        let bare = jid.to_bare().to_string();
        // Each change is an affiliation (by address) or a role (by nick) request: who, what
        // changes, and how the notice of a refusal names it.
        type Change<'a> = ((&'a str, &'a str), (&'a str, &'a str), &'a str);
        let mut changes: Vec<Change<'_>> = Vec::new();
        match now {
            Standing::Owner => changes.push((("jid", &bare), ("affiliation", "owner"), "an owner")),
            Standing::Admin => changes.push((("jid", &bare), ("affiliation", "admin"), "an admin")),
            Standing::Moderator | Standing::Participant => {
                if before >= Standing::Admin {
                    changes.push((("jid", &bare), ("affiliation", "member"), "a member"));
                }
                if now == Standing::Moderator {
                    changes.push((("nick", nick), ("role", "moderator"), "a moderator"));
                } else {
                    changes.push((("nick", nick), ("role", "participant"), "a participant"));
                }
            }
        }
        for (who, change, what) in changes {
            let result =
                self.admin_request(xroom, &self.bot, who, change, None, generation).await?;
            if let Err(why) = result {
                self.ctx
                    .notice(room_id, &format!("Could not make {nick} {what} on XMPP: {why}"))
                    .await;
                break;
            }
            tracing::info!(room = xroom.bare(), mxid, nick, what, "changed an occupant's standing");
        }
        Ok(())
    }

    /// After the Matrix user `mxid` joined `xroom` as `nick`: gives the occupant the standing
    /// of the user's current power level when that is above a participant's and the room did
    /// not already grant it (in the background; failures are logged or told in the room).
    fn standing_on_join(&self, room_id: &str, xroom: &RoomJid, mxid: &str, nick: &str) {
        let Some(me) = self.me.get().and_then(std::sync::Weak::upgrade) else { return };
        let Some(generation) = self.xmpp.generation() else { return };
        let (room_id, xroom, mxid, nick) =
            (room_id.to_owned(), xroom.clone(), mxid.to_owned(), nick.to_owned());
        tokio::spawn(async move {
            let pl = match me.ctx.bot().power_levels(&room_id).await {
                Ok(pl) => pl,
                Err(e) => {
                    tracing::warn!(room_id, error = %e, "cannot read the power levels");
                    return;
                }
            };
            let level = pl["users"]
                .get(&mxid)
                .and_then(Value::as_i64)
                .unwrap_or_else(|| pl["users_default"].as_i64().unwrap_or(0));
            let now = me.cfg().power_levels.standing_of(level);
            let affiliation = me
                .state()
                .rooms
                .get(&xroom.bare())
                .and_then(|r| r.puppets.get(&mxid))
                .and_then(|p| p.affiliation.clone());
            let before = standing_of_affiliation(affiliation.as_deref());
            if now == Standing::Participant || now == before {
                return;
            }
            let change = (before, now);
            if let Err(e) =
                me.set_standing(&room_id, &xroom, &mxid, &nick, change, generation).await
            {
                tracing::warn!(room = xroom.bare(), mxid, error = %e, "could not set a standing");
            }
        });
    }

    /// Sends a MUC admin request (see [`stanzas::muc_admin`]) from `from` on connection
    /// `generation` and waits for the room's answer: `Ok(Err(why))` when the room refuses or
    /// does not answer in time.
    async fn admin_request(
        &self,
        room: &RoomJid,
        from: &FullJid,
        who: (&str, &str),
        change: (&str, &str),
        reason: Option<&str>,
        generation: u64,
    ) -> Result<Result<(), String>, BridgeError> {
        let id = format!("admin-{}", rand::random::<u64>());
        let Some(iq) = stanzas::muc_admin(from, room, &id, who, change, reason) else {
            return Err(BridgeError::Permanent(format!("cannot address {} in the room", who.1)));
        };
        Ok(self.request(room, iq, generation).await?.map(drop))
    }

    /// Sends `iq` (its id must be unique) to `room` or one of its occupants on connection
    /// `generation` and waits for the answer: `Ok(Ok(payload))` for a result, `Ok(Err(why))`
    /// when it is an error or none comes in time.
    async fn request(
        &self,
        room: &RoomJid,
        iq: Iq,
        generation: u64,
    ) -> Result<Result<Option<Element>, String>, BridgeError> {
        let id = match &iq {
            Iq::Get { id, .. } | Iq::Set { id, .. } => id.clone(),
            _ => return Err(BridgeError::Permanent("not a request".to_owned())),
        };
        let (tx, rx) = oneshot::channel();
        self.state().iqs.insert(id.clone(), (room.bare(), tx));
        if let Err(e) = self.xmpp.send_for(iq, generation) {
            self.state().iqs.remove(&id);
            return Err(send_err(&e));
        }
        match tokio::time::timeout(WAIT, rx).await {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(_)) | Err(_) => {
                self.state().iqs.remove(&id);
                Ok(Err("no answer in time".to_owned()))
            }
        }
    }

    /// An XMPP user invited a Matrix user (their JID on the component) to a chat: the bot
    /// invites them to its portal, bridging the chat first if it is not yet.
    async fn xmpp_invite(
        &self,
        room: &RoomJid,
        mxid: &str,
        inviter: Option<&str>,
        reason: Option<&str>,
    ) -> Result<(), BridgeError> {
        if self.ctx.permission(mxid) < PermissionLevel::User {
            tracing::info!(
                room = room.bare(),
                mxid,
                "invitation for a user not allowed to use the bridge"
            );
            return Ok(());
        }
        let alias = self.ids.alias_of(room);
        let (portal, created) =
            self.ctx.ensure_portal(&self.portal_spec(room), Some(&alias)).await?;
        if created {
            self.portal_new(room);
        }
        let why = match (inviter, reason) {
            (Some(who), Some(r)) => format!("{who} invited you on XMPP: {r}"),
            (Some(who), None) => format!("{who} invited you on XMPP"),
            (None, Some(r)) => format!("Invited on XMPP: {r}"),
            (None, None) => "Invited on XMPP".to_owned(),
        };
        self.ctx.bot().invite_with_reason(&portal.room_id, mxid, Some(&why)).await?;
        tracing::info!(room = room.bare(), mxid, "bridged an invitation from XMPP");
        Ok(())
    }

    /// A moderator retracted a message (XEP-0425): its Matrix event is redacted by the bot,
    /// with who and why as the reason.
    async fn xmpp_moderated(
        &self,
        room: &RoomJid,
        moderated: &stanzas::Moderated,
    ) -> Result<(), BridgeError> {
        let Some(portal) = self.ctx.store().portal_by_remote(&room.remote_id()).await? else {
            return Ok(());
        };
        let key = room.bare();
        let sid = &moderated.stanza_id;
        let Some(event) = self.ctx.store().kv_get(&format!("xmpp.sid:{key}:{sid}")).await? else {
            tracing::info!(room = key, sid, "a moderated message that was never bridged");
            return Ok(());
        };
        let by = moderated.by.as_deref().and_then(|b| b.strip_prefix(&format!("{key}/")));
        let reason = match (by, moderated.reason.as_deref()) {
            (Some(nick), Some(why)) => format!("moderated by {nick} on XMPP: {why}"),
            (Some(nick), None) => format!("moderated by {nick} on XMPP"),
            (None, Some(why)) => format!("moderated on XMPP: {why}"),
            (None, None) => "moderated on XMPP".to_owned(),
        };
        self.ctx.bot().redact(&portal.room_id, &event, Some(&reason)).await?;
        Ok(())
    }

    /// The Matrix event of the message the room knows as `id`: by the room's stanza-id, or else
    /// (clients that use the message's own id) by the sender's message id, when the sender's
    /// occupant JID `to` is known.
    async fn target_event(
        &self,
        room_id: &str,
        room: &RoomJid,
        id: &str,
        to: Option<&str>,
    ) -> Result<Option<String>, BridgeError> {
        let key = room.bare();
        if let Some(ev) = self.ctx.store().kv_get(&format!("xmpp.sid:{key}:{id}")).await? {
            return Ok(Some(ev));
        }
        let Some(nick) = to.and_then(|t| t.strip_prefix(&format!("{key}/"))) else {
            return Ok(None);
        };
        let mut senders = vec![self.ghost_of_nick(room, nick)];
        if let Some(r) = self.state().rooms.get(&key) {
            senders
                .extend(r.puppets.iter().filter(|(_, p)| p.nick == nick).map(|(m, _)| m.clone()));
        }
        for sender in senders {
            let parts =
                self.ctx.store().messages_by_remote(room_id, &format!("{sender}|{id}")).await?;
            if let Some(first) = parts.first() {
                return Ok(Some(first.event_id.clone()));
            }
        }
        Ok(None)
    }

    /// What a reply from Matrix to `event` needs on XMPP: the room's stanza-id of the message,
    /// its sender's occupant JID, and the quote for clients without XEP-0461. `None` if the
    /// message cannot be addressed (no stanza-id known).
    async fn reply_info(
        &self,
        room_id: &str,
        room: &RoomJid,
        event: &str,
    ) -> Result<Option<(String, Option<String>, String)>, BridgeError> {
        let Some(sid) = self.ctx.store().kv_get(&format!("xmpp.ev:{event}")).await? else {
            return Ok(None);
        };
        let sender = self.ctx.store().message_by_event(room_id, event).await?.map(|m| m.sender);
        let nick = match &sender {
            Some(s) => match self.occupant_of_ghost(room, s).and_then(|o| o.nick) {
                Some(nick) => Some(nick),
                // A Matrix user's occupant, or an occupant no longer in the room (its ghost's
                // displayname is its last nick).
                None => {
                    let known = self
                        .state()
                        .rooms
                        .get(&room.bare())
                        .and_then(|r| r.puppets.get(s))
                        .map(|p| p.nick.clone());
                    match known {
                        Some(n) => Some(n),
                        None => Some(self.displayname(room_id, s).await),
                    }
                }
            },
            None => None,
        };
        let quoted = self.ctx.store().kv_get(&format!("xmpp.txt:{event}")).await?;
        let to = nick.as_ref().map(|n| format!("{}/{n}", room.bare()));
        let fallback =
            stanzas::reply_fallback(nick.as_deref().unwrap_or("someone"), quoted.as_deref());
        Ok(Some((sid, to, fallback)))
    }

    /// An XMPP user's full set of reactions to a message: Matrix reactions are added and
    /// redacted to match what the ghost had.
    async fn xmpp_reactions(
        &self,
        room_id: &str,
        room: &RoomJid,
        ghost: &str,
        target: &str,
        keys: &[String],
        cause: &str,
    ) -> Result<(), BridgeError> {
        let Some(event) = self.target_event(room_id, room, target, None).await? else {
            tracing::info!(room = room.bare(), target, "ignoring reactions to an unknown message");
            return Ok(());
        };
        let k = format!("xmpp.rx:{room_id}|{ghost}|{event}");
        let mut had: std::collections::BTreeMap<String, String> = self
            .ctx
            .store()
            .kv_get(&k)
            .await?
            .and_then(|v| serde_json::from_str(&v).ok())
            .unwrap_or_default();
        for key in keys {
            if had.contains_key(key) {
                continue;
            }
            let content = json!({
                "m.relates_to": {"rel_type": "m.annotation", "event_id": event, "key": key}
            });
            let txn = self.ctx.txn_id_for(&format!("{cause}|{key}"), 0);
            let id = self.ctx.send_as(ghost, room_id, "m.reaction", content, &txn, None).await?;
            had.insert(key.clone(), id);
            self.ctx.store().kv_set(&k, &json!(had).to_string()).await?;
        }
        let gone: Vec<String> = had.keys().filter(|h| !keys.contains(h)).cloned().collect();
        for key in gone {
            if let Some(id) = had.get(&key) {
                self.ctx.intent(ghost).redact(room_id, id, None).await?;
            }
            had.remove(&key);
            self.ctx.store().kv_set(&k, &json!(had).to_string()).await?;
        }
        if had.is_empty() {
            self.ctx.store().kv_delete(&k).await?;
        }
        Ok(())
    }

    /// Sends `sender`'s full current set of reactions to `target` (the room's stanza-id).
    async fn send_reactions(
        &self,
        room: &RoomJid,
        room_id: &str,
        sender: &str,
        id: &str,
        target: &str,
        keys: &[String],
    ) -> Result<(), BridgeError> {
        self.send_groupchat(
            room,
            room_id,
            sender,
            |from| stanzas::reactions(from, room, id, target, keys),
            id,
        )
        .await
        .map(drop)
    }

    // --- XMPP → Matrix ---------------------------------------------------------------------

    async fn handle(&self, ev: &ConnEvent) -> Result<(), BridgeError> {
        match ev {
            ConnEvent::Online(generation) => {
                let generation = *generation;
                let portals = self.ctx.store().portals().await?;
                {
                    let mut st = self.state();
                    for r in st.rooms.values_mut() {
                        r.bot_failures = 0;
                        r.real_jids.clear();
                        r.nicks.clear();
                        r.own_ids.clear();
                        for p in r.puppets.values_mut() {
                            p.joined = None;
                        }
                    }
                }
                for portal in &portals {
                    if let Some(room) = Self::room_of(portal) {
                        self.start_sync(&room, generation);
                    }
                }
                tracing::info!(generation, rooms = portals.len(), "rejoining the bridged rooms");
                // Matrix members come back as occupants; that waits for the room's answers,
                // which this loop delivers, so it runs apart.
                if let Some(me) = self.me.get().and_then(std::sync::Weak::upgrade) {
                    tokio::spawn(async move { me.rejoin_puppets(portals, generation).await });
                }
                Ok(())
            }
            ConnEvent::Offline => {
                let mut st = self.state();
                st.joins.clear();
                st.reflections.clear();
                st.iqs.clear();
                st.discos.clear();
                // Asked again on the next connection: the server may have changed meanwhile.
                for r in st.rooms.values_mut() {
                    r.occupant_ids = None;
                }
                Ok(())
            }
            ConnEvent::Stanza(s) => match &**s {
                Stanza::Message(m) => self.on_xmpp_message(m).await,
                Stanza::Presence(p) => self.on_xmpp_presence(p).await,
                Stanza::Iq(iq) => {
                    self.on_iq(iq);
                    Ok(())
                }
            },
        }
    }

    /// Who a stanza is for: the bot (`None`) or a puppet (its Matrix id); `Err` if nobody.
    fn recipient(&self, to: Option<&Jid>) -> Result<Option<String>, ()> {
        let Some(to) = to else { return Err(()) };
        if to.domain().as_str() != self.component {
            return Err(());
        }
        match to.node().map(|n| n.as_str()) {
            None => Ok(None),
            Some(n) if n == self.cfg().bot_localpart => Ok(None),
            Some(n) => mxid_of_puppet(n).map(Some).ok_or(()),
        }
    }

    fn reject_message(&self, m: &XMessage, condition: DefinedCondition, why: &str) {
        tracing::info!(from = ?m.from.as_ref().map(ToString::to_string), why, "rejecting a message");
        if m.type_ == XMessageType::Error {
            return;
        }
        let (Some(from), Some(to)) = (m.from.clone(), m.to.clone()) else { return };
        if self.cfg().muc_services.iter().any(|s| s == from.domain().as_str()) {
            // An error to a room occupant makes the room remove our occupant (XEP-0045).
            return;
        }
        let mut e = XMessage::error(from);
        e.from = Some(to);
        e.id = m.id.clone();
        e.payloads.push(stanzas::error(condition, why).into());
        let _ = self.xmpp.send(e);
    }

    async fn on_xmpp_message(&self, m: &XMessage) -> Result<(), BridgeError> {
        let Ok(recipient) = self.recipient(m.to.as_ref()) else {
            self.reject_message(m, DefinedCondition::ServiceUnavailable, "no such user");
            return Ok(());
        };
        let Some(from) = m.from.as_ref() else { return Ok(()) };
        let room = from.node().and_then(|n| RoomJid::new(n.as_str(), from.domain().as_str()));
        let allowed = room.as_ref().is_some_and(|r| self.cfg().muc_services.contains(&r.service));
        if m.type_ == XMessageType::Error {
            if let (Some(room), Some(id)) = (room, m.id.as_ref()) {
                let cond = m
                    .payloads
                    .iter()
                    .find(|e| e.name() == "error")
                    .and_then(|e| e.children().next().map(|c| c.name().to_owned()))
                    .unwrap_or_else(|| "error".to_owned());
                if let Some(tx) = self.state().reflections.remove(&(room.bare(), id.0.clone())) {
                    let _ = tx.send(Err(cond));
                }
            }
            return Ok(());
        }
        // A result of the bot's archive query (XEP-0313), from the room itself.
        if recipient.is_none()
            && from.resource().is_none()
            && let (Some(room), true) = (&room, allowed)
            && let Some(a) = stanzas::read_mam_result(m)
        {
            let mut st = self.state();
            match st.archive.get_mut(&a.queryid) {
                Some((r, list)) if *r == room.bare() => {
                    if list.len() < ARCHIVE_PAGE as usize * 2 {
                        list.push(a);
                    }
                }
                _ => tracing::debug!(room = room.bare(), "ignoring an unexpected archive result"),
            }
            return Ok(());
        }
        if matches!(m.type_, XMessageType::Chat | XMessageType::Normal)
            && let Some(mxid) = &recipient
            && !self.cfg().muc_services.iter().any(|s| s == from.domain().as_str())
        {
            return self.on_private_message(m, mxid).await;
        }
        // A mediated invitation (XEP-0045 §7.8.2), which the room sends to the invitee.
        if let (Some(mxid), Some(room), true) = (&recipient, &room, allowed)
            && from.resource().is_none()
            && let Some((inviter, reason)) = stanzas::read_mediated_invite(m)
        {
            return self.xmpp_invite(room, mxid, inviter.as_deref(), reason.as_deref()).await;
        }
        if !stanzas::is_groupchat(m) {
            self.reject_message(
                m,
                DefinedCondition::FeatureNotImplemented,
                "private messages are not bridged yet",
            );
            return Ok(());
        }
        let (Some(room), true) = (room, allowed) else {
            self.reject_message(m, DefinedCondition::NotAcceptable, "not from a bridged room");
            return Ok(());
        };
        // From the room itself (not an occupant): a moderator's retraction, or nothing for us.
        if from.resource().is_none() {
            return match stanzas::read_moderation(m) {
                Some(moderated) if recipient.is_none() => {
                    self.xmpp_moderated(&room, &moderated).await
                }
                _ => Ok(()),
            };
        }
        let Some(msg) = stanzas::read_muc_message(m, &room) else {
            // A groupchat message without a nick is the room itself (e.g. a status message).
            return Ok(());
        };
        let key = room.bare();
        // Reflections of our own messages: resolve the sender's waiter, bridge nothing.
        let reflected = msg
            .origin_id
            .as_ref()
            .and_then(|oid| self.state().reflections.remove(&(key.clone(), oid.clone())));
        if let Some(tx) = reflected {
            let _ = tx.send(Ok(msg.stanza_id.clone()));
            // The room's archive has it too: the catch-up starts after it.
            let catching_up = self.state().rooms.get(&key).is_some_and(|r| r.catchup.is_some());
            if let (Some(sid), false) = (&msg.stanza_id, catching_up) {
                self.move_cursor(&key, Some(sid), now_ms()).await;
            }
            return Ok(());
        }
        // Every occupant of ours gets a copy: only the bot's is read.
        if recipient.is_some() {
            return Ok(());
        }
        let occupant_id = self.trusted_id(&room, msg.occupant_id.as_deref());
        let ours = {
            let st = self.state();
            st.is_ours(&key, &msg.nick) || st.is_own_id(&key, occupant_id)
        };
        if msg.nick == self.cfg().bot_nick || ours {
            return Ok(());
        }
        if msg.delayed {
            // The join history: bridged only when the bot asked for it (a room without an
            // archive, see `sync_room`).
            {
                let mut st = self.state();
                let Some(r) = st.rooms.get_mut(&key).filter(|r| r.accept_history) else {
                    return Ok(());
                };
                if msg.subject.is_some() && msg.body.is_none() {
                    // The subject ends the join history.
                    r.accept_history = false;
                }
            }
            return self.room_message(&room, msg, true).await;
        }
        {
            let mut st = self.state();
            let r = st.rooms.entry(key.clone()).or_default();
            r.accept_history = false;
            if r.catchup.is_some() {
                // The room's history is being bridged: this comes after it.
                if r.held.len() < HELD {
                    tracing::debug!(
                        room = key,
                        "holding a live message until the history is bridged"
                    );
                    r.held.push(msg);
                } else {
                    tracing::warn!(
                        room = key,
                        "too many messages held during the catch-up; dropping one"
                    );
                }
                return Ok(());
            }
        }
        self.room_message(&room, msg, false).await
    }

    /// Records that the bridge is at the message `sid` (sent at `ts`) in `room`'s history.
    async fn move_cursor(&self, room: &str, sid: Option<&str>, ts: i64) {
        let cursor = Cursor { sid: sid.map(str::to_owned), ts };
        let value = serde_json::to_string(&cursor).unwrap_or_default();
        if let Err(e) = self.ctx.store().kv_set(&format!("xmpp.cursor:{room}"), &value).await {
            tracing::warn!(room, error = %e, "cannot record the room's history cursor");
        }
    }

    /// Where the bridge is in `room`'s history, if it has bridged anything there.
    async fn cursor(&self, room: &str) -> Result<Option<Cursor>, BridgeError> {
        let v = self.ctx.store().kv_get(&format!("xmpp.cursor:{room}")).await?;
        Ok(v.and_then(|v| serde_json::from_str(&v).ok()))
    }

    /// An occupant's message in `room`, live or (`history`) from the room's history (its
    /// archive or the join history): bridged once (by its stanza-id), then the room's cursor
    /// moves to it. Corrections, retractions and reactions are remembered as done, so that the
    /// history never applies them twice.
    async fn room_message(
        &self,
        room: &RoomJid,
        msg: MucMessage,
        history: bool,
    ) -> Result<(), BridgeError> {
        let key = room.bare();
        let sid = msg.stanza_id.clone();
        let relation = msg.replaces.is_some() || msg.retracts.is_some() || msg.reactions.is_some();
        let ts = if history { msg.stamp_ms.unwrap_or_else(now_ms) } else { now_ms() };
        // Chat states and markers are not archived: only messages move the cursor.
        let content = msg.body.is_some() || msg.oob_url.is_some() || msg.reactions.is_some();
        self.bridge_room_message(room, msg, history).await?;
        if let (Some(sid), true) = (&sid, relation) {
            self.ctx.store().kv_set(&format!("xmpp.done:{key}:{sid}"), "1").await?;
        }
        if sid.is_some() || content {
            self.move_cursor(&key, sid.as_deref(), ts).await;
        }
        Ok(())
    }

    /// Whether a message of the room's history was bridged before, or came from Matrix: its
    /// stanza-id is mapped (or its correction, retraction or reaction applied), its origin-id
    /// is a Matrix event the bridge knows (a Matrix user's own message), or its sender's id is
    /// mapped (rooms without stanza-ids).
    async fn bridged_before(
        &self,
        room: &RoomJid,
        room_id: &str,
        msg: &MucMessage,
    ) -> Result<bool, BridgeError> {
        let key = room.bare();
        let store = self.ctx.store();
        if let Some(sid) = &msg.stanza_id
            && (store.kv_get(&format!("xmpp.sid:{key}:{sid}")).await?.is_some()
                || store.kv_get(&format!("xmpp.done:{key}:{sid}")).await?.is_some())
        {
            return Ok(true);
        }
        let oid = msg.origin_id.as_ref().or(msg.id.as_ref());
        if let Some(oid) = oid.filter(|i| i.starts_with('$'))
            && store.message_by_event(room_id, oid).await?.is_some()
        {
            return Ok(true);
        }
        if let Some(id) = msg.id.as_ref().or(msg.origin_id.as_ref()) {
            let ghost = self.occupant_ghost(room, &msg.nick, msg.occupant_id.as_deref()).0;
            let remote = format!("{ghost}|{id}");
            if msg.replaces.is_none()
                && !store.messages_by_remote(room_id, &remote).await?.is_empty()
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The work of [`Self::room_message`].
    async fn bridge_room_message(
        &self,
        room: &RoomJid,
        msg: MucMessage,
        history: bool,
    ) -> Result<(), BridgeError> {
        let key = room.bare();
        let Some(portal) = self.ctx.store().portal_by_remote(&room.remote_id()).await? else {
            return Ok(());
        };
        if let (Some(subject), None) = (&msg.subject, &msg.body) {
            if history {
                // An old subject: the current one comes on every join.
                return Ok(());
            }
            let changed = {
                let mut st = self.state();
                let r = st.rooms.entry(key.clone()).or_default();
                let changed = r.subject.as_ref() != Some(subject);
                r.subject = Some(subject.clone());
                changed
            };
            // An empty subject means "none": it never clears a topic set on Matrix, and the
            // subject the room repeats on every join is only sent when the Matrix topic differs.
            if changed && !subject.trim().is_empty() {
                let current = self
                    .ctx
                    .bot()
                    .get_state_event(&portal.room_id, "m.room.topic", "")
                    .await
                    .ok()
                    .flatten()
                    .and_then(|v| v.get("topic").and_then(Value::as_str).map(str::to_owned));
                if current.as_deref() != Some(subject.as_str()) {
                    self.ctx
                        .bot()
                        .send_state(
                            &portal.room_id,
                            "m.room.topic",
                            "",
                            json!({"topic": subject}),
                            None,
                        )
                        .await?;
                }
            }
            return Ok(());
        }
        let known = if history {
            self.bridged_before(room, &portal.room_id, &msg).await?
        } else if let Some(sid) = &msg.stanza_id {
            let store = self.ctx.store();
            store.kv_get(&format!("xmpp.sid:{key}:{sid}")).await?.is_some()
                || store.kv_get(&format!("xmpp.done:{key}:{sid}")).await?.is_some()
        } else {
            false
        };
        if known {
            tracing::debug!(room = key, sid = msg.stanza_id, "dropping a message bridged before");
            return Ok(());
        }
        let occupant_id = self.trusted_id(room, msg.occupant_id.as_deref());
        let dedupe = msg.stanza_id.clone().or_else(|| msg.origin_id.clone()).or_else(|| {
            msg.id.clone().map(|i| format!("{}/{}", occupant_id.unwrap_or(&msg.nick), i))
        });
        if let Some(k) = &dedupe
            && !self.state().first_time(format!("{key}|{k}"))
        {
            tracing::debug!(room = key, id = k, "dropping a duplicate message");
            return Ok(());
        }
        // Marked seen before it is bridged (a copy arriving meanwhile is dropped); a failure
        // unmarks it, so that the retry of this stanza is not taken for a duplicate.
        let result: Result<(), BridgeError> = async {
            let (ghost, remote_id) =
                self.occupant_ghost(room, &msg.nick, msg.occupant_id.as_deref());
            self.ctx
                .ensure_ghost(
                    &ghost,
                    &GhostProfile {
                        remote_id,
                        displayname: Some(msg.nick.clone()),
                        avatar_url: None,
                    },
                )
                .await?;
            let cause = format!(
                "xmpp:{key}:{}",
                dedupe.clone().unwrap_or_else(|| rand::random::<u64>().to_string())
            );
            let txn = self.ctx.txn_id_for(&cause, 0);
            if let Some(target) = &msg.retracts {
                let event = self.ctx.store().kv_get(&format!("xmpp.sid:{key}:{target}")).await?;
                if let Some(event) = event
                    && let Some(map) =
                        self.ctx.store().message_by_event(&portal.room_id, &event).await?
                    && map.sender == ghost
                {
                    self.ctx.intent(&ghost).redact(&portal.room_id, &event, None).await?;
                } else {
                    tracing::info!(
                        room = key,
                        nick = msg.nick,
                        "ignoring a retraction of an unknown or someone else's message"
                    );
                }
                return Ok(());
            }
            let content_less =
                msg.body.is_none() && msg.oob_url.is_none() && msg.reactions.is_none();
            if history && (msg.displayed.is_some() || content_less) {
                // Old markers and chat states mean nothing now.
                return Ok(());
            }
            // XEP-0085: composing → typing; any other state, or a message, ends it.
            let typing = msg.chat_state.as_deref() == Some("composing") && msg.body.is_none();
            let was = {
                let mut st = self.state();
                let r = st.rooms.entry(key.clone()).or_default();
                if typing {
                    !r.ghosts_typing.insert(ghost.clone())
                } else {
                    r.ghosts_typing.remove(&ghost)
                }
            };
            if !history
                && (typing || (was && (msg.chat_state.is_some() || msg.body.is_some())))
                && let Err(e) =
                    self.ctx.intent(&ghost).set_typing(&portal.room_id, typing, TYPING).await
            {
                tracing::debug!(error = %e, ghost, "could not set typing");
            }
            if let Some((target, keys)) = &msg.reactions {
                return self
                    .xmpp_reactions(&portal.room_id, room, &ghost, target, keys, &cause)
                    .await;
            }
            if let (Some(id), None) = (&msg.displayed, &msg.body) {
                return self.xmpp_displayed(&portal.room_id, room, &ghost, id).await;
            }
            // A file (XEP-0066), unless it is a correction: those only change the text.
            let file = msg.oob_url.clone().filter(|_| msg.replaces.is_none());
            let Some(body) = msg.body.clone().or_else(|| file.clone()) else { return Ok(()) };
            let (msgtype, mut text) = match body.strip_prefix("/me ") {
                Some(rest) => ("m.emote", rest.to_owned()),
                None => ("m.text", body.clone()),
            };
            let mut content = text_content(msgtype, &text);
            if let Some(url) = &file {
                let caption = Some(body.trim()).filter(|b| !b.is_empty() && *b != url.trim());
                (content, text) = self.file_content(&ghost, url, caption).await?;
            }
            if let Some(orig) = &msg.replaces {
                let remote = format!("{ghost}|{orig}");
                let parts = self.ctx.store().messages_by_remote(&portal.room_id, &remote).await?;
                if let Some(first) = parts.first() {
                    content = json!({
                        "msgtype": msgtype,
                        "body": format!("* {text}"),
                        "m.new_content": text_content(msgtype, &text),
                        "m.relates_to": {"rel_type": "m.replace", "event_id": first.event_id},
                    });
                } else if history {
                    // A correction of a message older than the history bridged: not a new message.
                    tracing::debug!(
                        room = key,
                        orig,
                        "skipping a correction of an unknown message"
                    );
                    return Ok(());
                }
            } else if let Some((id, to)) = &msg.reply_to
                && let Some(target) =
                    self.target_event(&portal.room_id, room, id, to.as_deref()).await?
            {
                content["m.relates_to"] = json!({"m.in_reply_to": {"event_id": target}});
            }
            // History keeps its original time (timestamp massaging), never later than now.
            let ts = history
                .then_some(msg.stamp_ms)
                .flatten()
                .map(|t| u64::try_from(t.clamp(0, now_ms())).unwrap_or_default());
            let event_id = self
                .ctx
                .send_as(&ghost, &portal.room_id, "m.room.message", content, &txn, ts)
                .await?;
            if msg.replaces.is_none()
                && msg.id.is_none()
                && msg.origin_id.is_none()
                && let Some(sid) = &msg.stanza_id
            {
                // No id of the sender's: the stanza-id alone keeps it from being bridged twice.
                self.ctx.store().kv_set(&format!("xmpp.sid:{key}:{sid}"), &event_id).await?;
                self.ctx.store().kv_set(&format!("xmpp.ev:{event_id}"), sid).await?;
            }
            if msg.replaces.is_none()
                && let Some(id) = msg.id.as_ref().or(msg.origin_id.as_ref())
            {
                self.record(
                    &portal.room_id,
                    &format!("{ghost}|{id}"),
                    &event_id,
                    &ghost,
                    msg.stanza_id.as_deref(),
                    room,
                )
                .await?;
                self.remember_text(&event_id, &text).await?;
                if msg.markable {
                    self.ctx.store().kv_set(&format!("xmpp.markable:{event_id}"), "1").await?;
                }
            }
            Ok(())
        }
        .await;
        if result.is_err()
            && let Some(k) = &dedupe
        {
            self.state().forget(&format!("{key}|{k}"));
        }
        result
    }

    /// A 1:1 message from an XMPP user to a Matrix user's JID: the user's ghost brings it to a
    /// direct chat with the Matrix user (created by the ghost, which invites them).
    async fn on_private_message(&self, m: &XMessage, mxid: &str) -> Result<(), BridgeError> {
        let Some(from) = m.from.as_ref() else { return Ok(()) };
        let bare = from.to_bare();
        let local = mxid.rsplit_once(':').is_some_and(|(_, d)| d == self.ctx.domain());
        if !local
            || self.ctx.is_bridge_user(mxid)
            || self.ctx.permission(mxid) < PermissionLevel::Relay
        {
            self.reject_message(m, DefinedCondition::ItemNotFound, "no such Matrix user");
            return Ok(());
        }
        // Chat states, receipts and other bodyless messages are not bridged in private chats.
        let file = stanzas::oob_url(m);
        let Some(body) = m.get_best_body_cloned(vec![]).map(|(_, b)| b).or_else(|| file.clone())
        else {
            return Ok(());
        };
        let id = m.id.as_ref().map(|i| i.0.clone());
        if let Some(id) = &id
            && !self.state().first_time(format!("dm|{bare}|{mxid}|{id}"))
        {
            return Ok(());
        }
        let ghost = self.ids.ghost_of_jid(&bare);
        self.ctx
            .ensure_ghost(
                &ghost,
                &GhostProfile {
                    remote_id: bare.to_string(),
                    displayname: Some(bare.to_string()),
                    avatar_url: None,
                },
            )
            .await?;
        let key = format!("xmpp.dm:{bare}|{mxid}");
        let room_id = match self.ctx.store().kv_get(&key).await? {
            Some(r) => r,
            None => {
                let room_id = self
                    .ctx
                    .intent(&ghost)
                    .create_room(&CreateRoom {
                        invite: vec![mxid.to_owned()],
                        is_direct: true,
                        preset: Some(RoomPreset::TrustedPrivateChat),
                        ..CreateRoom::default()
                    })
                    .await?;
                self.remember_dm(&bare.to_string(), mxid, &room_id).await?;
                tracing::info!(jid = %bare, mxid, room_id, "created a direct chat");
                room_id
            }
        };
        let (msgtype, text) = match body.strip_prefix("/me ") {
            Some(rest) => ("m.emote", rest.to_owned()),
            None => ("m.text", body.clone()),
        };
        let cause = format!(
            "xmpp-dm:{bare}|{mxid}:{}",
            id.clone().unwrap_or_else(|| rand::random::<u64>().to_string())
        );
        let txn = self.ctx.txn_id_for(&cause, 0);
        let mut content = text_content(msgtype, &text);
        if let Some(url) = &file {
            let caption = Some(body.trim()).filter(|b| !b.is_empty() && *b != url.trim());
            content = self.file_content(&ghost, url, caption).await?.0;
        }
        self.ctx.send_as(&ghost, &room_id, "m.room.message", content, &txn, None).await?;
        Ok(())
    }

    async fn remember_dm(&self, jid: &str, mxid: &str, room_id: &str) -> Result<(), BridgeError> {
        self.ctx.store().kv_set(&format!("xmpp.dm:{jid}|{mxid}"), room_id).await?;
        self.ctx
            .store()
            .kv_set(&format!("xmpp.dmroom:{room_id}"), &json!([jid, mxid]).to_string())
            .await?;
        Ok(())
    }

    /// The XMPP user and the Matrix user of a direct chat room.
    async fn dm_of_room(&self, room_id: &str) -> Result<Option<(String, String)>, BridgeError> {
        Ok(self
            .ctx
            .store()
            .kv_get(&format!("xmpp.dmroom:{room_id}"))
            .await?
            .and_then(|v| serde_json::from_str(&v).ok()))
    }

    async fn on_xmpp_presence(&self, p: &Presence) -> Result<(), BridgeError> {
        let Ok(recipient) = self.recipient(p.to.as_ref()) else { return Ok(()) };
        let Some(from) = p.from.as_ref() else { return Ok(()) };
        let Some(room) = from.node().and_then(|n| RoomJid::new(n.as_str(), from.domain().as_str()))
        else {
            return Ok(());
        };
        if !self.cfg().muc_services.contains(&room.service) {
            return Ok(());
        }
        let Some(pr) = stanzas::read_muc_presence(p) else { return Ok(()) };
        let key = room.bare();
        if let Some(mxid) = recipient {
            // About one of our puppets.
            let bare = self.puppet_jid(&mxid).map(|j| j.to_bare().to_string()).unwrap_or_default();
            let mut st = self.state();
            if let Some(cond) = &pr.error {
                if let Some(tx) = st.joins.remove(&(key.clone(), bare)) {
                    let _ = tx.send(if cond == "conflict" {
                        Joined::Conflict
                    } else {
                        Joined::Refused(cond.clone())
                    });
                }
                tracing::info!(room = key, mxid, cond, "a join was refused");
            } else if pr.is_self() && pr.unavailable {
                // Left (or removed); a nick change (303) is followed by the new self-presence.
                // A puppet the bridge already forgot (the Matrix user left) stays forgotten, so
                // its old nick is free for XMPP users again.
                if !pr.codes.contains(&303)
                    && let Some(p) = st.rooms.get_mut(&key).and_then(|r| r.puppets.get_mut(&mxid))
                {
                    p.joined = None;
                    tracing::info!(room = key, mxid, codes = ?pr.codes, "a puppet left or was removed");
                }
            } else if pr.is_self() {
                let generation = self.xmpp.generation();
                let puppet =
                    st.rooms.entry(key.clone()).or_default().puppets.entry(mxid).or_insert_with(
                        || Puppet { nick: pr.nick.clone(), joined: None, affiliation: None },
                    );
                puppet.nick = pr.nick.clone();
                puppet.affiliation.clone_from(&pr.affiliation);
                puppet.joined = generation;
                if let Some(id) = &pr.occupant_id {
                    // Only consulted for rooms that advertise occupant-ids.
                    st.rooms.entry(key.clone()).or_default().own_ids.insert(id.clone());
                }
                if let Some(tx) = st.joins.remove(&(key.clone(), bare)) {
                    let _ = tx.send(Joined::Ok(pr.nick.clone()));
                }
            }
            return Ok(());
        }
        // Presences the bot sees: occupants coming and going.
        if let Some(cond) = &pr.error {
            let failures = {
                let mut st = self.state();
                let r = st.rooms.entry(key.clone()).or_default();
                r.bot_failures += 1;
                r.bot_failures
            };
            if failures > BOT_JOIN_TRIES {
                tracing::error!(
                    room = key,
                    cond,
                    "the bot cannot join the room; giving up until the next reconnect"
                );
                if failures == BOT_JOIN_TRIES + 1
                    && let Some(portal) =
                        self.ctx.store().portal_by_remote(&room.remote_id()).await?
                {
                    self.ctx
                        .notice(
                            &portal.room_id,
                            &format!("⚠️ The bridge cannot join {key} on XMPP ({cond}); messages are not bridged until it can (it tries again after reconnecting)."),
                        )
                        .await;
                }
                return Ok(());
            }
            let delay = Duration::from_secs(5 * u64::from(failures));
            tracing::warn!(
                room = key,
                cond,
                failures,
                delay_s = delay.as_secs(),
                "the bot could not join; trying again"
            );
            if let (Some(me), Some(generation)) =
                (self.me.get().and_then(std::sync::Weak::upgrade), self.xmpp.generation())
            {
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    if me.xmpp.generation() == Some(generation) {
                        me.join_bot(&room);
                    }
                });
            }
            return Ok(());
        }
        if pr.is_self() && pr.codes.contains(&201) {
            // The bot created the room: unlock it with the default configuration.
            if let Some(iq) = stanzas::instant_room(
                &self.bot,
                &room,
                &format!("unlock-{}", rand::random::<u32>()),
            ) {
                let _ = self.xmpp.send(iq);
            }
            tracing::info!(room = key, "created the room on the XMPP side");
        }
        if pr.is_self() {
            if !pr.unavailable {
                let generation = self.xmpp.generation();
                let features_known = {
                    let mut st = self.state();
                    let r = st.rooms.entry(key.clone()).or_default();
                    r.bot_joined = generation;
                    r.bot_failures = 0;
                    if let Some(id) = &pr.occupant_id {
                        r.own_ids.insert(id.clone());
                    }
                    r.occupant_ids.is_some()
                };
                if !features_known {
                    // The room did not exist before the bot's join (or did not answer).
                    self.query_features(&room);
                }
                self.bot_ready.notify_waiters();
            } else {
                self.state().rooms.entry(key.clone()).or_default().bot_joined = None;
            }
            return Ok(());
        }
        if pr.nick == self.cfg().bot_nick {
            return Ok(());
        }
        let real_is_ours = pr
            .real_jid
            .as_deref()
            .and_then(|j| Jid::new(j).ok())
            .is_some_and(|j| j.domain().as_str() == self.component);
        let occupant_id = self.trusted_id(&room, pr.occupant_id.as_deref());
        {
            let mut st = self.state();
            let ours = real_is_ours || st.is_ours(&key, &pr.nick);
            let r = st.rooms.entry(key.clone()).or_default();
            if let Some(id) = occupant_id {
                if ours {
                    r.own_ids.insert(id.to_owned());
                } else if !pr.unavailable {
                    r.nicks.insert(id.to_owned(), pr.nick.clone());
                } else if r.nicks.get(id) == Some(&pr.nick) {
                    r.nicks.remove(id);
                }
            }
            if ours || r.own_ids.contains(occupant_id.unwrap_or_default()) {
                return Ok(());
            }
        }
        {
            let mut st = self.state();
            let r = st.rooms.entry(key.clone()).or_default();
            match pr.real_jid.as_deref().and_then(|j| Jid::new(j).ok()) {
                Some(j) if !pr.unavailable => {
                    r.real_jids.insert(pr.nick.clone(), j.to_bare().to_string());
                }
                _ => {
                    r.real_jids.remove(&pr.nick);
                }
            }
        }
        let Some(portal) = self.ctx.store().portal_by_remote(&room.remote_id()).await? else {
            return Ok(());
        };
        let (ghost, remote_id) = self.occupant_ghost(&room, &pr.nick, pr.occupant_id.as_deref());
        if pr.unavailable && occupant_id.is_some() && pr.codes.contains(&303) {
            // A nick change in a room with occupant-ids: the same ghost, renamed when the
            // presence under the new nick comes.
            tracing::debug!(room = key, nick = pr.nick, new = ?pr.new_nick, ghost, "a nick change");
            return Ok(());
        }
        let membership = self.ctx.store().membership(&portal.room_id, &ghost).await?;
        if pr.unavailable {
            self.ghost_presence(&ghost, &pr).await;
            let joined = membership.as_deref() == Some("join");
            let why = |what: &str| {
                let by = pr.actor.as_ref().map(|a| format!(" by {a}")).unwrap_or_default();
                let reason = pr.reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default();
                format!("{what} on XMPP{by}{reason}")
            };
            if pr.codes.contains(&301)
                && let Some(real) = pr.real_jid.as_deref().and_then(|j| Jid::new(j).ok())
            {
                // Kept for lifting the ban from Matrix (the room no longer shows the address).
                let key = format!("xmpp.outcast:{remote_id}");
                self.ctx.store().kv_set(&key, &real.to_bare().to_string()).await?;
            }
            if pr.codes.contains(&301) && membership.as_deref() != Some("ban") {
                self.ctx.bot().ban(&portal.room_id, &ghost, Some(&why("Banned"))).await?;
            } else if joined && pr.codes.contains(&307) {
                self.ctx.bot().kick(&portal.room_id, &ghost, Some(&why("Kicked"))).await?;
            } else if joined {
                self.ctx.intent(&ghost).leave(&portal.room_id).await?;
            }
        } else {
            if membership.as_deref() == Some("ban") {
                // Banned earlier from XMPP; the room let the occupant in again, so it was lifted.
                self.ctx.bot().unban(&portal.room_id, &ghost, None).await?;
                self.ctx.store().kv_delete(&format!("xmpp.outcast:{remote_id}")).await?;
            }
            self.ctx
                .ensure_ghost(
                    &ghost,
                    &GhostProfile {
                        remote_id: remote_id.clone(),
                        displayname: Some(pr.nick.clone()),
                        avatar_url: None,
                    },
                )
                .await?;
            self.ctx.intent(&ghost).ensure_joined(&portal.room_id).await?;
            self.ghost_power(&portal.room_id, &ghost, &pr).await;
            self.ghost_presence(&ghost, &pr).await;
            if let Some(hash) = &pr.photo {
                self.ghost_avatar(&room, &pr.nick, &ghost, &remote_id, hash);
            }
        }
        Ok(())
    }

    /// An occupant announced its avatar (XEP-0153) as `hash` (`""`: none). When that is not
    /// the hash last bridged for its ghost, a task (so that messages are not held up) fetches
    /// the occupant's vCard through the room (see [`stanzas::vcard_get`]), checks the photo's
    /// size (`files.max_bytes`) and SHA-1, uploads it and sets it as the ghost's avatar; `""`
    /// clears the avatar. One fetch per ghost at a time; failures are logged, and the next
    /// presence with the hash tries again.
    fn ghost_avatar(&self, room: &RoomJid, nick: &str, ghost: &str, remote_id: &str, hash: &str) {
        let Some(me) = self.me.get().and_then(std::sync::Weak::upgrade) else { return };
        let Some(generation) = self.xmpp.generation() else { return };
        {
            let mut st = self.state();
            if st.avatars.get(ghost).is_some_and(|h| h == hash) {
                return;
            }
            st.avatars.insert(ghost.to_owned(), hash.to_owned());
        }
        let (room, nick, ghost, remote_id, hash) = (
            room.clone(),
            nick.to_owned(),
            ghost.to_owned(),
            remote_id.to_owned(),
            hash.to_owned(),
        );
        tokio::spawn(async move {
            let result =
                me.fetch_avatar(&room, &nick, (&ghost, &remote_id), &hash, generation).await;
            {
                let mut st = me.state();
                if st.avatars.get(&ghost) == Some(&hash) {
                    st.avatars.remove(&ghost);
                }
            }
            match result {
                Ok(Ok(())) => {}
                Ok(Err(why)) => {
                    tracing::info!(
                        room = room.bare(),
                        nick,
                        hash,
                        why,
                        "could not bridge an avatar"
                    );
                }
                Err(e) => {
                    tracing::warn!(room = room.bare(), nick, hash, error = %e, "could not bridge an avatar");
                }
            }
        });
    }

    /// The work of [`Self::ghost_avatar`]: `Ok(Err(why))` when the occupant's side fails (no
    /// answer, no photo, a wrong hash), `Err` when Matrix does.
    async fn fetch_avatar(
        &self,
        room: &RoomJid,
        nick: &str,
        (ghost, remote_id): (&str, &str),
        hash: &str,
        generation: u64,
    ) -> Result<Result<(), String>, BridgeError> {
        let key = format!("xmpp.avatar:{ghost}");
        if self.ctx.store().kv_get(&key).await?.as_deref() == Some(hash) {
            return Ok(Ok(()));
        }
        let avatar_url = if hash.is_empty() {
            String::new()
        } else {
            let Some(to) = stanzas::occupant(room, nick) else {
                return Ok(Err("the nick cannot be addressed".to_owned()));
            };
            let id = format!("vcard-{}", rand::random::<u64>());
            let iq = stanzas::vcard_get(&self.bot, &to, &id);
            let vcard = match self.request(room, iq, generation).await? {
                Ok(Some(v)) if v.is("vCard", stanzas::NS_VCARD) => v,
                Ok(_) => return Ok(Err("the answer has no vCard".to_owned())),
                Err(why) => return Ok(Err(format!("vCard request failed: {why}"))),
            };
            let photo = match stanzas::read_vcard_photo(&vcard, self.cfg().files.max_bytes) {
                Ok(p) => p,
                Err(e) => return Ok(Err(e.to_string())),
            };
            let actual = hex::encode(Sha1::digest(&photo.data));
            if actual != hash {
                return Ok(Err(format!("the vCard's photo has the hash {actual}")));
            }
            let intent = self.ctx.intent(ghost);
            intent.upload_media(photo.data, &photo.mimetype, None).await?
        };
        self.ctx
            .ensure_ghost(
                ghost,
                &GhostProfile {
                    remote_id: remote_id.to_owned(),
                    displayname: None,
                    avatar_url: Some(avatar_url),
                },
            )
            .await?;
        self.ctx.store().kv_set(&key, hash).await?;
        tracing::info!(room = room.bare(), nick, hash, "bridged an avatar");
        Ok(Ok(()))
    }

    /// Gives an occupant's ghost the power level of its affiliation and role (see
    /// [`PowerLevelsConfig::level_of`](crate::config::PowerLevelsConfig::level_of)) when it differs. Best effort: a bot without the power to do so is logged.
    async fn ghost_power(&self, room_id: &str, ghost: &str, pr: &MucPresence) {
        let level = self.cfg().power_levels.level_of(pr.affiliation.as_deref(), pr.role.as_deref());
        let bot = self.ctx.bot();
        let current = match bot.power_levels(room_id).await {
            Ok(pl) => pl["users"]
                .get(ghost)
                .and_then(Value::as_i64)
                .unwrap_or_else(|| pl["users_default"].as_i64().unwrap_or(0)),
            Err(e) => {
                tracing::warn!(room_id, error = %e, "cannot read the power levels");
                return;
            }
        };
        if current == level {
            return;
        }
        if let Err(e) = bot.set_user_power_level(room_id, ghost, level).await {
            tracing::warn!(room_id, ghost, level, error = %e, "could not set a ghost's power level");
        }
    }

    /// An occupant's availability as its ghost's Matrix presence (see [`presence_of`]), sent
    /// when it changes. Best effort: a homeserver with presence disabled refuses, which is
    /// logged.
    async fn ghost_presence(&self, ghost: &str, pr: &MucPresence) {
        let (presence, status) = presence_of(pr);
        let key = format!("{presence:?}|{status:?}");
        if self.state().presences.get(ghost) == Some(&key) {
            return;
        }
        match self.ctx.intent(ghost).set_presence(presence, status.as_deref()).await {
            Ok(()) => {
                self.state().presences.insert(ghost.to_owned(), key);
            }
            Err(e) => tracing::debug!(ghost, error = %e, "could not set a ghost's presence"),
        }
    }

    fn on_iq(&self, iq: &Iq) {
        // A room's features (asked by `query_features`), handled here, in order with the
        // room's presences: whether it stamps XEP-0421 occupant-ids.
        if let Iq::Result { from, id, .. } | Iq::Error { from, id, .. } = iq {
            let mut st = self.state();
            let room = st.discos.get(id).cloned();
            if let Some(room) = room
                && from.as_ref().is_some_and(|f| f.to_string() == room)
            {
                st.discos.remove(id);
                let supported = match iq {
                    Iq::Result { payload: Some(q), .. } => Some(
                        stanzas::disco_features(q).iter().any(|f| f == stanzas::NS_OCCUPANT_ID),
                    ),
                    Iq::Result { payload: None, .. } => Some(false),
                    _ => None,
                };
                let r = st.rooms.entry(room.clone()).or_default();
                if supported.is_some() {
                    r.occupant_ids = supported;
                }
                tracing::debug!(room, occupant_ids = ?supported, "the room's features");
                return;
            }
        }
        // Answers to the bridge's own requests (room moderation).
        let answer = match iq {
            Iq::Result { from, id, payload, .. } => Some((from, id, Ok(payload.clone()))),
            Iq::Error { from, id, error, .. } => {
                let text = error.texts.values().next().cloned();
                // The condition's element name (`not-allowed`), as the room sent it.
                let cond = Element::from(error.defined_condition.clone()).name().to_owned();
                Some((
                    from,
                    id,
                    Err(text.map_or_else(|| cond.clone(), |t| format!("{t} ({cond})"))),
                ))
            }
            _ => None,
        };
        if let Some((from, id, result)) = answer {
            let mut st = self.state();
            let expected = st.iqs.get(id).is_some_and(|(room, _)| {
                from.as_ref().is_some_and(|f| f.to_bare().to_string() == *room)
            });
            if expected && let Some((_, tx)) = st.iqs.remove(id) {
                let _ = tx.send(result);
            }
            return;
        }
        let (from, to, id) = match &iq {
            Iq::Get { from, to, id, .. } | Iq::Set { from, to, id, .. } => {
                (from.clone(), to.clone(), id.clone())
            }
            _ => return,
        };
        let Some(from) = from else { return };
        let for_component = to.as_ref().is_some_and(|t| t.node().is_none());
        let known = self.recipient(to.as_ref()).is_ok();
        let reply = match (iq, known) {
            (_, false) => {
                Iq::from_error(id, stanzas::error(DefinedCondition::ItemNotFound, "no such user"))
            }
            // A query for another node than our capabilities' (XEP-0115 §6.2) names nothing.
            (Iq::Get { payload, .. }, true)
                if payload.is("query", ns::DISCO_INFO)
                    && payload
                        .attr("node")
                        .is_some_and(|n| for_component || n != stanzas::user_caps_node()) =>
            {
                Iq::from_error(id, stanzas::error(DefinedCondition::ItemNotFound, "no such node"))
            }
            (Iq::Get { payload, .. }, true) if payload.is("query", ns::DISCO_INFO) => {
                let mut info = if for_component {
                    stanzas::disco_info(
                        &self
                            .ctx
                            .config()
                            .appservice
                            .bot_displayname
                            .clone()
                            .unwrap_or_else(|| "Matrix bridge".to_owned()),
                    )
                } else {
                    stanzas::disco_info_user()
                };
                info.node = payload.attr("node").map(str::to_owned);
                Iq::from_result(id, Some(info))
            }
            (Iq::Get { payload, .. }, true) if payload.is("query", ns::DISCO_ITEMS) => {
                Iq::from_result(
                    id,
                    Some(DiscoItemsResult { node: None, items: Vec::new(), rsm: None }),
                )
            }
            (Iq::Get { payload, .. }, true) if payload.is("query", ns::VERSION) => Iq::from_result(
                id,
                Some(VersionResult {
                    name: "Trestle XMPP bridge".to_owned(),
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    os: None,
                }),
            ),
            (Iq::Get { payload, .. }, true) if payload.is("ping", ns::PING) => {
                Iq::from_result(id, None::<VersionResult>)
            }
            (Iq::Get { payload, .. }, true) if payload.is("vCard", stanzas::NS_VCARD) => {
                // A Matrix user's vCard may need a download: answered from a task.
                let mxid = self.recipient(to.as_ref()).ok().flatten();
                let Some(me) = self.me.get().and_then(std::sync::Weak::upgrade) else { return };
                tokio::spawn(async move {
                    let vcard = match &mxid {
                        Some(m) => me.puppet_vcard(m).await,
                        None => stanzas::vcard(None),
                    };
                    let reply = Iq::Result { from: to, to: Some(from), id, payload: Some(vcard) };
                    let _ = me.xmpp.send(reply);
                });
                return;
            }
            _ => Iq::from_error(
                id,
                stanzas::error(DefinedCondition::ServiceUnavailable, "not supported"),
            ),
        };
        let reply = reply.with_to(from);
        let reply = match to {
            Some(t) => reply.with_from(t),
            None => reply,
        };
        let _ = self.xmpp.send(reply);
    }
}

/// Handles the connection's events in order; failures are retried a few times.
async fn xmpp_loop(b: Arc<Inner>, mut events: mpsc::Receiver<ConnEvent>) {
    while let Some(ev) = events.recv().await {
        if let Err(err) = retry_remote(|| b.handle(&ev)).await {
            tracing::error!(error = %err, "could not bridge an XMPP stanza");
        }
    }
}

#[async_trait]
impl Bridge for XmppBridge {
    type Config = XmppConfig;

    fn info() -> BridgeInfo {
        BridgeInfo {
            name: "xmpp",
            network_name: "XMPP",
            default_port: 9899,
            protocols: &["xmpp"],
            version: env!("CARGO_PKG_VERSION"),
        }
    }

    fn namespaces(config: &Config<XmppConfig>) -> Namespaces {
        let b = &config.bridge;
        let mut ns = Namespaces::default();
        if let Ok(ids) = Ids::new(
            &b.alias_template,
            &b.user_template,
            &b.muc_services,
            &config.homeserver.domain,
        ) {
            ns.users.push(Namespace { regex: ids.user_regex(), exclusive: true });
            for s in &b.muc_services {
                ns.aliases.push(Namespace { regex: ids.alias_regex(s), exclusive: true });
            }
        }
        ns
    }

    async fn start(ctx: Context<XmppConfig>) -> Result<Self, BridgeError> {
        let cfg = ctx.config().bridge.clone();
        let ids =
            Ids::new(&cfg.alias_template, &cfg.user_template, &cfg.muc_services, ctx.domain())
                .map_err(|e| BridgeError::Permanent(e.to_string()))?;
        let component = cfg.component.jid.clone();
        let bot = FullJid::new(&format!("{}@{component}/{RESOURCE}", cfg.bot_localpart))
            .map_err(|e| BridgeError::Permanent(format!("bot JID: {e}")))?;
        let ping_to = component.split_once('.').map_or(component.as_str(), |(_, d)| d).to_owned();
        let files = Fetcher::new(
            cfg.files.max_bytes,
            Duration::from_secs(cfg.files.timeout_secs),
            cfg.files.allow_private_addresses,
        )
        .map_err(|e| BridgeError::Permanent(format!("HTTP client for files: {e}")))?;
        let (xmpp, events) = conn::spawn(
            ConnConfig {
                jid: component.clone(),
                secret: cfg.component.secret.clone(),
                addr: format!("{}:{}", cfg.component.host, cfg.component.port),
                ping_to,
                min_delay: Duration::from_millis(cfg.connection.reconnect_min_ms),
                max_delay: Duration::from_millis(cfg.connection.reconnect_max_ms),
                ping_interval: Duration::from_secs(cfg.connection.ping_interval_secs),
                queue: cfg.connection.write_queue,
            },
            ctx.shutdown().clone(),
        );
        let inner = Arc::new(Inner {
            ctx,
            ids,
            xmpp,
            files,
            component,
            bot,
            state: Mutex::default(),
            bot_ready: tokio::sync::Notify::new(),
            me: std::sync::OnceLock::new(),
        });
        let _ = inner.me.set(Arc::downgrade(&inner));
        tokio::spawn(xmpp_loop(Arc::clone(&inner), events));
        Ok(Self { inner })
    }

    async fn query_alias(&self, alias: &str) -> Result<Option<PortalSpec>, BridgeError> {
        Ok(self.inner.ids.room_of_alias(alias).map(|r| self.inner.portal_spec(&r)))
    }

    fn commands(&self, registry: &mut trestle::commands::CommandRegistry<Self>) {
        commands::register(registry);
    }

    async fn portal_created(&self, portal: &Portal) -> Result<(), BridgeError> {
        if let Some(room) = Inner::room_of(portal) {
            self.inner.portal_new(&room);
        }
        Ok(())
    }

    async fn query_user(&self, user_id: &str) -> Result<Option<GhostProfile>, BridgeError> {
        let b = &self.inner;
        let Some((room, _)) = b.ids.occupant_key_of_ghost(user_id) else { return Ok(None) };
        Ok(b.occupant_of_ghost(&room, user_id).map(|o| GhostProfile {
            remote_id: o.remote_id,
            displayname: o.nick,
            avatar_url: None,
        }))
    }

    async fn on_message(
        &self,
        room: &RoomContext,
        event: &MatrixEvent,
        msg: &Message,
    ) -> Result<(), BridgeError> {
        if room.portal.is_none() {
            return self.dm_message(event, msg).await;
        }
        let Some((portal, xroom)) = Inner::muc_portal(room) else { return Ok(()) };
        if self.inner.ctx.permission(&event.sender) < PermissionLevel::Relay {
            return Ok(());
        }
        let (text, oob) = self.inner.xmpp_content(msg);
        if text.trim().is_empty() {
            return Ok(());
        }
        let id = event.event_id.clone();
        let reply = match &msg.reply_to {
            Some(r) => self.inner.reply_info(&portal.room_id, &xroom, r).await?,
            None => None,
        };
        let sid = self
            .inner
            .send_groupchat(
                &xroom,
                &portal.room_id,
                &event.sender,
                |from| {
                    let mut m = stanzas::groupchat(from, &xroom, &id, &text, None)?;
                    if let Some((sid, to, fallback)) = &reply {
                        stanzas::add_reply(&mut m, to.as_deref(), sid, fallback);
                    }
                    if let Some((url, name)) = &oob {
                        stanzas::add_oob(&mut m, url, Some(name));
                    }
                    stanzas::add_markable(&mut m);
                    Some(m)
                },
                &id,
            )
            .await?;
        self.inner
            .record(
                &portal.room_id,
                &format!("{}|{id}", event.sender),
                &event.event_id,
                &event.sender,
                sid.as_deref(),
                &xroom,
            )
            .await?;
        self.inner.remember_text(&event.event_id, &text).await
    }

    async fn on_ephemeral(&self, event: &EphemeralEvent) -> Result<(), BridgeError> {
        match event {
            EphemeralEvent::Typing { room_id, user_ids } => self.typing(room_id, user_ids).await,
            EphemeralEvent::Receipt { room_id, event_id, user_id, .. } => {
                self.receipt(room_id, event_id, user_id).await
            }
            EphemeralEvent::Presence { user_id, presence, status_msg } => {
                self.presence(user_id, presence, status_msg.as_deref());
                Ok(())
            }
        }
    }

    async fn on_room_state(
        &self,
        room: &RoomContext,
        event: &MatrixEvent,
    ) -> Result<(), BridgeError> {
        if event.state_key.as_deref() != Some("") {
            return Ok(());
        }
        let Some((portal, xroom)) = Inner::muc_portal(room) else { return Ok(()) };
        match event.event_type.as_str() {
            "m.room.power_levels" => self.matrix_power(&portal.room_id, &xroom, event).await,
            "m.room.topic" => self.matrix_topic(&portal.room_id, &xroom, event).await,
            _ => Ok(()),
        }
    }

    async fn on_reaction(
        &self,
        room: &RoomContext,
        event: &MatrixEvent,
        target: &str,
        key: &str,
    ) -> Result<(), BridgeError> {
        let Some((portal, xroom)) = Inner::muc_portal(room) else { return Ok(()) };
        let b = &self.inner;
        if b.ctx.permission(&event.sender) < PermissionLevel::Relay {
            return Ok(());
        }
        let Some(sid) = b.ctx.store().kv_get(&format!("xmpp.ev:{target}")).await? else {
            tracing::info!(target, "not bridging a reaction to a message without a stanza-id");
            return Ok(());
        };
        let k = format!("xmpp.mrx:{}|{}|{target}", portal.room_id, event.sender);
        let mut set: std::collections::BTreeMap<String, String> = b
            .ctx
            .store()
            .kv_get(&k)
            .await?
            .and_then(|v| serde_json::from_str(&v).ok())
            .unwrap_or_default();
        if set.contains_key(key) {
            return Ok(());
        }
        set.insert(key.to_owned(), event.event_id.clone());
        let keys: Vec<String> = set.keys().cloned().collect();
        b.send_reactions(&xroom, &portal.room_id, &event.sender, &event.event_id, &sid, &keys)
            .await?;
        b.ctx
            .store()
            .kv_set(&format!("xmpp.rev:{}", event.event_id), &json!([target, key]).to_string())
            .await?;
        b.ctx.store().kv_set(&k, &json!(set).to_string()).await?;
        Ok(())
    }

    async fn on_edit(
        &self,
        room: &RoomContext,
        event: &MatrixEvent,
        target: &str,
        new: &Message,
    ) -> Result<(), BridgeError> {
        let Some((portal, xroom)) = Inner::muc_portal(room) else { return Ok(()) };
        let Some(map) = self.inner.ctx.store().message_by_event(&portal.room_id, target).await?
        else {
            return Ok(());
        };
        if map.sender != event.sender {
            return Ok(());
        }
        let Some((_, orig)) = map.remote_id.split_once('|') else { return Ok(()) };
        let text = self.inner.xmpp_text(new);
        let id = event.event_id.clone();
        self.inner
            .send_groupchat(
                &xroom,
                &portal.room_id,
                &event.sender,
                |from| stanzas::groupchat(from, &xroom, &id, &text, Some(orig)),
                &id,
            )
            .await?;
        Ok(())
    }

    async fn on_redaction(
        &self,
        room: &RoomContext,
        event: &MatrixEvent,
        target: &str,
        reason: Option<&str>,
    ) -> Result<(), BridgeError> {
        let Some((portal, xroom)) = Inner::muc_portal(room) else { return Ok(()) };
        if let Some(v) = self.inner.ctx.store().kv_get(&format!("xmpp.rev:{target}")).await? {
            return self.unreact(&portal.room_id, &xroom, event, target, &v).await;
        }
        let Some(map) = self.inner.ctx.store().message_by_event(&portal.room_id, target).await?
        else {
            return Ok(());
        };
        let Some(sid) = self.inner.ctx.store().kv_get(&format!("xmpp.ev:{target}")).await? else {
            return Ok(());
        };
        if map.sender != event.sender {
            // Someone else's message, redacted with the power to: a moderation on XMPP.
            return self.matrix_moderation(&portal.room_id, &xroom, event, &sid, reason).await;
        }
        let id = event.event_id.clone();
        self.inner
            .send_groupchat(
                &xroom,
                &portal.room_id,
                &event.sender,
                |from| stanzas::retraction(from, &xroom, &id, &sid),
                &id,
            )
            .await?;
        Ok(())
    }

    async fn on_membership(
        &self,
        room: &RoomContext,
        event: &MatrixEvent,
        user_id: &str,
        membership: &str,
        prev: Option<&str>,
    ) -> Result<(), BridgeError> {
        if room.portal.is_none() {
            if membership == "invite"
                && !room.is_admin_room
                && let Some(jid) = self.inner.ids.jid_of_ghost(user_id)
            {
                return self.ghost_invited(event, user_id, &jid.to_string()).await;
            }
            if matches!(membership, "leave" | "ban")
                && let Some((jid, mxid)) = self.inner.dm_of_room(&event.room_id).await?
                && mxid == user_id
            {
                // The Matrix user left their direct chat: the next message opens a new one.
                let store = self.inner.ctx.store();
                store.kv_delete(&format!("xmpp.dmroom:{}", event.room_id)).await?;
                if store.kv_get(&format!("xmpp.dm:{jid}|{mxid}")).await?.as_deref()
                    == Some(event.room_id.as_str())
                {
                    store.kv_delete(&format!("xmpp.dm:{jid}|{mxid}")).await?;
                }
                if let Ok(bare) = xmpp_parsers::jid::BareJid::new(&jid) {
                    let ghost = self.inner.ids.ghost_of_jid(&bare);
                    let _ = self.inner.ctx.intent(&ghost).leave(&event.room_id).await;
                }
            }
            return Ok(());
        }
        let Some((portal, xroom)) = Inner::muc_portal(room) else { return Ok(()) };
        let b = &self.inner;
        if membership == "invite"
            && !b.ctx.is_bridge_user(&event.sender)
            && let Some(jid) = b.ids.jid_of_ghost(user_id)
        {
            return self.matrix_invite(&portal.room_id, &xroom, event, &jid.to_string()).await;
        }
        if matches!(membership, "leave" | "ban")
            && prev != Some("ban")
            && event.sender != user_id
            && !b.ctx.is_bridge_user(&event.sender)
            && let Some(occupant) = b.occupant_of_ghost(&xroom, user_id)
        {
            let ban = membership == "ban";
            let Some(nick) = occupant.nick else {
                let what = if ban { "ban" } else { "kick" };
                b.ctx
                    .notice(
                        &portal.room_id,
                        &format!("Could not {what} {user_id} on XMPP: they are not in the room."),
                    )
                    .await;
                return Ok(());
            };
            return self
                .matrix_removal(&portal.room_id, &xroom, event, (&nick, &occupant.remote_id), ban)
                .await;
        }
        if membership == "leave"
            && prev == Some("ban")
            && event.sender != user_id
            && !b.ctx.is_bridge_user(&event.sender)
            && let Some(occupant) = b.occupant_of_ghost(&xroom, user_id)
        {
            let name = match occupant.nick {
                Some(n) => n,
                None => b.displayname(&portal.room_id, user_id).await,
            };
            return self
                .matrix_unban(&portal.room_id, &xroom, event, (&name, &occupant.remote_id))
                .await;
        }
        if b.ctx.is_bridge_user(user_id) || b.ctx.permission(user_id) < PermissionLevel::Relay {
            return Ok(());
        }
        match membership {
            "join" => {
                let name = event.content.get("displayname").and_then(Value::as_str);
                let current = b
                    .state()
                    .rooms
                    .get(&xroom.bare())
                    .and_then(|r| r.puppets.get(user_id))
                    .map(|p| p.nick.clone());
                if let (Some(cur), Some(name)) = (&current, name)
                    && !cur.starts_with(&sanitise_nick(name, cur, b.cfg().max_nick_chars))
                {
                    // A displayname change: leave and rejoin under the new nick.
                    if let (Some(jid), Some(to)) =
                        (b.puppet_jid(user_id), stanzas::occupant(&xroom, cur))
                    {
                        let _ = b.xmpp.send(stanzas::leave(&jid, &to));
                    }
                    b.forget_puppet(&xroom.bare(), user_id);
                }
                let was_joined = current.is_some();
                let (jid, generation) =
                    b.ensure_puppet(&xroom, &portal.room_id, user_id, name).await?;
                let avatar = event.content.get("avatar_url").and_then(Value::as_str);
                let before = event
                    .unsigned
                    .get("prev_content")
                    .and_then(|p| p.get("avatar_url"))
                    .and_then(Value::as_str);
                if was_joined && prev == Some("join") && avatar != before {
                    // A new avatar: announced with the occupant's presence (XEP-0153).
                    let nick = b
                        .state()
                        .rooms
                        .get(&xroom.bare())
                        .and_then(|r| r.puppets.get(user_id))
                        .map(|p| p.nick.clone());
                    if let (Some(hash), Some(to)) = (
                        b.avatar_hash(user_id, avatar).await,
                        nick.and_then(|n| stanzas::occupant(&xroom, &n)),
                    ) {
                        let mut p = stanzas::occupant_presence(&jid, &to, None, None);
                        stanzas::add_avatar_hash(&mut p, &hash);
                        let _ = b.xmpp.send_for(p, generation);
                    }
                }
            }
            "leave" | "ban" => {
                let current = b
                    .state()
                    .rooms
                    .get(&xroom.bare())
                    .and_then(|r| r.puppets.get(user_id))
                    .map(|p| p.nick.clone());
                if let (Some(cur), Some(jid)) = (current, b.puppet_jid(user_id))
                    && let Some(to) = stanzas::occupant(&xroom, &cur)
                {
                    b.xmpp.send(stanzas::leave(&jid, &to)).map_err(|e| send_err(&e))?;
                }
                b.forget_puppet(&xroom.bare(), user_id);
            }
            _ => {}
        }
        Ok(())
    }
}

impl XmppBridge {
    /// Matrix typing (the room's whole list of typing users) → XEP-0085 chat states of the
    /// users' occupants: `composing` when one starts, `paused` when one stops.
    async fn typing(&self, room_id: &str, user_ids: &[String]) -> Result<(), BridgeError> {
        let b = &self.inner;
        let Some(portal) = b.ctx.store().portal_by_room(room_id).await? else { return Ok(()) };
        let Some(xroom) = Inner::room_of(&portal) else { return Ok(()) };
        let Some(generation) = b.xmpp.generation() else { return Ok(()) };
        // Only occupants already in the room on this connection say they are typing.
        let changes: Vec<(String, &str)> = {
            let mut st = b.state();
            let Some(r) = st.rooms.get_mut(&xroom.bare()) else { return Ok(()) };
            let mut out = Vec::new();
            for (mxid, p) in &r.puppets {
                if p.joined != Some(generation) {
                    continue;
                }
                let now = user_ids.contains(mxid);
                let before = r.typing.contains(mxid);
                if now && !before {
                    out.push((mxid.clone(), "composing"));
                } else if before && !now {
                    out.push((mxid.clone(), "paused"));
                }
            }
            r.typing = user_ids
                .iter()
                .filter(|u| r.puppets.get(*u).is_some_and(|p| p.joined == Some(generation)))
                .cloned()
                .collect();
            out
        };
        for (mxid, state) in changes {
            if let Some(m) =
                b.puppet_jid(&mxid).and_then(|jid| stanzas::chat_state(&jid, &xroom, state))
            {
                // Best effort: a lost typing notification is not worth a retry.
                let _ = b.xmpp.send_for(m, generation);
            }
        }
        Ok(())
    }

    /// A Matrix user invited the ghost of an XMPP user (a bare JID) to a chat's portal: a
    /// mediated invitation (XEP-0045 §7.8.2) from the user's own occupant, so the room tells
    /// the invitee who asked.
    async fn matrix_invite(
        &self,
        room_id: &str,
        xroom: &RoomJid,
        event: &MatrixEvent,
        invitee: &str,
    ) -> Result<(), BridgeError> {
        let b = &self.inner;
        if b.ctx.permission(&event.sender) < PermissionLevel::Relay {
            return Ok(());
        }
        let reason = event.content.get("reason").and_then(Value::as_str);
        let id = event.event_id.clone();
        let (from, generation) = b.ensure_puppet(xroom, room_id, &event.sender, None).await?;
        let Some(msg) = stanzas::mediated_invite(&from, xroom, &id, invitee, reason) else {
            return Err(BridgeError::Permanent(format!("cannot invite {invitee}")));
        };
        b.xmpp.send_for(msg, generation).map_err(|e| send_err(&e))?;
        tracing::info!(room = xroom.bare(), invitee, by = event.sender, "sent an invitation");
        Ok(())
    }

    /// A Matrix user set the room's topic: the chat's subject, set by the user's own occupant
    /// (the room decides whether occupants may; a refusal is told in the room). The subject the
    /// chat already has (as when the topic came from XMPP) is not sent again.
    async fn matrix_topic(
        &self,
        room_id: &str,
        xroom: &RoomJid,
        event: &MatrixEvent,
    ) -> Result<(), BridgeError> {
        let b = &self.inner;
        if b.ctx.permission(&event.sender) < PermissionLevel::Relay {
            return Ok(());
        }
        let topic = event.content.get("topic").and_then(Value::as_str).unwrap_or_default();
        let key = xroom.bare();
        if b.state().rooms.get(&key).and_then(|r| r.subject.as_deref()) == Some(topic) {
            return Ok(());
        }
        let id = event.event_id.clone();
        let sent = b
            .send_groupchat(
                xroom,
                room_id,
                &event.sender,
                |from| stanzas::subject(from, xroom, &id, topic),
                &id,
            )
            .await;
        match sent {
            Ok(_) => {
                b.state().rooms.entry(key).or_default().subject = Some(topic.to_owned());
                Ok(())
            }
            Err(BridgeError::Permanent(why)) => {
                b.ctx.notice(room_id, &format!("The topic was not set on XMPP: {why}")).await;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// A Matrix user redacted someone else's message (Matrix already checked their power to): a
    /// moderation request (XEP-0425) to the room from the user's own occupant, which must be a
    /// moderator there (a Matrix power level of 50 makes it one). A refusal is told in the room.
    async fn matrix_moderation(
        &self,
        room_id: &str,
        xroom: &RoomJid,
        event: &MatrixEvent,
        stanza_id: &str,
        reason: Option<&str>,
    ) -> Result<(), BridgeError> {
        let b = &self.inner;
        if b.ctx.permission(&event.sender) < PermissionLevel::Relay {
            return Ok(());
        }
        let generation = b.xmpp.generation().ok_or_else(|| send_err(&ConnError::Offline))?;
        let joined = self.joined_puppet(xroom, &event.sender, generation).is_some();
        let Some(from) = b.puppet_jid(&event.sender).filter(|_| joined) else {
            b.ctx.notice(room_id, "Not removed on XMPP: you are not in the chat there.").await;
            return Ok(());
        };
        let id = format!("moderate-{}", rand::random::<u64>());
        let Some(iq) = stanzas::moderation(&from, xroom, &id, stanza_id, reason) else {
            return Err(BridgeError::Permanent(format!("cannot address {}", xroom.bare())));
        };
        match b.request(xroom, iq, generation).await?.map(drop) {
            Ok(()) => {
                tracing::info!(
                    room = xroom.bare(),
                    stanza_id,
                    by = event.sender,
                    "moderated a message"
                );
            }
            Err(why) => {
                b.ctx
                    .notice(room_id, &format!("Could not remove the message on XMPP: {why}"))
                    .await;
            }
        }
        Ok(())
    }

    /// A Matrix user kicked or banned the ghost (remote id `remote_id`, which keys the
    /// remembered ban) of the occupant `nick` (Matrix already checked their power to): the occupant is kicked (role `none`) or banned (affiliation `outcast`,
    /// by the real JID, which the room must show) on XMPP, by the user's own occupant when it
    /// is in the room, else by the bot. A refusal is told in the room.
    async fn matrix_removal(
        &self,
        room_id: &str,
        xroom: &RoomJid,
        event: &MatrixEvent,
        (nick, remote_id): (&str, &str),
        ban: bool,
    ) -> Result<(), BridgeError> {
        let b = &self.inner;
        if b.ctx.permission(&event.sender) < PermissionLevel::Relay {
            return Ok(());
        }
        let what = if ban { "ban" } else { "kick" };
        let reason = event.content.get("reason").and_then(Value::as_str);
        let generation = b.xmpp.generation().ok_or_else(|| send_err(&ConnError::Offline))?;
        let puppet = self
            .joined_puppet(xroom, &event.sender, generation)
            .is_some_and(|a| !ban || Self::may_ban(a.as_deref()));
        let real = b.state().rooms.get(&xroom.bare()).and_then(|r| r.real_jids.get(nick).cloned());
        let from = if puppet { b.puppet_jid(&event.sender) } else { None };
        let from = from.unwrap_or_else(|| b.bot.clone());
        let who = if ban {
            let Some(real) = &real else {
                b.ctx
                    .notice(
                        room_id,
                        &format!(
                            "Could not ban {nick} on XMPP: the room does not show their address."
                        ),
                    )
                    .await;
                return Ok(());
            };
            ("jid", real.as_str())
        } else {
            ("nick", nick)
        };
        let change = if ban { ("affiliation", "outcast") } else { ("role", "none") };
        match b.admin_request(xroom, &from, who, change, reason, generation).await? {
            Ok(()) => {
                if let (true, Some(real)) = (ban, &real) {
                    b.ctx.store().kv_set(&format!("xmpp.outcast:{remote_id}"), real).await?;
                }
                tracing::info!(
                    room = xroom.bare(),
                    nick,
                    what,
                    by = event.sender,
                    "removed an occupant"
                );
            }
            Err(why) => {
                b.ctx.notice(room_id, &format!("Could not {what} {nick} on XMPP: {why}")).await;
            }
        }
        Ok(())
    }

    /// The affiliation of the Matrix user `mxid`'s occupant in `xroom` when it is in the room
    /// on connection `generation` (`None`: it is not).
    fn joined_puppet(
        &self,
        xroom: &RoomJid,
        mxid: &str,
        generation: u64,
    ) -> Option<Option<String>> {
        self.inner
            .state()
            .rooms
            .get(&xroom.bare())
            .and_then(|r| r.puppets.get(mxid))
            .filter(|p| p.joined == Some(generation))
            .map(|p| p.affiliation.clone())
    }

    /// Whether an occupant with `affiliation` may change affiliations (ban, unban): an admin or
    /// owner (XEP-0045 §9).
    fn may_ban(affiliation: Option<&str>) -> bool {
        matches!(affiliation, Some("admin" | "owner"))
    }

    /// A Matrix user unbanned the ghost (remote id `remote_id`) of the occupant `nick` (Matrix
    /// already checked their power to): the XMPP ban is lifted (affiliation `none` for the real JID remembered when
    /// the occupant was banned), by the user's own occupant when it is an admin or owner in the
    /// room, else by the bot. A refusal, or a ban whose address the bridge does not know, is
    /// told in the room.
    async fn matrix_unban(
        &self,
        room_id: &str,
        xroom: &RoomJid,
        event: &MatrixEvent,
        (nick, remote_id): (&str, &str),
    ) -> Result<(), BridgeError> {
        let b = &self.inner;
        if b.ctx.permission(&event.sender) < PermissionLevel::Relay {
            return Ok(());
        }
        let key = format!("xmpp.outcast:{remote_id}");
        let Some(real) = b.ctx.store().kv_get(&key).await? else {
            b.ctx
                .notice(
                    room_id,
                    &format!(
                        "Could not lift the ban of {nick} on XMPP: the bridge does not know their address."
                    ),
                )
                .await;
            return Ok(());
        };
        let generation = b.xmpp.generation().ok_or_else(|| send_err(&ConnError::Offline))?;
        let by_puppet = self
            .joined_puppet(xroom, &event.sender, generation)
            .is_some_and(|a| Self::may_ban(a.as_deref()));
        let from = if by_puppet { b.puppet_jid(&event.sender) } else { None };
        let from = from.unwrap_or_else(|| b.bot.clone());
        let change = ("affiliation", "none");
        match b.admin_request(xroom, &from, ("jid", &real), change, None, generation).await? {
            Ok(()) => {
                b.ctx.store().kv_delete(&key).await?;
                tracing::info!(room = xroom.bare(), nick, by = event.sender, "lifted a ban");
            }
            Err(why) => {
                b.ctx
                    .notice(room_id, &format!("Could not lift the ban of {nick} on XMPP: {why}"))
                    .await;
            }
        }
        Ok(())
    }

    /// Matrix power levels → the standing of the Matrix users' occupants (see
    /// [`PowerLevelsConfig`](crate::config::PowerLevelsConfig)): a user whose level reaches `owner` or `admin` gets that
    /// affiliation (by the puppet's address), one who reaches `moderator` the moderator role,
    /// and one who drops below them goes back to a `member` participant. Only users whose
    /// standing changed in this event are touched (without the previous content: those who have
    /// one above participant). The bot asks the room, so it must be an owner there to grant
    /// owner or admin (it is in rooms it created); a refusal is told in a notice. Ghosts' levels
    /// are not sent back.
    async fn matrix_power(
        &self,
        room_id: &str,
        xroom: &RoomJid,
        event: &MatrixEvent,
    ) -> Result<(), BridgeError> {
        let b = &self.inner;
        let Some(generation) = b.xmpp.generation() else { return Ok(()) };
        let levels = &b.cfg().power_levels;
        let standing = |c: &Value, u: &str| {
            levels.standing_of(
                c["users"]
                    .get(u)
                    .and_then(Value::as_i64)
                    .unwrap_or_else(|| c["users_default"].as_i64().unwrap_or(0)),
            )
        };
        let prev = event.unsigned.get("prev_content").filter(|p| p.is_object());
        let puppets: Vec<(String, String, Option<String>)> = b
            .state()
            .rooms
            .get(&xroom.bare())
            .map(|r| {
                r.puppets
                    .iter()
                    .filter(|(_, p)| p.joined == Some(generation))
                    .map(|(m, p)| (m.clone(), p.nick.clone(), p.affiliation.clone()))
                    .collect()
            })
            .unwrap_or_default();
        for (mxid, nick, affiliation) in puppets {
            let now = standing(&event.content, &mxid);
            let before = match prev.map(|p| standing(p, &mxid)) {
                Some(before) if before == now => continue,
                None if now == Standing::Participant => continue,
                Some(before) => before,
                None => Standing::Participant,
            };
            let before = before.max(standing_of_affiliation(affiliation.as_deref()));
            b.set_standing(room_id, xroom, &mxid, &nick, (before, now), generation).await?;
        }
        Ok(())
    }

    /// A Matrix user's presence → the `<show/>` (online: none; unavailable: `away`; offline:
    /// `xa`) and status of their occupants already in rooms on this connection. Occupants stay
    /// in their rooms when the user goes offline.
    fn presence(&self, user_id: &str, presence: &str, status: Option<&str>) {
        let b = &self.inner;
        if b.ctx.is_bridge_user(user_id) || b.ctx.permission(user_id) < PermissionLevel::Relay {
            return;
        }
        let (Some(generation), Some(jid)) = (b.xmpp.generation(), b.puppet_jid(user_id)) else {
            return;
        };
        let show = match presence {
            "online" => None,
            "unavailable" => Some(Show::Away),
            _ => Some(Show::Xa),
        };
        let occupants: Vec<FullJid> = b
            .state()
            .rooms
            .iter()
            .filter_map(|(room, r)| {
                let p = r.puppets.get(user_id).filter(|p| p.joined == Some(generation))?;
                stanzas::occupant(&RoomJid::parse(room)?, &p.nick)
            })
            .collect();
        let photo = b.state().photos.get(user_id).cloned();
        for to in occupants {
            let mut p = stanzas::occupant_presence(&jid, &to, show.clone(), status);
            if let Some(hash) = &photo {
                stanzas::add_avatar_hash(&mut p, hash);
            }
            // Best effort, like typing.
            let _ = b.xmpp.send_for(p, generation);
        }
    }

    /// A Matrix read receipt → a XEP-0333 displayed marker from the reader's occupant, for a
    /// message from XMPP that asked for markers and has a stanza-id. Only occupants already in
    /// the room on this connection send markers; a repeat of the last marker is not sent again.
    async fn receipt(
        &self,
        room_id: &str,
        event_id: &str,
        user_id: &str,
    ) -> Result<(), BridgeError> {
        let b = &self.inner;
        if b.ctx.is_bridge_user(user_id) || b.ctx.permission(user_id) < PermissionLevel::Relay {
            return Ok(());
        }
        let Some(portal) = b.ctx.store().portal_by_room(room_id).await? else { return Ok(()) };
        let Some(xroom) = Inner::room_of(&portal) else { return Ok(()) };
        let Some(generation) = b.xmpp.generation() else { return Ok(()) };
        let joined = |b: &Inner| {
            b.state()
                .rooms
                .get(&xroom.bare())
                .and_then(|r| r.puppets.get(user_id))
                .is_some_and(|p| p.joined == Some(generation))
        };
        if !joined(b) {
            return Ok(());
        }
        let store = b.ctx.store();
        if store.kv_get(&format!("xmpp.markable:{event_id}")).await?.is_none() {
            return Ok(());
        }
        let Some(sid) = store.kv_get(&format!("xmpp.ev:{event_id}")).await? else {
            return Ok(());
        };
        {
            let mut st = b.state();
            let Some(r) = st.rooms.get_mut(&xroom.bare()) else { return Ok(()) };
            if r.marked.get(user_id) == Some(&sid) {
                return Ok(());
            }
            r.marked.insert(user_id.to_owned(), sid.clone());
        }
        if let Some(m) =
            b.puppet_jid(user_id).and_then(|jid| stanzas::displayed(&jid, &xroom, &sid))
        {
            // Best effort, like typing: a lost marker is not worth a retry.
            let _ = b.xmpp.send_for(m, generation);
        }
        Ok(())
    }

    /// A Matrix user invited the ghost of an XMPP user (a bare JID) to a room: it becomes their
    /// direct chat with that user.
    async fn ghost_invited(
        &self,
        event: &MatrixEvent,
        ghost: &str,
        jid: &str,
    ) -> Result<(), BridgeError> {
        let b = &self.inner;
        if b.ctx.is_bridge_user(&event.sender)
            || b.ctx.permission(&event.sender) < PermissionLevel::Relay
        {
            return Ok(());
        }
        b.ctx
            .ensure_ghost(
                ghost,
                &GhostProfile {
                    remote_id: jid.to_owned(),
                    displayname: Some(jid.to_owned()),
                    avatar_url: None,
                },
            )
            .await?;
        b.ctx.intent(ghost).join(&event.room_id).await?;
        b.remember_dm(jid, &event.sender, &event.room_id).await?;
        tracing::info!(jid, mxid = event.sender, room_id = event.room_id, "joined a direct chat");
        Ok(())
    }

    /// A Matrix message in a direct chat with an XMPP user: a `chat` message from the Matrix
    /// user's JID to the XMPP user's bare JID.
    async fn dm_message(&self, event: &MatrixEvent, msg: &Message) -> Result<(), BridgeError> {
        let b = &self.inner;
        let Some((jid, mxid)) = b.dm_of_room(&event.room_id).await? else { return Ok(()) };
        if event.sender != mxid {
            return Ok(());
        }
        let (text, oob) = b.xmpp_content(msg);
        if text.trim().is_empty() {
            return Ok(());
        }
        let (Some(from), Ok(to)) = (b.puppet_jid(&mxid), Jid::new(&jid)) else {
            return Err(BridgeError::Permanent(format!("cannot address {jid} from {mxid}")));
        };
        let mut m = stanzas::chat(&from, to, &event.event_id, &text);
        if let Some((url, name)) = &oob {
            stanzas::add_oob(&mut m, url, Some(name));
        }
        b.xmpp.send(m).map_err(|e| send_err(&e))
    }

    /// A Matrix user redacted their reaction `reaction` (stored as `[message, key]` in `v`):
    /// their remaining set of reactions to the message is sent.
    async fn unreact(
        &self,
        room_id: &str,
        xroom: &RoomJid,
        event: &MatrixEvent,
        reaction: &str,
        v: &str,
    ) -> Result<(), BridgeError> {
        let b = &self.inner;
        let Ok((target, key)) = serde_json::from_str::<(String, String)>(v) else {
            return Ok(());
        };
        let k = format!("xmpp.mrx:{room_id}|{}|{target}", event.sender);
        let mut set: std::collections::BTreeMap<String, String> = b
            .ctx
            .store()
            .kv_get(&k)
            .await?
            .and_then(|v| serde_json::from_str(&v).ok())
            .unwrap_or_default();
        // Only the reaction's own sender's set holds it.
        if set.get(&key).map(String::as_str) != Some(reaction) {
            return Ok(());
        }
        let Some(sid) = b.ctx.store().kv_get(&format!("xmpp.ev:{target}")).await? else {
            return Ok(());
        };
        set.remove(&key);
        let keys: Vec<String> = set.keys().cloned().collect();
        b.send_reactions(xroom, room_id, &event.sender, &event.event_id, &sid, &keys).await?;
        if set.is_empty() {
            b.ctx.store().kv_delete(&k).await?;
        } else {
            b.ctx.store().kv_set(&k, &json!(set).to_string()).await?;
        }
        b.ctx.store().kv_delete(&format!("xmpp.rev:{reaction}")).await?;
        Ok(())
    }
}

/// The standing an occupant's affiliation alone gives it (its role aside).
fn standing_of_affiliation(affiliation: Option<&str>) -> Standing {
    match affiliation {
        Some("owner") => Standing::Owner,
        Some("admin") => Standing::Admin,
        _ => Standing::Participant,
    }
}

/// The Matrix presence of an occupant: available (or `chat`) → online; `away`, `xa` and `dnd`
/// → unavailable (`dnd` says so in the status message when there is none); gone → offline.
fn presence_of(pr: &MucPresence) -> (MatrixPresence, Option<String>) {
    if pr.unavailable {
        return (MatrixPresence::Offline, None);
    }
    match pr.show.as_deref() {
        Some("away" | "xa") => (MatrixPresence::Unavailable, pr.status.clone()),
        Some("dnd") => (
            MatrixPresence::Unavailable,
            Some(pr.status.clone().unwrap_or_else(|| "Do not disturb".to_owned())),
        ),
        _ => (MatrixPresence::Online, pr.status.clone()),
    }
}

/// Matrix content for text from XMPP: the body as written, and its XEP-0393 styling (if any) as
/// HTML.
fn text_content(msgtype: &str, text: &str) -> Value {
    let mut content = json!({"msgtype": msgtype, "body": text});
    if let Some(html) = crate::styling::to_html(text) {
        content["format"] = json!("org.matrix.custom.html");
        content["formatted_body"] = json!(html);
    }
    content
}

/// A byte count for people: `512 bytes`, `1.5 MiB`.
fn human_size(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} bytes");
    }
    #[allow(clippy::cast_precision_loss)] // Display only.
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PowerLevelsConfig;

    #[test]
    fn history_syncs_ask_for_what_was_missed() {
        use crate::config::HistoryConfig;
        let cfg = HistoryConfig { initial_messages: 20, max_catchup: 500 };
        let sid = Cursor { sid: Some("s1".into()), ts: 100_000 };
        let time = Cursor { sid: None, ts: 100_000 };
        // A new portal: its last messages, from the archive or the join history.
        let (w, n) = history_wanted(None, true, &cfg);
        assert_eq!((w.clone(), n), (Some(ArchiveFrom::Before(None)), 20));
        assert_eq!(join_history(w.as_ref(), true, None, n), JoinHistory::None);
        assert_eq!(join_history(w.as_ref(), false, None, n), JoinHistory::Last(20));
        // After downtime: after the cursor's message, or by time (with the margin).
        let (w, n) = history_wanted(Some(&sid), false, &cfg);
        assert_eq!((w.clone(), n), (Some(ArchiveFrom::After("s1".into())), 500));
        assert_eq!(
            join_history(w.as_ref(), false, Some(&sid), n),
            JoinHistory::Since { ms: 95_000, max: 500 }
        );
        let (w, _) = history_wanted(Some(&time), false, &cfg);
        assert_eq!(w, Some(ArchiveFrom::Start(95_000)));
        // Nothing without a cursor, or when the config says none.
        assert_eq!(history_wanted(None, false, &cfg), (None, 0));
        let none = HistoryConfig { initial_messages: 0, max_catchup: 0 };
        assert_eq!(history_wanted(None, true, &none), (None, 0));
        assert_eq!(history_wanted(Some(&sid), false, &none), (None, 0));
        assert_eq!(join_history(None, false, Some(&sid), 0), JoinHistory::None);
        // The cursor survives a round trip through the store's text.
        let text = serde_json::to_string(&sid).unwrap();
        assert_eq!(serde_json::from_str::<Cursor>(&text).unwrap(), sid);
    }

    #[test]
    fn affiliations_and_roles_map_to_power_levels_and_back() {
        let pl = PowerLevelsConfig::default();
        assert_eq!(pl.level_of(Some("owner"), Some("moderator")), 100);
        assert_eq!(pl.level_of(Some("admin"), Some("moderator")), 50);
        assert_eq!(pl.level_of(Some("member"), Some("moderator")), 50);
        assert_eq!(pl.level_of(Some("member"), Some("participant")), 0);
        assert_eq!(pl.level_of(None, None), 0);
        assert_eq!(pl.standing_of(100), Standing::Owner);
        assert_eq!(pl.standing_of(75), Standing::Admin);
        assert_eq!(pl.standing_of(50), Standing::Admin);
        assert_eq!(pl.standing_of(49), Standing::Participant);
        let pl = PowerLevelsConfig { owner: 100, admin: 75, moderator: 50 };
        assert_eq!(pl.standing_of(60), Standing::Moderator);
        assert_eq!(pl.standing_of(75), Standing::Admin);
        assert_eq!(pl.level_of(Some("admin"), None), 75);
        // Round trip: every standing's level maps back to the same standing.
        for (aff, role) in [(Some("owner"), None), (Some("admin"), None), (None, Some("moderator"))]
        {
            let level = pl.level_of(aff, role);
            let back = pl.standing_of(level);
            assert_eq!(
                pl.level_of(aff, role),
                match back {
                    Standing::Owner => pl.owner,
                    Standing::Admin => pl.admin,
                    Standing::Moderator => pl.moderator,
                    Standing::Participant => 0,
                }
            );
        }
    }

    #[test]
    fn a_stanza_whose_bridging_failed_is_not_a_duplicate_on_retry() {
        let mut st = State::default();
        assert!(st.first_time("room|s1".into()));
        assert!(!st.first_time("room|s1".into()));
        st.forget("room|s1");
        assert!(st.first_time("room|s1".into()));
        assert_eq!(st.seen_order.iter().filter(|k| *k == "room|s1").count(), 1);
    }

    #[test]
    fn shows_map_to_matrix_presence() {
        let pr = |show: Option<&str>, status: Option<&str>, unavailable: bool| MucPresence {
            show: show.map(str::to_owned),
            status: status.map(str::to_owned),
            unavailable,
            ..MucPresence::default()
        };
        let p = |m: &MucPresence| {
            let (p, s) = presence_of(m);
            (format!("{p:?}"), s)
        };
        assert_eq!(p(&pr(None, Some("hi"), false)), ("Online".into(), Some("hi".into())));
        assert_eq!(p(&pr(Some("chat"), None, false)), ("Online".into(), None));
        assert_eq!(
            p(&pr(Some("xa"), Some("gone"), false)),
            ("Unavailable".into(), Some("gone".into()))
        );
        assert_eq!(
            p(&pr(Some("dnd"), None, false)),
            ("Unavailable".into(), Some("Do not disturb".into()))
        );
        assert_eq!(p(&pr(Some("away"), Some("x"), true)), ("Offline".into(), None));
        assert_eq!(human_size(512), "512 bytes");
        assert_eq!(human_size(100_000), "97.7 KiB");
        assert_eq!(human_size(50 * 1024 * 1024), "50.0 MiB");
    }
}
