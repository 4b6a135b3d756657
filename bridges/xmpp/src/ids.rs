//! Identifiers: Matrix users as JIDs, XMPP occupants as Matrix users, portal aliases, nicks.
//!
//! Every mapping is reversible and produces only valid identifiers: Matrix localparts via the
//! framework's escaping (`_x` for uppercase, `=xx` for other bytes), JID localparts via the same
//! escaping with `/` also hex-escaped, so the result never holds a character nodeprep forbids.

use trestle::util::{
    escape::{escape_localpart, unescape_localpart},
    template::Template,
};
use xmpp_parsers::jid::BareJid;

/// Splits `s` around the single placeholder `var` of `tpl` rendered with `fixed`: returns the
/// part of `s` standing for `var`.
fn extract_one(tpl: &Template, var: &str, fixed: &[(&str, &str)], s: &str) -> Option<String> {
    const MARK: &str = "\u{1}";
    let mut vars: Vec<(&str, &str)> = fixed.to_vec();
    vars.push((var, MARK));
    let rendered = tpl.render(&vars).ok()?;
    let (prefix, suffix) = rendered.split_once(MARK)?;
    let value = s.strip_prefix(prefix)?.strip_suffix(suffix)?;
    (!value.is_empty()).then(|| value.to_owned())
}

/// The JID localpart of a Matrix user's puppet: `@Alice:hs` → `_alice=3ahs`.
pub fn puppet_localpart(mxid: &str) -> String {
    escape_localpart(mxid.strip_prefix('@').unwrap_or(mxid)).replace('/', "=2f")
}

/// Reverses [`puppet_localpart`].
pub fn mxid_of_puppet(localpart: &str) -> Option<String> {
    let s = unescape_localpart(localpart).ok()?;
    s.contains(':').then(|| format!("@{s}"))
}

/// A MUC room: `room@service`, with a lowercase localpart.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RoomJid {
    /// The room's localpart.
    pub room: String,
    /// The MUC service.
    pub service: String,
}

impl RoomJid {
    /// A room JID if `room` is a valid localpart.
    pub fn new(room: &str, service: &str) -> Option<Self> {
        if room.is_empty() || room.len() > 256 {
            return None;
        }
        let jid = BareJid::new(&format!("{room}@{service}")).ok()?;
        let node = jid.node()?.as_str().to_owned();
        // Only already-normalised names: the alias must map to exactly one room.
        (node == room && jid.domain().as_str() == service)
            .then(|| Self { room: node, service: service.to_owned() })
    }

    /// Parses `room@service`.
    pub fn parse(s: &str) -> Option<Self> {
        let (room, service) = s.split_once('@')?;
        Self::new(room, service)
    }

    /// `room@service`.
    pub fn bare(&self) -> String {
        format!("{}@{}", self.room, self.service)
    }

    /// The portal's remote id.
    pub fn remote_id(&self) -> String {
        self.bare()
    }
}

/// What identifies an occupant's ghost in its room.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum OccupantKey {
    /// Its nick (rooms without XEP-0421).
    Nick(String),
    /// Its XEP-0421 occupant-id, stable across nick changes.
    Id(String),
}

/// Templates of the bridge's identifiers.
#[derive(Debug, Clone)]
pub struct Ids {
    alias: Template,
    user: Template,
    services: Vec<String>,
    domain: String,
}

impl Ids {
    /// From the configured templates (validated by the config).
    pub fn new(
        alias: &str,
        user: &str,
        services: &[String],
        domain: &str,
    ) -> Result<Self, trestle::util::template::TemplateError> {
        Ok(Self {
            alias: Template::parse(alias, &["room", "service"])?,
            user: Template::parse(user, &["occupant"])?,
            services: services.to_vec(),
            domain: domain.to_owned(),
        })
    }

    /// The room an alias (`#…:domain`) stands for, if it is one of ours on an allowed service.
    pub fn room_of_alias(&self, alias: &str) -> Option<RoomJid> {
        let local = alias.strip_prefix('#')?.strip_suffix(&format!(":{}", self.domain))?;
        self.services.iter().find_map(|s| {
            let room = extract_one(&self.alias, "room", &[("service", s)], local)?;
            RoomJid::new(&room, s)
        })
    }

