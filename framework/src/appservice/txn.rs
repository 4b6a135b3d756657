//! Parsing a transaction body into ordered items, without copying the events.

use std::{borrow::Cow, sync::Arc};

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::ApiError;

/// Lane of events that belong to no room (presence).
pub const GLOBAL_LANE: &str = "@global";
/// Lane of to-device events.
pub const TO_DEVICE_LANE: &str = "@to_device";

/// What part of the transaction an item came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemKind {
    /// A timeline or state event (`events`).
    Event,
    /// An ephemeral event: typing, receipt, presence (`ephemeral`).
    Ephemeral,
    /// A to-device event (MSC4203).
    ToDevice,
}

/// One event of a transaction: a slice of the body plus what the queue needs to route it.
#[derive(Debug, Clone)]
pub struct TxnItem {
    /// Index in the transaction's item list (events, then ephemeral, then to-device).
    pub idx: u32,
    /// Which list it came from.
    pub kind: ItemKind,
    /// Ordering lane: the room id, or a global lane.
    pub lane: Arc<str>,
    /// The event type.
    pub event_type: String,
    /// The event id, where there is one.
    pub event_id: Option<String>,
    /// The raw JSON of the event.
    pub raw: Bytes,
}

/// A parsed transaction.
#[derive(Debug)]
pub struct ParsedTxn {
    /// Items in order.
    pub items: Vec<TxnItem>,
    /// MSC3202 device-list changes, kept for encryption support.
    pub device_lists: Option<serde_json::Value>,
    /// MSC3202 one-time-key counts.
    pub otk_counts: Option<serde_json::Value>,
    /// MSC3202 unused fallback key types.
    pub fallback_keys: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Body<'a> {
    #[serde(borrow)]
    events: Vec<&'a RawValue>,
    #[serde(borrow, default)]
    ephemeral: Option<Vec<&'a RawValue>>,
    #[serde(borrow, default, rename = "de.sorunome.msc2409.ephemeral")]
    ephemeral_unstable: Option<Vec<&'a RawValue>>,
    #[serde(borrow, default)]
    to_device: Option<Vec<&'a RawValue>>,
    #[serde(borrow, default, rename = "de.sorunome.msc2409.to_device")]
    to_device_unstable: Option<Vec<&'a RawValue>>,
    #[serde(default)]
    device_lists: Option<serde_json::Value>,
    #[serde(default, rename = "org.matrix.msc3202.device_lists")]
    device_lists_unstable: Option<serde_json::Value>,
    #[serde(default)]
    device_one_time_keys_count: Option<serde_json::Value>,
    #[serde(default, rename = "org.matrix.msc3202.device_one_time_keys_count")]
    otk_unstable: Option<serde_json::Value>,
    #[serde(default, rename = "org.matrix.msc3202.device_one_time_key_counts")]
    otk_legacy: Option<serde_json::Value>,
    #[serde(default)]
    device_unused_fallback_key_types: Option<serde_json::Value>,
    #[serde(default, rename = "org.matrix.msc3202.device_unused_fallback_key_types")]
    fallback_unstable: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Peek<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow, default)]
    room_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    event_id: Option<Cow<'a, str>>,
}

