//! Matrix events as a bridge receives them: parsed, classified, reply fallbacks stripped.

use serde::Deserialize;
use serde_json::Value;

/// An event as the homeserver sent it (client format).
#[derive(Debug, Clone, Deserialize)]
pub struct MatrixEvent {
    /// The event id.
    pub event_id: String,
    /// The room.
    pub room_id: String,
    /// Who sent it.
    pub sender: String,
    /// The event type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Present on state events.
    #[serde(default)]
    pub state_key: Option<String>,
    /// The content.
    #[serde(default)]
    pub content: Value,
    /// Server timestamp (ms).
    #[serde(default)]
    pub origin_server_ts: u64,
    /// Unsigned data (`prev_content`, `invite_room_state`, …).
    #[serde(default)]
    pub unsigned: Value,
    /// Redacted event (room versions before 11 carry it at the top level).
    #[serde(default)]
    pub redacts: Option<String>,
}

/// The `msgtype` of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageType {
    /// `m.text`
    Text,
    /// `m.notice`
    Notice,
    /// `m.emote`
    Emote,
    /// `m.image`
    Image,
    /// `m.file`
    File,
    /// `m.audio`
    Audio,
    /// `m.video`
    Video,
    /// `m.location`
    Location,
    /// Anything else (the raw msgtype).
    Other(String),
}

impl MessageType {
    fn parse(s: &str) -> Self {
        match s {
            "m.text" => Self::Text,
            "m.notice" => Self::Notice,
            "m.emote" => Self::Emote,
            "m.image" => Self::Image,
            "m.file" => Self::File,
            "m.audio" => Self::Audio,
            "m.video" => Self::Video,
            "m.location" => Self::Location,
            other => Self::Other(other.to_owned()),
        }
    }

    /// Whether the message carries media (`url` is an mxc URI).
    pub fn is_media(&self) -> bool {
        matches!(self, Self::Image | Self::File | Self::Audio | Self::Video)
    }
}

/// Media attached to a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Media {
    /// The `mxc://` URI (unencrypted media only).
    pub url: String,
    /// File name, if given (else the body).
    pub filename: String,
    /// MIME type.
    pub mimetype: Option<String>,
    /// Size in bytes.
    pub size: Option<u64>,
}

/// A message (`m.room.message` or `m.sticker`), with reply fallbacks removed.
#[derive(Debug, Clone)]
pub struct Message {
    /// The msgtype.
    pub msgtype: MessageType,
    /// Plain body without the reply fallback.
    pub body: String,
    /// `org.matrix.custom.html` formatted body without `<mx-reply>`.
    pub html: Option<String>,
    /// The event this replies to.
    pub reply_to: Option<String>,
    /// Thread root, for messages in a thread.
    pub thread_root: Option<String>,
    /// Media, for image/file/audio/video/sticker.
    pub media: Option<Media>,
    /// Users mentioned (`m.mentions.user_ids`).
    pub mentions: Vec<String>,
}

