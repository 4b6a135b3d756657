//! A direct SMPP 3.4 connection to an SMSC (the bridge is the ESME).
//!
//! - One `bind_transceiver` session (system_id / password / system_type), kept alive with
//!   `enquire_link`; a lost or unanswered session is reconnected with exponential backoff plus
//!   jitter.
//! - **Send:** one `submit_sm` per part with `registered_delivery` = 1 (receipt requested),
//!   `data_coding` 0 (GSM 03.38, unpacked) or 8 (UCS-2); long texts are the bridge's own parts,
//!   each with a concatenation UDH (`esm_class` 0x40). At most `window` requests are
//!   outstanding. `ESME_RTHROTTLED` (0x58) is retried after a growing pause.
//! - **Receive:** `deliver_sm` MO messages (UDH-concatenated parts reassembled) and delivery
//!   receipts (`esm_class` 0x04; the `receipted_message_id` / `message_state` TLVs or the
//!   `id:… stat:…` text). A `deliver_sm` is answered only once the bridge handled it; if that
//!   failed the answer is `ESME_RX_T_APPN` (temporary), so the SMSC delivers it again. A
//!   `deliver_sm` delivered again is recognised ([`redelivery`]): it creates no second message.
//! - Unknown requests get `generic_nack`; `unbind` from the SMSC is answered and the session
//!   reconnects; on shutdown the bridge unbinds.

pub mod pdu;
pub mod redelivery;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::{Semaphore, mpsc, oneshot},
};
use tokio_util::sync::CancellationToken;

use self::{
    pdu::{Pdu, ShortMessage, cmd, status},
    redelivery::{Redeliveries, Verdict},
};
use super::{
    DeliveryReport, DeliveryStatus, EventSink, Gateway, GatewayError, GatewayEvent, InboundSms,
    OutboundSms,
};
use crate::encoding::{Encoding, gsm7_decode, gsm7_encode, ucs2_decode, ucs2_encode};

/// Settings of the SMPP gateway.
#[derive(Clone)]
pub struct SmppSettings {
    /// `host:port` of the SMSC.
    pub address: String,
    /// bind system_id.
    pub system_id: String,
    /// bind password.
    pub password: String,
    /// bind system_type.
    pub system_type: String,
    /// Most requests awaiting their response at once.
    pub window: usize,
    /// Pause between `enquire_link`s.
    pub enquire_link_interval: Duration,
    /// How long a response may take.
    pub response_timeout: Duration,
    /// First pause before reconnecting.
    pub reconnect_min: Duration,
    /// Longest pause before reconnecting.
    pub reconnect_max: Duration,
    /// Retries of a throttled `submit_sm`.
    pub throttle_retries: u32,
    /// First pause before retrying a throttled `submit_sm` (doubled each time).
    pub throttle_pause: Duration,
    /// How a message longer than one SMS travels.
    pub long_messages: LongMessages,
}

/// How a message longer than one SMS is submitted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LongMessages {
    /// One `submit_sm` per part, with a concatenation user data header (works everywhere).
    #[default]
    Udh,
    /// One `submit_sm` carrying the whole text in the `message_payload` TLV; the SMSC splits it
    /// (for SMSCs that prefer it; one message id, one receipt).
    MessagePayload,
}

impl std::fmt::Debug for SmppSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmppSettings")
            .field("address", &self.address)
            .field("system_id", &self.system_id)
            .field("password", &"<redacted>")
            .field("system_type", &self.system_type)
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

/// A request for the session: a PDU to send and where its response goes.
struct Request {
    command_id: u32,
    body: Vec<u8>,
    reply: oneshot::Sender<Pdu>,
}

/// Which bridge message (and part) an SMSC message id belongs to.
#[derive(Debug, Clone)]
struct PartOf {
    id: String,
    part: Option<(u8, u8)>,
}

/// The SMPP gateway.
#[derive(Debug, Clone)]
pub struct Smpp {
    settings: Arc<SmppSettings>,
    requests: mpsc::Sender<Request>,
    queue: Arc<Mutex<Option<mpsc::Receiver<Request>>>>,
    window: Arc<Semaphore>,
    /// SMSC message id → bridge message (parts of long messages); kept in memory only.
    parts: Arc<Mutex<HashMap<String, PartOf>>>,
    reference: Arc<AtomicU8>,
    /// deliver_sm seen, to recognise the SMSC delivering one again (in memory only).
    redeliveries: Arc<Mutex<Redeliveries>>,
    /// Numbers the sessions (connections), for `redeliveries`.
    sessions: Arc<AtomicU64>,
    /// Parts of concatenated MO messages waiting for the rest: kept across sessions, and in
    /// `store` (when given) across restarts, since each part was answered as received.
    pending: Arc<Mutex<Pending>>,
    /// Where `pending` is kept; `None` keeps it in memory only.
    store: Option<Arc<dyn trestle::store::Store>>,
    /// Whether `pending` was loaded from `store`.
    loaded: Arc<tokio::sync::OnceCell<()>>,
}

/// The store key holding the parts of incomplete concatenated MO messages.
const PENDING_KEY: &str = "sms.smpp.pending_mo";

/// Most remembered SMSC message ids (the oldest are forgotten first… roughly: the map is
/// cleared when full).
const MAX_REMEMBERED: usize = 100_000;

impl Smpp {
    /// A gateway with these settings (connects in [`Gateway::start`]).
    pub fn new(settings: SmppSettings) -> Self {
        let (tx, rx) = mpsc::channel(1024);
        Self {
            window: Arc::new(Semaphore::new(settings.window.max(1))),
            settings: Arc::new(settings),
            requests: tx,
            queue: Arc::new(Mutex::new(Some(rx))),
            parts: Arc::new(Mutex::new(HashMap::new())),
            reference: Arc::new(AtomicU8::new(rand::random())),
            redeliveries: Arc::default(),
            sessions: Arc::default(),
            pending: Arc::default(),
            store: None,
            loaded: Arc::default(),
        }
    }

