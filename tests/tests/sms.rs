//! End-to-end tests of the SMS bridge: a real Synapse, a real Kannel (bearerbox + smsbox) whose
//! fake SMSC (`fakesmsc`) plays the phone network, and a Matrix user on the client-server API.

use std::time::Duration;

use serde_json::{Value, json};
use trestle_e2e::{
    BridgeProcess, Deployment, MatrixUser, Synapse, binary, free_port,
    kannel::{Kannel, Mt},
    wait_for,
};

const OURS: &str = "+441234567890";
const PHONE: &str = "+447700900123";
const GHOST: &str = "@sms_+447700900123:localhost";
const SECRET: &str = "e2e-webhook-secret-0123456789";
const T: Duration = Duration::from_secs(30);
/// The bridge's `max_media_bytes` in these tests.
const MAX_MEDIA: usize = 20_000;
/// A 4×3 RGB PNG.
const PNG: &[u8] = &[
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x03, 0x08, 0x02, 0x00, 0x00, 0x00, 0x3b, 0x96, 0x39,
    0x91, 0x00, 0x00, 0x00, 0x2a, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9c, 0x0d, 0xc7, 0x31, 0x01, 0x00,
    0x30, 0x0c, 0xc3, 0x30, 0x03, 0x2b, 0x88, 0xc0, 0xe9, 0x69, 0x28, 0x01, 0x51, 0x80, 0x9b, 0x3e,
    0x01, 0x0e, 0x2e, 0x1e, 0x42, 0x9c, 0xb8, 0xf1, 0xf2, 0x53, 0xa7, 0x6e, 0xbd, 0xfa, 0x00, 0xe3,
    0xb7, 0x0d, 0xf9, 0x6c, 0x6c, 0xcb, 0xd2, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4e, 0x44, 0xae,
    0x42, 0x60, 0x82,
];

struct Env {
    synapse: Synapse,
    kannel: Kannel,
    alice: MatrixUser,
    hooks: String,
    bridge: BridgeProcess,
    _dir: tempfile::TempDir,
}

/// Synapse, alice and the bridge, with `gateway` as the config's `bridge.gateway` section
/// (indented by four spaces) and the webhook listener on `hook_port`.
struct Launched {
    /// Where the bridge's webhooks are.
    hooks: String,
    synapse: Synapse,
    alice: MatrixUser,
    bridge: BridgeProcess,
    dir: tempfile::TempDir,
}

async fn launch(gateway: &str, hook_port: u16) -> anyhow::Result<Launched> {
    let dir = tempfile::Builder::new().prefix("trestle-sms-").tempdir()?;
    let d = Deployment::new(dir.path(), "sms");
    let hooks = format!("http://127.0.0.1:{hook_port}");
    let config = |hs: &str| {
        format!(
            "{base}database: {{ path: \"{db}\" }}\n\
             logging: {{ level: \"info,trestle=debug,trestle_sms=debug\" }}\n\
             permissions: {{ \"*\": user }}\n\
             media_proxy: {{ public_url: \"http://127.0.0.1:{port}/media\" }}\n\
             bridge:\n  default_region: GB\n  numbers:\n    \"{OURS}\":\n      owners: [\"@alice:localhost\"]\n\
             \x20 max_segments: 3\n  max_media_bytes: {MAX_MEDIA}\n  help_text: \"Help: reply STOP to opt out.\"\n\
             \x20 webhooks:\n    listen: \"127.0.0.1:{hook_port}\"\n    public_url: \"{hooks}\"\n    secret: \"{SECRET}\"\n\
             \x20   allow_ips: [\"127.0.0.0/8\"]\n\
             \x20 gateway:\n{gateway}\
             \x20 rate_limit: {{ gateway_burst: 50, gateway_per_second: 50.0, number_burst: 50, number_per_second: 50.0 }}\n",
            base = d.base_config(hs),
            db = d.database().display(),
            port = d.port,
        )
    };
    let bin = binary("trestle-sms")?;
    let synapse = d.start_synapse(&bin, &config).await?;
    let alice = MatrixUser::register(&synapse.url(), "alice").await?;
    let bridge = d.start_bridge(&bin, &synapse, &config).await?;
    Ok(Launched { hooks, synapse, alice, bridge, dir })
}

async fn start() -> anyhow::Result<Option<Env>> {
    if !Kannel::available() {
        eprintln!("skipping: Kannel (bearerbox, smsbox, kannel-extras' fakesmsc) is not installed");
        return Ok(None);
    }
    let hook_port = free_port();
    let hooks = format!("http://127.0.0.1:{hook_port}");
    let kannel = Kannel::start(&format!(
        "{hooks}/kannel/mo?secret={SECRET}&from=%p&to=%P&text=%b&charset=%C&coding=%c&id=%I"
    ))
    .await?;
    let (user, password) = kannel.credentials();
    let gateway = format!(
        "    type: kannel\n    sendsms_url: \"{}\"\n    username: {user}\n    password: {password}\n    smsc: fake1\n",
        kannel.sendsms_url()
    );
    let l = launch(&gateway, hook_port).await?;
    Ok(Some(Env {
        synapse: l.synapse,
        kannel,
        alice: l.alice,
        hooks,
        bridge: l.bridge,
        _dir: l.dir,
    }))
}

fn body(e: &Value) -> &str {
    e["content"]["body"].as_str().unwrap_or_default()
}

/// An initial sync. Synapse caches sync responses per request for a while, so every call asks
/// for a different (tiny) timeout: an initial sync answers at once anyway.
async fn sync(user: &MatrixUser) -> anyhow::Result<Value> {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    user.get(&format!("/sync?timeout={n}")).await
}

/// Waits for an invite to a room and joins it.
async fn accept_invite(user: &MatrixUser) -> anyhow::Result<String> {
    let room = wait_for("an invite", T, || async {
        let s = sync(user).await.ok()?;
        s["rooms"]["invite"].as_object()?.keys().next().cloned()
    })
    .await?;
    user.join(&room).await?;
    Ok(room)
}

/// An inbound SMS from PHONE; returns the portal room (joined by alice).
async fn first_contact(env: &Env, text: &str) -> anyhow::Result<String> {
    env.kannel.inject(PHONE, OURS, text).await?;
    let room = accept_invite(&env.alice).await?;
    env.alice.wait_for_message(&room, T, |e| e["sender"] == GHOST && body(e) == text).await?;
    Ok(room)
}

