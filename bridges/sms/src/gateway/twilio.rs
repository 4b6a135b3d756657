//! A Twilio-style REST gateway (Twilio's Messages API and compatible providers).
//!
//! - **Send:** `POST {api_url}/2010-04-01/Accounts/{account_sid}/Messages.json`, form-encoded
//!   `To`, `From`, `Body`, `StatusCallback` and one `MediaUrl` per attachment (MMS), with HTTP
//!   Basic auth (`account_sid:auth_token`). The answer's `sid` names the message in status
//!   callbacks.
//! - **Inbound:** `POST {public_url}/twilio/sms` (form: `MessageSid`, `From`, `To`, `Body`, and for
//!   MMS `NumMedia`, `MediaUrl{n}`, `MediaContentType{n}`), answered with an empty TwiML
//!   `<Response/>`. Media URLs on the API's own host are fetched with the API credentials (Twilio's
//!   "HTTP Basic Auth for media" setting).
//! - **Status:** `POST {public_url}/twilio/status` (form: `MessageSid`, `MessageStatus`,
//!   `ErrorCode`).
//! - Every webhook must carry a valid `X-Twilio-Signature`: base64(HMAC-SHA1(auth token, full URL
//!   + each POST parameter's name and value, sorted by name)). Anything else gets 403.

use std::sync::Arc;

use async_trait::async_trait;
use axum::{
    extract::{OriginalUri, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use base64::Engine as _;
use bytes::Bytes;
use hmac::{Hmac, Mac};

use super::{
    DeliveryReport, DeliveryStatus, EventSink, Gateway, GatewayError, GatewayEvent, InboundMedia,
    InboundSms, OutboundSms,
    webhook::{parse_pairs, secret_eq},
};

/// Settings of the REST gateway.
#[derive(Clone)]
pub struct TwilioSettings {
    /// API base (`https://api.twilio.com`).
    pub api_url: url::Url,
    /// Account SID.
    pub account_sid: String,
    /// Auth token: API password and webhook signing key.
    pub auth_token: String,
    /// Public base URL of the bridge's webhook listener, exactly as configured at the provider
    /// (signatures cover it).
    pub public_url: url::Url,
}

impl std::fmt::Debug for TwilioSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TwilioSettings")
            .field("api_url", &self.api_url.as_str())
            .field("account_sid", &self.account_sid)
            .field("auth_token", &"<redacted>")
            .field("public_url", &self.public_url.as_str())
            .finish()
    }
}