    /// Keeps the parts of incomplete concatenated MO messages in `store`, so that a restart
    /// loses none of the parts the SMSC was already told were received.
    #[must_use]
    pub fn with_store(mut self, store: Arc<dyn trestle::store::Store>) -> Self {
        self.store = Some(store);
        self
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Loads the stored parts, once.
    async fn load_pending(&self) {
        let Some(store) = &self.store else { return };
        self.loaded
            .get_or_init(|| async {
                match store.kv_get(PENDING_KEY).await {
                    Ok(Some(json)) => {
                        match serde_json::from_str::<Vec<(PendingKey, PendingParts)>>(&json) {
                            Ok(stored) => {
                                tracing::info!(
                                    messages = stored.len(),
                                    "incomplete concatenated SMS parts restored"
                                );
                                self.pending().extend(stored);
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "stored SMS parts unreadable; ignored")
                            }
                        }
                    }
                    Ok(None) => {}
                    Err(e) => tracing::error!(error = %e, "cannot read the stored SMS parts"),
                }
            })
            .await;
    }

    /// Writes the parts held now to the store. A failure is returned: the deliver_sm is then
    /// not acknowledged, so the SMSC delivers it again.
    async fn save_pending(&self) -> Result<(), String> {
        let Some(store) = &self.store else { return Ok(()) };
        let json = {
            let pending = self.pending();
            let all: Vec<(&PendingKey, &PendingParts)> = pending.iter().collect();
            serde_json::to_string(&all).map_err(|e| e.to_string())?
        };
        store.kv_set(PENDING_KEY, &json).await.map_err(|e| e.to_string())
    }

    fn redeliveries(&self) -> std::sync::MutexGuard<'_, Redeliveries> {
        self.redeliveries.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Handles one deliver_sm (`body`) that arrived on `session`; returns the status to answer
    /// with.
    async fn handle_deliver(&self, body: &[u8], sink: &dyn EventSink, session: u64) -> u32 {
        self.load_pending().await;
        let digest = redelivery::digest(body);
        let now = Instant::now();
        let id = match self.redeliveries().verdict(&digest, now, self.settings.response_timeout) {
            Verdict::AlreadyHandled => {
                tracing::info!(
                    "deliver_sm delivered again after our answer was late or lost; answered again"
                );
                return status::OK;
            }
            Verdict::Again(id) => {
                tracing::info!(id, "deliver_sm delivered again after it failed; handled again");
                Some(id)
            }
            Verdict::New => None,
        };
        let sm = match ShortMessage::decode(body) {
            Ok(sm) => sm,
            Err(e) => {
                tracing::warn!(error = %e, "malformed deliver_sm");
                return status::INVMSGLEN;
            }
        };
        let classified = classify_deliver(&sm, &mut self.pending(), self, id);
        let Some((event, restore)) = classified else {
            // A part held for the rest: on disk before the SMSC is told it arrived.
            if let Err(e) = self.save_pending().await {
                tracing::warn!(error = e, "cannot keep an SMS part; SMSC will redeliver");
                return status::RX_T_APPN;
            }
            self.redeliveries().arrived(digest, session, None, now);
            return status::OK;
        };
        let message_id = match &event {
            GatewayEvent::Inbound(sms) => Some(sms.gateway_id.clone()),
            GatewayEvent::Report(_) => None,
        };
        self.redeliveries().arrived(digest, session, message_id, now);
        match sink.handle(event).await {
            Ok(()) => {
                if restore.is_some()
                    && let Err(e) = self.save_pending().await
                {
                    // Only the completed message's parts stay stored, until the next write.
                    tracing::warn!(error = e, "cannot drop the stored parts of a bridged SMS");
                }
                status::OK
            }
            Err(e) => {
                tracing::warn!(error = e, "deliver_sm not handled; SMSC will redeliver");
                // The SMSC delivers only this part again: the others must still be here.
                if let Some((key, parts)) = restore {
                    self.pending().insert(key, parts);
                }
                status::RX_T_APPN
            }
        }
    }

    /// Sends a request through the session (waiting for a free window slot) and returns the
    /// response.
    async fn request(&self, command_id: u32, body: Vec<u8>) -> Result<Pdu, GatewayError> {
        let s = &self.settings;
        // Not bound: the request waits in the queue until the session is up, within reason.
        let wait = s.response_timeout * 3;
        let _slot = tokio::time::timeout(wait, self.window.acquire())
            .await
            .map_err(|_| GatewayError::Temporary("SMPP window full".into()))?
            .map_err(|_| GatewayError::Temporary("SMPP gateway stopped".into()))?;
        let (reply, rx) = oneshot::channel();
        self.requests
            .send(Request { command_id, body, reply })
            .await
            .map_err(|_| GatewayError::Temporary("SMPP gateway stopped".into()))?;
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(_)) => Err(GatewayError::Temporary("SMPP session lost".into())),
            Err(_) => Err(GatewayError::Temporary("no SMPP response in time".into())),
        }
    }

    /// One submit_sm, retried while throttled; returns the SMSC's message id.
    async fn submit(&self, sm: &ShortMessage) -> Result<String, GatewayError> {
        let mut pause = self.settings.throttle_pause;
        let mut attempt = 0;
        loop {
            let resp = self.request(cmd::SUBMIT_SM, sm.encode()).await?;
            match resp.status {
                status::OK => {
                    return pdu::submit_resp_message_id(&resp.body)
                        .map_err(|e| GatewayError::Temporary(format!("bad submit_sm_resp: {e}")));
                }
                status::THROTTLED if attempt < self.settings.throttle_retries => {
                    attempt += 1;
                    let jitter = pause.mul_f64(rand::random::<f64>() * 0.2);
                    tracing::info!(attempt, pause_ms = pause.as_millis(), "SMSC throttled a submit_sm; retrying");
                    tokio::time::sleep(pause + jitter).await;
                    pause = (pause * 2).min(Duration::from_secs(60));
                }
                status::THROTTLED | status::SYSERR | 0x14 /* RMSGQFUL */ => {
                    return Err(GatewayError::Temporary(format!(
                        "SMSC answered submit_sm with status 0x{:08X}",
                        resp.status
                    )));
                }
                s => {
                    return Err(GatewayError::Rejected(format!(
                        "SMSC refused the message (status 0x{s:08X})"
                    )));
                }
            }
        }
    }

    fn remember(&self, smsc_id: &str, of: PartOf) {
        let mut parts = self.parts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if parts.len() >= MAX_REMEMBERED {
            parts.clear();
        }
        parts.insert(smsc_id.to_owned(), of);
    }

    /// Maps a receipt's SMSC id to the bridge's message (a single-part message is named by
    /// the SMSC id itself, so its receipts work across restarts).
    fn part_of(&self, smsc_id: &str) -> PartOf {
        let parts = self.parts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        parts.get(smsc_id).cloned().unwrap_or(PartOf { id: smsc_id.to_owned(), part: None })
    }
}