    /// The alias of a room.
    pub fn alias_of(&self, room: &RoomJid) -> String {
        let lp = self
            .alias
            .render(&[("room", &room.room), ("service", &room.service)])
            .unwrap_or_default();
        format!("#{lp}:{}", self.domain)
    }

    /// The ghost of occupant `nick` in `room`.
    pub fn ghost_of(&self, room: &RoomJid, nick: &str) -> String {
        let occupant = escape_localpart(&format!("{}/{nick}", room.bare()));
        let lp = self.user.render(&[("occupant", &occupant)]).unwrap_or_default();
        format!("@{lp}:{}", self.domain)
    }

    /// The room and nick a nick-keyed ghost stands for (`None` for an occupant-id ghost: see
    /// [`Self::occupant_key_of_ghost`]).
    pub fn occupant_of_ghost(&self, user_id: &str) -> Option<(RoomJid, String)> {
        match self.occupant_key_of_ghost(user_id)? {
            (room, OccupantKey::Nick(nick)) => Some((room, nick)),
            (_, OccupantKey::Id(_)) => None,
        }
    }

    /// The ghost of the occupant with XEP-0421 occupant-id `id` in `room`: the `{occupant}`
    /// value is `room:id@service` escaped. A JID localpart cannot hold `:`, so this never
    /// collides with a nick-keyed ghost (`room@service/nick`), whose first `:` or `@` is always
    /// the `@`.
    pub fn ghost_of_occupant_id(&self, room: &RoomJid, id: &str) -> String {
        let occupant = escape_localpart(&format!("{}:{id}@{}", room.room, room.service));
        let lp = self.user.render(&[("occupant", &occupant)]).unwrap_or_default();
        format!("@{lp}:{}", self.domain)
    }

    /// The room and occupant a ghost stands for: its nick, or its occupant-id.
    pub fn occupant_key_of_ghost(&self, user_id: &str) -> Option<(RoomJid, OccupantKey)> {
        let local = user_id.strip_prefix('@')?.strip_suffix(&format!(":{}", self.domain))?;
        let escaped = extract_one(&self.user, "occupant", &[], local)?;
        let occupant = unescape_localpart(&escaped).ok()?;
        let first = occupant.find([':', '@'])?;
        let (room, key) = if occupant[first..].starts_with(':') {
            // `room:id@service`: the service (a domain) holds no `@`, the room no `:`.
            let (head, service) = occupant.rsplit_once('@')?;
            let (room, id) = head.split_once(':')?;
            (RoomJid::new(room, service)?, OccupantKey::Id(id.to_owned()))
        } else {
            let (bare, nick) = occupant.split_once('/')?;
            (RoomJid::parse(bare)?, OccupantKey::Nick(nick.to_owned()))
        };
        let (OccupantKey::Nick(k) | OccupantKey::Id(k)) = &key;
        (!k.is_empty() && self.services.contains(&room.service)).then_some((room, key))
    }

    /// The ghost of an XMPP user (a bare JID) in a private chat.
    pub fn ghost_of_jid(&self, jid: &BareJid) -> String {
        let lp = self
            .user
            .render(&[("occupant", &escape_localpart(&jid.to_string()))])
            .unwrap_or_default();
        format!("@{lp}:{}", self.domain)
    }

    /// The bare JID a private-chat ghost stands for (`user@domain`, not on a MUC service).
    pub fn jid_of_ghost(&self, user_id: &str) -> Option<BareJid> {
        let local = user_id.strip_prefix('@')?.strip_suffix(&format!(":{}", self.domain))?;
        let escaped = extract_one(&self.user, "occupant", &[], local)?;
        let jid = unescape_localpart(&escaped).ok()?;
        if jid.contains('/') {
            return None;
        }
        let bare = BareJid::new(&jid).ok()?;
        (bare.node().is_some()
            && bare.to_string() == jid
            && !self.services.iter().any(|s| s == bare.domain().as_str()))
        .then_some(bare)
    }

