//! Configuration: the keys every bridge shares, plus a bridge-specific `bridge:` section.
//!
//! Loading is strict: unknown keys are rejected, and every error names the key
//! (`appservice.listen: invalid socket address syntax`). Any key may be overridden from the
//! environment with `TRESTLE__SECTION__KEY=value` (double underscores separate levels; the value
//! is read as YAML), which is how secrets are usually supplied.

use std::{collections::BTreeMap, fmt, net::SocketAddr, path::PathBuf};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// An error in the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The YAML is malformed or a key has the wrong type (or is unknown).
    #[error("{key}: {message}")]
    Parse {
        /// The dotted key path (`.` for the document).
        key: String,
        /// What is wrong.
        message: String,
    },
    /// A value is well-formed but not acceptable.
    #[error("{key}: {message}")]
    Invalid {
        /// The dotted key path.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// Several problems at once.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Many(Vec<ConfigError>),
}

impl ConfigError {
    /// An [`Invalid`](Self::Invalid) error for `key`.
    pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid { key: key.into(), message: message.into() }
    }
}

/// The bridge-specific part of the configuration (the `bridge:` section).
pub trait BridgeConfig:
    DeserializeOwned + Serialize + Clone + Send + Sync + fmt::Debug + 'static
{
    /// The commented YAML of the `bridge:` section as it appears in the example config,
    /// indented by two spaces (without the `bridge:` line itself).
    const EXAMPLE: &'static str;

    /// Checks values that types alone cannot; each problem names its key (starting `bridge.`).
    fn validate(&self, _config: &Config<Self>) -> Vec<ConfigError> {
        Vec::new()
    }
}

/// The whole configuration of a bridge: the keys every bridge shares and its `bridge:` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config<B> {
    /// How to reach the homeserver.
    pub homeserver: HomeserverConfig,
    /// The application service itself.
    pub appservice: AppserviceConfig,
    /// Storage.
    #[serde(default)]
    pub database: DatabaseConfig,
    /// Logging.
    #[serde(default)]
    pub logging: LoggingConfig,
    /// Prometheus metrics.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Who may use the bridge: `*`, a domain, or a user id mapped to `none`, `relay`, `user` or
    /// `admin`. The most specific entry wins.
    #[serde(default = "default_permissions")]
    pub permissions: BTreeMap<String, PermissionLevel>,
    /// The durable inbound queue.
    #[serde(default)]
    pub queue: QueueConfig,
    /// Signed, expiring links to Matrix media for the remote network.
    #[serde(default)]
    pub media_proxy: crate::media::MediaProxyConfig,
    /// The bridge's own section.
    pub bridge: B,
}

/// A user's permission level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PermissionLevel {
    /// May not use the bridge.
    #[default]
    None,
    /// Messages are relayed by the bot, no puppet of their own.
    Relay,
    /// Normal use.
    User,
    /// Administration commands too.
    Admin,
}

impl<B> Config<B> {
    /// The permission level of a Matrix user: exact user id, then domain, then `*`.
    pub fn permission_for(&self, user_id: &str) -> PermissionLevel {
        if let Some(l) = self.permissions.get(user_id) {
            return *l;
        }
        let domain = user_id.split_once(':').map(|(_, d)| d).unwrap_or_default();
        if let Some(l) = self.permissions.get(domain) {
            return *l;
        }
        self.permissions.get("*").copied().unwrap_or_default()
    }

    /// The bot's full user id.
    pub fn bot_user_id(&self) -> String {
        format!("@{}:{}", self.appservice.bot_localpart, self.homeserver.domain)
    }
}

fn default_permissions() -> BTreeMap<String, PermissionLevel> {
    BTreeMap::from([("*".to_owned(), PermissionLevel::User)])
}

/// How to reach the homeserver.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HomeserverConfig {
    /// Client-server API base URL, e.g. `http://localhost:8008`.
    pub url: url::Url,
    /// The server name (the part after `:` in user ids).
    pub domain: String,
}

/// The application service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppserviceConfig {
    /// Registration id (unique on the homeserver, never changed).
    pub id: String,
    /// Address and port the bridge listens on.
    pub listen: SocketAddr,
    /// The URL the homeserver uses to reach the bridge (may carry a path prefix).
    pub url: url::Url,
    /// Localpart of the bridge bot.
    pub bot_localpart: String,
    /// Displayname of the bridge bot.
    #[serde(default)]
    pub bot_displayname: Option<String>,
    /// Path of the registration file; the tokens are read from there.
    pub registration: PathBuf,
    /// Whether the registration asks for ephemeral events (typing, receipts, presence).
    #[serde(default = "yes")]
    pub receive_ephemeral: bool,
    /// Largest request body accepted from the homeserver, in bytes.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
}

