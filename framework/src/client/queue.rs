//! Per-room serialization of outbound requests.
//!
//! Every request that targets a room takes that room's permit before its first
//! attempt and keeps it across all its retries, so requests to one room reach
//! the homeserver in the order their futures first asked for the permit
//! (tokio's mutex is FIFO-fair). Different rooms proceed in parallel. Map
//! entries are removed as soon as a room has no holder and no waiter.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use prometheus::IntGauge;
use tokio::sync::OwnedMutexGuard;

type RoomLock = Arc<tokio::sync::Mutex<()>>;

/// The set of per-room locks.
#[derive(Debug)]
pub(crate) struct RoomQueues {
    rooms: Arc<Mutex<HashMap<String, RoomLock>>>,
    depth: IntGauge,
}

impl RoomQueues {
    pub(crate) fn new(depth: IntGauge) -> Self {
        Self { rooms: Arc::new(Mutex::new(HashMap::new())), depth }
    }

    /// Waits for the room's turn. The returned permit releases it on drop.
    ///
    /// The FIFO position is taken on the first poll of the returned future.
    pub(crate) async fn acquire(&self, room: &str) -> RoomPermit {
        let lock = {
            let mut rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(rooms.entry(room.to_owned()).or_default())
        };
        self.depth.inc();
        // The depth guard must exist before awaiting so cancellation decrements it.
        let mut permit = RoomPermit {
            room: room.to_owned(),
            guard: None,
            rooms: Arc::clone(&self.rooms),
            depth: self.depth.clone(),
            lock: Some(Arc::clone(&lock)),
        };
        drop(lock);
        if let Some(lock) = permit.lock.clone() {
            permit.guard = Some(lock.lock_owned().await);
        }
        permit
    }

    /// Number of rooms currently tracked (holders or waiters).
    #[cfg(test)]
    pub(crate) fn tracked_rooms(&self) -> usize {
        self.rooms.lock().map(|r| r.len()).unwrap_or(0)
    }
}

/// Exclusive right to send to one room; released on drop.
#[derive(Debug)]
pub(crate) struct RoomPermit {
    room: String,
    guard: Option<OwnedMutexGuard<()>>,
    lock: Option<RoomLock>,
    rooms: Arc<Mutex<HashMap<String, RoomLock>>>,
    depth: IntGauge,
}

impl Drop for RoomPermit {
    fn drop(&mut self) {
        self.depth.dec();
        let mut rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
        // Release our references first, under the map lock so nobody clones meanwhile.
        self.guard = None;
        self.lock = None;
        if rooms.get(&self.room).is_some_and(|entry| Arc::strong_count(entry) == 1) {
            rooms.remove(&self.room);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn serializes_per_room_and_cleans_up() {
        let depth = IntGauge::new("d", "d").expect("gauge");
        let q = Arc::new(RoomQueues::new(depth.clone()));
        let a = q.acquire("!a").await;
        // Another room is not blocked.
        let b = tokio::time::timeout(Duration::from_millis(100), q.acquire("!b"))
            .await
            .expect("room b must not wait for room a");
        // Same room waits.
        assert!(tokio::time::timeout(Duration::from_millis(50), q.acquire("!a")).await.is_err());
        assert_eq!(depth.get(), 2);
        drop(b);
        assert_eq!(q.tracked_rooms(), 1);
        let q2 = Arc::clone(&q);
        let waiter = tokio::spawn(async move {
            let _p = q2.acquire("!a").await;
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(a);
        waiter.await.expect("join");
        assert_eq!(q.tracked_rooms(), 0);
        assert_eq!(depth.get(), 0);
    }
}