/// The short messages for `sms`: one per part, each with its UDH when there are several; or,
/// with [`LongMessages::MessagePayload`], one whose `message_payload` holds every part.
pub fn build_submits(sms: &OutboundSms, reference: u8, long: LongMessages) -> Vec<ShortMessage> {
    let total = u8::try_from(sms.parts.len()).unwrap_or(u8::MAX);
    let data_coding = match sms.encoding {
        Encoding::Gsm7 => 0,
        Encoding::Ucs2 => 8,
    };
    let encode = |part: &str| match sms.encoding {
        Encoding::Gsm7 => gsm7_encode(part).unwrap_or_else(|| ucs2_encode(part)),
        Encoding::Ucs2 => ucs2_encode(part),
    };
    let message = |esm_class, short_message, tlvs| ShortMessage {
        source: pdu::Address::from_number(&sms.from),
        dest: pdu::Address::from_number(&sms.to),
        esm_class,
        registered_delivery: 1,
        data_coding,
        short_message,
        tlvs,
        ..Default::default()
    };
    if total > 1 && long == LongMessages::MessagePayload {
        let payload = encode(&sms.parts.concat());
        return vec![message(0, Vec::new(), vec![(pdu::tag::MESSAGE_PAYLOAD, payload)])];
    }
    sms.parts
        .iter()
        .take(usize::from(u8::MAX))
        .enumerate()
        .map(|(i, part)| {
            let text = encode(part);
            if total > 1 {
                let seq = u8::try_from(i + 1).unwrap_or(u8::MAX);
                let udh = pdu::concat_udh(reference, total, seq);
                message(pdu::ESM_UDHI, [&udh[..], &text].concat(), Vec::new())
            } else {
                message(0, text, Vec::new())
            }
        })
        .collect()
}

/// Decodes a short message's text by its data_coding (0/1/3 GSM or Latin-1 family, 8 UCS-2,
/// else Latin-1).
pub fn decode_text(data_coding: u8, octets: &[u8]) -> String {
    match data_coding {
        0 => gsm7_decode(octets),
        8 => ucs2_decode(octets),
        1 => String::from_utf8_lossy(octets).into_owned(),
        _ => octets.iter().map(|&b| char::from(b)).collect(),
    }
}

/// Maps a receipt's `stat` to a delivery status.
pub fn receipt_status(stat: &str, err: Option<&str>) -> DeliveryStatus {
    match stat {
        "DELIVRD" => DeliveryStatus::Delivered,
        "UNDELIV" | "EXPIRED" | "REJECTD" | "DELETED" => DeliveryStatus::Failed(match err {
            Some(e) if !e.is_empty() => format!("SMSC receipt {stat} (err {e})"),
            _ => format!("SMSC receipt {stat}"),
        }),
        other => DeliveryStatus::Pending(format!("SMSC receipt {other}")),
    }
}

/// Most concatenated MO messages buffered while incomplete.
const MAX_PENDING_MO: usize = 1000;

/// A concatenated MO message: (from, to, ref).
type PendingKey = (String, String, u16);
/// Its parts so far: (total, seq → text).
type PendingParts = (u8, HashMap<u8, String>);
/// Parts of concatenated MO messages waiting for the rest.
type Pending = HashMap<PendingKey, PendingParts>;

/// What a deliver_sm amounts to once parsed (and reassembled), with the parts it completed
/// (to put back if handling fails). An inbound message gets `id`, else a new id.
fn classify_deliver(
    sm: &ShortMessage,
    pending: &mut Pending,
    gateway: &Smpp,
    id: Option<String>,
) -> Option<(GatewayEvent, Option<(PendingKey, PendingParts)>)> {
    if sm.esm_class & 0x3C == pdu::ESM_RECEIPT {
        let r = pdu::parse_receipt(sm)?;
        let of = gateway.part_of(&r.message_id);
        let report = DeliveryReport {
            message_id: of.id,
            status: receipt_status(&r.stat, r.err.as_deref()),
            part: of.part,
        };
        return Some((GatewayEvent::Report(report), None));
    }
    let (udh, octets) = sm.split_udh();
    let text = decode_text(sm.data_coding, octets);
    let from = sm.source.to_number();
    let to = sm.dest.to_number();
    let mut restore = None;
    let text = match udh.and_then(pdu::udh_concat) {
        Some((reference, total, seq)) if total > 1 && seq >= 1 && seq <= total => {
            let key = (from.clone(), to.clone(), reference);
            if pending.len() >= MAX_PENDING_MO && !pending.contains_key(&key) {
                tracing::warn!("too many incomplete concatenated SMS; dropping the buffered parts");
                pending.clear();
            }
            let entry = pending.entry(key.clone()).or_insert_with(|| (total, HashMap::new()));
            entry.1.insert(seq, text);
            if entry.1.len() < usize::from(entry.0) {
                tracing::debug!(from, seq, total, "MO part buffered");
                return None;
            }
            let (total, parts) = pending.remove(&key)?;
            let text = (1..=total).filter_map(|n| parts.get(&n).cloned()).collect::<String>();
            restore = Some((key, (total, parts)));
            text
        }
        _ => text,
    };
    let sms = InboundSms {
        // deliver_sm carries no id of its own: one is made up (and reused for a redelivery).
        gateway_id: id.unwrap_or_else(|| format!("smpp-{}", super::new_message_id())),
        from,
        to,
        text,
        media: Vec::new(),
    };
    Some((GatewayEvent::Inbound(sms), restore))
}

