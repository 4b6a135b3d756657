//! The `bridge:` section of the SMS bridge's config.

use std::{collections::BTreeMap, net::SocketAddr};

use serde::{Deserialize, Serialize};
use trestle::config::{BridgeConfig, Config, ConfigError};

use crate::{gateway::webhook::IpAllowList, number};

/// The SMS bridge's settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmsConfig {
    /// Region for numbers written without a country code (`GB`, `US`, `DE`…).
    #[serde(default)]
    pub default_region: Option<String>,
    /// Require numbers typed by Matrix users (`!sms`) to be valid in their numbering plan (else:
    /// plausible length suffices). Senders of inbound SMS are always accepted leniently.
    #[serde(default)]
    pub strict_numbers: bool,
    /// Our numbers (E.164) and the Matrix users who own each.
    pub numbers: BTreeMap<String, OwnedNumber>,
    /// Ghost localpart prefix: `@{prefix}{number}:server` (`@sms_+447700900123:example.org`).
    #[serde(default = "default_prefix")]
    pub user_prefix: String,
    /// Most SMS parts one Matrix message may become; longer messages are refused with a notice.
    #[serde(default = "default_max_segments")]
    pub max_segments: u32,
    /// Largest inbound MMS attachment the bridge downloads, in bytes; a bigger one is announced
    /// in the room with a notice instead.
    #[serde(default = "default_max_media_bytes")]
    pub max_media_bytes: u64,
    /// Answer to HELP (and INFO) from a remote number.
    #[serde(default = "default_help")]
    pub help_text: String,
    /// The public webhook listener the gateway calls.
    pub webhooks: WebhooksConfig,
    /// The gateway.
    pub gateway: GatewayConfig,
    /// Outbound rate limits.
    #[serde(default)]
    pub rate_limit: RateLimitConfig,
}

/// One of our numbers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OwnedNumber {
    /// Matrix users invited to this number's conversations and allowed to send from it.
    pub owners: Vec<String>,
}

/// The webhook listener.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhooksConfig {
    /// Where it listens.
    pub listen: SocketAddr,
    /// Its public base URL, as the gateway reaches it.
    pub public_url: url::Url,
    /// Shared secret authenticating the gateway's callbacks.
    pub secret: String,
    /// Source addresses allowed to call (IPs or CIDR prefixes); empty allows all.
    #[serde(default)]
    pub allow_ips: Vec<String>,
}

impl std::fmt::Debug for WebhooksConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhooksConfig")
            .field("listen", &self.listen)
            .field("public_url", &self.public_url.as_str())
            .field("secret", &"<redacted>")
            .field("allow_ips", &self.allow_ips)
            .finish()
    }
}

/// Which gateway, and its settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum GatewayConfig {
    /// Kannel's smsbox HTTP interface.
    Kannel(KannelConfig),
    /// A Twilio-style REST API.
    Twilio(TwilioConfig),
    /// A direct SMPP 3.4 connection to an SMSC.
    Smpp(SmppConfig),
}

/// SMPP settings.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmppConfig {
    /// The SMSC, `host:port`.
    pub address: String,
    /// bind system_id (at most 15 characters).
    pub system_id: String,
    /// bind password (at most 8 characters).
    pub password: String,
    /// bind system_type.
    #[serde(default)]
    pub system_type: String,
    /// Most requests awaiting a response at once.
    #[serde(default = "default_window")]
    pub window: usize,
    /// Seconds between enquire_link keepalives.
    #[serde(default = "default_enquire")]
    pub enquire_link_interval_secs: u64,
    /// Seconds a response may take before the request (or the session) is given up.
    #[serde(default = "default_response_timeout")]
    pub response_timeout_secs: u64,
    /// First pause before reconnecting (doubled per failure, jitter added).
    #[serde(default = "default_reconnect_min")]
    pub reconnect_min_secs: u64,
    /// Longest pause before reconnecting.
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max_secs: u64,
    /// How often a throttled (ESME_RTHROTTLED) submit_sm is retried.
    #[serde(default = "default_throttle_retries")]
    pub throttle_retries: u32,
    /// First pause before such a retry, in milliseconds (doubled each time).
    #[serde(default = "default_throttle_pause")]
    pub throttle_pause_ms: u64,
    /// How a message longer than one SMS is submitted: `udh` (one submit_sm per part with a
    /// concatenation header) or `message_payload` (one submit_sm, the SMSC splits it).
    #[serde(default)]
    pub long_messages: crate::gateway::smpp::LongMessages,
}

impl std::fmt::Debug for SmppConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmppConfig")
            .field("address", &self.address)
            .field("system_id", &self.system_id)
            .field("password", &"<redacted>")
            .field("system_type", &self.system_type)
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

