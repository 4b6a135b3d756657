//! The component connection (XEP-0114): login, reconnection with backoff and jitter, a bounded
//! write queue, keepalive pings.
//!
//! The stream is tokio-xmpp's XML stream carrying plain elements; the XEP-0114 handshake is done
//! here, and each element is parsed into a typed stanza separately, so that a stanza the parsers
//! reject is answered with a `bad-request` stanza error and logged instead of ending the
//! connection.
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

use futures::{SinkExt, StreamExt};
use sha1::{Digest, Sha1};
use tokio::{io::BufStream, net::TcpStream, sync::mpsc};
use tokio_util::sync::CancellationToken;
use tokio_xmpp::xmlstream::{ReadError, StreamHeader, Timeouts, XmlStream, initiate_stream};
use xmpp_parsers::{
    iq::Iq,
    jid::Jid,
    message::Message,
    minidom::{Element, rxml::NcName},
    ping::Ping,
    presence::Presence,
    stanza::Stanza,
    stanza_error::{DefinedCondition, ErrorType, StanzaError},
};

/// The component stream namespace.
const NS_COMPONENT: &str = "jabber:component:accept";

type XStream = XmlStream<BufStream<TcpStream>, Element>;

/// Why a login failed.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// The TCP connection or the stream failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The server sent no stream id.
    #[error("the server sent no stream id")]
    NoStreamId,
    /// The server refused the handshake (wrong secret or unknown component).
    #[error("the server refused the handshake: {0}")]
    Refused(String),
    /// The stream closed during the handshake.
    #[error("the stream closed during the handshake")]
    Closed,
}

/// The XEP-0114 handshake value: hex(SHA-1(stream id ‖ secret)).
pub fn handshake_digest(stream_id: &str, secret: &str) -> String {
    hex::encode(Sha1::digest(format!("{stream_id}{secret}").as_bytes()))
}

async fn login(config: &ConnConfig, timeouts: Timeouts) -> Result<XStream, LoginError> {
    let tcp = TcpStream::connect(&config.addr).await?;
    let header = StreamHeader { to: Some(config.jid.clone().into()), ..StreamHeader::default() };
    let pending = initiate_stream(BufStream::new(tcp), NS_COMPONENT, header, timeouts).await?;
    let id = pending.header().id.map(|i| i.into_owned()).ok_or(LoginError::NoStreamId)?;
    let mut stream = pending.skip_features::<Element>();
    let hs = Element::builder("handshake", NS_COMPONENT)
        .append(handshake_digest(&id, &config.secret))
        .build();
    stream.send(&hs).await?;
    loop {
        match stream.next().await {
            Some(Ok(e)) if e.name() == "handshake" => return Ok(stream),
            Some(Ok(e)) => return Err(LoginError::Refused(String::from(&e))),
            Some(Err(ReadError::SoftTimeout)) => {}
            Some(Err(ReadError::ParseError(e))) => return Err(LoginError::Refused(e.to_string())),
            Some(Err(ReadError::HardError(e))) => return Err(LoginError::Io(e)),
            Some(Err(ReadError::StreamFooterReceived)) | None => return Err(LoginError::Closed),
        }
    }
}

/// A typed stanza from an element (`None` for anything else), or why it cannot be parsed.
pub fn parse_stanza(e: &Element) -> Result<Option<Stanza>, String> {
    let result = match e.name() {
        "message" => Message::try_from(e.clone()).map(Stanza::Message),
        "presence" => Presence::try_from(e.clone()).map(Stanza::Presence),
        "iq" => Iq::try_from(e.clone()).map(Stanza::Iq),
        _ => return Ok(None),
    };
    result.map(Some).map_err(|x| x.to_string())
}

