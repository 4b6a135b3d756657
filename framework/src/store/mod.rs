//! Persistence: the [`Store`] trait every backend implements, and the SQLite backend.
//!
//! The framework owns these tables for every bridge: inbound transactions (the durable queue),
//! dead letters, portals, ghosts, per-user settings (with encrypted secrets), the message mapping,
//! a key-value table, and the membership / power-level / registration caches of the homeserver
//! client. A backend proves itself with [`store_conformance_tests!`](crate::store_conformance_tests).

mod cache;
mod conformance;
mod secret;
mod sqlite;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub use cache::StoreCache;
pub use secret::{SecretBox, SecretError};
pub use sqlite::SqliteStore;

/// An error of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database reported an error.
    #[error("database error: {0}")]
    Database(#[from] rusqlite::Error),
    /// A stored value could not be decoded.
    #[error("corrupt stored value in {what}: {source}")]
    Corrupt {
        /// Which value.
        what: &'static str,
        /// The decoding error.
        source: serde_json::Error,
    },
    /// A migration failed.
    #[error("migration {version} failed: {source}")]
    Migration {
        /// The migration number.
        version: u32,
        /// The database error.
        source: rusqlite::Error,
    },
    /// The database was written by a newer version of Trestle.
    #[error("database schema version {found} is newer than this build supports ({supported})")]
    TooNew {
        /// Version found in the file.
        found: u32,
        /// Latest version known to this build.
        supported: u32,
    },
    /// The blocking database task panicked or was cancelled.
    #[error("database task failed: {0}")]
    Task(String),
    /// Encrypting or decrypting a secret failed.
    #[error(transparent)]
    Secret(#[from] SecretError),
}

/// A transaction that was received but whose events are not all handled yet.
#[derive(Debug, Clone)]
pub struct PendingTransaction {
    /// The homeserver's transaction id.
    pub txn_id: String,
    /// The raw JSON body, as received.
    pub body: Bytes,
    /// Indexes (into the combined event list, see [`crate::inbound`]) already handled.
    pub done: Vec<u32>,
}

/// An event that could not be handled after every retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Transaction the event came in.
    pub txn_id: String,
    /// Its index in the transaction.
    pub idx: u32,
    /// The ordering lane (room id, or a global lane).
    pub lane: String,
    /// The event id, where the event has one.
    pub event_id: Option<String>,
    /// The event type.
    pub event_type: String,
    /// The raw event JSON.
    pub payload: String,
    /// The last error.
    pub error: String,
    /// How many attempts were made.
    pub attempts: u32,
    /// When it was given up on (ms since the epoch).
    pub failed_at: i64,
}

/// A portal: a remote room (channel, chat, conversation) linked to a Matrix room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Portal {
    /// The bridge's key for the remote room, e.g. `libera/#rust`.
    pub remote_id: String,
    /// The Matrix room id.
    pub room_id: String,
    /// The canonical alias, where the portal has one.
    pub alias: Option<String>,
    /// Bridge-specific data.
    pub metadata: serde_json::Value,
    /// When the portal was created (ms since the epoch).
    pub created_at: i64,
}

/// A ghost: a remote user represented by a Matrix user in the bridge's namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ghost {
    /// The bridge's key for the remote user, e.g. `libera/alice`.
    pub remote_id: String,
    /// The Matrix user id.
    pub user_id: String,
    /// The last displayname set on Matrix.
    pub displayname: Option<String>,
    /// The last avatar set on Matrix.
    pub avatar_url: Option<String>,
    /// Bridge-specific data.
    pub metadata: serde_json::Value,
}

/// A Matrix user's settings for one network (puppet configuration, credentials).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSettings {
    /// The Matrix user.
    pub user_id: String,
    /// The network (bridge-defined).
    pub network: String,
    /// Non-secret settings.
    pub settings: serde_json::Value,
    /// Encrypted secret (see [`SecretBox`]), never stored in clear.
    pub secret: Option<Vec<u8>>,
}

/// One part of a remote message mapped to a Matrix event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageMapping {
    /// The Matrix room (mappings are scoped per room).
    pub room_id: String,
    /// The remote message id.
    pub remote_id: String,
    /// The part, when one remote message became several events (or the reverse).
    pub part: u32,
    /// The Matrix event id.
    pub event_id: String,
    /// Who sent it (Matrix user id).
    pub sender: String,
    /// When (ms since the epoch).
    pub timestamp: i64,
}

impl MessageMapping {
    /// A mapping of remote message `remote_id` (part `part`) to `event_id` in `room_id`, sent by
    /// `sender`, made now.
    pub fn now(room_id: &str, remote_id: &str, part: u32, event_id: &str, sender: &str) -> Self {
        let timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        Self {
            room_id: room_id.to_owned(),
            remote_id: remote_id.to_owned(),
            part,
            event_id: event_id.to_owned(),
            sender: sender.to_owned(),
            timestamp,
        }
    }
}

