//! The commands of the bot's admin room: `!join` and `!listrooms`, a user's own IRC connection
//! (`!nick`, `!part`, `!storepass`, `!removepass`, `!certfp`, `!reconnect`, `!quit`, `!cmd`),
//! `!whois`,
//! and for admins `!plumb` / `!unlink`.
//!
//! Every argument that reaches IRC is checked by the connection layer (no CR, LF or NUL can
//! pass), and nicks and channels are validated here first.

use std::{sync::Arc, time::Duration};

use serde_json::json;
use trestle::{
    commands::{Command, CommandError, CommandInvocation, CommandRegistry, PermissionLevel},
    store::Portal,
};

use super::{Inner, IrcBridge, Network, now_ms, valid_channel};
use crate::{config::BridgeMode, conn::IrcLine};

fn failed(e: impl std::fmt::Display) -> CommandError {
    CommandError::Failed(e.to_string())
}

/// The network named by argument `i`, or the only/first one.
fn network(b: &Inner, inv: &CommandInvocation, i: usize) -> Result<Arc<Network>, CommandError> {
    match inv.args.get(i) {
        Some(n) => {
            b.networks.get(n.as_str()).cloned().ok_or_else(|| failed(format!("no network {n}")))
        }
        None => b.networks.values().next().cloned().ok_or_else(|| failed("no network")),
    }
}

fn puppets_only(net: &Network) -> Result<(), CommandError> {
    if net.config.mode == BridgeMode::Puppets {
        Ok(())
    } else {
        Err(failed(format!(
            "{} runs in relay mode: there is no connection of your own",
            net.config.name
        )))
    }
}

/// IRC commands `!cmd` refuses: they would break the connection's own state.
const RAW_REFUSED: &[&str] = &["QUIT", "PASS", "USER", "CAP", "AUTHENTICATE", "NICK", "PONG"];

/// Parses and checks a raw line for `!cmd`.
pub(super) fn raw_command(text: &str) -> Result<IrcLine, CommandError> {
    let line = IrcLine::parse(text).ok_or_else(|| failed("not an IRC command"))?;
    if line.source.is_some() || !line.tags.is_empty() {
        return Err(failed("no prefix or tags, just the command"));
    }
    let command = line.command.to_ascii_uppercase();
    if RAW_REFUSED.contains(&command.as_str()) {
        return Err(failed(format!(
            "{command} is managed by the bridge; use !nick, !quit or !reconnect"
        )));
    }
    line.to_wire().map_err(failed)?;
    Ok(line)
}

/// A command handler: boxed by [`register`] for the registry.
type Handler = fn(CommandInvocation, Arc<IrcBridge>) -> trestle::commands::CommandFuture;

/// Registers the commands.
pub(super) fn register(r: &mut CommandRegistry<IrcBridge>) {
    use PermissionLevel::User;
    let commands: [(&str, &str, &str, PermissionLevel, Handler); 13] = [
        (
            "join",
            "<#channel> [key] [network]",
            "Bridge an IRC channel (with its key, if it has one) and invite you to its room",
            User,
            |i, b| Box::pin(join(i, b)),
        ),
        ("listrooms", "", "List the bridged channels", User, |i, b| Box::pin(list_rooms(i, b))),
        ("nick", "<nick> [network]", "Change your IRC nick", User, |i, b| Box::pin(nick(i, b))),
        (
            "part",
            "<#channel> [network]",
            "Leave a channel with your IRC connection",
            User,
            |i, b| Box::pin(part(i, b)),
        ),
        ("whois", "<nick> [network]", "Who is this IRC user?", User, |i, b| Box::pin(whois(i, b))),
        (
            "storepass",
            "<network> <password | account:password>",
            "Store your IRC password (server password, or SASL account:password), encrypted",
            User,
            |i, b| Box::pin(store_pass(i, b)),
        ),
        ("removepass", "<network>", "Forget your stored IRC password", User, |i, b| {
            Box::pin(remove_pass(i, b))
        }),
        (
            "certfp",
            "<network> [remove]",
            "Make (or show) your TLS client certificate for the network, to log in to your account by SASL EXTERNAL; remove forgets it",
            User,
            |i, b| Box::pin(certfp(i, b)),
        ),
        ("reconnect", "[network]", "Reconnect your IRC connection", User, |i, b| {
            Box::pin(reconnect(i, b))
        }),
        (
            "quit",
            "[network]",
            "Disconnect your IRC connection (until you next speak)",
            User,
            |i, b| Box::pin(quit(i, b)),
        ),
        (
            "cmd",
            "<network> <IRC command…>",
            "Send a raw IRC command through your connection",
            User,
            |i, b| Box::pin(raw(i, b)),
        ),
        (
            "plumb",
            "<!room:id> <#channel> [network]",
            "Bridge an existing room you administer to a channel (invite the bot first)",
            User,
            |i, b| Box::pin(plumb(i, b)),
        ),
        (
            "unlink",
            "<!room:id | #channel> [network]",
            "Stop bridging a room you administer",
            User,
            |i, b| Box::pin(unlink(i, b)),
        ),
    ];
    for (name, usage, help, level, handler) in commands {
        r.add(Command::new(name, usage, help, level, handler));
    }
}