    /// The registration regex of the alias namespace for one service.
    pub fn alias_regex(&self, service: &str) -> String {
        let body = self.alias.to_regex(&[("service", service)]);
        let body = body.trim_start_matches('^').trim_end_matches('$');
        format!("^#{body}:{}$", regex::escape(&self.domain))
    }

    /// The registration regex of the ghost namespace.
    pub fn user_regex(&self) -> String {
        let body = self.user.to_regex(&[]);
        let body = body.trim_start_matches('^').trim_end_matches('$');
        format!("^@{body}:{}$", regex::escape(&self.domain))
    }
}

/// A MUC nick from a Matrix displayname: control, format (bidi) and private-use characters
/// removed, whitespace collapsed, cut to `max` characters; `fallback` when nothing is left.
pub fn sanitise_nick(displayname: &str, fallback: &str, max: usize) -> String {
    let cleaned: String = displayname
        .chars()
        .map(|c| if c.is_whitespace() { ' ' } else { c })
        .filter(|c| !c.is_control() && !is_format_or_private(*c))
        .collect();
    let collapsed = cleaned.split(' ').filter(|w| !w.is_empty()).collect::<Vec<_>>().join(" ");
    let cut: String = collapsed.chars().take(max).collect();
    let cut = cut.trim().to_owned();
    if cut.is_empty() { fallback.chars().take(max).collect() } else { cut }
}

