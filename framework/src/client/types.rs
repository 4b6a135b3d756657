//! Request and response types used by the client and intents.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `preset` for `POST /createRoom`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoomPreset {
    /// `private_chat`: invite-only, shared history.
    PrivateChat,
    /// `public_chat`: public join rule.
    PublicChat,
    /// `trusted_private_chat`: like private, invitees get the creator's power level.
    TrustedPrivateChat,
}

/// `visibility` of a room in a room directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DirectoryVisibility {
    /// Listed.
    Public,
    /// Not listed.
    Private,
}

/// A state event to include in `initial_state` of `POST /createRoom`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InitialStateEvent {
    /// Event type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// State key (often empty).
    #[serde(default)]
    pub state_key: String,
    /// Event content.
    pub content: serde_json::Value,
}

/// Options for [`Intent::create_room`](super::Intent::create_room).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CreateRoom {
    /// `name`.
    pub name: Option<String>,
    /// `topic`.
    pub topic: Option<String>,
    /// `room_alias_name`: the localpart of the canonical alias to create.
    pub alias_localpart: Option<String>,
    /// Users to invite.
    pub invite: Vec<String>,
    /// `is_direct` flag for DMs.
    pub is_direct: bool,
    /// `preset`.
    pub preset: Option<RoomPreset>,
    /// Directory `visibility` (server default is private).
    pub visibility: Option<DirectoryVisibility>,
    /// `initial_state` events.
    pub initial_state: Vec<InitialStateEvent>,
    /// `power_level_content_override`. In room versions with privileged
    /// creators (12 and later) the creators are stripped from `users`.
    pub power_level_content_override: Option<serde_json::Value>,
    /// `room_version`; `None` uses the server default.
    pub room_version: Option<String>,
    /// `creation_content`.
    pub creation_content: Option<serde_json::Value>,
}

/// A user's global profile.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// `displayname`.
    #[serde(default)]
    pub displayname: Option<String>,
    /// `avatar_url` (an `mxc://` URI).
    #[serde(default)]
    pub avatar_url: Option<String>,
}

/// A joined member as returned by `/joined_members`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinedMember {
    /// Room display name.
    #[serde(default)]
    pub display_name: Option<String>,
    /// Room avatar.
    #[serde(default)]
    pub avatar_url: Option<String>,
}

/// Result of `GET /account/whoami`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhoAmI {
    /// The (asserted) user id.
    pub user_id: String,
    /// The device id, if any.
    #[serde(default)]
    pub device_id: Option<String>,
    /// Whether the user is a guest.
    #[serde(default)]
    pub is_guest: bool,
}

/// Result of `GET /_matrix/client/versions`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Versions {
    /// Supported spec versions (`v1.11`, …).
    #[serde(default)]
    pub versions: Vec<String>,
    /// Unstable feature flags.
    #[serde(default)]
    pub unstable_features: BTreeMap<String, bool>,
}

impl Versions {
    /// True if the server lists `version` or flags `feature` as enabled.
    pub fn supports(&self, version: &str, feature: &str) -> bool {
        self.versions.iter().any(|v| v == version)
            || self.unstable_features.get(feature).copied().unwrap_or(false)
    }
}

/// Result of resolving a room alias.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedAlias {
    /// The room id.
    pub room_id: String,
    /// Servers that know the room.
    #[serde(default)]
    pub servers: Vec<String>,
}

/// Presence state for [`Intent::set_presence`](super::Intent::set_presence).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Presence {
    /// `online`
    Online,
    /// `offline`
    Offline,
    /// `unavailable`
    Unavailable,
}

/// True if `room_version` gives creators infinite power (room v12 and later,
/// plus the `org.matrix.hydra.11` prototype). Creators must then not appear in
/// `m.room.power_levels` `users`.
pub fn room_version_has_privileged_creators(room_version: &str) -> bool {
    if room_version.contains("hydra") {
        return true;
    }
    room_version.parse::<u32>().is_ok_and(|v| v >= 12)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn privileged_creator_versions() {
        assert!(room_version_has_privileged_creators("12"));
        assert!(room_version_has_privileged_creators("13"));
        assert!(room_version_has_privileged_creators("org.matrix.hydra.11"));
        assert!(!room_version_has_privileged_creators("11"));
        assert!(!room_version_has_privileged_creators("1"));
        assert!(!room_version_has_privileged_creators("org.example.custom"));
    }
}
