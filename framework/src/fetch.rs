//! Fetching media that a remote network points at (an XMPP out-of-band URL, an MMS attachment
//! of an SMS gateway) so that the bridge can upload it to the homeserver, and describing it as a
//! Matrix file message.
//!
//! URLs come from outside, so downloads are guarded: only `http`/`https`, a size limit checked
//! against `Content-Length` and again while reading, a timeout, at most five redirects, and
//! (unless private addresses are allowed) no loopback, private, link-local or other non-public
//! address, whether given literally, behind a DNS name or behind a redirect.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use percent_encoding::percent_decode_str;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Why media could not be fetched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// Not an absolute `http`/`https` URL.
    #[error("not an http(s) URL")]
    BadUrl,
    /// The host is not a public address.
    #[error("the host is not a public address")]
    Blocked,
    /// Larger than the limit (`size` when the server announced it).
    #[error("it is too large ({}; the limit is {limit} bytes)", size.map_or_else(|| "more".to_owned(), |s| format!("{s} bytes")))]
    TooLarge {
        /// The announced size, if any.
        size: Option<u64>,
        /// The configured limit.
        limit: u64,
    },
    /// The server answered with an error status.
    #[error("the server answered {0}")]
    Status(u16),
    /// The request failed (connection, timeout, redirect loop, …).
    #[error("the download failed: {0}")]
    Http(String),
}

/// Downloaded media.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The content.
    pub data: Bytes,
    /// Its MIME type, lower case without parameters: the one announced by the network if valid,
    /// else the server's `Content-Type`, else guessed from the file name.
    pub mimetype: String,
    /// The URL's last path segment, decoded (`file` when there is none).
    pub filename: String,
}

/// Downloads media within limits. Cheap to clone (one shared HTTP client).
#[derive(Debug, Clone)]
pub struct Fetcher {
    http: reqwest::Client,
    max_bytes: u64,
    allow_private: bool,
}

impl Fetcher {
    /// A fetcher with a size limit, a timeout for a whole download, and whether non-public
    /// addresses may be fetched (set it for a gateway on the local network; never for URLs
    /// any remote user can send). Fails only when the TLS backend cannot be initialised.
    pub fn new(
        max_bytes: u64,
        timeout: Duration,
        allow_private: bool,
    ) -> Result<Self, reqwest::Error> {
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("trestle/", env!("CARGO_PKG_VERSION")))
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

    /// Downloads `url` within the limits, with HTTP Basic `credentials` if given. `announced`
    /// is the MIME type the network gave for it, if any; a valid one wins over the server's.
    pub async fn fetch(
        &self,
        url: &str,
        credentials: Option<(&str, &str)>,
        announced: Option<&str>,
    ) -> Result<Fetched, FetchError> {
        let url = url::Url::parse(url.trim()).map_err(|_| FetchError::BadUrl)?;
        allowed(&url, self.allow_private)?;
        let filename = filename_of(&url);
        let mut req = self.http.get(url);
        if let Some((user, password)) = credentials {
            req = req.basic_auth(user, Some(password));
        }
        let mut resp = req.send().await.map_err(http_error)?;
        if !resp.status().is_success() {
            return Err(FetchError::Status(resp.status().as_u16()));
        }
        let limit = self.max_bytes;
        if let Some(size) = resp.content_length().filter(|n| *n > limit) {
            return Err(FetchError::TooLarge { size: Some(size), limit });
        }
        let served = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(essence)
            .filter(|m| m != "application/octet-stream");
        let mimetype = announced
            .map(essence)
            .into_iter()
            .chain(served)
            .find(|m| valid_mime(m))
            .unwrap_or_else(|| guess_mimetype(&filename).to_owned());
        let mut data = BytesMut::new();
        while let Some(chunk) = resp.chunk().await.map_err(http_error)? {
            if (data.len() + chunk.len()) as u64 > limit {
                return Err(FetchError::TooLarge { size: None, limit });
            }
            data.extend_from_slice(&chunk);
        }
        Ok(Fetched { data: data.freeze(), mimetype, filename })
    }
}

/// Whether an address is on the public internet (not loopback, private, link-local, shared,
/// documentation, benchmarking, multicast or unspecified).
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

/// The error with its causes (reqwest's own message is often just "error sending request").
fn http_error(e: reqwest::Error) -> FetchError {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    FetchError::Http(text)
}