fn is_format_or_private(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{206F}'
        | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFB}' | '\u{E000}'..='\u{F8FF}'
        | '\u{F0000}'..='\u{10FFFF}')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> Ids {
        Ids::new(
            "xmpp_{room}_{service}",
            "xmpp_{occupant}",
            &["conference.localhost".to_owned()],
            "localhost",
        )
        .unwrap()
    }

    #[test]
    fn private_chat_ghosts_are_reversible_and_never_rooms() {
        let ids = ids();
        let jid = BareJid::new("XAlice@Example.org").unwrap();
        let ghost = ids.ghost_of_jid(&jid);
        assert_eq!(ids.jid_of_ghost(&ghost), Some(jid));
        assert_eq!(ids.occupant_of_ghost(&ghost), None);
        let room = RoomJid::new("test", "conference.localhost").unwrap();
        let occupant = ids.ghost_of(&room, "Bob");
        assert_eq!(ids.jid_of_ghost(&occupant), None);
        // A room on a MUC service is not a private-chat partner.
        let muc = ids.ghost_of_jid(&BareJid::new("test@conference.localhost").unwrap());
        assert_eq!(ids.jid_of_ghost(&muc), None);
    }

    #[test]
    fn aliases_round_trip_even_with_separators_in_the_room() {
        let ids = ids();
        let r = ids.room_of_alias("#xmpp_test_conference.localhost:localhost").unwrap();
        assert_eq!(r.bare(), "test@conference.localhost");
        let r2 = ids.room_of_alias("#xmpp_my_room_conference.localhost:localhost").unwrap();
        assert_eq!(r2.room, "my_room");
        assert_eq!(ids.alias_of(&r2), "#xmpp_my_room_conference.localhost:localhost");
        // Other services, other domains, invalid or non-normalised rooms are refused.
        assert!(ids.room_of_alias("#xmpp_test_conference.evil:localhost").is_none());
        assert!(ids.room_of_alias("#xmpp_test_conference.localhost:other").is_none());
        assert!(ids.room_of_alias("#xmpp_a&b_conference.localhost:localhost").is_none());
        assert!(ids.room_of_alias("#xmpp_Test_conference.localhost:localhost").is_none());
        assert!(ids.room_of_alias("#xmpp__conference.localhost:localhost").is_none());
        let re = regex::Regex::new(&ids.alias_regex("conference.localhost")).unwrap();
        assert!(re.is_match("#xmpp_test_conference.localhost:localhost"));
        assert!(!re.is_match("#xmpp_test_conferenceXlocalhost:localhost"));
    }

    #[test]
    fn ghosts_are_valid_and_reversible() {
        let ids = ids();
        let room = RoomJid::new("test", "conference.localhost").unwrap();
        for nick in ["alice", "Alice Smith", "ünï/cødé 🎉", "a:b@c", "=3d_x"] {
            let g = ids.ghost_of(&room, nick);
            assert!(trestle::util::escape::is_valid_user_id(&g), "{g}");
            assert_eq!(ids.occupant_of_ghost(&g), Some((room.clone(), nick.to_owned())), "{g}");
            assert!(regex::Regex::new(&ids.user_regex()).unwrap().is_match(&g));
        }
        assert_eq!(
            ids.ghost_of(&room, "alice"),
            "@xmpp_test=40conference.localhost/alice:localhost"
        );
        assert!(ids.occupant_of_ghost("@xmpp_garbage:localhost").is_none());
        assert!(ids.occupant_of_ghost("@someone:localhost").is_none());
    }

    #[test]
    fn occupant_id_ghosts_are_valid_reversible_and_never_nick_ghosts() {
        let ids = ids();
        let room = RoomJid::new("test", "conference.localhost").unwrap();
        let re = regex::Regex::new(&ids.user_regex()).unwrap();
        for id in ["dGhpcyBpZA==", "a/b+c=", "Ab:c@d/e", "ünï 🎉", "x"] {
            let g = ids.ghost_of_occupant_id(&room, id);
            assert!(trestle::util::escape::is_valid_user_id(&g), "{g}");
            assert_eq!(g, g.to_lowercase(), "{g}");
            assert!(re.is_match(&g), "{g}");
            assert_eq!(
                ids.occupant_key_of_ghost(&g),
                Some((room.clone(), OccupantKey::Id(id.to_owned()))),
                "{g}"
            );
            // Never read as a nick ghost nor as a private-chat partner.
            assert_eq!(ids.occupant_of_ghost(&g), None, "{g}");
            assert_eq!(ids.jid_of_ghost(&g), None, "{g}");
            // No nick makes the same ghost.
            assert_ne!(ids.ghost_of(&room, id), g);
        }
        assert_eq!(
            ids.ghost_of_occupant_id(&room, "Ab1"),
            "@xmpp_test=3a_ab1=40conference.localhost:localhost"
        );
        // A nick that looks like the occupant-id form stays a nick.
        let tricky = ids.ghost_of(&room, "x:y@conference.localhost");
        assert_eq!(
            ids.occupant_key_of_ghost(&tricky),
            Some((room.clone(), OccupantKey::Nick("x:y@conference.localhost".to_owned())))
        );
        // Other services, empty ids, invalid rooms are refused.
        let other = RoomJid::new("test", "conference.evil").unwrap();
        assert_eq!(ids.occupant_key_of_ghost(&ids.ghost_of_occupant_id(&other, "a")), None);
        assert_eq!(ids.occupant_key_of_ghost(&ids.ghost_of_occupant_id(&room, "")), None);
        assert_eq!(
            ids.occupant_key_of_ghost("@xmpp_a&b=3ax=40conference.localhost:localhost"),
            None
        );
    }

    #[test]
    fn puppet_jids_are_valid_and_reversible() {
        for mxid in ["@alice:localhost", "@Bob/x:example.org", "@a=b_c:hs.tld:8448"] {
            let lp = puppet_localpart(mxid);
            let jid = BareJid::new(&format!("{lp}@matrix.localhost")).unwrap();
            assert_eq!(jid.node().unwrap().as_str(), lp, "nodeprep must not change it");
            assert!(!lp.contains(['/', ':', '@', '&', '\'', '"', '<', '>']));
            assert_eq!(mxid_of_puppet(&lp).as_deref(), Some(mxid));
        }
        assert_eq!(puppet_localpart("@alice:localhost"), "alice=3alocalhost");
        assert_eq!(mxid_of_puppet("bridge"), None);
    }

    #[test]
    fn nicks_are_sanitised() {
        assert_eq!(sanitise_nick("  Alice \n Smith ", "alice", 48), "Alice Smith");
        assert_eq!(sanitise_nick("\u{202E}evil\u{200B}", "x", 48), "evil");
        assert_eq!(sanitise_nick("\u{7}\u{0}", "alice", 48), "alice");
        assert_eq!(sanitise_nick("🎉 party", "x", 48), "🎉 party");
        assert_eq!(sanitise_nick("abcdefgh", "x", 3), "abc");
    }
}
