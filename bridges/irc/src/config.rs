//! The `bridge:` section of the IRC bridge's config.

use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};
use trestle::config::{BridgeConfig, Config, ConfigError};

/// The IRC bridge's settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IrcConfig {
    /// The IRC networks, keyed by a short lowercase id used in user ids and aliases.
    pub networks: BTreeMap<String, NetworkConfig>,
    /// Bridge-wide pace of (re)connections to each server, so that a restart or a netsplit
    /// never floods it.
    #[serde(default)]
    pub connect_pace: ConnectPace,
    /// The identd (RFC 1413) answering for the bridge's connections.
    #[serde(default)]
    pub identd: IdentdConfig,
}

/// How fast connections are (re)opened.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectPace {
    /// Connection attempts allowed per interval, per network.
    #[serde(default = "default_pace_burst")]
    pub burst: u32,
    /// The interval, in milliseconds.
    #[serde(default = "default_pace_interval")]
    pub interval_ms: u64,
}

fn default_pace_burst() -> u32 {
    5
}
fn default_pace_interval() -> u64 {
    1000
}

impl Default for ConnectPace {
    fn default() -> Self {
        Self { burst: default_pace_burst(), interval_ms: default_pace_interval() }
    }
}

/// The identd.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct IdentdConfig {
    /// Run it.
    #[serde(default)]
    pub enabled: bool,
    /// Where it listens (port 113 needs privileges or a redirect).
    #[serde(default)]
    pub listen: Option<std::net::SocketAddr>,
}

/// How Matrix users appear on an IRC network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BridgeMode {
    /// Each Matrix user gets an IRC connection of their own.
    Puppets,
    /// One connection relays everyone's messages with a name prefix (with `RELAYMSG`, as a nick
    /// of their own, where the server offers it and the bot is a channel operator).
    Relay,
}

/// When a portal's IRC members become Matrix ghosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MembershipSync {
    /// Every member joins on portal creation.
    All,
    /// Members join when they first speak.
    Lazy,
}

/// One IRC network.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// Human name (`Libera.Chat`).
    pub name: String,
    /// Server host.
    pub host: String,
    /// Server port.
    #[serde(default = "default_port")]
    pub port: u16,
    /// Use TLS.
    #[serde(default = "yes")]
    pub tls: bool,
    /// Accept any TLS certificate (testing only).
    #[serde(default)]
    pub tls_insecure: bool,
    /// Server password (`PASS`) for the bot.
    #[serde(default)]
    pub password: Option<String>,
    /// SASL PLAIN account of the bot.
    #[serde(default)]
    pub sasl_account: Option<String>,
    /// SASL PLAIN password of the bot.
    #[serde(default)]
    pub sasl_password: Option<String>,
    /// A PEM file with the bot's TLS client certificate and its private key (with `tls`): the
    /// bot logs in with SASL EXTERNAL unless `sasl_account` is set. Puppets do not use it.
    #[serde(default)]
    pub tls_client_cert: Option<std::path::PathBuf>,
    /// Local address the bridge's connections bind to.
    #[serde(default)]
    pub bind_address: Option<IpAddr>,
    /// An IPv6 prefix (`2001:db8:1::/64`): each Matrix user gets a stable address in it.
    #[serde(default)]
    pub ipv6_prefix: Option<String>,
    /// The bot's nick.
    #[serde(default = "default_bot_nick")]
    pub bot_nick: String,
    /// Ghost localparts: `{network}` and `{nick}` (escaped, lowercase).
    #[serde(default = "default_user_template")]
    pub user_template: String,
    /// Portal alias localparts: `{network}` and `{channel}` (the full channel name, with `#`).
    #[serde(default = "default_alias_template")]
    pub alias_template: String,
    /// A Matrix user's nick on IRC: `{displayname}` or `{localpart}`.
    #[serde(default = "default_nick_template")]
    pub nick_template: String,
    /// Puppets or relay.
    #[serde(default = "default_mode")]
    pub mode: BridgeMode,
    /// Relay format: `{displayname}` and `{message}`.
    #[serde(default = "default_relay_template")]
    pub relay_template: String,
    /// When IRC members become ghosts.
    #[serde(default = "default_membership")]
    pub membership_sync: MembershipSync,
    /// Channel mode → Matrix power level.
    #[serde(default = "default_modes")]
    pub mode_power_levels: BTreeMap<char, i64>,
    /// Channels always bridged to existing rooms: channel → room id.
    #[serde(default)]
    pub static_channels: BTreeMap<String, String>,
    /// Whether Matrix users may create portals by joining aliases or with `!join`.
    #[serde(default = "yes")]
    pub dynamic_channels: bool,
    /// Matrix users never bridged (regexes over user ids).
    #[serde(default)]
    pub excluded_users: Vec<String>,
    /// Most puppet connections to this network.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Most channels one Matrix user's puppet may be in.
    #[serde(default = "default_max_channels")]
    pub max_channels_per_user: u32,
    /// Minutes of inactivity after which a puppet disconnects (0 = never).
    #[serde(default = "default_idle")]
    pub idle_timeout_minutes: u64,
    /// Messages longer than this many IRC lines are uploaded and sent as a link.
    #[serde(default = "default_max_lines")]
    pub max_lines: usize,
    /// Flood control: lines allowed in a burst.
    #[serde(default = "default_flood_burst")]
    pub flood_burst: u32,
    /// Flood control: milliseconds of penalty per line.
    #[serde(default = "default_flood_penalty")]
    pub flood_penalty_ms: u64,
    /// Seconds the ghosts of users lost in a netsplit (a QUIT naming two servers, or a wave of
    /// quits) stay in their rooms: those back within it never leave, the others leave after.
    #[serde(default = "default_netsplit")]
    pub netsplit_debounce_secs: u64,
    /// What to do with a Matrix redaction when the server cannot delete messages.
    #[serde(default)]
    pub redaction_fallback: RedactionFallback,
}