/// The storage a bridge and the framework share.
///
/// Every method is safe to call concurrently. Implementations must keep blocking work off the
/// async runtime.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    // --- inbound queue -------------------------------------------------------------------
    /// Persists a transaction. Returns `false` if the id was seen before (nothing is written).
    async fn insert_transaction(&self, txn_id: &str, body: Bytes) -> Result<bool, StoreError>;
    /// Transactions with events still to handle, oldest first.
    async fn pending_transactions(&self) -> Result<Vec<PendingTransaction>, StoreError>;
    /// Records events as handled.
    async fn mark_done(&self, events: &[(String, u32)]) -> Result<(), StoreError>;
    /// Marks a whole transaction as handled: its body and progress rows are dropped, its id kept.
    async fn complete_transaction(&self, txn_id: &str) -> Result<(), StoreError>;
    /// Forgets completed transaction ids received before `before_ms`, always keeping the newest
    /// `keep` ids. Returns how many were removed.
    async fn prune_transactions(&self, before_ms: i64, keep: u32) -> Result<usize, StoreError>;
    /// Records an event that failed every attempt.
    async fn add_dead_letter(&self, letter: &DeadLetter) -> Result<(), StoreError>;
    /// The newest dead letters.
    async fn dead_letters(&self, limit: u32) -> Result<Vec<DeadLetter>, StoreError>;

    // --- portals -------------------------------------------------------------------------
    /// Creates or replaces a portal.
    async fn upsert_portal(&self, portal: &Portal) -> Result<(), StoreError>;
    /// Looks a portal up by its remote id.
    async fn portal_by_remote(&self, remote_id: &str) -> Result<Option<Portal>, StoreError>;
    /// Looks a portal up by its Matrix room.
    async fn portal_by_room(&self, room_id: &str) -> Result<Option<Portal>, StoreError>;
    /// Removes a portal (by remote id).
    async fn delete_portal(&self, remote_id: &str) -> Result<(), StoreError>;
    /// All portals.
    async fn portals(&self) -> Result<Vec<Portal>, StoreError>;

    // --- ghosts --------------------------------------------------------------------------
    /// Creates or replaces a ghost.
    async fn upsert_ghost(&self, ghost: &Ghost) -> Result<(), StoreError>;
    /// Looks a ghost up by its remote id.
    async fn ghost_by_remote(&self, remote_id: &str) -> Result<Option<Ghost>, StoreError>;
    /// Looks a ghost up by its Matrix user id.
    async fn ghost_by_user(&self, user_id: &str) -> Result<Option<Ghost>, StoreError>;

    // --- user settings -------------------------------------------------------------------
    /// A user's settings for a network.
    async fn user_settings(
        &self,
        user_id: &str,
        network: &str,
    ) -> Result<Option<UserSettings>, StoreError>;
    /// Creates or replaces a user's settings for a network.
    async fn set_user_settings(&self, settings: &UserSettings) -> Result<(), StoreError>;
    /// Removes a user's settings for a network.
    async fn delete_user_settings(&self, user_id: &str, network: &str) -> Result<(), StoreError>;
    /// Every user with settings for a network.
    async fn users_with_settings(&self, network: &str) -> Result<Vec<UserSettings>, StoreError>;

    // --- message mapping -----------------------------------------------------------------
    /// Records a mapping (replacing the same room/remote id/part).
    async fn insert_message(&self, mapping: &MessageMapping) -> Result<(), StoreError>;
    /// Parts of a remote message in a room, in part order.
    async fn messages_by_remote(
        &self,
        room_id: &str,
        remote_id: &str,
    ) -> Result<Vec<MessageMapping>, StoreError>;
    /// The mapping of a Matrix event in a room.
    async fn message_by_event(
        &self,
        room_id: &str,
        event_id: &str,
    ) -> Result<Option<MessageMapping>, StoreError>;
    /// Every mapping of a Matrix event in a room (an event sent as several remote messages,
    /// such as a long text split into lines), in part order.
    async fn messages_by_event(
        &self,
        room_id: &str,
        event_id: &str,
    ) -> Result<Vec<MessageMapping>, StoreError>;
    /// Removes every part of a remote message in a room.
    async fn delete_messages(&self, room_id: &str, remote_id: &str) -> Result<(), StoreError>;

    // --- key-value -----------------------------------------------------------------------
    /// Reads a value.
    async fn kv_get(&self, key: &str) -> Result<Option<String>, StoreError>;
    /// Writes a value.
    async fn kv_set(&self, key: &str, value: &str) -> Result<(), StoreError>;
    /// Deletes a value.
    async fn kv_delete(&self, key: &str) -> Result<(), StoreError>;

    // --- homeserver caches ---------------------------------------------------------------
    /// Whether the user was registered on the homeserver.
    async fn is_registered(&self, user_id: &str) -> Result<bool, StoreError>;
    /// Records that the user is registered.
    async fn mark_registered(&self, user_id: &str) -> Result<(), StoreError>;
    /// A cached membership (`join`, `invite`, `leave`, `ban`, `knock`).
    async fn membership(&self, room_id: &str, user_id: &str) -> Result<Option<String>, StoreError>;
    /// Caches a membership.
    async fn set_membership(
        &self,
        room_id: &str,
        user_id: &str,
        membership: &str,
    ) -> Result<(), StoreError>;
    /// Members of a room with the given membership.
    async fn members(&self, room_id: &str, membership: &str) -> Result<Vec<String>, StoreError>;
    /// Cached power-level content of a room.
    async fn power_levels(&self, room_id: &str) -> Result<Option<serde_json::Value>, StoreError>;
    /// Caches power-level content of a room.
    async fn set_power_levels(
        &self,
        room_id: &str,
        content: &serde_json::Value,
    ) -> Result<(), StoreError>;
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
