//! The SMS bridge on top of Trestle: one portal per (our number, their number), remote numbers
//! as ghosts, messages both ways, delivery reports as read receipts, opt-out keywords honoured.

use std::{net::SocketAddr, sync::Arc};

use async_trait::async_trait;
use serde_json::json;
use trestle::{
    bridge::{Bridge, BridgeError, BridgeInfo, GhostProfile, PortalSpec, RoomContext},
    commands::{Command, CommandError, CommandRegistry, PermissionLevel},
    config::Config,
    context::Context,
    event::{MatrixEvent, Message, MessageType},
    fetch::{FetchError, Fetcher, file_content},
    registration::{Namespace, Namespaces},
    store::{MessageMapping, Portal},
    util::keyed::KeyedLocks,
};

use crate::{
    config::{GatewayConfig, SmsConfig},
    encoding::{Encoding, segment},
    gateway::{
        DeliveryReport, DeliveryStatus, EventSink, Gateway, GatewayError, GatewayEvent,
        InboundMedia, InboundSms, OutboundSms,
        kannel::{Kannel, KannelSettings},
        new_message_id,
        smpp::{Smpp, SmppSettings},
        twilio::{Twilio, TwilioSettings},
        webhook::IpAllowList,
    },
    mms,
    number::{Address, E164, Validation, normalize},
    optout::{Keyword, classify},
    ratelimit::{Limits, RateLimiter},
};

/// The SMS bridge.
pub struct SmsBridge {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SmsBridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmsBridge").field("gateway", &self.inner.gateway.name()).finish()
    }
}

/// The bridge's own Prometheus counters (served on the framework's `/metrics`).
#[derive(Debug, Clone)]
struct SmsMetrics {
    /// SMS received, by outcome (`bridged`, `duplicate`, `dropped`).
    received: prometheus::IntCounterVec,
    /// SMS handed to the gateway.
    sent: prometheus::IntCounter,
    /// The parts they cost.
    parts: prometheus::IntCounter,
    /// Messages not sent, by reason.
    refused: prometheus::IntCounterVec,
    /// Final delivery reports, by outcome.
    reports: prometheus::IntCounterVec,
    /// Inbound MMS media items, by outcome (`bridged`, `too_large`, `failed`).
    media: prometheus::IntCounterVec,
}

impl SmsMetrics {
    fn register(registry: &prometheus::Registry) -> Result<Self, prometheus::Error> {
        use prometheus::{IntCounter, IntCounterVec, Opts};
        let vec =
            |name: &str, help: &str, label: &str| -> Result<IntCounterVec, prometheus::Error> {
                let c = IntCounterVec::new(Opts::new(name, help), &[label])?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let one = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        Ok(Self {
            received: vec(
                "trestle_sms_received_total",
                "Inbound SMS callbacks by outcome",
                "outcome",
            )?,
            sent: one("trestle_sms_sent_total", "SMS handed to the gateway")?,
            parts: one("trestle_sms_sent_parts_total", "SMS parts handed to the gateway")?,
            refused: vec("trestle_sms_refused_total", "Messages not sent, by reason", "reason")?,
            reports: vec(
                "trestle_sms_delivery_reports_total",
                "Final delivery reports by outcome",
                "outcome",
            )?,
            media: vec(
                "trestle_sms_received_media_total",
                "Inbound MMS media items by outcome",
                "outcome",
            )?,
        })
    }
}

/// The bridge's state, shared with the webhook handlers.
pub struct Inner {
    ctx: Context<SmsConfig>,
    gateway: Arc<dyn Gateway>,
    limiter: RateLimiter,
    metrics: SmsMetrics,
    /// Downloads inbound MMS media. Private addresses are allowed: the URLs come from the
    /// authenticated gateway, which may well run on the local network.
    files: Fetcher,
    /// Inbound messages are handled one at a time per conversation (in order, and a retried
    /// callback racing the original still creates nothing twice); conversations run in
    /// parallel, so one slow media download holds up only its own conversation.
    inbound_locks: KeyedLocks,
    /// Delivery reports are acted on one at a time: the reports of a message's parts arrive
    /// together, and each outcome must be acted on once.
    report_lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner").field("gateway", &self.gateway.name()).finish_non_exhaustive()
    }
}

fn retry(e: impl std::fmt::Display) -> BridgeError {
    BridgeError::Retryable(e.to_string())
}

/// Where a message went, remembered for its delivery reports.
#[derive(serde::Serialize, serde::Deserialize)]
struct Sent {
    room_id: String,
    event_id: String,
    to: String,
}

