//! Building and reading the stanzas the bridge deals with. Everything is built with
//! xmpp-parsers/minidom (never by string concatenation), and text from Matrix is first cleared of
//! characters XML 1.0 cannot carry.

use base64::Engine as _;
use sha1::{Digest as _, Sha1};
use xmpp_parsers::{
    caps::{Caps, compute_disco, hash_caps},
    date::DateTime,
    disco::{DiscoInfoResult, Identity},
    hashes::{Algo, Hash},
    iq::Iq,
    jid::{FullJid, Jid},
    message::{Id, Lang, Message, MessageType},
    message_correct::Replace,
    minidom::{Element, Node, rxml::xml_ncname},
    muc::{Muc, muc::History},
    ns,
    presence::{Presence, Show, Type as PresenceType},
    stanza_error::{DefinedCondition, ErrorType, StanzaError},
    stanza_id::OriginId,
};

use crate::ids::RoomJid;

/// XEP-0424 message retraction.
pub const NS_RETRACT: &str = "urn:xmpp:message-retract:1";
/// XEP-0424 message retraction as XEP-0425 version 0.2 (Prosody's `mod_muc_moderation`) uses it.
pub const NS_RETRACT_0: &str = "urn:xmpp:message-retract:0";
/// XEP-0425 message moderation, version 0.2 (what Prosody's `mod_muc_moderation` speaks).
pub const NS_MODERATE_0: &str = "urn:xmpp:message-moderate:0";
/// XEP-0425 message moderation, version 0.3 and later.
pub const NS_MODERATE: &str = "urn:xmpp:message-moderate:1";
/// XEP-0422 message fastening (carries XEP-0425 version 0.2).
pub const NS_FASTEN: &str = "urn:xmpp:fasten:0";
/// XEP-0045 room owner.
pub const NS_MUC_OWNER: &str = "http://jabber.org/protocol/muc#owner";
/// XEP-0045 moderation and administration.
pub const NS_MUC_ADMIN: &str = "http://jabber.org/protocol/muc#admin";
/// XEP-0428 fallback indication.
pub const NS_FALLBACK: &str = "urn:xmpp:fallback:0";

/// XEP-0461 message replies.
pub const NS_REPLY: &str = "urn:xmpp:reply:0";
/// XEP-0444 message reactions.
pub const NS_REACTIONS: &str = "urn:xmpp:reactions:0";

/// XEP-0085 chat states.
pub const NS_CHATSTATES: &str = "http://jabber.org/protocol/chatstates";

/// XEP-0333 displayed markers.
pub const NS_MARKERS: &str = "urn:xmpp:chat-markers:0";

/// XEP-0066 out-of-band data (files; also what XEP-0363 uploads are shared with).
pub const NS_OOB: &str = "jabber:x:oob";

/// XEP-0313 message archive management.
pub const NS_MAM: &str = "urn:xmpp:mam:2";
/// XEP-0059 result set management.
pub const NS_RSM: &str = "http://jabber.org/protocol/rsm";
/// XEP-0297 stanza forwarding.
pub const NS_FORWARD: &str = "urn:xmpp:forward:0";

/// XEP-0054 vCards.
pub const NS_VCARD: &str = "vcard-temp";
/// XEP-0153 vCard-based avatars: the avatar hash in presence.
pub const NS_VCARD_UPDATE: &str = "vcard-temp:x:update";

/// XEP-0421 anonymous unique occupant identifiers: the room's feature and the element's
/// namespace.
pub const NS_OCCUPANT_ID: &str = "urn:xmpp:occupant-id:0";
/// The longest occupant-id the bridge accepts (longer ones are ignored: they would not fit in
/// a Matrix user id).
pub const MAX_OCCUPANT_ID: usize = 128;

/// The features the component really implements (disco#info).
pub const FEATURES: &[&str] = &[
    ns::DISCO_INFO,
    ns::DISCO_ITEMS,
    ns::PING,
    ns::VERSION,
    ns::MUC,
    ns::SID,
    ns::MESSAGE_CORRECT,
    NS_RETRACT,
    NS_REPLY,
    NS_FALLBACK,
    NS_REACTIONS,
    NS_CHATSTATES,
    NS_OOB,
    NS_MARKERS,
];

/// Removes what XML 1.0 cannot carry (C0 controls other than tab, LF, CR; U+FFFE/U+FFFF;
/// lone surrogates cannot occur in a Rust string).
pub fn xml_safe(s: &str) -> String {
    s.chars()
        .filter(|c| matches!(*c, '\t' | '\n' | '\r') || (!c.is_control() || *c as u32 >= 0x7f))
        .filter(|c| !matches!(*c, '\u{FFFE}' | '\u{FFFF}') && !('\u{7f}'..='\u{9f}').contains(c))
        .collect()
}

/// The occupant JID `room@service/nick`.
pub fn occupant(room: &RoomJid, nick: &str) -> Option<FullJid> {
    FullJid::new(&format!("{}/{nick}", room.bare())).ok()
}

/// A MUC join (XEP-0045 §7.2) asking for no history: the join history is never bridged.
pub fn join(from: &FullJid, to: &FullJid) -> Presence {
    let mut p = Presence::available().with_from(from.clone()).with_to(to.clone());
    p.add_payload(Muc::new().with_history(History::new().with_maxstanzas(0)));
    p.add_payload(user_caps());
    p
}

/// What the bot asks for when it joins a room (XEP-0045 §7.2.14).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum JoinHistory {
    /// No history (it comes from the archive, or is not wanted).
    #[default]
    None,
    /// The last `n` messages.
    Last(u32),
    /// Messages since a time, at most `max`.
    Since {
        /// The time (Unix milliseconds).
        ms: i64,
        /// The most messages.
        max: u32,
    },
}

/// The bot's join of a room, asking for `history`.
pub fn bot_join(from: &FullJid, to: &FullJid, history: JoinHistory) -> Presence {
    let h = match history {
        JoinHistory::None => History::new().with_maxstanzas(0),
        JoinHistory::Last(n) => History::new().with_maxstanzas(n),
        JoinHistory::Since { ms, max } => match iso8601(ms).parse::<DateTime>() {
            Ok(t) => History::new().with_since(t).with_maxstanzas(max),
            Err(_) => History::new().with_maxstanzas(0),
        },
    };
    let mut p = Presence::available().with_from(from.clone()).with_to(to.clone());
    p.add_payload(Muc::new().with_history(h));
    p.add_payload(user_caps());
    p
}

/// A XEP-0082 date-time (`2026-12-03T15:11:21.123Z`) as Unix milliseconds.
pub fn parse_stamp(s: &str) -> Option<i64> {
    s.trim().parse::<DateTime>().ok().map(|d| d.0.timestamp_millis())
}

/// Unix milliseconds as a XEP-0082 date-time in UTC (`2026-12-03T15:11:21.123Z`).
pub fn iso8601(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // The proleptic Gregorian date of a day count since 1970-01-01, by 400-year eras.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A disco#info request (XEP-0030) from `from` to `room`.
pub fn disco_info_get(from: &FullJid, room: &RoomJid, id: &str) -> Option<Iq> {
    Some(Iq::Get {
        from: Some(from.clone().into()),
        to: Some(Jid::new(&room.bare()).ok()?),
        id: id.to_owned(),
        payload: Element::builder("query", ns::DISCO_INFO).build(),
    })
}

/// Whether a disco#info result (its `<query/>`) advertises `feature`.
pub fn has_feature(info: &Element, feature: &str) -> bool {
    disco_features(info).iter().any(|f| f == feature)
}

/// Which page of a room's archive (XEP-0313) a query asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArchiveFrom {
    /// The page before the message with this archive id; `None`: the last page.
    Before(Option<String>),
    /// The page after the message with this archive id (the room's stanza-id).
    After(String),
    /// The first page from this time on (Unix milliseconds).
    Start(i64),
}

/// A query of `room`'s archive (XEP-0313) by `from`, one RSM page of at most `max`; `queryid`
/// marks the results.
pub fn mam_query(
    from: &FullJid,
    room: &RoomJid,
    id: &str,
    queryid: &str,
    at: &ArchiveFrom,
    max: u32,
) -> Option<Iq> {
    let field = |var: &str, value: &str, hidden: bool| {
        let mut f = Element::builder("field", ns::DATA_FORMS).attr(xml_ncname!("var").into(), var);
        if hidden {
            f = f.attr(xml_ncname!("type").into(), "hidden");
        }
        f.append(Element::builder("value", ns::DATA_FORMS).append(value).build()).build()
    };
    let mut form = Element::builder("x", ns::DATA_FORMS)
        .attr(xml_ncname!("type").into(), "submit")
        .append(field("FORM_TYPE", NS_MAM, true));
    if let ArchiveFrom::Start(ms) = at {
        form = form.append(field("start", &iso8601(*ms), false));
    }
    let mut set = Element::builder("set", NS_RSM)
        .append(Element::builder("max", NS_RSM).append(max.to_string()).build());
    match at {
        ArchiveFrom::Before(id) => {
            let mut before = Element::builder("before", NS_RSM);
            if let Some(id) = id {
                before = before.append(id.as_str());
            }
            set = set.append(before.build());
        }
        ArchiveFrom::After(sid) => {
            set = set.append(Element::builder("after", NS_RSM).append(sid.as_str()).build());
        }
        ArchiveFrom::Start(_) => {}
    }
    let query = Element::builder("query", NS_MAM)
        .attr(xml_ncname!("queryid").into(), queryid)
        .append(form.build())
        .append(set.build())
        .build();
    Some(Iq::Set {
        from: Some(from.clone().into()),
        to: Some(Jid::new(&room.bare()).ok()?),
        id: id.to_owned(),
        payload: query,
    })
}