fn yes() -> bool {
    true
}

fn default_max_body() -> usize {
    // Synapse sends up to 100 events of up to 64 KiB, plus ephemeral data.
    16 * 1024 * 1024
}

/// Storage.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// SQLite database file.
    #[serde(default = "default_db_path")]
    pub path: PathBuf,
    /// Passphrase for secrets stored at rest (passwords, SASL credentials).
    #[serde(default)]
    pub secret_key: Option<String>,
    /// How long transaction ids are remembered for dedupe, in days.
    #[serde(default = "default_retention")]
    pub txn_retention_days: u32,
}

impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("path", &self.path)
            .field("secret_key", &self.secret_key.as_ref().map(|_| "<redacted>"))
            .field("txn_retention_days", &self.txn_retention_days)
            .finish()
    }
}

fn default_db_path() -> PathBuf {
    PathBuf::from("trestle.db")
}

fn default_retention() -> u32 {
    7
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self { path: default_db_path(), secret_key: None, txn_retention_days: default_retention() }
    }
}

/// Logging.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggingConfig {
    /// A tracing filter, e.g. `info` or `info,trestle=debug`. `RUST_LOG` overrides it.
    #[serde(default = "default_level")]
    pub level: String,
    /// `human` or `json`.
    #[serde(default)]
    pub format: LogFormat,
}

fn default_level() -> String {
    "info".to_owned()
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self { level: default_level(), format: LogFormat::Human }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Readable lines.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

/// Prometheus metrics.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve `/metrics` on the appservice listener.
    #[serde(default = "yes")]
    pub enabled: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { enabled: true }
    }
}

/// The durable inbound queue.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// Attempts per event before it goes to the dead-letter table.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// First retry delay, in milliseconds (doubles each attempt, with jitter).
    #[serde(default = "default_backoff")]
    pub initial_backoff_ms: u64,
    /// Retry delay cap, in milliseconds.
    #[serde(default = "default_max_backoff")]
    pub max_backoff_ms: u64,
    /// Events accepted but not yet handled before the bridge pushes back on the homeserver.
    #[serde(default = "default_pending")]
    pub max_pending_events: usize,
}

fn default_attempts() -> u32 {
    5
}
fn default_backoff() -> u64 {
    500
}
fn default_max_backoff() -> u64 {
    60_000
}
fn default_pending() -> usize {
    100_000
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            max_attempts: default_attempts(),
            initial_backoff_ms: default_backoff(),
            max_backoff_ms: default_max_backoff(),
            max_pending_events: default_pending(),
        }
    }
}

impl<B: BridgeConfig> Config<B> {
    /// Reads, overrides from the environment, parses and validates a config file.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::from_yaml(&text, std::env::vars())
    }

    /// Parses and validates YAML text, applying `TRESTLE__…` overrides from `env`.
    pub fn from_yaml(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut value: serde_yaml::Value = serde_yaml::from_str(text)
            .map_err(|e| ConfigError::Parse { key: ".".to_owned(), message: e.to_string() })?;
        apply_env_overrides(&mut value, env)?;
        let config: Self = serde_path_to_error::deserialize(value).map_err(|e| {
            let key = e.path().to_string();
            ConfigError::Parse { key, message: e.into_inner().to_string() }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value; all problems are reported together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let c = self;
        let mut errors = Vec::new();
        let lp_ok = |s: &str| {
            !s.is_empty()
                && s.bytes().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'=' | b'-' | b'/' | b'+'))
        };
        if !lp_ok(&c.appservice.bot_localpart) {
            errors.push(ConfigError::invalid(
                "appservice.bot_localpart",
                "must be a non-empty lowercase Matrix localpart (a-z 0-9 . _ = - / +)",
            ));
        }
        if c.appservice.id.is_empty() || c.appservice.id.contains('|') {
            errors.push(ConfigError::invalid(
                "appservice.id",
                "must be non-empty and not contain `|`",
            ));
        }
        if c.homeserver.domain.is_empty() || c.homeserver.domain.contains(['/', '@', ' ']) {
            errors.push(ConfigError::invalid(
                "homeserver.domain",
                "must be a server name such as example.org",
            ));
        }
        for (scheme, key) in [
            (c.homeserver.url.scheme(), "homeserver.url"),
            (c.appservice.url.scheme(), "appservice.url"),
        ] {
            if scheme != "http" && scheme != "https" {
                errors.push(ConfigError::invalid(key, "must be an http or https URL"));
            }
        }
        for key in c.permissions.keys() {
            let ok = key == "*"
                || (key.starts_with('@') && key.contains(':'))
                || (!key.is_empty() && !key.contains(['@', ':', ' ', '/']));
            if !ok {
                errors.push(ConfigError::invalid(
                    format!("permissions.{key}"),
                    "must be `*`, a domain, or a full user id (@user:domain)",
                ));
            }
        }
        if c.queue.max_attempts == 0 {
            errors.push(ConfigError::invalid("queue.max_attempts", "must be at least 1"));
        }
        if c.queue.max_pending_events < 200 {
            errors.push(ConfigError::invalid(
                "queue.max_pending_events",
                "must be at least 200 (two transactions)",
            ));
        }
        if c.appservice.max_body_bytes < 64 * 1024 {
            errors
                .push(ConfigError::invalid("appservice.max_body_bytes", "must be at least 65536"));
        }
        errors.extend(self.bridge.validate(self));
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0)),
            _ => Err(ConfigError::Many(errors)),
        }
    }
}

