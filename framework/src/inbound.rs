//! The durable inbound queue: nothing lost, nothing handled twice, order kept per room.
//!
//! A transaction is written to the store **before** the homeserver gets its 200. Its events
//! are then handed to per-lane workers (one lane per room, plus a global lane for presence and
//! one for to-device events): each lane handles its events one at a time in arrival order, and
//! lanes run in parallel. A handler that fails is retried with capped exponential backoff and
//! jitter; after the last attempt the event goes to the dead-letter table (log, metric, and a
//! notice through [`ItemHandler::dead_lettered`]) and the lane moves on.
//!
//! Progress is recorded per event by a writer task that batches its commits. After a crash the
//! transactions still holding a body are replayed, skipping the events recorded as handled.
//! An event whose handling finished in the last few milliseconds before a crash may be handled
//! again; handlers make that harmless by sending to Matrix with transaction ids derived from the
//! event id (see [`crate::context::Context::txn_id_for`]), which the homeserver deduplicates.
//!
//! Memory is bounded: a semaphore of `queue.max_pending_events` permits is taken for every
//! event accepted; when it runs out the PUT waits (the homeserver sees back-pressure), and after
//! 30 s it is answered 503 so the homeserver retries later. Nothing is lost either way: the
//! transaction is only acknowledged once it is persisted.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use bytes::Bytes;
use rand::Rng;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::{
    appservice::{
        ApiError,
        txn::{self, TxnItem},
    },
    config::QueueConfig,
    metrics::Metrics,
    store::{DeadLetter, Store, now_ms},
};

/// How handling an item failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct HandleError {
    /// Whether another attempt may succeed.
    pub retryable: bool,
    /// What went wrong.
    pub message: String,
}

/// What the queue hands its items to (the runtime, on top of the bridge).
#[async_trait]
pub(crate) trait ItemHandler: Send + Sync + 'static {
    /// Handles one item. Called for the items of one lane strictly one after another.
    async fn handle(&self, txn_id: &str, item: &TxnItem) -> Result<(), HandleError>;
    /// Told after an item was moved to the dead-letter table.
    async fn dead_lettered(&self, item: &TxnItem, error: &HandleError);
}

/// Shared progress of one transaction.
#[derive(Debug)]
struct TxnProgress {
    txn_id: Arc<str>,
    remaining: AtomicUsize,
}

/// One queued item.
#[derive(Debug)]
struct Queued {
    txn: Arc<TxnProgress>,
    item: TxnItem,
    received: Instant,
    _permit: Option<OwnedSemaphorePermit>,
}