/// What a send produced.
#[derive(Debug, PartialEq, Eq)]
enum SendOutcome {
    /// Handed to the gateway under this id.
    Sent(String),
    /// Not sent; the room was told why.
    Refused,
}

impl Inner {
    fn cfg(&self) -> &SmsConfig {
        &self.ctx.config().bridge
    }

    fn gw(&self) -> &'static str {
        self.gateway.name()
    }

    /// `@sms_+447700900123:server`.
    pub fn ghost_id(&self, theirs: &Address) -> String {
        format!("@{}{}:{}", self.cfg().user_prefix, theirs.key(), self.ctx.domain())
    }

    fn address_of_ghost(&self, user_id: &str) -> Option<Address> {
        let local = user_id.strip_prefix('@')?.rsplit_once(':')?.0;
        Address::from_key(local.strip_prefix(&self.cfg().user_prefix)?)
    }

    fn portal_id(ours: &E164, theirs: &Address) -> String {
        format!("sms/{ours}/{}", theirs.key())
    }

    fn portal_parties(portal: &Portal) -> Option<(E164, Address)> {
        let ours = E164::from_e164(portal.metadata.get("ours")?.as_str()?)?;
        let theirs = Address::from_key(portal.metadata.get("theirs")?.as_str()?)?;
        Some((ours, theirs))
    }

    fn owners(&self, ours: &E164) -> Vec<String> {
        self.cfg().numbers.get(ours.as_str()).map(|n| n.owners.clone()).unwrap_or_default()
    }

    /// The number `user` sends from: the first they own (admins may use the first number).
    fn number_of(&self, user: &str) -> Option<E164> {
        let numbers = &self.cfg().numbers;
        numbers
            .iter()
            .find(|(_, n)| n.owners.iter().any(|o| o == user))
            .or_else(|| {
                (self.ctx.permission(user) >= PermissionLevel::Admin)
                    .then(|| numbers.iter().next())
                    .flatten()
            })
            .and_then(|(n, _)| E164::from_e164(n))
    }

    fn may_send(&self, user: &str, ours: &E164) -> bool {
        self.owners(ours).iter().any(|o| o == user)
            || self.ctx.permission(user) >= PermissionLevel::Admin
    }

    fn optout_key(ours: &E164, theirs: &Address) -> String {
        format!("sms.optout:{ours}:{}", theirs.key())
    }

    async fn ensure_ghost(&self, theirs: &Address) -> Result<String, BridgeError> {
        let ghost = self.ghost_id(theirs);
        self.ctx
            .ensure_ghost(
                &ghost,
                &GhostProfile {
                    remote_id: theirs.key(),
                    displayname: Some(theirs.to_string()),
                    avatar_url: None,
                },
            )
            .await?;
        Ok(ghost)
    }

    /// The portal of a conversation, created (owners invited, ghost joined) if needed.
    async fn portal_for(&self, ours: &E164, theirs: &Address) -> Result<Portal, BridgeError> {
        let ghost = self.ensure_ghost(theirs).await?;
        let mut spec = PortalSpec::new(Self::portal_id(ours, theirs), theirs.key());
        spec.name = Some(theirs.to_string());
        spec.topic = Some(format!("SMS between {theirs} and {ours}"));
        spec.is_direct = true;
        spec.invite = self.owners(ours);
        spec.channel_name = Some(theirs.to_string());
        spec.network = Some((ours.to_string(), format!("SMS {ours}")));
        spec.metadata = json!({"ours": ours.as_str(), "theirs": theirs.key()});
        let (portal, _) = self.ctx.ensure_portal(&spec, None).await?;
        self.ctx.intent(&ghost).ensure_joined(&portal.room_id).await?;
        Ok(portal)
    }

    /// An inbound SMS: into its portal, keywords honoured, exactly once per gateway id.
    async fn inbound(&self, sms: InboundSms) -> Result<(), BridgeError> {
        let _one_at_a_time = self.inbound_locks.lock(&format!("{}\u{0}{}", sms.from, sms.to)).await;
        let done_key = format!("sms.mo:{}:{}", self.gw(), sms.gateway_id);
        if self.ctx.store().kv_get(&done_key).await?.is_some() {
            tracing::debug!(id = sms.gateway_id, "repeated inbound callback ignored");
            self.metrics.received.with_label_values(&["duplicate"]).inc();
            return Ok(());
        }
        let cfg = self.cfg();
        let ours = normalize(&sms.to, cfg.region(), Validation::Lenient)
            .ok()
            .filter(|n| cfg.numbers.contains_key(n.as_str()));
        let Some(ours) = ours else {
            tracing::warn!(
                id = sms.gateway_id,
                "inbound SMS for a number that is not configured; dropped"
            );
            self.ctx.store().kv_set(&done_key, "dropped").await?;
            self.metrics.received.with_label_values(&["dropped"]).inc();
            return Ok(());
        };
        let Some(theirs) = Address::classify(&sms.from, cfg.region(), Validation::Lenient) else {
            tracing::warn!(id = sms.gateway_id, "inbound SMS with an unusable sender; dropped");
            self.ctx.store().kv_set(&done_key, "dropped").await?;
            self.metrics.received.with_label_values(&["dropped"]).inc();
            return Ok(());
        };
        let portal = self.portal_for(&ours, &theirs).await?;
        let ghost = self.ghost_id(&theirs);
        // An MMS without text is only its media.
        if !sms.text.is_empty() || sms.media.is_empty() {
            let content = json!({"msgtype": "m.text", "body": sms.text});
            self.post_inbound(&portal.room_id, &ghost, &sms.gateway_id, content).await?;
        }
        for (n, media) in sms.media.iter().enumerate() {
            self.inbound_media(&portal.room_id, &ghost, &theirs, &sms.gateway_id, n + 1, media)
                .await?;
        }
        if theirs.dial().is_some() {
            match classify(&sms.text) {
                Some(Keyword::Stop) => {
                    self.ctx.store().kv_set(&Self::optout_key(&ours, &theirs), "stop").await?;
                    self.ctx
                        .notice(&portal.room_id, &format!("{theirs} sent STOP: no SMS will be sent to them until they send START."))
                        .await;
                }
                Some(Keyword::Start) => {
                    let key = Self::optout_key(&ours, &theirs);
                    let was_blocked = self.ctx.store().kv_get(&key).await?.is_some();
                    if was_blocked {
                        self.ctx.store().kv_delete(&key).await?;
                        self.ctx
                            .notice(
                                &portal.room_id,
                                &format!("{theirs} sent START: SMS to them are allowed again."),
                            )
                            .await;
                    }
                }
                Some(Keyword::Help) => {
                    // Answered at most once an hour per conversation: a HELP loop (or a
                    // prankster) must not run up the SMS bill.
                    let key = format!("sms.help:{ours}:{}", theirs.key());
                    let last = self.ctx.store().kv_get(&key).await?;
                    let recent = last
                        .and_then(|v| v.parse::<i64>().ok())
                        .is_some_and(|t| now_ms() - t < HELP_INTERVAL_MS);
                    if recent {
                        self.ctx
                            .notice(&portal.room_id, &format!("{theirs} asked for HELP again; not answered twice within an hour."))
                            .await;
                    } else {
                        let help = cfg.help_text.clone();
                        match self
                            .send_sms(&portal.room_id, &ours, &theirs, &help, &[], true, None)
                            .await
                        {
                            Ok(SendOutcome::Sent(_)) => {
                                self.ctx.store().kv_set(&key, &now_ms().to_string()).await?;
                                self.ctx
                                    .notice(
                                        &portal.room_id,
                                        &format!("{theirs} asked for HELP; answered with: {help}"),
                                    )
                                    .await;
                            }
                            Ok(SendOutcome::Refused) => {}
                            Err(e) => tracing::warn!(error = %e, "could not answer HELP"),
                        }
                    }
                }
                None => {}
            }
        }
        self.ctx.store().kv_set(&done_key, "done").await?;
        self.metrics.received.with_label_values(&["bridged"]).inc();
        Ok(())
    }

    /// Sends `content` from the ghost as the message with remote id `remote_id` and remembers
    /// it. The transaction id derives from the remote id: a repeat is deduplicated by the
    /// homeserver.
    async fn post_inbound(
        &self,
        room_id: &str,
        ghost: &str,
        remote_id: &str,
        content: serde_json::Value,
    ) -> Result<(), BridgeError> {
        let cause = format!("sms:{}:{remote_id}", self.gw());
        let txn = self.ctx.txn_id_for(&cause, 0);
        let event_id =
            self.ctx.send_as(ghost, room_id, "m.room.message", content, &txn, None).await?;
        self.ctx
            .store()
            .insert_message(&MessageMapping::now(room_id, remote_id, 0, &event_id, ghost))
            .await?;
        Ok(())
    }

    /// The `n`-th media item (from 1) of inbound message `gateway_id`: downloaded, uploaded and
    /// sent by the ghost as its own message with remote id `{gateway_id}/{n}`, once. One that
    /// cannot be fetched (or is too large) is announced with a notice instead.
    async fn inbound_media(
        &self,
        room_id: &str,
        ghost: &str,
        theirs: &Address,
        gateway_id: &str,
        n: usize,
        media: &InboundMedia,
    ) -> Result<(), BridgeError> {
        let remote_id = format!("{gateway_id}/{n}");
        let done_key = format!("sms.mo:{}:{remote_id}", self.gw());
        if self.ctx.store().kv_get(&done_key).await?.is_some() {
            return Ok(());
        }
        let credentials =
            url::Url::parse(&media.url).ok().and_then(|u| self.gateway.media_credentials(&u));
        let credentials = credentials.as_ref().map(|(u, p)| (u.as_str(), p.as_str()));
        let announced = Some(media.content_type.as_str()).filter(|t| !t.is_empty());
        let fetched = self.files.fetch(&media.url, credentials, announced).await;
        let outcome = match fetched {
            Ok(file) => {
                let name = mms::filename(gateway_id, n, &file.mimetype);
                let size = file.data.len();
                let mxc = self
                    .ctx
                    .intent(ghost)
                    .upload_media(file.data, &file.mimetype, Some(&name))
                    .await?;
                let content = file_content(&mxc, &name, &file.mimetype, size, None);
                self.post_inbound(room_id, ghost, &remote_id, content).await?;
                self.metrics.media.with_label_values(&["bridged"]).inc();
                "done"
            }
            Err(e) => {
                tracing::warn!(id = remote_id, error = %e, "inbound MMS media not bridged");
                let kind = if media.content_type.is_empty() {
                    "A media attachment".to_owned()
                } else {
                    format!("A media attachment ({})", media.content_type)
                };
                self.ctx
                    .notice(room_id, &format!("{kind} from {theirs} could not be bridged: {e}."))
                    .await;
                let reason = match e {
                    FetchError::TooLarge { .. } => "too_large",
                    _ => "failed",
                };
                self.metrics.media.with_label_values(&[reason]).inc();
                reason
            }
        };
        self.ctx.store().kv_set(&done_key, outcome).await?;
        Ok(())
    }

    /// Sends `text` from `ours` to `theirs` for `room_id`, refusing (with a notice) what must not
    /// be sent. `keyword_reply` bypasses the opt-out (HELP answers are always allowed). `origin`
    /// (event id, sender) is the Matrix event the SMS carries: it is remembered *before* the
    /// gateway is called, since a delivery report can arrive before the send call returns.
    /// `media` (public URLs) makes it an MMS: only for gateways that [support
    /// it](Gateway::supports_mms); an MMS is not split into SMS parts.
    #[allow(clippy::too_many_arguments)] // each is a distinct fact about the message
    async fn send_sms(
        &self,
        room_id: &str,
        ours: &E164,
        theirs: &Address,
        text: &str,
        media: &[String],
        keyword_reply: bool,
        origin: Option<(&str, &str)>,
    ) -> Result<SendOutcome, BridgeError> {
        let Some(dial) = theirs.dial() else {
            self.ctx
                .notice(
                    room_id,
                    &format!("{theirs} is an alphanumeric sender: it cannot receive replies."),
                )
                .await;
            self.metrics.refused.with_label_values(&["alphanumeric"]).inc();
            return Ok(SendOutcome::Refused);
        };
        if !keyword_reply
            && self.ctx.store().kv_get(&Self::optout_key(ours, theirs)).await?.is_some()
        {
            self.ctx
                .notice(room_id, &format!("Not sent: {theirs} opted out (STOP). They can send START to receive messages again."))
                .await;
            self.metrics.refused.with_label_values(&["opted_out"]).inc();
            return Ok(SendOutcome::Refused);
        }
        let seg = segment(text);
        let max = self.cfg().max_segments;
        if media.is_empty() && seg.count() > max as usize {
            let (enc, unit, per) = match seg.encoding {
                Encoding::Gsm7 => ("GSM-7", "characters", 153),
                Encoding::Ucs2 => ("UCS-2", "UTF-16 units", 67),
            };
            self.ctx
                .notice(
                    room_id,
                    &format!(
                        "Not sent: this message would be {} SMS ({enc}, {} {unit}, {per} per part); the limit is {max}.",
                        seg.count(),
                        seg.units
                    ),
                )
                .await;
            self.metrics.refused.with_label_values(&["too_long"]).inc();
            return Ok(SendOutcome::Refused);
        }
        // An MMS is one message, whatever its text's length.
        let cost = if media.is_empty() { seg.count() } else { 1 };
        self.limiter.acquire(dial, u32::try_from(cost).unwrap_or(u32::MAX)).await;
        let sms = OutboundSms {
            id: new_message_id(),
            from: ours.to_string(),
            to: dial.to_owned(),
            text: text.to_owned(),
            encoding: seg.encoding,
            parts: seg.parts.clone(),
            media: media.to_vec(),
        };
        // Remembered without an event when there is none, so its reports are recognised at once.
        let (event_id, sender) = origin.unwrap_or(("", ""));
        self.remember_sent(&sms.id, room_id, event_id, sender, theirs).await?;
        match self.gateway.send(&sms).await {
            Ok(id) => {
                if id != sms.id {
                    self.remember_sent(&id, room_id, event_id, sender, theirs).await?;
                }
                tracing::info!(parts = cost, media = media.len(), encoding = ?seg.encoding, id, "SMS handed to the gateway");
                self.metrics.sent.inc();
                self.metrics.parts.inc_by(u64::try_from(cost).unwrap_or(u64::MAX));
                Ok(SendOutcome::Sent(id))
            }
            Err(GatewayError::Rejected(reason)) => {
                self.ctx.notice(room_id, &format!("SMS to {theirs} not sent: {reason}")).await;
                self.metrics.refused.with_label_values(&["rejected_by_gateway"]).inc();
                Ok(SendOutcome::Refused)
            }
            Err(e @ GatewayError::Temporary(_)) => Err(retry(e)),
        }
    }

    /// Remembers a sent message for its delivery reports.
    async fn remember_sent(
        &self,
        id: &str,
        room_id: &str,
        event_id: &str,
        sender: &str,
        to: &Address,
    ) -> Result<(), BridgeError> {
        let sent =
            Sent { room_id: room_id.to_owned(), event_id: event_id.to_owned(), to: to.key() };
        let v = serde_json::to_string(&sent).map_err(retry)?;
        self.ctx.store().kv_set(&format!("sms.out:{}:{id}", self.gw()), &v).await?;
        if event_id.is_empty() {
            return Ok(());
        }
        self.ctx
            .store()
            .insert_message(&MessageMapping::now(room_id, id, 0, event_id, sender))
            .await?;
        Ok(())
    }

    /// A delivery report: a read receipt from the ghost when delivered, a notice when failed;
    /// each once.
    async fn report(&self, r: DeliveryReport) -> Result<(), BridgeError> {
        let kind = match &r.status {
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Failed(_) => "failed",
            DeliveryStatus::Pending(s) => {
                tracing::debug!(id = r.message_id, status = s, "SMS not delivered yet");
                return Ok(());
            }
        };
        let key = format!("sms.out:{}:{}", self.gw(), r.message_id);
        let mut raw = self.ctx.store().kv_get(&key).await?;
        // A gateway that names messages itself (REST) may report before its send call returned
        // and the id was recorded: give the sender a moment.
        for _ in 0..30 {
            if raw.is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            raw = self.ctx.store().kv_get(&key).await?;
        }
        let Some(raw) = raw else {
            tracing::debug!(id = r.message_id, "delivery report for an unknown message");
            return Ok(());
        };
        let sent: Sent = serde_json::from_str(&raw).map_err(retry)?;
        let Some(to) = Address::from_key(&sent.to) else { return Ok(()) };
        let _one_at_a_time = self.report_lock.lock().await;
        // A concatenated message is delivered when every part is.
        if let (DeliveryStatus::Delivered, Some((seq, total))) = (&r.status, r.part)
            && total > 1
        {
            let part_key = |n: u8| format!("sms.dlr:{}:{}:part{n}", self.gw(), r.message_id);
            self.ctx.store().kv_set(&part_key(seq), "1").await?;
            for n in 1..=total {
                if self.ctx.store().kv_get(&part_key(n)).await?.is_none() {
                    tracing::debug!(
                        id = r.message_id,
                        seq,
                        total,
                        "part delivered; waiting for the others"
                    );
                    return Ok(());
                }
            }
        }
        let once = format!("sms.dlr:{}:{}:{kind}", self.gw(), r.message_id);
        if self.ctx.store().kv_get(&once).await?.is_some() {
            return Ok(());
        }
        match &r.status {
            // An SMS without a Matrix event (a HELP answer): nothing to mark read.
            DeliveryStatus::Delivered if sent.event_id.is_empty() => {}
            DeliveryStatus::Delivered => {
                let ghost = self.ensure_ghost(&to).await?;
                let intent = self.ctx.intent(&ghost);
                intent.ensure_joined(&sent.room_id).await?;
                intent.send_receipt(&sent.room_id, &sent.event_id).await?;
                tracing::info!(id = r.message_id, "SMS delivered; read receipt sent");
            }
            DeliveryStatus::Failed(reason) => {
                self.ctx.notice(&sent.room_id, &format!("SMS to {to} failed: {reason}")).await;
            }
            DeliveryStatus::Pending(_) => {}
        }
        self.ctx.store().kv_set(&once, "1").await?;
        self.metrics.reports.with_label_values(&[kind]).inc();
        Ok(())
    }

    /// A Matrix user invited a ghost to a room: it becomes the conversation's portal.
    async fn ghost_invited(&self, event: &MatrixEvent, ghost: &str) -> Result<(), BridgeError> {
        let Some(theirs) = self.address_of_ghost(ghost) else { return Ok(()) };
        let intent = self.ctx.intent(ghost);
        let Some(ours) = self.number_of(&event.sender) else {
            tracing::info!(sender = event.sender, "ghost invited by a user who owns no number");
            let _ = intent.leave(&event.room_id).await;
            return Ok(());
        };
        self.ensure_ghost(&theirs).await?;
        intent.join(&event.room_id).await?;
        // The bot joins too, for notices.
        intent.invite(&event.room_id, &self.ctx.bot_user_id()).await?;
        self.ctx.bot().join(&event.room_id).await?;
        let portal = Portal {
            remote_id: Self::portal_id(&ours, &theirs),
            room_id: event.room_id.clone(),
            alias: None,
            metadata: json!({"ours": ours.as_str(), "theirs": theirs.key()}),
            created_at: now_ms(),
        };
        self.ctx.store().upsert_portal(&portal).await?;
        self.ctx
            .notice(
                &event.room_id,
                &format!("This room is now your SMS conversation with {theirs} (from {ours})."),
            )
            .await;
        Ok(())
    }
}

