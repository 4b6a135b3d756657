//! The membership / registration / power-level cache used by intents.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    str::FromStr,
    sync::Mutex,
};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::error::CacheError;

/// A room membership state (`m.room.member` `membership`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Membership {
    /// `join`
    Join,
    /// `invite`
    Invite,
    /// `leave`
    Leave,
    /// `ban`
    Ban,
    /// `knock`
    Knock,
}

impl Membership {
    /// The wire string (`"join"`, `"invite"`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Join => "join",
            Self::Invite => "invite",
            Self::Leave => "leave",
            Self::Ban => "ban",
            Self::Knock => "knock",
        }
    }
}

impl fmt::Display for Membership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error returned when parsing an unknown membership string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown membership {0:?}")]
pub struct UnknownMembership(pub String);

impl FromStr for Membership {
    type Err = UnknownMembership;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "join" => Self::Join,
            "invite" => Self::Invite,
            "leave" => Self::Leave,
            "ban" => Self::Ban,
            "knock" => Self::Knock,
            other => return Err(UnknownMembership(other.to_owned())),
        })
    }
}

/// Storage for what the client knows about users and rooms, so intents avoid
/// redundant `/register` and `/join` calls. Implementations must make every
/// write idempotent: inbound events feed the same cache.
#[async_trait]
pub trait ClientCache: Send + Sync {
    /// Whether `user_id` is known to be registered on the homeserver.
    async fn is_registered(&self, user_id: &str) -> Result<bool, CacheError>;
    /// Records that `user_id` is registered.
    async fn mark_registered(&self, user_id: &str) -> Result<(), CacheError>;
    /// The cached membership of `user_id` in `room_id`, if known.
    async fn membership(
        &self,
        room_id: &str,
        user_id: &str,
    ) -> Result<Option<Membership>, CacheError>;
    /// Records the membership of `user_id` in `room_id`.
    async fn set_membership(
        &self,
        room_id: &str,
        user_id: &str,
        membership: Membership,
    ) -> Result<(), CacheError>;
    /// The cached `m.room.power_levels` content of `room_id`, if known.
    async fn power_levels(&self, room_id: &str) -> Result<Option<serde_json::Value>, CacheError>;
    /// Records the `m.room.power_levels` content of `room_id`.
    async fn set_power_levels(
        &self,
        room_id: &str,
        content: serde_json::Value,
    ) -> Result<(), CacheError>;
}

#[derive(Debug, Default)]
struct MemoryState {
    registered: HashSet<String>,
    members: HashMap<(String, String), Membership>,
    power_levels: HashMap<String, serde_json::Value>,
}

/// An in-memory [`ClientCache`], for tests and bridges that need no persistence.
#[derive(Debug, Default)]
pub struct MemoryCache {
    state: Mutex<MemoryState>,
}

impl MemoryCache {
    /// Creates an empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut MemoryState) -> T) -> Result<T, CacheError> {
        let mut guard =
            self.state.lock().map_err(|_| CacheError::new("memory cache mutex poisoned"))?;
        Ok(f(&mut guard))
    }
}

#[async_trait]
impl ClientCache for MemoryCache {
    async fn is_registered(&self, user_id: &str) -> Result<bool, CacheError> {
        self.with(|s| s.registered.contains(user_id))
    }

    async fn mark_registered(&self, user_id: &str) -> Result<(), CacheError> {
        self.with(|s| {
            s.registered.insert(user_id.to_owned());
        })
    }

    async fn membership(
        &self,
        room_id: &str,
        user_id: &str,
    ) -> Result<Option<Membership>, CacheError> {
        self.with(|s| s.members.get(&(room_id.to_owned(), user_id.to_owned())).copied())
    }

    async fn set_membership(
        &self,
        room_id: &str,
        user_id: &str,
        membership: Membership,
    ) -> Result<(), CacheError> {
        self.with(|s| {
            s.members.insert((room_id.to_owned(), user_id.to_owned()), membership);
        })
    }

    async fn power_levels(&self, room_id: &str) -> Result<Option<serde_json::Value>, CacheError> {
        self.with(|s| s.power_levels.get(room_id).cloned())
    }

    async fn set_power_levels(
        &self,
        room_id: &str,
        content: serde_json::Value,
    ) -> Result<(), CacheError> {
        self.with(|s| {
            s.power_levels.insert(room_id.to_owned(), content);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn membership_round_trip() {
        for m in [
            Membership::Join,
            Membership::Invite,
            Membership::Leave,
            Membership::Ban,
            Membership::Knock,
        ] {
            assert_eq!(m.as_str().parse::<Membership>(), Ok(m));
            let json = serde_json::to_string(&m).expect("serialize");
            assert_eq!(json, format!("\"{}\"", m));
            assert_eq!(serde_json::from_str::<Membership>(&json).expect("deser"), m);
        }
        assert!("JOIN".parse::<Membership>().is_err());
    }

    #[tokio::test]
    async fn memory_cache_is_idempotent() {
        let c = MemoryCache::new();
        assert!(!c.is_registered("@a:x").await.expect("ok"));
        c.mark_registered("@a:x").await.expect("ok");
        c.mark_registered("@a:x").await.expect("ok");
        assert!(c.is_registered("@a:x").await.expect("ok"));
        assert_eq!(c.membership("!r", "@a:x").await.expect("ok"), None);
        c.set_membership("!r", "@a:x", Membership::Join).await.expect("ok");
        c.set_membership("!r", "@a:x", Membership::Join).await.expect("ok");
        assert_eq!(c.membership("!r", "@a:x").await.expect("ok"), Some(Membership::Join));
        c.set_membership("!r", "@a:x", Membership::Leave).await.expect("ok");
        assert_eq!(c.membership("!r", "@a:x").await.expect("ok"), Some(Membership::Leave));
        c.set_power_levels("!r", serde_json::json!({"users": {}})).await.expect("ok");
        assert!(c.power_levels("!r").await.expect("ok").is_some());
    }
}
