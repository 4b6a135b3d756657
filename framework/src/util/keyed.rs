//! One at a time per key: async mutexes looked up by a string key (a room, a remote user, a
//! conversation), so that work on one key is serialised while different keys run in parallel.
//!
//! A key's entry exists only while someone holds or awaits its lock, so a map keyed by every
//! remote user ever seen does not grow without bound. Waiters are served in FIFO order (tokio's
//! mutex is fair).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

use tokio::sync::OwnedMutexGuard;

type Lock = Arc<tokio::sync::Mutex<()>>;
type Map = Arc<Mutex<HashMap<String, Lock>>>;

/// A set of async locks by key. Cloning shares the set.
#[derive(Debug, Clone, Default)]
pub struct KeyedLocks {
    map: Map,
}

/// The lock of one key, released on drop.
#[must_use = "the lock is released when the guard is dropped"]
#[derive(Debug)]
pub struct KeyedGuard {
    key: String,
    guard: Option<OwnedMutexGuard<()>>,
    lock: Option<Lock>,
    map: Map,
}

impl KeyedLocks {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Waits for `key`'s turn. Cancel-safe: a dropped wait leaves nothing behind.
    pub async fn lock(&self, key: &str) -> KeyedGuard {
        let lock = {
            let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
            Arc::clone(map.entry(key.to_owned()).or_default())
        };
        // The guard exists before the wait, so that a cancelled wait still cleans up.
        let mut held = KeyedGuard {
            key: key.to_owned(),
            guard: None,
            lock: Some(lock),
            map: Arc::clone(&self.map),
        };
        if let Some(lock) = held.lock.clone() {
            held.guard = Some(lock.lock_owned().await);
        }
        held
    }

    /// How many keys are held or awaited now.
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Whether no key is held or awaited.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for KeyedGuard {
    fn drop(&mut self) {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        // Release our references first, under the map lock so that nobody clones meanwhile;
        // the entry goes when the map's is the last reference (no holder, no waiter).
        self.guard = None;
        self.lock = None;
        if map.get(&self.key).is_some_and(|entry| Arc::strong_count(entry) == 1) {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn one_at_a_time_per_key_and_nothing_left_behind() {
        let locks = KeyedLocks::new();
        let a = locks.lock("a").await;
        // Another key does not wait.
        let b = tokio::time::timeout(Duration::from_millis(100), locks.lock("b"))
            .await
            .expect("key b must not wait for key a");
        // The same key waits; the abandoned wait leaves nothing behind.
        assert!(tokio::time::timeout(Duration::from_millis(50), locks.lock("a")).await.is_err());
        drop(b);
        assert_eq!(locks.len(), 1);
        let (l2, order) = (locks.clone(), Arc::new(Mutex::new(Vec::new())));
        let o2 = Arc::clone(&order);
        let waiter = tokio::spawn(async move {
            let _a = l2.lock("a").await;
            o2.lock().unwrap_or_else(PoisonError::into_inner).push("waiter");
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        order.lock().unwrap_or_else(PoisonError::into_inner).push("holder");
        drop(a);
        waiter.await.expect("join");
        assert_eq!(*order.lock().unwrap_or_else(PoisonError::into_inner), ["holder", "waiter"]);
        assert!(locks.is_empty());
    }
}
