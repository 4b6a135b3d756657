//! Kannel (bearerbox + smsbox) through its HTTP interfaces.
//!
//! - **Send (MT):** `GET sendsms` with `username`, `password`, `from`, `to`, `text`,
//!   `charset=UTF-8`, `coding` (0 GSM-7, 2 UCS-2), `dlr-mask=31` and a `dlr-url` naming the
//!   message (`/kannel/dlr?id=…&token=…&status=%d&reply=%A`). Kannel answers 202
//!   `0: Accepted for delivery` (or 200 `3: Queued for later delivery`). Kannel's sendsms answer
//!   carries no id, so the bridge's own id names the message in the DLR URL.
//! - **Long texts** are sent part by part, each with our own concatenation UDH
//!   (`05 00 03 ref total seq`) in `udh`, split by [`crate::encoding::segment`]: Kannel's own
//!   splitting (`concatenation = true`) counts UCS-2 in 16-bit units and can cut an emoji's
//!   surrogate pair in two (seen with Kannel 1.4.5). Each part's DLR URL adds `&part=N&parts=T`.
//! - **Receive (MO):** an `sms-service` with `get-url` =
//!   `{public_url}/kannel/mo?secret=…&from=%p&to=%P&text=%b&charset=%C&coding=%c&id=%I`
//!   (`%b` is the message verbatim; `%a` would squeeze spaces) and `max-messages = 0` (no reply
//!   SMS from Kannel).
//! - **DLR:** `status` bits: 1 delivered, 2 failed, 4 buffered, 8 SMSC accepted, 16 SMSC rejected.

use std::sync::Arc;

use async_trait::async_trait;
use axum::{
    extract::{OriginalUri, State},
    http::StatusCode,
    routing::get,
};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};

use super::{
    DeliveryReport, DeliveryStatus, EventSink, Gateway, GatewayError, GatewayEvent, InboundSms,
    OutboundSms,
    webhook::{decode_text, message_token, parse_query, secret_eq, text},
};

/// Settings of the Kannel gateway.
#[derive(Clone)]
pub struct KannelSettings {
    /// The smsbox sendsms URL (`http://127.0.0.1:13013/cgi-bin/sendsms`).
    pub sendsms_url: url::Url,
    /// sendsms-user name.
    pub username: String,
    /// sendsms-user password.
    pub password: String,
    /// Route through this `smsc-id` (optional).
    pub smsc: Option<String>,
    /// The `dlr-mask` (31 = every report).
    pub dlr_mask: u8,
    /// Public base URL of the bridge's webhook listener.
    pub public_url: url::Url,
    /// The webhook secret.
    pub secret: String,
}

impl std::fmt::Debug for KannelSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KannelSettings")
            .field("sendsms_url", &self.sendsms_url.as_str())
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("smsc", &self.smsc)
            .field("public_url", &self.public_url.as_str())
            .finish_non_exhaustive()
    }
}

/// The Kannel gateway.
#[derive(Debug, Clone)]
pub struct Kannel {
    settings: Arc<KannelSettings>,
    http: reqwest::Client,
}

fn enc(s: &str) -> String {
    utf8_percent_encode(s, NON_ALPHANUMERIC).to_string()
}

impl Kannel {
    /// A gateway with these settings.
    pub fn new(settings: KannelSettings) -> Self {
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .unwrap_or_default();
        Self { settings: Arc::new(settings), http }
    }

    /// The `dlr-url` Kannel calls back for message `id`, or for part `(seq, total)` of it
    /// (Kannel expands `%d` and `%A`).
    pub fn dlr_url(&self, id: &str, part: Option<(u8, u8)>) -> String {
        let base = self.settings.public_url.as_str().trim_end_matches('/');
        let part =
            part.map(|(seq, total)| format!("&part={seq}&parts={total}")).unwrap_or_default();
        format!(
            "{base}/kannel/dlr?id={}&token={}{part}&status=%d&reply=%A",
            enc(id),
            message_token(&self.settings.secret, id)
        )
    }

    /// The full sendsms URL for `text` of `sms`, with a user data header if given (it contains
    /// the password: never log it).
    pub fn sendsms_request(&self, sms: &OutboundSms, text: &str, udh: Option<&[u8]>) -> String {
        let s = &self.settings;
        let mut q = vec![
            ("username", s.username.clone()),
            ("password", s.password.clone()),
            ("from", sms.from.clone()),
            ("to", sms.to.clone()),
            ("text", text.to_owned()),
            ("charset", "UTF-8".to_owned()),
            ("coding", sms.encoding.kannel_coding().to_string()),
            ("dlr-mask", s.dlr_mask.to_string()),
            // A concatenation UDH (05 00 03 ref total seq) names the part its reports are about.
            ("dlr-url", self.dlr_url(&sms.id, udh.filter(|u| u.len() == 6).map(|u| (u[5], u[4])))),
        ];
        if let Some(smsc) = &s.smsc {
            q.push(("smsc", smsc.clone()));
        }
        let mut query: Vec<String> = q.iter().map(|(k, v)| format!("{k}={}", enc(v))).collect();
        if let Some(udh) = udh {
            query.push(format!("udh={}", percent_encoding::percent_encode(udh, NON_ALPHANUMERIC)));
        }
        let mut url = s.sendsms_url.clone();
        url.set_query(Some(&query.join("&")));
        url.into()
    }