/// Parses and validates a transaction body. `M_NOT_JSON` if it is not JSON at all,
/// `M_BAD_JSON` if it is JSON of the wrong shape (including any event that is not an object
/// with a string `type`).
pub fn parse(body: &Bytes) -> Result<ParsedTxn, ApiError> {
    let parsed: Body<'_> = match serde_json::from_slice(body) {
        Ok(b) => b,
        Err(e) if e.is_syntax() || e.is_eof() => return Err(ApiError::NotJson(e.to_string())),
        Err(e) => return Err(ApiError::BadJson(e.to_string())),
    };
    let base = body.as_ptr() as usize;
    let slice = |raw: &RawValue| -> Bytes {
        let s = raw.get();
        let start = s.as_ptr() as usize - base;
        body.slice(start..start + s.len())
    };
    // The stable key wins; both are never processed (Synapse may send both).
    let ephemeral = parsed.ephemeral.or(parsed.ephemeral_unstable).unwrap_or_default();
    let to_device = parsed.to_device.or(parsed.to_device_unstable).unwrap_or_default();
    let mut items = Vec::with_capacity(parsed.events.len() + ephemeral.len() + to_device.len());
    let lists = [
        (ItemKind::Event, parsed.events),
        (ItemKind::Ephemeral, ephemeral),
        (ItemKind::ToDevice, to_device),
    ];
    for (kind, list) in lists {
        for raw in list {
            let idx = u32::try_from(items.len())
                .map_err(|_| ApiError::BadJson("too many events".into()))?;
            let peek: Peek<'_> = serde_json::from_str(raw.get()).map_err(|e| {
                ApiError::BadJson(format!(
                    "item {idx}: not an event object with a string `type`: {e}"
                ))
            })?;
            let lane: Arc<str> = match (kind, &peek.room_id) {
                (ItemKind::ToDevice, _) => Arc::from(TO_DEVICE_LANE),
                (_, Some(room)) => Arc::from(room.as_ref()),
                (ItemKind::Event, None) => {
                    return Err(ApiError::BadJson(format!("event {idx} has no room_id")));
                }
                (ItemKind::Ephemeral, None) => Arc::from(GLOBAL_LANE),
            };
            items.push(TxnItem {
                idx,
                kind,
                lane,
                event_type: peek.kind.into_owned(),
                event_id: peek.event_id.map(Cow::into_owned),
                raw: slice(raw),
            });
        }
    }
    Ok(ParsedTxn {
        items,
        device_lists: parsed.device_lists.or(parsed.device_lists_unstable),
        otk_counts: parsed.device_one_time_keys_count.or(parsed.otk_unstable).or(parsed.otk_legacy),
        fallback_keys: parsed.device_unused_fallback_key_types.or(parsed.fallback_unstable),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<ParsedTxn, ApiError> {
        parse(&Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn shapes() {
        assert!(matches!(p("nope"), Err(ApiError::NotJson(_))));
        assert!(matches!(p("{\"events\": ["), Err(ApiError::NotJson(_))));
        assert!(matches!(p("{}"), Err(ApiError::BadJson(_))));
        assert!(matches!(p(r#"{"events": 5}"#), Err(ApiError::BadJson(_))));
        assert!(matches!(p(r#"{"events": "abc"}"#), Err(ApiError::BadJson(_))));
        assert!(matches!(p(r#"{"events": [null]}"#), Err(ApiError::BadJson(_))));
        assert!(matches!(p(r#"{"events": [{"room_id": "!r"}]}"#), Err(ApiError::BadJson(_))));
        assert!(matches!(p(r#"{"events": [{"type": "m.x"}]}"#), Err(ApiError::BadJson(_))));
        assert!(matches!(p("[]"), Err(ApiError::BadJson(_))));
        assert_eq!(p(r#"{"events": []}"#).unwrap().items.len(), 0);
        assert_eq!(
            p(r#"{"events": [], "ephemeral": [], "de.sorunome.msc2409.to_device": []}"#)
                .unwrap()
                .items
                .len(),
            0
        );
    }

    #[test]
    fn items_in_order_with_lanes_and_both_ephemeral_keys_once() {
        let body = r#"{"events":[{"type":"m.room.message","room_id":"!a:x","event_id":"$1","content":{"body":"hé"}},
            {"type":"m.room.member","room_id":"!b:x","event_id":"$2","state_key":"@u:x","content":{}}],
          "ephemeral":[{"type":"m.typing","room_id":"!a:x","content":{"user_ids":[]}},{"type":"m.presence","sender":"@u:x","content":{}}],
          "de.sorunome.msc2409.ephemeral":[{"type":"m.typing","room_id":"!a:x","content":{"user_ids":[]}},{"type":"m.presence","sender":"@u:x","content":{}}],
          "de.sorunome.msc2409.to_device":[{"type":"m.room_key_request","sender":"@u:x","to_user_id":"@g:x","to_device_id":"D","content":{}}],
          "org.matrix.msc3202.device_lists":{"changed":["@u:x"]},
          "org.matrix.msc3202.device_one_time_key_counts":{"@g:x":{"D":{"signed_curve25519":3}}}}"#;
        let t = p(body).unwrap();
        let lanes: Vec<_> = t.items.iter().map(|i| (i.idx, &*i.lane, i.kind)).collect();
        assert_eq!(
            lanes,
            [
                (0, "!a:x", ItemKind::Event),
                (1, "!b:x", ItemKind::Event),
                (2, "!a:x", ItemKind::Ephemeral),
                (3, GLOBAL_LANE, ItemKind::Ephemeral),
                (4, TO_DEVICE_LANE, ItemKind::ToDevice)
            ]
        );
        let v: serde_json::Value = serde_json::from_slice(&t.items[0].raw).unwrap();
        assert_eq!(v["content"]["body"], "hé");
        assert_eq!(t.items[1].event_id.as_deref(), Some("$2"));
        assert_eq!(t.device_lists.unwrap()["changed"][0], "@u:x");
        assert!(t.otk_counts.is_some());
    }
}
