//! The bot's commands: `!join` a chat (a portal created on demand, as its alias does), and
//! `!plumb` / `!unlink` of an existing Matrix room by an admin of that room (or of the bridge).

use std::sync::Arc;

use serde_json::json;
use trestle::{
    commands::{Command, CommandError, CommandInvocation, CommandRegistry, PermissionLevel},
    store::Portal,
};

use super::{Inner, XmppBridge, now_ms};
use crate::{ids::RoomJid, stanzas};

type Reply = Result<String, CommandError>;

fn failed(e: impl std::fmt::Display) -> CommandError {
    CommandError::Failed(e.to_string())
}

/// A command handler: boxed for the registry.
type Handler = fn(CommandInvocation, Arc<XmppBridge>) -> trestle::commands::CommandFuture;

/// Registers the commands.
pub(super) fn register(r: &mut CommandRegistry<XmppBridge>) {
    use PermissionLevel::User;
    let commands: [(&str, &str, &str, Handler); 3] = [
        ("join", "<room@service>", "Bridge an XMPP chat and invite you to its room", |i, b| {
            Box::pin(join(i, b))
        }),
        (
            "plumb",
            "<!room:id> <room@service>",
            "Bridge an existing room you administer to an XMPP chat (invite the bot first)",
            |i, b| Box::pin(plumb(i, b)),
        ),
        ("unlink", "<!room:id | room@service>", "Stop bridging a room you administer", |i, b| {
            Box::pin(unlink(i, b))
        }),
    ];
    for (name, usage, help, handler) in commands {
        r.add(Command::new(name, usage, help, User, handler));
    }
}

/// Argument `i` as a chat on one of the allowed MUC services.
fn chat_arg(b: &Inner, inv: &CommandInvocation, i: usize) -> Result<RoomJid, CommandError> {
    let arg = inv.arg(i)?;
    let room = RoomJid::parse(&arg.to_lowercase()).ok_or_else(|| {
        failed(format!("{arg:?} is not a chat address such as room@conference.example.org"))
    })?;
    if !b.cfg().muc_services.contains(&room.service) {
        return Err(failed(format!("the bridge does not bridge chats of {}", room.service)));
    }
    Ok(room)
}

/// Refuses unless the sender administers `room_id` (or the bridge); the bot joins the room
/// to see.
async fn check_admin(
    b: &Inner,
    inv: &CommandInvocation,
    room_id: &str,
) -> Result<(), CommandError> {
    if inv.level >= PermissionLevel::Admin {
        return b
            .ctx
            .bot()
            .join(room_id)
            .await
            .map(drop)
            .map_err(|e| failed(format!("the bot cannot join {room_id} (invite it first): {e}")));
    }
    b.ctx.join_room_administered_by(room_id, &inv.sender).await.map_err(failed)
}

async fn join(inv: CommandInvocation, b: Arc<XmppBridge>) -> Reply {
    let b = &b.inner;
    let room = chat_arg(b, &inv, 0)?;
    let spec = b.portal_spec(&room);
    let alias = b.ids.alias_of(&room);
    let (portal, created) = b.ctx.ensure_portal(&spec, Some(&alias)).await.map_err(failed)?;
    if created {
        b.portal_new(&room);
    }
    b.ctx.bot().invite(&portal.room_id, &inv.sender).await.map_err(failed)?;
    Ok(format!("Invited you to {} ({alias}).", room.bare()))
}

async fn plumb(inv: CommandInvocation, b: Arc<XmppBridge>) -> Reply {
    let b = &b.inner;
    let room_id = inv.arg(0)?.to_owned();
    if !room_id.starts_with('!') {
        return Err(inv.usage_error());
    }
    let room = chat_arg(b, &inv, 1)?;
    let store = b.ctx.store();
    if store.portal_by_remote(&room.remote_id()).await.map_err(failed)?.is_some() {
        return Err(failed(format!("{} is bridged already; !unlink it first", room.bare())));
    }
    if store.portal_by_room(&room_id).await.map_err(failed)?.is_some() {
        return Err(failed(format!("{room_id} is bridged already; !unlink it first")));
    }
    check_admin(b, &inv, &room_id).await?;
    let spec = b.portal_spec(&room);
    let mut metadata = spec.metadata.clone();
    metadata["plumbed"] = json!(true);
    let portal = Portal {
        remote_id: spec.remote_id.clone(),
        room_id: room_id.clone(),
        alias: None,
        metadata,
        created_at: now_ms(),
    };
    store.upsert_portal(&portal).await.map_err(failed)?;
    let info = b.ctx.bridge_info_content(&spec);
    let content = serde_json::to_value(&info).map_err(failed)?;
    let mut state_set = true;
    for t in ["m.bridge", "uk.half-shot.bridge"] {
        if let Err(e) =
            b.ctx.bot().send_state(&room_id, t, &info.state_key(), content.clone(), None).await
        {
            tracing::warn!(room_id, error = %e, "could not set the bridge state (the bot needs power to send state)");
            state_set = false;
        }
    }
    b.portal_new(&room);
    tracing::info!(room_id, chat = room.bare(), by = inv.sender, "plumbed a room");
    let note = if state_set {
        ""
    } else {
        " The bot could not mark the room as bridged (m.bridge): give it the power to send state events for clients to show it."
    };
    Ok(format!("{room_id} is now bridged to {}.{note}", room.bare()))
}

async fn unlink(inv: CommandInvocation, b: Arc<XmppBridge>) -> Reply {
    let b = &b.inner;
    let what = inv.arg(0)?;
    let store = b.ctx.store();
    let portal = if what.starts_with('!') {
        store.portal_by_room(what).await.map_err(failed)?
    } else {
        let room = chat_arg(b, &inv, 0)?;
        store.portal_by_remote(&room.remote_id()).await.map_err(failed)?
    }
    .ok_or_else(|| failed(format!("{what} is not bridged")))?;
    let Some(room) = Inner::room_of(&portal) else {
        return Err(failed("that is a private chat, not a chat room"));
    };
    check_admin(b, &inv, &portal.room_id).await?;
    store.delete_portal(&portal.remote_id).await.map_err(failed)?;
    b.leave_chat(&room);
    b.ctx
        .notice(&portal.room_id, &format!("This room is no longer bridged to {}.", room.bare()))
        .await;
    if portal.metadata.get("plumbed").is_some() {
        let _ = b.ctx.bot().leave(&portal.room_id).await;
    }
    tracing::info!(
        room_id = portal.room_id,
        chat = room.bare(),
        by = inv.sender,
        "unlinked a room"
    );
    Ok(format!("{} is unlinked from {}.", room.bare(), portal.room_id))
}

impl Inner {
    /// The bot and every puppet leave `room` on XMPP, and the bridge forgets it.
    fn leave_chat(&self, room: &RoomJid) {
        let state = self.state().rooms.remove(&room.bare());
        let Some(state) = state else { return };
        for (mxid, p) in &state.puppets {
            if let (Some(jid), Some(to)) = (self.puppet_jid(mxid), stanzas::occupant(room, &p.nick))
            {
                let _ = self.xmpp.send(stanzas::leave(&jid, &to));
            }
        }
        if let Some(to) = stanzas::occupant(room, &self.cfg().bot_nick) {
            let _ = self.xmpp.send(stanzas::leave(&self.bot, &to));
        }
    }
}