/// Splits `!sms` arguments: the leading words that are all number characters
/// (`07700 900123`, `+44 (0) 7700-900123`) form the number, the rest is the text.
pub fn split_number_and_text(args: &[String]) -> (String, String) {
    let is_num = |w: &str| {
        !w.is_empty()
            && w.chars().all(|c| c.is_ascii_digit() || matches!(c, '+' | '(' | ')' | '-' | '.'))
    };
    let n = args.iter().take_while(|w| is_num(w)).count().max(1);
    (args[..n.min(args.len())].join(" "), args[n.min(args.len())..].join(" "))
}

/// HELP is answered at most once per this interval and conversation.
const HELP_INTERVAL_MS: i64 = 3_600_000;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[async_trait]
impl EventSink for Inner {
    async fn handle(&self, event: GatewayEvent) -> Result<(), String> {
        let r = match event {
            GatewayEvent::Inbound(sms) => self.inbound(sms).await,
            GatewayEvent::Report(r) => self.report(r).await,
        };
        r.map_err(|e| e.to_string())
    }
}

/// The configured gateway; `store` keeps what it must not lose over a restart.
fn build_gateway(cfg: &SmsConfig, store: &Arc<dyn trestle::store::Store>) -> Arc<dyn Gateway> {
    match &cfg.gateway {
        GatewayConfig::Kannel(k) => Arc::new(Kannel::new(KannelSettings {
            sendsms_url: k.sendsms_url.clone(),
            username: k.username.clone(),
            password: k.password.clone(),
            smsc: k.smsc.clone(),
            dlr_mask: k.dlr_mask,
            public_url: cfg.webhooks.public_url.clone(),
            secret: cfg.webhooks.secret.clone(),
        })),
        GatewayConfig::Twilio(t) => Arc::new(Twilio::new(TwilioSettings {
            api_url: t.api_url.clone(),
            account_sid: t.account_sid.clone(),
            auth_token: t.auth_token.clone(),
            public_url: cfg.webhooks.public_url.clone(),
        })),
        GatewayConfig::Smpp(s) => {
            let secs = std::time::Duration::from_secs;
            Arc::new(
                Smpp::new(SmppSettings {
                    address: s.address.clone(),
                    system_id: s.system_id.clone(),
                    password: s.password.clone(),
                    system_type: s.system_type.clone(),
                    window: s.window,
                    enquire_link_interval: secs(s.enquire_link_interval_secs),
                    response_timeout: secs(s.response_timeout_secs),
                    reconnect_min: secs(s.reconnect_min_secs),
                    reconnect_max: secs(s.reconnect_max_secs),
                    throttle_retries: s.throttle_retries,
                    throttle_pause: std::time::Duration::from_millis(s.throttle_pause_ms),
                    long_messages: s.long_messages,
                })
                .with_store(Arc::clone(store)),
            )
        }
    }
}

