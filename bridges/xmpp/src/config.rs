//! The `bridge:` section of the XMPP bridge's config.

use serde::{Deserialize, Serialize};
use trestle::{
    config::{BridgeConfig, Config, ConfigError},
    util::template::Template,
};

/// The XMPP bridge's settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XmppConfig {
    /// The external component (XEP-0114) the bridge logs in as.
    pub component: ComponentConfig,
    /// MUC services (`conference.example.org`) whose rooms may be bridged.
    pub muc_services: Vec<String>,
    /// Portal alias localparts: `{room}` (the room's localpart) and `{service}`.
    #[serde(default = "default_alias_template")]
    pub alias_template: String,
    /// Ghost localparts: `{occupant}` is the escaped occupant JID `room@service/nick`.
    #[serde(default = "default_user_template")]
    pub user_template: String,
    /// The bridge bot's nick in every bridged room.
    #[serde(default = "default_bot_nick")]
    pub bot_nick: String,
    /// Localpart of the bot's JID (`bridge` → `bridge@component/trestle`).
    #[serde(default = "default_bot_localpart")]
    pub bot_localpart: String,
    /// Suffix added to a Matrix user's nick when it is taken in a room (then a number).
    #[serde(default = "default_nick_suffix")]
    pub nick_conflict_suffix: String,
    /// Longest nick, in characters, a Matrix user's displayname is cut to.
    #[serde(default = "default_max_nick")]
    pub max_nick_chars: usize,
    /// Reconnection and keepalive.
    #[serde(default)]
    pub connection: ConnectionConfig,
    /// Files sent from XMPP (XEP-0066 out-of-band URLs, as XEP-0363 uploads send them).
    #[serde(default)]
    pub files: FilesConfig,
    /// The Matrix power levels that stand for XMPP affiliations and roles, both ways.
    #[serde(default)]
    pub power_levels: PowerLevelsConfig,
    /// Room history: backfill of new portals and catch-up after downtime.
    #[serde(default)]
    pub history: HistoryConfig,
}

/// The Matrix power levels of XMPP affiliations and roles (XEP-0045), used both ways: an
/// occupant's ghost gets the level of its affiliation or role, and a Matrix user whose level
/// reaches one of them gets that affiliation (owner, admin) or role (moderator) in the chat.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PowerLevelsConfig {
    /// The level of the `owner` affiliation.
    #[serde(default = "default_owner_level")]
    pub owner: i64,
    /// The level of the `admin` affiliation (which may ban).
    #[serde(default = "default_admin_level")]
    pub admin: i64,
    /// The level of the `moderator` role (which may kick and moderate messages).
    #[serde(default = "default_moderator_level")]
    pub moderator: i64,
}

impl Default for PowerLevelsConfig {
    fn default() -> Self {
        Self {
            owner: default_owner_level(),
            admin: default_admin_level(),
            moderator: default_moderator_level(),
        }
    }
}

impl PowerLevelsConfig {
    /// The Matrix power level of an occupant with `affiliation` and `role`.
    pub fn level_of(&self, affiliation: Option<&str>, role: Option<&str>) -> i64 {
        match (affiliation, role) {
            (Some("owner"), _) => self.owner,
            (Some("admin"), _) => self.admin,
            (_, Some("moderator")) => self.moderator,
            _ => 0,
        }
    }

    /// The standing in an XMPP chat that a Matrix power level stands for.
    pub fn standing_of(&self, level: i64) -> Standing {
        if level >= self.owner {
            Standing::Owner
        } else if level >= self.admin {
            Standing::Admin
        } else if level >= self.moderator {
            Standing::Moderator
        } else {
            Standing::Participant
        }
    }
}

/// Where a Matrix user's power level places their occupant in an XMPP chat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Standing {
    /// A `participant` role with no affiliation beyond `member`.
    Participant,
    /// The `moderator` role.
    Moderator,
    /// The `admin` affiliation.
    Admin,
    /// The `owner` affiliation.
    Owner,
}

/// Room history bridged when the bridge (re)joins a room: the recent history of a new portal,
/// and what was said while the bridge was away (from the room's archive, XEP-0313).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryConfig {
    /// Messages of the room's recent history bridged when its portal is created (0: none).
    #[serde(default = "default_initial_messages")]
    pub initial_messages: u32,
    /// Most messages bridged after downtime per room (0: no catch-up); older ones are skipped.
    #[serde(default = "default_max_catchup")]
    pub max_catchup: u32,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self { initial_messages: default_initial_messages(), max_catchup: default_max_catchup() }
    }
}

/// Largest history limits accepted (one archive query page holds at most 100 messages).
pub const MAX_HISTORY: u32 = 10_000;

