//! Building and reading the stanzas the bridge deals with. Everything is built with
//! xmpp-parsers/minidom (never by string concatenation), and text from Matrix is first cleared of
//! characters XML 1.0 cannot carry.

use xmpp_parsers::{
    disco::{DiscoInfoResult, Identity},
    jid::{FullJid, Jid},
    message::{Id, Lang, Message, MessageType},
    message_correct::Replace,
    minidom::{Element, rxml::xml_ncname},
    muc::{Muc, muc::History},
    ns,
    presence::{Presence, Type as PresenceType},
    stanza_error::{DefinedCondition, ErrorType, StanzaError},
    stanza_id::OriginId,
};

use crate::ids::RoomJid;

/// XEP-0424 message retraction.
pub const NS_RETRACT: &str = "urn:xmpp:message-retract:1";
/// XEP-0045 room owner.
pub const NS_MUC_OWNER: &str = "http://jabber.org/protocol/muc#owner";
/// XEP-0428 fallback indication.
pub const NS_FALLBACK: &str = "urn:xmpp:fallback:0";

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

/// Accepts the default configuration of a room the bot just created (XEP-0045 §10.1.2, an
/// "instant room"), which unlocks it for everyone else.
pub fn instant_room(from: &FullJid, room: &RoomJid, id: &str) -> Option<xmpp_parsers::iq::Iq> {
    let form =
        Element::builder("x", ns::DATA_FORMS).attr(xml_ncname!("type").into(), "submit").build();
    let query = Element::builder("query", NS_MUC_OWNER).append(form).build();
    Some(xmpp_parsers::iq::Iq::Set {
        from: Some(from.clone().into()),
        to: Some(Jid::new(&room.bare()).ok()?),
        id: id.to_owned(),
        payload: query,
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
    /// XEP-0308: the id of the corrected message.
    pub replaces: Option<String>,
    /// XEP-0424: the id of the retracted message.
    pub retracts: Option<String>,
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
        } else if p.is("replace", ns::MESSAGE_CORRECT) {
            out.replaces = p.attr("id").map(str::to_owned);
        } else if p.is("retract", NS_RETRACT) {
            out.retracts = p.attr("id").map(str::to_owned);
        }
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
            }
        }
    }
    Some(out)
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

/// The disco#info of a Matrix user's puppet or the bot: a client.
pub fn disco_info_user() -> DiscoInfoResult {
    DiscoInfoResult {
        node: None,
        identities: vec![Identity::new_anonymous::<_, _, String, String>("client", "bot")],
        features: [ns::DISCO_INFO, ns::PING, ns::VERSION].iter().map(|f| (*f).to_owned()).collect(),
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

    fn room() -> RoomJid {
        RoomJid::new("test", "conference.localhost").unwrap()
    }

    fn xml(m: impl Into<Element>) -> String {
        String::from(&m.into())
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
    fn join_asks_for_no_history() {
        let from = FullJid::new("a@matrix.localhost/trestle").unwrap();
        let to = occupant(&room(), "Alice").unwrap();
        let s = xml(join(&from, &to));
        assert!(s.contains("maxstanzas=\"0\"") || s.contains("maxstanzas='0'"), "{s}");
    }

    #[test]
    fn retraction_carries_fallback() {
        let from = FullJid::new("a@matrix.localhost/trestle").unwrap();
        let s = xml(retraction(&from, &room(), "r1", "s1").unwrap());
        assert!(s.contains(NS_RETRACT) && s.contains("s1") && s.contains(NS_FALLBACK), "{s}");
    }
}
