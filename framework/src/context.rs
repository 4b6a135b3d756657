//! The context a bridge receives: config, store, intents, metrics, shutdown, and the helpers
//! for ghosts and portals.

use std::sync::Arc;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::{
    bridge::{BridgeError, BridgeInfo, GhostProfile, PortalSpec},
    client::{CreateRoom, HomeserverClient, InitialStateEvent, Intent, RoomPreset},
    config::{Config, PermissionLevel},
    metrics::Metrics,
    registration::{NamespaceMatcher, Registration},
    store::{Ghost, Portal, SecretBox, Store, now_ms},
    util::bridge_info::{
        BridgeInfo as BridgeInfoContent, BridgeInfoSection, M_BRIDGE, UK_HALF_SHOT_BRIDGE,
    },
};

/// Everything a bridge needs from the framework. Cheap to clone.
#[derive(Debug)]
pub struct Context<C> {
    inner: Arc<Inner<C>>,
}

impl<C> Clone for Context<C> {
    fn clone(&self) -> Self {
        Self { inner: Arc::clone(&self.inner) }
    }
}

#[derive(Debug)]
struct Inner<C> {
    config: Config<C>,
    info: BridgeInfo,
    registration: Registration,
    matcher: NamespaceMatcher,
    client: HomeserverClient,
    store: Arc<dyn Store>,
    metrics: Metrics,
    shutdown: CancellationToken,
    secrets: SecretBox,
    media: crate::media::MediaSigner,
    /// Serializes portal creation per remote id, so two queries never create two rooms.
    portal_locks: crate::util::keyed::KeyedLocks,
    /// One profile update at a time per ghost (the stored profile is read, then written).
    ghost_locks: crate::util::keyed::KeyedLocks,
}