enum Progress {
    Done(Arc<str>, u32),
    Complete(Arc<str>),
    /// Answered once everything sent before it is written.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// The inbound queue.
pub(crate) struct Inbound {
    store: Arc<dyn Store>,
    handler: Arc<dyn ItemHandler>,
    metrics: Metrics,
    config: QueueConfig,
    permits: Arc<Semaphore>,
    lanes: Mutex<HashMap<Arc<str>, mpsc::UnboundedSender<Queued>>>,
    progress: mpsc::UnboundedSender<Progress>,
    shutdown: CancellationToken,
    tasks: tokio_util::task::TaskTracker,
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Inbound {
    /// Creates the queue and its progress writer.
    pub(crate) fn new(
        store: Arc<dyn Store>,
        handler: Arc<dyn ItemHandler>,
        metrics: Metrics,
        config: QueueConfig,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let tasks = tokio_util::task::TaskTracker::new();
        tasks.spawn(progress_writer(Arc::clone(&store), metrics.clone(), rx));
        Arc::new(Self {
            permits: Arc::new(Semaphore::new(config.max_pending_events)),
            store,
            handler,
            metrics,
            config,
            lanes: Mutex::new(HashMap::new()),
            progress: tx,
            shutdown,
            tasks,
        })
    }

    /// Validates, persists and queues a transaction; `Ok` means the homeserver may forget it.
    pub(crate) async fn ingest(
        self: &Arc<Self>,
        txn_id: &str,
        body: Bytes,
    ) -> Result<(), ApiError> {
        let parsed = txn::parse(&body)?;
        let n = parsed.items.len();
        let permit = if n == 0 {
            None
        } else {
            let count = u32::try_from(n.min(self.config.max_pending_events)).unwrap_or(u32::MAX);
            let acquire = Arc::clone(&self.permits).acquire_many_owned(count);
            match tokio::time::timeout(Duration::from_secs(30), acquire).await {
                Ok(Ok(p)) => Some(p),
                Ok(Err(_)) => return Err(ApiError::Busy("the bridge is shutting down".into())),
                Err(_) => {
                    return Err(ApiError::Busy(
                        "too many events are waiting to be handled; retry later".into(),
                    ));
                }
            }
        };
        if !self.store.insert_transaction(txn_id, body).await? {
            self.metrics.transactions.with_label_values(&["duplicate"]).inc();
            tracing::debug!(txn_id, "duplicate transaction ignored");
            return Ok(());
        }
        self.metrics.transactions.with_label_values(&["new"]).inc();
        if parsed.device_lists.is_some()
            || parsed.otk_counts.is_some()
            || parsed.fallback_keys.is_some()
        {
            self.keep_e2ee_fields(&parsed).await;
        }
        if n == 0 {
            // Nothing to wait for: mark it complete at once.
            let _ = self.progress.send(Progress::Complete(Arc::from(txn_id)));
            return Ok(());
        }
        let mut permit = permit;
        let progress =
            Arc::new(TxnProgress { txn_id: Arc::from(txn_id), remaining: AtomicUsize::new(n) });
        for item in parsed.items {
            self.metrics
                .events_received
                .with_label_values(&[Metrics::type_label(&item.event_type)])
                .inc();
            let one = permit.as_mut().and_then(|p| p.split(1));
            self.enqueue(Queued {
                txn: Arc::clone(&progress),
                item,
                received: Instant::now(),
                _permit: one,
            });
        }
        Ok(())
    }

    /// The MSC3202 fields are kept for encryption support (latest value of each).
    async fn keep_e2ee_fields(&self, parsed: &txn::ParsedTxn) {
        for (key, value) in [
            ("msc3202.device_lists", &parsed.device_lists),
            ("msc3202.otk_counts", &parsed.otk_counts),
            ("msc3202.fallback_keys", &parsed.fallback_keys),
        ] {
            let Some(v) = value else { continue };
            if let Err(e) = self.store.kv_set(key, &v.to_string()).await {
                tracing::warn!(key, error = %e, "could not keep encryption field");
            }
        }
    }

    /// Re-queues every event that was accepted but not handled before the last stop.
    /// Must run before the listener accepts new transactions, so that order is kept.
    pub(crate) async fn recover(self: &Arc<Self>) -> Result<usize, crate::store::StoreError> {
        let pending = self.store.pending_transactions().await?;
        let mut count = 0;
        for t in pending {
            let parsed = match txn::parse(&t.body) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(txn_id = t.txn_id, error = %e, "stored transaction no longer parses; dropping it");
                    self.store.complete_transaction(&t.txn_id).await?;
                    continue;
                }
            };
            let todo: Vec<TxnItem> =
                parsed.items.into_iter().filter(|i| !t.done.contains(&i.idx)).collect();
            if todo.is_empty() {
                self.store.complete_transaction(&t.txn_id).await?;
                continue;
            }
            let progress = Arc::new(TxnProgress {
                txn_id: Arc::from(t.txn_id.as_str()),
                remaining: AtomicUsize::new(todo.len()),
            });
            count += todo.len();
            for item in todo {
                self.enqueue(Queued {
                    txn: Arc::clone(&progress),
                    item,
                    received: Instant::now(),
                    _permit: None,
                });
            }
        }
        if count > 0 {
            tracing::info!(events = count, "resuming events accepted before the last stop");
        }
        Ok(count)
    }