/// The end of an archive query (XEP-0313 §4.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveFin {
    /// Whether the query reached the end of the archive (its start, for a `before` query).
    pub complete: bool,
    /// The archive id of the page's first message.
    pub first: Option<String>,
    /// The archive id of the page's last message.
    pub last: Option<String>,
}

/// One message of an archive query's results (XEP-0313 §4.2).
#[derive(Debug, Clone)]
pub struct ArchivedMessage {
    /// The query it answers.
    pub queryid: String,
    /// Its archive id: the room's stanza-id.
    pub archive_id: String,
    /// When it was sent (Unix milliseconds), from the forwarded `<delay/>`.
    pub stamp_ms: Option<i64>,
    /// The message as the room sent it.
    pub message: Message,
}

/// Reads an archive result (`<result><forwarded><delay/><message/></forwarded></result>`).
pub fn read_mam_result(m: &Message) -> Option<ArchivedMessage> {
    let result = m.payloads.iter().find(|p| p.is("result", NS_MAM))?;
    let forwarded = result.get_child("forwarded", NS_FORWARD)?;
    let stamp_ms =
        forwarded.get_child("delay", ns::DELAY).and_then(|d| d.attr("stamp")).and_then(parse_stamp);
    let inner = forwarded.children().find(|c| c.name() == "message")?;
    // Forwarded stanzas are in `jabber:client`; the component's stream reads its own namespace.
    let message = Message::try_from(with_ns(inner, ns::JABBER_CLIENT, ns::DEFAULT_NS)).ok()?;
    Some(ArchivedMessage {
        queryid: result.attr("queryid")?.to_owned(),
        archive_id: result.attr("id")?.to_owned(),
        stamp_ms,
        message,
    })
}

/// A copy of `el` with every element in namespace `from` moved to `to`.
fn with_ns(el: &Element, from: &str, to: &str) -> Element {
    let ns = el.ns();
    let mut out = Element::builder(el.name(), if ns == from { to } else { ns.as_str() }).build();
    *out.attrs_mut() = el.attrs().clone();
    for node in el.nodes() {
        match node {
            Node::Element(c) => {
                out.append_child(with_ns(c, from, to));
            }
            Node::Text(t) => out.append_text_node(t.clone()),
        }
    }
    out
}

/// Reads an archive query's end (`<fin complete=…><set><first/><last/></set></fin>`).
pub fn read_mam_fin(fin: &Element) -> Option<ArchiveFin> {
    if !fin.is("fin", NS_MAM) {
        return None;
    }
    let set = fin.get_child("set", NS_RSM);
    let id = |name: &str| {
        set.and_then(|s| s.get_child(name, NS_RSM))
            .map(|l| l.text().trim().to_owned())
            .filter(|l| !l.is_empty())
    };
    Some(ArchiveFin {
        complete: matches!(fin.attr("complete"), Some("true" | "1")),
        first: id("first"),
        last: id("last"),
    })
}

/// An occupant's new availability in a room it is in (`show` none means available).
pub fn occupant_presence(
    from: &FullJid,
    to: &FullJid,
    show: Option<Show>,
    status: Option<&str>,
) -> Presence {
    let mut p = Presence::available().with_from(from.clone()).with_to(to.clone());
    p.add_payload(user_caps());
    p.show = show;
    if let Some(s) = status.map(xml_safe).filter(|s| !s.trim().is_empty()) {
        p.set_status("", s);
    }
    p
}

/// Leaving a room.
pub fn leave(from: &FullJid, to: &FullJid) -> Presence {
    Presence::unavailable().with_from(from.clone()).with_to(to.clone())
}

/// A groupchat message with an origin-id (XEP-0359) equal to its id, optionally correcting
/// (XEP-0308) an earlier message.
pub fn groupchat(
    from: &FullJid,
    room: &RoomJid,
    id: &str,
    body: &str,
    replaces: Option<&str>,
) -> Option<Message> {
    let to = Jid::new(&room.bare()).ok()?;
    let mut m = Message::groupchat(to).with_body(Lang::default(), xml_safe(body));
    m.from = Some(from.clone().into());
    m.id = Some(Id(id.to_owned()));
    m.payloads.push(OriginId { id: id.to_owned() }.into());
    if let Some(r) = replaces {
        m.payloads.push(Replace { id: Id(r.to_owned()) }.into());
    }
    Some(m)
}

/// Makes `m` a reply (XEP-0461) to the message the room knows as `id`, sent by the occupant
/// `to`: the quote `fallback` is put before the body and marked as a fallback (XEP-0428), so
/// that clients that understand replies can remove it.
pub fn add_reply(m: &mut Message, to: Option<&str>, id: &str, fallback: &str) {
    let fallback = xml_safe(fallback);
    let body = m.get_best_body_cloned(vec![]).map(|(_, b)| b).unwrap_or_default();
    m.bodies.clear();
    m.bodies.insert(Lang::default(), format!("{fallback}{body}"));
    let mut reply = Element::builder("reply", NS_REPLY).attr(xml_ncname!("id").into(), id);
    if let Some(to) = to {
        reply = reply.attr(xml_ncname!("to").into(), to);
    }
    m.payloads.push(reply.build());
    let end = fallback.chars().count().to_string();
    m.payloads.push(
        Element::builder("fallback", NS_FALLBACK)
            .attr(xml_ncname!("for").into(), NS_REPLY)
            .append(
                Element::builder("body", NS_FALLBACK)
                    .attr(xml_ncname!("start").into(), "0")
                    .attr(xml_ncname!("end").into(), end)
                    .build(),
            )
            .build(),
    );
}

/// Attaches a file link (XEP-0066 `<x xmlns='jabber:x:oob'><url/><desc/></x>`). Clients show
/// the file inline when the body is exactly the URL, so callers send the URL as the body.
pub fn add_oob(m: &mut Message, url: &str, desc: Option<&str>) {
    let mut x = Element::builder("x", NS_OOB)
        .append(Element::builder("url", NS_OOB).append(xml_safe(url)).build());
    if let Some(d) = desc.filter(|d| !d.trim().is_empty()) {
        x = x.append(Element::builder("desc", NS_OOB).append(xml_safe(d)).build());
    }
    m.payloads.push(x.build());
}

/// The URL of the first XEP-0066 out-of-band file of a message.
pub fn oob_url(m: &Message) -> Option<String> {
    m.payloads
        .iter()
        .filter(|p| p.is("x", NS_OOB))
        .find_map(|p| p.get_child("url", NS_OOB))
        .map(|u| u.text().trim().to_owned())
        .filter(|u| !u.is_empty())
}

/// The quote put before a reply's text for clients without XEP-0461: `> nick: first line`.
pub fn reply_fallback(nick: &str, quoted: Option<&str>) -> String {
    match quoted.and_then(|q| q.lines().find(|l| !l.trim().is_empty())) {
        Some(line) => {
            let line: String = line.chars().take(80).collect();
            format!("> {nick}: {line}\n")
        }
        None => format!("> {nick} wrote:\n"),
    }
}

/// The full set of `from`'s reactions (XEP-0444) to the message the room knows as `target`.
pub fn reactions(
    from: &FullJid,
    room: &RoomJid,
    id: &str,
    target: &str,
    keys: &[String],
) -> Option<Message> {
    let to = Jid::new(&room.bare()).ok()?;
    let mut m = Message::groupchat(to);
    m.from = Some(from.clone().into());
    m.id = Some(Id(id.to_owned()));
    let mut r = Element::builder("reactions", NS_REACTIONS).attr(xml_ncname!("id").into(), target);
    for k in keys {
        r = r.append(Element::builder("reaction", NS_REACTIONS).append(xml_safe(k)).build());
    }
    m.payloads.push(r.build());
    m.payloads.push(Element::builder("store", "urn:xmpp:hints").build());
    m.payloads.push(OriginId { id: id.to_owned() }.into());
    Some(m)
}

/// A 1:1 `chat` message with an origin-id (XEP-0359) equal to its id.
pub fn chat(from: &FullJid, to: Jid, id: &str, body: &str) -> Message {
    let mut m = Message::chat(to).with_body(Lang::default(), xml_safe(body));
    m.from = Some(from.clone().into());
    m.id = Some(Id(id.to_owned()));
    m.payloads.push(OriginId { id: id.to_owned() }.into());
    m
}

