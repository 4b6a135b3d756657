//! IRCv3 message tags: message ids mapped to Matrix events, replies and reactions.
//!
//! Where the server grants `message-tags`, every message it relays carries a `msgid`:
//!
//! - an IRC message bridged to Matrix is recorded in the room's message map (msgid → event);
//! - a Matrix message bridged to IRC learns its msgid from the server's echo (`echo-message`,
//!   [`ConnEvent::Echo`](crate::conn::ConnEvent::Echo)) and is recorded the same way;
//! - a Matrix reply to a mapped message is sent with `+draft/reply=<msgid>`, and an IRC message
//!   with `+draft/reply` (or the ratified `+reply`) to a mapped msgid becomes a Matrix reply;
//! - a Matrix reaction to a mapped message is a `TAGMSG` with `+draft/react` and
//!   `+draft/reply`, and such a `TAGMSG` from IRC is a reaction of the sender's ghost;
//! - where the server offers message redaction (`draft/message-redaction`, a draft), a Matrix
//!   redaction of a mapped event is a `REDACT` of each of its msgids, and an IRC `REDACT` of a
//!   mapped msgid redacts its events.
//!
//! Mappings are scoped per room, so a msgid from one channel never resolves in another.

use serde_json::{Value, json};
use trestle::{bridge::BridgeError, event::MatrixEvent, store::MessageMapping};

use super::{Inner, Network, Target};
use crate::conn::{EchoRef, IrcLine, REDACTION_CAP, line::one_line};

/// The reply tag we send: what deployed clients and servers implement (the specification's
/// draft name; `+reply` is accepted as well).
pub(super) const REPLY_TAG: &str = "+draft/reply";
/// Reply tags we accept.
const REPLY_TAGS: [&str; 2] = ["+draft/reply", "+reply"];
/// The reaction tag (still a draft).
pub(super) const REACT_TAG: &str = "+draft/react";

/// The msgid an IRC line replies to, if it carries a reply tag.
fn reply_msgid(line: &IrcLine) -> Option<&str> {
    REPLY_TAGS.iter().find_map(|t| line.tag(t)).filter(|v| !v.is_empty())
}

impl Network {
    /// Whether the network's server relays client tags (`message-tags`).
    pub(super) fn has_tags(&self) -> bool {
        self.bot.has_cap("message-tags")
    }
}

impl Inner {
    /// The Matrix event of an IRC msgid in a room (the first event of the message).
    async fn event_of_msgid(
        &self,
        room_id: &str,
        msgid: &str,
    ) -> Result<Option<String>, BridgeError> {
        let parts = self.ctx.store().messages_by_remote(room_id, msgid).await?;
        Ok(parts.into_iter().next().map(|m| m.event_id))
    }

    /// The IRC msgid of a Matrix event in a room, where the network has message tags.
    pub(super) async fn msgid_of_event(
        &self,
        net: &Network,
        room_id: &str,
        event_id: &str,
    ) -> Result<Option<String>, BridgeError> {
        if !net.has_tags() {
            return Ok(None);
        }
        Ok(self.ctx.store().message_by_event(room_id, event_id).await?.map(|m| m.remote_id))
    }

    /// Makes Matrix content for an IRC line a reply where the line's reply tag names a message
    /// of this room that the bridge mapped.
    pub(super) async fn with_irc_reply(
        &self,
        room_id: &str,
        line: &IrcLine,
        mut content: Value,
    ) -> Result<Value, BridgeError> {
        if let Some(msgid) = reply_msgid(line)
            && let Some(event_id) = self.event_of_msgid(room_id, msgid).await?
        {
            content["m.relates_to"] = json!({"m.in_reply_to": {"event_id": event_id}});
        }
        Ok(content)
    }

    /// Records that the IRC message `line` (with a `msgid`) became `event_id` in `room_id`.
    pub(super) async fn map_irc_message(
        &self,
        room_id: &str,
        line: &IrcLine,
        event_id: &str,
        sender: &str,
        part: u32,
    ) -> Result<(), BridgeError> {
        let Some(msgid) = line.tag("msgid").filter(|m| !m.is_empty()) else { return Ok(()) };
        self.ctx
            .store()
            .insert_message(&MessageMapping::now(room_id, msgid, part, event_id, sender))
            .await?;
        Ok(())
    }

    /// The server echoed a message we sent for a Matrix event: its msgid now maps to it.
    pub(super) async fn echoed(&self, sent: &EchoRef, line: &IrcLine) {
        tracing::debug!(
            room_id = sent.room_id,
            event_id = sent.event_id,
            part = sent.part,
            msgid = line.tag("msgid"),
            "echo of a sent message"
        );
        let r = self
            .map_irc_message(&sent.room_id, line, &sent.event_id, &sent.sender, sent.part)
            .await;
        if let Err(e) = r {
            tracing::warn!(room_id = sent.room_id, event_id = sent.event_id, error = %e, "could not record the msgid of a sent message");
        }
    }

