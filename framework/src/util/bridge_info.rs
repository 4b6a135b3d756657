//! `m.bridge` / `uk.half-shot.bridge` state content (MSC2346).

use serde::{Deserialize, Serialize};

/// The stable event type.
pub const M_BRIDGE: &str = "m.bridge";
/// The unstable event type most clients read today.
pub const UK_HALF_SHOT_BRIDGE: &str = "uk.half-shot.bridge";

/// One section (`protocol`, `network`, `channel`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BridgeInfoSection {
    /// Identifier, lowercase where the remote side allows.
    pub id: String,
    /// Human name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub displayname: Option<String>,
    /// Avatar (mxc URI).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avatar_url: Option<String>,
    /// Link to the remote thing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_url: Option<String>,
}

/// The content of the bridge info state event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BridgeInfo {
    /// The bridge bot.
    pub bridgebot: String,
    /// Who created the bridge link, if a user did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creator: Option<String>,
    /// The protocol.
    pub protocol: BridgeInfoSection,
    /// The network, for protocols with several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<BridgeInfoSection>,
    /// The remote room.
    pub channel: BridgeInfoSection,
}

impl BridgeInfo {
    /// The state key: unique per bridged channel (`protocol/network/channel`, `/` escaped).
    pub fn state_key(&self) -> String {
        let esc = |s: &str| s.replace('%', "%25").replace('/', "%2F");
        let mut parts = vec![esc(&self.protocol.id)];
        if let Some(n) = &self.network {
            parts.push(esc(&n.id));
        }
        parts.push(esc(&self.channel.id));
        parts.join("/")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_key_and_serialisation() {
        let s = |id: &str| BridgeInfoSection {
            id: id.into(),
            displayname: None,
            avatar_url: None,
            external_url: None,
        };
        let info = BridgeInfo {
            bridgebot: "@b:x".into(),
            creator: None,
            protocol: s("irc"),
            network: Some(s("libera")),
            channel: s("#a/b"),
        };
        assert_eq!(info.state_key(), "irc/libera/#a%2Fb");
        let v = serde_json::to_value(&info).unwrap();
        assert!(v.get("creator").is_none());
        assert_eq!(v["channel"]["id"], "#a/b");
    }
}
