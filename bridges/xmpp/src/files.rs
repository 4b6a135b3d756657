//! Files from XMPP: the bridge downloads the URL of a XEP-0066 out-of-band payload (what
//! XEP-0363 HTTP uploads send) so that it can be uploaded to the homeserver.
//!
//! The URL comes from any occupant, so the download is guarded: only `http`/`https`, a size
//! limit checked against `Content-Length` and again while reading, a timeout, a few redirects,
//! and (unless `files.allow_private_addresses` is set) no loopback, private, link-local or other
//! non-public addresses, whether given literally or behind a DNS name.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use percent_encoding::percent_decode_str;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Why a file could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Not an absolute `http`/`https` URL.
    #[error("not an http(s) URL")]
    BadUrl,
    /// The host is not a public address.
    #[error("the host is not a public address")]
    Blocked,
    /// Larger than the limit (the announced size, when known).
    #[error("larger than the limit of {limit} bytes")]
    TooLarge {
        /// The configured limit.
        limit: u64,
    },
    /// The server answered with an error status.
    #[error("the server answered {0}")]
    Status(u16),
    /// The request failed (connection, timeout, redirect loop, …).
    #[error("{0}")]
    Http(String),
}

/// A downloaded file.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The content.
    pub data: Bytes,
    /// The MIME type: the server's `Content-Type`, else guessed from the name.
    pub mimetype: String,
    /// The file name: the URL's last path segment, decoded.
    pub filename: String,
}

/// Downloads files with the configured limits.
#[derive(Debug, Clone)]
pub struct Fetcher {
    http: reqwest::Client,
    max_bytes: u64,
    allow_private: bool,
}

/// Whether an address is on the public internet (not loopback, private, link-local, shared,
/// documentation, multicast or unspecified).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let seg = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (seg[0] & 0xfe00) == 0xfc00 // unique local
                || (seg[0] & 0xffc0) == 0xfe80 // link-local
                || (seg[0] == 0x2001 && seg[1] == 0x0db8)) // documentation
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_documentation()
        || ip.is_multicast()
        || o[0] == 0
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // shared address space (CGNAT)
        || (o[0] == 198 && (o[1] & 0xfe) == 18)) // benchmarking
}

/// Resolves names like the system does, dropping non-public addresses.
#[derive(Debug)]
struct PublicOnly;

impl Resolve for PublicOnly {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| is_public(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(
                    Box::new(std::io::Error::other(format!("{host} has no public address")))
                        as Box<dyn std::error::Error + Send + Sync>,
                );
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// Whether a URL may be fetched: `http`/`https` with a host that, when an IP literal, is public
/// (names are checked when resolved).
fn allowed(url: &url::Url, allow_private: bool) -> Result<(), FetchError> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(FetchError::BadUrl);
    }
    match url.host() {
        None => Err(FetchError::BadUrl),
        Some(_) if allow_private => Ok(()),
        Some(url::Host::Ipv4(ip)) if !is_public_v4(ip) => Err(FetchError::Blocked),
        Some(url::Host::Ipv6(ip)) if !is_public(IpAddr::V6(ip)) => Err(FetchError::Blocked),
        Some(url::Host::Domain(d)) if d.eq_ignore_ascii_case("localhost") => {
            Err(FetchError::Blocked)
        }
        Some(_) => Ok(()),
    }
}

/// The MIME type for a file name's extension (for servers that send none).
pub fn guess_mimetype(filename: &str) -> &'static str {
    let ext = filename.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
    match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "svg" => "image/svg+xml",
        "mp4" | "m4v" => "video/mp4",
        "webm" => "video/webm",
        "mov" => "video/quicktime",
        "mp3" => "audio/mpeg",
        "m4a" => "audio/mp4",
        "ogg" | "oga" | "opus" => "audio/ogg",
        "wav" => "audio/wav",
        "pdf" => "application/pdf",
        "txt" => "text/plain",
        _ => "application/octet-stream",
    }
}

/// The Matrix `msgtype` for a MIME type.
pub fn msgtype_of(mimetype: &str) -> &'static str {
    match mimetype.split('/').next().unwrap_or_default() {
        "image" => "m.image",
        "video" => "m.video",
        "audio" => "m.audio",
        _ => "m.file",
    }
}

/// The decoded last path segment of a URL, or `file`.
pub fn filename_of(url: &url::Url) -> String {
    url.path_segments()
        .and_then(|mut s| s.next_back())
        .map(|s| percent_decode_str(s).decode_utf8_lossy().trim().to_owned())
        .filter(|s| !s.is_empty() && !s.chars().any(char::is_control))
        .unwrap_or_else(|| "file".to_owned())
}

