//! Puppets (mode `puppets`): each Matrix user speaks through an IRC connection of their own.
//! Also private messages, which need a puppet on the Matrix side.
//!
//! A puppet connects when its user first joins a portal or speaks, joins the channels of the
//! portals its user is in, and quits after `idle_timeout_minutes` without activity. What a
//! puppet was doing (nick, channels, last activity) is kept in the store's user settings, so a
//! restart reconnects recently active users only, through the network's connection pacer.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use serde_json::{Value, json};
use tokio::sync::mpsc;
use trestle::{
    bridge::BridgeError,
    client::{CreateRoom, RoomPreset},
    event::{MatrixEvent, Message, MessageType},
    store::{Portal, UserSettings},
};

use super::{Inner, Network, bridge_err, content_from_irc, now_ms};
use crate::{
    certfp::UserCert,
    conn::{ConnEvent, IrcConnection, IrcLine, Outgoing},
};

/// Settings are rewritten at most this often just to record activity.
const TOUCH_SAVE_MS: i64 = 5 * 60 * 1000;

/// The user settings key of a `!certfp` certificate: its PEM text (with the private key),
/// sealed with the bridge's key like `!storepass` secrets, in base64.
const CERT_KEY: &str = "client_cert";

/// One Matrix user's connection to a network.
pub(super) struct Puppet {
    pub(super) user_id: String,
    pub(super) conn: IrcConnection,
    /// The nick asked for; the server may have given another (collision).
    wanted_nick: String,
    last_active: AtomicI64,
    last_saved: AtomicI64,
    /// Where to tell the user about their connection (nick collisions, kicks, bans).
    notify_room: Mutex<Option<String>>,
    /// Invite-only channels (folded) the bot was asked to invite this puppet to: the join is
    /// retried once, when the invite arrives.
    awaiting_invite: Mutex<HashSet<String>>,
    /// When an IRC invite last became a Matrix invite (at most one per [`INVITE_INTERVAL`]:
    /// an IRC user cannot flood the Matrix user with invites, nor the homeserver with rooms).
    last_invite: Mutex<Option<std::time::Instant>>,
    /// The fingerprint of the `!certfp` certificate this connection logs in with (SASL
    /// EXTERNAL), if it does.
    sasl_external: Option<String>,
}

impl Puppet {
    fn touch(&self) -> bool {
        let now = now_ms();
        self.last_active.store(now, Ordering::Relaxed);
        now - self.last_saved.load(Ordering::Relaxed) > TOUCH_SAVE_MS
    }

    fn set_notify_room(&self, room_id: &str) {
        *self.notify_room.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some(room_id.to_owned());
    }