impl Message {
    /// Parses message content (`None` if it has no string `body`).
    pub fn from_content(content: &Value) -> Option<Self> {
        let raw_body = content.get("body")?.as_str()?;
        let msgtype =
            MessageType::parse(content.get("msgtype").and_then(Value::as_str).unwrap_or("m.text"));
        let relates = content.get("m.relates_to");
        let reply_to = relates
            .and_then(|r| r.get("m.in_reply_to"))
            .and_then(|r| r.get("event_id"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let is_falling_back = relates
            .and_then(|r| r.get("is_falling_back"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let thread_root = relates
            .filter(|r| r.get("rel_type").and_then(Value::as_str) == Some("m.thread"))
            .and_then(|r| r.get("event_id"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let html = (content.get("format").and_then(Value::as_str)
            == Some("org.matrix.custom.html"))
        .then(|| content.get("formatted_body").and_then(Value::as_str))
        .flatten();
        let (body, html) = if reply_to.is_some() {
            (
                crate::util::reply::strip_reply_fallback(raw_body).to_owned(),
                html.map(crate::util::reply::strip_reply_fallback_html),
            )
        } else {
            (raw_body.to_owned(), html.map(str::to_owned))
        };
        // A thread message's in_reply_to with is_falling_back is not a real reply.
        let reply_to = if is_falling_back && thread_root.is_some() { None } else { reply_to };
        let media =
            content.get("url").and_then(Value::as_str).filter(|u| u.starts_with("mxc://")).map(
                |url| {
                    let info = content.get("info");
                    Media {
                        url: url.to_owned(),
                        filename: content
                            .get("filename")
                            .and_then(Value::as_str)
                            .unwrap_or(raw_body)
                            .to_owned(),
                        mimetype: info
                            .and_then(|i| i.get("mimetype"))
                            .and_then(Value::as_str)
                            .map(str::to_owned),
                        size: info.and_then(|i| i.get("size")).and_then(Value::as_u64),
                    }
                },
            );
        let mentions = content
            .get("m.mentions")
            .and_then(|m| m.get("user_ids"))
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
            .unwrap_or_default();
        Some(Self { msgtype, body, html, reply_to, thread_root, media, mentions })
    }
}

/// A classified room event.
#[derive(Debug, Clone)]
pub enum RoomEvent {
    /// A new message.
    Message(Message),
    /// An edit (`m.replace`) of `target`; `new` is `m.new_content`.
    Edit {
        /// The edited event.
        target: String,
        /// The new content.
        new: Message,
    },
    /// A reaction with `key` to `target`.
    Reaction {
        /// The event reacted to.
        target: String,
        /// The reaction key (usually an emoji).
        key: String,
    },
    /// A redaction of `target`.
    Redaction {
        /// The redacted event.
        target: String,
        /// The reason given.
        reason: Option<String>,
    },
    /// A membership change of `user_id`.
    Membership {
        /// Whose membership (the state key).
        user_id: String,
        /// The new membership.
        membership: String,
        /// The membership before, if known.
        prev_membership: Option<String>,
        /// The displayname in the member event.
        displayname: Option<String>,
        /// The reason (kicks, bans).
        reason: Option<String>,
        /// `is_direct` on invites.
        is_direct: bool,
    },
    /// The room name changed.
    Name(String),
    /// The topic changed.
    Topic(String),
    /// The avatar changed (`None`: removed).
    Avatar(Option<String>),
    /// The power levels changed.
    PowerLevels(Value),
    /// The room was upgraded to `replacement_room`.
    Tombstone {
        /// The new room.
        replacement_room: String,
    },
    /// An encrypted event (the framework cannot read it).
    Encrypted,
    /// Anything else.
    Other,
}

impl RoomEvent {
    /// Classifies an event.
    pub fn classify(ev: &MatrixEvent) -> Self {
        let c = &ev.content;
        let s = |k: &str| c.get(k).and_then(Value::as_str).map(str::to_owned);
        match (ev.event_type.as_str(), ev.state_key.is_some()) {
            ("m.room.message" | "m.sticker", false) => {
                let relates = c.get("m.relates_to");
                if relates.and_then(|r| r.get("rel_type")).and_then(Value::as_str)
                    == Some("m.replace")
                {
                    let target = relates.and_then(|r| r.get("event_id")).and_then(Value::as_str);
                    let new = c.get("m.new_content").and_then(Message::from_content);
                    if let (Some(target), Some(new)) = (target, new) {
                        return Self::Edit { target: target.to_owned(), new };
                    }
                    return Self::Other;
                }
                let mut content = c.clone();
                if ev.event_type == "m.sticker" {
                    content["msgtype"] = Value::from("m.image");
                }
                Message::from_content(&content).map_or(Self::Other, Self::Message)
            }
            ("m.reaction", false) => {
                let r = c.get("m.relates_to");
                match (
                    r.and_then(|r| r.get("event_id")).and_then(Value::as_str),
                    r.and_then(|r| r.get("key")).and_then(Value::as_str),
                ) {
                    (Some(t), Some(k)) => {
                        Self::Reaction { target: t.to_owned(), key: k.to_owned() }
                    }
                    _ => Self::Other,
                }
            }
            ("m.room.redaction", false) => match ev.redacts.clone().or_else(|| s("redacts")) {
                Some(target) => Self::Redaction { target, reason: s("reason") },
                None => Self::Other,
            },
            ("m.room.member", true) => Self::Membership {
                user_id: ev.state_key.clone().unwrap_or_default(),
                membership: s("membership").unwrap_or_default(),
                prev_membership: ev
                    .unsigned
                    .get("prev_content")
                    .and_then(|p| p.get("membership"))
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                displayname: s("displayname"),
                reason: s("reason"),
                is_direct: c.get("is_direct").and_then(Value::as_bool).unwrap_or(false),
            },
            ("m.room.name", true) => Self::Name(s("name").unwrap_or_default()),
            ("m.room.topic", true) => Self::Topic(s("topic").unwrap_or_default()),
            ("m.room.avatar", true) => Self::Avatar(s("url")),
            ("m.room.power_levels", true) => Self::PowerLevels(c.clone()),
            ("m.room.tombstone", true) => match s("replacement_room") {
                Some(r) => Self::Tombstone { replacement_room: r },
                None => Self::Other,
            },
            ("m.room.encrypted", false) => Self::Encrypted,
            _ => Self::Other,
        }
    }
}

/// An ephemeral event (MSC2409).
#[derive(Debug, Clone, PartialEq)]
pub enum EphemeralEvent {
    /// Who is typing in a room now.
    Typing {
        /// The room.
        room_id: String,
        /// Everyone typing.
        user_ids: Vec<String>,
    },
    /// A read receipt.
    Receipt {
        /// The room.
        room_id: String,
        /// The event read up to.
        event_id: String,
        /// The reader.
        user_id: String,
        /// When (ms).
        ts: Option<u64>,
    },
    /// A presence update.
    Presence {
        /// Whose.
        user_id: String,
        /// `online`, `unavailable` or `offline`.
        presence: String,
        /// The status message.
        status_msg: Option<String>,
    },
}

impl EphemeralEvent {
    /// Parses an ephemeral event into zero or more updates (a receipt event may hold many).
    pub fn parse(raw: &Value) -> Vec<Self> {
        let ty = raw.get("type").and_then(Value::as_str).unwrap_or_default();
        let room_id = raw.get("room_id").and_then(Value::as_str).map(str::to_owned);
        let content = raw.get("content").cloned().unwrap_or(Value::Null);
        match (ty, room_id) {
            ("m.typing", Some(room_id)) => vec![Self::Typing {
                room_id,
                user_ids: content
                    .get("user_ids")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
                    .unwrap_or_default(),
            }],
            ("m.receipt", Some(room_id)) => {
                let mut out = Vec::new();
                if let Some(events) = content.as_object() {
                    for (event_id, kinds) in events {
                        for kind in ["m.read", "m.read.private"] {
                            if let Some(users) = kinds.get(kind).and_then(Value::as_object) {
                                for (user_id, data) in users {
                                    out.push(Self::Receipt {
                                        room_id: room_id.clone(),
                                        event_id: event_id.clone(),
                                        user_id: user_id.clone(),
                                        ts: data.get("ts").and_then(Value::as_u64),
                                    });
                                }
                            }
                        }
                    }
                }
                out
            }
            ("m.presence", _) => match raw.get("sender").and_then(Value::as_str) {
                Some(user_id) => vec![Self::Presence {
                    user_id: user_id.to_owned(),
                    presence: content
                        .get("presence")
                        .and_then(Value::as_str)
                        .unwrap_or("offline")
                        .to_owned(),
                    status_msg: content
                        .get("status_msg")
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                }],
                None => vec![],
            },
            _ => vec![],
        }
    }

    /// The user this update is about.
    pub fn user_ids(&self) -> Vec<&str> {
        match self {
            Self::Typing { user_ids, .. } => user_ids.iter().map(String::as_str).collect(),
            Self::Receipt { user_id, .. } | Self::Presence { user_id, .. } => vec![user_id],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(ty: &str, state_key: Option<&str>, content: &Value) -> MatrixEvent {
        serde_json::from_value(json!({"event_id": "$e", "room_id": "!r:x", "sender": "@u:x",
            "type": ty, "state_key": state_key, "content": content, "origin_server_ts": 1}))
        .unwrap()
    }

    #[test]
    fn classify_messages_edits_replies_reactions_redactions() {
        let reply = ev(
            "m.room.message",
            None,
            &json!({"msgtype": "m.text",
            "body": "> <@a:x> quoted\n> more\n\nmy answer",
            "format": "org.matrix.custom.html",
            "formatted_body": "<mx-reply><blockquote>q</blockquote></mx-reply>my <b>answer</b>",
            "m.relates_to": {"m.in_reply_to": {"event_id": "$orig"}}}),
        );
        let RoomEvent::Message(m) = RoomEvent::classify(&reply) else { panic!() };
        assert_eq!(m.body, "my answer");
        assert_eq!(m.html.as_deref(), Some("my <b>answer</b>"));
        assert_eq!(m.reply_to.as_deref(), Some("$orig"));

        let edit = ev(
            "m.room.message",
            None,
            &json!({"msgtype": "m.text", "body": "* fixed",
            "m.new_content": {"msgtype": "m.text", "body": "fixed"},
            "m.relates_to": {"rel_type": "m.replace", "event_id": "$old"}}),
        );
        let RoomEvent::Edit { target, new } = RoomEvent::classify(&edit) else { panic!() };
        assert_eq!((target.as_str(), new.body.as_str()), ("$old", "fixed"));

        let img = ev(
            "m.room.message",
            None,
            &json!({"msgtype": "m.image", "body": "cat.png",
            "url": "mxc://x/abc", "info": {"mimetype": "image/png", "size": 12}}),
        );
        let RoomEvent::Message(m) = RoomEvent::classify(&img) else { panic!() };
        assert_eq!(
            m.media.unwrap(),
            Media {
                url: "mxc://x/abc".into(),
                filename: "cat.png".into(),
                mimetype: Some("image/png".into()),
                size: Some(12)
            }
        );

        let r = ev(
            "m.reaction",
            None,
            &json!({"m.relates_to": {"rel_type": "m.annotation", "event_id": "$t", "key": "👍"}}),
        );
        assert!(
            matches!(RoomEvent::classify(&r), RoomEvent::Reaction { ref key, .. } if key == "👍")
        );
        let red = ev("m.room.redaction", None, &json!({"redacts": "$t", "reason": "spam"}));
        assert!(
            matches!(RoomEvent::classify(&red), RoomEvent::Redaction { ref target, .. } if target == "$t")
        );
        let topic = ev("m.room.topic", Some(""), &json!({"topic": "hi"}));
        assert!(matches!(RoomEvent::classify(&topic), RoomEvent::Topic(ref t) if t == "hi"));
        // A message-typed state event or a body-less message is not a message.
        assert!(matches!(
            RoomEvent::classify(&ev("m.room.message", None, &json!({"body": 5}))),
            RoomEvent::Other
        ));
    }

    #[test]
    fn ephemeral_parsing() {
        let r = EphemeralEvent::parse(&json!({"type": "m.receipt", "room_id": "!r",
            "content": {"$e": {"m.read": {"@a:x": {"ts": 5}, "@b:x": {}}}}}));
        assert_eq!(r.len(), 2);
        let t = EphemeralEvent::parse(
            &json!({"type": "m.typing", "room_id": "!r", "content": {"user_ids": ["@a:x"]}}),
        );
        assert_eq!(
            t,
            vec![EphemeralEvent::Typing { room_id: "!r".into(), user_ids: vec!["@a:x".into()] }]
        );
        let p = EphemeralEvent::parse(
            &json!({"type": "m.presence", "sender": "@a:x", "content": {"presence": "online"}}),
        );
        assert_eq!(p[0].user_ids(), ["@a:x"]);
        assert!(EphemeralEvent::parse(&json!({"type": "m.typing"})).is_empty());
    }
}