/// Backoff for attempt `n` (from 0): min·2ⁿ capped at max, plus up to 25% jitter.
pub fn backoff(n: u32, min: Duration, max: Duration) -> Duration {
    let base = min.saturating_mul(2u32.saturating_pow(n.min(16))).min(max);
    base + base.mul_f64(rand::random::<f64>() * 0.25)
}

#[async_trait]
impl Gateway for Smpp {
    fn name(&self) -> &'static str {
        "smpp"
    }

    async fn send(&self, sms: &OutboundSms) -> Result<String, GatewayError> {
        let reference = self.reference.fetch_add(1, Ordering::Relaxed);
        let submits = build_submits(sms, reference, self.settings.long_messages);
        let total = u8::try_from(submits.len()).unwrap_or(u8::MAX);
        if total <= 1 {
            let sm = submits.first().ok_or_else(|| GatewayError::Rejected("empty".into()))?;
            return self.submit(sm).await;
        }
        // The parts go in order; each SMSC id is remembered so its receipt names the part.
        for (i, sm) in submits.iter().enumerate() {
            let smsc_id = self.submit(sm).await?;
            let seq = u8::try_from(i + 1).unwrap_or(u8::MAX);
            self.remember(&smsc_id, PartOf { id: sms.id.clone(), part: Some((seq, total)) });
        }
        Ok(sms.id.clone())
    }

    fn routes(&self, _sink: Arc<dyn EventSink>) -> axum::Router {
        axum::Router::new()
    }

    fn start(&self, sink: Arc<dyn EventSink>, shutdown: CancellationToken) {
        let queue = self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        let Some(queue) = queue else { return };
        let me = self.clone();
        tokio::spawn(async move { me.run(queue, sink, shutdown).await });
    }
}

/// Why a session ended.
enum End {
    Shutdown,
    Lost(String),
}