    fn enqueue(self: &Arc<Self>, q: Queued) {
        self.metrics.queue_depth.inc();
        let mut lanes = self.lanes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let lane = Arc::clone(&q.item.lane);
        let q = match lanes.get(&lane) {
            Some(tx) => match tx.send(q) {
                Ok(()) => return,
                Err(mpsc::error::SendError(q)) => q,
            },
            None => q,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(q);
        lanes.insert(Arc::clone(&lane), tx);
        let this = Arc::clone(self);
        self.tasks.spawn(async move { this.lane_worker(lane, rx).await });
    }

    async fn lane_worker(self: Arc<Self>, lane: Arc<str>, mut rx: mpsc::UnboundedReceiver<Queued>) {
        loop {
            let next = tokio::select! {
                q = rx.recv() => q,
                () = tokio::time::sleep(Duration::from_secs(30)) => {
                    // Idle: retire the lane unless something arrived meanwhile.
                    let mut lanes = self.lanes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    if rx.is_empty() {
                        lanes.remove(&lane);
                        return;
                    }
                    continue;
                }
                () = self.shutdown.cancelled() => return,
            };
            let Some(q) = next else { return };
            if !self.process(q).await {
                return;
            }
        }
    }

    /// Handles one item with retries; `false` if shutdown interrupted it (it stays pending).
    async fn process(&self, q: Queued) -> bool {
        let mut attempt = 1;
        let outcome = loop {
            let result = tokio::select! {
                r = self.handler.handle(&q.txn.txn_id, &q.item) => r,
                () = self.shutdown.cancelled() => return false,
            };
            match result {
                Ok(()) => break Ok(()),
                Err(e) if e.retryable && attempt < self.config.max_attempts => {
                    let delay = backoff(&self.config, attempt);
                    tracing::warn!(lane = %q.item.lane, event_id = ?q.item.event_id, attempt,
                        delay_ms = delay.as_millis() as u64, error = %e, "event handler failed; retrying");
                    self.metrics.retries.inc();
                    attempt += 1;
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = self.shutdown.cancelled() => return false,
                    }
                }
                Err(e) => break Err(e),
            }
        };
        match outcome {
            Ok(()) => {
                self.metrics.events_processed.with_label_values(&["ok"]).inc();
            }
            Err(e) => {
                self.metrics.events_processed.with_label_values(&["dead_letter"]).inc();
                self.metrics.dead_letters.inc();
                tracing::error!(lane = %q.item.lane, event_id = ?q.item.event_id, event_type = q.item.event_type,
                    attempts = attempt, error = %e, "event moved to the dead-letter table");
                let letter = DeadLetter {
                    txn_id: q.txn.txn_id.to_string(),
                    idx: q.item.idx,
                    lane: q.item.lane.to_string(),
                    event_id: q.item.event_id.clone(),
                    event_type: q.item.event_type.clone(),
                    payload: String::from_utf8_lossy(&q.item.raw).into_owned(),
                    error: e.message.clone(),
                    attempts: attempt,
                    failed_at: now_ms(),
                };
                if let Err(se) = self.store.add_dead_letter(&letter).await {
                    tracing::error!(error = %se, ?letter, "could not store dead letter");
                }
                self.handler.dead_lettered(&q.item, &e).await;
            }
        }
        self.metrics.lag.observe(q.received.elapsed().as_secs_f64());
        self.metrics.queue_depth.dec();
        let msg = if q.txn.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            Progress::Complete(Arc::clone(&q.txn.txn_id))
        } else {
            Progress::Done(Arc::clone(&q.txn.txn_id), q.item.idx)
        };
        let _ = self.progress.send(msg);
        true
    }

    /// Stops the lanes (events in flight stay pending for the next start) and flushes progress.
    pub(crate) async fn shutdown(&self) {
        self.shutdown.cancel();
        self.lanes.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
        self.tasks.close();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let _ = self.progress.send(Progress::Flush(tx));
        let _ = tokio::time::timeout(Duration::from_secs(10), rx).await;
    }
}