/// How files sent from XMPP are downloaded before they are uploaded to the homeserver.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesConfig {
    /// Largest file bridged, in bytes; larger ones are posted as a link with a note.
    #[serde(default = "default_file_max")]
    pub max_bytes: u64,
    /// Seconds a download may take.
    #[serde(default = "default_file_timeout")]
    pub timeout_secs: u64,
    /// Whether URLs on loopback, private or link-local addresses may be fetched. Off by default:
    /// any occupant can send a URL, and the bridge must not become a way into the local network.
    #[serde(default)]
    pub allow_private_addresses: bool,
}

impl Default for FilesConfig {
    fn default() -> Self {
        Self {
            max_bytes: default_file_max(),
            timeout_secs: default_file_timeout(),
            allow_private_addresses: false,
        }
    }
}

/// The component login.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentConfig {
    /// The component's JID, a domain (`matrix.example.org`).
    pub jid: String,
    /// The shared secret configured on the XMPP server for the component.
    pub secret: String,
    /// Host of the XMPP server's component port.
    #[serde(default = "default_host")]
    pub host: String,
    /// The component port.
    #[serde(default = "default_port")]
    pub port: u16,
}

impl std::fmt::Debug for ComponentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComponentConfig")
            .field("jid", &self.jid)
            .field("secret", &"<redacted>")
            .field("host", &self.host)
            .field("port", &self.port)
            .finish()
    }
}

/// Reconnection, keepalive and the write queue.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionConfig {
    /// First reconnection delay, in milliseconds (doubled per failure, with jitter).
    #[serde(default = "default_min_delay")]
    pub reconnect_min_ms: u64,
    /// Longest reconnection delay, in milliseconds.
    #[serde(default = "default_max_delay")]
    pub reconnect_max_ms: u64,
    /// Seconds between keepalive pings to the server.
    #[serde(default = "default_ping")]
    pub ping_interval_secs: u64,
    /// Stanzas that may wait to be written before senders are told to retry.
    #[serde(default = "default_queue")]
    pub write_queue: usize,
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        Self {
            reconnect_min_ms: default_min_delay(),
            reconnect_max_ms: default_max_delay(),
            ping_interval_secs: default_ping(),
            write_queue: default_queue(),
        }
    }
}

fn default_owner_level() -> i64 {
    100
}
fn default_admin_level() -> i64 {
    50
}
fn default_moderator_level() -> i64 {
    50
}
fn default_initial_messages() -> u32 {
    20
}
fn default_max_catchup() -> u32 {
    500
}
fn default_file_max() -> u64 {
    50 * 1024 * 1024
}
fn default_file_timeout() -> u64 {
    60
}
fn default_alias_template() -> String {
    "xmpp_{room}_{service}".to_owned()
}
fn default_user_template() -> String {
    "xmpp_{occupant}".to_owned()
}
fn default_bot_nick() -> String {
    "MatrixBridge".to_owned()
}
fn default_bot_localpart() -> String {
    "bridge".to_owned()
}
fn default_nick_suffix() -> String {
    "[m]".to_owned()
}
fn default_max_nick() -> usize {
    48
}
fn default_host() -> String {
    "127.0.0.1".to_owned()
}
fn default_port() -> u16 {
    5347
}
fn default_min_delay() -> u64 {
    1000
}
fn default_max_delay() -> u64 {
    60_000
}
fn default_ping() -> u64 {
    30
}
fn default_queue() -> usize {
    1024
}

/// Whether `s` is a plausible domain JID (no node, no resource).
fn is_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 1023
        && !s.contains(['@', '/', ' ', ':'])
        && xmpp_parsers::jid::BareJid::new(s).is_ok_and(|j| j.node().is_none())
}

impl BridgeConfig for XmppConfig {
    const EXAMPLE: &'static str = include_str!("example-bridge-section.yaml");