impl Smpp {
    async fn run(
        self,
        mut queue: mpsc::Receiver<Request>,
        sink: Arc<dyn EventSink>,
        shutdown: CancellationToken,
    ) {
        let s = Arc::clone(&self.settings);
        let mut failures = 0u32;
        loop {
            // The session watches `shutdown` itself (to unbind first).
            let ended = self.session(&mut queue, &sink, &shutdown).await;
            match ended {
                Ok(End::Shutdown) => return,
                Ok(End::Lost(why)) => {
                    // It was bound: start the backoff afresh.
                    tracing::warn!(
                        address = s.address,
                        reason = why,
                        "SMPP session lost; reconnecting"
                    );
                    failures = 0;
                }
                Err(why) => {
                    tracing::warn!(address = s.address, reason = why, "SMPP connection failed");
                    failures += 1;
                }
            }
            let pause = backoff(failures, s.reconnect_min, s.reconnect_max);
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Connects and binds as a transceiver (`seq` is the bind's sequence number).
    async fn connect_and_bind(&self, seq: u32, buf: &mut Vec<u8>) -> Result<TcpStream, String> {
        let s = &self.settings;
        let mut stream = tokio::time::timeout(s.response_timeout, TcpStream::connect(&s.address))
            .await
            .map_err(|_| "connect timed out".to_owned())?
            .map_err(|e| format!("cannot connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        let bind = Pdu::new(
            cmd::BIND_TRANSCEIVER,
            seq,
            pdu::bind_transceiver(&s.system_id, &s.password, &s.system_type),
        );
        stream.write_all(&bind.encode()).await.map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(s.response_timeout, read_pdu(&mut stream, buf))
            .await
            .map_err(|_| "no bind response".to_owned())??;
        if resp.command_id != cmd::BIND_TRANSCEIVER_RESP || resp.status != status::OK {
            return Err(format!(
                "bind refused (command 0x{:08X}, status 0x{:08X})",
                resp.command_id, resp.status
            ));
        }
        let smsc = pdu::bind_resp_system_id(&resp.body).unwrap_or_default();
        tracing::info!(address = s.address, smsc, "SMPP bound (transceiver)");
        Ok(stream)
    }

    /// Connects, binds and serves one session. `Err` when it never got bound.
    async fn session(
        &self,
        queue: &mut mpsc::Receiver<Request>,
        sink: &Arc<dyn EventSink>,
        shutdown: &CancellationToken,
    ) -> Result<End, String> {
        let s = &self.settings;
        let mut seq: u32 = 1;
        let mut buf = Vec::new();
        let stream = tokio::select! {
            () = shutdown.cancelled() => return Ok(End::Shutdown),
            r = self.connect_and_bind(seq, &mut buf) => r?,
        };

        let session = self.sessions.fetch_add(1, Ordering::Relaxed);
        let (mut rd, mut wr) = stream.into_split();
        // Everything written goes through one writer task.
        let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(256);
        let writer = tokio::spawn(async move {
            while let Some(b) = out_rx.recv().await {
                if wr.write_all(&b).await.is_err() {
                    break;
                }
            }
            let _ = wr.shutdown().await;
        });
        // deliver_sm are handled in order by one worker, which answers each after handling.
        let (mo_tx, mut mo_rx) = mpsc::channel::<Pdu>(256);
        let worker = {
            let out = out_tx.clone();
            let sink = Arc::clone(sink);
            let me = self.clone();
            tokio::spawn(async move {
                while let Some(p) = mo_rx.recv().await {
                    let st = me.handle_deliver(&p.body, sink.as_ref(), session).await;
                    let resp = Pdu {
                        command_id: cmd::DELIVER_SM_RESP,
                        status: st,
                        sequence: p.sequence,
                        body: vec![0],
                    };
                    if out.send(resp.encode()).await.is_err() {
                        break;
                    }
                    if st == status::OK {
                        me.redeliveries().answered(&redelivery::digest(&p.body), Instant::now());
                    }
                }
            })
        };

        let mut waiting: HashMap<u32, (oneshot::Sender<Pdu>, tokio::time::Instant)> =
            HashMap::new();
        let mut enquire = tokio::time::interval(s.enquire_link_interval);
        enquire.tick().await;
        let mut enquire_sent: Option<(u32, tokio::time::Instant)> = None;
        let mut read_buf = buf;
        let mut chunk = vec![0u8; 8192];
        let mut check = tokio::time::interval(Duration::from_millis(500));
        let mut next_seq = || {
            seq = if seq >= 0x7FFF_FFFF { 1 } else { seq + 1 };
            seq
        };
        let end = loop {
            tokio::select! {
                () = shutdown.cancelled() => {
                    let n = next_seq();
                    let _ = out_tx.send(Pdu::new(cmd::UNBIND, n, vec![]).encode()).await;
                    // Give the unbind_resp a moment.
                    let _ = tokio::time::timeout(Duration::from_secs(2), async {
                        loop {
                            match read_more(&mut rd, &mut read_buf, &mut chunk).await {
                                Ok(Some(p)) if p.command_id == cmd::UNBIND_RESP => break,
                                Ok(Some(_)) => {}
                                _ => break,
                            }
                        }
                    }).await;
                    break End::Shutdown;
                }
                req = queue.recv() => {
                    let Some(req) = req else { break End::Shutdown };
                    // Its sender gave up (it waited while we were disconnected): sending it now
                    // would duplicate the retry.
                    if req.reply.is_closed() {
                        continue;
                    }
                    let n = next_seq();
                    waiting.insert(n, (req.reply, tokio::time::Instant::now()));
                    if out_tx.send(Pdu::new(req.command_id, n, req.body).encode()).await.is_err() {
                        break End::Lost("writer stopped".into());
                    }
                }
                _ = enquire.tick() => {
                    if enquire_sent.is_none() {
                        let n = next_seq();
                        enquire_sent = Some((n, tokio::time::Instant::now()));
                        let _ = out_tx.send(Pdu::new(cmd::ENQUIRE_LINK, n, vec![]).encode()).await;
                    }
                }
                _ = check.tick() => {
                    if let Some((_, at)) = enquire_sent
                        && at.elapsed() > s.response_timeout
                    {
                        break End::Lost("enquire_link unanswered".into());
                    }
                    // Requests whose response is overdue are failed (their senders retry).
                    waiting.retain(|_, (_, at)| at.elapsed() <= s.response_timeout);
                }
                got = read_more(&mut rd, &mut read_buf, &mut chunk) => {
                    let p = match got {
                        Ok(Some(p)) => p,
                        Ok(None) => break End::Lost("closed by the SMSC".into()),
                        Err(e) => break End::Lost(e),
                    };
                    match p.command_id {
                        cmd::ENQUIRE_LINK => {
                            let r = Pdu::new(cmd::ENQUIRE_LINK_RESP, p.sequence, vec![]);
                            let _ = out_tx.send(r.encode()).await;
                        }
                        cmd::ENQUIRE_LINK_RESP => {
                            if enquire_sent.is_some_and(|(n, _)| n == p.sequence) {
                                enquire_sent = None;
                            }
                        }
                        cmd::DELIVER_SM => {
                            if mo_tx.send(p).await.is_err() {
                                break End::Lost("deliver_sm worker stopped".into());
                            }
                        }
                        cmd::UNBIND => {
                            let r = Pdu::new(cmd::UNBIND_RESP, p.sequence, vec![]);
                            let _ = out_tx.send(r.encode()).await;
                            break End::Lost("the SMSC unbound".into());
                        }
                        cmd::GENERIC_NACK => {
                            tracing::warn!(sequence = p.sequence, status = p.status, "SMSC sent generic_nack");
                            if let Some((reply, _)) = waiting.remove(&p.sequence) {
                                let _ = reply.send(p);
                            }
                        }
                        id if p.is_response() => {
                            match waiting.remove(&p.sequence) {
                                Some((reply, _)) => { let _ = reply.send(p); }
                                None => tracing::debug!(command = id, sequence = p.sequence, "response to nothing pending"),
                            }
                        }
                        id => {
                            tracing::warn!(command = id, "unsupported SMPP request; generic_nack");
                            let r = Pdu { command_id: cmd::GENERIC_NACK, status: status::INVCMDID, sequence: p.sequence, body: vec![] };
                            let _ = out_tx.send(r.encode()).await;
                        }
                    }
                }
            }
        };
        drop(mo_tx);
        // Let the worker answer what it has, then close.
        let _ = tokio::time::timeout(Duration::from_secs(5), worker).await;
        drop(out_tx);
        let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
        // Answers given shortly before may not have arrived.
        self.redeliveries().session_ended(session, Instant::now());
        Ok(end)
    }
}

/// Reads until one PDU is complete (`Ok(None)` at end of stream). A PDU with an unusable length
/// is an error (the stream cannot be resynchronised).
async fn read_more<R: tokio::io::AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut Vec<u8>,
    chunk: &mut [u8],
) -> Result<Option<Pdu>, String> {
    loop {
        match pdu::decode_frame(buf) {
            Ok(Some((p, used))) => {
                buf.drain(..used);
                return Ok(Some(p));
            }
            Ok(None) => {}
            Err(e) => return Err(e.to_string()),
        }
        let n = rd.read(chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn read_pdu(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Pdu, String> {
    let mut chunk = vec![0u8; 4096];
    read_more(stream, buf, &mut chunk).await?.ok_or_else(|| "closed during bind".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sms(text: &str) -> OutboundSms {
        let s = crate::encoding::segment(text);
        OutboundSms {
            id: "b1".into(),
            from: "+441234567890".into(),
            to: "+447700900123".into(),
            text: text.into(),
            encoding: s.encoding,
            parts: s.parts,
            media: Vec::new(),
        }
    }

    #[test]
    fn submits_single_and_concatenated() {
        let one = build_submits(&sms("Hi {you}"), 5, LongMessages::Udh);
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].data_coding, 0);
        assert_eq!(one[0].esm_class, 0);
        assert_eq!(one[0].registered_delivery, 1);
        assert_eq!(one[0].short_message, b"Hi \x1b\x28you\x1b\x29");
        assert_eq!((one[0].dest.ton, one[0].dest.addr.as_str()), (1, "447700900123"));

        let long = build_submits(&sms(&"я".repeat(100)), 9, LongMessages::Udh);
        assert_eq!(long.len(), 2);
        for (i, sm) in long.iter().enumerate() {
            assert_eq!(sm.data_coding, 8);
            assert_eq!(sm.esm_class, pdu::ESM_UDHI);
            let (udh, text) = sm.split_udh();
            assert_eq!(pdu::udh_concat(udh.unwrap()), Some((9, 2, u8::try_from(i + 1).unwrap())));
            assert_eq!(text.len(), if i == 0 { 134 } else { 66 });
            // Each part fits one short_message.
            assert!(sm.short_message.len() <= 140);
        }
        let gsm = build_submits(&sms(&"x".repeat(200)), 1, LongMessages::Udh);
        assert_eq!(gsm.iter().map(|s| s.short_message.len()).collect::<Vec<_>>(), [159, 53]);

        // message_payload: one submit_sm, empty short_message, the whole text in the TLV, which
        // survives encoding and is what the receiving side reads as the user data.
        let payload = build_submits(&sms(&"я".repeat(100)), 9, LongMessages::MessagePayload);
        assert_eq!(payload.len(), 1);
        let sm = ShortMessage::decode(&payload[0].encode()).unwrap();
        assert_eq!((sm.esm_class, sm.data_coding, sm.short_message.len()), (0, 8, 0));
        assert_eq!(sm.split_udh(), (None, &ucs2_encode(&"я".repeat(100))[..]));
        assert_eq!(decode_text(8, sm.user_data()), "я".repeat(100));
        // A single part stays in short_message whatever the setting.
        let one = build_submits(&sms("short"), 1, LongMessages::MessagePayload);
        assert_eq!((one[0].short_message.as_slice(), one[0].tlvs.len()), (&b"short"[..], 0));
    }

    #[test]
    fn text_decoding() {
        assert_eq!(decode_text(0, &[0x48, 0x69, 0x1B, 0x65]), "Hi€");
        assert_eq!(decode_text(8, &[0x04, 0x4F]), "я");
        assert_eq!(decode_text(3, &[0xE9]), "é");
    }

    #[test]
    fn receipt_statuses() {
        assert_eq!(receipt_status("DELIVRD", Some("000")), DeliveryStatus::Delivered);
        assert_eq!(
            receipt_status("UNDELIV", Some("001")),
            DeliveryStatus::Failed("SMSC receipt UNDELIV (err 001)".into())
        );
        assert!(matches!(receipt_status("ENROUTE", None), DeliveryStatus::Pending(_)));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let (min, max) = (Duration::from_secs(1), Duration::from_secs(30));
        let b0 = backoff(0, min, max);
        assert!(b0 >= min && b0 <= min.mul_f64(1.25));
        let b3 = backoff(3, min, max);
        assert!(b3 >= Duration::from_secs(8) && b3 <= Duration::from_secs(10));
        let b40 = backoff(40, min, max);
        assert!(b40 >= max && b40 <= max.mul_f64(1.25));
    }

    #[test]
    fn mo_reassembly_and_receipts() {
        let gw = Smpp::new(SmppSettings {
            address: "127.0.0.1:1".into(),
            system_id: "x".into(),
            password: "y".into(),
            system_type: String::new(),
            window: 1,
            enquire_link_interval: Duration::from_secs(30),
            response_timeout: Duration::from_secs(5),
            reconnect_min: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(2),
            throttle_retries: 1,
            throttle_pause: Duration::from_millis(10),
            long_messages: LongMessages::Udh,
        });
        let mut pending = Pending::new();
        let part = |seq: u8, text: &[u8]| ShortMessage {
            source: pdu::Address::from_number("+447700900123"),
            dest: pdu::Address::from_number("+441234567890"),
            esm_class: pdu::ESM_UDHI,
            short_message: [&pdu::concat_udh(3, 2, seq)[..], text].concat(),
            ..Default::default()
        };
        // Out of order: part 2 first.
        assert_eq!(classify_deliver(&part(2, b"world"), &mut pending, &gw, None), None);
        let Some((GatewayEvent::Inbound(sms), restore)) =
            classify_deliver(&part(1, b"hello "), &mut pending, &gw, Some("given".into()))
        else {
            panic!("no message")
        };
        assert_eq!(sms.gateway_id, "given");
        // The parts, to put back should handling fail.
        let (key, (total, parts)) = restore.unwrap();
        assert_eq!((key.2, total, parts.len()), (3, 2, 2));
        assert_eq!(
            (sms.text.as_str(), sms.from.as_str(), sms.to.as_str()),
            ("hello world", "+447700900123", "+441234567890")
        );
        assert!(pending.is_empty());

        gw.remember("smsc-2", PartOf { id: "bridge-1".into(), part: Some((2, 2)) });
        let receipt = |id: &str| {
            ShortMessage {
            esm_class: pdu::ESM_RECEIPT,
            short_message: format!("id:{id} sub:001 dlvrd:001 submit date:2611231200 done date:2611231200 stat:DELIVRD err:000 text:").into_bytes(),
            ..Default::default()
        }
        };
        assert_eq!(
            classify_deliver(&receipt("smsc-2"), &mut pending, &gw, None),
            Some((
                GatewayEvent::Report(DeliveryReport {
                    message_id: "bridge-1".into(),
                    status: DeliveryStatus::Delivered,
                    part: Some((2, 2)),
                }),
                None
            ))
        );
        assert_eq!(
            classify_deliver(&receipt("single"), &mut pending, &gw, None),
            Some((
                GatewayEvent::Report(DeliveryReport {
                    message_id: "single".into(),
                    status: DeliveryStatus::Delivered,
                    part: None,
                }),
                None
            ))
        );
    }

    struct NullSink;

    #[async_trait]
    impl EventSink for NullSink {
        async fn handle(&self, _event: GatewayEvent) -> Result<(), String> {
            Ok(())
        }
    }

    /// Fails the first `fail` events; records every event.
    #[derive(Default)]
    struct Flaky {
        fail: AtomicU8,
        seen: Mutex<Vec<GatewayEvent>>,
    }

    #[async_trait]
    impl EventSink for Flaky {
        async fn handle(&self, event: GatewayEvent) -> Result<(), String> {
            self.seen.lock().unwrap().push(event);
            if self.fail.load(Ordering::SeqCst) > 0 {
                self.fail.fetch_sub(1, Ordering::SeqCst);
                return Err("homeserver down".into());
            }
            Ok(())
        }
    }

    #[tokio::test]
    async fn deliver_sm_delivered_again_keeps_its_id_or_is_only_answered() {
        let gw = Smpp::new(settings("127.0.0.1:1".into(), 1));
        let sink = Flaky { fail: AtomicU8::new(1), ..Default::default() };
        let part = |seq: u8, text: &[u8]| {
            ShortMessage {
                source: pdu::Address::from_number("+447700900123"),
                dest: pdu::Address::from_number("+441234567890"),
                esm_class: pdu::ESM_UDHI,
                short_message: [&pdu::concat_udh(9, 2, seq)[..], text].concat(),
                ..Default::default()
            }
            .encode()
        };
        let (p1, p2) = (part(1, b"hello "), part(2, b"world"));
        // Part 1 is buffered; part 2 completes the message but handling fails: a temporary error.
        assert_eq!(gw.handle_deliver(&p1, &sink, 0).await, status::OK);
        assert_eq!(gw.handle_deliver(&p2, &sink, 0).await, status::RX_T_APPN);
        // The SMSC delivers part 2 again: the message completes (part 1 was kept) under the
        // same id, so the bridge's idempotency applies.
        assert_eq!(gw.handle_deliver(&p2, &sink, 0).await, status::OK);
        gw.redeliveries().answered(&redelivery::digest(&p2), Instant::now());
        let ids: Vec<(String, String)> = sink
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                GatewayEvent::Inbound(s) => Some((s.gateway_id.clone(), s.text.clone())),
                GatewayEvent::Report(_) => None,
            })
            .collect();
        assert_eq!(ids.len(), 2);
        assert_eq!(ids[0], ids[1]);
        assert_eq!(ids[0].1, "hello world");
        // Answered, but the session broke at once: delivered again on the next session, it is
        // only answered.
        gw.redeliveries().session_ended(0, Instant::now());
        assert_eq!(gw.handle_deliver(&p2, &sink, 1).await, status::OK);
        assert_eq!(sink.seen.lock().unwrap().len(), 2);
        // Garbage is refused as before.
        assert_eq!(gw.handle_deliver(&[1, 2], &sink, 1).await, status::INVMSGLEN);
    }

    #[tokio::test]
    async fn parts_held_for_the_rest_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn trestle::store::Store> =
            Arc::new(trestle::store::SqliteStore::open(&dir.path().join("t.db")).await.unwrap());
        let part = |seq: u8, text: &[u8]| {
            ShortMessage {
                source: pdu::Address::from_number("+447700900123"),
                dest: pdu::Address::from_number("+441234567890"),
                esm_class: pdu::ESM_UDHI,
                short_message: [&pdu::concat_udh(4, 2, seq)[..], text].concat(),
                ..Default::default()
            }
            .encode()
        };
        // Part 1 arrives and is answered; the bridge stops before part 2.
        let before = Smpp::new(settings("127.0.0.1:1".into(), 1)).with_store(Arc::clone(&store));
        let sink = Flaky::default();
        assert_eq!(before.handle_deliver(&part(1, b"kept "), &sink, 0).await, status::OK);
        assert!(sink.seen.lock().unwrap().is_empty());
        drop(before);
        // After the restart, part 2 completes the message.
        let after = Smpp::new(settings("127.0.0.1:1".into(), 1)).with_store(Arc::clone(&store));
        assert_eq!(after.handle_deliver(&part(2, b"across a restart"), &sink, 0).await, status::OK);
        let texts: Vec<String> = sink
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                GatewayEvent::Inbound(s) => Some(s.text.clone()),
                GatewayEvent::Report(_) => None,
            })
            .collect();
        assert_eq!(texts, ["kept across a restart"]);
        // Nothing is left stored once the message is bridged.
        assert_eq!(store.kv_get(PENDING_KEY).await.unwrap().as_deref(), Some("[]"));
    }

    fn settings(address: String, window: usize) -> SmppSettings {
        SmppSettings {
            address,
            system_id: "x".into(),
            password: "y".into(),
            system_type: String::new(),
            window,
            enquire_link_interval: Duration::from_secs(1),
            response_timeout: Duration::from_secs(1),
            reconnect_min: Duration::from_millis(50),
            reconnect_max: Duration::from_millis(100),
            throttle_retries: 0,
            throttle_pause: Duration::from_millis(10),
            long_messages: LongMessages::Udh,
        }
    }

    /// Accepts one connection and answers its bind.
    async fn accept_bound(l: &tokio::net::TcpListener) -> (TcpStream, Vec<u8>) {
        let (mut c, _) = l.accept().await.unwrap();
        let mut buf = Vec::new();
        let bind = read_pdu(&mut c, &mut buf).await.unwrap();
        assert_eq!(bind.command_id, cmd::BIND_TRANSCEIVER);
        let resp = Pdu::new(cmd::BIND_TRANSCEIVER_RESP, bind.sequence, b"t\0".to_vec());
        c.write_all(&resp.encode()).await.unwrap();
        (c, buf)
    }

    #[tokio::test]
    async fn window_limits_outstanding_requests() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gw = Smpp::new(settings(l.local_addr().unwrap().to_string(), 2));
        let stop = CancellationToken::new();
        gw.start(Arc::new(NullSink), stop.clone());
        let (mut c, mut buf) = accept_bound(&l).await;
        let sends: Vec<_> = (0..5)
            .map(|i| {
                let gw = gw.clone();
                tokio::spawn(async move { gw.send(&sms(&format!("m{i}"))).await })
            })
            .collect();
        let mut chunk = vec![0u8; 4096];
        let mut submits = Vec::new();
        // Unanswered, only `window` submit_sm arrive.
        while submits.len() < 3 {
            match tokio::time::timeout(
                Duration::from_millis(400),
                read_more(&mut c, &mut buf, &mut chunk),
            )
            .await
            {
                Ok(Ok(Some(p))) if p.command_id == cmd::SUBMIT_SM => submits.push(p),
                Ok(Ok(Some(_))) => {}
                _ => break,
            }
        }
        assert_eq!(submits.len(), 2, "outstanding requests beyond the window");
        // Answering them lets the others through.
        let mut answered = 0;
        let mut pending = submits;
        while answered < 5 {
            for p in pending.drain(..) {
                let id = format!("id{}\0", p.sequence);
                let r = Pdu::new(cmd::SUBMIT_SM_RESP, p.sequence, id.into_bytes());
                c.write_all(&r.encode()).await.unwrap();
                answered += 1;
            }
            if answered == 5 {
                break;
            }
            let p = tokio::time::timeout(
                Duration::from_secs(2),
                read_more(&mut c, &mut buf, &mut chunk),
            )
            .await
            .unwrap()
            .unwrap()
            .unwrap();
            if p.command_id == cmd::SUBMIT_SM {
                pending.push(p);
            }
        }
        for s in sends {
            assert!(s.await.unwrap().unwrap().starts_with("id"));
        }
        stop.cancel();
    }