impl<C: Send + Sync + 'static> Context<C> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        config: Config<C>,
        info: BridgeInfo,
        registration: Registration,
        matcher: NamespaceMatcher,
        client: HomeserverClient,
        store: Arc<dyn Store>,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> Self {
        let secrets = SecretBox::new(config.database.secret_key.as_deref());
        let media = crate::media::MediaSigner::new(&config.media_proxy, &registration.as_token);
        Self {
            inner: Arc::new(Inner {
                config,
                info,
                registration,
                matcher,
                client,
                store,
                metrics,
                shutdown,
                secrets,
                media,
                portal_locks: Default::default(),
                ghost_locks: Default::default(),
            }),
        }
    }

    /// The whole config (`config().bridge` is the bridge's own section).
    pub fn config(&self) -> &Config<C> {
        &self.inner.config
    }

    /// The server name.
    pub fn domain(&self) -> &str {
        &self.inner.config.homeserver.domain
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// The homeserver client.
    pub fn client(&self) -> &HomeserverClient {
        &self.inner.client
    }

    /// The bot's intent.
    pub fn bot(&self) -> Intent {
        self.inner.client.bot()
    }

    /// The bot's user id.
    pub fn bot_user_id(&self) -> String {
        self.inner.config.bot_user_id()
    }

    /// An intent for any user in the namespace.
    pub fn intent(&self, user_id: &str) -> Intent {
        self.inner.client.intent(user_id)
    }

    /// Metrics (register the bridge's own on `metrics().registry()`).
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Cancelled when the bridge shuts down.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    /// Seals and opens secrets stored at rest.
    pub fn secrets(&self) -> &SecretBox {
        &self.inner.secrets
    }

    /// A signed, expiring public link to Matrix media (`media_proxy.public_url` must be set).
    pub fn media_link(
        &self,
        mxc: &str,
        filename: &str,
    ) -> Result<String, crate::media::MediaLinkError> {
        self.inner.media.link(mxc, filename, crate::media::now_secs())
    }

    /// The media link signer (the runtime serves the links with it).
    pub fn media_signer(&self) -> &crate::media::MediaSigner {
        &self.inner.media
    }

    /// The registration (namespaces, tokens).
    pub fn registration(&self) -> &Registration {
        &self.inner.registration
    }

    /// Whether a user id belongs to this bridge (bot or ghost).
    pub fn is_bridge_user(&self, user_id: &str) -> bool {
        user_id == self.bot_user_id() || self.inner.matcher.is_user(user_id)
    }

    /// Whether an alias is in the bridge's namespace.
    pub fn is_bridge_alias(&self, alias: &str) -> bool {
        self.inner.matcher.is_alias(alias)
    }

    /// A user's permission level.
    pub fn permission(&self, user_id: &str) -> PermissionLevel {
        self.inner.config.permission_for(user_id)
    }

    /// A deterministic transaction id for the `part`-th Matrix event sent because of `cause`
    /// (an inbound event id or a remote message id): a repeat after a crash is deduplicated by
    /// the homeserver.
    pub fn txn_id_for(&self, cause: &str, part: u32) -> String {
        let digest = Sha256::digest(format!("{cause}\u{0}{part}").as_bytes());
        format!("trestle.{}", hex::encode(&digest[..16]))
    }

    /// The intent of the ghost `user_id`, registered, with its profile up to date and recorded.
    /// Profile calls are made only when the stored profile differs. Calls for one ghost run
    /// one at a time, so concurrent updates (a displayname and an avatar fetched apart) do not
    /// undo each other in the store.
    pub async fn ensure_ghost(
        &self,
        user_id: &str,
        profile: &GhostProfile,
    ) -> Result<Intent, BridgeError> {
        let _one_at_a_time = self.inner.ghost_locks.lock(user_id).await;
        let intent = self.intent(user_id);
        intent.ensure_registered().await?;
        let stored = self.inner.store.ghost_by_user(user_id).await?;
        let (old_name, old_avatar) = stored
            .as_ref()
            .map(|g| (g.displayname.clone(), g.avatar_url.clone()))
            .unwrap_or_default();
        if let Some(name) = profile.displayname.as_ref().filter(|n| Some(*n) != old_name.as_ref()) {
            intent.set_displayname(name).await?;
        }
        if let Some(url) = profile.avatar_url.as_ref().filter(|u| Some(*u) != old_avatar.as_ref()) {
            intent.set_avatar_url(url).await?;
        }
        let ghost = Ghost {
            remote_id: profile.remote_id.clone(),
            user_id: user_id.to_owned(),
            displayname: profile.displayname.clone().or(old_name),
            avatar_url: profile.avatar_url.clone().or(old_avatar),
            metadata: stored.map(|g| g.metadata).unwrap_or_else(|| json!({})),
        };
        self.inner.store.upsert_ghost(&ghost).await?;
        Ok(intent)
    }

    /// The portal for `spec.remote_id`, creating the Matrix room (with `alias`, if given) when
    /// there is none. The room gets `m.bridge` and `uk.half-shot.bridge` state.
    pub async fn ensure_portal(
        &self,
        spec: &PortalSpec,
        alias: Option<&str>,
    ) -> Result<(Portal, bool), BridgeError> {
        let _one_at_a_time = self.inner.portal_locks.lock(&spec.remote_id).await;
        if let Some(p) = self.inner.store.portal_by_remote(&spec.remote_id).await? {
            return Ok((p, false));
        }
        let bot = self.bot();
        bot.ensure_registered().await?;
        let alias_localpart = alias
            .and_then(|a| a.strip_prefix('#'))
            .and_then(|a| a.rsplit_once(':'))
            .map(|(lp, _)| lp.to_owned());
        let info = self.bridge_info_content(spec);
        let state_key = info.state_key();
        let content =
            serde_json::to_value(&info).map_err(|e| BridgeError::Permanent(e.to_string()))?;
        let mut users = serde_json::Map::new();
        for (u, l) in &spec.power_levels {
            users.insert(u.clone(), json!(l));
        }
        let create = CreateRoom {
            name: spec.name.clone(),
            topic: spec.topic.clone(),
            alias_localpart,
            invite: spec.invite.clone(),
            is_direct: spec.is_direct,
            preset: Some(if spec.public {
                RoomPreset::PublicChat
            } else {
                RoomPreset::PrivateChat
            }),
            visibility: None,
            initial_state: vec![
                InitialStateEvent {
                    event_type: M_BRIDGE.to_owned(),
                    state_key: state_key.clone(),
                    content: content.clone(),
                },
                InitialStateEvent {
                    event_type: UK_HALF_SHOT_BRIDGE.to_owned(),
                    state_key,
                    content,
                },
            ],
            power_level_content_override: (!users.is_empty()).then(|| json!({"users": users})),
            ..CreateRoom::default()
        };
        let room_id = bot.create_room(&create).await?;
        let portal = Portal {
            remote_id: spec.remote_id.clone(),
            room_id,
            alias: alias.map(str::to_owned),
            metadata: spec.metadata.clone(),
            created_at: now_ms(),
        };
        self.inner.store.upsert_portal(&portal).await?;
        self.inner.store.set_membership(&portal.room_id, &self.bot_user_id(), "join").await?;
        tracing::info!(remote_id = portal.remote_id, room_id = portal.room_id, "created portal");
        Ok((portal, true))
    }

    /// The `m.bridge` content for a portal.
    pub fn bridge_info_content(&self, spec: &PortalSpec) -> BridgeInfoContent {
        let info = &self.inner.info;
        BridgeInfoContent {
            bridgebot: self.bot_user_id(),
            creator: None,
            protocol: BridgeInfoSection {
                id: info.name.to_owned(),
                displayname: Some(info.network_name.to_owned()),
                avatar_url: None,
                external_url: None,
            },
            network: spec.network.as_ref().map(|(id, name)| BridgeInfoSection {
                id: id.clone(),
                displayname: Some(name.clone()),
                avatar_url: None,
                external_url: None,
            }),
            channel: BridgeInfoSection {
                id: spec.channel_id.clone(),
                displayname: spec.channel_name.clone(),
                avatar_url: None,
                external_url: None,
            },
        }
    }

    /// Whether `user_id` administers `room_id`: a creator of a room whose version gives
    /// creators unlimited power (v12 and later), or a user whose power level reaches what
    /// changing the room's power levels takes (`events["m.room.power_levels"]`, else
    /// `state_default`). Read by the bot, which must be able to see the room's state (be in
    /// it). Used to let a room's own admins plumb and unlink it.
    pub async fn is_room_admin(&self, room_id: &str, user_id: &str) -> Result<bool, BridgeError> {
        let bot = self.bot();
        if bot.is_room_creator(room_id, user_id).await? {
            return Ok(true);
        }
        let pl = bot.power_levels(room_id).await?;
        Ok(room_admin_in(&pl, user_id))
    }

    /// For plumbing an existing room: the bot joins `room_id` (it must be invited, or the room
    /// public), then checks that `user_id` administers it (see [`Self::is_room_admin`]); when
    /// they do not, or it cannot tell, the bot leaves again (unless it was in the room before)
    /// and the error says why.
    pub async fn join_room_administered_by(
        &self,
        room_id: &str,
        user_id: &str,
    ) -> Result<(), BridgeError> {
        let bot = self.bot();
        let was_in = self.inner.store.membership(room_id, &self.bot_user_id()).await?.as_deref()
            == Some("join");
        bot.join(room_id).await.map_err(|e| {
            BridgeError::Permanent(format!("the bot cannot join {room_id} (invite it first): {e}"))
        })?;
        let refusal = match self.is_room_admin(room_id, user_id).await {
            Ok(true) => return Ok(()),
            Ok(false) => format!("only an admin of {room_id} may do that"),
            Err(e) => format!("cannot read the power levels of {room_id}: {e}"),
        };
        if !was_in {
            let _ = bot.leave(room_id).await;
        }
        Err(BridgeError::Permanent(refusal))
    }

    /// Sends a notice from the bot (best effort: failures are logged).
    pub async fn notice(&self, room_id: &str, text: &str) {
        let content = json!({"msgtype": "m.notice", "body": text});
        if let Err(e) = self.bot().send_message(room_id, content).await {
            tracing::warn!(room_id, error = %e, "could not send notice");
        }
    }

    /// Sends `content` as `user_id` into `room_id`, joining first if needed, with transaction id
    /// `txn_id` (use [`txn_id_for`](Self::txn_id_for)) and an optional remote timestamp (`ts`, ms).
    pub async fn send_as(
        &self,
        user_id: &str,
        room_id: &str,
        event_type: &str,
        content: Value,
        txn_id: &str,
        ts: Option<u64>,
    ) -> Result<String, BridgeError> {
        let intent = self.intent(user_id);
        intent.ensure_joined(room_id).await?;
        Ok(intent.send_event_with_txn(room_id, event_type, content, txn_id, ts).await?)
    }
}