/// The `bad-request` error reply to a malformed `iq` get or set (never without both addresses).
///
/// Malformed messages and presences are only logged: an error sent back to a MUC occupant makes
/// the room remove the sender (XEP-0045), so answering a room's broadcast would get the bridge's
/// own occupants kicked.
pub fn bad_request(e: &Element, why: &str) -> Option<Element> {
    if e.name() != "iq" || !matches!(e.attr("type"), Some("get" | "set")) {
        return None;
    }
    let (from, to) = (e.attr("from")?, e.attr("to")?);
    let mut b = Element::builder(e.name(), NS_COMPONENT)
        .attr(NcName::try_from("type").ok()?, "error")
        .attr(NcName::try_from("from").ok()?, to)
        .attr(NcName::try_from("to").ok()?, from);
    if let Some(id) = e.attr("id") {
        b = b.attr(NcName::try_from("id").ok()?, id);
    }
    let err = StanzaError::new(
        ErrorType::Modify,
        DefinedCondition::BadRequest,
        "en",
        format!("malformed stanza: {why}"),
    );
    Some(b.append(Element::from(err)).build())
}

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
            r = tokio::time::timeout(Duration::from_secs(20), login(&config, timeouts)) => r,
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
                            let _ = tokio::time::timeout(Duration::from_secs(2), SinkExt::<&Element>::close(&mut comp)).await;
                            return;
                        }
                        read = comp.next() => match read {
                            Some(Ok(e)) => match parse_stanza(&e) {
                                Ok(Some(s)) => {
                                    if events.send(ConnEvent::Stanza(Box::new(s))).await.is_err() {
                                        return;
                                    }
                                }
                                Ok(None) => {}
                                Err(why) => {
                                    tracing::warn!(from = e.attr("from"), name = e.name(), %why, "rejecting a malformed stanza");
                                    if let Some(reply) = bad_request(&e, &why)
                                        && let Err(err) = comp.send(&reply).await
                                    {
                                        break err.to_string();
                                    }
                                }
                            },
                            Some(Err(ReadError::SoftTimeout)) => {}
                            Some(Err(ReadError::ParseError(e))) => {
                                tracing::warn!(error = %e, "skipping an unreadable element");
                            }
                            Some(Err(e)) => break e.to_string(),
                            None => break "the stream ended".to_owned(),
                        },
                        out = rx.recv() => match out {
                            Some(o) if o.generation.is_some_and(|g| g != generation) => {
                                tracing::debug!("dropping a stanza made for an earlier connection");
                            }
                            Some(o) => {
                                if let Err(e) = comp.send(&Element::from(o.stanza)).await {
                                    break e.to_string();
                                }
                            }
                            None => return,
                        },
                        _ = ping.tick() => {
                            let mut iq = Iq::from_get(format!("ping-{}", rand::random::<u32>()), Ping);
                            *iq.from_mut() = Jid::new(&config.jid).ok();
                            *iq.to_mut() = ping_to.clone();
                            if let Err(e) = comp.send(&Element::from(iq)).await {
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

    #[test]
    fn handshake_is_hex_sha1_of_id_and_secret() {
        // Computed independently: python3 -c 'hashlib.sha1(b"3BF96D32sesame").hexdigest()'.
        assert_eq!(
            handshake_digest("3BF96D32", "sesame"),
            "7a98dc4c9e92493d7fd66a25364c862637789c45"
        );
    }

    #[test]
    fn malformed_queries_get_bad_request_other_stanzas_nothing() {
        let bad: Element = "<iq xmlns='jabber:component:accept' type='get' id='b1' from='u@localhost/r' to='matrix.localhost'/>"
            .parse()
            .unwrap();
        let why = parse_stanza(&bad).unwrap_err();
        let reply = String::from(&bad_request(&bad, &why).unwrap());
        assert!(reply.contains("bad-request") && reply.contains("b1"), "{reply}");
        assert!(
            reply.contains("to=\"u@localhost/r\"") || reply.contains("to='u@localhost/r'"),
            "{reply}"
        );
        let err: Element = "<iq xmlns='jabber:component:accept' type='error' id='b2' from='u@localhost/r' to='matrix.localhost'/>"
            .parse()
            .unwrap();
        assert!(bad_request(&err, "x").is_none());
        let presence: Element = "<presence xmlns='jabber:component:accept' from='r@conference.localhost/x' to='b@matrix.localhost/trestle'><show>bogus</show></presence>"
            .parse()
            .unwrap();
        let why = parse_stanza(&presence).unwrap_err();
        assert!(bad_request(&presence, &why).is_none(), "never answer a room's broadcast");
        let other: Element = "<foo xmlns='jabber:component:accept'/>".parse().unwrap();
        assert!(matches!(parse_stanza(&other), Ok(None)));
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
        let p = Presence::available();
        assert!(matches!(sender.send(p), Err(ConnError::Offline)));
        token.cancel();
    }
}