    #[tokio::test]
    async fn unanswered_enquire_link_reconnects_and_throttling_fails_temporarily() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gw = Smpp::new(settings(l.local_addr().unwrap().to_string(), 1));
        let stop = CancellationToken::new();
        gw.start(Arc::new(NullSink), stop.clone());
        let (mut c, mut buf) = accept_bound(&l).await;
        // The enquire_link comes after about a second; it is not answered → a new connection.
        let mut chunk = vec![0u8; 4096];
        let p =
            tokio::time::timeout(Duration::from_secs(3), read_more(&mut c, &mut buf, &mut chunk))
                .await
                .unwrap()
                .unwrap()
                .unwrap();
        assert_eq!(p.command_id, cmd::ENQUIRE_LINK);
        let (mut c2, mut buf2) =
            tokio::time::timeout(Duration::from_secs(5), accept_bound(&l)).await.unwrap();
        // With no throttle retries configured, ESME_RTHROTTLED is a temporary failure.
        let send = tokio::spawn({
            let gw = gw.clone();
            async move { gw.send(&sms("hi")).await }
        });
        let p = loop {
            let p = read_more(&mut c2, &mut buf2, &mut chunk).await.unwrap().unwrap();
            if p.command_id == cmd::SUBMIT_SM {
                break p;
            }
        };
        let r = Pdu {
            command_id: cmd::SUBMIT_SM_RESP,
            status: status::THROTTLED,
            sequence: p.sequence,
            body: vec![],
        };
        c2.write_all(&r.encode()).await.unwrap();
        assert!(matches!(send.await.unwrap(), Err(GatewayError::Temporary(_))));
        // A request the ESME does not support gets generic_nack.
        c2.write_all(&Pdu::new(0x0000_0003, 77, vec![]).encode()).await.unwrap();
        let nack = loop {
            let p = read_more(&mut c2, &mut buf2, &mut chunk).await.unwrap().unwrap();
            if p.command_id == cmd::GENERIC_NACK {
                break p;
            }
        };
        assert_eq!((nack.sequence, nack.status), (77, status::INVCMDID));
        // Shutdown unbinds.
        stop.cancel();
        let p = loop {
            let p = read_more(&mut c2, &mut buf2, &mut chunk).await.unwrap().unwrap();
            if p.command_id != cmd::ENQUIRE_LINK {
                break p;
            }
        };
        assert_eq!(p.command_id, cmd::UNBIND);
        drop(c);
    }
}