/// A bodyless chat-state notification (XEP-0085), not to be archived.
pub fn chat_state(from: &FullJid, room: &RoomJid, state: &str) -> Option<Message> {
    let to = Jid::new(&room.bare()).ok()?;
    let mut m = Message::groupchat(to);
    m.from = Some(from.clone().into());
    m.payloads.push(Element::builder(state, NS_CHATSTATES).build());
    m.payloads.push(Element::builder("no-store", "urn:xmpp:hints").build());
    Some(m)
}

/// Asks for read markers (XEP-0333 `<markable/>`) on a message.
pub fn add_markable(m: &mut Message) {
    m.payloads.push(Element::builder("markable", NS_MARKERS).build());
}

/// A bodyless displayed marker (XEP-0333) for the message the room knows as `id`.
pub fn displayed(from: &FullJid, room: &RoomJid, id: &str) -> Option<Message> {
    let to = Jid::new(&room.bare()).ok()?;
    let mut m = Message::groupchat(to);
    m.from = Some(from.clone().into());
    m.payloads
        .push(Element::builder("displayed", NS_MARKERS).attr(xml_ncname!("id").into(), id).build());
    Some(m)
}

/// A retraction (XEP-0424) of the message the MUC knows as `stanza_id`, with a fallback body.
pub fn retraction(from: &FullJid, room: &RoomJid, id: &str, stanza_id: &str) -> Option<Message> {
    let to = Jid::new(&room.bare()).ok()?;
    let mut m = Message::groupchat(to).with_body(
        Lang::default(),
        "/me retracted a previous message, but it's unsupported by your client.".to_owned(),
    );
    m.from = Some(from.clone().into());
    m.id = Some(Id(id.to_owned()));
    m.payloads.push(
        Element::builder("retract", NS_RETRACT).attr(xml_ncname!("id").into(), stanza_id).build(),
    );
    m.payloads.push(
        Element::builder("fallback", NS_FALLBACK)
            .attr(xml_ncname!("for").into(), NS_RETRACT)
            .build(),
    );
    m.payloads.push(OriginId { id: id.to_owned() }.into());
    Some(m)
}

/// A change of the room's subject (XEP-0045 §8.1) to `subject`, with an origin-id `id`.
pub fn subject(from: &FullJid, room: &RoomJid, id: &str, subject: &str) -> Option<Message> {
    let to = Jid::new(&room.bare()).ok()?;
    let mut m = Message::groupchat(to);
    m.subjects.insert(Lang::default(), xml_safe(subject));
    m.from = Some(from.clone().into());
    m.id = Some(Id(id.to_owned()));
    m.payloads.push(OriginId { id: id.to_owned() }.into());
    Some(m)
}

/// A mediated invitation (XEP-0045 §7.8.2): `from`, an occupant of `room`, asks the room to invite
/// `invitee` (a bare JID), with a reason.
pub fn mediated_invite(
    from: &FullJid,
    room: &RoomJid,
    id: &str,
    invitee: &str,
    reason: Option<&str>,
) -> Option<Message> {
    let mut invite =
        Element::builder("invite", ns::MUC_USER).attr(xml_ncname!("to").into(), invitee);
    if let Some(r) = reason.map(xml_safe).filter(|r| !r.trim().is_empty()) {
        invite = invite.append(Element::builder("reason", ns::MUC_USER).append(r).build());
    }
    let mut m = Message::new(Some(Jid::new(&room.bare()).ok()?));
    m.type_ = MessageType::Normal;
    m.from = Some(from.clone().into());
    m.id = Some(Id(id.to_owned()));
    m.payloads.push(Element::builder("x", ns::MUC_USER).append(invite.build()).build());
    Some(m)
}

/// A mediated invitation as the room delivers it: the inviter's JID and the reason, if given.
pub fn read_mediated_invite(m: &Message) -> Option<(Option<String>, Option<String>)> {
    let invite =
        m.payloads.iter().find(|p| p.is("x", ns::MUC_USER))?.get_child("invite", ns::MUC_USER)?;
    let reason =
        invite.get_child("reason", ns::MUC_USER).map(|r| r.text()).filter(|r| !r.trim().is_empty());
    Some((invite.attr("from").map(str::to_owned), reason))
}

/// Accepts the default configuration of a room the bot just created (XEP-0045 §10.1.2, an
/// "instant room"), which unlocks it for everyone else.
pub fn instant_room(from: &FullJid, room: &RoomJid, id: &str) -> Option<Iq> {
    let form =
        Element::builder("x", ns::DATA_FORMS).attr(xml_ncname!("type").into(), "submit").build();
    let query = Element::builder("query", NS_MUC_OWNER).append(form).build();
    Some(Iq::Set {
        from: Some(from.clone().into()),
        to: Some(Jid::new(&room.bare()).ok()?),
        id: id.to_owned(),
        payload: query,
    })
}

/// A change to one occupant or user of a room (XEP-0045 §8, §9): `who` is `("nick", nick)` or
/// `("jid", bare JID)`, `change` is `("role", "none")` for a kick or `("affiliation",
/// "outcast")` for a ban.
pub fn muc_admin(
    from: &FullJid,
    room: &RoomJid,
    id: &str,
    who: (&str, &str),
    change: (&str, &str),
    reason: Option<&str>,
) -> Option<Iq> {
    let attr = |name: &str| xmpp_parsers::minidom::rxml::NcName::try_from(name).ok();
    let mut item = Element::builder("item", NS_MUC_ADMIN)
        .attr(attr(who.0)?, who.1)
        .attr(attr(change.0)?, change.1);
    if let Some(r) = reason.map(xml_safe).filter(|r| !r.trim().is_empty()) {
        item = item.append(Element::builder("reason", NS_MUC_ADMIN).append(r).build());
    }
    let query = Element::builder("query", NS_MUC_ADMIN).append(item.build()).build();
    Some(Iq::Set {
        from: Some(from.clone().into()),
        to: Some(Jid::new(&room.bare()).ok()?),
        id: id.to_owned(),
        payload: query,
    })
}

/// A moderation request (XEP-0425, version 0.2 as Prosody's `mod_muc_moderation` speaks it):
/// `from`, a moderator's occupant, asks `room` to retract the message it knows as `stanza_id`.
pub fn moderation(
    from: &FullJid,
    room: &RoomJid,
    id: &str,
    stanza_id: &str,
    reason: Option<&str>,
) -> Option<Iq> {
    let mut moderate = Element::builder("moderate", NS_MODERATE_0)
        .append(Element::builder("retract", NS_RETRACT_0).build());
    if let Some(r) = reason.map(xml_safe).filter(|r| !r.trim().is_empty()) {
        moderate = moderate.append(Element::builder("reason", NS_MODERATE_0).append(r).build());
    }
    let apply_to = Element::builder("apply-to", NS_FASTEN)
        .attr(xml_ncname!("id").into(), stanza_id)
        .append(moderate.build())
        .build();
    Some(Iq::Set {
        from: Some(from.clone().into()),
        to: Some(Jid::new(&room.bare()).ok()?),
        id: id.to_owned(),
        payload: apply_to,
    })
}

/// A room's announcement that a moderator retracted a message (XEP-0425).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moderated {
    /// The room's stanza-id of the retracted message.
    pub stanza_id: String,
    /// The moderator's occupant JID, when given.
    pub by: Option<String>,
    /// The reason, when given.
    pub reason: Option<String>,
}

/// Reads a moderation announcement (the caller checked it comes from the room itself, not an
/// occupant): version 0.2 (`<apply-to><moderated><retract/></moderated></apply-to>`) or 0.3+
/// (`<retract id><moderated/></retract>`). Moderations that do not retract are ignored.
pub fn read_moderation(m: &Message) -> Option<Moderated> {
    let reason = |e: &Element, ns: &str| {
        e.get_child("reason", ns).map(|r| r.text()).filter(|r| !r.trim().is_empty())
    };
    m.payloads.iter().find_map(|p| {
        if p.is("apply-to", NS_FASTEN) {
            let moderated = p.get_child("moderated", NS_MODERATE_0)?;
            moderated.get_child("retract", NS_RETRACT_0)?;
            Some(Moderated {
                stanza_id: p.attr("id")?.to_owned(),
                by: moderated.attr("by").map(str::to_owned),
                reason: reason(moderated, NS_MODERATE_0),
            })
        } else if p.is("retract", NS_RETRACT) {
            let moderated = p.get_child("moderated", NS_MODERATE)?;
            Some(Moderated {
                stanza_id: p.attr("id")?.to_owned(),
                by: moderated.attr("by").map(str::to_owned),
                reason: reason(p, NS_RETRACT),
            })
        } else {
            None
        }
    })
}