    async fn send_one(
        &self,
        sms: &OutboundSms,
        text: &str,
        udh: Option<&[u8]>,
    ) -> Result<(), GatewayError> {
        let resp =
            self.http.get(self.sendsms_request(sms, text, udh)).send().await.map_err(|e| {
                GatewayError::Temporary(format!("cannot reach Kannel: {}", e.without_url()))
            })?;
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        let body = body.trim();
        if status.is_success() {
            return Ok(());
        }
        if status.is_server_error() || status == StatusCode::SERVICE_UNAVAILABLE {
            Err(GatewayError::Temporary(format!("Kannel answered {status}: {body}")))
        } else {
            Err(GatewayError::Rejected(format!("Kannel answered {status}: {body}")))
        }
    }
}

/// Maps a Kannel DLR `status` value to a delivery status.
pub fn dlr_status(status: u32, reply: &str) -> DeliveryStatus {
    match status {
        1 => DeliveryStatus::Delivered,
        2 | 16 => DeliveryStatus::Failed(if reply.is_empty() {
            format!("Kannel DLR status {status}")
        } else {
            reply.to_owned()
        }),
        _ => DeliveryStatus::Pending(format!("Kannel DLR status {status}")),
    }
}

/// Parses an MO callback query (after authentication).
pub fn parse_mo(query: &str) -> Option<InboundSms> {
    let q = parse_query(query);
    let from = text(&q, "from");
    let to = text(&q, "to");
    if from.is_empty() || to.is_empty() {
        return None;
    }
    let raw = q.get("text").cloned().unwrap_or_default();
    let body = decode_text(&raw, &text(&q, "charset"));
    let mut id = text(&q, "id");
    if id.is_empty() {
        // Without %I a retried callback still maps to the same id.
        use sha1::Digest;
        let digest =
            sha1::Sha1::digest([from.as_bytes(), b"\0", to.as_bytes(), b"\0", &raw].concat());
        id = digest.iter().map(|b| format!("{b:02x}")).collect();
    }
    Some(InboundSms { gateway_id: id, from, to, text: body, media: Vec::new() })
}

#[derive(Clone)]
struct Hooks {
    settings: Arc<KannelSettings>,
    sink: Arc<dyn EventSink>,
}

async fn deliver(sink: &dyn EventSink, ev: GatewayEvent) -> (StatusCode, &'static str) {
    match sink.handle(ev).await {
        Ok(()) => (StatusCode::OK, ""),
        Err(e) => {
            tracing::warn!(error = %e, "could not handle a Kannel callback; Kannel may retry");
            (StatusCode::SERVICE_UNAVAILABLE, "try again later")
        }
    }
}

async fn mo(State(h): State<Hooks>, OriginalUri(uri): OriginalUri) -> (StatusCode, &'static str) {
    let query = uri.query().unwrap_or_default();
    let q = parse_query(query);
    let given = q.get("secret").map(Vec::as_slice).unwrap_or_default();
    if !secret_eq(given, h.settings.secret.as_bytes()) {
        tracing::warn!("rejected a Kannel MO callback with a wrong secret");
        return (StatusCode::FORBIDDEN, "forbidden");
    }
    let Some(sms) = parse_mo(query) else {
        return (StatusCode::BAD_REQUEST, "missing from or to");
    };
    deliver(h.sink.as_ref(), GatewayEvent::Inbound(sms)).await
}

async fn dlr(State(h): State<Hooks>, OriginalUri(uri): OriginalUri) -> (StatusCode, &'static str) {
    let q = parse_query(uri.query().unwrap_or_default());
    let id = text(&q, "id");
    let token = q.get("token").map(Vec::as_slice).unwrap_or_default();
    if id.is_empty() || !secret_eq(token, message_token(&h.settings.secret, &id).as_bytes()) {
        tracing::warn!("rejected a Kannel DLR callback with a wrong token");
        return (StatusCode::FORBIDDEN, "forbidden");
    }
    let Ok(status) = text(&q, "status").trim().parse::<u32>() else {
        return (StatusCode::BAD_REQUEST, "bad status");
    };
    let seq = text(&q, "part").parse::<u8>().ok();
    let total = text(&q, "parts").parse::<u8>().ok();
    let part = seq.zip(total).filter(|(s, t)| *s >= 1 && s <= t);
    let report =
        DeliveryReport { message_id: id, status: dlr_status(status, &text(&q, "reply")), part };
    deliver(h.sink.as_ref(), GatewayEvent::Report(report)).await
}