/// The signature Twilio sends for a request to `url` with POST `params`.
pub fn signature(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    // Stable: repeated names keep their order.
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(auth_token.as_bytes())
        .expect("HMAC takes any key length");
    mac.update(url.as_bytes());
    for (k, v) in sorted {
        mac.update(k.as_bytes());
        mac.update(v.as_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Whether `given` is the right signature (constant-time comparison). Like Twilio's own
/// validators, the URL is also tried with its default port added or removed (`:443` for https,
/// `:80` for http), since proxies disagree about writing it.
pub fn verify(auth_token: &str, url: &str, params: &[(String, String)], given: &str) -> bool {
    url_variants(url)
        .iter()
        .any(|u| secret_eq(given.as_bytes(), signature(auth_token, u, params).as_bytes()))
}

/// `url`, and `url` with its scheme's default port toggled.
fn url_variants(url: &str) -> Vec<String> {
    let mut out = vec![url.to_owned()];
    let Ok(parsed) = url::Url::parse(url) else { return out };
    let default = match parsed.scheme() {
        "https" => 443,
        "http" => 80,
        _ => return out,
    };
    let Some((scheme, rest)) = url.split_once("://") else { return out };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let suffix = format!(":{default}");
    if let Some(host) = authority.strip_suffix(&suffix) {
        out.push(format!("{scheme}://{host}{tail}"));
    } else if parsed.port().is_none() {
        out.push(format!("{scheme}://{authority}{suffix}{tail}"));
    }
    out
}

/// Maps a Twilio `MessageStatus` to a delivery status.
pub fn message_status(status: &str, error_code: &str) -> DeliveryStatus {
    match status {
        "delivered" | "read" => DeliveryStatus::Delivered,
        "failed" | "undelivered" | "canceled" => DeliveryStatus::Failed(if error_code.is_empty() {
            status.to_owned()
        } else {
            format!("{status} (error {error_code})")
        }),
        other => DeliveryStatus::Pending(other.to_owned()),
    }
}

/// The REST gateway.
#[derive(Debug, Clone)]
pub struct Twilio {
    settings: Arc<TwilioSettings>,
    http: reqwest::Client,
}

impl Twilio {
    /// A gateway with these settings.
    pub fn new(settings: TwilioSettings) -> Self {
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .unwrap_or_default();
        Self { settings: Arc::new(settings), http }
    }

    fn public(&self, path: &str) -> String {
        format!("{}{path}", self.settings.public_url.as_str().trim_end_matches('/'))
    }
}

#[derive(Clone)]
struct Hooks {
    settings: Arc<TwilioSettings>,
    sink: Arc<dyn EventSink>,
}

fn form(body: &[u8]) -> Vec<(String, String)> {
    parse_pairs(&String::from_utf8_lossy(body))
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
        .collect()
}

/// Authenticates a webhook: the URL signed is the public base plus the path and query received.
fn authenticate(
    h: &Hooks,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
    params: &[(String, String)],
) -> bool {
    let Some(given) = headers.get("x-twilio-signature").and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let base = h.settings.public_url.as_str().trim_end_matches('/');
    // The listener may sit behind a path prefix: only the tail after the route's own prefix
    // is ours, the rest comes from `public_url`.
    let path_and_query = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let tail =
        path_and_query.find("/twilio/").map(|i| &path_and_query[i..]).unwrap_or(path_and_query);
    verify(&h.settings.auth_token, &format!("{base}{tail}"), params, given)
}

fn get<'a>(params: &'a [(String, String)], key: &str) -> &'a str {
    params.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str()).unwrap_or("")
}

/// Most media items one message may carry (Twilio's own limit).
pub const MAX_MEDIA: usize = 10;

/// The media of an inbound MMS: `NumMedia` items `MediaUrl{n}` / `MediaContentType{n}` (at most
/// [`MAX_MEDIA`]). An item announced without a URL is kept with an empty one, so the bridge can
/// say it was lost rather than drop it silently.
fn inbound_media(params: &[(String, String)]) -> Vec<InboundMedia> {
    let announced = get(params, "NumMedia").trim().parse::<usize>().unwrap_or(0);
    (0..announced.min(MAX_MEDIA))
        .map(|n| InboundMedia {
            url: get(params, &format!("MediaUrl{n}")).trim().to_owned(),
            content_type: get(params, &format!("MediaContentType{n}")).trim().to_owned(),
        })
        .collect()
}

async fn deliver(sink: &dyn EventSink, ev: GatewayEvent) -> Response {
    match sink.handle(ev).await {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/xml")],
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response/>",
        )
            .into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "could not handle a Twilio callback; it may be retried");
            (StatusCode::SERVICE_UNAVAILABLE, "try again later").into_response()
        }
    }
}

async fn inbound(
    State(h): State<Hooks>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let params = form(&body);
    if !authenticate(&h, &uri, &headers, &params) {
        tracing::warn!("rejected a Twilio webhook without a valid signature");
        return (StatusCode::FORBIDDEN, "forbidden").into_response();
    }
    let (sid, from, to) = (get(&params, "MessageSid"), get(&params, "From"), get(&params, "To"));
    if sid.is_empty() || from.is_empty() || to.is_empty() {
        return (StatusCode::BAD_REQUEST, "missing MessageSid, From or To").into_response();
    }
    let sms = InboundSms {
        gateway_id: sid.to_owned(),
        from: from.to_owned(),
        to: to.to_owned(),
        text: get(&params, "Body").to_owned(),
        media: inbound_media(&params),
    };
    deliver(h.sink.as_ref(), GatewayEvent::Inbound(sms)).await
}

