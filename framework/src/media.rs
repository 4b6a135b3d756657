//! The media proxy: signed, expiring links to Matrix media for networks that only carry text
//! (IRC, SMS) or plain URLs (XMPP XEP-0066).
//!
//! Homeserver download links stopped working for anonymous readers with authenticated media
//! (MSC3916), so the bridge serves media itself: `GET {public_url}/{server}/{media_id}/{expires}/
//! {signature}/{filename}`. The signature is HMAC-SHA256 over server, media id and expiry with a
//! key from config; the bridge fetches the file with its own token and passes the content type
//! through. Expired or forged links get 404 without touching the homeserver.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Settings of the media proxy (`media_proxy:` in the config).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MediaProxyConfig {
    /// Public base URL under which the listener's `/media` path is reachable, e.g.
    /// `https://bridge.example.org/media`. `null` disables links.
    #[serde(default)]
    pub public_url: Option<url::Url>,
    /// Signing key. Falls back to a key derived from `database.secret_key`, else the
    /// registration's `as_token`.
    #[serde(default)]
    pub signing_key: Option<String>,
    /// How long a link stays valid, in hours.
    #[serde(default = "default_ttl")]
    pub ttl_hours: u64,
}

fn default_ttl() -> u64 {
    24 * 7
}

impl Default for MediaProxyConfig {
    fn default() -> Self {
        Self { public_url: None, signing_key: None, ttl_hours: default_ttl() }
    }
}

impl std::fmt::Debug for MediaProxyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MediaProxyConfig")
            .field("public_url", &self.public_url)
            .field("signing_key", &self.signing_key.as_ref().map(|_| "<redacted>"))
            .field("ttl_hours", &self.ttl_hours)
            .finish()
    }
}

/// Why a media link is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MediaLinkError {
    /// Not an `mxc://server/id` URI.
    #[error("not a valid mxc URI: {0}")]
    BadMxc(String),
    /// The link's signature does not match.
    #[error("bad signature")]
    BadSignature,
    /// The link has expired.
    #[error("link expired")]
    Expired,
    /// No public URL is configured.
    #[error("the media proxy has no public_url configured")]
    Disabled,
}

/// Signs and checks media links.
#[derive(Clone)]
pub struct MediaSigner {
    key: Vec<u8>,
    public_url: Option<url::Url>,
    ttl_secs: u64,
}

impl std::fmt::Debug for MediaSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MediaSigner").field("public_url", &self.public_url).finish_non_exhaustive()
    }
}

/// Splits `mxc://server/media_id`, checking both parts are non-empty and path-safe.
pub fn parse_mxc(mxc: &str) -> Result<(&str, &str), MediaLinkError> {
    let bad = || MediaLinkError::BadMxc(mxc.to_owned());
    let rest = mxc.strip_prefix("mxc://").ok_or_else(bad)?;
    let (server, id) = rest.split_once('/').ok_or_else(bad)?;
    let ok = |s: &str| {
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:[]".contains(&b))
    };
    if ok(server) && ok(id) { Ok((server, id)) } else { Err(bad()) }
}

impl MediaSigner {
    /// A signer from config and a fallback secret (used when no signing key is configured).
    pub fn new(config: &MediaProxyConfig, fallback_secret: &str) -> Self {
        let key = config
            .signing_key
            .clone()
            .unwrap_or_else(|| format!("trestle-media:{fallback_secret}"));
        Self {
            key: key.into_bytes(),
            public_url: config.public_url.clone(),
            ttl_secs: config.ttl_hours.saturating_mul(3600),
        }
    }

    fn mac(&self, server: &str, id: &str, expires: u64) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(format!("{server}\u{0}{id}\u{0}{expires}").as_bytes());
        mac
    }

    /// A public link to `mxc`, valid for the configured time from `now_secs`.
    pub fn link(&self, mxc: &str, filename: &str, now_secs: u64) -> Result<String, MediaLinkError> {
        let base = self.public_url.as_ref().ok_or(MediaLinkError::Disabled)?;
        let (server, id) = parse_mxc(mxc)?;
        let expires = now_secs.saturating_add(self.ttl_secs);
        let sig = URL_SAFE_NO_PAD.encode(self.mac(server, id, expires).finalize().into_bytes());
        let name = if filename.trim().is_empty() { "file" } else { filename };
        let name = utf8_percent_encode(name, NON_ALPHANUMERIC);
        Ok(format!("{}/{server}/{id}/{expires}/{sig}/{name}", base.as_str().trim_end_matches('/')))
    }

    /// Checks a link's parts; returns the mxc URI to fetch.
    pub fn verify(
        &self,
        server: &str,
        id: &str,
        expires: u64,
        sig: &str,
        now_secs: u64,
    ) -> Result<String, MediaLinkError> {
        let mxc = format!("mxc://{server}/{id}");
        parse_mxc(&mxc)?;
        let raw = URL_SAFE_NO_PAD.decode(sig).map_err(|_| MediaLinkError::BadSignature)?;
        self.mac(server, id, expires)
            .verify_slice(&raw)
            .map_err(|_| MediaLinkError::BadSignature)?;
        if expires < now_secs {
            return Err(MediaLinkError::Expired);
        }
        Ok(mxc)
    }
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> MediaSigner {
        let cfg = MediaProxyConfig {
            public_url: Some("https://b.example/media/".parse().unwrap()),
            signing_key: Some("k".into()),
            ttl_hours: 1,
        };
        MediaSigner::new(&cfg, "unused")
    }

    #[test]
    fn sign_verify_expire_forge() {
        let s = signer();
        let link = s.link("mxc://ex.org/AbC123", "cat pic.png", 1000).unwrap();
        assert!(link.starts_with("https://b.example/media/ex.org/AbC123/4600/"), "{link}");
        assert!(link.ends_with("/cat%20pic%2Epng"));
        let parts: Vec<&str> =
            link.trim_start_matches("https://b.example/media/").split('/').collect();
        let exp: u64 = parts[2].parse().unwrap();
        assert_eq!(
            s.verify(parts[0], parts[1], exp, parts[3], 2000).unwrap(),
            "mxc://ex.org/AbC123"
        );
        assert_eq!(s.verify(parts[0], parts[1], exp, parts[3], 5000), Err(MediaLinkError::Expired));
        assert_eq!(
            s.verify(parts[0], "Other", exp, parts[3], 2000),
            Err(MediaLinkError::BadSignature)
        );
        assert_eq!(
            s.verify(parts[0], parts[1], exp + 1, parts[3], 2000),
            Err(MediaLinkError::BadSignature)
        );
        assert_eq!(
            s.verify(parts[0], parts[1], exp, "!!", 2000),
            Err(MediaLinkError::BadSignature)
        );
        let other = MediaSigner::new(
            &MediaProxyConfig { signing_key: Some("j".into()), ..MediaProxyConfig::default() },
            "",
        );
        assert_eq!(
            other.verify(parts[0], parts[1], exp, parts[3], 2000),
            Err(MediaLinkError::BadSignature)
        );
    }

    #[test]
    fn rejects_bad_mxc_and_disabled() {
        let s = signer();
        for bad in ["http://x/y", "mxc://x", "mxc:///y", "mxc://x/../../etc", "mxc://x/a b"] {
            assert!(matches!(s.link(bad, "f", 0), Err(MediaLinkError::BadMxc(_))), "{bad}");
        }
        let off = MediaSigner::new(&MediaProxyConfig::default(), "s");
        assert_eq!(off.link("mxc://x/y", "f", 0), Err(MediaLinkError::Disabled));
    }
}