/// What a redaction becomes on a server without message deletion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RedactionFallback {
    /// Nothing is sent to IRC.
    #[default]
    Ignore,
    /// A short notice that the message was deleted.
    Notice,
}

impl std::fmt::Debug for NetworkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetworkConfig")
            .field("name", &self.name)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("sasl_account", &self.sasl_account)
            .field("sasl_password", &self.sasl_password.as_ref().map(|_| "<redacted>"))
            .field("tls_client_cert", &self.tls_client_cert)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

fn yes() -> bool {
    true
}
fn default_port() -> u16 {
    6697
}
fn default_bot_nick() -> String {
    "MatrixBridge".to_owned()
}
fn default_user_template() -> String {
    "irc_{network}_{nick}".to_owned()
}
fn default_alias_template() -> String {
    "irc_{network}_{channel}".to_owned()
}
fn default_nick_template() -> String {
    "{displayname}[m]".to_owned()
}
fn default_mode() -> BridgeMode {
    BridgeMode::Relay
}
fn default_relay_template() -> String {
    "<{displayname}> {message}".to_owned()
}
fn default_membership() -> MembershipSync {
    MembershipSync::All
}
fn default_modes() -> BTreeMap<char, i64> {
    BTreeMap::from([('o', 50), ('h', 25), ('v', 1)])
}
fn default_max_connections() -> u32 {
    1000
}
fn default_max_channels() -> u32 {
    50
}
fn default_idle() -> u64 {
    7 * 24 * 60
}
fn default_max_lines() -> usize {
    5
}
fn default_flood_burst() -> u32 {
    5
}
fn default_flood_penalty() -> u64 {
    2000
}
fn default_netsplit() -> u64 {
    300
}

impl BridgeConfig for IrcConfig {
    const EXAMPLE: &'static str = include_str!("example-bridge-section.yaml");

    fn validate(&self, config: &Config<Self>) -> Vec<ConfigError> {
        let _ = config;
        let mut errors = Vec::new();
        if self.networks.is_empty() {
            errors.push(ConfigError::invalid("bridge.networks", "at least one network is needed"));
        }
        for (id, n) in &self.networks {
            let key = |k: &str| format!("bridge.networks.{id}.{k}");
            if id.is_empty()
                || !id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                errors.push(ConfigError::invalid(
                    format!("bridge.networks.{id}"),
                    "network ids must be lowercase letters, digits or -",
                ));
            }
            if n.host.trim().is_empty() {
                errors.push(ConfigError::invalid(key("host"), "must not be empty"));
            }
            for (k, t, vars) in [
                ("user_template", &n.user_template, &["network", "nick"][..]),
                ("alias_template", &n.alias_template, &["network", "channel"][..]),
            ] {
                for v in vars {
                    if !t.contains(&format!("{{{v}}}")) {
                        errors.push(ConfigError::invalid(key(k), format!("must contain {{{v}}}")));
                    }
                }
            }
            if !n.nick_template.contains("{displayname}")
                && !n.nick_template.contains("{localpart}")
            {
                errors.push(ConfigError::invalid(
                    key("nick_template"),
                    "must contain {displayname} or {localpart}",
                ));
            }
            if !n.relay_template.contains("{message}") {
                errors.push(ConfigError::invalid(key("relay_template"), "must contain {message}"));
            }
            if let Some(path) = &n.tls_client_cert {
                if !n.tls {
                    errors.push(ConfigError::invalid(
                        key("tls_client_cert"),
                        "needs tls: true (a client certificate is sent in the TLS handshake)",
                    ));
                } else if let Err(e) = crate::conn::ClientCert::from_pem_file(path) {
                    errors.push(ConfigError::invalid(key("tls_client_cert"), e));
                }
            }
            if n.sasl_account.is_some() != n.sasl_password.is_some() {
                errors.push(ConfigError::invalid(
                    key("sasl_password"),
                    "sasl_account and sasl_password go together",
                ));
            }
            for (i, r) in n.excluded_users.iter().enumerate() {
                if let Err(e) = regex::Regex::new(r) {
                    errors.push(ConfigError::invalid(
                        format!("{}[{i}]", key("excluded_users")),
                        e.to_string(),
                    ));
                }
            }
            for (chan, room) in &n.static_channels {
                if !chan.starts_with(['#', '&', '!', '+']) {
                    errors.push(ConfigError::invalid(
                        format!("{}.{chan}", key("static_channels")),
                        "not a channel name",
                    ));
                }
                if !room.starts_with('!') {
                    errors.push(ConfigError::invalid(
                        format!("{}.{chan}", key("static_channels")),
                        "must map to a room id (!…)",
                    ));
                }
            }
            if let Some(p) = &n.ipv6_prefix
                && crate::addr::parse_prefix(p).is_none()
            {
                errors.push(ConfigError::invalid(
                    key("ipv6_prefix"),
                    "must be an IPv6 prefix such as 2001:db8:1::/64 (length 1-120)",
                ));
            }
            if n.mode == BridgeMode::Puppets && n.max_connections == 0 {
                errors.push(ConfigError::invalid(
                    key("max_connections"),
                    "must be at least 1 in puppets mode",
                ));
            }
            if n.flood_burst == 0 {
                errors.push(ConfigError::invalid(key("flood_burst"), "must be at least 1"));
            }
        }
        errors
    }
}
