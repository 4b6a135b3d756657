//! The component connection (XEP-0114): login, reconnection with backoff and jitter, a bounded
//! write queue, keepalive pings.
//!
//! A connection *generation* counts successful logins. Stanzas may be tagged with the generation
//! they were made for (a message sent by an occupant that joined on that connection); the writer
//! drops them after a reconnect instead of sending them before the occupant rejoined.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_xmpp::{
    Component, connect::DnsConfig, parsers::iq::Iq, parsers::ping::Ping, xmlstream::Timeouts,
};
use xmpp_parsers::{jid::Jid, stanza::Stanza};

/// A connection error a sender sees.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// Not connected to the server right now.
    #[error("not connected to the XMPP server")]
    Offline,
    /// The write queue is full.
    #[error("the XMPP write queue is full")]
    QueueFull,
    /// The connection task stopped (shutdown).
    #[error("the XMPP connection is closed")]
    Closed,
}

/// What the connection reports.
#[derive(Debug)]
pub enum ConnEvent {
    /// Logged in; the generation number.
    Online(u64),
    /// The connection was lost; reconnecting.
    Offline,
    /// A stanza from the server.
    Stanza(Box<Stanza>),
}

/// Settings of a connection.
#[derive(Debug, Clone)]
pub struct ConnConfig {
    /// The component JID.
    pub jid: String,
    /// The shared secret.
    pub secret: String,
    /// `host:port` of the component port.
    pub addr: String,
    /// Where keepalive pings go (the server's domain).
    pub ping_to: String,
    /// Reconnect delays.
    pub min_delay: Duration,
    /// Longest reconnect delay.
    pub max_delay: Duration,
    /// Keepalive interval.
    pub ping_interval: Duration,
    /// Write queue capacity.
    pub queue: usize,
}

struct Outgoing {
    stanza: Stanza,
    generation: Option<u64>,
}

/// The sending half, cheap to clone.
#[derive(Clone)]
pub struct XmppSender {
    tx: mpsc::Sender<Outgoing>,
    /// Current generation, 0 when offline.
    online: Arc<AtomicU64>,
}

impl std::fmt::Debug for XmppSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XmppSender").field("generation", &self.generation()).finish()
    }
}

impl XmppSender {
    /// The current connection generation, or `None` when offline.
    pub fn generation(&self) -> Option<u64> {
        Some(self.online.load(Ordering::Acquire)).filter(|g| *g != 0)
    }

    /// Queues a stanza for the current connection; fails when offline or when the queue is full.
    pub fn send(&self, stanza: impl Into<Stanza>) -> Result<(), ConnError> {
        let generation = self.generation().ok_or(ConnError::Offline)?;
        self.send_for(stanza, generation)
    }

    /// Queues a stanza that only makes sense on connection `generation`.
    pub fn send_for(&self, stanza: impl Into<Stanza>, generation: u64) -> Result<(), ConnError> {
        self.tx.try_send(Outgoing { stanza: stanza.into(), generation: Some(generation) }).map_err(
            |e| match e {
                mpsc::error::TrySendError::Full(_) => ConnError::QueueFull,
                mpsc::error::TrySendError::Closed(_) => ConnError::Closed,
            },
        )
    }
}

/// The delay before reconnection attempt `attempt` (1-based): exponential, capped, with jitter
/// (between half and all of the nominal delay).
pub fn backoff(attempt: u32, min: Duration, max: Duration) -> Duration {
    let nominal = min.saturating_mul(1u32 << attempt.saturating_sub(1).min(16)).min(max);
    let factor = rand::random_range(0.5..=1.0);
    nominal.mul_f64(factor).max(Duration::from_millis(1))
}

/// Starts the connection task. Events arrive on the returned receiver, in order.
pub fn spawn(
    config: ConnConfig,
    shutdown: CancellationToken,
) -> (XmppSender, mpsc::Receiver<ConnEvent>) {
    let (tx, rx) = mpsc::channel(config.queue.max(1));
    let (etx, erx) = mpsc::channel(1024);
    let online = Arc::new(AtomicU64::new(0));
    let sender = XmppSender { tx, online: Arc::clone(&online) };
    tokio::spawn(run(config, rx, etx, online, shutdown));
    (sender, erx)
}

