//! Per-room serialization of outbound requests.
//!
//! Every request that targets a room takes that room's permit before its first
//! attempt and keeps it across all its retries, so requests to one room reach
//! the homeserver in the order their futures first asked for the permit
//! (tokio's mutex is FIFO-fair). Different rooms proceed in parallel. Map
//! entries are removed as soon as a room has no holder and no waiter.

use prometheus::IntGauge;

use crate::util::keyed::{KeyedGuard, KeyedLocks};

/// The set of per-room locks.
#[derive(Debug)]
pub(crate) struct RoomQueues {
    rooms: KeyedLocks,
    depth: IntGauge,
}

impl RoomQueues {
    pub(crate) fn new(depth: IntGauge) -> Self {
        Self { rooms: KeyedLocks::new(), depth }
    }

    /// Waits for the room's turn. The returned permit releases it on drop.
    ///
    /// The FIFO position is taken on the first poll of the returned future.
    pub(crate) async fn acquire(&self, room: &str) -> RoomPermit {
        // Counted from before the wait, and uncounted even when the wait is cancelled.
        let depth = Depth::count(&self.depth);
        RoomPermit { _room: self.rooms.lock(room).await, _depth: depth }
    }

    /// Number of rooms currently tracked (holders or waiters).
    #[cfg(test)]
    pub(crate) fn tracked_rooms(&self) -> usize {
        self.rooms.len()
    }
}

/// Exclusive right to send to one room; released on drop.
#[derive(Debug)]
pub(crate) struct RoomPermit {
    _room: KeyedGuard,
    _depth: Depth,
}

/// One request counted in the queue-depth gauge while it lives.
#[derive(Debug)]
struct Depth(IntGauge);

impl Depth {
    fn count(gauge: &IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for Depth {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

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