/// The result of a command: the reply, or why it failed.
type Reply = Result<String, CommandError>;

/// Argument `i` as a channel name.
fn channel_arg(inv: &CommandInvocation, i: usize) -> Result<String, CommandError> {
    let chan = inv.arg(i)?;
    if valid_channel(chan) {
        Ok(chan.to_owned())
    } else {
        Err(failed(format!("{chan} is not a valid channel name")))
    }
}

/// A channel key as IRC allows it: no spaces, commas, control characters, at most 100 bytes.
fn key_arg(key: &str) -> Result<String, CommandError> {
    if key.is_empty()
        || key.len() > 100
        || key.chars().any(|c| c.is_whitespace() || c.is_control() || c == ',' || c == ':')
    {
        return Err(failed("not a valid channel key (no spaces, commas or control characters)"));
    }
    Ok(key.to_owned())
}

/// Argument `i` as a nick valid on `net`.
fn nick_arg(net: &Network, inv: &CommandInvocation, i: usize) -> Result<String, CommandError> {
    let nick = inv.arg(i)?;
    let max = net.bot.isupport().nicklen.unwrap_or(30);
    if crate::nick::is_valid(nick, max) {
        Ok(nick.to_owned())
    } else {
        Err(failed(format!(
            "{nick} is not a valid nick here (at most {max} characters, letters first)"
        )))
    }
}

/// The network named by argument `i` (or the first), where the sender has a connection of
/// their own.
fn own_network(b: &Inner, inv: &CommandInvocation, i: usize) -> Result<Arc<Network>, CommandError> {
    let net = network(b, inv, i)?;
    puppets_only(&net)?;
    Ok(net)
}

async fn join(inv: CommandInvocation, b: Arc<IrcBridge>) -> Reply {
    let b = &b.inner;
    let chan = channel_arg(&inv, 0)?;
    // `[key] [network]`, in either order: an argument naming a network is the network.
    let (mut net_arg, mut key) = (None, None);
    for (i, a) in inv.args.iter().enumerate().skip(1) {
        if net_arg.is_none() && b.networks.contains_key(a.as_str()) {
            net_arg = Some(i);
        } else if key.is_none() {
            key = Some(key_arg(a)?);
        } else {
            return Err(failed(format!("unexpected argument {a}")));
        }
    }
    let net = match net_arg {
        Some(i) => network(b, &inv, i)?,
        None => b.networks.values().next().cloned().ok_or_else(|| failed("no network"))?,
    };
    if !net.config.dynamic_channels {
        return Err(failed("this network only bridges configured channels"));
    }
    let alias = b.alias_for(&net, &chan);
    let (portal, _) =
        b.open_portal(&net, &chan, alias.as_deref(), key.as_deref()).await.map_err(failed)?;
    b.ctx.bot().invite(&portal.room_id, &inv.sender).await.map_err(failed)?;
    Ok(format!("Invited you to {chan} on {}.", net.config.name))
}