    fn notify_room(&self) -> Option<String> {
        self.notify_room.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

/// The puppets of one network.
#[derive(Default)]
pub(super) struct Puppets {
    by_user: Mutex<HashMap<String, Arc<Puppet>>>,
    /// Every nick a live puppet has or had (folded) → its user: lines from these are never
    /// bridged back as ghosts, whichever connection sees the nick change first.
    nicks: Mutex<HashMap<String, String>>,
    /// Serialises connection set-up, so that one user never gets two connections.
    spawning: tokio::sync::Mutex<()>,
    /// Serialises writes of user settings (see [`Inner::update_settings`]).
    settings_writes: tokio::sync::Mutex<()>,
}

impl Puppets {
    pub(super) fn get(&self, user_id: &str) -> Option<Arc<Puppet>> {
        self.by_user.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(user_id).cloned()
    }

    pub(super) fn all(&self) -> Vec<Arc<Puppet>> {
        self.by_user
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    fn len(&self) -> usize {
        self.by_user.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }

    pub(super) fn add_nick(&self, folded: String, user_id: &str) {
        self.nicks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(folded, user_id.to_owned());
    }

    /// The Matrix user behind a puppet nick (folded).
    pub(super) fn user_of(&self, folded: &str) -> Option<String> {
        self.nicks.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(folded).cloned()
    }

    fn remove(&self, user_id: &str) -> Option<Arc<Puppet>> {
        self.nicks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|_, u| u != user_id);
        self.by_user.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(user_id)
    }
}

/// The ident of a puppet: lowercase letters and digits of the localpart, at most 10.
fn ident_for(user_id: &str) -> String {
    let ident: String = user_id
        .trim_start_matches('@')
        .split(':')
        .next()
        .unwrap_or_default()
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .take(10)
        .collect();
    if ident.is_empty() { "matrix".to_owned() } else { ident }
}

impl Network {
    /// Whether `nick` belongs to one of our puppets.
    pub(super) fn is_puppet_nick(&self, nick: &str) -> bool {
        self.puppets.user_of(&self.fold(nick)).is_some()
    }
}

impl Inner {
    /// The user's puppet on `net`, connecting it if needed.
    pub(super) async fn puppet(
        self: &Arc<Self>,
        net: &Arc<Network>,
        user_id: &str,
    ) -> Result<Arc<Puppet>, BridgeError> {
        self.puppet_notifying(net, user_id, None).await
    }

    /// [`Self::puppet`]; a new connection tells the user about itself in `notify_room` (until
    /// the user speaks elsewhere), from its first event on.
    async fn puppet_notifying(
        self: &Arc<Self>,
        net: &Arc<Network>,
        user_id: &str,
        notify_room: Option<String>,
    ) -> Result<Arc<Puppet>, BridgeError> {
        if let Some(p) = net.puppets.get(user_id) {
            self.touch(net, &p).await;
            return Ok(p);
        }
        let _spawning = net.puppets.spawning.lock().await;
        if let Some(p) = net.puppets.get(user_id) {
            return Ok(p);
        }
        if net.puppets.len() >= net.config.max_connections as usize {
            return Err(BridgeError::Permanent(format!(
                "{} allows at most {} bridged connections; none is free",
                net.config.name, net.config.max_connections
            )));
        }
        let saved = self.ctx.store().user_settings(user_id, &net.id).await?;
        let max = net.bot.isupport().nicklen.unwrap_or(30);
        let wanted = match saved.as_ref().and_then(|s| s.settings.get("nick_override")?.as_str()) {
            Some(nick) => nick.to_owned(),
            None => {
                let name = self.displayname(user_id).await;
                crate::nick::from_template(&net.config.nick_template, Some(&name), user_id, max)
            }
        };
        let mut cfg = net.conn_base.clone();
        cfg.nick.clone_from(&wanted);
        cfg.username = ident_for(user_id);
        cfg.realname = user_id.to_owned();
        cfg.password = None;
        cfg.sasl = None;
        // The bot's certificate is the bot's account.
        cfg.client_cert = None;
        // `!storepass`: `account:password` is SASL PLAIN, anything else the server password.
        if let Some(sealed) = saved.as_ref().and_then(|s| s.secret.as_deref()) {
            match self.ctx.secrets().open(sealed) {
                Ok(secret) => match secret.split_once(':') {
                    Some((account, password)) => {
                        cfg.sasl = Some((account.to_owned(), password.to_owned()));
                    }
                    None => cfg.password = Some(secret),
                },
                Err(e) => {
                    tracing::warn!(network = net.id, user_id, error = %e, "cannot decrypt the stored password; connecting without it");
                }
            }
        }
        // `!certfp`: presented in the TLS handshake; SASL EXTERNAL unless PLAIN is stored.
        let mut sasl_external = None;
        if net.config.tls
            && let Some(s) = &saved
        {
            match self.open_cert(s).map(|c| c.and_then(|c| Ok((c.client_cert()?, c)))) {
                Some(Ok((client_cert, cert))) => {
                    cfg.client_cert = Some(Arc::new(client_cert));
                    if cfg.sasl.is_none() {
                        sasl_external = Some(cert.fingerprint().to_owned());
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(network = net.id, user_id, error = %e, "cannot open the stored client certificate; connecting without it");
                }
                None => {}
            }
        }
        cfg.queue_capacity = 256;
        // The bot, in every portal's channel, maps this puppet's channel messages.
        cfg.channel_echoes = false;
        if let Some(prefix) = net.ipv6_prefix {
            cfg.bind = Some(IpAddr::V6(crate::addr::address_for(prefix, user_id)));
        }
        let (conn, events) = IrcConnection::spawn(cfg, Arc::clone(&net.pacer), self.ctx.shutdown());
        let now = now_ms();
        let puppet = Arc::new(Puppet {
            user_id: user_id.to_owned(),
            conn,
            wanted_nick: wanted.clone(),
            last_active: AtomicI64::new(now),
            last_saved: AtomicI64::new(0),
            notify_room: Mutex::new(notify_room),
            awaiting_invite: Mutex::default(),
            last_invite: Mutex::default(),
            sasl_external,
        });
        net.puppets.add_nick(net.fold(&wanted), user_id);
        net.puppets
            .by_user
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(user_id.to_owned(), Arc::clone(&puppet));
        // Channels it was in before a restart come back with it.
        if let Some(s) = saved
            && let Some(chans) = s.settings.get("channels").and_then(Value::as_array)
        {
            for c in chans.iter().filter_map(Value::as_str) {
                puppet.conn.join(c, net.bot.key(c).as_deref()).await.map_err(bridge_err)?;
            }
        }
        self.puppet_gauge.with_label_values(&[net.id.as_str()]).inc();
        tracing::info!(network = net.id, user_id, nick = wanted, "puppet connecting");
        tokio::spawn(puppet_loop(Arc::clone(self), Arc::clone(net), Arc::clone(&puppet), events));
        self.save(net, &puppet).await;
        Ok(puppet)
    }

    async fn touch(&self, net: &Network, p: &Puppet) {
        if p.touch() {
            self.save(net, p).await;
        }
    }

    /// Records what the puppet is doing (best effort: a failure only means a restart may
    /// reconnect it a little differently).
    async fn save(&self, net: &Network, p: &Puppet) {
        p.last_saved.store(now_ms(), Ordering::Relaxed);
        let r = self
            .update_settings(net, &p.user_id, |s| {
                s.settings["nick"] = json!(p.conn.nick());
                s.settings["channels"] = json!(p.conn.channels());
                s.settings["last_active"] = json!(p.last_active.load(Ordering::Relaxed));
            })
            .await;
        if let Err(e) = r {
            tracing::warn!(network = net.id, user_id = p.user_id, error = %e, "could not save puppet state");
        }
    }

    /// Read-modify-write of a user's settings for a network. Writes on a network happen one at
    /// a time, and `f` runs inside, so concurrent writers (a channel join and the connection's
    /// registration, say) never undo each other: the last write holds the latest state.
    async fn update_settings(
        &self,
        net: &Network,
        user_id: &str,
        f: impl FnOnce(&mut UserSettings),
    ) -> Result<(), BridgeError> {
        let _one_at_a_time = net.puppets.settings_writes.lock().await;
        let store = self.ctx.store();
        let mut settings =
            store.user_settings(user_id, &net.id).await?.unwrap_or_else(|| UserSettings {
                user_id: user_id.to_owned(),
                network: net.id.clone(),
                settings: json!({}),
                secret: None,
            });
        if !settings.settings.is_object() {
            settings.settings = json!({});
        }
        f(&mut settings);
        store.set_user_settings(&settings).await?;
        Ok(())
    }

    /// `!nick`: the nick the user chose, kept over displayname changes and restarts.
    pub(super) async fn set_nick_override(
        &self,
        net: &Network,
        user_id: &str,
        nick: Option<&str>,
    ) -> Result<(), BridgeError> {
        self.update_settings(net, user_id, |s| s.settings["nick_override"] = json!(nick)).await
    }

    /// `!storepass` / `!removepass`: the secret is sealed with the bridge's key before it is
    /// stored, and used from the next connection.
    pub(super) async fn store_secret(
        &self,
        net: &Network,
        user_id: &str,
        secret: Option<&str>,
    ) -> Result<(), BridgeError> {
        let sealed = match secret {
            Some(s) => Some(
                self.ctx.secrets().seal(s).map_err(|e| BridgeError::Permanent(e.to_string()))?,
            ),
            None => None,
        };
        self.update_settings(net, user_id, |s| s.secret = sealed).await
    }

    /// The `!certfp` certificate in the user's settings, opened: `None` if there is none.
    fn open_cert(&self, s: &UserSettings) -> Option<Result<UserCert, crate::certfp::CertError>> {
        let sealed = s.settings.get(CERT_KEY)?.as_str()?;
        Some(UserCert::open(sealed, self.ctx.secrets()))
    }

    /// The user's `!certfp` certificate for `net`, if they have one.
    pub(super) async fn user_cert(
        &self,
        net: &Network,
        user_id: &str,
    ) -> Result<Option<UserCert>, BridgeError> {
        let Some(s) = self.ctx.store().user_settings(user_id, &net.id).await? else {
            return Ok(None);
        };
        self.open_cert(&s).transpose().map_err(|e| {
            BridgeError::Permanent(format!(
                "{e} (the bridge's secret key may have changed); remove it with !certfp {} remove",
                net.id
            ))
        })
    }

    /// `!certfp`: the user's certificate for `net`, generated and stored (sealed) first if
    /// they have none; with whether it is new. Two concurrent calls store one certificate.
    pub(super) async fn user_cert_or_new(
        &self,
        net: &Network,
        user_id: &str,
    ) -> Result<(UserCert, bool), BridgeError> {
        if let Some(cert) = self.user_cert(net, user_id).await? {
            return Ok((cert, false));
        }
        let cert =
            UserCert::generate(user_id).map_err(|e| BridgeError::Permanent(e.to_string()))?;
        let sealed =
            cert.seal(self.ctx.secrets()).map_err(|e| BridgeError::Permanent(e.to_string()))?;
        let mut stored = false;
        self.update_settings(net, user_id, |s| {
            if s.settings.get(CERT_KEY).is_none_or(Value::is_null) {
                s.settings[CERT_KEY] = json!(sealed);
                stored = true;
            }
        })
        .await?;
        if stored {
            tracing::info!(
                network = net.id,
                user_id,
                fingerprint = cert.fingerprint(),
                "client certificate generated"
            );
            return Ok((cert, true));
        }
        let cert = self.user_cert(net, user_id).await?;
        Ok((
            cert.ok_or_else(|| BridgeError::Permanent("the certificate vanished".to_owned()))?,
            false,
        ))
    }

    /// `!certfp <network> remove`: forgets the user's certificate; returns its fingerprint, if
    /// there was one (and it could be opened).
    pub(super) async fn remove_user_cert(
        &self,
        net: &Network,
        user_id: &str,
    ) -> Result<Option<String>, BridgeError> {
        let fingerprint =
            self.user_cert(net, user_id).await.ok().flatten().map(|c| c.fingerprint().to_owned());
        self.update_settings(net, user_id, |s| {
            if let Some(o) = s.settings.as_object_mut() {
                o.remove(CERT_KEY);
            }
        })
        .await?;
        Ok(fingerprint)
    }

    /// Whether the user stored SASL PLAIN credentials (`!storepass account:password`) for
    /// `net`, which win over a `!certfp` certificate.
    pub(super) async fn has_sasl_plain(&self, net: &Network, user_id: &str) -> bool {
        let saved = self.ctx.store().user_settings(user_id, &net.id).await.ok().flatten();
        saved
            .and_then(|s| s.secret)
            .and_then(|sealed| self.ctx.secrets().open(&sealed).ok())
            .is_some_and(|secret| secret.contains(':'))
    }

    /// Quits and forgets the user's puppet; returns the channels it was in.
    pub(super) async fn drop_puppet(
        &self,
        net: &Network,
        user_id: &str,
        reason: &str,
    ) -> Vec<String> {
        let Some(p) = net.puppets.remove(user_id) else { return Vec::new() };
        self.puppet_gauge.with_label_values(&[net.id.as_str()]).dec();
        let channels = p.conn.channels();
        self.save(net, &p).await;
        p.conn.quit(reason).await;
        channels
    }

    /// `!reconnect`: a new connection for the user (with the password stored now), in the
    /// channels of the old one, telling the user where the old one did. Returns how many
    /// channels it rejoins.
    pub(super) async fn reconnect_puppet(
        self: &Arc<Self>,
        net: &Arc<Network>,
        user_id: &str,
    ) -> Result<usize, BridgeError> {
        let notify_room = net.puppets.get(user_id).and_then(|p| p.notify_room());
        let channels = self.drop_puppet(net, user_id, "Reconnecting").await;
        let p = self.puppet_notifying(net, user_id, notify_room).await?;
        for c in &channels {
            p.conn.join(c, net.bot.key(c).as_deref()).await.map_err(bridge_err)?;
        }
        Ok(channels.len())
    }

    /// `!quit`: the puppet is not brought back at the next start.
    pub(super) async fn forget_channels(
        &self,
        net: &Network,
        user_id: &str,
    ) -> Result<(), BridgeError> {
        self.update_settings(net, user_id, |s| s.settings["channels"] = json!([])).await
    }

    /// Has the user's puppet join `channel` (connecting it first if needed).
    pub(super) async fn puppet_join(
        self: &Arc<Self>,
        net: &Arc<Network>,
        user_id: &str,
        channel: &str,
        room_id: &str,
    ) -> Result<Arc<Puppet>, BridgeError> {
        let p = self.puppet(net, user_id).await?;
        p.set_notify_room(room_id);
        if !p.conn.in_channel(channel) {
            if p.conn.channels().len() >= net.config.max_channels_per_user as usize {
                return Err(BridgeError::Permanent(format!(
                    "your IRC connection is in {} channels already, the most allowed",
                    net.config.max_channels_per_user
                )));
            }
            // A keyed channel's key is the bot's (from `!join #chan key` or `MODE +k`).
            p.conn.join(channel, net.bot.key(channel).as_deref()).await.map_err(bridge_err)?;
            self.save(net, &p).await;
        }
        Ok(p)
    }

    /// The user left a portal: their puppet leaves the channel.
    pub(super) async fn puppet_part(&self, net: &Network, user_id: &str, channel: &str) {
        if let Some(p) = net.puppets.get(user_id)
            && p.conn.in_channel(channel)
        {
            let _ = p.conn.part(channel, "Left the Matrix room").await;
            self.save(net, &p).await;
        }
    }

    /// The user's displayname changed: their puppet follows with a new nick.
    pub(super) async fn puppet_rename(&self, net: &Network, user_id: &str, displayname: &str) {
        let Some(p) = net.puppets.get(user_id) else { return };
        let chosen = self.ctx.store().user_settings(user_id, &net.id).await.ok().flatten();
        if chosen.is_some_and(|s| s.settings.get("nick_override").is_some_and(|n| !n.is_null())) {
            return;
        }
        let max = p.conn.isupport().nicklen.unwrap_or(30);
        let nick =
            crate::nick::from_template(&net.config.nick_template, Some(displayname), user_id, max);
        if net.fold(&nick) != net.fold(&p.conn.nick()) {
            net.puppets.add_nick(net.fold(&nick), user_id);
            let _ = p.conn.send(IrcLine::new("NICK", &[&nick])).await;
        }
    }

    /// The puppet of `event`'s sender, connected, and in `target` if it is a channel.
    pub(super) async fn puppet_for(
        self: &Arc<Self>,
        net: &Arc<Network>,
        target: &str,
        event: &MatrixEvent,
    ) -> Result<Arc<Puppet>, BridgeError> {
        let (room_id, sender) = (event.room_id.as_str(), event.sender.as_str());
        if net.is_channel(target) {
            return self.puppet_join(net, sender, target, room_id).await;
        }
        // A private chat is not where the user hears about their connection: the bot is not
        // in it (its notices would be refused), so the last portal stays the place.
        self.puppet(net, sender).await
    }

    /// Sends a Matrix message (`event`, or its edit) through the sender's puppet to a channel
    /// or a nick, with the tags and echo references of `out`.
    pub(super) async fn puppet_say(
        self: &Arc<Self>,
        net: &Arc<Network>,
        target: &str,
        event: &MatrixEvent,
        msg: &Message,
        edit: bool,
        out: &mut Outgoing,
    ) -> Result<(), BridgeError> {
        let p = self.puppet_for(net, target, event).await?;
        for line in self.irc_lines(net, msg).await {
            let line = if edit { format!("* {line}") } else { line };
            let sent = match msg.msgtype {
                MessageType::Emote => p.conn.send_action_with(target, &line, out).await,
                MessageType::Notice => {
                    p.conn.send_text_with("NOTICE", target, &line, out).await.map(drop)
                }
                _ => p.conn.send_text_with("PRIVMSG", target, &line, out).await.map(drop),
            };
            sent.map_err(bridge_err)?;
        }
        Ok(())
    }

    /// Quits puppets idle longer than the network allows.
    pub(super) async fn reap_idle(&self, net: &Network) {
        let minutes = net.config.idle_timeout_minutes;
        if minutes == 0 {
            return;
        }
        let limit = i64::try_from(minutes.saturating_mul(60_000)).unwrap_or(i64::MAX);
        let now = now_ms();
        for p in net.puppets.all() {
            if now - p.last_active.load(Ordering::Relaxed) > limit {
                tracing::info!(network = net.id, user_id = p.user_id, "puppet idle; disconnecting");
                self.save(net, &p).await;
                if net.puppets.remove(&p.user_id).is_some() {
                    self.puppet_gauge.with_label_values(&[net.id.as_str()]).dec();
                }
                p.conn.quit("Idle").await;
            }
        }
    }

    /// At start-up: reconnects the puppets of users active within the idle timeout.
    pub(super) async fn restore_puppets(self: &Arc<Self>, net: &Arc<Network>) {
        let users = match self.ctx.store().users_with_settings(&net.id).await {
            Ok(u) => u,
            Err(e) => {
                tracing::error!(network = net.id, error = %e, "cannot read puppet state");
                return;
            }
        };
        let minutes = net.config.idle_timeout_minutes;
        let limit = i64::try_from(minutes.saturating_mul(60_000)).unwrap_or(i64::MAX);
        let now = now_ms();
        let (mut restored, mut idle) = (0usize, 0usize);
        for s in users {
            let last = s.settings.get("last_active").and_then(Value::as_i64).unwrap_or(0);
            let has_channels =
                s.settings.get("channels").and_then(Value::as_array).is_some_and(|c| !c.is_empty());
            if !has_channels || (minutes != 0 && now - last > limit) {
                idle += 1;
                continue;
            }
            match self.puppet(net, &s.user_id).await {
                Ok(p) => {
                    // Keep the saved activity time: a restart is not activity.
                    p.last_active.store(last, Ordering::Relaxed);
                    restored += 1;
                }
                Err(e) => {
                    tracing::warn!(network = net.id, user_id = s.user_id, error = %e, "puppet not restored")
                }
            }
        }
        tracing::info!(network = net.id, restored, idle, "puppets restored at start-up");
    }

    /// An IRC user wrote privately to a puppet: to the DM room of that user and that nick.
    async fn irc_direct(
        self: &Arc<Self>,
        net: &Network,
        p: &Puppet,
        line: &IrcLine,
    ) -> Result<(), BridgeError> {
        let Some(nick) = line.nick() else { return Ok(()) };
        let text = line.param(1);
        let Some((msgtype, text)) = super::classify_text(&line.command, text) else {
            return Ok(());
        };
        let ghost = net.ghost_user_id(nick, self.ctx.domain());
        self.ensure_nick_ghost(net, &ghost, nick).await?;
        let remote_id = dm_remote_id(net, &p.user_id, nick);
        let room_id = match self.ctx.store().portal_by_remote(&remote_id).await? {
            Some(portal) => portal.room_id,
            None => {
                let room_id = self
                    .ctx
                    .intent(&ghost)
                    .create_room(&CreateRoom {
                        invite: vec![p.user_id.clone()],
                        is_direct: true,
                        preset: Some(RoomPreset::TrustedPrivateChat),
                        ..CreateRoom::default()
                    })
                    .await?;
                self.ctx
                    .store()
                    .upsert_portal(&Portal {
                        remote_id,
                        room_id: room_id.clone(),
                        alias: None,
                        metadata: json!({"network": net.id, "nick": nick, "user": p.user_id}),
                        created_at: now_ms(),
                    })
                    .await?;
                self.ctx.store().set_membership(&room_id, &ghost, "join").await?;
                room_id
            }
        };

        let content = self.with_irc_reply(&room_id, line, content_from_irc(msgtype, text)).await?;
        let cause = super::cause_of(net, line);
        let ts = line.tag("time").and_then(super::parse_server_time);
        let txn = self.ctx.txn_id_for(&cause, 0);
        let event_id =
            self.ctx.send_as(&ghost, &room_id, "m.room.message", content, &txn, ts).await?;
        self.map_irc_message(&room_id, line, &event_id, &ghost, 0).await?;
        Ok(())
    }

    /// An IRC user reacted (`TAGMSG`) privately to a puppet: a reaction in their DM room.
    async fn irc_direct_reaction(
        &self,
        net: &Network,
        p: &Puppet,
        line: &IrcLine,
    ) -> Result<(), BridgeError> {
        let Some(nick) = line.nick() else { return Ok(()) };
        let remote_id = dm_remote_id(net, &p.user_id, nick);
        let Some(portal) = self.ctx.store().portal_by_remote(&remote_id).await? else {
            return Ok(());
        };
        let ghost = net.ghost_user_id(nick, self.ctx.domain());
        self.irc_reaction(net, &portal.room_id, &ghost, line).await
    }

    /// A Matrix user invited a ghost: the room becomes their DM with that nick.
    pub(super) async fn matrix_direct(
        &self,
        net: &Network,
        inviter: &str,
        ghost: &str,
        nick: &str,
        room_id: &str,
    ) -> Result<(), BridgeError> {
        self.ensure_nick_ghost(net, ghost, nick).await?;
        self.ctx.intent(ghost).join(room_id).await?;
        self.ctx.store().set_membership(room_id, ghost, "join").await?;
        if net.config.mode != crate::config::BridgeMode::Puppets {
            let txn = self.ctx.txn_id_for(&format!("dm-refused:{room_id}"), 0);
            let content = json!({"msgtype": "m.notice", "body": format!(
                "Private messages need an IRC connection of your own, and {} runs in relay mode: nothing you write here reaches {nick}.",
                net.config.name
            )});
            self.ctx.send_as(ghost, room_id, "m.room.message", content, &txn, None).await?;
            return Ok(());
        }
        self.ctx
            .store()
            .upsert_portal(&Portal {
                remote_id: dm_remote_id(net, inviter, nick),
                room_id: room_id.to_owned(),
                alias: None,
                metadata: json!({"network": net.id, "nick": nick, "user": inviter}),
                created_at: now_ms(),
            })
            .await?;
        Ok(())
    }

    async fn tell(&self, p: &Puppet, text: &str) {
        if let Some(room) = p.notify_room() {
            self.ctx.notice(&room, text).await;
        }
    }
}

fn dm_remote_id(net: &Network, user_id: &str, nick: &str) -> String {
    format!("{}/dm/{user_id}/{}", net.id, net.fold(nick))
}

/// Receives one puppet's events: its nick, private messages to it, and what the server says
/// about its channels (kicks, bans, full channels) told to the user.
async fn puppet_loop(
    b: Arc<Inner>,
    net: Arc<Network>,
    p: Arc<Puppet>,
    mut events: mpsc::Receiver<ConnEvent>,
) {
    while let Some(ev) = events.recv().await {
        match ev {
            ConnEvent::Registered { nick } => {
                net.puppets.add_nick(net.fold(&nick), &p.user_id);
                if net.fold(&nick) != net.fold(&p.wanted_nick) {
                    b.tell(
                        &p,
                        &format!(
                            "{} is taken on {}; you are {nick} there.",
                            p.wanted_nick, net.config.name
                        ),
                    )
                    .await;
                }
                b.save(&net, &p).await;
            }
            ConnEvent::Disconnected { reason } => {
                tracing::info!(network = net.id, user_id = p.user_id, %reason, "puppet disconnected; reconnecting");
            }
            ConnEvent::Echo { sent, line } => b.echoed(&sent, &line).await,
            ConnEvent::Line(line) => {
                let me = p.conn.nick();
                let cm = p.conn.isupport().casemapping;
                match line.command.as_str() {
                    // Our own nick change (forced by the server, or a new displayname).
                    "NICK"
                        if line.nick().is_some_and(|n| {
                            net.puppets.user_of(&net.fold(n)).as_deref() == Some(&p.user_id)
                        }) =>
                    {
                        net.puppets.add_nick(net.fold(line.param(0)), &p.user_id);
                    }
                    "PRIVMSG" | "NOTICE" | "TAGMSG" if cm.eq(line.param(0), &me) => {
                        let from = line.nick().unwrap_or_default();
                        if from.is_empty()
                            || cm.eq(from, &net.bot.nick())
                            || net.is_puppet_nick(from)
                            || from.contains('.')
                        {
                            continue;
                        }
                        p.touch();
                        let r = if line.command == "TAGMSG" {
                            b.irc_direct_reaction(&net, &p, &line).await
                        } else {
                            b.irc_direct(&net, &p, &line).await
                        };
                        if let Err(e) = r {
                            tracing::error!(network = net.id, user_id = p.user_id, error = %e, "could not bridge a private message");
                        }
                    }
                    "KICK" if cm.eq(line.param(1), &me) => {
                        let chan = line.param(0).to_owned();
                        let _ = p.conn.part(&chan, "").await;
                        b.tell(
                            &p,
                            &format!(
                                "You were kicked from {chan} on {} by {}: {}",
                                net.config.name,
                                line.nick().unwrap_or("the server"),
                                line.param(2)
                            ),
                        )
                        .await;
                        b.save(&net, &p).await;
                    }
                    // SASL failed (wrong account or password, certificate not added to the
                    // account, nick locked): the connection goes on without the account.
                    "902" | "904" | "905" if p.sasl_external.is_some() => {
                        b.tell(
                            &p,
                            &format!(
                                "Could not log in to your account on {} with your certificate (SASL EXTERNAL): {}. Connected without it; identify to your account, add the certificate with /msg NickServ CERT ADD {} (see !certfp {}), then !reconnect {}.",
                                net.config.name,
                                line.params.last().map(String::as_str).unwrap_or(""),
                                p.sasl_external.as_deref().unwrap_or_default(),
                                net.id,
                                net.id
                            ),
                        )
                        .await;
                    }
                    "902" | "904" | "905" => {
                        b.tell(
                            &p,
                            &format!(
                                "Could not log in to your account on {} (SASL): {}. Connected without it; check the account and password stored with !storepass {} account:password, then !reconnect {}.",
                                net.config.name,
                                line.params.last().map(String::as_str).unwrap_or(""),
                                net.id,
                                net.id
                            ),
                        )
                        .await;
                    }
                    // Our own JOIN: any invite awaited for the channel has done its work.
                    "JOIN" if line.nick().is_some_and(|n| cm.eq(n, &me)) => {
                        lock(&p.awaiting_invite).remove(&net.fold(line.param(0)));
                    }
                    "INVITE" if cm.eq(line.param(0), &me) => {
                        let (chan, from) = (line.param(1), line.nick().unwrap_or_default());
                        if lock(&p.awaiting_invite).contains(&net.fold(chan))
                            && cm.eq(from, &net.bot.nick())
                        {
                            // The bot let us in: the one retry.
                            let _ = p.conn.join(chan, net.bot.key(chan).as_deref()).await;
                        } else if let Err(e) = b.irc_invite(&net, &p, from, chan).await {
                            tracing::warn!(network = net.id, user_id = p.user_id, chan, error = %e, "could not bridge an IRC invite");
                        }
                    }
                    // Invite only: the bot invites the puppet where it is a channel operator
                    // (once), else the user is told who can let them in.
                    "473" => {
                        let chan = line.param(1).to_owned();
                        let folded = net.fold(&chan);
                        if lock(&p.awaiting_invite).contains(&folded) {
                            // Another refusal of a join sent before the invite came (a
                            // reconnect's rejoin, say); the invite's timeout has the last word.
                            continue;
                        }
                        if net.can_invite(&chan) {
                            lock(&p.awaiting_invite).insert(folded.clone());
                            tracing::info!(
                                network = net.id,
                                user_id = p.user_id,
                                chan,
                                "invite-only: the bot invites the puppet"
                            );
                            let invite = IrcLine::new("INVITE", &[&me, &chan]);
                            if net.bot.send(invite).await.is_ok() {
                                tokio::spawn(invite_timeout(
                                    Arc::clone(&b),
                                    Arc::clone(&net),
                                    Arc::clone(&p),
                                    chan,
                                    me,
                                ));
                                continue;
                            }
                        }
                        lock(&p.awaiting_invite).remove(&folded);
                        b.cannot_join_invite_only(&net, &p, &chan, &me).await;
                    }
                    // Cannot join: banned, bad key, full, too many channels.
                    "471" | "474" | "475" | "405" => {
                        let chan = line.param(1).to_owned();
                        let _ = p.conn.part(&chan, "").await;
                        b.tell(
                            &p,
                            &format!(
                                "Cannot join {chan} on {}: {}",
                                net.config.name,
                                line.params.last().map(String::as_str).unwrap_or("")
                            ),
                        )
                        .await;
                        b.save(&net, &p).await;
                    }
                    _ => {}
                }
            }
        }
    }
}

/// The bot's invite did not get the puppet in within [`INVITE_WAIT`] (it lost its operator
/// status, say): the user is told as if the bot could not invite.
async fn invite_timeout(
    b: Arc<Inner>,
    net: Arc<Network>,
    p: Arc<Puppet>,
    chan: String,
    nick: String,
) {
    tokio::time::sleep(INVITE_WAIT).await;
    if lock(&p.awaiting_invite).remove(&net.fold(&chan)) {
        b.cannot_join_invite_only(&net, &p, &chan, &nick).await;
    }
}

/// How long a puppet waits for the bot's invite to an invite-only channel.
const INVITE_WAIT: Duration = Duration::from_secs(15);

/// IRC invites of one puppet become Matrix invites at most this often.
const INVITE_INTERVAL: Duration = Duration::from_secs(10);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Network {
    /// Whether the bot may invite to `channel`: it is a channel operator (or half-op) there.
    fn can_invite(&self, channel: &str) -> bool {
        self.has_mode(channel, &self.bot.nick(), &['q', 'a', 'o', 'h'])
    }
}

impl Inner {
    /// The puppet could not join an invite-only channel: it forgets the channel, and the user
    /// is told how to get in.
    async fn cannot_join_invite_only(&self, net: &Network, p: &Puppet, chan: &str, nick: &str) {
        if !p.conn.in_channel(chan) {
            // Told already (the refusal of a second JOIN of the same attempt).
            return;
        }
        let _ = p.conn.part(chan, "").await;
        self.tell(
            p,
            &format!(
                "Cannot join {chan} on {}: the channel is invite-only (+i). A channel operator there can let you in with /invite {nick} {chan}.",
                net.config.name
            ),
        )
        .await;
        self.save(net, p).await;
    }

    /// An IRC user invited a puppet to a channel: its user is invited to the channel's portal
    /// (opened if needed, as `!join` does); the puppet joins when they accept. A user in the
    /// portal already has the puppet join now.
    async fn irc_invite(
        &self,
        net: &Network,
        p: &Puppet,
        from: &str,
        chan: &str,
    ) -> Result<(), BridgeError> {
        if !super::valid_channel(chan) || !net.is_channel(chan) {
            return Ok(());
        }
        let existing = self.ctx.store().portal_by_remote(&net.portal_id(chan)).await?;
        let joined = match &existing {
            Some(portal) => self.ctx.store().membership(&portal.room_id, &p.user_id).await?,
            None => None,
        };
        if joined.as_deref() != Some("join") {
            let mut last = lock(&p.last_invite);
            if last.is_some_and(|t| t.elapsed() < INVITE_INTERVAL) {
                tracing::debug!(
                    network = net.id,
                    user_id = p.user_id,
                    chan,
                    from,
                    "IRC invite dropped (too many)"
                );
                return Ok(());
            }
            *last = Some(std::time::Instant::now());
        }
        let portal = match existing {
            Some(portal) => portal,
            None if net.config.dynamic_channels => {
                let alias = self.alias_for(net, chan);
                self.open_portal(net, chan, alias.as_deref(), None).await?.0
            }
            None => {
                self.tell(
                    p,
                    &format!(
                        "{from} invited you to {chan} on {}, which this bridge does not bridge.",
                        net.config.name
                    ),
                )
                .await;
                return Ok(());
            }
        };
        if joined.as_deref() == Some("join") {
            if !p.conn.in_channel(chan) {
                p.set_notify_room(&portal.room_id);
                if p.conn.channels().len() >= net.config.max_channels_per_user as usize {
                    self.tell(
                        p,
                        &format!(
                            "{from} invited you to {chan}, but your IRC connection is in {} channels already, the most allowed.",
                            net.config.max_channels_per_user
                        ),
                    )
                    .await;
                    return Ok(());
                }
                p.conn.join(chan, net.bot.key(chan).as_deref()).await.map_err(bridge_err)?;
                self.save(net, p).await;
            }
            return Ok(());
        }
        let reason = crate::conn::line::one_line(&crate::format::strip_codes(&format!(
            "{from} invited you to {chan} on {}",
            net.config.name
        )));
        self.ctx.bot().invite_with_reason(&portal.room_id, &p.user_id, Some(&reason)).await?;
        tracing::info!(network = net.id, user_id = p.user_id, chan, from, "IRC invite bridged");
        Ok(())
    }
}

/// Every minute, quits idle puppets.
pub(super) async fn reaper(b: Arc<Inner>, net: Arc<Network>) {
    let shutdown = b.ctx.shutdown().clone();
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(60)) => b.reap_idle(&net).await,
            () = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idents() {
        assert_eq!(ident_for("@Alice.Smith-99:example.org"), "alicesmith");
        assert_eq!(ident_for("@_:x"), "matrix");
        assert_eq!(ident_for("@a\r\nb:x"), "ab");
    }
}