async fn allow_ips(
    axum::extract::State(list): axum::extract::State<Arc<IpAllowList>>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<SocketAddr>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    if !list.allows(peer.ip()) {
        tracing::warn!(peer = %peer.ip(), "webhook call from an address not in allow_ips");
        return (axum::http::StatusCode::FORBIDDEN, "forbidden").into_response();
    }
    next.run(req).await
}

#[async_trait]
impl Bridge for SmsBridge {
    type Config = SmsConfig;

    fn info() -> BridgeInfo {
        BridgeInfo {
            name: "sms",
            network_name: "SMS",
            default_port: 9897,
            protocols: &[],
            version: env!("CARGO_PKG_VERSION"),
        }
    }

    fn namespaces(config: &Config<SmsConfig>) -> Namespaces {
        let mut ns = Namespaces::default();
        ns.users.push(Namespace {
            regex: format!(
                "^@{}.+:{}$",
                regex::escape(&config.bridge.user_prefix),
                regex::escape(&config.homeserver.domain)
            ),
            exclusive: true,
        });
        ns
    }

    async fn start(ctx: Context<SmsConfig>) -> Result<Self, BridgeError> {
        let cfg = ctx.config().bridge.clone();
        let r = &cfg.rate_limit;
        let limiter = RateLimiter::new(Limits {
            gateway_burst: r.gateway_burst,
            gateway_per_second: r.gateway_per_second,
            number_burst: r.number_burst,
            number_per_second: r.number_per_second,
        });
        let gateway = build_gateway(&cfg, ctx.store());
        let inner = Arc::new(Inner {
            ctx: ctx.clone(),
            gateway: Arc::clone(&gateway),
            limiter,
            files: Fetcher::new(cfg.max_media_bytes, std::time::Duration::from_secs(60), true)
                .map_err(|e| BridgeError::Permanent(format!("cannot build an HTTP client: {e}")))?,
            inbound_locks: KeyedLocks::new(),
            report_lock: tokio::sync::Mutex::new(()),
            metrics: SmsMetrics::register(ctx.metrics().registry())
                .map_err(|e| BridgeError::Permanent(format!("cannot register metrics: {e}")))?,
        });
        let allow = Arc::new(
            IpAllowList::parse(&cfg.webhooks.allow_ips)
                .map_err(|e| BridgeError::Permanent(e.to_string()))?,
        );
        gateway.start(Arc::clone(&inner) as Arc<dyn EventSink>, ctx.shutdown().clone());
        let app = gateway
            .routes(Arc::clone(&inner) as Arc<dyn EventSink>)
            .route("/health", axum::routing::get(|| async { "ok" }))
            .layer(axum::middleware::from_fn_with_state(allow, allow_ips));
        let listener = tokio::net::TcpListener::bind(cfg.webhooks.listen).await.map_err(|e| {
            BridgeError::Permanent(format!(
                "cannot listen on {} for webhooks: {e}",
                cfg.webhooks.listen
            ))
        })?;
        tracing::info!(listen = %cfg.webhooks.listen, gateway = gateway.name(), "listening for gateway webhooks");
        let token = ctx.shutdown().clone();
        tokio::spawn(async move {
            let served =
                axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
                    .with_graceful_shutdown(token.cancelled_owned())
                    .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "the webhook listener failed");
            }
        });
        Ok(Self { inner })
    }

    fn commands(&self, registry: &mut CommandRegistry<Self>) {
        registry.add(Command::new(
            "sms",
            "<number> [text…]",
            "Start an SMS conversation (and send the text, if given)",
            PermissionLevel::User,
            |inv, b: Arc<SmsBridge>| {
                Box::pin(async move {
                    let b = &b.inner;
                    inv.arg(0)?;
                    let (number, text) = split_number_and_text(&inv.args);
                    let cfg = b.cfg();
                    let ours = b.number_of(&inv.sender).ok_or_else(|| {
                        CommandError::Failed("you own no SMS number on this bridge".into())
                    })?;
                    let Some(theirs @ (Address::Number(_) | Address::Short(_))) =
                        Address::classify(&number, cfg.region(), cfg.validation())
                    else {
                        return Err(CommandError::Failed(format!(
                            "{number} is not a phone number I can text"
                        )));
                    };
                    let fail = |e: BridgeError| CommandError::Failed(e.to_string());
                    let portal = b.portal_for(&ours, &theirs).await.map_err(fail)?;
                    if !b.owners(&ours).contains(&inv.sender) {
                        let _ = b.ctx.bot().invite(&portal.room_id, &inv.sender).await;
                    }
                    if !text.trim().is_empty() {
                        let content = json!({"msgtype": "m.notice",
                            "body": format!("{} sent: {text}", inv.sender)});
                        let event_id = b
                            .ctx
                            .bot()
                            .send_message(&portal.room_id, content)
                            .await
                            .map_err(|e| CommandError::Failed(e.to_string()))?;
                        let origin = Some((event_id.as_str(), inv.sender.as_str()));
                        b.send_sms(&portal.room_id, &ours, &theirs, &text, &[], false, origin)
                            .await
                            .map_err(fail)?;
                    }
                    Ok(format!("Conversation with {theirs} from {ours}: {}", portal.room_id))
                })
            },
        ));
    }

    async fn query_user(&self, user_id: &str) -> Result<Option<GhostProfile>, BridgeError> {
        Ok(self.inner.address_of_ghost(user_id).map(|a| GhostProfile {
            remote_id: a.key(),
            displayname: Some(a.to_string()),
            avatar_url: None,
        }))
    }

    async fn on_message(
        &self,
        room: &RoomContext,
        event: &MatrixEvent,
        msg: &Message,
    ) -> Result<(), BridgeError> {
        let b = &self.inner;
        let Some((ours, theirs)) = room.portal.as_ref().and_then(Inner::portal_parties) else {
            return Ok(());
        };
        if msg.msgtype == MessageType::Notice {
            return Ok(());
        }
        // Already handed to the gateway (an event delivered again after a crash).
        if b.ctx.store().message_by_event(&event.room_id, &event.event_id).await?.is_some() {
            return Ok(());
        }
        if !b.may_send(&event.sender, &ours) {
            b.ctx
                .notice(
                    &event.room_id,
                    &format!("{} may not send SMS from {ours}; not sent.", event.sender),
                )
                .await;
            return Ok(());
        }
        // Media goes as MMS where the gateway can (the link as its attachment, the caption or
        // file name as its text), else as a link in the text (after the caption, if any).
        let (text, media) = match (&msg.media, &msg.msgtype) {
            (Some(media), _) => match b.ctx.media_link(&media.url, &media.filename) {
                Ok(link) if b.gateway.supports_mms() => (msg.body.clone(), vec![link]),
                Ok(link) if msg.body != media.filename => {
                    (format!("{} ({}) {link}", msg.body, media.filename), Vec::new())
                }
                Ok(link) => (format!("{} {link}", media.filename), Vec::new()),
                Err(_) => {
                    b.ctx.notice(&event.room_id, "Not sent: attachments need media_proxy.public_url to be set (the gateway fetches or the text carries a link to the file).").await;
                    return Ok(());
                }
            },
            (None, MessageType::Emote) => (format!("* {}", msg.body), Vec::new()),
            (None, _) => (msg.body.clone(), Vec::new()),
        };
        let origin = Some((event.event_id.as_str(), event.sender.as_str()));
        b.send_sms(&event.room_id, &ours, &theirs, &text, &media, false, origin).await?;
        Ok(())
    }

    async fn on_membership(
        &self,
        room: &RoomContext,
        event: &MatrixEvent,
        user_id: &str,
        membership: &str,
        _prev: Option<&str>,
    ) -> Result<(), BridgeError> {
        if membership == "invite"
            && room.portal.is_none()
            && !room.is_admin_room
            && self.inner.address_of_ghost(user_id).is_some()
        {
            return self.inner.ghost_invited(event, user_id).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_arguments() {
        let a = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            split_number_and_text(&a(&["07700", "900456", "hello, new friend"])),
            ("07700 900456".into(), "hello, new friend".into())
        );
        assert_eq!(
            split_number_and_text(&a(&["+44", "(0)", "7700-900456", "hi", "2", "you"])),
            ("+44 (0) 7700-900456".into(), "hi 2 you".into())
        );
        assert_eq!(
            split_number_and_text(&a(&["+447700900456"])),
            ("+447700900456".into(), String::new())
        );
        assert_eq!(split_number_and_text(&a(&["bob", "hi"])), ("bob".into(), "hi".into()));
    }

    #[test]
    fn portal_ids() {
        let ours = E164::from_e164("+441234567890").unwrap();
        let theirs = Address::Number(E164::from_e164("+447700900123").unwrap());
        assert_eq!(Inner::portal_id(&ours, &theirs), "sms/+441234567890/+447700900123");
        let p = Portal {
            remote_id: Inner::portal_id(&ours, &theirs),
            room_id: "!r:x".into(),
            alias: None,
            metadata: json!({"ours": ours.as_str(), "theirs": theirs.key()}),
            created_at: 0,
        };
        assert_eq!(Inner::portal_parties(&p), Some((ours, theirs)));
    }
}