    /// An IRC `TAGMSG` with `+draft/react` on a mapped message: a reaction of `ghost`.
    pub(super) async fn irc_reaction(
        &self,
        net: &Network,
        room_id: &str,
        ghost: &str,
        line: &IrcLine,
    ) -> Result<(), BridgeError> {
        let Some(key) = line.tag(REACT_TAG).filter(|k| !k.is_empty()) else { return Ok(()) };
        let Some(msgid) = reply_msgid(line) else { return Ok(()) };
        let Some(event_id) = self.event_of_msgid(room_id, msgid).await? else { return Ok(()) };
        let content = json!({"m.relates_to": {
            "rel_type": "m.annotation", "event_id": event_id, "key": key,
        }});
        let txn = self.ctx.txn_id_for(&super::cause_of(net, line), 0);
        let ts = line.tag("time").and_then(super::parse_server_time);
        let reaction = self.ctx.send_as(ghost, room_id, "m.reaction", content, &txn, ts).await?;
        // Its own msgid maps to the reaction: a `REDACT` of it takes the reaction back.
        self.map_irc_message(room_id, line, &reaction, ghost, 0).await
    }

    /// A Matrix redaction of `target` on a network with message redaction (`REDACT`, a
    /// draft): each IRC message the event became is deleted, by the redactor's own connection
    /// when they have one there (their messages, or others' when they are a channel operator),
    /// else by the bot. `false` when the server cannot, or the event was not mapped to msgids,
    /// so the configured fallback applies.
    pub(super) async fn redact_on_irc(
        &self,
        net: &Network,
        dest: &Target,
        event: &MatrixEvent,
        target: &str,
        reason: Option<&str>,
    ) -> Result<bool, BridgeError> {
        if !net.has_tags() || !net.bot.has_cap(REDACTION_CAP) {
            return Ok(false);
        }
        let parts = self.ctx.store().messages_by_event(&event.room_id, target).await?;
        if parts.is_empty() {
            return Ok(false);
        }
        let (to, user) = match dest {
            Target::Channel(chan) => (chan.as_str(), event.sender.as_str()),
            Target::Direct { user, nick } => (nick.as_str(), user.as_str()),
        };
        let conn = match net.puppets.get(user) {
            Some(p) if p.conn.is_registered() => p.conn.clone(),
            _ => net.bot.clone(),
        };
        let reason = reason.map(one_line).filter(|r| !r.is_empty());
        for part in &parts {
            let mut params = vec![to, part.remote_id.as_str()];
            params.extend(reason.as_deref());
            conn.send(IrcLine::new("REDACT", &params)).await.map_err(super::bridge_err)?;
        }
        tracing::debug!(room_id = event.room_id, target, lines = parts.len(), "redacted on IRC");
        Ok(true)
    }

    /// An IRC `REDACT` of a mapped message in a portal: its Matrix events are redacted, by
    /// the ghost of `nick` when the message was its own, else by the bot, saying who deleted
    /// it and why.
    pub(super) async fn irc_redaction(
        &self,
        ghost: &str,
        nick: &str,
        room_id: &str,
        line: &IrcLine,
    ) -> Result<(), BridgeError> {
        let msgid = line.param(1);
        if msgid.is_empty() {
            return Ok(());
        }
        let reason = match crate::format::strip_codes(line.param(2)) {
            r if r.is_empty() => format!("deleted on IRC by {nick}"),
            r => format!("deleted on IRC by {nick}: {r}"),
        };
        for part in self.ctx.store().messages_by_remote(room_id, msgid).await? {
            let own = part.sender == ghost;
            let r = if own {
                self.ctx.intent(ghost).redact(room_id, &part.event_id, Some(&reason)).await
            } else {
                self.ctx.bot().redact(room_id, &part.event_id, Some(&reason)).await
            };
            if let Err(e) = r {
                tracing::warn!(room_id, event_id = part.event_id, error = %e, "could not redact");
            }
        }
        Ok(())
    }
}

/// The `TAGMSG` of a reaction with `key` to the IRC message `msgid`.
pub(super) fn reaction_line(target: &str, msgid: &str, key: &str) -> IrcLine {
    // NUL cannot be escaped in a tag value; everything else is (see `IrcLine::to_wire`).
    let key: String = key.chars().filter(|c| *c != '\0').collect();
    IrcLine::new("TAGMSG", &[target])
        .with_tag(REACT_TAG, Some(&key))
        .with_tag(REPLY_TAG, Some(msgid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_tags() {
        let l = IrcLine::parse("@+reply=abc :n!u@h PRIVMSG #c :hi").unwrap();
        assert_eq!(reply_msgid(&l), Some("abc"));
        let l = IrcLine::parse("@+draft/reply=x\\sy :n!u@h PRIVMSG #c :hi").unwrap();
        assert_eq!(reply_msgid(&l), Some("x y"));
        let l = IrcLine::parse("@+draft/reply= :n!u@h PRIVMSG #c :hi").unwrap();
        assert_eq!(reply_msgid(&l), None);
    }

    #[test]
    fn reactions_cannot_inject() {
        let wire = reaction_line("#c", "id;1", "👍\r\nQUIT :x\0").to_wire().unwrap();
        assert_eq!(wire, "@+draft/react=👍\\r\\nQUIT\\s:x;+draft/reply=id\\:1 TAGMSG #c\r\n");
        assert_eq!(wire.matches("\r\n").count(), 1);
    }
}
