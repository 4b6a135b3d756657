//! MMS media: downloading what a gateway announces for an inbound message (bounded in size, with
//! the gateway's credentials where it needs them) and describing it as a Matrix message.

use bytes::{Bytes, BytesMut};

/// Why an inbound media item could not be fetched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MediaError {
    /// The gateway announced the item without a URL.
    #[error("the gateway gave no URL for it")]
    NoUrl,
    /// The URL is malformed or not http(s).
    #[error("not a usable URL: {0}")]
    BadUrl(String),
    /// Bigger than allowed (`size` when the server announced it).
    #[error("it is too large ({}; the limit is {limit} bytes)", size.map_or_else(|| "more".to_owned(), |s| format!("{s} bytes")))]
    TooLarge {
        /// The announced size, if any.
        size: Option<u64>,
        /// The configured limit.
        limit: u64,
    },
    /// The server answered with an error status.
    #[error("the media server answered {0}")]
    Status(u16),
    /// The download itself failed (connection, timeout).
    #[error("the download failed: {0}")]
    Network(String),
}

/// A downloaded media item.
#[derive(Debug, Clone)]
pub struct Downloaded {
    /// The bytes.
    pub data: Bytes,
    /// Its MIME type (the announced one, else the server's, else `application/octet-stream`),
    /// without parameters, lower case.
    pub mimetype: String,
}

/// Parses a media URL, accepting only http and https.
pub fn parse_url(url: &str) -> Result<url::Url, MediaError> {
    if url.is_empty() {
        return Err(MediaError::NoUrl);
    }
    let parsed = url::Url::parse(url).map_err(|_| MediaError::BadUrl(url.to_owned()))?;
    match parsed.scheme() {
        "http" | "https" => Ok(parsed),
        _ => Err(MediaError::BadUrl(url.to_owned())),
    }
}

/// Downloads `url` (with HTTP Basic `credentials`, if any), refusing more than `limit` bytes
/// whether or not the server announces the size. `announced` is the MIME type the gateway
/// gave; it wins over the server's `Content-Type`.
pub async fn download(
    http: &reqwest::Client,
    url: url::Url,
    credentials: Option<(String, String)>,
    limit: u64,
    announced: &str,
) -> Result<Downloaded, MediaError> {
    let mut req = http.get(url);
    if let Some((user, password)) = credentials {
        req = req.basic_auth(user, Some(password));
    }
    let mut resp =
        req.send().await.map_err(|e| MediaError::Network(e.without_url().to_string()))?;
    if !resp.status().is_success() {
        return Err(MediaError::Status(resp.status().as_u16()));
    }
    if let Some(size) = resp.content_length()
        && size > limit
    {
        return Err(MediaError::TooLarge { size: Some(size), limit });
    }
    let served = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let mut data = BytesMut::new();
    while let Some(chunk) =
        resp.chunk().await.map_err(|e| MediaError::Network(e.without_url().to_string()))?
    {
        if (data.len() + chunk.len()) as u64 > limit {
            return Err(MediaError::TooLarge { size: None, limit });
        }
        data.extend_from_slice(&chunk);
    }
    let mimetype = [announced, served.as_str()]
        .into_iter()
        .map(essence)
        .find(|m| valid_mime(m))
        .unwrap_or_else(|| "application/octet-stream".to_owned());
    Ok(Downloaded { data: data.freeze(), mimetype })
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

/// The Matrix msgtype for a MIME type.
pub fn msgtype(mimetype: &str) -> &'static str {
    match mimetype.split('/').next() {
        Some("image") => "m.image",
        Some("video") => "m.video",
        Some("audio") => "m.audio",
        _ => "m.file",
    }
}

/// A file name for the `n`-th item (from 1) of message `id`, with an extension for common types:
/// `MMS SMab12 1.png`.
pub fn filename(id: &str, n: usize, mimetype: &str) -> String {
    let ext = match mimetype {
        "image/jpeg" | "image/jpg" => ".jpg",
        "image/png" => ".png",
        "image/gif" => ".gif",
        "image/webp" => ".webp",
        "image/heic" => ".heic",
        "image/bmp" => ".bmp",
        "video/mp4" => ".mp4",
        "video/3gpp" => ".3gp",
        "video/quicktime" => ".mov",
        "audio/mpeg" => ".mp3",
        "audio/amr" => ".amr",
        "audio/ogg" => ".ogg",
        "audio/mp4" => ".m4a",
        "text/vcard" | "text/x-vcard" => ".vcf",
        "text/plain" => ".txt",
        "application/pdf" => ".pdf",
        _ => "",
    };
    let id: String = id.chars().filter(char::is_ascii_alphanumeric).take(40).collect();
    format!("MMS {id} {n}{ext}")
}