/// Kannel settings.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KannelConfig {
    /// The smsbox sendsms URL.
    pub sendsms_url: url::Url,
    /// sendsms-user name.
    pub username: String,
    /// sendsms-user password.
    pub password: String,
    /// Route through this smsc-id.
    #[serde(default)]
    pub smsc: Option<String>,
    /// Which delivery reports to ask for (31 = all).
    #[serde(default = "default_dlr_mask")]
    pub dlr_mask: u8,
}

impl std::fmt::Debug for KannelConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KannelConfig")
            .field("sendsms_url", &self.sendsms_url.as_str())
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("smsc", &self.smsc)
            .field("dlr_mask", &self.dlr_mask)
            .finish()
    }
}

/// REST gateway settings.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TwilioConfig {
    /// API base URL.
    #[serde(default = "default_twilio_api")]
    pub api_url: url::Url,
    /// Account SID.
    pub account_sid: String,
    /// Auth token (API password and webhook signing key).
    pub auth_token: String,
}

impl std::fmt::Debug for TwilioConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TwilioConfig")
            .field("api_url", &self.api_url.as_str())
            .field("account_sid", &self.account_sid)
            .field("auth_token", &"<redacted>")
            .finish()
    }
}

/// Outbound rate limits, in SMS parts.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Gateway-wide burst.
    #[serde(default = "default_gw_burst")]
    pub gateway_burst: u32,
    /// Gateway-wide parts per second.
    #[serde(default = "default_gw_rate")]
    pub gateway_per_second: f64,
    /// Burst per destination number.
    #[serde(default = "default_num_burst")]
    pub number_burst: u32,
    /// Parts per second per destination number.
    #[serde(default = "default_num_rate")]
    pub number_per_second: f64,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            gateway_burst: default_gw_burst(),
            gateway_per_second: default_gw_rate(),
            number_burst: default_num_burst(),
            number_per_second: default_num_rate(),
        }
    }
}

fn default_prefix() -> String {
    "sms_".to_owned()
}
fn default_max_segments() -> u32 {
    6
}
fn default_max_media_bytes() -> u64 {
    5 * 1024 * 1024
}
fn default_help() -> String {
    "This number is answered through Matrix. Reply STOP to stop messages, START to resume."
        .to_owned()
}
fn default_dlr_mask() -> u8 {
    31
}
fn default_window() -> usize {
    10
}
fn default_enquire() -> u64 {
    30
}
fn default_response_timeout() -> u64 {
    10
}
fn default_reconnect_min() -> u64 {
    1
}
fn default_reconnect_max() -> u64 {
    60
}
fn default_throttle_retries() -> u32 {
    5
}
fn default_throttle_pause() -> u64 {
    1000
}
fn default_twilio_api() -> url::Url {
    url::Url::parse("https://api.twilio.com").expect("valid URL")
}
fn default_gw_burst() -> u32 {
    20
}
fn default_gw_rate() -> f64 {
    10.0
}
fn default_num_burst() -> u32 {
    10
}
fn default_num_rate() -> f64 {
    1.0
}

impl SmppConfig {
    /// What is wrong with these settings, naming the keys.
    pub fn errors(&self) -> Vec<ConfigError> {
        let s = self;
        let mut errors = Vec::new();
        if s.address.parse::<SocketAddr>().is_err()
            && s.address
                .rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            errors.push(ConfigError::invalid("bridge.gateway.address", "must be host:port"));
        }
        if s.system_id.is_empty() || s.system_id.len() > 15 {
            errors.push(ConfigError::invalid(
                "bridge.gateway.system_id",
                "must be 1 to 15 characters",
            ));
        }
        if s.password.len() > 8 {
            errors.push(ConfigError::invalid(
                "bridge.gateway.password",
                "must be at most 8 characters",
            ));
        }
        if s.system_type.len() > 12 {
            errors.push(ConfigError::invalid(
                "bridge.gateway.system_type",
                "must be at most 12 characters",
            ));
        }
        if s.window == 0 {
            errors.push(ConfigError::invalid("bridge.gateway.window", "must be at least 1"));
        }
        if s.enquire_link_interval_secs == 0 {
            errors.push(ConfigError::invalid(
                "bridge.gateway.enquire_link_interval_secs",
                "must be at least 1",
            ));
        }
        if s.response_timeout_secs == 0 {
            errors.push(ConfigError::invalid(
                "bridge.gateway.response_timeout_secs",
                "must be at least 1",
            ));
        }
        if s.reconnect_min_secs == 0 || s.reconnect_max_secs < s.reconnect_min_secs {
            errors.push(ConfigError::invalid(
                "bridge.gateway.reconnect_max_secs",
                "reconnect_min_secs must be at least 1 and at most reconnect_max_secs",
            ));
        }
        errors
    }
}

impl SmsConfig {
    /// The parsed default region.
    pub fn region(&self) -> Option<phonenumber::country::Id> {
        self.default_region.as_deref().and_then(|r| number::parse_region(r).ok())
    }