/// A groupchat message as the bridge reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MucMessage {
    /// The sender's nick.
    pub nick: String,
    /// The stanza's `id`.
    pub id: Option<String>,
    /// XEP-0359 origin-id.
    pub origin_id: Option<String>,
    /// XEP-0359 stanza-id assigned by the room.
    pub stanza_id: Option<String>,
    /// The body, if any.
    pub body: Option<String>,
    /// The subject, if one is set.
    pub subject: Option<String>,
    /// Whether the message carries `<delay/>` (history).
    pub delayed: bool,
    /// The `<delay stamp>` (Unix milliseconds), when it has a valid one.
    pub stamp_ms: Option<i64>,
    /// XEP-0308: the id of the corrected message.
    pub replaces: Option<String>,
    /// XEP-0424: the id of the retracted message.
    pub retracts: Option<String>,
    /// XEP-0461: the replied-to message's id and its sender's occupant JID.
    pub reply_to: Option<(String, Option<String>)>,
    /// XEP-0444: the id of the message reacted to and the sender's full set of reactions.
    pub reactions: Option<(String, Vec<String>)>,
    /// XEP-0085: the chat state (`composing`, `paused`, `active`, `inactive`, `gone`).
    pub chat_state: Option<String>,
    /// XEP-0066: the URL of a file shared out of band (the first one).
    pub oob_url: Option<String>,
    /// XEP-0333: the sender asks for markers (`<markable/>`).
    pub markable: bool,
    /// XEP-0333: the id of the message the sender has displayed (read).
    pub displayed: Option<String>,
    /// XEP-0421: the occupant-id the room stamped (see [`read_occupant_id`]); only to be
    /// trusted when the room advertises [`NS_OCCUPANT_ID`].
    pub occupant_id: Option<String>,
}

/// The XEP-0421 occupant-id among a stanza's payloads: `None` when there is none, when there
/// are several (a room that supports the XEP strips what clients send and adds exactly one),
/// or when it is empty or longer than [`MAX_OCCUPANT_ID`] bytes. Whether to trust it depends on
/// the room advertising [`NS_OCCUPANT_ID`]; a room that does not may pass on a client's forgery.
pub fn read_occupant_id(payloads: &[Element]) -> Option<String> {
    let mut ids = payloads.iter().filter(|p| p.is("occupant-id", NS_OCCUPANT_ID));
    let first = ids.next()?;
    if ids.next().is_some() {
        return None;
    }
    first.attr("id").filter(|id| !id.is_empty() && id.len() <= MAX_OCCUPANT_ID).map(str::to_owned)
}

/// The features in a disco#info result's `<query/>`.
pub fn disco_features(query: &Element) -> Vec<String> {
    if !query.is("query", ns::DISCO_INFO) {
        return Vec::new();
    }
    query
        .children()
        .filter(|c| c.is("feature", ns::DISCO_INFO))
        .filter_map(|c| c.attr("var").map(str::to_owned))
        .collect()
}

/// Removes the code-point range `start..end` (a XEP-0428 fallback) from `body`.
pub fn strip_range(body: &str, start: usize, end: usize) -> String {
    body.chars().enumerate().filter(|(i, _)| *i < start || *i >= end).map(|(_, c)| c).collect()
}

/// Reads a groupchat message from `room` (the caller checked the type and the bare `from`).
pub fn read_muc_message(m: &Message, room: &RoomJid) -> Option<MucMessage> {
    let from = m.from.as_ref()?;
    let nick = from.resource()?.as_str().to_owned();
    let mut out = MucMessage {
        nick,
        id: m.id.as_ref().map(|i| i.0.clone()),
        body: m.get_best_body_cloned(vec![]).map(|(_, b)| b),
        subject: m.get_best_subject_cloned(vec![]).map(|(_, s)| s),
        oob_url: oob_url(m),
        occupant_id: read_occupant_id(&m.payloads),
        ..MucMessage::default()
    };
    let room_bare = room.bare();
    for p in &m.payloads {
        if p.is("stanza-id", ns::SID) {
            // Only the room's own stanza-id can be trusted: an occupant can add any other.
            if p.attr("by") == Some(room_bare.as_str()) {
                out.stanza_id = p.attr("id").map(str::to_owned);
            }
        } else if p.is("origin-id", ns::SID) {
            out.origin_id = p.attr("id").map(str::to_owned);
        } else if p.is("delay", ns::DELAY) {
            out.delayed = true;
            out.stamp_ms = p.attr("stamp").and_then(parse_stamp);
        } else if p.is("replace", ns::MESSAGE_CORRECT) {
            out.replaces = p.attr("id").map(str::to_owned);
        } else if p.is("retract", NS_RETRACT) {
            out.retracts = p.attr("id").map(str::to_owned);
        } else if p.ns() == NS_CHATSTATES {
            out.chat_state = Some(p.name().to_owned());
        } else if p.is("markable", NS_MARKERS) {
            out.markable = true;
        } else if p.is("displayed", NS_MARKERS) {
            out.displayed = p.attr("id").map(str::to_owned);
        } else if p.is("reply", NS_REPLY)
            && let Some(id) = p.attr("id")
        {
            out.reply_to = Some((id.to_owned(), p.attr("to").map(str::to_owned)));
        } else if p.is("reactions", NS_REACTIONS)
            && let Some(id) = p.attr("id")
        {
            let mut keys: Vec<String> = Vec::new();
            for r in p.children().filter(|c| c.is("reaction", NS_REACTIONS)) {
                let k = r.text().trim().to_owned();
                if !k.is_empty() && !keys.contains(&k) {
                    keys.push(k);
                }
            }
            out.reactions = Some((id.to_owned(), keys));
        }
    }
    // The reply's quote (XEP-0428 fallback for XEP-0461) is removed from the body.
    if out.reply_to.is_some()
        && let Some(body) = &out.body
    {
        let mut ranges: Vec<(usize, usize)> = m
            .payloads
            .iter()
            .filter(|p| p.is("fallback", NS_FALLBACK) && p.attr("for") == Some(NS_REPLY))
            .flat_map(|f| f.children().filter(|c| c.name() == "body"))
            .filter_map(|b| Some((b.attr("start")?.parse().ok()?, b.attr("end")?.parse().ok()?)))
            .collect();
        ranges.sort_unstable();
        let mut text = body.clone();
        for (start, end) in ranges.into_iter().rev() {
            if start < end {
                text = strip_range(&text, start, end);
            }
        }
        out.body = Some(text);
    }
    Some(out)
}

/// A MUC presence as the bridge reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MucPresence {
    /// The occupant's nick.
    pub nick: String,
    /// `unavailable`.
    pub unavailable: bool,
    /// An error presence: the defined condition's element name.
    pub error: Option<String>,
    /// Status codes.
    pub codes: Vec<u16>,
    /// The occupant's real JID, when the room shows it.
    pub real_jid: Option<String>,
    /// The new nick (status 303).
    pub new_nick: Option<String>,
    /// `<show/>`: `away`, `chat`, `dnd` or `xa` (none means available).
    pub show: Option<String>,
    /// `<status/>` text.
    pub status: Option<String>,
    /// The occupant's affiliation (`owner`, `admin`, `member`, `outcast`, `none`).
    pub affiliation: Option<String>,
    /// The occupant's role (`moderator`, `participant`, `visitor`, `none`).
    pub role: Option<String>,
    /// Why the occupant was removed (kick or ban), and by whom (the actor's nick).
    pub reason: Option<String>,
    /// The nick of who removed the occupant, when the room tells.
    pub actor: Option<String>,
    /// The avatar the occupant announces (XEP-0153): the lowercase hex SHA-1 of its vCard
    /// photo, or `""` for no avatar. `None` when the presence does not tell (no
    /// `vcard-temp:x:update`, no `<photo/>` in it, or not a SHA-1).
    pub photo: Option<String>,
    /// XEP-0421: the occupant-id the room stamped (see [`read_occupant_id`]); only to be
    /// trusted when the room advertises [`NS_OCCUPANT_ID`].
    pub occupant_id: Option<String>,
}

impl MucPresence {
    /// Whether this is the occupant's own presence (status 110).
    pub fn is_self(&self) -> bool {
        self.codes.contains(&110)
    }
}