/// Whether `user_id`'s level in the power levels content `pl` reaches the level needed to
/// change the power levels (see [`Context::is_room_admin`]).
fn room_admin_in(pl: &Value, user_id: &str) -> bool {
    let int = |v: &Value| v.as_i64().or_else(|| v.as_str().and_then(|s| s.parse().ok()));
    let level = pl["users"].get(user_id).and_then(int).or_else(|| int(&pl["users_default"]));
    let needed = pl["events"]
        .get("m.room.power_levels")
        .and_then(int)
        .or_else(|| int(&pl["state_default"]))
        .unwrap_or(50);
    level.unwrap_or(0) >= needed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_admins_are_those_who_may_change_power_levels() {
        let pl = json!({
            "users": {"@admin:x": 100, "@mod:x": 50, "@str:x": "100"},
            "users_default": 0,
            "events": {"m.room.power_levels": 100},
            "state_default": 50,
        });
        assert!(room_admin_in(&pl, "@admin:x"));
        assert!(!room_admin_in(&pl, "@mod:x"));
        assert!(!room_admin_in(&pl, "@nobody:x"));
        assert!(room_admin_in(&pl, "@str:x"));
        // Without an entry for the power levels event, `state_default` decides.
        let pl = json!({"users": {"@mod:x": 50}, "state_default": 50});
        assert!(room_admin_in(&pl, "@mod:x"));
    }
}