/// The content of the Matrix message carrying an uploaded item.
pub fn content(mxc: &str, filename: &str, mimetype: &str, size: usize) -> serde_json::Value {
    serde_json::json!({
        "msgtype": msgtype(mimetype),
        "body": filename,
        "filename": filename,
        "url": mxc,
        "info": {"mimetype": mimetype, "size": size},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_and_names() {
        assert_eq!(msgtype("image/png"), "m.image");
        assert_eq!(msgtype("video/3gpp"), "m.video");
        assert_eq!(msgtype("audio/amr"), "m.audio");
        assert_eq!(msgtype("text/vcard"), "m.file");
        assert_eq!(msgtype("application/octet-stream"), "m.file");
        assert_eq!(filename("SM/1a", 2, "image/png"), "MMS SM1a 2.png");
        assert_eq!(filename("x", 1, "application/x-unknown"), "MMS x 1");
        let c = content("mxc://h/m", "MMS x 1.png", "image/png", 42);
        assert_eq!(c["msgtype"], "m.image");
        assert_eq!(c["info"]["size"], 42);
        assert_eq!(c["info"]["mimetype"], "image/png");
    }

    #[test]
    fn urls() {
        assert_eq!(parse_url(""), Err(MediaError::NoUrl));
        assert!(matches!(parse_url("file:///etc/passwd"), Err(MediaError::BadUrl(_))));
        assert!(matches!(parse_url("not a url"), Err(MediaError::BadUrl(_))));
        assert!(parse_url("https://api.example/m/1").is_ok());
        assert_eq!(
            MediaError::TooLarge { size: Some(10), limit: 5 }.to_string(),
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
    async fn downloads_with_limits_and_credentials() {
        use axum::{body::Body, http::HeaderMap, routing::get};
        let app = axum::Router::new()
            .route("/png", get(|| async { ([("content-type", "image/png")], vec![7u8; 100]) }))
            .route(
                "/private",
                get(|h: HeaderMap| async move {
                    // base64("AC1:tok")
                    if h.get("authorization").and_then(|v| v.to_str().ok())
                        == Some("Basic QUMxOnRvaw==")
                    {
                        (axum::http::StatusCode::OK, "secret")
                    } else {
                        (axum::http::StatusCode::UNAUTHORIZED, "")
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
        let http = reqwest::Client::new();
        let url = |p: &str| parse_url(&format!("{base}{p}")).unwrap();
        let d = download(&http, url("/png"), None, 100, "").await.unwrap();
        assert_eq!((d.data.len(), d.mimetype.as_str()), (100, "image/png"));
        // The announced type wins; junk is ignored.
        let d = download(&http, url("/png"), None, 100, "Image/GIF; x=y").await.unwrap();
        assert_eq!(d.mimetype, "image/gif");
        let d = download(&http, url("/png"), None, 100, "nonsense").await.unwrap();
        assert_eq!(d.mimetype, "image/png");
        assert_eq!(
            download(&http, url("/png"), None, 99, "").await.unwrap_err(),
            MediaError::TooLarge { size: Some(100), limit: 99 }
        );
        assert_eq!(
            download(&http, url("/stream"), None, 499, "").await.unwrap_err(),
            MediaError::TooLarge { size: None, limit: 499 }
        );
        assert_eq!(download(&http, url("/stream"), None, 500, "").await.unwrap().data.len(), 500);
        assert_eq!(
            download(&http, url("/private"), None, 100, "").await.unwrap_err(),
            MediaError::Status(401)
        );
        let creds = Some(("AC1".to_owned(), "tok".to_owned()));
        let d = download(&http, url("/private"), creds, 100, "").await.unwrap();
        assert_eq!(&d.data[..], b"secret");
        let down = parse_url("http://127.0.0.1:1/x").unwrap();
        assert!(matches!(download(&http, down, None, 100, "").await, Err(MediaError::Network(_))));
    }
}