async fn list_rooms(_: CommandInvocation, b: Arc<IrcBridge>) -> Reply {
    let portals = b.inner.ctx.store().portals().await.map_err(failed)?;
    let lines: Vec<String> = portals
        .iter()
        .filter_map(|p| {
            Some(format!(
                "{} on {} → {}",
                p.metadata.get("channel")?.as_str()?,
                p.metadata.get("network")?.as_str()?,
                p.room_id
            ))
        })
        .collect();
    Ok(if lines.is_empty() { "No channels are bridged.".to_owned() } else { lines.join("\n") })
}

async fn nick(inv: CommandInvocation, b: Arc<IrcBridge>) -> Reply {
    let b = &b.inner;
    let net = own_network(b, &inv, 1)?;
    let nick = nick_arg(&net, &inv, 0)?;
    let p = b.puppet(&net, &inv.sender).await.map_err(failed)?;
    b.set_nick_override(&net, &inv.sender, Some(&nick)).await.map_err(failed)?;
    net.puppets.add_nick(net.fold(&nick), &inv.sender);
    p.conn.send(IrcLine::new("NICK", &[&nick])).await.map_err(failed)?;
    Ok(format!("Asked {} for the nick {nick}.", net.config.name))
}

async fn part(inv: CommandInvocation, b: Arc<IrcBridge>) -> Reply {
    let b = &b.inner;
    let chan = channel_arg(&inv, 0)?;
    let net = own_network(b, &inv, 1)?;
    b.puppet_part(&net, &inv.sender, &chan).await;
    Ok(format!(
        "Left {chan} on {}. (You stay in the Matrix room until you leave it.)",
        net.config.name
    ))
}

async fn whois(inv: CommandInvocation, b: Arc<IrcBridge>) -> Reply {
    let b = &b.inner;
    let net = network(b, &inv, 1)?;
    let nick = nick_arg(&net, &inv, 0)?;
    if let Some(user) = net.puppets.user_of(&net.fold(&nick)) {
        return Ok(format!("{nick} is the Matrix user {user}, through this bridge."));
    }
    let lines = b.whois(&net, &nick).await.map_err(failed)?;
    Ok(if lines.is_empty() { format!("No such nick: {nick}") } else { lines.join("\n") })
}

async fn store_pass(inv: CommandInvocation, b: Arc<IrcBridge>) -> Reply {
    let b = &b.inner;
    let net = own_network(b, &inv, 0)?;
    let secret = inv.arg(1)?;
    if secret.contains(['\r', '\n', '\0']) {
        return Err(failed("the password holds a line break or NUL"));
    }
    b.store_secret(&net, &inv.sender, Some(secret)).await.map_err(failed)?;
    Ok(format!(
        "Stored (encrypted) for {}; used from your next connection: !reconnect {}. Delete your message holding the password from this room.",
        net.config.name, net.id
    ))
}

async fn remove_pass(inv: CommandInvocation, b: Arc<IrcBridge>) -> Reply {
    let b = &b.inner;
    let net = network(b, &inv, 0)?;
    b.store_secret(&net, &inv.sender, None).await.map_err(failed)?;
    Ok(format!("Your password for {} is forgotten.", net.config.name))
}