/// MTs sent after the first `skip`.
async fn new_mts(env: &Env, skip: usize, n: usize) -> anyhow::Result<Vec<Mt>> {
    // Panics (rather than returning the error) so that the servers' logs are printed.
    let all = env.kannel.wait_received(skip + n, T).await.unwrap_or_else(|e| panic!("{e:#}"));
    Ok(all[skip..].to_vec())
}

async fn notice_containing(env: &Env, room: &str, needle: &str) -> anyhow::Result<Value> {
    env.alice
        .wait_for_message(room, T, |e| {
            e["content"]["msgtype"] == "m.notice" && body(e).contains(needle)
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}: no notice containing {needle:?}"))
}

#[tokio::test]
async fn sms_both_ways_with_delivery_receipt() -> anyhow::Result<()> {
    let Some(env) = start().await? else { return Ok(()) };
    // SMS in → a new room, alice (the number's owner) invited, the ghost says the text.
    let room = first_contact(&env, "hello from the phone").await?;
    let profile = env.alice.profile(GHOST).await?;
    assert_eq!(profile["displayname"], PHONE);
    let name = env.alice.state(&room, "m.room.name", "").await?.unwrap_or_default();
    assert_eq!(name["name"], PHONE);

    // Non-ASCII (UCS-2 on the air) arrives intact.
    env.kannel.inject(PHONE, OURS, "привет 🙂 ok").await?;
    env.alice
        .wait_for_message(&room, T, |e| e["sender"] == GHOST && body(e) == "привет 🙂 ok")
        .await?;
    // Both SMS went to the same portal: no second invite.
    let s = sync(&env.alice).await?;
    let other_invites: Vec<&String> = s["rooms"]["invite"]
        .as_object()
        .map(|m| m.keys().filter(|r| **r != room).collect())
        .unwrap_or_default();
    assert!(other_invites.is_empty(), "{other_invites:?}");

    // Matrix → SMS, from our number to theirs.
    let before = env.kannel.received().len();
    let event_id = env.alice.send_text(&room, "hi back {ok}").await?;
    let mts = new_mts(&env, before, 1).await?;
    assert_eq!((mts[0].from.as_str(), mts[0].to.as_str()), (OURS, PHONE));
    assert_eq!(mts[0].kind, "text");
    assert_eq!(mts[0].plain_text(), "hi back {ok}");

    // Kannel's DLR (delivered) → a read receipt from the ghost on alice's event.
    wait_for("the ghost's read receipt", T, || async {
        let s = sync(&env.alice).await.ok()?;
        let eph = s["rooms"]["join"][&room]["ephemeral"]["events"].as_array()?.clone();
        eph.iter()
            .any(|e| {
                e["type"] == "m.receipt" && e["content"][&event_id]["m.read"][GHOST].is_object()
            })
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    // UCS-2 out.
    let before = env.kannel.received().len();
    env.alice.send_text(&room, "ça va? 🙂").await?;
    let mts = new_mts(&env, before, 1).await?;
    assert_eq!(mts[0].kind, "ucs-2");
    assert_eq!(mts[0].ucs2_text(), "ça va? 🙂");

    // Kannel carries no MMS: a captioned image becomes the caption, the file name and a media
    // proxy link that serves the image.
    let mxc = env.alice.upload(PNG.to_vec(), "image/png").await?;
    let before = env.kannel.received().len();
    env.alice
        .send(
            &room,
            "m.room.message",
            json!({"msgtype": "m.image", "body": "our cat", "filename": "cat.png", "url": mxc}),
        )
        .await?;
    let mts = new_mts(&env, before, 1).await?;
    assert_eq!(mts[0].concat(), None);
    let text = mts[0].plain_text();
    let link = text.strip_prefix("our cat (cat.png) ").unwrap_or_else(|| panic!("{text:?}"));
    let fetched = reqwest::get(link).await?;
    assert_eq!(fetched.status(), 200);
    assert_eq!(fetched.bytes().await?.as_ref(), PNG);
    Ok(())
}

#[tokio::test]
async fn long_messages_split_and_counted() -> anyhow::Result<()> {
    let Some(env) = start().await? else { return Ok(()) };
    let room = first_contact(&env, "long ones please").await?;

    let cases: [(String, &str, &[usize]); 4] = [
        ("x".repeat(200), "gsm", &[153, 47]),
        // Extension characters are two septets: 76 per part (a pair never straddles parts).
        ("{".repeat(100), "gsm", &[76, 24]),
        ("я".repeat(100), "ucs2", &[67, 33]),
        // An emoji (a surrogate pair) that would straddle the 67-unit boundary moves whole.
        (format!("{}🙂{}", "я".repeat(66), "я".repeat(10)), "ucs2", &[66, 11]),
    ];
    let mut last_event = String::new();
    for (text, enc, sizes) in cases {
        // The bridge's own count agrees with the gateway's split.
        let seg = trestle_sms::encoding::segment(&text);
        assert_eq!(seg.count(), sizes.len());
        let before = env.kannel.received().len();
        last_event = env.alice.send_text(&room, &text).await?;
        let mts = new_mts(&env, before, sizes.len()).await?;
        let mut got = Vec::new();
        for (i, m) in mts.iter().enumerate() {
            assert_eq!(m.concat(), Some((sizes.len() as u8, i as u8 + 1)), "{m:?}");
            let part = if enc == "ucs2" { m.ucs2_text() } else { m.plain_text() };
            assert_eq!(part.chars().count(), sizes[i], "{enc} part {i}: {part}");
            assert_eq!(part, seg.parts[i]);
            got.push(part);
        }
        assert_eq!(got.concat(), text);
    }
    // Every part of the last one was reported delivered: the ghost has read it.
    wait_for("the ghost's read receipt", T, || async {
        let s = sync(&env.alice).await.ok()?;
        let eph = s["rooms"]["join"][&room]["ephemeral"]["events"].as_array()?.clone();
        eph.iter()
            .any(|e| {
                e["type"] == "m.receipt" && e["content"][&last_event]["m.read"][GHOST].is_object()
            })
            .then_some(())
    })
    .await?;
    // One report acted on per message (not per part, not per retry).
    wait_for("4 delivery reports counted", T, || async {
        (env.bridge.metric("trestle_sms_delivery_reports_total").await.ok()? == 4.0).then_some(())
    })
    .await?;

    // Over max_segments (3): refused with the count, nothing sent.
    let before = env.kannel.received().len();
    env.alice.send_text(&room, &"y".repeat(500)).await?;
    let n = notice_containing(&env, &room, "would be 4 SMS").await?;
    assert!(
        body(&n).contains("GSM-7, 500 characters") && body(&n).contains("limit is 3"),
        "{}",
        body(&n)
    );
    let long_ucs2 = "ж".repeat(202);
    env.alice.send_text(&room, &long_ucs2).await?;
    notice_containing(&env, &room, "would be 4 SMS (UCS-2, 202").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(env.kannel.received().len(), before, "nothing sent for refused messages");
    // The bridge's counters agree: 4 messages in 2 parts each, 2 refused as too long.
    assert_eq!(env.bridge.metric("trestle_sms_sent_total").await?, 4.0);
    assert_eq!(env.bridge.metric("trestle_sms_sent_parts_total").await?, 8.0);
    assert_eq!(env.bridge.metric("trestle_sms_refused_total").await?, 2.0);
    Ok(())
}

#[tokio::test]
async fn stop_start_and_help() -> anyhow::Result<()> {
    let Some(env) = start().await? else { return Ok(()) };
    let room = first_contact(&env, "hi").await?;

    env.kannel.inject(PHONE, OURS, "Stop").await?;
    notice_containing(&env, &room, "sent STOP").await?;
    let before = env.kannel.received().len();
    env.alice.send_text(&room, "are you there?").await?;
    notice_containing(&env, &room, "opted out").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(env.kannel.received().len(), before, "nothing is sent after STOP");

    // HELP is answered even while opted out.
    env.kannel.inject(PHONE, OURS, "HELP").await?;
    let mts = new_mts(&env, before, 1).await?;
    assert_eq!(mts[0].plain_text(), "Help: reply STOP to opt out.");
    assert_eq!(mts[0].to, PHONE);
    notice_containing(&env, &room, "asked for HELP").await?;
    // Asked again: not answered twice within the hour.
    env.kannel.inject(PHONE, OURS, "help").await?;
    notice_containing(&env, &room, "asked for HELP again").await?;

    env.kannel.inject(PHONE, OURS, "START").await?;
    notice_containing(&env, &room, "sent START").await?;
    env.alice.send_text(&room, "welcome back").await?;
    let mts = new_mts(&env, before + 1, 1).await?;
    assert_eq!(mts[0].plain_text(), "welcome back");
    Ok(())
}

#[tokio::test]
async fn webhooks_are_authenticated_and_idempotent() -> anyhow::Result<()> {
    let Some(env) = start().await? else { return Ok(()) };
    let room = first_contact(&env, "first").await?;
    let http = reqwest::Client::new();
    let mo = |secret: &str, id: &str, text: &str| {
        format!(
            "{}/kannel/mo?secret={secret}&from=%2B447700900123&to=%2B441234567890&text={text}&charset=UTF-8&coding=0&id={id}",
            env.hooks
        )
    };
    // A wrong or missing secret is refused and creates nothing.
    assert_eq!(
        http.get(mo("wrong-secret-wrong-secret", "x1", "forged")).send().await?.status(),
        403
    );
    assert_eq!(
        http.get(format!(
            "{}/kannel/mo?from=%2B447700900123&to=%2B441234567890&text=forged",
            env.hooks
        ))
        .send()
        .await?
        .status(),
        403
    );
    // A DLR with a wrong token is refused.
    assert_eq!(
        http.get(format!("{}/kannel/dlr?id=abc&token=00&status=1", env.hooks))
            .send()
            .await?
            .status(),
        403
    );
    // The same callback three times (as Kannel retries it): one message.
    for _ in 0..3 {
        assert_eq!(http.get(mo(SECRET, "retry-1", "only+once")).send().await?.status(), 200);
    }
    // A later message proves the earlier ones were all handled.
    assert_eq!(http.get(mo(SECRET, "retry-2", "after")).send().await?.status(), 200);
    env.alice.wait_for_message(&room, T, |e| body(e) == "after").await?;
    let msgs = env.alice.messages(&room, 100).await?;
    assert_eq!(msgs.iter().filter(|e| body(e) == "only once").count(), 1);
    assert_eq!(msgs.iter().filter(|e| body(e) == "forged").count(), 0);
    // first, retry-1 and retry-2 bridged; retry-1 twice more as duplicates.
    assert_eq!(env.bridge.metric("trestle_sms_received_total").await?, 5.0);
    Ok(())
}

#[tokio::test]
async fn conversation_started_from_matrix() -> anyhow::Result<()> {
    let Some(env) = start().await? else { return Ok(()) };
    // Admin room: a DM with the bot.
    let admin = env
        .alice
        .create_room(
            json!({"is_direct": true, "invite": ["@smsbot:localhost"], "preset": "private_chat"}),
        )
        .await?;
    env.alice
        .wait_for_message(&admin, T, |e| {
            e["sender"] == "@smsbot:localhost" && body(e).contains("admin room")
        })
        .await?;
    let before = env.kannel.received().len();
    env.alice.send_text(&admin, "!sms 07700 900456 \"hello, new friend\"").await?;
    let mts = new_mts(&env, before, 1).await?;
    assert_eq!(
        (mts[0].to.as_str(), mts[0].plain_text().as_str()),
        ("+447700900456", "hello, new friend")
    );
    let room = accept_invite(&env.alice).await?;
    let ghost = "@sms_+447700900456:localhost";
    env.alice
        .wait_for_message(&room, T, |e| e["type"] == "m.room.member" && e["state_key"] == ghost)
        .await?;
    // The reply lands in the same room.
    env.kannel.inject("+447700900456", OURS, "who is this").await?;
    env.alice
        .wait_for_message(&room, T, |e| e["sender"] == ghost && body(e) == "who is this")
        .await?;
    let _ = &env.synapse;
    Ok(())
}

#[tokio::test]
async fn inviting_a_ghost_makes_a_portal() -> anyhow::Result<()> {
    let Some(env) = start().await? else { return Ok(()) };
    let ghost = "@sms_+447700900777:localhost";
    let room = env
        .alice
        .create_room(json!({"is_direct": true, "invite": [ghost], "preset": "private_chat"}))
        .await?;
    // The ghost joins, and the room is told what it now is.
    env.alice
        .wait_for_message(&room, T, |e| {
            e["type"] == "m.room.member"
                && e["state_key"] == ghost
                && e["content"]["membership"] == "join"
        })
        .await?;
    notice_containing(&env, &room, "SMS conversation with +447700900777").await?;
    let before = env.kannel.received().len();
    env.alice.send_text(&room, "hello via invite").await?;
    let mts = new_mts(&env, before, 1).await?;
    assert_eq!((mts[0].from.as_str(), mts[0].to.as_str()), (OURS, "+447700900777"));
    assert_eq!(mts[0].plain_text(), "hello via invite");
    // The answer comes back to this room, not a new one.
    env.kannel.inject("+447700900777", OURS, "got it").await?;
    env.alice.wait_for_message(&room, T, |e| e["sender"] == ghost && body(e) == "got it").await?;
    let s = sync(&env.alice).await?;
    assert!(
        s["rooms"]["invite"].as_object().is_none_or(|m| m.is_empty()),
        "no new portal: {}",
        s["rooms"]["invite"]
    );

    // An SMS to a number that is not ours is dropped (answered 200 so the gateway stops).
    let r = reqwest::get(format!(
        "{}/kannel/mo?secret={SECRET}&from=%2B447700900777&to=%2B449999999999&text=lost&charset=UTF-8&id=n1",
        env.hooks
    ))
    .await?;
    assert_eq!(r.status(), 200);
    env.kannel.inject("+447700900777", OURS, "still here").await?;
    env.alice.wait_for_message(&room, T, |e| body(e) == "still here").await?;
    assert!(env.alice.messages(&room, 100).await?.iter().all(|e| body(e) != "lost"));
    Ok(())
}

/// What the fake REST API received: (account sid in the path, Authorization header, form).
type Sent = Vec<(String, String, Vec<(String, String)>)>;

/// The fake REST API's Basic credentials, `AC123:tw-token`.
const REST_AUTH: &str = "Basic QUMxMjM6dHctdG9rZW4=";

/// A fake Twilio Messages API: records each send and answers with sid `SM<n>`. It also hosts
/// inbound MMS media behind its Basic auth, as Twilio can: `…/Media/png` ([`PNG`]) and
/// `…/Media/big` (larger than [`MAX_MEDIA`]); each download is counted in the third value.
/// A bridge on the REST (Twilio-style) gateway, against [`fake_rest_api`]: the bridge, the
/// API's URL, what it was sent and how many media downloads it served.
async fn launch_rest() -> anyhow::Result<(
    Launched,
    String,
    std::sync::Arc<std::sync::Mutex<Sent>>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
)> {
    let (api, sent, downloads) = fake_rest_api().await?;
    let gateway = format!(
        "    type: twilio\n    api_url: \"{api}\"\n    account_sid: AC123\n    auth_token: tw-token\n"
    );
    let l = launch(&gateway, free_port()).await?;
    Ok((l, api, sent, downloads))
}

async fn fake_rest_api() -> anyhow::Result<(
    String,
    std::sync::Arc<std::sync::Mutex<Sent>>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
)> {
    use axum::{
        extract::Path,
        http::{HeaderMap, StatusCode},
        response::IntoResponse,
        routing::{get, post},
    };
    let sent = std::sync::Arc::new(std::sync::Mutex::new(Sent::new()));
    let s2 = std::sync::Arc::clone(&sent);
    let downloads = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let d2 = std::sync::Arc::clone(&downloads);
    let media =
        get(move |Path((_, _, item)): Path<(String, String, String)>, headers: HeaderMap| {
            let downloads = std::sync::Arc::clone(&d2);
            async move {
                if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(REST_AUTH) {
                    return StatusCode::UNAUTHORIZED.into_response();
                }
                downloads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                match item.as_str() {
                    "png" => ([("content-type", "image/png")], PNG.to_vec()).into_response(),
                    "big" => {
                        ([("content-type", "image/jpeg")], vec![0u8; MAX_MEDIA + 1]).into_response()
                    }
                    _ => StatusCode::NOT_FOUND.into_response(),
                }
            }
        });
    let app = axum::Router::new()
        .route("/2010-04-01/Accounts/{sid}/Messages/{msg}/Media/{item}", media)
        .route(
            "/2010-04-01/Accounts/{sid}/Messages.json",
            post(move |Path(sid): Path<String>, headers: HeaderMap, body: axum::body::Bytes| {
                let sent = std::sync::Arc::clone(&s2);
                async move {
                    let auth = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    let form: Vec<(String, String)> =
                        url::form_urlencoded::parse(&body).into_owned().collect();
                    let mut sent = sent.lock().unwrap();
                    sent.push((sid, auth, form));
                    let n = sent.len();
                    (
                        StatusCode::CREATED,
                        axum::Json(json!({"sid": format!("SM{n}"), "status": "queued"})),
                    )
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((url, sent, downloads))
}

fn form_get<'a>(form: &'a [(String, String)], key: &str) -> &'a str {
    form.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str()).unwrap_or_default()
}

#[tokio::test]
async fn rest_gateway_end_to_end() -> anyhow::Result<()> {
    use trestle_sms::gateway::twilio::signature;
    let (l, _, sent, _) = launch_rest().await?;
    let hooks = l.hooks.clone();
    let alice = &l.alice;
    let http = reqwest::Client::new();
    let params = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        v.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    };
    let post = |path: &str, form: Vec<(String, String)>, sign: Option<&str>| {
        let url = format!("{hooks}{path}");
        let mut req = http.post(&url).form(&form);
        if let Some(token) = sign {
            req = req.header("X-Twilio-Signature", signature(token, &url, &form));
        }
        req.send()
    };

    // Inbound: unsigned and wrongly signed are refused; signed creates the portal.
    let inbound = params(&[
        ("MessageSid", "SMin1"),
        ("From", PHONE),
        ("To", OURS),
        ("Body", "hello over REST"),
        ("NumMedia", "0"),
    ]);
    assert_eq!(post("/twilio/sms", inbound.clone(), None).await?.status(), 403);
    assert_eq!(post("/twilio/sms", inbound.clone(), Some("not-the-token")).await?.status(), 403);
    let r = post("/twilio/sms", inbound.clone(), Some("tw-token")).await?;
    assert_eq!(r.status(), 200);
    assert!(r.text().await?.contains("<Response/>"));
    let room = accept_invite(alice).await?;
    alice
        .wait_for_message(&room, T, |e| e["sender"] == GHOST && body(e) == "hello over REST")
        .await?;
    // Twilio retries: the same MessageSid again creates nothing.
    assert_eq!(post("/twilio/sms", inbound, Some("tw-token")).await?.status(), 200);

    // Outbound: a form POST with Basic auth and our status callback.
    let event_id = alice.send_text(&room, "answer over REST").await?;
    let got = wait_for("the REST send", T, || async {
        let s = sent.lock().unwrap();
        (!s.is_empty()).then(|| s[0].clone())
    })
    .await?;
    assert_eq!(got.0, "AC123");
    assert_eq!(got.1, "Basic QUMxMjM6dHctdG9rZW4="); // base64("AC123:tw-token")
    assert_eq!(form_get(&got.2, "To"), PHONE);
    assert_eq!(form_get(&got.2, "From"), OURS);
    assert_eq!(form_get(&got.2, "Body"), "answer over REST");
    assert_eq!(form_get(&got.2, "StatusCallback"), format!("{hooks}/twilio/status"));

    // Status callbacks: forged refused; delivered → read receipt; undelivered → notice.
    let delivered = params(&[("MessageSid", "SM1"), ("MessageStatus", "delivered")]);
    assert_eq!(post("/twilio/status", delivered.clone(), None).await?.status(), 403);
    assert_eq!(post("/twilio/status", delivered, Some("tw-token")).await?.status(), 200);
    wait_for("the ghost's read receipt", T, || async {
        let s = sync(alice).await.ok()?;
        let eph = s["rooms"]["join"][&room]["ephemeral"]["events"].as_array()?.clone();
        eph.iter()
            .any(|e| {
                e["type"] == "m.receipt" && e["content"][&event_id]["m.read"][GHOST].is_object()
            })
            .then_some(())
    })
    .await?;
    alice.send_text(&room, "this one fails").await?;
    wait_for("the second REST send", T, || async {
        (sent.lock().unwrap().len() >= 2).then_some(())
    })
    .await?;
    let failed =
        params(&[("MessageSid", "SM2"), ("MessageStatus", "undelivered"), ("ErrorCode", "30003")]);
    assert_eq!(post("/twilio/status", failed, Some("tw-token")).await?.status(), 200);
    alice
        .wait_for_message(&room, T, |e| {
            e["content"]["msgtype"] == "m.notice"
                && body(e).contains("failed: undelivered (error 30003)")
        })
        .await?;
    assert_eq!(
        alice.messages(&room, 100).await?.iter().filter(|e| body(e) == "hello over REST").count(),
        1
    );
    let _ = (&l.synapse, &l.dir, &l.bridge);
    Ok(())
}

/// Waits for the ghost's read receipt on `event_id`.
async fn ghost_read_receipt(alice: &MatrixUser, room: &str, event_id: &str) {
    wait_for("the ghost's read receipt", T, || async {
        let s = sync(alice).await.ok()?;
        let eph = s["rooms"]["join"][room]["ephemeral"]["events"].as_array()?.clone();
        eph.iter()
            .any(|e| {
                e["type"] == "m.receipt" && e["content"][event_id]["m.read"][GHOST].is_object()
            })
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}

/// The SMPP client against a third-party implementation of the protocol (Net::SMPP): bind,
/// an MO, an MT with its delivery receipt, a throttled submit sent again once, and long
/// messages both ways in `message_payload`.
#[tokio::test]
async fn smpp_interoperates_with_net_smpp() -> anyhow::Result<()> {
    use trestle_e2e::netsmpp::NetSmppSmsc;
    if !NetSmppSmsc::available() {
        eprintln!("skipping: Net::SMPP (libnet-smpp-perl) is not installed");
        return Ok(());
    }
    let smsc = NetSmppSmsc::start("pw-net").await?;
    let gateway = format!(
        "    type: smpp\n    address: \"{}\"\n    system_id: bridge\n    password: pw-net\n\
         \x20   enquire_link_interval_secs: 1\n    throttle_pause_ms: 200\n    long_messages: message_payload\n",
        smsc.address()
    );
    let l = launch(&gateway, free_port()).await?;
    let alice = &l.alice;
    smsc.wait_bound(T).await.map_err(|e| anyhow::anyhow!("{e}\n{}", smsc.log()))?;

    // MO: deliver_sm → a portal, the ghost says the text; the ESME answered ESME_ROK.
    let seq = smsc.mo(&PHONE[1..], &OURS[1..], "hello from Net::SMPP").await?;
    assert_eq!(smsc.wait_resp(seq, T).await?, 0, "deliver_sm_resp status");
    let room = accept_invite(alice).await?;
    alice
        .wait_for_message(&room, T, |e| e["sender"] == GHOST && body(e) == "hello from Net::SMPP")
        .await?;

    // MT: submit_sm as Net::SMPP decodes it; its receipt → a read receipt from the ghost.
    let event_id = alice.send_text(&room, "hi Net::SMPP").await?;
    let s = smsc.wait_submits(1, T).await.map_err(|e| anyhow::anyhow!("{e}\n{}", smsc.log()))?;
    let s: Vec<_> = s.into_iter().map(|p| p.submit).collect();
    assert_eq!((s[0].source.0, s[0].source.1.as_str()), (1, &OURS[1..]));
    assert_eq!((s[0].dest.0, s[0].dest.1.as_str()), (1, &PHONE[1..]));
    assert_eq!((s[0].data_coding, s[0].registered_delivery), (0, 1));
    assert_eq!(s[0].short_message, b"hi Net::SMPP");
    let seq = smsc.receipt(&PHONE[1..], &OURS[1..], &s[0].message_id, "DELIVRD").await?;
    assert_eq!(smsc.wait_resp(seq, T).await?, 0);
    ghost_read_receipt(alice, &room, &event_id).await;

    // ESME_RTHROTTLED once, then accepted: sent once.
    smsc.throttle_next(1).await?;
    alice.send_text(&room, "after a throttle").await?;
    let s = smsc.wait_submits(2, T).await?;
    assert_eq!(
        (s[1].submit.short_message.as_slice(), s[1].payload),
        (&b"after a throttle"[..], false)
    );
    assert_eq!(smsc.throttled().await?, 1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(smsc.submits().await?.len(), 2, "the throttled message was sent once");

    // Long messages in message_payload (as configured): one submit_sm holding the whole text,
    // and an MO whose text comes in the TLV.
    let long = "a long message ".repeat(20);
    alice.send_text(&room, long.trim_end()).await?;
    let s = smsc.wait_submits(3, T).await?;
    assert!(s[2].payload, "not in message_payload: {:?}", s[2]);
    assert_eq!(s[2].submit.short_message, long.trim_end().as_bytes());
    let seq = smsc.mo_payload(&PHONE[1..], &OURS[1..], long.trim_end()).await?;
    assert_eq!(smsc.wait_resp(seq, T).await?, 0);
    alice
        .wait_for_message(&room, T, |e| e["sender"] == GHOST && body(e) == long.trim_end())
        .await?;
    let _ = (&l.synapse, &l.dir, &l.bridge);
    Ok(())
}

/// The first part of a concatenated MO is answered as received, so the bridge must not lose it:
/// killed (SIGKILL) and restarted before the second part, it still bridges the whole text.
#[tokio::test]
async fn smpp_concatenated_mo_survives_a_bridge_restart() -> anyhow::Result<()> {
    use trestle_e2e::smsc::Smsc;
    let smsc = Smsc::start("pw123").await?;
    let gateway = format!(
        "    type: smpp\n    address: \"{}\"\n    system_id: bridge\n    password: pw123\n\
         \x20   enquire_link_interval_secs: 1\n    reconnect_min_secs: 1\n",
        smsc.address()
    );
    let mut l = launch(&gateway, free_port()).await?;
    smsc.wait_bound(T).await?;
    let p1 = [&[5u8, 0, 3, 42, 2, 1][..], b"first half, "].concat();
    assert_eq!(smsc.deliver(PHONE, OURS, 0x40, 0, &p1, &[], T).await?, 0);
    let binds = smsc.binds().len();
    l.bridge.restart().await?;
    wait_for("the bridge to bind again", T, || async {
        (smsc.binds().len() > binds).then_some(())
    })
    .await?;
    let p2 = [&[5u8, 0, 3, 42, 2, 2][..], b"second half"].concat();
    assert_eq!(smsc.deliver(PHONE, OURS, 0x40, 0, &p2, &[], T).await?, 0);
    let room = accept_invite(&l.alice).await?;
    l.alice
        .wait_for_message(&room, T, |e| {
            e["sender"] == GHOST && body(e) == "first half, second half"
        })
        .await?;
    Ok(())
}

#[tokio::test]
async fn smpp_gateway_end_to_end() -> anyhow::Result<()> {
    use trestle_e2e::smsc::Smsc;
    let smsc = Smsc::start("pw123").await?;
    let hook_port = free_port();
    let gateway = format!(
        "    type: smpp\n    address: \"{}\"\n    system_id: bridge\n    password: pw123\n    system_type: e2e\n\
         \x20   window: 4\n    enquire_link_interval_secs: 1\n    throttle_pause_ms: 200\n",
        smsc.address()
    );
    let l = launch(&gateway, hook_port).await?;
    let alice = &l.alice;
    smsc.wait_bound(T).await?;
    assert_eq!(smsc.binds()[0], ("bridge".into(), "pw123".into(), "e2e".into()));

    // MO deliver_sm (GSM-7, unpacked) → a portal, alice invited, the ghost says the text.
    let status = smsc.deliver(PHONE, OURS, 0, 0, b"hello over SMPP", &[], T).await?;
    assert_eq!(status, 0, "deliver_sm_resp status");
    let room = accept_invite(alice).await?;
    alice
        .wait_for_message(&room, T, |e| e["sender"] == GHOST && body(e) == "hello over SMPP")
        .await?;

    // A UCS-2 MO in two UDH-concatenated parts, the second first → one Matrix message.
    let ucs2 = |s: &str| s.encode_utf16().flat_map(u16::to_be_bytes).collect::<Vec<u8>>();
    let p2 = [&[5u8, 0, 3, 77, 2, 2][..], &ucs2(" мир 🙂")].concat();
    let p1 = [&[5u8, 0, 3, 77, 2, 1][..], &ucs2("привет")].concat();
    assert_eq!(smsc.deliver(PHONE, OURS, 0x40, 8, &p2, &[], T).await?, 0);
    assert_eq!(smsc.deliver(PHONE, OURS, 0x40, 8, &p1, &[], T).await?, 0);
    alice
        .wait_for_message(&room, T, |e| e["sender"] == GHOST && body(e) == "привет мир 🙂")
        .await?;

    // Matrix → submit_sm: GSM-7 (data_coding 0, extension characters escaped), receipt asked.
    let event_id = alice.send_text(&room, "hi back {ok}").await?;
    let s = smsc.wait_submits(1, T).await.unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(s[0].source, (1, OURS[1..].to_owned()));
    assert_eq!(s[0].dest, (1, PHONE[1..].to_owned()));
    assert_eq!((s[0].data_coding, s[0].esm_class, s[0].registered_delivery), (0, 0, 1));
    assert_eq!(s[0].short_message, b"hi back \x1b\x28ok\x1b\x29");
    // The delivery receipt → a read receipt from the ghost.
    assert_eq!(smsc.receipt(PHONE, OURS, &s[0].message_id, "DELIVRD", T).await?, 0);
    ghost_read_receipt(alice, &room, &event_id).await;

    // A long UCS-2 text → two submit_sm with a concatenation UDH and data_coding 8; the read
    // receipt comes once both parts are delivered.
    let long = "я".repeat(100);
    let event_id = alice.send_text(&room, &long).await?;
    let s = smsc.wait_submits(3, T).await.unwrap_or_else(|e| panic!("{e:#}"));
    let parts = &s[1..3];
    let (r1, r2) = (parts[0].concat().unwrap(), parts[1].concat().unwrap());
    assert_eq!((r1.1, r1.2, r2.1, r2.2), (2, 1, 2, 2));
    assert_eq!(r1.0, r2.0, "same reference");
    assert!(parts.iter().all(|p| p.data_coding == 8 && p.registered_delivery == 1));
    assert_eq!(parts[0].ucs2_text() + &parts[1].ucs2_text(), long);
    assert_eq!(parts[0].ucs2_text().chars().count(), 67);
    assert_eq!(smsc.receipt(PHONE, OURS, &parts[0].message_id, "DELIVRD", T).await?, 0);
    assert_eq!(smsc.receipt(PHONE, OURS, &parts[1].message_id, "DELIVRD", T).await?, 0);
    ghost_read_receipt(alice, &room, &event_id).await;

    // A failed receipt → a notice.
    alice.send_text(&room, "will fail").await?;
    let s = smsc.wait_submits(4, T).await.unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(smsc.receipt(PHONE, OURS, &s[3].message_id, "UNDELIV", T).await?, 0);
    alice
        .wait_for_message(&room, T, |e| {
            e["content"]["msgtype"] == "m.notice"
                && body(e).contains("failed: SMSC receipt UNDELIV")
        })
        .await?;

    // Throttled twice, then accepted: delivered once.
    smsc.throttle_next(2);
    alice.send_text(&room, "after throttling").await?;
    let s = smsc.wait_submits(5, T).await.unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(smsc.throttled(), 2);
    assert_eq!(s[4].short_message, b"after throttling");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(smsc.submits().len(), 5, "the throttled message was sent once");

    // The session is kept alive; an unsupported request gets generic_nack (ESME_RINVCMDID).
    assert!(smsc.enquire_links() >= 1, "no enquire_link seen");
    assert_eq!(smsc.request(0x0000_0003 /* query_sm */, T).await?, (0x8000_0000, 0x03));

    // The SMSC drops the connection: the bridge binds again and sending goes on.
    smsc.kick();
    wait_for("a second bind", T, || async { (smsc.binds().len() >= 2).then_some(()) })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    smsc.wait_bound(T).await?;
    alice.send_text(&room, "after reconnecting").await?;
    let s = smsc.wait_submits(6, T).await.unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(s[5].short_message, b"after reconnecting");

    // No MMS over SMPP: a Matrix image becomes its file name and a media-proxy link in the text.
    let mxc = alice.upload(PNG.to_vec(), "image/png").await?;
    alice
        .send(&room, "m.room.message", json!({"msgtype": "m.image", "body": "cat.png", "url": mxc}))
        .await?;
    let s = smsc.wait_submits(7, T).await.unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(s[6].data_coding, 0);
    // GSM-7, unpacked: the link's characters are ASCII but for `_` (0x11).
    let text: String =
        s[6].payload().iter().map(|&b| if b == 0x11 { '_' } else { char::from(b) }).collect();
    let link = text.strip_prefix("cat.png ").unwrap_or_else(|| panic!("{text}"));
    assert!(link.contains("/media/"), "{link}");
    let fetched = reqwest::get(link).await?;
    assert_eq!(fetched.status(), 200);
    assert_eq!(fetched.bytes().await?.as_ref(), PNG);
    drop(l);
    Ok(())
}

/// The event in `room` from the ghost with msgtype `msgtype`, waiting for it.
async fn ghost_media(alice: &MatrixUser, room: &str, msgtype: &str) -> anyhow::Result<Value> {
    alice
        .wait_for_message(room, T, |e| e["sender"] == GHOST && e["content"]["msgtype"] == msgtype)
        .await
}

#[tokio::test]
async fn rest_gateway_mms_both_ways() -> anyhow::Result<()> {
    use trestle_sms::gateway::twilio::signature;
    let (l, api, sent, downloads) = launch_rest().await?;
    let hooks = l.hooks.clone();
    let alice = &l.alice;
    let http = reqwest::Client::new();
    let webhook = |v: &[(&str, &str)]| {
        let form: Vec<(String, String)> =
            v.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        let url = format!("{hooks}/twilio/sms");
        http.post(&url)
            .header("X-Twilio-Signature", signature("tw-token", &url, &form))
            .form(&form)
            .send()
    };
    let media_url =
        |item: &str| format!("{api}/2010-04-01/Accounts/AC123/Messages/MMx/Media/{item}");

    // Inbound MMS with text: the text as m.text, the picture as m.image from the ghost.
    let png_url = media_url("png");
    let mms = [
        ("MessageSid", "MMpic"),
        ("From", PHONE),
        ("To", OURS),
        ("Body", "look at this"),
        ("NumMedia", "1"),
        ("MediaUrl0", png_url.as_str()),
        ("MediaContentType0", "image/png"),
    ];
    assert_eq!(webhook(&mms).await?.status(), 200);
    let room = accept_invite(alice).await?;
    alice.wait_for_message(&room, T, |e| e["sender"] == GHOST && body(e) == "look at this").await?;
    let image = ghost_media(alice, &room, "m.image").await?;
    let c = &image["content"];
    assert_eq!(c["info"]["mimetype"], "image/png");
    assert_eq!(c["info"]["size"], PNG.len());
    assert!(body(&image).ends_with(".png"), "{c}");
    let (bytes, content_type) = alice.download(c["url"].as_str().unwrap_or_default()).await?;
    assert_eq!(bytes, PNG);
    assert_eq!(content_type, "image/png");
    assert_eq!(downloads.load(std::sync::atomic::Ordering::SeqCst), 1);

    // The same webhook retried (twice): nothing new, not even a download.
    assert_eq!(webhook(&mms).await?.status(), 200);
    assert_eq!(webhook(&mms).await?.status(), 200);

    // Too large: a notice in the room, not silence; the text still arrives.
    let big_url = media_url("big");
    let big = [
        ("MessageSid", "MMbig"),
        ("From", PHONE),
        ("To", OURS),
        ("Body", ""),
        ("NumMedia", "1"),
        ("MediaUrl0", big_url.as_str()),
        ("MediaContentType0", "image/jpeg"),
    ];
    assert_eq!(webhook(&big).await?.status(), 200);
    let notice = alice
        .wait_for_message(&room, T, |e| {
            e["content"]["msgtype"] == "m.notice" && body(e).contains("too large")
        })
        .await?;
    assert!(
        body(&notice).contains("image/jpeg") && body(&notice).contains(&format!("{MAX_MEDIA}")),
        "{}",
        body(&notice)
    );
    // A download that fails (404) is announced too.
    let gone_url = media_url("gone");
    let gone = [
        ("MessageSid", "MMgone"),
        ("From", PHONE),
        ("To", OURS),
        ("NumMedia", "1"),
        ("MediaUrl0", gone_url.as_str()),
        ("MediaContentType0", "video/mp4"),
    ];
    assert_eq!(webhook(&gone).await?.status(), 200);
    alice
        .wait_for_message(&room, T, |e| {
            e["content"]["msgtype"] == "m.notice"
                && body(e).contains("(video/mp4)")
                && body(e).contains("answered 404")
        })
        .await?;
    // One attachment bridged, one too large, one failed.
    wait_for("3 media outcomes counted", T, || async {
        (l.bridge.metric("trestle_sms_received_media_total").await.ok()? == 3.0).then_some(())
    })
    .await?;
    // A later message proves the retries were handled; still one text, one image.
    let after = [("MessageSid", "SMafter"), ("From", PHONE), ("To", OURS), ("Body", "after")];
    assert_eq!(webhook(&after).await?.status(), 200);
    alice.wait_for_message(&room, T, |e| body(e) == "after").await?;
    let msgs = alice.messages(&room, 100).await?;
    assert_eq!(msgs.iter().filter(|e| body(e) == "look at this").count(), 1);
    assert_eq!(msgs.iter().filter(|e| e["content"]["msgtype"] == "m.image").count(), 1);
    assert_eq!(
        downloads.load(std::sync::atomic::Ordering::SeqCst),
        3,
        "MMpic, MMbig and MMgone once each"
    );

    // Matrix image → an MMS: MediaUrl is the media proxy's link, serving the exact bytes.
    let mxc = alice.upload(PNG.to_vec(), "image/png").await?;
    alice
        .send(
            &room,
            "m.room.message",
            json!({"msgtype": "m.image", "body": "cat.png", "url": mxc,
                   "info": {"mimetype": "image/png", "size": PNG.len()}}),
        )
        .await?;
    let got = wait_for("the MMS send", T, || async {
        sent.lock().unwrap().iter().find(|s| !form_get(&s.2, "MediaUrl").is_empty()).cloned()
    })
    .await?;
    assert_eq!(form_get(&got.2, "To"), PHONE);
    assert_eq!(form_get(&got.2, "Body"), "cat.png");
    let link = form_get(&got.2, "MediaUrl");
    assert_eq!(got.2.iter().filter(|(k, _)| k == "MediaUrl").count(), 1);
    assert!(link.contains("/media/") && !link.contains("mxc://"), "{link}");
    let fetched = http.get(link).send().await?;
    assert_eq!(fetched.status(), 200);
    assert_eq!(
        fetched.headers().get("content-type").and_then(|v| v.to_str().ok()),
        Some("image/png")
    );
    assert_eq!(fetched.bytes().await?.as_ref(), PNG);
    // With a caption, the caption is the text.
    alice
        .send(
            &room,
            "m.room.message",
            json!({"msgtype": "m.image", "body": "our cat", "filename": "cat.png", "url": mxc,
                   "info": {"mimetype": "image/png", "size": PNG.len()}}),
        )
        .await?;
    wait_for("the captioned MMS", T, || async {
        sent.lock().unwrap().iter().any(|s| form_get(&s.2, "Body") == "our cat").then_some(())
    })
    .await?;
    let _ = (&l.synapse, &l.dir, &l.bridge);
    Ok(())
}

#[tokio::test]
async fn smpp_deliver_sm_delivered_again_is_bridged_once() -> anyhow::Result<()> {
    use trestle_e2e::smsc::Smsc;
    let smsc = Smsc::start("pw123").await?;
    let gateway = format!(
        "    type: smpp\n    address: \"{}\"\n    system_id: bridge\n    password: pw123\n",
        smsc.address()
    );
    let l = launch(&gateway, free_port()).await?;
    let alice = &l.alice;
    smsc.wait_bound(T).await?;
    let count = |msgs: &[Value], text: &str| msgs.iter().filter(|e| body(e) == text).count();

    assert_eq!(smsc.deliver(PHONE, OURS, 0, 0, b"hello", &[], T).await?, 0);
    let room = accept_invite(alice).await?;
    alice.wait_for_message(&room, T, |e| e["sender"] == GHOST && body(e) == "hello").await?;
    // The same text again, answered in time on a healthy session: the phone sent it twice.
    assert_eq!(smsc.deliver(PHONE, OURS, 0, 0, b"hello", &[], T).await?, 0);
    wait_for("the second hello", T, || async {
        (count(&alice.messages(&room, 100).await.ok()?, "hello") == 2).then_some(())
    })
    .await?;

    // The connection breaks before the bridge's answer arrives; once it is bound again the SMSC
    // delivers the same deliver_sm again: answered with success, not bridged twice.
    smsc.deliver_unanswered(PHONE, OURS, b"only once please").await?;
    alice
        .wait_for_message(&room, T, |e| e["sender"] == GHOST && body(e) == "only once please")
        .await?;
    wait_for("a second bind", T, || async { (smsc.binds().len() >= 2).then_some(()) }).await?;
    smsc.wait_bound(T).await?;
    assert_eq!(smsc.deliver(PHONE, OURS, 0, 0, b"only once please", &[], T).await?, 0);
    // A later message proves the redelivery was handled before it.
    assert_eq!(smsc.deliver(PHONE, OURS, 0, 0, b"after", &[], T).await?, 0);
    alice.wait_for_message(&room, T, |e| body(e) == "after").await?;
    let msgs = alice.messages(&room, 100).await?;
    assert_eq!(count(&msgs, "only once please"), 1);
    assert_eq!(count(&msgs, "hello"), 2);
    drop(l);
    Ok(())
}