async fn status(
    State(h): State<Hooks>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let params = form(&body);
    if !authenticate(&h, &uri, &headers, &params) {
        tracing::warn!("rejected a Twilio status callback without a valid signature");
        return (StatusCode::FORBIDDEN, "forbidden").into_response();
    }
    let sid = get(&params, "MessageSid");
    if sid.is_empty() {
        return (StatusCode::BAD_REQUEST, "missing MessageSid").into_response();
    }
    let report = DeliveryReport {
        message_id: sid.to_owned(),
        status: message_status(get(&params, "MessageStatus"), get(&params, "ErrorCode")),
        part: None,
    };
    deliver(h.sink.as_ref(), GatewayEvent::Report(report)).await
}

#[async_trait]
impl Gateway for Twilio {
    fn name(&self) -> &'static str {
        "twilio"
    }

    async fn send(&self, sms: &OutboundSms) -> Result<String, GatewayError> {
        let s = &self.settings;
        let url = format!(
            "{}/2010-04-01/Accounts/{}/Messages.json",
            s.api_url.as_str().trim_end_matches('/'),
            percent_encoding::utf8_percent_encode(
                &s.account_sid,
                percent_encoding::NON_ALPHANUMERIC
            )
        );
        let callback = self.public("/twilio/status");
        let mut form = vec![("To", sms.to.as_str()), ("From", sms.from.as_str())];
        // An MMS may go without text; an SMS always has a (possibly empty) Body.
        if !sms.text.is_empty() || sms.media.is_empty() {
            form.push(("Body", sms.text.as_str()));
        }
        form.extend(sms.media.iter().map(|m| ("MediaUrl", m.as_str())));
        form.push(("StatusCallback", callback.as_str()));
        let resp = self
            .http
            .post(url)
            .basic_auth(&s.account_sid, Some(&s.auth_token))
            .form(&form)
            .send()
            .await
            .map_err(|e| {
                GatewayError::Temporary(format!(
                    "cannot reach the REST gateway: {}",
                    e.without_url()
                ))
            })?;
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        if status.is_success() {
            return body
                .get("sid")
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| GatewayError::Temporary("the gateway's answer has no sid".into()));
        }
        let msg = body.get("message").and_then(serde_json::Value::as_str).unwrap_or("");
        let code = body.get("code").map(ToString::to_string).unwrap_or_default();
        let text = format!("{status} {msg} (code {code})");
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            Err(GatewayError::Temporary(text))
        } else {
            Err(GatewayError::Rejected(text))
        }
    }

    fn supports_mms(&self) -> bool {
        true
    }

    /// The API credentials, for media on the API's own origin only (never sent elsewhere;
    /// Twilio's redirects to its storage need none).
    fn media_credentials(&self, url: &url::Url) -> Option<(String, String)> {
        let api = &self.settings.api_url;
        (url.scheme() == api.scheme()
            && url.host_str() == api.host_str()
            && url.port_or_known_default() == api.port_or_known_default())
        .then(|| (self.settings.account_sid.clone(), self.settings.auth_token.clone()))
    }

    fn routes(&self, sink: Arc<dyn EventSink>) -> axum::Router {
        let hooks = Hooks { settings: Arc::clone(&self.settings), sink };
        axum::Router::new()
            .route("/twilio/sms", post(inbound))
            .route("/twilio/status", post(status))
            .with_state(hooks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(caller: &str) -> Vec<(String, String)> {
        [
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", caller),
            ("Digits", "1234"),
            ("From", caller),
            ("To", "+18005551212"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
    }

    /// The examples from Twilio's own signature-validation snippets (TwilioDevEd/api-snippets,
    /// `security/signature_validation`): token `12345`, URL with a query string.
    #[test]
    fn published_vectors() {
        let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
        assert_eq!(
            signature("12345", url, &example("+14158675309")),
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        );
        assert_eq!(
            signature("12345", url, &example("+14158675310")),
            "GvWf1cFY/Q7PnoempGyD5oXAezc="
        );
        // Parameter order on the wire does not matter.
        let mut shuffled = example("+14158675310");
        shuffled.reverse();
        assert!(verify("12345", url, &shuffled, "GvWf1cFY/Q7PnoempGyD5oXAezc="));
    }

    #[test]
    fn forgeries_fail() {
        let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
        let params = example("+14158675310");
        assert!(!verify("12346", url, &params, "GvWf1cFY/Q7PnoempGyD5oXAezc="));
        assert!(!verify(
            "12345",
            "https://mycompany.com/myapp.php?foo=1&bar=3",
            &params,
            "GvWf1cFY/Q7PnoempGyD5oXAezc="
        ));
        let mut tampered = params.clone();
        tampered[2].1 = "9999".into();
        assert!(!verify("12345", url, &tampered, "GvWf1cFY/Q7PnoempGyD5oXAezc="));
        assert!(!verify("12345", url, &params, ""));
    }

    /// Records what the webhooks deliver.
    #[derive(Default)]
    struct Recorder(std::sync::Mutex<Vec<GatewayEvent>>);

    #[async_trait]
    impl EventSink for Recorder {
        async fn handle(&self, event: GatewayEvent) -> Result<(), String> {
            self.0.lock().unwrap().push(event);
            Ok(())
        }
    }

    async fn serve(router: axum::Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        format!("http://{addr}")
    }

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter().map(|(k, val)| ((*k).to_owned(), (*val).to_owned())).collect()
    }

    #[tokio::test]
    async fn webhooks_need_a_valid_signature() {
        let recorder = Arc::new(Recorder::default());
        // The public URL is what the provider calls; here, the listener itself.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let gw = Twilio::new(TwilioSettings {
            api_url: "http://127.0.0.1:1".parse().unwrap(),
            account_sid: "AC1".into(),
            auth_token: "tok".into(),
            public_url: base.parse().unwrap(),
        });
        let router = gw.routes(Arc::clone(&recorder) as Arc<dyn EventSink>);
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        let http = reqwest::Client::new();
        let form = pairs(&[
            ("MessageSid", "SM1"),
            ("From", "+447700900123"),
            ("To", "+441234567890"),
            ("Body", "hi & bye"),
        ]);
        let url = format!("{base}/twilio/sms");
        let post = |sig: Option<String>, form: Vec<(String, String)>| {
            let mut req = http.post(&url).form(&form);
            if let Some(s) = sig {
                req = req.header("X-Twilio-Signature", s);
            }
            req.send()
        };
        // Unsigned, wrongly signed, signed with another token, or tampered: 403, nothing delivered.
        assert_eq!(post(None, form.clone()).await.unwrap().status(), 403);
        assert_eq!(post(Some("AAAA".into()), form.clone()).await.unwrap().status(), 403);
        assert_eq!(
            post(Some(signature("other", &url, &form)), form.clone()).await.unwrap().status(),
            403
        );
        let mut tampered = form.clone();
        tampered[3].1 = "evil".into();
        assert_eq!(
            post(Some(signature("tok", &url, &form)), tampered).await.unwrap().status(),
            403
        );
        assert!(recorder.0.lock().unwrap().is_empty());
        // Properly signed: delivered, answered with TwiML.
        let resp = post(Some(signature("tok", &url, &form)), form.clone()).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.text().await.unwrap().contains("<Response/>"));
        assert_eq!(
            recorder.0.lock().unwrap().as_slice(),
            [GatewayEvent::Inbound(InboundSms {
                gateway_id: "SM1".into(),
                from: "+447700900123".into(),
                to: "+441234567890".into(),
                text: "hi & bye".into(),
                media: Vec::new(),
            })]
        );
        // Status callbacks too.
        let status = pairs(&[
            ("MessageSid", "SM9"),
            ("MessageStatus", "undelivered"),
            ("ErrorCode", "30003"),
        ]);
        let surl = format!("{base}/twilio/status");
        let r = http.post(&surl).form(&status).send().await.unwrap();
        assert_eq!(r.status(), 403);
        let r = http
            .post(&surl)
            .header("X-Twilio-Signature", signature("tok", &surl, &status))
            .form(&status)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            recorder.0.lock().unwrap().last(),
            Some(&GatewayEvent::Report(DeliveryReport {
                message_id: "SM9".into(),
                status: DeliveryStatus::Failed("undelivered (error 30003)".into()),
                part: None,
            }))
        );
    }

    #[tokio::test]
    async fn send_posts_the_form_with_basic_auth() {
        use axum::{extract::Path, routing::post};
        let seen = Arc::new(std::sync::Mutex::new(None::<(String, String, Vec<(String, String)>)>));
        let s2 = Arc::clone(&seen);
        let api = axum::Router::new().route(
            "/2010-04-01/Accounts/{sid}/Messages.json",
            post(move |Path(sid): Path<String>, headers: HeaderMap, body: Bytes| {
                let seen = Arc::clone(&s2);
                async move {
                    let auth = headers.get("authorization").unwrap().to_str().unwrap().to_owned();
                    let f = form(&body);
                    let to = get(&f, "To").to_owned();
                    *seen.lock().unwrap() = Some((sid, auth, f));
                    if to == "+10000000000" {
                        return (StatusCode::BAD_REQUEST, axum::Json(serde_json::json!({"code": 21211, "message": "Invalid 'To' Phone Number"})));
                    }
                    (StatusCode::CREATED, axum::Json(serde_json::json!({"sid": "SMabc", "status": "queued"})))
                }
            }),
        );
        let api_url = serve(api).await;
        let gw = Twilio::new(TwilioSettings {
            api_url: api_url.parse().unwrap(),
            account_sid: "AC1".into(),
            auth_token: "tok".into(),
            public_url: "https://hooks.example.org/".parse().unwrap(),
        });
        let mut sms = OutboundSms {
            id: "ours".into(),
            from: "+441234567890".into(),
            to: "+447700900123".into(),
            text: "héllo".into(),
            encoding: crate::encoding::Encoding::Ucs2,
            parts: vec!["héllo".into()],
            media: Vec::new(),
        };
        assert_eq!(gw.send(&sms).await.unwrap(), "SMabc");
        let (sid, auth, f) = seen.lock().unwrap().clone().unwrap();
        assert_eq!(sid, "AC1");
        let expected = base64::engine::general_purpose::STANDARD.encode("AC1:tok");
        assert_eq!(auth, format!("Basic {expected}"));
        assert_eq!(get(&f, "Body"), "héllo");
        assert_eq!(get(&f, "From"), "+441234567890");
        assert_eq!(get(&f, "StatusCallback"), "https://hooks.example.org/twilio/status");
        sms.to = "+10000000000".into();
        let err = gw.send(&sms).await.unwrap_err();
        assert!(matches!(&err, GatewayError::Rejected(m) if m.contains("21211")), "{err}");
        // An unreachable API is temporary.
        let down = Twilio::new(TwilioSettings {
            api_url: "http://127.0.0.1:1".parse().unwrap(),
            account_sid: "AC1".into(),
            auth_token: "tok".into(),
            public_url: "https://hooks.example.org/".parse().unwrap(),
        });
        assert!(matches!(down.send(&sms).await, Err(GatewayError::Temporary(_))));

        // MMS: one MediaUrl per attachment; no Body when there is no text.
        assert!(gw.supports_mms());
        sms.to = "+447700900123".into();
        sms.text = String::new();
        sms.media = vec!["https://b.example/media/a".into(), "https://b.example/media/b".into()];
        gw.send(&sms).await.unwrap();
        let (_, _, f) = seen.lock().unwrap().clone().unwrap();
        let urls: Vec<&str> =
            f.iter().filter(|(k, _)| k == "MediaUrl").map(|(_, v)| v.as_str()).collect();
        assert_eq!(urls, ["https://b.example/media/a", "https://b.example/media/b"]);
        assert!(f.iter().all(|(k, _)| k != "Body"), "{f:?}");
        sms.text = "caption".into();
        gw.send(&sms).await.unwrap();
        let (_, _, f) = seen.lock().unwrap().clone().unwrap();
        assert_eq!(get(&f, "Body"), "caption");
    }

    #[test]
    fn inbound_media_fields() {
        let p = pairs(&[
            ("NumMedia", "2"),
            ("MediaUrl0", "https://api.example/m0"),
            ("MediaContentType0", "image/png"),
            ("MediaContentType1", "video/mp4"),
            ("MediaUrl5", "https://ignored.example/"),
        ]);
        assert_eq!(
            inbound_media(&p),
            [
                InboundMedia {
                    url: "https://api.example/m0".into(),
                    content_type: "image/png".into()
                },
                // Announced but without a URL: kept, so the loss is reported.
                InboundMedia { url: String::new(), content_type: "video/mp4".into() },
            ]
        );
        assert!(inbound_media(&pairs(&[("NumMedia", "0")])).is_empty());
        assert!(inbound_media(&pairs(&[("NumMedia", "lots")])).is_empty());
        assert!(inbound_media(&pairs(&[])).is_empty());
        assert_eq!(inbound_media(&pairs(&[("NumMedia", "99")])).len(), MAX_MEDIA);
    }

    #[test]
    fn media_credentials_only_for_the_api_origin() {
        let gw = Twilio::new(TwilioSettings {
            api_url: "https://api.twilio.com".parse().unwrap(),
            account_sid: "AC1".into(),
            auth_token: "tok".into(),
            public_url: "https://hooks.example.org/".parse().unwrap(),
        });
        let creds = |u: &str| gw.media_credentials(&u.parse().unwrap());
        assert_eq!(
            creds("https://api.twilio.com:443/2010-04-01/Accounts/AC1/Messages/MM1/Media/ME1"),
            Some(("AC1".into(), "tok".into()))
        );
        assert_eq!(creds("http://api.twilio.com/x"), None);
        assert_eq!(creds("https://api.twilio.com.evil.example/x"), None);
        assert_eq!(creds("https://media.example.net/x"), None);
    }

    #[test]
    fn default_port_variants() {
        let params = example("+14158675310");
        let sig = signature("12345", "https://mycompany.com:443/myapp.php?foo=1&bar=2", &params);
        // Signed with the port, received without (and the reverse).
        assert!(verify("12345", "https://mycompany.com/myapp.php?foo=1&bar=2", &params, &sig));
        assert!(verify(
            "12345",
            "https://mycompany.com:443/myapp.php?foo=1&bar=2",
            &params,
            "GvWf1cFY/Q7PnoempGyD5oXAezc="
        ));
        // A non-default port is never dropped or invented.
        let odd = signature("12345", "https://mycompany.com:8443/x", &params);
        assert!(!verify("12345", "https://mycompany.com/x", &params, &odd));
        assert_eq!(url_variants("http://h:8080/p"), vec!["http://h:8080/p".to_owned()]);
        assert_eq!(
            url_variants("http://h/p?q"),
            vec!["http://h/p?q".to_owned(), "http://h:80/p?q".to_owned()]
        );
    }

    #[test]
    fn statuses() {
        assert_eq!(message_status("delivered", ""), DeliveryStatus::Delivered);
        assert_eq!(
            message_status("undelivered", "30003"),
            DeliveryStatus::Failed("undelivered (error 30003)".into())
        );
        assert!(matches!(message_status("sent", ""), DeliveryStatus::Pending(_)));
    }
}