async fn certfp(inv: CommandInvocation, b: Arc<IrcBridge>) -> Reply {
    let b = &b.inner;
    // The network is named: the certificate is for one network's services.
    inv.arg(0)?;
    let net = own_network(b, &inv, 0)?;
    let name = &net.config.name;
    match inv.args.get(1).map(String::as_str) {
        None => {}
        Some(a) if a.eq_ignore_ascii_case("remove") && inv.args.len() == 2 => {
            return Ok(match b.remove_user_cert(&net, &inv.sender).await.map_err(failed)? {
                Some(fp) => format!(
                    "Your certificate for {name} is forgotten; from your next connection (!reconnect {}) it is not sent. Remove it from your account too: /msg NickServ CERT DEL {fp}",
                    net.id
                ),
                None => format!("You have no certificate for {name} (any unreadable one is gone)."),
            });
        }
        Some(_) => return Err(inv.usage_error()),
    }
    if !net.config.tls {
        return Err(failed(format!(
            "{name} is reached without TLS, and a client certificate is only sent in a TLS handshake: there is no CertFP login there (use !storepass {} account:password)",
            net.id
        )));
    }
    let (cert, new) = b.user_cert_or_new(&net, &inv.sender).await.map_err(failed)?;
    let fp = cert.fingerprint();
    let mut reply = format!(
        "{} certificate for {name} has the fingerprint (SHA-256):\n{fp}\n\
         To log in to your account with it: identify to your account, add the certificate with /msg NickServ CERT ADD {fp} (you can write CERT ADD {fp} in your private chat with NickServ), then !reconnect {}. From then on your connection logs in by SASL EXTERNAL, with no password stored here. !certfp {} remove forgets it.",
        if new { "Made your" } else { "Your" },
        net.id,
        net.id
    );
    if b.has_sasl_plain(&net, &inv.sender).await {
        reply.push_str(&format!(
            "\nYou have an account and password stored with !storepass: they are used instead (SASL PLAIN wins); !removepass {} to log in with the certificate.",
            net.id
        ));
    }
    Ok(reply)
}

async fn reconnect(inv: CommandInvocation, b: Arc<IrcBridge>) -> Reply {
    let b = &b.inner;
    let net = own_network(b, &inv, 0)?;
    let channels = b.reconnect_puppet(&net, &inv.sender).await.map_err(failed)?;
    Ok(format!("Reconnecting to {} ({channels} channels).", net.config.name))
}

async fn quit(inv: CommandInvocation, b: Arc<IrcBridge>) -> Reply {
    let b = &b.inner;
    let net = own_network(b, &inv, 0)?;
    b.drop_puppet(&net, &inv.sender, "Quit").await;
    b.forget_channels(&net, &inv.sender).await.map_err(failed)?;
    Ok(format!("Disconnected from {}.", net.config.name))
}

async fn raw(inv: CommandInvocation, b: Arc<IrcBridge>) -> Reply {
    let b = &b.inner;
    let net = own_network(b, &inv, 0)?;
    if inv.args.len() < 2 {
        return Err(inv.usage_error());
    }
    let line = raw_command(&inv.args[1..].join(" "))?;
    let p = b.puppet(&net, &inv.sender).await.map_err(failed)?;
    p.conn.send(line).await.map_err(failed)?;
    Ok("Sent.".to_owned())
}

/// Refuses unless the sender administers `room_id` (bridge admins may do it anywhere); the
/// bot joins the room to see.
async fn check_room_admin(
    b: &Inner,
    inv: &CommandInvocation,
    room_id: &str,
) -> Result<(), CommandError> {
    if inv.level >= PermissionLevel::Admin {
        return Ok(());
    }
    b.ctx.join_room_administered_by(room_id, &inv.sender).await.map_err(failed)
}

async fn plumb(inv: CommandInvocation, b: Arc<IrcBridge>) -> Reply {
    let b = &b.inner;
    let room = inv.arg(0)?.to_owned();
    let chan = inv.arg(1)?.to_owned();
    let net = network(b, &inv, 2)?;
    if !room.starts_with('!') || !valid_channel(&chan) {
        return Err(inv.usage_error());
    }
    if b.ctx.store().portal_by_remote(&net.portal_id(&chan)).await.map_err(failed)?.is_some() {
        return Err(failed(format!("{chan} is bridged already; !unlink it first")));
    }
    if b.ctx.store().portal_by_room(&room).await.map_err(failed)?.is_some() {
        return Err(failed(format!("{room} is bridged already; !unlink it first")));
    }
    check_room_admin(b, &inv, &room).await?;
    b.link_room(&net, &chan, &room).await.map_err(failed)?;
    Ok(format!("{room} is now bridged to {chan} on {}.", net.config.name))
}

