//! SMS gateways: sending, and the webhooks through which inbound messages (MO) and delivery
//! reports (DLR) arrive.
//!
//! A gateway sends with [`Gateway::send`] and returns the id by which its delivery reports will
//! name the message. Inbound traffic reaches the bridge's own webhook listener; the gateway's
//! [`Gateway::routes`] parse and authenticate it and hand each event to an [`EventSink`]. The
//! webhook answers success only once the sink has handled the event, so a gateway that retries
//! on failure never loses a message; the sink makes repeats harmless (idempotency).

pub mod kannel;
pub mod smpp;
pub mod twilio;
pub mod webhook;

use std::sync::Arc;

use async_trait::async_trait;

use crate::encoding::Encoding;

/// An SMS to send.
#[derive(Debug, Clone)]
pub struct OutboundSms {
    /// The bridge's id for the message (unique; used in DLR callbacks where the gateway allows).
    pub id: String,
    /// Our number (E.164), the sender.
    pub from: String,
    /// The destination (E.164 or short code).
    pub to: String,
    /// The text.
    pub text: String,
    /// The encoding chosen for it.
    pub encoding: Encoding,
    /// The text split into SMS parts (see [`crate::encoding::segment`]): one part for a short
    /// text. Gateways that split themselves may ignore it; Kannel sends these parts with our own
    /// concatenation header, because its own splitting can cut a surrogate pair in two.
    pub parts: Vec<String>,
    /// Public URLs of media to attach (MMS). Only set for gateways whose
    /// [`Gateway::supports_mms`] is true; the others get media links in `text`.
    pub media: Vec<String>,
}

/// A media item attached to an inbound message (MMS), as the gateway announced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundMedia {
    /// Where to download it from (the gateway's credentials may be needed, see
    /// [`Gateway::media_credentials`]).
    pub url: String,
    /// Its MIME type as announced; may be empty.
    pub content_type: String,
}

/// An SMS received (mobile originated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundSms {
    /// The gateway's id for the message, stable across retried callbacks.
    pub gateway_id: String,
    /// Sender as reported (normalised later).
    pub from: String,
    /// Receiver (one of our numbers) as reported.
    pub to: String,
    /// The text, decoded.
    pub text: String,
    /// Attached media (MMS), in order; empty for an SMS.
    pub media: Vec<InboundMedia>,
}

/// The state a delivery report announces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryStatus {
    /// Delivered to the handset.
    Delivered,
    /// Will not be delivered; the gateway's reason.
    Failed(String),
    /// Accepted, queued or buffered: not final.
    Pending(String),
}

/// A delivery report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryReport {
    /// The id [`Gateway::send`] returned.
    pub message_id: String,
    /// What happened.
    pub status: DeliveryStatus,
    /// Which part it is about, `(seq, total)` counting from 1, when the gateway reports the parts
    /// of a concatenated message one by one.
    pub part: Option<(u8, u8)>,
}

/// Something a gateway told us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayEvent {
    /// An inbound SMS.
    Inbound(InboundSms),
    /// A delivery report.
    Report(DeliveryReport),
}

/// Why a send failed.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The gateway could not be reached or had a temporary problem: try again later.
    #[error("gateway temporarily unavailable: {0}")]
    Temporary(String),
    /// The gateway refused the message (bad number, auth, opted out): retrying will not help.
    #[error("gateway refused the message: {0}")]
    Rejected(String),
}

/// Receives the events of a gateway's webhooks.
#[async_trait]
pub trait EventSink: Send + Sync + 'static {
    /// Handles one event. `Err` makes the webhook answer 503 so the gateway retries.
    async fn handle(&self, event: GatewayEvent) -> Result<(), String>;
}

/// An SMS gateway.
#[async_trait]
pub trait Gateway: Send + Sync + std::fmt::Debug + 'static {
    /// Short name (`kannel`, `twilio`), used in store keys.
    fn name(&self) -> &'static str;

    /// Sends one (possibly concatenated) SMS; returns the id its delivery reports will carry.
    async fn send(&self, sms: &OutboundSms) -> Result<String, GatewayError>;

    /// The webhook routes (paths starting with `/{name}/`) delivering events to `sink`.
    fn routes(&self, sink: Arc<dyn EventSink>) -> axum::Router;

    /// Whether [`send`](Self::send) can attach media by URL ([`OutboundSms::media`], MMS).
    /// Gateways without MMS carry media as links in the text.
    fn supports_mms(&self) -> bool {
        false
    }

    /// HTTP Basic credentials (user, password) to download inbound media from `url` with, when
    /// the gateway hosts it behind its own authentication. `None`: download anonymously.
    fn media_credentials(&self, _url: &url::Url) -> Option<(String, String)> {
        None
    }

    /// Starts what the gateway runs in the background (an SMPP session), delivering events to
    /// `sink` until `shutdown`. HTTP gateways have nothing to start.
    fn start(&self, _sink: Arc<dyn EventSink>, _shutdown: tokio_util::sync::CancellationToken) {}
}

/// A fresh message id: 128 random bits in hex.
pub fn new_message_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}