/// Applies `TRESTLE__A__B=value` variables to the YAML tree (`a.b = value`).
fn apply_env_overrides(
    root: &mut serde_yaml::Value,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix("TRESTLE__") else { continue };
        let path: Vec<String> = rest.split("__").map(str::to_lowercase).collect();
        if path.iter().any(String::is_empty) {
            return Err(ConfigError::invalid(name, "empty key segment in environment override"));
        }
        let value: serde_yaml::Value =
            serde_yaml::from_str(&raw).unwrap_or_else(|_| serde_yaml::Value::String(raw.clone()));
        let mut node = &mut *root;
        for (i, seg) in path.iter().enumerate() {
            if !node.is_mapping() {
                *node = serde_yaml::Value::Mapping(serde_yaml::Mapping::new());
            }
            let map = node.as_mapping_mut().ok_or_else(|| {
                ConfigError::invalid(path[..i].join("."), "cannot override: not a mapping")
            })?;
            let key = serde_yaml::Value::String(seg.clone());
            if i + 1 == path.len() {
                map.insert(key, value.clone());
                break;
            }
            node = map.entry(key).or_insert(serde_yaml::Value::Mapping(serde_yaml::Mapping::new()));
        }
    }
    Ok(())
}

/// The commented example of the common keys, with `{name}` standing for the bridge name and
/// `{port}` for its default port.
pub(crate) const COMMON_EXAMPLE: &str = r#"# Trestle {name} bridge configuration.
# Every key can be overridden from the environment: TRESTLE__SECTION__KEY=value
# (for example TRESTLE__DATABASE__SECRET_KEY). Unknown keys are rejected.

homeserver:
  # Client-server API base URL of your homeserver.
  url: http://localhost:8008
  # Your server name: the part after the colon in user ids.
  domain: example.org

appservice:
  # Registration id: unique on the homeserver, never change it once registered.
  id: {name}
  # Address and port the bridge listens on for the homeserver.
  listen: 127.0.0.1:{port}
  # How the homeserver reaches that listener (may carry a path prefix).
  url: http://127.0.0.1:{port}
  # Localpart of the bridge bot (@{name}bot:example.org).
  bot_localpart: {name}bot
  # Displayname of the bridge bot.
  bot_displayname: {Name} bridge
  # The registration file (made by `generate-registration`); the tokens are read from it.
  registration: {name}-registration.yaml
  # Ask the homeserver for typing notifications, read receipts and presence.
  receive_ephemeral: true
  # Largest request body accepted from the homeserver, in bytes.
  max_body_bytes: 16777216

database:
  # SQLite database file.
  path: {name}.db
  # Passphrase for secrets stored at rest (passwords, SASL credentials). Prefer setting it
  # through TRESTLE__DATABASE__SECRET_KEY. Without it, commands that store secrets refuse.
  secret_key: null
  # How long transaction ids are remembered to drop repeats, in days.
  txn_retention_days: 7

logging:
  # A tracing filter such as "info" or "info,trestle=debug". RUST_LOG overrides it.
  level: info
  # human or json.
  format: human