/// `image/PNG; charset=x` → `image/png`.
fn essence(mime: &str) -> String {
    mime.split(';').next().unwrap_or_default().trim().to_ascii_lowercase()
}

fn valid_mime(m: &str) -> bool {
    let token = |s: &str| {
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$&^_.+-".contains(&b))
    };
    m.split_once('/').is_some_and(|(t, s)| token(t) && token(s))
}

/// Common file types: extension and MIME type.
const TYPES: &[(&str, &str)] = &[
    ("png", "image/png"),
    ("jpg", "image/jpeg"),
    ("jpeg", "image/jpeg"),
    ("gif", "image/gif"),
    ("webp", "image/webp"),
    ("heic", "image/heic"),
    ("bmp", "image/bmp"),
    ("svg", "image/svg+xml"),
    ("mp4", "video/mp4"),
    ("m4v", "video/mp4"),
    ("webm", "video/webm"),
    ("mov", "video/quicktime"),
    ("3gp", "video/3gpp"),
    ("mp3", "audio/mpeg"),
    ("m4a", "audio/mp4"),
    ("ogg", "audio/ogg"),
    ("oga", "audio/ogg"),
    ("opus", "audio/ogg"),
    ("wav", "audio/wav"),
    ("amr", "audio/amr"),
    ("vcf", "text/vcard"),
    ("txt", "text/plain"),
    ("pdf", "application/pdf"),
];

/// The MIME type for a file name's extension (for servers that send none).
pub fn guess_mimetype(filename: &str) -> &'static str {
    let ext = filename.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
    TYPES.iter().find(|(e, _)| *e == ext).map_or("application/octet-stream", |(_, m)| m)
}

/// The usual file name extension for a MIME type (without the dot), if it is a common one.
pub fn extension_for(mimetype: &str) -> Option<&'static str> {
    let mimetype = match mimetype {
        "image/jpg" => "image/jpeg",
        "text/x-vcard" => "text/vcard",
        m => m,
    };
    TYPES.iter().find(|(_, m)| *m == mimetype).map(|(e, _)| *e)
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