impl Fetcher {
    /// A fetcher with a size limit, a timeout for the whole download, and whether non-public
    /// addresses may be fetched. Fails only when the TLS backend cannot be initialised.
    pub fn new(
        max_bytes: u64,
        timeout: Duration,
        allow_private: bool,
    ) -> Result<Self, reqwest::Error> {
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("trestle-xmpp/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= 5 {
                    attempt.error("too many redirects")
                } else if let Err(e) = allowed(attempt.url(), allow_private) {
                    attempt.error(e.to_string())
                } else {
                    attempt.follow()
                }
            }));
        if !allow_private {
            builder = builder.dns_resolver(Arc::new(PublicOnly));
        }
        Ok(Self { http: builder.build()?, max_bytes, allow_private })
    }

    /// The size limit in bytes.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Downloads `url` within the limits.
    pub async fn fetch(&self, url: &str) -> Result<Fetched, FetchError> {
        let url = url::Url::parse(url.trim()).map_err(|_| FetchError::BadUrl)?;
        allowed(&url, self.allow_private)?;
        let filename = filename_of(&url);
        let too_large = FetchError::TooLarge { limit: self.max_bytes };
        let mut resp = self.http.get(url).send().await.map_err(|e| http_error(&e))?;
        if !resp.status().is_success() {
            return Err(FetchError::Status(resp.status().as_u16()));
        }
        if resp.content_length().is_some_and(|n| n > self.max_bytes) {
            return Err(too_large);
        }
        let mimetype = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|v| v.trim().to_ascii_lowercase())
            .filter(|v| v.contains('/') && v != "application/octet-stream")
            .unwrap_or_else(|| guess_mimetype(&filename).to_owned());
        let mut data = BytesMut::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| http_error(&e))? {
            if (data.len() + chunk.len()) as u64 > self.max_bytes {
                return Err(too_large);
            }
            data.extend_from_slice(&chunk);
        }
        Ok(Fetched { data: data.freeze(), mimetype, filename })
    }
}

/// The error with its causes (reqwest's own message is often just "error sending request").
fn http_error(e: &reqwest::Error) -> FetchError {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    FetchError::Http(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_pass() {
        for ip in ["127.0.0.1", "10.1.2.3", "192.168.0.1", "172.16.5.5", "169.254.1.1", "0.0.0.0"]
            .into_iter()
            .chain(["100.64.0.1", "::1", "fe80::1", "fd00::1", "::ffff:127.0.0.1", "::"])
        {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["93.184.216.34", "2a00:1450:4001::1", "::ffff:93.184.216.34"] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
        let u = |s: &str| url::Url::parse(s).unwrap();
        assert!(matches!(allowed(&u("http://127.0.0.1/x"), false), Err(FetchError::Blocked)));
        assert!(matches!(allowed(&u("http://[::1]/x"), false), Err(FetchError::Blocked)));
        assert!(matches!(allowed(&u("http://LOCALHOST/x"), false), Err(FetchError::Blocked)));
        assert!(matches!(allowed(&u("file:///etc/passwd"), true), Err(FetchError::BadUrl)));
        assert!(allowed(&u("http://127.0.0.1/x"), true).is_ok());
        assert!(allowed(&u("https://upload.example.org/x"), false).is_ok());
    }

    #[test]
    fn names_and_types() {
        let u = url::Url::parse("https://h.example/up/abc/cat%20pic.PNG?x=1").unwrap();
        assert_eq!(filename_of(&u), "cat pic.PNG");
        assert_eq!(guess_mimetype("cat pic.PNG"), "image/png");
        assert_eq!(filename_of(&url::Url::parse("https://h.example/").unwrap()), "file");
        assert_eq!(msgtype_of("image/png"), "m.image");
        assert_eq!(msgtype_of("video/webm"), "m.video");
        assert_eq!(msgtype_of("audio/ogg"), "m.audio");
        assert_eq!(msgtype_of("application/pdf"), "m.file");
    }

    #[tokio::test]
    async fn refuses_blocked_and_bad_urls_without_a_request() {
        let f = Fetcher::new(10, Duration::from_secs(1), false).unwrap();
        assert!(matches!(f.fetch("http://127.0.0.1:1/x").await, Err(FetchError::Blocked)));
        assert!(matches!(f.fetch("ftp://example.org/x").await, Err(FetchError::BadUrl)));
        assert!(matches!(f.fetch("not a url").await, Err(FetchError::BadUrl)));
    }
}
