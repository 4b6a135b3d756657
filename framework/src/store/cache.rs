//! The store as the homeserver client's persistent cache, so a restart never re-registers or
//! re-joins thousands of ghosts.

use std::sync::Arc;

use async_trait::async_trait;

use super::{Store, StoreError};
use crate::client::{CacheError, ClientCache, Membership};

/// A [`ClientCache`] backed by a [`Store`].
#[derive(Debug, Clone)]
pub struct StoreCache(Arc<dyn Store>);

impl StoreCache {
    /// Wraps a store.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self(store)
    }
}

fn cache_err(e: StoreError) -> CacheError {
    CacheError::new(e)
}

#[async_trait]
impl ClientCache for StoreCache {
    async fn is_registered(&self, user_id: &str) -> Result<bool, CacheError> {
        self.0.is_registered(user_id).await.map_err(cache_err)
    }

    async fn mark_registered(&self, user_id: &str) -> Result<(), CacheError> {
        self.0.mark_registered(user_id).await.map_err(cache_err)
    }

    async fn membership(
        &self,
        room_id: &str,
        user_id: &str,
    ) -> Result<Option<Membership>, CacheError> {
        let m = self.0.membership(room_id, user_id).await.map_err(cache_err)?;
        // An unknown stored value is treated as "not cached": the client asks the server.
        Ok(m.and_then(|m| m.parse().ok()))
    }

    async fn set_membership(
        &self,
        room_id: &str,
        user_id: &str,
        membership: Membership,
    ) -> Result<(), CacheError> {
        self.0.set_membership(room_id, user_id, membership.as_str()).await.map_err(cache_err)
    }

    async fn power_levels(&self, room_id: &str) -> Result<Option<serde_json::Value>, CacheError> {
        self.0.power_levels(room_id).await.map_err(cache_err)
    }

    async fn set_power_levels(
        &self,
        room_id: &str,
        content: serde_json::Value,
    ) -> Result<(), CacheError> {
        self.0.set_power_levels(room_id, &content).await.map_err(cache_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;

    #[tokio::test]
    async fn persists_through_the_store() {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::in_memory().await.unwrap());
        let c = StoreCache::new(Arc::clone(&store));
        c.mark_registered("@g:x").await.unwrap();
        c.set_membership("!r:x", "@g:x", Membership::Join).await.unwrap();
        assert!(store.is_registered("@g:x").await.unwrap());
        assert_eq!(c.membership("!r:x", "@g:x").await.unwrap(), Some(Membership::Join));
        store.set_membership("!r:x", "@g:x", "weird").await.unwrap();
        assert_eq!(c.membership("!r:x", "@g:x").await.unwrap(), None);
    }
}