    fn validate(&self, _config: &Config<Self>) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        if !is_domain(&self.component.jid) {
            errors.push(ConfigError::invalid(
                "bridge.component.jid",
                "must be a bare domain such as matrix.example.org",
            ));
        }
        if self.component.secret.is_empty() {
            errors.push(ConfigError::invalid("bridge.component.secret", "must not be empty"));
        }
        if self.component.host.trim().is_empty() {
            errors.push(ConfigError::invalid("bridge.component.host", "must not be empty"));
        }
        let pl = &self.power_levels;
        if pl.moderator < 1 {
            errors.push(ConfigError::invalid(
                "bridge.power_levels.moderator",
                "must be at least 1 (level 0 is everyone's)",
            ));
        }
        if pl.admin < pl.moderator {
            errors.push(ConfigError::invalid(
                "bridge.power_levels.admin",
                "must not be below bridge.power_levels.moderator",
            ));
        }
        if pl.owner < pl.admin {
            errors.push(ConfigError::invalid(
                "bridge.power_levels.owner",
                "must not be below bridge.power_levels.admin",
            ));
        }
        if self.muc_services.is_empty() {
            errors.push(ConfigError::invalid("bridge.muc_services", "at least one is needed"));
        }
        for (i, s) in self.muc_services.iter().enumerate() {
            if !is_domain(s) {
                errors.push(ConfigError::invalid(
                    format!("bridge.muc_services[{i}]"),
                    "must be a bare domain such as conference.example.org",
                ));
            }
        }
        for (key, t, vars) in [
            ("bridge.alias_template", &self.alias_template, &["room", "service"][..]),
            ("bridge.user_template", &self.user_template, &["occupant"][..]),
        ] {
            match Template::parse(t, vars) {
                Err(e) => errors.push(ConfigError::invalid(key, e.to_string())),
                Ok(tpl) => {
                    for v in vars {
                        if !tpl.has(v) {
                            errors.push(ConfigError::invalid(key, format!("must contain {{{v}}}")));
                        }
                    }
                }
            }
        }
        if self.bot_nick.trim().is_empty() || self.bot_nick.chars().any(char::is_control) {
            errors.push(ConfigError::invalid("bridge.bot_nick", "must be a non-empty nick"));
        }
        if self.bot_localpart.is_empty()
            || !self.bot_localpart.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            errors.push(ConfigError::invalid(
                "bridge.bot_localpart",
                "must be lowercase letters and digits",
            ));
        }
        if self.max_nick_chars < 3 {
            errors.push(ConfigError::invalid("bridge.max_nick_chars", "must be at least 3"));
        }
        let c = &self.connection;
        if c.reconnect_min_ms == 0 || c.reconnect_min_ms > c.reconnect_max_ms {
            errors.push(ConfigError::invalid(
                "bridge.connection.reconnect_min_ms",
                "must be at least 1 and at most reconnect_max_ms",
            ));
        }
        if c.ping_interval_secs == 0 {
            errors.push(ConfigError::invalid(
                "bridge.connection.ping_interval_secs",
                "must be at least 1",
            ));
        }
        if c.write_queue == 0 {
            errors
                .push(ConfigError::invalid("bridge.connection.write_queue", "must be at least 1"));
        }
        if self.files.max_bytes == 0 {
            errors.push(ConfigError::invalid("bridge.files.max_bytes", "must be at least 1"));
        }
        if self.files.timeout_secs == 0 {
            errors.push(ConfigError::invalid("bridge.files.timeout_secs", "must be at least 1"));
        }
        for (key, n) in [
            ("bridge.history.initial_messages", self.history.initial_messages),
            ("bridge.history.max_catchup", self.history.max_catchup),
        ] {
            if n > MAX_HISTORY {
                errors.push(ConfigError::invalid(key, format!("must be at most {MAX_HISTORY}")));
            }
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use trestle::config::{Config, example_config};

    use super::XmppConfig;

    fn load(text: &str) -> Result<Config<XmppConfig>, String> {
        Config::<XmppConfig>::from_yaml(text, Vec::<(String, String)>::new())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_example_is_valid_and_has_the_defaults() {
        let c = load(&example_config::<XmppConfig>("xmpp", 9899)).unwrap();
        assert_eq!(c.bridge.component.port, 5347);
        assert_eq!(c.bridge.alias_template, "xmpp_{room}_{service}");
        assert_eq!(c.bridge.history.initial_messages, 20);
        assert_eq!(c.bridge.history.max_catchup, 500);
        assert!(
            !format!("{:?}", c.bridge.component).contains("CHANGE_ME"),
            "the secret is redacted"
        );
    }

    #[test]
    fn errors_name_the_key() {
        let good = example_config::<XmppConfig>("xmpp", 9899);
        for (from, to, key) in [
            ("jid: matrix.example.org", "jid: user@matrix.example.org", "bridge.component.jid"),
            ("secret: CHANGE_ME", "secret: \"\"", "bridge.component.secret"),
            ("    - conference.example.org", "    - \"conf/x\"", "bridge.muc_services[0]"),
            (
                "alias_template: \"xmpp_{room}_{service}\"",
                "alias_template: \"xmpp_{room}\"",
                "bridge.alias_template",
            ),
            (
                "user_template: \"xmpp_{occupant}\"",
                "user_template: \"xmpp_{nick}\"",
                "bridge.user_template",
            ),
            ("reconnect_min_ms: 1000", "reconnect_min_ms: 0", "bridge.connection.reconnect_min_ms"),
            ("write_queue: 1024", "write_queue: 0", "bridge.connection.write_queue"),
            ("max_bytes: 52428800", "max_bytes: 0", "bridge.files.max_bytes"),
            ("initial_messages: 20", "initial_messages: 20000", "bridge.history.initial_messages"),
            ("max_catchup: 500", "max_catchup: 10001", "bridge.history.max_catchup"),
            ("bot_localpart: bridge", "bot_localpart: Bridge!", "bridge.bot_localpart"),
            ("  bot_nick: MatrixBridge", "  bot_nick: MatrixBridge\n  colour: red", "colour"),
        ] {
            assert!(good.contains(from), "{from}");
            let err = load(&good.replacen(from, to, 1)).expect_err(key);
            assert!(err.contains(key), "expected {key} in: {err}");
        }
    }
}