    /// The number validation mode.
    pub fn validation(&self) -> number::Validation {
        if self.strict_numbers { number::Validation::Strict } else { number::Validation::Lenient }
    }
}

impl BridgeConfig for SmsConfig {
    const EXAMPLE: &'static str = include_str!("example-bridge-section.yaml");

    fn validate(&self, _config: &Config<Self>) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        if let Some(r) = &self.default_region
            && number::parse_region(r).is_err()
        {
            errors.push(ConfigError::invalid(
                "bridge.default_region",
                "not a two-letter region code",
            ));
        }
        if self.numbers.is_empty() {
            errors.push(ConfigError::invalid("bridge.numbers", "at least one number is needed"));
        }
        for (n, owned) in &self.numbers {
            if number::E164::from_e164(n).is_none() {
                errors.push(ConfigError::invalid(
                    format!("bridge.numbers.{n}"),
                    "must be an E.164 number such as +447700900123",
                ));
            }
            if owned.owners.is_empty() {
                errors.push(ConfigError::invalid(
                    format!("bridge.numbers.{n}.owners"),
                    "at least one owner is needed",
                ));
            }
            for o in &owned.owners {
                if !trestle::util::escape::is_valid_user_id(o) {
                    errors.push(ConfigError::invalid(
                        format!("bridge.numbers.{n}.owners"),
                        format!("{o} is not a user id"),
                    ));
                }
            }
        }
        if self.user_prefix.is_empty()
            || !trestle::util::escape::is_valid_localpart(&self.user_prefix)
        {
            errors.push(ConfigError::invalid(
                "bridge.user_prefix",
                "must be a non-empty localpart prefix (a-z 0-9 . _ = - / +)",
            ));
        }
        if self.max_segments == 0 {
            errors.push(ConfigError::invalid("bridge.max_segments", "must be at least 1"));
        }
        if self.max_media_bytes == 0 {
            errors.push(ConfigError::invalid("bridge.max_media_bytes", "must be at least 1"));
        }
        if self.webhooks.secret.len() < 16 {
            errors.push(ConfigError::invalid(
                "bridge.webhooks.secret",
                "must be at least 16 characters",
            ));
        }
        if let Err(e) = IpAllowList::parse(&self.webhooks.allow_ips) {
            errors.push(ConfigError::invalid("bridge.webhooks.allow_ips", e.to_string()));
        }
        if let GatewayConfig::Smpp(s) = &self.gateway {
            errors.extend(s.errors());
        }
        let r = &self.rate_limit;
        if r.gateway_burst == 0
            || r.number_burst == 0
            || r.gateway_per_second <= 0.0
            || r.number_per_second <= 0.0
        {
            errors.push(ConfigError::invalid(
                "bridge.rate_limit",
                "bursts and rates must be positive",
            ));
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smpp(extra: &serde_json::Value) -> Result<GatewayConfig, serde_json::Error> {
        let mut v = serde_json::json!({"type": "smpp", "address": "smsc.example.org:2775",
            "system_id": "bridge", "password": "secret"});
        if let (Some(m), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            m.extend(e.clone());
        }
        serde_json::from_value(v)
    }

    fn keys(c: &GatewayConfig) -> Vec<String> {
        let GatewayConfig::Smpp(s) = c else { panic!("not smpp") };
        s.errors()
            .iter()
            .map(|e| match e {
                ConfigError::Invalid { key, .. } => key.clone(),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn smpp_defaults_and_checks() {
        let c = smpp(&serde_json::json!({})).unwrap();
        let GatewayConfig::Smpp(s) = &c else { panic!("not smpp") };
        assert_eq!((s.window, s.enquire_link_interval_secs, s.response_timeout_secs), (10, 30, 10));
        assert_eq!((s.reconnect_min_secs, s.reconnect_max_secs), (1, 60));
        assert_eq!(
            (s.throttle_retries, s.throttle_pause_ms, s.system_type.as_str()),
            (5, 1000, "")
        );
        assert!(keys(&c).is_empty());
        assert!(!format!("{s:?}").contains("secret"), "password redacted");
        // Unknown keys are refused, naming the key.
        let e = smpp(&serde_json::json!({"windw": 3})).unwrap_err().to_string();
        assert!(e.contains("windw"), "{e}");
        let bad = smpp(&serde_json::json!({"address": "nohost", "system_id": "a-very-long-system-id",
            "password": "123456789", "window": 0, "reconnect_min_secs": 10, "reconnect_max_secs": 5}))
        .unwrap();
        assert_eq!(
            keys(&bad),
            [
                "bridge.gateway.address",
                "bridge.gateway.system_id",
                "bridge.gateway.password",
                "bridge.gateway.window",
                "bridge.gateway.reconnect_max_secs"
            ]
        );
    }
}