async fn unlink(inv: CommandInvocation, b: Arc<IrcBridge>) -> Reply {
    let b = &b.inner;
    let what = inv.arg(0)?;
    let net = network(b, &inv, 1)?;
    let store = b.ctx.store();
    let portal = if what.starts_with('!') {
        store.portal_by_room(what).await
    } else {
        store.portal_by_remote(&net.portal_id(what)).await
    }
    .map_err(failed)?
    .ok_or_else(|| failed(format!("{what} is not bridged")))?;
    let Some((net, super::Target::Channel(chan))) = b.target_of(&portal) else {
        return Err(failed("that is a private conversation, not a channel"));
    };
    check_room_admin(b, &inv, &portal.room_id).await?;
    store.delete_portal(&portal.remote_id).await.map_err(failed)?;
    let _ = net.bot.part(&chan, "Unlinked from Matrix").await;
    for p in net.puppets.all() {
        if p.conn.in_channel(&chan) {
            let _ = p.conn.part(&chan, "Unlinked from Matrix").await;
        }
    }
    b.ctx.notice(&portal.room_id, &format!("This room is no longer bridged to {chan}.")).await;
    if portal.metadata.get("plumbed").is_some() {
        let _ = b.ctx.bot().leave(&portal.room_id).await;
    }
    Ok(format!("{chan} on {} is unlinked from {}.", net.config.name, portal.room_id))
}

impl Inner {
    /// Bridges an existing room to a channel (`!plumb`, and `static_channels` at start-up): the
    /// bot joins the room (it must be public or the bot invited), the portal is recorded with
    /// `m.bridge` state, and the bot joins the channel.
    pub(super) async fn link_room(
        &self,
        net: &Network,
        chan: &str,
        room: &str,
    ) -> Result<(), String> {
        self.ctx
            .bot()
            .join(room)
            .await
            .map_err(|e| format!("the bot cannot join {room} (invite it first): {e}"))?;
        let spec = self.portal_spec(net, chan);
        let portal = Portal {
            remote_id: spec.remote_id.clone(),
            room_id: room.to_owned(),
            alias: None,
            metadata: json!({"network": net.id, "channel": chan, "plumbed": true}),
            created_at: now_ms(),
        };
        self.ctx.store().upsert_portal(&portal).await.map_err(|e| e.to_string())?;
        let info = self.ctx.bridge_info_content(&spec);
        let content = serde_json::to_value(&info).map_err(|e| e.to_string())?;
        for t in ["m.bridge", "uk.half-shot.bridge"] {
            if let Err(e) =
                self.ctx.bot().send_state(room, t, &info.state_key(), content.clone(), None).await
            {
                tracing::warn!(room, error = %e, "could not set the bridge state (the bot needs power to send state)");
            }
        }
        net.bot.join(chan, None).await.map_err(|e| e.to_string())?;
        Ok(())
    }

    /// `WHOIS` through the bot; the replies, or nothing for an unknown nick.
    async fn whois(
        &self,
        net: &Network,
        nick: &str,
    ) -> Result<Vec<String>, crate::conn::SendError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        super::lock(&net.whois).insert(net.fold(nick), (Vec::new(), Some(tx)));
        net.bot.send(IrcLine::new("WHOIS", &[nick])).await?;
        let lines =
            tokio::time::timeout(Duration::from_secs(10), rx).await.ok().and_then(Result::ok);
        super::lock(&net.whois).remove(&net.fold(nick));
        Ok(lines.unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_commands_are_checked() {
        assert!(raw_command("MODE #chan +o alice").is_ok());
        assert!(raw_command("PRIVMSG NickServ :IDENTIFY x").is_ok());
        assert!(raw_command("QUIT :bye").is_err());
        assert!(raw_command("quit").is_err());
        assert!(raw_command(":evil!x@y PRIVMSG #a :b").is_err());
        assert!(raw_command("PRIVMSG #a :b\r\nQUIT").is_err());
        assert!(raw_command("").is_err());
    }

    #[test]
    fn channel_keys_are_checked() {
        assert_eq!(key_arg("sekrit").ok().as_deref(), Some("sekrit"));
        for bad in ["", "a b", "a,b", "a\r\nQUIT", "a\0", ":x", &"k".repeat(101)] {
            assert!(key_arg(bad).is_err(), "{bad:?}");
        }
    }
}