/// The content of a Matrix file message (`m.image`, `m.video`, `m.audio` or `m.file` by MIME
/// type) for media uploaded as `mxc`; `body` is the caption, or the file name.
pub fn file_content(
    mxc: &str,
    filename: &str,
    mimetype: &str,
    size: usize,
    caption: Option<&str>,
) -> serde_json::Value {
    serde_json::json!({
        "msgtype": msgtype_of(mimetype),
        "body": caption.unwrap_or(filename),
        "filename": filename,
        "url": mxc,
        "info": {"mimetype": mimetype, "size": size},
    })
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
        assert_eq!(allowed(&u("http://127.0.0.1/x"), false), Err(FetchError::Blocked));
        assert_eq!(allowed(&u("http://[::1]/x"), false), Err(FetchError::Blocked));
        assert_eq!(allowed(&u("http://LOCALHOST/x"), false), Err(FetchError::Blocked));
        assert_eq!(allowed(&u("file:///etc/passwd"), true), Err(FetchError::BadUrl));
        assert!(allowed(&u("http://127.0.0.1/x"), true).is_ok());
        assert!(allowed(&u("https://upload.example.org/x"), false).is_ok());
    }

    #[test]
    fn names_types_and_content() {
        let u = url::Url::parse("https://h.example/up/abc/cat%20pic.PNG?x=1").unwrap();
        assert_eq!(filename_of(&u), "cat pic.PNG");
        assert_eq!(guess_mimetype("cat pic.PNG"), "image/png");
        assert_eq!(guess_mimetype("noext"), "application/octet-stream");
        assert_eq!(filename_of(&url::Url::parse("https://h.example/").unwrap()), "file");
        assert_eq!(extension_for("image/jpg"), Some("jpg"));
        assert_eq!(extension_for("audio/amr"), Some("amr"));
        assert_eq!(extension_for("application/x-unknown"), None);
        for (mime, msgtype) in [
            ("image/png", "m.image"),
            ("video/3gpp", "m.video"),
            ("audio/ogg", "m.audio"),
            ("text/vcard", "m.file"),
            ("application/octet-stream", "m.file"),
        ] {
            assert_eq!(msgtype_of(mime), msgtype);
        }
        let c = file_content("mxc://h/m", "cat.png", "image/png", 42, None);
        assert_eq!((c["msgtype"].as_str(), c["body"].as_str()), (Some("m.image"), Some("cat.png")));
        assert_eq!((c["info"]["size"].as_u64(), c["url"].as_str()), (Some(42), Some("mxc://h/m")));
        assert_eq!(
            file_content("mxc://h/m", "a.pdf", "application/pdf", 1, Some("see"))["body"],
            "see"
        );
        assert_eq!(
            FetchError::TooLarge { size: Some(10), limit: 5 }.to_string(),
            "it is too large (10 bytes; the limit is 5 bytes)"
        );
    }

    async fn serve(app: axum::Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn refuses_blocked_and_bad_urls_without_a_request() {
        let f = Fetcher::new(10, Duration::from_secs(1), false).unwrap();
        assert_eq!(
            f.fetch("http://127.0.0.1:1/x", None, None).await.unwrap_err(),
            FetchError::Blocked
        );
        assert_eq!(
            f.fetch("ftp://example.org/x", None, None).await.unwrap_err(),
            FetchError::BadUrl
        );
        assert_eq!(f.fetch("not a url", None, None).await.unwrap_err(), FetchError::BadUrl);
        assert_eq!(f.fetch("", None, None).await.unwrap_err(), FetchError::BadUrl);
    }

    #[tokio::test]
    async fn downloads_within_limits_with_credentials_and_types() {
        use axum::{
            body::Body,
            http::{HeaderMap, StatusCode},
            routing::get,
        };
        let app = axum::Router::new()
            .route("/png", get(|| async { ([("content-type", "image/png")], vec![7u8; 100]) }))
            .route(
                "/untyped.pdf",
                get(|| async { ([("content-type", "application/octet-stream")], "%PDF") }),
            )
            .route(
                "/private",
                get(|h: HeaderMap| async move {
                    // base64("AC1:tok")
                    if h.get("authorization").and_then(|v| v.to_str().ok())
                        == Some("Basic QUMxOnRvaw==")
                    {
                        (StatusCode::OK, "secret")
                    } else {
                        (StatusCode::UNAUTHORIZED, "")
                    }
                }),
            )
            .route(
                // No Content-Length: the limit holds while streaming.
                "/stream",
                get(|| async {
                    let chunks = (0..10).map(|_| Ok::<_, std::io::Error>(vec![1u8; 50]));
                    Body::from_stream(futures::stream::iter(chunks))
                }),
            );
        let base = serve(app).await;
        let url = |p: &str| format!("{base}{p}");
        let f = |limit| Fetcher::new(limit, Duration::from_secs(5), true).unwrap();
        let d = f(100).fetch(&url("/png"), None, None).await.unwrap();
        assert_eq!(
            (d.data.len(), d.mimetype.as_str(), d.filename.as_str()),
            (100, "image/png", "png")
        );
        // A valid announced type wins; junk is ignored; octet-stream falls back to the name.
        let d = f(100).fetch(&url("/png"), None, Some("Image/GIF; x=y")).await.unwrap();
        assert_eq!(d.mimetype, "image/gif");
        let d = f(100).fetch(&url("/png"), None, Some("nonsense")).await.unwrap();
        assert_eq!(d.mimetype, "image/png");
        let d = f(100).fetch(&url("/untyped.pdf"), None, None).await.unwrap();
        assert_eq!(d.mimetype, "application/pdf");
        assert_eq!(
            f(99).fetch(&url("/png"), None, None).await.unwrap_err(),
            FetchError::TooLarge { size: Some(100), limit: 99 }
        );
        assert_eq!(
            f(499).fetch(&url("/stream"), None, None).await.unwrap_err(),
            FetchError::TooLarge { size: None, limit: 499 }
        );
        assert_eq!(f(500).fetch(&url("/stream"), None, None).await.unwrap().data.len(), 500);
        assert_eq!(
            f(100).fetch(&url("/private"), None, None).await.unwrap_err(),
            FetchError::Status(401)
        );
        let d = f(100).fetch(&url("/private"), Some(("AC1", "tok")), None).await.unwrap();
        assert_eq!(&d.data[..], b"secret");
        assert!(matches!(
            f(100).fetch("http://127.0.0.1:1/x", None, None).await,
            Err(FetchError::Http(_))
        ));
    }
}