metrics:
  # Serve Prometheus metrics at /metrics on the appservice listener.
  enabled: true

# Who may use the bridge: "*", a domain, or a user id, mapped to none, relay, user or admin.
# The most specific entry wins.
permissions:
  "*": relay
  example.org: user
  "@admin:example.org": admin

queue:
  # Attempts per Matrix event before it is moved to the dead-letter table.
  max_attempts: 5
  # First retry delay in milliseconds; doubles each attempt, with jitter.
  initial_backoff_ms: 500
  # Retry delay cap in milliseconds.
  max_backoff_ms: 60000
  # Events accepted but not yet handled before the bridge pushes back on the homeserver.
  max_pending_events: 100000

media_proxy:
  # Public base URL under which this listener's /media path is reachable, e.g.
  # https://bridge.example.org/media. Media from Matrix is sent to the remote network as signed,
  # expiring links under it. null disables media links.
  public_url: null
  # HMAC key for the links (prefer TRESTLE__MEDIA_PROXY__SIGNING_KEY). Without it a key is
  # derived from the registration's as_token.
  signing_key: null
  # How long a link stays valid, in hours.
  ttl_hours: 168
"#;

/// The full commented example config for a bridge.
pub fn example_config<B: BridgeConfig>(name: &str, default_port: u16) -> String {
    let mut cap = name.to_owned();
    if let Some(first) = cap.get_mut(0..1) {
        first.make_ascii_uppercase();
    }
    let common = COMMON_EXAMPLE
        .replace("{name}", name)
        .replace("{Name}", &cap)
        .replace("{port}", &default_port.to_string());
    format!("{common}\n# Settings of the {name} bridge itself.\nbridge:\n{}", B::EXAMPLE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct T {
        greeting: String,
    }
    impl BridgeConfig for T {
        const EXAMPLE: &'static str = "  # Says hello.\n  greeting: hi\n";
        fn validate(&self, _: &Config<Self>) -> Vec<ConfigError> {
            if self.greeting.is_empty() {
                vec![ConfigError::invalid("bridge.greeting", "must not be empty")]
            } else {
                vec![]
            }
        }
    }

    fn example() -> String {
        example_config::<T>("test", 9999)
    }

    #[test]
    fn example_parses() {
        let c = Config::<T>::from_yaml(&example(), []).unwrap();
        assert_eq!(c.appservice.listen.port(), 9999);
        assert_eq!(c.permission_for("@admin:example.org"), PermissionLevel::Admin);
        assert_eq!(c.permission_for("@bob:example.org"), PermissionLevel::User);
        assert_eq!(c.permission_for("@eve:evil.org"), PermissionLevel::Relay);
        assert_eq!(c.bridge.greeting, "hi");
    }

    #[test]
    fn unknown_and_bad_keys_are_named() {
        let bad = example()
            .replace("  bot_localpart: testbot", "  bot_localpart: testbot\n  colour: red");
        let e = Config::<T>::from_yaml(&bad, []).unwrap_err().to_string();
        assert!(e.contains("appservice") && e.contains("colour"), "{e}");
        let bad = example().replace("listen: 127.0.0.1:9999", "listen: nowhere");
        let e = Config::<T>::from_yaml(&bad, []).unwrap_err().to_string();
        assert!(e.starts_with("appservice.listen"), "{e}");
        let bad = example().replace("greeting: hi", "greeting: ''");
        let e = Config::<T>::from_yaml(&bad, []).unwrap_err().to_string();
        assert!(e.starts_with("bridge.greeting"), "{e}");
        let bad = example().replace("bot_localpart: testbot", "bot_localpart: Test Bot");
        let e = Config::<T>::from_yaml(&bad, []).unwrap_err().to_string();
        assert!(e.contains("appservice.bot_localpart"), "{e}");
    }

    #[test]
    fn env_overrides_and_secret_redaction() {
        let env = [
            ("TRESTLE__DATABASE__SECRET_KEY".to_owned(), "s3cret".to_owned()),
            ("TRESTLE__BRIDGE__GREETING".to_owned(), "hello".to_owned()),
            ("UNRELATED".to_owned(), "x".to_owned()),
        ];
        let c = Config::<T>::from_yaml(&example(), env).unwrap();
        assert_eq!(c.database.secret_key.as_deref(), Some("s3cret"));
        assert_eq!(c.bridge.greeting, "hello");
        assert!(!format!("{c:?}").contains("s3cret"));
    }
}
