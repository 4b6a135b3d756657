//! The seam: what a bridge implements. Everything else — HTTP, persistence, ordering, retries,
//! registration, intents, metrics — is the framework's.
//!
//! A bridge implements [`Bridge`]. Every event method has a default that ignores the event, so a
//! bridge implements only what its network supports. Optional capabilities are separate traits
//! ([`ThirdPartyLookup`]) returned from `Bridge::third_party`.
//!
//! Contract common to the event methods:
//! - they are called for one room strictly in order, never concurrently for the same room; rooms
//!   run in parallel;
//! - events sent by the bridge's own users (bot and ghosts) are never delivered (echo suppression);
//! - returning `Err` with a retryable error retries the event with backoff; after
//!   `queue.max_attempts` it goes to the dead-letter table and the room gets a notice;
//! - an event may, rarely, be delivered again after a crash: send to Matrix with
//!   [`Context::txn_id_for`] so that a repeat is deduplicated by the homeserver;
//! - they should not block for long: the room's next event waits.

use async_trait::async_trait;
use serde_json::Value;

use crate::{
    client::ClientError,
    commands::CommandRegistry,
    config::{BridgeConfig, Config},
    context::Context,
    event::{EphemeralEvent, MatrixEvent, Message},
    registration::Namespaces,
    store::{Portal, StoreError},
};

/// An error a bridge returns from an event or query method.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// A temporary failure: the event is retried with backoff.
    #[error("{0}")]
    Retryable(String),
    /// A failure that retrying cannot fix: the event goes to the dead-letter table at once.
    #[error("{0}")]
    Permanent(String),
    /// A homeserver request failed (retried when the failure is transient).
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The store failed (retried).
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl BridgeError {
    /// Whether another attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Retryable(_) | Self::Store(_) => true,
            Self::Permanent(_) => false,
            Self::Client(e) => !matches!(e.retry_kind(), crate::client::RetryKind::Permanent),
        }
    }
}

/// How many times [`retry_remote`] tries.
const REMOTE_ATTEMPTS: u64 = 3;