/// Reads a presence from a room occupant (tolerant of unknown status codes).
pub fn read_muc_presence(p: &Presence) -> Option<MucPresence> {
    let nick = p.from.as_ref()?.resource()?.as_str().to_owned();
    let mut out = MucPresence {
        nick,
        unavailable: p.type_ == PresenceType::Unavailable,
        show: p.show.as_ref().map(|s| {
            match s {
                Show::Away => "away",
                Show::Chat => "chat",
                Show::Dnd => "dnd",
                Show::Xa => "xa",
            }
            .to_owned()
        }),
        status: p.statuses.values().map(|s| s.trim()).find(|s| !s.is_empty()).map(str::to_owned),
        occupant_id: read_occupant_id(&p.payloads),
        ..MucPresence::default()
    };
    if p.type_ == PresenceType::Error {
        out.error = Some(
            p.payloads
                .iter()
                .find(|e| e.name() == "error")
                .and_then(|e| e.children().next().map(|c| c.name().to_owned()))
                .unwrap_or_else(|| "undefined-condition".to_owned()),
        );
    }
    for x in p.payloads.iter().filter(|e| e.is("x", ns::MUC_USER)) {
        for c in x.children() {
            if c.name() == "status"
                && let Some(code) = c.attr("code").and_then(|v| v.parse().ok())
            {
                out.codes.push(code);
            } else if c.name() == "item" {
                out.real_jid = c.attr("jid").map(str::to_owned);
                out.new_nick = c.attr("nick").map(str::to_owned);
                out.affiliation = c.attr("affiliation").map(str::to_owned);
                out.role = c.attr("role").map(str::to_owned);
                out.reason = c
                    .get_child("reason", ns::MUC_USER)
                    .map(|r| r.text().trim().to_owned())
                    .filter(|r| !r.is_empty());
                out.actor = c
                    .get_child("actor", ns::MUC_USER)
                    .and_then(|a| a.attr("nick"))
                    .map(str::to_owned);
            }
        }
    }
    out.photo = p
        .payloads
        .iter()
        .find(|e| e.is("x", NS_VCARD_UPDATE))
        .and_then(|x| x.get_child("photo", NS_VCARD_UPDATE))
        .map(|photo| photo.text().trim().to_ascii_lowercase())
        .filter(|h| h.is_empty() || (h.len() == 40 && h.bytes().all(|b| b.is_ascii_hexdigit())));
    Some(out)
}

/// A vCard request (XEP-0054) from `from` to `to`. Sent to an occupant's room JID, the room
/// passes it on to the occupant's bare real JID, whose server answers with the stored vCard
/// (Prosody does so in every room, anonymous or not, as long as `from` is an occupant).
pub fn vcard_get(from: &FullJid, to: &FullJid, id: &str) -> Iq {
    Iq::Get {
        from: Some(from.clone().into()),
        to: Some(to.clone().into()),
        id: id.to_owned(),
        payload: Element::builder("vCard", NS_VCARD).build(),
    }
}

/// Announces an avatar in a presence (XEP-0153): `hash` is the hex SHA-1 of the photo, `""`
/// for none.
pub fn add_avatar_hash(p: &mut Presence, hash: &str) {
    let photo = Element::builder("photo", NS_VCARD_UPDATE).append(hash.to_owned()).build();
    p.payloads.push(Element::builder("x", NS_VCARD_UPDATE).append(photo).build());
}

/// A vCard (XEP-0054) with only a photo (`TYPE`, base64 `BINVAL`), or empty without one.
pub fn vcard(photo: Option<&VcardPhoto>) -> Element {
    let mut v = Element::builder("vCard", NS_VCARD);
    if let Some(p) = photo {
        use base64::Engine as _;
        let text = |name: &str, value: String| {
            Element::builder(name, NS_VCARD).append(xml_safe(&value)).build()
        };
        v = v.append(
            Element::builder("PHOTO", NS_VCARD)
                .append(text("TYPE", p.mimetype.clone()))
                .append(text("BINVAL", base64::engine::general_purpose::STANDARD.encode(&p.data)))
                .build(),
        );
    }
    v.build()
}

/// The photo of a vCard (XEP-0054 `PHOTO`, inline as `BINVAL`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcardPhoto {
    /// Its MIME type (`TYPE`), `image/png` when the vCard does not say or says nonsense.
    pub mimetype: String,
    /// The decoded image.
    pub data: Vec<u8>,
}

/// Why a vCard's photo could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VcardPhotoError {
    /// The vCard has no inline photo (none, or only an `EXTVAL` link, which is not followed).
    #[error("the vCard has no inline photo")]
    Missing,
    /// The photo is larger than the limit (in bytes).
    #[error("the photo is larger than {0} bytes")]
    TooLarge(u64),
    /// `BINVAL` is not base64.
    #[error("the photo is not valid base64")]
    Invalid,
}

/// Reads the inline photo of a vCard (`<vCard xmlns='vcard-temp'>`), refusing one that decodes
/// to more than `max_bytes` (checked before decoding). Whitespace in `BINVAL` (line breaks) is
/// ignored.
pub fn read_vcard_photo(vcard: &Element, max_bytes: u64) -> Result<VcardPhoto, VcardPhotoError> {
    let photo = vcard.get_child("PHOTO", NS_VCARD).ok_or(VcardPhotoError::Missing)?;
    let binval = photo.get_child("BINVAL", NS_VCARD).ok_or(VcardPhotoError::Missing)?;
    let b64: String = binval.text().chars().filter(|c| !c.is_ascii_whitespace()).collect();
    if b64.is_empty() {
        return Err(VcardPhotoError::Missing);
    }
    if (b64.len() as u64 / 4).saturating_mul(3) > max_bytes.saturating_add(2) {
        return Err(VcardPhotoError::TooLarge(max_bytes));
    }
    use base64::Engine as _;
    let data = base64::engine::general_purpose::STANDARD
        .decode(b64.as_bytes())
        .map_err(|_| VcardPhotoError::Invalid)?;
    if data.len() as u64 > max_bytes {
        return Err(VcardPhotoError::TooLarge(max_bytes));
    }
    let mimetype = photo
        .get_child("TYPE", NS_VCARD)
        .map(|t| t.text().trim().to_ascii_lowercase())
        .filter(|t| {
            t.strip_prefix("image/").is_some_and(|sub| {
                !sub.is_empty()
                    && sub.bytes().all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
            })
        })
        .unwrap_or_else(|| "image/png".to_owned());
    Ok(VcardPhoto { mimetype, data })
}

/// An error reply to a stanza (`type` cancel) with a text.
pub fn error(condition: DefinedCondition, text: &str) -> StanzaError {
    StanzaError::new(ErrorType::Cancel, condition, "en", text)
}

/// The component's disco#info.
pub fn disco_info(name: &str) -> DiscoInfoResult {
    DiscoInfoResult {
        node: None,
        identities: vec![Identity::new("gateway", "matrix", "en", name)],
        features: FEATURES.iter().map(|f| (*f).to_owned()).collect(),
        extensions: Vec::new(),
    }
}

/// The node of the bridge's entity capabilities (XEP-0115): the project's address.
pub const CAPS_NODE: &str = env!("CARGO_PKG_REPOSITORY");

/// The entity capabilities (XEP-0115) that presences of puppets and the bot carry: the SHA-1
/// `ver` of [`disco_info_user`], so that clients learn what they support without asking each.
/// Computed once: the disco#info it hashes never changes while the bridge runs.
pub fn user_caps() -> Caps {
    static CAPS: std::sync::LazyLock<Caps> = std::sync::LazyLock::new(|| {
        let ver = compute_disco(&disco_info_user());
        let hash = hash_caps(&ver, Algo::Sha_1)
            .unwrap_or_else(|_| Hash::new(Algo::Sha_1, Sha1::digest(&ver).to_vec()));
        Caps::new(CAPS_NODE, hash)
    });
    CAPS.clone()
}

/// The `node#ver` under which [`user_caps`] may be queried (disco#info with a node).
pub fn user_caps_node() -> String {
    let caps = user_caps();
    format!("{}#{}", caps.node, base64::engine::general_purpose::STANDARD.encode(&caps.ver))
}

/// The disco#info of a Matrix user's puppet or the bot: a client.
pub fn disco_info_user() -> DiscoInfoResult {
    DiscoInfoResult {
        node: None,
        identities: vec![Identity::new_anonymous::<_, _, String, String>("client", "bot")],
        features: [ns::DISCO_INFO, ns::CAPS, ns::PING, ns::VERSION, NS_VCARD]
            .iter()
            .map(|f| (*f).to_owned())
            .collect(),
        extensions: Vec::new(),
    }
}