async fn run(
    config: ConnConfig,
    mut rx: mpsc::Receiver<Outgoing>,
    events: mpsc::Sender<ConnEvent>,
    online: Arc<AtomicU64>,
    shutdown: CancellationToken,
) {
    let mut generation = 0u64;
    let mut attempt = 0u32;
    let timeouts = Timeouts {
        read_timeout: config.ping_interval * 3,
        response_timeout: config.ping_interval * 2,
    };
    let ping_to: Option<Jid> = Jid::new(&config.ping_to).ok();
    loop {
        let login = tokio::select! {
            () = shutdown.cancelled() => return,
            r = tokio::time::timeout(
                Duration::from_secs(20),
                Component::new_plaintext(&config.jid, &config.secret, DnsConfig::addr(&config.addr), timeouts),
            ) => r,
        };
        match login {
            Ok(Ok(mut comp)) => {
                generation += 1;
                online.store(generation, Ordering::Release);
                tracing::info!(
                    jid = config.jid,
                    addr = config.addr,
                    generation,
                    "component connected"
                );
                if events.send(ConnEvent::Online(generation)).await.is_err() {
                    return;
                }
                let since = Instant::now();
                let mut ping = tokio::time::interval(config.ping_interval);
                ping.tick().await;
                let reason: String = loop {
                    tokio::select! {
                        () = shutdown.cancelled() => {
                            online.store(0, Ordering::Release);
                            let _ = tokio::time::timeout(Duration::from_secs(2), comp.send_end()).await;
                            return;
                        }
                        st = comp.next() => match st {
                            Some(s) => {
                                if events.send(ConnEvent::Stanza(Box::new(s))).await.is_err() {
                                    return;
                                }
                            }
                            None => break "the stream ended".to_owned(),
                        },
                        out = rx.recv() => match out {
                            Some(o) if o.generation.is_some_and(|g| g != generation) => {
                                tracing::debug!("dropping a stanza made for an earlier connection");
                            }
                            Some(o) => {
                                if let Err(e) = comp.send_stanza(o.stanza).await {
                                    break e.to_string();
                                }
                            }
                            None => return,
                        },
                        _ = ping.tick() => {
                            let mut iq = Iq::from_get(format!("ping-{}", rand::random::<u32>()), Ping);
                            *iq.from_mut() = Jid::new(&config.jid).ok();
                            *iq.to_mut() = ping_to.clone();
                            if let Err(e) = comp.send_stanza(iq.into()).await {
                                break e.to_string();
                            }
                        }
                    }
                };
                online.store(0, Ordering::Release);
                tracing::warn!(generation, %reason, "component disconnected; reconnecting");
                if events.send(ConnEvent::Offline).await.is_err() {
                    return;
                }
                if since.elapsed() > Duration::from_secs(60) {
                    attempt = 0;
                }
            }
            Ok(Err(e)) => tracing::warn!(addr = config.addr, error = %e, "component login failed"),
            Err(_) => tracing::warn!(addr = config.addr, "component login timed out"),
        }
        attempt = attempt.saturating_add(1);
        let delay = backoff(attempt, config.min_delay, config.max_delay);
        tracing::info!(
            delay_ms = delay.as_millis() as u64,
            attempt,
            "reconnecting to the XMPP server"
        );
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let (min, max) = (Duration::from_millis(1000), Duration::from_millis(60_000));
        for _ in 0..100 {
            let d1 = backoff(1, min, max);
            assert!(d1 >= Duration::from_millis(500) && d1 <= min, "{d1:?}");
            let d3 = backoff(3, min, max);
            assert!(d3 >= Duration::from_millis(2000) && d3 <= Duration::from_millis(4000));
            let d30 = backoff(30, min, max);
            assert!(d30 >= max / 2 && d30 <= max);
        }
        let samples: std::collections::HashSet<_> = (0..20).map(|_| backoff(5, min, max)).collect();
        assert!(samples.len() > 1, "jitter");
    }

    #[tokio::test]
    async fn senders_are_told_when_offline() {
        let token = CancellationToken::new();
        let (sender, _events) = spawn(
            ConnConfig {
                jid: "matrix.localhost".into(),
                secret: "x".into(),
                addr: "127.0.0.1:1".into(),
                ping_to: "localhost".into(),
                min_delay: Duration::from_millis(10),
                max_delay: Duration::from_millis(20),
                ping_interval: Duration::from_secs(30),
                queue: 1,
            },
            token.clone(),
        );
        let p = xmpp_parsers::presence::Presence::available();
        assert!(matches!(sender.send(p), Err(ConnError::Offline)));
        token.cancel();
    }
}