#[async_trait]
impl Gateway for Kannel {
    fn name(&self) -> &'static str {
        "kannel"
    }

    async fn send(&self, sms: &OutboundSms) -> Result<String, GatewayError> {
        if sms.parts.len() <= 1 {
            self.send_one(sms, &sms.text, None).await?;
            return Ok(sms.id.clone());
        }
        let total = u8::try_from(sms.parts.len())
            .map_err(|_| GatewayError::Rejected("more than 255 parts".into()))?;
        let reference = rand::random::<u8>();
        for (i, part) in sms.parts.iter().enumerate() {
            let seq = u8::try_from(i + 1).unwrap_or(u8::MAX);
            self.send_one(sms, part, Some(&[0x05, 0x00, 0x03, reference, total, seq])).await?;
        }
        Ok(sms.id.clone())
    }

    fn routes(&self, sink: Arc<dyn EventSink>) -> axum::Router {
        let hooks = Hooks { settings: Arc::clone(&self.settings), sink };
        axum::Router::new()
            .route("/kannel/mo", get(mo).post(mo))
            .route("/kannel/dlr", get(dlr).post(dlr))
            .with_state(hooks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoding::Encoding;

    fn kannel() -> Kannel {
        Kannel::new(KannelSettings {
            sendsms_url: "http://127.0.0.1:13013/cgi-bin/sendsms".parse().unwrap(),
            username: "bridge".into(),
            password: "p&ss w".into(),
            smsc: Some("fake1".into()),
            dlr_mask: 31,
            public_url: "https://sms.example.org/hooks/".parse().unwrap(),
            secret: "s3cret".into(),
        })
    }

    #[test]
    fn sendsms_query() {
        let k = kannel();
        let sms = OutboundSms {
            id: "abc".into(),
            from: "+441234567890".into(),
            to: "+447700900123".into(),
            text: "héllo & {bye}".into(),
            encoding: Encoding::Ucs2,
            parts: vec!["héllo & {bye}".into()],
            media: Vec::new(),
        };
        let url = k.sendsms_request(&sms, &sms.text, None);
        let (base, query) = url.split_once('?').unwrap();
        assert_eq!(base, "http://127.0.0.1:13013/cgi-bin/sendsms");
        let q = parse_query(query);
        assert_eq!(text(&q, "username"), "bridge");
        assert_eq!(text(&q, "password"), "p&ss w");
        assert_eq!(text(&q, "from"), "+441234567890");
        assert_eq!(text(&q, "to"), "+447700900123");
        assert_eq!(text(&q, "text"), "héllo & {bye}");
        assert_eq!(text(&q, "charset"), "UTF-8");
        assert_eq!(text(&q, "coding"), "2");
        assert_eq!(text(&q, "dlr-mask"), "31");
        assert_eq!(text(&q, "smsc"), "fake1");
        let dlr = text(&q, "dlr-url");
        let token = message_token("s3cret", "abc");
        assert_eq!(
            dlr,
            format!(
                "https://sms.example.org/hooks/kannel/dlr?id=abc&token={token}&status=%d&reply=%A"
            )
        );
        assert!(!dlr.contains("s3cret"), "the secret itself never leaves in a DLR URL");
        assert!(!q.contains_key("udh"));
        let url = k.sendsms_request(&sms, "part", Some(&[5, 0, 3, 0xab, 2, 1]));
        let q = parse_query(url.split_once('?').unwrap().1);
        assert_eq!(q["udh"], vec![5, 0, 3, 0xab, 2, 1]);
        // Each part's reports name the part.
        assert_eq!(
            text(&q, "dlr-url"),
            format!(
                "https://sms.example.org/hooks/kannel/dlr?id=abc&token={token}&part=1&parts=2&status=%d&reply=%A"
            )
        );
        assert_eq!(text(&q, "text"), "part");
    }

    #[test]
    fn mo_parsing() {
        let m = parse_mo("secret=x&from=%2B447700900123&to=%2B441234567890&text=hi++there%21&charset=UTF-8&coding=0&id=5f0c").unwrap();
        assert_eq!(
            m,
            InboundSms {
                gateway_id: "5f0c".into(),
                from: "+447700900123".into(),
                to: "+441234567890".into(),
                text: "hi  there!".into(),
                media: Vec::new(),
            }
        );
        let u = parse_mo("from=1&to=2&text=%04%1F&charset=UTF-16BE").unwrap();
        assert_eq!(u.text, "П");
        // Without an id, the same callback gets the same derived id.
        assert_eq!(
            u.gateway_id,
            parse_mo("from=1&to=2&text=%04%1F&charset=UTF-16BE").unwrap().gateway_id
        );
        assert_ne!(
            u.gateway_id,
            parse_mo("from=1&to=2&text=%04%20&charset=UTF-16BE").unwrap().gateway_id
        );
        assert!(parse_mo("to=2&text=x").is_none());
    }

    #[test]
    fn dlr_statuses() {
        assert_eq!(dlr_status(1, ""), DeliveryStatus::Delivered);
        assert_eq!(
            dlr_status(2, "NACK/0x0b/Invalid Destination"),
            DeliveryStatus::Failed("NACK/0x0b/Invalid Destination".into())
        );
        assert!(matches!(dlr_status(16, ""), DeliveryStatus::Failed(_)));
        assert!(matches!(dlr_status(8, "ACK/"), DeliveryStatus::Pending(_)));
        assert!(matches!(dlr_status(4, ""), DeliveryStatus::Pending(_)));
    }
}