/// Handles one event from the remote network, which has no queue of the framework's behind it:
/// `handle` is tried up to three times while it fails with a retryable error (half a second, then
/// a second between tries, so the network's next events wait only briefly). The last error is
/// returned for the caller to report.
pub async fn retry_remote<F, Fut>(mut handle: F) -> Result<(), BridgeError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), BridgeError>>,
{
    let mut attempt = 1;
    loop {
        match handle().await {
            Err(e) if attempt < REMOTE_ATTEMPTS && e.is_retryable() => {
                tracing::warn!(error = %e, attempt, "handling a remote event failed; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(500 * attempt)).await;
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// Static facts about a bridge.
#[derive(Debug, Clone)]
pub struct BridgeInfo {
    /// Short lowercase name (`irc`): default ids, file names, the `m.bridge` protocol id.
    pub name: &'static str,
    /// Human name of the network (`IRC`).
    pub network_name: &'static str,
    /// Default port in the example config.
    pub default_port: u16,
    /// Third-party protocol ids served (for the registration's `protocols`).
    pub protocols: &'static [&'static str],
    /// The bridge's version.
    pub version: &'static str,
}

/// What the framework needs to create a ghost after a user query.
#[derive(Debug, Clone, Default)]
pub struct GhostProfile {
    /// The bridge's key for the remote user.
    pub remote_id: String,
    /// Displayname to set.
    pub displayname: Option<String>,
    /// Avatar (mxc URI) to set.
    pub avatar_url: Option<String>,
}

/// What the framework needs to create a portal room.
#[derive(Debug, Clone)]
pub struct PortalSpec {
    /// The bridge's key for the remote room.
    pub remote_id: String,
    /// Room name.
    pub name: Option<String>,
    /// Room topic.
    pub topic: Option<String>,
    /// Whether anyone may join (public join rule and listed in the appservice directory).
    pub public: bool,
    /// Users to invite at creation.
    pub invite: Vec<String>,
    /// Whether this is a direct chat.
    pub is_direct: bool,
    /// The `m.bridge` channel section: id and displayname of the remote room.
    pub channel_id: String,
    /// Displayname of the remote room in `m.bridge`.
    pub channel_name: Option<String>,
    /// The `m.bridge` network section, for bridges with several networks.
    pub network: Option<(String, String)>,
    /// Bridge-specific data stored with the portal.
    pub metadata: Value,
    /// Extra power levels (user id → level); the creator is never listed (room v12).
    pub power_levels: Vec<(String, i64)>,
}

impl PortalSpec {
    /// A spec with defaults: private, not direct, no extras.
    pub fn new(remote_id: impl Into<String>, channel_id: impl Into<String>) -> Self {
        Self {
            remote_id: remote_id.into(),
            name: None,
            topic: None,
            public: false,
            invite: Vec::new(),
            is_direct: false,
            channel_id: channel_id.into(),
            channel_name: None,
            network: None,
            metadata: Value::Object(Default::default()),
            power_levels: Vec::new(),
        }
    }
}

/// Where a room event happened, as the framework knows it.
#[derive(Debug, Clone)]
pub struct RoomContext {
    /// The portal, if the room is one.
    pub portal: Option<Portal>,
    /// Whether the room is the sender's admin room with the bot.
    pub is_admin_room: bool,
}

/// The contract of a bridge.
#[async_trait]
pub trait Bridge: Sized + Send + Sync + 'static {
    /// The `bridge:` section of the config.
    type Config: BridgeConfig;

    /// Static facts.
    fn info() -> BridgeInfo;

    /// The namespaces to claim in the registration (users, aliases, rooms). Must cover every
    /// ghost and portal alias the bridge will create.
    fn namespaces(config: &Config<Self::Config>) -> Namespaces;

    /// Builds the bridge. Called once, before any event is delivered and before the listener
    /// opens. Should return quickly: start network connections in background tasks.
    async fn start(ctx: Context<Self::Config>) -> Result<Self, BridgeError>;

    /// Called on shutdown, after the inbound queue stopped. Close network connections here.
    async fn stop(&self) {}

    /// Registers the bot's commands (the framework adds `help`).
    fn commands(&self, _registry: &mut CommandRegistry<Self>) {}

    /// The homeserver asks whether `user_id` (in the namespace) exists. Return a profile to
    /// create the ghost, or `None` if the user does not exist.
    async fn query_user(&self, _user_id: &str) -> Result<Option<GhostProfile>, BridgeError> {
        Ok(None)
    }

    /// The homeserver asks whether `alias` (in the namespace) exists. Return a spec to create
    /// the portal room with that alias, or `None`.
    async fn query_alias(&self, _alias: &str) -> Result<Option<PortalSpec>, BridgeError> {
        Ok(None)
    }

    /// A portal was created (after an alias query or [`Context::ensure_portal`]). Sync members
    /// here; long work belongs in a spawned task.
    async fn portal_created(&self, _portal: &Portal) -> Result<(), BridgeError> {
        Ok(())
    }

    /// A message from a Matrix user.
    async fn on_message(
        &self,
        _room: &RoomContext,
        _event: &MatrixEvent,
        _message: &Message,
    ) -> Result<(), BridgeError> {
        Ok(())
    }

    /// An edit of `target` by a Matrix user.
    async fn on_edit(
        &self,
        _room: &RoomContext,
        _event: &MatrixEvent,
        _target: &str,
        _new: &Message,
    ) -> Result<(), BridgeError> {
        Ok(())
    }

    /// A reaction.
    async fn on_reaction(
        &self,
        _room: &RoomContext,
        _event: &MatrixEvent,
        _target: &str,
        _key: &str,
    ) -> Result<(), BridgeError> {
        Ok(())
    }

    /// A redaction.
    async fn on_redaction(
        &self,
        _room: &RoomContext,
        _event: &MatrixEvent,
        _target: &str,
        _reason: Option<&str>,
    ) -> Result<(), BridgeError> {
        Ok(())
    }

    /// A membership change (join, leave, invite, kick, ban), including invites of ghosts by
    /// Matrix users (that is how DMs start).
    async fn on_membership(
        &self,
        _room: &RoomContext,
        _event: &MatrixEvent,
        _user_id: &str,
        _membership: &str,
        _prev_membership: Option<&str>,
    ) -> Result<(), BridgeError> {
        Ok(())
    }

    /// A name, topic, avatar, power-level or other state change.
    async fn on_room_state(
        &self,
        _room: &RoomContext,
        _event: &MatrixEvent,
    ) -> Result<(), BridgeError> {
        Ok(())
    }

    /// Typing, receipts and presence (receipts and presence only of Matrix users, not ghosts;
    /// typing always, as the room's full list, which may be empty or hold only ghosts when a
    /// Matrix user stops typing).
    async fn on_ephemeral(&self, _event: &EphemeralEvent) -> Result<(), BridgeError> {
        Ok(())
    }

    /// To-device events (MSC4203), kept for encryption support.
    async fn on_to_device(&self, _event: &Value) -> Result<(), BridgeError> {
        Ok(())
    }

    /// Third-party lookups, if the bridge provides them.
    fn third_party(&self) -> Option<&dyn ThirdPartyLookup> {
        None
    }
}

/// Optional capability: third-party network lookups (`/thirdparty/*`).
#[async_trait]
pub trait ThirdPartyLookup: Send + Sync {
    /// Protocol metadata (`user_fields`, `location_fields`, `icon`, `field_types`, `instances`)
    /// for a protocol id, or `None` if unknown.
    async fn protocol(&self, protocol: &str) -> Result<Option<Value>, BridgeError>;
    /// Users matching `fields` (`[{userid, protocol, fields}]`); `protocol` is `None` for a
    /// reverse lookup by `userid`.
    async fn users(
        &self,
        protocol: Option<&str>,
        fields: &std::collections::BTreeMap<String, String>,
    ) -> Result<Vec<Value>, BridgeError>;
    /// Locations matching `fields` (`[{alias, protocol, fields}]`); `protocol` is `None` for a
    /// reverse lookup by `alias`.
    async fn locations(
        &self,
        protocol: Option<&str>,
        fields: &std::collections::BTreeMap<String, String>,
    ) -> Result<Vec<Value>, BridgeError>;
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test]
    async fn remote_events_are_retried_only_while_retrying_can_help() {
        let tries = AtomicU32::new(0);
        let r = retry_remote(|| async {
            tries.fetch_add(1, Ordering::Relaxed);
            Err(BridgeError::Retryable("busy".into()))
        })
        .await;
        assert!(matches!(r, Err(BridgeError::Retryable(_))));
        assert_eq!(tries.load(Ordering::Relaxed), 3);

        tries.store(0, Ordering::Relaxed);
        let r = retry_remote(|| async {
            tries.fetch_add(1, Ordering::Relaxed);
            Err(BridgeError::Permanent("bad".into()))
        })
        .await;
        assert!(matches!(r, Err(BridgeError::Permanent(_))));
        assert_eq!(tries.load(Ordering::Relaxed), 1);

        tries.store(0, Ordering::Relaxed);
        let r = retry_remote(|| async {
            let n = tries.fetch_add(1, Ordering::Relaxed);
            if n == 0 { Err(BridgeError::Retryable("once".into())) } else { Ok(()) }
        })
        .await;
        assert!(r.is_ok());
        assert_eq!(tries.load(Ordering::Relaxed), 2);
    }
}