fn backoff(config: &QueueConfig, attempt: u32) -> Duration {
    let exp = config.initial_backoff_ms.saturating_mul(1u64 << attempt.min(20).saturating_sub(1));
    let cap = exp.min(config.max_backoff_ms).max(1);
    // "Equal jitter": at least half the delay, so retries never hammer.
    Duration::from_millis(cap / 2 + rand::rng().random_range(0..=cap / 2))
}

/// How long the progress writer gathers before writing.
const GATHER: Duration = Duration::from_millis(5);

/// Writes progress in batches: one SQLite transaction for whatever accumulated.
async fn progress_writer(
    store: Arc<dyn Store>,
    metrics: Metrics,
    mut rx: mpsc::UnboundedReceiver<Progress>,
) {
    let mut done: Vec<(String, u32)> = Vec::new();
    let mut complete: Vec<Arc<str>> = Vec::new();
    while let Some(first) = rx.recv().await {
        // Gather for a few milliseconds: a transaction whose events all finish meanwhile is
        // recorded as complete without writing (then deleting) a row per event. A crash inside
        // this window can only make those few events be handled again, never lost.
        if !matches!(first, Progress::Flush(_)) {
            tokio::time::sleep(GATHER).await;
        }
        let mut next = Some(first);
        let mut flushes = Vec::new();
        while let Some(msg) = next.take().or_else(|| rx.try_recv().ok()) {
            match msg {
                Progress::Done(t, i) => done.push((t.to_string(), i)),
                Progress::Complete(t) => complete.push(t),
                Progress::Flush(ack) => {
                    flushes.push(ack);
                    break;
                }
            }
            if done.len() + complete.len() >= 65_536 {
                break;
            }
        }
        done.retain(|(t, _)| !complete.iter().any(|c| **c == **t));
        if !done.is_empty() {
            if let Err(e) = store.mark_done(&done).await {
                tracing::error!(error = %e, "could not record handled events");
            }
            done.clear();
        }
        for t in complete.drain(..) {
            match store.complete_transaction(&t).await {
                Ok(()) => metrics.transactions_completed.inc(),
                Err(e) => {
                    tracing::error!(txn_id = %t, error = %e, "could not complete transaction")
                }
            }
        }
        for ack in flushes {
            let _ = ack.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;

    #[derive(Default)]
    struct Recorder {
        seen: Mutex<Vec<(String, String)>>,
        fail_first: Mutex<HashMap<String, u32>>,
        always_fail: Option<String>,
        dead: Mutex<Vec<String>>,
    }

    #[async_trait]
    impl ItemHandler for Recorder {
        async fn handle(&self, _txn: &str, item: &TxnItem) -> Result<(), HandleError> {
            let id = item.event_id.clone().unwrap_or_default();
            if self.always_fail.as_deref() == Some(id.as_str()) {
                return Err(HandleError { retryable: true, message: "always".into() });
            }
            {
                let mut f = self.fail_first.lock().unwrap();
                if let Some(n) = f.get_mut(&id)
                    && *n > 0
                {
                    *n -= 1;
                    return Err(HandleError { retryable: true, message: "flaky".into() });
                }
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
            self.seen.lock().unwrap().push((item.lane.to_string(), id));
            Ok(())
        }
        async fn dead_lettered(&self, item: &TxnItem, _e: &HandleError) {
            self.dead.lock().unwrap().push(item.event_id.clone().unwrap_or_default());
        }
    }

    fn body(events: &[(&str, &str)]) -> Bytes {
        let evs: Vec<_> = events
            .iter()
            .map(|(room, id)| serde_json::json!({"type": "m.room.message", "room_id": room, "event_id": id, "sender": "@u:x", "content": {"body": id}}))
            .collect();
        Bytes::from(serde_json::to_vec(&serde_json::json!({"events": evs})).unwrap())
    }

    fn config() -> QueueConfig {
        QueueConfig {
            max_attempts: 3,
            initial_backoff_ms: 1,
            max_backoff_ms: 5,
            max_pending_events: 1000,
        }
    }

    async fn wait_until(mut f: impl FnMut() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("condition not reached");
    }

    #[tokio::test]
    async fn per_room_order_dedupe_retry_and_dead_letter() {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::in_memory().await.unwrap());
        let rec = Arc::new(Recorder {
            always_fail: Some("$bad".into()),
            fail_first: Mutex::new(HashMap::from([("$a2".to_owned(), 2)])),
            ..Default::default()
        });
        let q = Inbound::new(
            Arc::clone(&store),
            rec.clone(),
            Metrics::new(),
            config(),
            CancellationToken::new(),
        );
        q.ingest("1", body(&[("!a", "$a1"), ("!b", "$b1"), ("!a", "$a2")])).await.unwrap();
        q.ingest("2", body(&[("!a", "$a3"), ("!b", "$bad"), ("!b", "$b2")])).await.unwrap();
        q.ingest("1", body(&[("!a", "$dup")])).await.unwrap();
        wait_until(|| rec.seen.lock().unwrap().len() == 5).await;
        let seen = rec.seen.lock().unwrap().clone();
        let order = |lane: &str| {
            seen.iter().filter(|(l, _)| l == lane).map(|(_, e)| e.clone()).collect::<Vec<_>>()
        };
        assert_eq!(order("!a"), ["$a1", "$a2", "$a3"]);
        assert_eq!(order("!b"), ["$b1", "$b2"]);
        assert_eq!(*rec.dead.lock().unwrap(), ["$bad"]);
        let letters = store.dead_letters(10).await.unwrap();
        assert_eq!(letters.len(), 1);
        assert_eq!(letters[0].attempts, 3);
        for _ in 0..100 {
            if store.pending_transactions().await.unwrap().is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("transactions never completed");
    }

    #[tokio::test]
    async fn recovery_replays_only_unhandled_events() {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::in_memory().await.unwrap());
        // Simulate a crash: txn persisted, first event recorded as done, nothing else.
        store
            .insert_transaction("7", body(&[("!a", "$1"), ("!a", "$2"), ("!c", "$3")]))
            .await
            .unwrap();
        store.mark_done(&[("7".to_owned(), 0)]).await.unwrap();
        let rec = Arc::new(Recorder::default());
        let q = Inbound::new(
            Arc::clone(&store),
            rec.clone(),
            Metrics::new(),
            config(),
            CancellationToken::new(),
        );
        assert_eq!(q.recover().await.unwrap(), 2);
        wait_until(|| rec.seen.lock().unwrap().len() == 2).await;
        let mut ids: Vec<_> = rec.seen.lock().unwrap().iter().map(|(_, e)| e.clone()).collect();
        ids.sort();
        assert_eq!(ids, ["$2", "$3"]);
        // A repeat of the same txn id after the "restart" is a no-op.
        q.ingest("7", body(&[("!a", "$1")])).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(rec.seen.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn back_pressure_answers_busy_but_loses_nothing() {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::in_memory().await.unwrap());
        let rec = Arc::new(Recorder::default());
        let mut cfg = config();
        cfg.max_pending_events = 2;
        let q = Inbound::new(
            Arc::clone(&store),
            rec.clone(),
            Metrics::new(),
            cfg,
            CancellationToken::new(),
        );
        // Three events but only two permits: the batch takes what exists, capped.
        q.ingest("a", body(&[("!a", "$1"), ("!a", "$2"), ("!a", "$3")])).await.unwrap();
        wait_until(|| rec.seen.lock().unwrap().len() == 3).await;
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let c = QueueConfig {
            max_attempts: 9,
            initial_backoff_ms: 100,
            max_backoff_ms: 1000,
            max_pending_events: 1000,
        };
        for attempt in 1..10 {
            let d = backoff(&c, attempt).as_millis() as u64;
            let cap = (100u64 << (attempt - 1)).min(1000);
            assert!(d >= cap / 2 && d <= cap, "attempt {attempt}: {d}");
        }
    }
}
