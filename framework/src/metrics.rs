//! Prometheus metrics of the framework; bridges register their own on [`Metrics::registry`].

pub use prometheus;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// The framework's metrics and the registry they live in.
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    /// Transactions by result (`new`, `duplicate`, `rejected`).
    pub(crate) transactions: IntCounterVec,
    /// Events received by type (well-known types, else `other`).
    pub(crate) events_received: IntCounterVec,
    /// Events handled by outcome (`ok`, `dead_letter`).
    pub(crate) events_processed: IntCounterVec,
    /// Handler retries.
    pub(crate) retries: IntCounter,
    /// Events accepted and not yet handled.
    pub(crate) queue_depth: IntGauge,
    /// Transactions whose every event is handled and recorded as such in the store.
    pub(crate) transactions_completed: IntCounter,
    /// Seconds from receipt to handled.
    pub(crate) lag: Histogram,
    /// Events moved to the dead-letter table.
    pub(crate) dead_letters: IntCounter,
    /// Time to answer a transaction PUT.
    pub(crate) put_duration: Histogram,
    /// Requests rejected for a missing or wrong token.
    pub(crate) auth_failures: IntCounter,
}

/// Event types that get their own label; everything else counts as `other`.
const KNOWN_TYPES: &[&str] = &[
    "m.room.message",
    "m.room.member",
    "m.room.redaction",
    "m.reaction",
    "m.room.topic",
    "m.room.name",
    "m.room.avatar",
    "m.room.power_levels",
    "m.room.encrypted",
    "m.room.create",
    "m.room.tombstone",
    "m.sticker",
    "m.typing",
    "m.receipt",
    "m.presence",
];

impl Metrics {
    /// Creates the registry and registers the framework's metrics (and process metrics on Linux).
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("valid metric");
            registry.register(Box::new(h.clone())).expect("unique metric");
            h
        };
        let queue_depth =
            IntGauge::new("trestle_inbound_queue_depth", "Events accepted and not yet handled")
                .expect("valid metric");
        registry.register(Box::new(queue_depth.clone())).expect("unique metric");
        #[cfg(target_os = "linux")]
        {
            let _ = registry
                .register(Box::new(prometheus::process_collector::ProcessCollector::for_self()));
        }
        Self {
            transactions: counter_vec(
                "trestle_transactions_total",
                "Transactions from the homeserver by result",
                &["result"],
            ),
            events_received: counter_vec(
                "trestle_events_received_total",
                "Events received from the homeserver by type",
                &["type"],
            ),
            events_processed: counter_vec(
                "trestle_events_processed_total",
                "Events handled by outcome",
                &["outcome"],
            ),
            retries: counter("trestle_event_retries_total", "Event handler retries"),
            queue_depth,
            transactions_completed: counter(
                "trestle_transactions_completed_total",
                "Transactions whose every event is handled and durably recorded as handled",
            ),
            lag: histogram(
                "trestle_inbound_lag_seconds",
                "Seconds from receipt of an event to the end of its handling",
                vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0],
            ),
            dead_letters: counter(
                "trestle_dead_letters_total",
                "Events moved to the dead-letter table",
            ),
            put_duration: histogram(
                "trestle_transaction_put_seconds",
                "Time to persist and answer a transaction",
                vec![0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0],
            ),
            auth_failures: counter(
                "trestle_auth_failures_total",
                "Requests with a missing or wrong token",
            ),
            registry,
        }
    }

    /// The registry, for a bridge's own metrics (name them `trestle_<bridge>_…`).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The label under which an event type is counted.
    pub(crate) fn type_label(event_type: &str) -> &str {
        KNOWN_TYPES.iter().find(|t| **t == event_type).copied().unwrap_or("other")
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Result<String, String> {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).map_err(|e| e.to_string())?;
        String::from_utf8(buf).map_err(|e| e.to_string())
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