/// Whether a message type is the MUC's.
pub fn is_groupchat(m: &Message) -> bool {
    m.type_ == MessageType::Groupchat
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entity_capabilities_hash_what_disco_info_answers() {
        // XEP-0115 §5.1 by hand: identities `category/type/lang/name<`, then the sorted
        // features each followed by `<`; SHA-1; base64.
        let info = disco_info_user();
        // `features` is a sorted set.
        let mut s = "client/bot//<".to_owned();
        for f in &info.features {
            s.push_str(f);
            s.push('<');
        }
        let ver = base64::engine::general_purpose::STANDARD.encode(Sha1::digest(s.as_bytes()));
        assert_eq!(user_caps_node(), format!("{CAPS_NODE}#{ver}"));
        assert!(info.features.iter().any(|f| f == ns::CAPS));
        // Every available presence of ours carries them.
        let from = FullJid::new("u@c/r").unwrap();
        let to = FullJid::new("room@muc/nick").unwrap();
        for p in [join(&from, &to), bot_join(&from, &to, JoinHistory::None)] {
            let el = Element::from(p);
            let c = el.get_child("c", ns::CAPS).expect("caps in the presence");
            assert_eq!(c.attr("ver"), Some(ver.as_str()));
            assert_eq!(c.attr("hash"), Some("sha-1"));
        }
    }

    fn room() -> RoomJid {
        RoomJid::new("test", "conference.localhost").unwrap()
    }

    fn xml(m: impl Into<Element>) -> String {
        String::from(&m.into())
    }

    #[test]
    fn timestamps_round_trip_through_xep_0082() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso8601(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(iso8601(1_796_311_881_005), "2026-12-03T15:31:21.005Z");
        for ms in [0, 86_399_999, 951_782_400_123, 1_796_311_881_005, 4_102_444_800_000] {
            assert_eq!(parse_stamp(&iso8601(ms)), Some(ms), "{ms}");
        }
        assert_eq!(parse_stamp("2026-12-03T16:31:21+01:00"), Some(1_796_311_881_000));
        assert_eq!(parse_stamp("yesterday"), None);
        assert_eq!(parse_stamp("<x/>"), None);
    }

    #[test]
    fn bot_joins_ask_for_the_history_wanted() {
        let from = FullJid::new("bridge@matrix.localhost/trestle").unwrap();
        let to = occupant(&room(), "MatrixBridge").unwrap();
        let none = xml(bot_join(&from, &to, JoinHistory::None));
        assert!(none.contains("maxstanzas='0'"), "{none}");
        let last = xml(bot_join(&from, &to, JoinHistory::Last(20)));
        assert!(last.contains("maxstanzas='20'"), "{last}");
        let since =
            xml(bot_join(&from, &to, JoinHistory::Since { ms: 1_796_311_881_005, max: 500 }));
        assert!(since.contains("maxstanzas='500'"), "{since}");
        assert!(since.contains("since='2026-12-03T15:31:21.005"), "{since}");
    }

    #[test]
    fn archive_queries_page_with_rsm() {
        let from = FullJid::new("bridge@matrix.localhost/trestle").unwrap();
        let q = |at: &ArchiveFrom| xml(mam_query(&from, &room(), "i1", "q1", at, 50).unwrap());
        let last = q(&ArchiveFrom::Before(None));
        assert!(last.contains("urn:xmpp:mam:2") && last.contains("queryid='q1'"), "{last}");
        assert!(last.contains("<max>50</max><before/>"), "{last}");
        assert!(last.contains("to='test@conference.localhost'"), "{last}");
        let after = q(&ArchiveFrom::After("a<b".to_owned()));
        assert!(after.contains("<after>a&lt;b</after>"), "{after}");
        let start = q(&ArchiveFrom::Start(0));
        assert!(start.contains("var='start'") && start.contains("1970-01-01T00:00:00.000Z"));
        assert!(!start.contains("<after") && !start.contains("<before"), "{start}");
    }

    #[test]
    fn archive_results_and_their_end_are_read() {
        let text = format!(
            "<message xmlns='{ns}' from='test@conference.localhost' to='bridge@matrix.localhost/trestle'>\
             <result xmlns='urn:xmpp:mam:2' queryid='q1' id='sid-1'>\
             <forwarded xmlns='urn:xmpp:forward:0'><delay xmlns='urn:xmpp:delay' stamp='2026-12-03T15:31:21Z'/>\
             <message xmlns='jabber:client' from='test@conference.localhost/alice' type='groupchat' id='m1'>\
             <body>hello &lt;b&gt;</body><origin-id xmlns='urn:xmpp:sid:0' id='m1'/></message>\
             </forwarded></result></message>",
            ns = ns::DEFAULT_NS
        );
        let m = Message::try_from(text.parse::<Element>().unwrap()).unwrap();
        let a = read_mam_result(&m).expect("an archive result");
        assert_eq!((a.queryid.as_str(), a.archive_id.as_str()), ("q1", "sid-1"));
        assert_eq!(a.stamp_ms, Some(1_796_311_881_000));
        let msg = read_muc_message(&a.message, &room()).unwrap();
        assert_eq!(msg.nick, "alice");
        assert_eq!(msg.body.as_deref(), Some("hello <b>"));
        assert_eq!(msg.origin_id.as_deref(), Some("m1"));
        assert_eq!(a.message.type_, MessageType::Groupchat);

        // Not a result: a plain message, or one without its ids.
        let plain =
            format!("<message xmlns='{}' from='test@conference.localhost'/>", ns::DEFAULT_NS);
        assert!(
            read_mam_result(&Message::try_from(plain.parse::<Element>().unwrap()).unwrap())
                .is_none()
        );

        let fin: Element = "<fin xmlns='urn:xmpp:mam:2' complete='true'><set xmlns='http://jabber.org/protocol/rsm'>\
             <first index='0'>a</first><last>b</last></set></fin>"
            .parse()
            .unwrap();
        assert_eq!(
            read_mam_fin(&fin),
            Some(ArchiveFin { complete: true, first: Some("a".into()), last: Some("b".into()) })
        );
        let open: Element = "<fin xmlns='urn:xmpp:mam:2'/>".parse().unwrap();
        assert_eq!(
            read_mam_fin(&open),
            Some(ArchiveFin { complete: false, first: None, last: None })
        );
        let other: Element = "<fin xmlns='urn:other'/>".parse().unwrap();
        assert_eq!(read_mam_fin(&other), None);
    }

    #[test]
    fn delay_stamps_are_read() {
        let text = format!(
            "<message xmlns='{}' from='test@conference.localhost/bob' type='groupchat'>\
             <body>old</body><delay xmlns='urn:xmpp:delay' stamp='1970-01-01T00:00:01Z'/></message>",
            ns::DEFAULT_NS
        );
        let m = Message::try_from(text.parse::<Element>().unwrap()).unwrap();
        let msg = read_muc_message(&m, &room()).unwrap();
        assert!(msg.delayed);
        assert_eq!(msg.stamp_ms, Some(1000));
    }

    #[test]
    fn hostile_text_is_escaped_not_injected() {
        let from = FullJid::new("alice=3alocalhost@matrix.localhost/trestle").unwrap();
        let body = "<script>alert(1)</script> ]]> & </body><body>x \u{0}\u{7}";
        let m = groupchat(&from, &room(), "ev1", body, None).unwrap();
        let s = xml(m.clone());
        assert!(!s.contains("<script>"), "{s}");
        assert!(s.contains("&lt;script&gt;"), "{s}");
        // It parses back to the same text, minus what XML cannot carry.
        let back = Message::try_from(Element::from(m)).unwrap();
        assert_eq!(
            back.get_best_body(vec![]).unwrap().1,
            "<script>alert(1)</script> ]]> & </body><body>x "
        );
        assert!(s.contains("origin-id"));
    }

    #[test]
    fn reads_muc_messages_and_trusts_only_the_rooms_stanza_id() {
        let el: Element = "<message xmlns='jabber:component:accept' type='groupchat' from='test@conference.localhost/bob' to='bridge@matrix.localhost/trestle' id='m1'>\
            <body>hi</body><origin-id xmlns='urn:xmpp:sid:0' id='o1'/>\
            <stanza-id xmlns='urn:xmpp:sid:0' id='spoof' by='evil@example.org'/>\
            <stanza-id xmlns='urn:xmpp:sid:0' id='s1' by='test@conference.localhost'/>\
            <replace xmlns='urn:xmpp:message-correct:0' id='m0'/></message>"
            .parse()
            .unwrap();
        let m = Message::try_from(el).unwrap();
        let r = read_muc_message(&m, &room()).unwrap();
        assert_eq!(r.nick, "bob");
        assert_eq!(r.body.as_deref(), Some("hi"));
        assert_eq!(r.stanza_id.as_deref(), Some("s1"));
        assert_eq!(r.origin_id.as_deref(), Some("o1"));
        assert_eq!(r.replaces.as_deref(), Some("m0"));
        assert!(!r.delayed);
        let el: Element = "<message xmlns='jabber:component:accept' type='groupchat' from='test@conference.localhost/bob'>\
            <body>old</body><delay xmlns='urn:xmpp:delay' stamp='2026-01-01T00:00:00Z'/></message>"
            .parse()
            .unwrap();
        assert!(read_muc_message(&Message::try_from(el).unwrap(), &room()).unwrap().delayed);
    }

    #[test]
    fn reads_occupant_ids_once_and_only_when_well_formed() {
        let presence = |extra: &str| {
            let el: Element = format!("<presence xmlns='jabber:component:accept' from='test@conference.localhost/Alice' to='bridge@matrix.localhost/trestle'>\
                <x xmlns='http://jabber.org/protocol/muc#user'><item affiliation='none' role='participant'/></x>{extra}</presence>")
                .parse()
                .unwrap();
            read_muc_presence(&Presence::try_from(el).unwrap()).unwrap().occupant_id
        };
        assert_eq!(
            presence("<occupant-id xmlns='urn:xmpp:occupant-id:0' id='dGhpcyBpZA=='/>").as_deref(),
            Some("dGhpcyBpZA==")
        );
        assert_eq!(presence(""), None);
        // Two (a forgery passed on next to the room's), an empty or an oversized id, another
        // namespace: none is trusted.
        assert_eq!(
            presence(
                "<occupant-id xmlns='urn:xmpp:occupant-id:0' id='a'/><occupant-id xmlns='urn:xmpp:occupant-id:0' id='b'/>"
            ),
            None
        );
        assert_eq!(presence("<occupant-id xmlns='urn:xmpp:occupant-id:0' id=''/>"), None);
        assert_eq!(presence("<occupant-id xmlns='urn:xmpp:occupant-id:0'/>"), None);
        let long = "x".repeat(MAX_OCCUPANT_ID + 1);
        assert_eq!(
            presence(&format!("<occupant-id xmlns='urn:xmpp:occupant-id:0' id='{long}'/>")),
            None
        );
        assert_eq!(presence("<occupant-id xmlns='urn:xmpp:occupant-id:1' id='a'/>"), None);
        // Hostile characters are read as text, whatever they are.
        assert_eq!(
            presence("<occupant-id xmlns='urn:xmpp:occupant-id:0' id='&lt;x&gt;&amp;/:@'/>")
                .as_deref(),
            Some("<x>&/:@")
        );
        let el: Element = "<message xmlns='jabber:component:accept' type='groupchat' from='test@conference.localhost/bob'>\
            <body>hi</body><occupant-id xmlns='urn:xmpp:occupant-id:0' id='occ1'/></message>"
            .parse()
            .unwrap();
        let m = read_muc_message(&Message::try_from(el).unwrap(), &room()).unwrap();
        assert_eq!(m.occupant_id.as_deref(), Some("occ1"));
    }

    #[test]
    fn disco_info_requests_and_features() {
        let from = FullJid::new("bridge@matrix.localhost/trestle").unwrap();
        let iq = disco_info_get(&from, &room(), "d1").unwrap();
        let s = xml(iq);
        assert!(
            s.contains("to='test@conference.localhost'")
                || s.contains("to=\"test@conference.localhost\""),
            "{s}"
        );
        assert!(s.contains(ns::DISCO_INFO), "{s}");
        let q: Element = "<query xmlns='http://jabber.org/protocol/disco#info'>\
            <identity category='conference' type='text' name='x'/>\
            <feature var='http://jabber.org/protocol/muc'/><feature var='urn:xmpp:occupant-id:0'/></query>"
            .parse()
            .unwrap();
        let f = disco_features(&q);
        assert!(f.iter().any(|f| f == NS_OCCUPANT_ID), "{f:?}");
        assert_eq!(f.len(), 2);
        assert!(disco_features(&Element::bare("vCard", NS_VCARD)).is_empty());
    }

    #[test]
    fn reads_presences_with_unknown_codes_and_errors() {
        let el: Element = "<presence xmlns='jabber:component:accept' from='test@conference.localhost/Alice' to='x@matrix.localhost/trestle'>\
            <x xmlns='http://jabber.org/protocol/muc#user'><item affiliation='none' role='participant' jid='x@matrix.localhost/trestle'/>\
            <status code='110'/><status code='999'/></x></presence>"
            .parse()
            .unwrap();
        let p = read_muc_presence(&Presence::try_from(el).unwrap()).unwrap();
        assert!(p.is_self());
        assert_eq!(p.codes, vec![110, 999]);
        assert_eq!(p.real_jid.as_deref(), Some("x@matrix.localhost/trestle"));
        let el: Element = "<presence xmlns='jabber:component:accept' type='error' from='test@conference.localhost/Alice' to='x@matrix.localhost/trestle'>\
            <error type='cancel'><conflict xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></presence>"
            .parse()
            .unwrap();
        let p = read_muc_presence(&Presence::try_from(el).unwrap()).unwrap();
        assert_eq!(p.error.as_deref(), Some("conflict"));
    }

    #[test]
    fn reads_the_announced_avatar_hash() {
        let presence = |x: &str| {
            let el: Element = format!("<presence xmlns='jabber:component:accept' from='test@conference.localhost/Bob' to='bridge@matrix.localhost/trestle'>{x}</presence>")
                .parse()
                .unwrap();
            read_muc_presence(&Presence::try_from(el).unwrap()).unwrap().photo
        };
        let hash = "A9993E364706816ABA3E25717850C26C9CD0D89D";
        assert_eq!(
            presence(&format!("<x xmlns='vcard-temp:x:update'><photo> {hash} </photo></x>")),
            Some(hash.to_ascii_lowercase())
        );
        assert_eq!(presence("<x xmlns='vcard-temp:x:update'><photo/></x>"), Some(String::new()));
        // Not ready to tell, no update at all, or not a SHA-1: nothing known.
        assert_eq!(presence("<x xmlns='vcard-temp:x:update'/>"), None);
        assert_eq!(presence(""), None);
        assert_eq!(presence("<x xmlns='vcard-temp:x:update'><photo>../x</photo></x>"), None);
    }

    #[test]
    fn reads_a_vcard_photo_within_the_limit() {
        let vcard = |photo: &str| -> Element {
            format!("<vCard xmlns='vcard-temp'><FN>Bob</FN>{photo}</vCard>").parse().unwrap()
        };
        // "hello" in base64, split over lines as some clients do.
        let v = vcard("<PHOTO><TYPE>IMAGE/JPEG</TYPE><BINVAL>aGVs\nbG8=</BINVAL></PHOTO>");
        assert_eq!(
            read_vcard_photo(&v, 100),
            Ok(VcardPhoto { mimetype: "image/jpeg".to_owned(), data: b"hello".to_vec() })
        );
        assert_eq!(read_vcard_photo(&v, 5).map(|p| p.data.len()), Ok(5));
        assert_eq!(read_vcard_photo(&v, 4), Err(VcardPhotoError::TooLarge(4)));
        let v = vcard("<PHOTO><TYPE>text/html;x=1</TYPE><BINVAL>aGVsbG8=</BINVAL></PHOTO>");
        assert_eq!(read_vcard_photo(&v, 100).unwrap().mimetype, "image/png");
        let v = vcard("<PHOTO><BINVAL>not base64!</BINVAL></PHOTO>");
        assert_eq!(read_vcard_photo(&v, 100), Err(VcardPhotoError::Invalid));
        let v = vcard("<PHOTO><EXTVAL>http://example.org/a.png</EXTVAL></PHOTO>");
        assert_eq!(read_vcard_photo(&v, 100), Err(VcardPhotoError::Missing));
        assert_eq!(read_vcard_photo(&vcard(""), 100), Err(VcardPhotoError::Missing));
    }

    #[test]
    fn vcards_and_avatar_hashes_round_trip() {
        let photo = VcardPhoto { mimetype: "image/png".to_owned(), data: b"\x89PNG<&>".to_vec() };
        let v = vcard(Some(&photo));
        assert_eq!(read_vcard_photo(&v, 100), Ok(photo));
        assert_eq!(read_vcard_photo(&vcard(None), 100), Err(VcardPhotoError::Missing));
        let bot = FullJid::new("bridge@matrix.localhost/trestle").unwrap();
        let mut p = join(&bot, &occupant(&room(), "Bob").unwrap());
        add_avatar_hash(&mut p, "0123456789abcdef0123456789abcdef01234567");
        let el = Element::from(p);
        let p = Presence::try_from(el).unwrap();
        assert_eq!(
            read_muc_presence(&p).unwrap().photo.as_deref(),
            Some("0123456789abcdef0123456789abcdef01234567")
        );
    }

    #[test]
    fn vcard_requests_go_to_the_occupant() {
        let bot = FullJid::new("bridge@matrix.localhost/trestle").unwrap();
        let to = occupant(&room(), "Bob").unwrap();
        let x = xml(vcard_get(&bot, &to, "v1"));
        assert!(x.contains("to='test@conference.localhost/Bob'"), "{x}");
        assert!(x.contains("type='get'"), "{x}");
        assert!(x.contains("<vCard xmlns='vcard-temp'/>"), "{x}");
    }

    #[test]
    fn reads_show_status_affiliation_role_and_kicks() {
        let el: Element = "<presence xmlns='jabber:component:accept' from='test@conference.localhost/Bob' to='bridge@matrix.localhost/trestle'>\
            <show>dnd</show><status> busy </status>\
            <x xmlns='http://jabber.org/protocol/muc#user'><item affiliation='admin' role='moderator'/></x></presence>"
            .parse()
            .unwrap();
        let p = read_muc_presence(&Presence::try_from(el).unwrap()).unwrap();
        assert_eq!(p.show.as_deref(), Some("dnd"));
        assert_eq!(p.status.as_deref(), Some("busy"));
        assert_eq!(
            (p.affiliation.as_deref(), p.role.as_deref()),
            (Some("admin"), Some("moderator"))
        );
        let el: Element = "<presence xmlns='jabber:component:accept' type='unavailable' from='test@conference.localhost/Bob' to='bridge@matrix.localhost/trestle'>\
            <x xmlns='http://jabber.org/protocol/muc#user'><item affiliation='none' role='none'>\
            <actor nick='Alice'/><reason>spam &amp; more</reason></item><status code='307'/></x></presence>"
            .parse()
            .unwrap();
        let p = read_muc_presence(&Presence::try_from(el).unwrap()).unwrap();
        assert!(p.unavailable && p.codes.contains(&307));
        assert_eq!(p.reason.as_deref(), Some("spam & more"));
        assert_eq!(p.actor.as_deref(), Some("Alice"));
        let from = FullJid::new("a@matrix.localhost/trestle").unwrap();
        let to = occupant(&room(), "alice").unwrap();
        let s = xml(occupant_presence(&from, &to, Some(Show::Away), Some("lunch <1>")));
        assert!(s.contains(">away</show>") && s.contains("lunch &lt;1&gt;"), "{s}");
    }

    #[test]
    fn muc_admin_items_escape_the_reason() {
        let from = FullJid::new("a@matrix.localhost/trestle").unwrap();
        let iq = muc_admin(&from, &room(), "k1", ("nick", "Bob"), ("role", "none"), Some("<spam>"))
            .unwrap();
        let s = xml(iq);
        assert!(
            s.contains(NS_MUC_ADMIN) && s.contains("role=\"none\"") || s.contains("role='none'"),
            "{s}"
        );
        assert!(s.contains("&lt;spam&gt;") && s.contains("Bob"), "{s}");
    }

    #[test]
    fn join_asks_for_no_history() {
        let from = FullJid::new("a@matrix.localhost/trestle").unwrap();
        let to = occupant(&room(), "Alice").unwrap();
        let s = xml(join(&from, &to));
        assert!(s.contains("maxstanzas=\"0\"") || s.contains("maxstanzas='0'"), "{s}");
    }

    #[test]
    fn replies_are_built_and_read_with_their_fallback_removed() {
        let from = FullJid::new("a@matrix.localhost/trestle").unwrap();
        let mut m = groupchat(&from, &room(), "ev2", "me too ✓", None).unwrap();
        let fb = reply_fallback("Bøb", Some("\nfirst ✓ line\nsecond"));
        assert_eq!(fb, "> Bøb: first ✓ line\n");
        add_reply(&mut m, Some("test@conference.localhost/Bøb"), "s1", &fb);
        assert_eq!(m.get_best_body(vec![]).unwrap().1, "> Bøb: first ✓ line\nme too ✓");
        let s = xml(m.clone());
        assert!(s.contains(NS_REPLY) && s.contains(NS_FALLBACK), "{s}");
        // As the room reflects it.
        let mut back = Message::try_from(Element::from(m)).unwrap();
        back.from = Some(Jid::new("test@conference.localhost/alice").unwrap());
        let r = read_muc_message(&back, &room()).unwrap();
        assert_eq!(r.body.as_deref(), Some("me too ✓"));
        assert_eq!(
            r.reply_to,
            Some(("s1".to_owned(), Some("test@conference.localhost/Bøb".to_owned())))
        );
        assert_eq!(strip_range("héllo", 1, 3), "hlo");
    }

    #[test]
    fn reactions_are_built_and_read_as_a_set() {
        let from = FullJid::new("a@matrix.localhost/trestle").unwrap();
        let keys = vec!["👍".to_owned(), "🎉".to_owned()];
        let mut m = reactions(&from, &room(), "ev3", "s1", &keys).unwrap();
        assert!(m.bodies.is_empty());
        m.from = Some(Jid::new("test@conference.localhost/alice").unwrap());
        m.payloads.push(
            Element::builder("reactions", NS_REACTIONS)
                .attr(xml_ncname!("id").into(), "ignored-second")
                .build(),
        );
        let r = read_muc_message(&m, &room()).unwrap();
        // The last <reactions/> wins; an empty set is a valid "none".
        assert_eq!(r.reactions, Some(("ignored-second".to_owned(), Vec::new())));
        m.payloads.pop();
        let r = read_muc_message(&m, &room()).unwrap();
        assert_eq!(r.reactions, Some(("s1".to_owned(), keys)));
    }

    #[test]
    fn chat_states_are_built_and_read() {
        let from = FullJid::new("a@matrix.localhost/trestle").unwrap();
        let mut m = chat_state(&from, &room(), "composing").unwrap();
        assert!(m.bodies.is_empty());
        assert!(xml(m.clone()).contains(NS_CHATSTATES));
        m.from = Some(Jid::new("test@conference.localhost/alice").unwrap());
        let r = read_muc_message(&m, &room()).unwrap();
        assert_eq!(r.chat_state.as_deref(), Some("composing"));
    }

    #[test]
    fn oob_files_are_built_and_read() {
        let from = FullJid::new("a@matrix.localhost/trestle").unwrap();
        let url = "https://b.example/media/x/y/1/s/cat%20<1>.png";
        let mut m = groupchat(&from, &room(), "ev4", url, None).unwrap();
        add_oob(&mut m, url, Some("cat <1>.png"));
        let s = xml(m.clone());
        assert!(s.contains(NS_OOB) && s.contains("cat &lt;1&gt;.png"), "{s}");
        m.from = Some(Jid::new("test@conference.localhost/alice").unwrap());
        let r = read_muc_message(&m, &room()).unwrap();
        assert_eq!(r.oob_url.as_deref(), Some(url));
        assert_eq!(r.body.as_deref(), Some(url));
    }

    #[test]
    fn markers_are_built_and_read() {
        let from = FullJid::new("a@matrix.localhost/trestle").unwrap();
        let mut m = displayed(&from, &room(), "s1").unwrap();
        assert!(m.bodies.is_empty());
        m.from = Some(Jid::new("test@conference.localhost/alice").unwrap());
        let r = read_muc_message(&m, &room()).unwrap();
        assert_eq!(r.displayed.as_deref(), Some("s1"));
        assert!(!r.markable);
        let mut m = groupchat(&from, &room(), "ev5", "read me", None).unwrap();
        add_markable(&mut m);
        m.from = Some(Jid::new("test@conference.localhost/alice").unwrap());
        assert!(read_muc_message(&m, &room()).unwrap().markable);
    }

    #[test]
    fn retraction_carries_fallback() {
        let from = FullJid::new("a@matrix.localhost/trestle").unwrap();
        let s = xml(retraction(&from, &room(), "r1", "s1").unwrap());
        assert!(s.contains(NS_RETRACT) && s.contains("s1") && s.contains(NS_FALLBACK), "{s}");
    }

    #[test]
    fn moderation_requests_and_announcements() {
        let from = FullJid::new("bob@matrix.localhost/trestle").unwrap();
        let iq = moderation(&from, &room(), "m1", "sid-9", Some("spam <b>")).unwrap();
        let s = xml(iq);
        for part in [NS_FASTEN, NS_MODERATE_0, NS_RETRACT_0, "id='sid-9'", "spam &lt;b&gt;"] {
            assert!(s.contains(part), "{part} missing in {s}");
        }
        let parse = |x: &str| {
            let e: Element = x.parse().unwrap();
            read_moderation(&Message::try_from(e).unwrap())
        };
        // Version 0.2, as Prosody's mod_muc_moderation announces it.
        let v0 = parse(
            "<message xmlns='jabber:component:accept' from='test@conference.localhost' type='groupchat'>\
             <apply-to xmlns='urn:xmpp:fasten:0' id='s1'><moderated xmlns='urn:xmpp:message-moderate:0' \
             by='test@conference.localhost/mod'><retract xmlns='urn:xmpp:message-retract:0'/>\
             <reason>spam</reason></moderated></apply-to></message>",
        );
        assert_eq!(
            v0,
            Some(Moderated {
                stanza_id: "s1".into(),
                by: Some("test@conference.localhost/mod".into()),
                reason: Some("spam".into()),
            })
        );
        // Version 0.3 and later.
        let v1 = parse(
            "<message xmlns='jabber:component:accept' from='test@conference.localhost' type='groupchat'>\
             <retract xmlns='urn:xmpp:message-retract:1' id='s2'><moderated \
             xmlns='urn:xmpp:message-moderate:1' by='test@conference.localhost/mod'/></retract></message>",
        );
        assert_eq!(v1.map(|m| (m.stanza_id, m.reason)), Some(("s2".into(), None)));
        // A plain retraction by its sender is not a moderation; a moderation without
        // retraction is ignored.
        let plain = "<message xmlns='jabber:component:accept' type='groupchat'>\
             <retract xmlns='urn:xmpp:message-retract:1' id='s3'/></message>";
        assert_eq!(parse(plain), None);
        let no_retract = "<message xmlns='jabber:component:accept' type='groupchat'><apply-to \
             xmlns='urn:xmpp:fasten:0' id='s4'><moderated xmlns='urn:xmpp:message-moderate:0'/>\
             </apply-to></message>";
        assert_eq!(parse(no_retract), None);
    }
}
