//! [`Intent`]: acting as one user of the application service.

use std::{collections::BTreeMap, time::Duration};

use bytes::Bytes;
use http::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::{debug, warn};

use super::{
    ClientError, HomeserverClient, Membership, Request, check_id, check_token, enc,
    is_unrecognized,
    types::{
        CreateRoom, JoinedMember, Presence, Profile, ResolvedAlias, WhoAmI,
        room_version_has_privileged_creators,
    },
};

const ROOM: &[char] = &['!'];
const ROOM_OR_ALIAS: &[char] = &['!', '#'];
const ALIAS: &[char] = &['#'];
const USER: &[char] = &['@'];
const EVENT: &[char] = &['$'];

#[derive(Deserialize)]
struct EventIdResponse {
    event_id: String,
}

#[derive(Deserialize)]
struct RoomIdResponse {
    room_id: String,
}

/// Splits `mxc://<server>/<media-id>` into its parts, validating both.
pub fn parse_mxc(uri: &str) -> Result<(&str, &str), ClientError> {
    let bad = || ClientError::InvalidInput(format!("invalid mxc URI {uri:?}"));
    let rest = uri.strip_prefix("mxc://").ok_or_else(bad)?;
    let (server, media_id) = rest.split_once('/').ok_or_else(bad)?;
    let server_ok = !server.is_empty()
        && server
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
    let media_ok = !media_id.is_empty()
        && media_id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'));
    if server_ok && media_ok { Ok((server, media_id)) } else { Err(bad()) }
}

/// Acts as one user: the bot (no identity assertion) or a user in the
/// application service's namespace (`?user_id=` on every request).
///
/// Sending methods do not implicitly register or join: call
/// [`ensure_registered`](Self::ensure_registered) /
/// [`ensure_joined`](Self::ensure_joined) first (both are cached and cheap
/// after the first call). All requests targeting a room go through that
/// room's ordered outbound queue.
#[derive(Debug, Clone)]
pub struct Intent {
    client: HomeserverClient,
    user_id: String,
    is_bot: bool,
}

impl Intent {
    pub(crate) fn new(client: HomeserverClient, user_id: String) -> Self {
        let is_bot = user_id == client.bot_user_id();
        Self { client, user_id, is_bot }
    }

    /// The user this intent acts as.
    pub fn user_id(&self) -> &str {
        &self.user_id
    }

    /// True if this is the application service's bot (sender) user.
    pub fn is_bot(&self) -> bool {
        self.is_bot
    }

    /// The underlying client.
    pub fn client(&self) -> &HomeserverClient {
        &self.client
    }

    /// A request with identity assertion for non-bot users.
    fn req(&self, method: Method, endpoint: &'static str, path: String) -> Request {
        let r = Request::new(method, endpoint, path);
        if self.is_bot { r } else { r.query("user_id", self.user_id.clone()) }
    }

    fn check_self(&self) -> Result<(), ClientError> {
        check_id("user id", &self.user_id, USER)
    }

    /// Registers the user (`POST /v3/register` with `m.login.application_service`,
    /// `inhibit_login: true`) unless the cache says it exists. `M_USER_IN_USE`
    /// counts as success. The bot is always considered registered.
    pub async fn ensure_registered(&self) -> Result<(), ClientError> {
        if self.is_bot {
            return Ok(());
        }
        self.check_self()?;
        let cache = self.client.cache();
        if cache.is_registered(&self.user_id).await? {
            return Ok(());
        }
        let (localpart, server) = self.user_id[1..].split_once(':').ok_or_else(|| {
            ClientError::InvalidInput(format!("user id {:?} has no server part", self.user_id))
        })?;
        if server != self.client.config().server_name {
            return Err(ClientError::InvalidInput(format!(
                "cannot register {:?}: not on {}",
                self.user_id,
                self.client.config().server_name
            )));
        }
        let req = Request::new(
            Method::POST,
            "POST /v3/register",
            "/_matrix/client/v3/register".to_owned(),
        )
        .json(json!({
            "type": "m.login.application_service",
            "username": localpart,
            "inhibit_login": true,
        }));
        match self.client.execute(req).await {
            Ok(_) => debug!(user_id = %self.user_id, "registered user"),
            Err(e) if e.is_errcode("M_USER_IN_USE") => {
                debug!(user_id = %self.user_id, "user already registered");
            }
            Err(e) => return Err(e),
        }
        cache.mark_registered(&self.user_id).await?;
        Ok(())
    }

    /// Makes sure the user is joined to `room_id`: trusts a cached `join`;
    /// otherwise registers, joins, and on `M_FORBIDDEN` has the bot invite
    /// the user (joining the bot first if needed) and joins again.
    pub async fn ensure_joined(&self, room_id: &str) -> Result<(), ClientError> {
        check_id("room id", room_id, ROOM)?;
        self.check_self()?;
        let cache = self.client.cache();
        if cache.membership(room_id, &self.user_id).await? == Some(Membership::Join) {
            return Ok(());
        }
        self.ensure_registered().await?;
        match self.join(room_id).await {
            Ok(_) => return Ok(()),
            Err(e) if e.is_errcode("M_FORBIDDEN") && !self.is_bot => {
                debug!(user_id = %self.user_id, room_id, error = %e, "self-join forbidden; asking the bot to invite");
            }
            Err(e) => return Err(e),
        }
        let bot = self.client.bot();
        match bot.invite(room_id, &self.user_id).await {
            Ok(()) => {}
            Err(e) if e.is_errcode("M_FORBIDDEN") => {
                debug!(room_id, error = %e, "bot could not invite; joining the bot first");
                Box::pin(bot.ensure_joined(room_id)).await?;
                bot.invite(room_id, &self.user_id).await?;
            }
            Err(e) => return Err(e),
        }
        self.join(room_id).await?;
        Ok(())
    }

    /// Joins a room by id or alias (`POST /v3/join/{roomIdOrAlias}`) and returns the room id.
    pub async fn join(&self, room_id_or_alias: &str) -> Result<String, ClientError> {
        self.join_via(room_id_or_alias, &[]).await
    }

    /// Like [`join`](Self::join), naming servers to join through (`via`).
    pub async fn join_via(
        &self,
        room_id_or_alias: &str,
        via: &[String],
    ) -> Result<String, ClientError> {
        check_id("room id or alias", room_id_or_alias, ROOM_OR_ALIAS)?;
        let mut req = self
            .req(
                Method::POST,
                "POST /v3/join/{roomIdOrAlias}",
                format!("/_matrix/client/v3/join/{}", enc(room_id_or_alias)),
            )
            .json(json!({}))
            .in_room(room_id_or_alias);
        for server in via {
            req = req.query("via", server.clone()).query("server_name", server.clone());
        }
        let resp: RoomIdResponse = self.client.send_json(req).await?;
        self.client.cache().set_membership(&resp.room_id, &self.user_id, Membership::Join).await?;
        Ok(resp.room_id)
    }

    async fn membership_action(
        &self,
        room_id: &str,
        action: &'static str,
        endpoint: &'static str,
        target: &str,
        reason: Option<&str>,
        result: Membership,
    ) -> Result<(), ClientError> {
        check_id("room id", room_id, ROOM)?;
        check_id("user id", target, USER)?;
        let mut body = serde_json::Map::new();
        if action != "leave" {
            body.insert("user_id".to_owned(), Value::String(target.to_owned()));
        }
        if let Some(reason) = reason {
            body.insert("reason".to_owned(), Value::String(reason.to_owned()));
        }
        let req = self
            .req(
                Method::POST,
                endpoint,
                format!("/_matrix/client/v3/rooms/{}/{action}", enc(room_id)),
            )
            .json(Value::Object(body))
            .in_room(room_id);
        self.client.execute(req).await?;
        self.client.cache().set_membership(room_id, target, result).await?;
        Ok(())
    }

    /// Leaves a room.
    pub async fn leave(&self, room_id: &str) -> Result<(), ClientError> {
        let me = self.user_id.clone();
        self.membership_action(
            room_id,
            "leave",
            "POST /v3/rooms/{roomId}/leave",
            &me,
            None,
            Membership::Leave,
        )
        .await
    }

    /// Invites `user_id` to a room.
    pub async fn invite(&self, room_id: &str, user_id: &str) -> Result<(), ClientError> {
        self.invite_with_reason(room_id, user_id, None).await
    }

    /// Invites `user_id`, telling them why.
    pub async fn invite_with_reason(
        &self,
        room_id: &str,
        user_id: &str,
        reason: Option<&str>,
    ) -> Result<(), ClientError> {
        self.membership_action(
            room_id,
            "invite",
            "POST /v3/rooms/{roomId}/invite",
            user_id,
            reason,
            Membership::Invite,
        )
        .await
    }

    /// Kicks `user_id` from a room.
    pub async fn kick(
        &self,
        room_id: &str,
        user_id: &str,
        reason: Option<&str>,
    ) -> Result<(), ClientError> {
        self.membership_action(
            room_id,
            "kick",
            "POST /v3/rooms/{roomId}/kick",
            user_id,
            reason,
            Membership::Leave,
        )
        .await
    }

    /// Bans `user_id` from a room.
    pub async fn ban(
        &self,
        room_id: &str,
        user_id: &str,
        reason: Option<&str>,
    ) -> Result<(), ClientError> {
        self.membership_action(
            room_id,
            "ban",
            "POST /v3/rooms/{roomId}/ban",
            user_id,
            reason,
            Membership::Ban,
        )
        .await
    }

    /// Unbans `user_id` in a room.
    pub async fn unban(
        &self,
        room_id: &str,
        user_id: &str,
        reason: Option<&str>,
    ) -> Result<(), ClientError> {
        self.membership_action(
            room_id,
            "unban",
            "POST /v3/rooms/{roomId}/unban",
            user_id,
            reason,
            Membership::Leave,
        )
        .await
    }

    /// Sends an `m.room.message` and returns its event id.
    pub async fn send_message(&self, room_id: &str, content: Value) -> Result<String, ClientError> {
        self.send_event(room_id, "m.room.message", content, None).await
    }

    /// Sends a timeline event with a fresh transaction id. `ts` (ms since the
    /// epoch) sets the origin timestamp (timestamp massaging).
    pub async fn send_event(
        &self,
        room_id: &str,
        event_type: &str,
        content: Value,
        ts: Option<u64>,
    ) -> Result<String, ClientError> {
        let txn_id = self.client.new_txn_id();
        self.send_event_with_txn(room_id, event_type, content, &txn_id, ts).await
    }

    /// Sends a timeline event with the caller's transaction id
    /// (`PUT /v3/rooms/{roomId}/send/{eventType}/{txnId}`). Retries reuse the
    /// id, so the homeserver deduplicates them; reuse the same id when
    /// re-sending after a crash to stay idempotent. An appservice without a
    /// device shares one transaction-id scope per user, so ids must be
    /// unique per user (e.g. derived from the remote message id).
    pub async fn send_event_with_txn(
        &self,
        room_id: &str,
        event_type: &str,
        content: Value,
        txn_id: &str,
        ts: Option<u64>,
    ) -> Result<String, ClientError> {
        check_id("room id", room_id, ROOM)?;
        check_token("event type", event_type)?;
        check_token("transaction id", txn_id)?;
        let mut req = self
            .req(
                Method::PUT,
                "PUT /v3/rooms/{roomId}/send/{eventType}/{txnId}",
                format!(
                    "/_matrix/client/v3/rooms/{}/send/{}/{}",
                    enc(room_id),
                    enc(event_type),
                    enc(txn_id)
                ),
            )
            .json(content)
            .in_room(room_id);
        if let Some(ts) = ts {
            req = req.query("ts", ts.to_string());
        }
        let resp: EventIdResponse = self.send_in_room(room_id, req).await?;
        Ok(resp.event_id)
    }

    /// Sends and, on `M_FORBIDDEN`, forgets a cached `join` so the next
    /// `ensure_joined` re-checks with the server.
    async fn send_in_room<T: serde::de::DeserializeOwned>(
        &self,
        room_id: &str,
        req: Request,
    ) -> Result<T, ClientError> {
        match self.client.send_json(req).await {
            Err(e) if e.is_errcode("M_FORBIDDEN") => {
                let cache = self.client.cache();
                if cache.membership(room_id, &self.user_id).await.ok().flatten()
                    == Some(Membership::Join)
                {
                    warn!(user_id = %self.user_id, room_id, "send forbidden although cached as joined; invalidating");
                    if let Err(ce) =
                        cache.set_membership(room_id, &self.user_id, Membership::Leave).await
                    {
                        warn!(error = %ce, "could not update membership cache");
                    }
                }
                Err(e)
            }
            other => other,
        }
    }

    /// Sends a state event (`PUT /v3/rooms/{roomId}/state/{eventType}/{stateKey}`)
    /// and returns its event id. Power levels and memberships sent this way
    /// update the cache.
    pub async fn send_state(
        &self,
        room_id: &str,
        event_type: &str,
        state_key: &str,
        content: Value,
        ts: Option<u64>,
    ) -> Result<String, ClientError> {
        check_id("room id", room_id, ROOM)?;
        check_token("event type", event_type)?;
        if state_key.chars().any(char::is_control) {
            return Err(ClientError::InvalidInput(format!(
                "state key {state_key:?} contains control characters"
            )));
        }
        let mut req = self
            .req(
                Method::PUT,
                "PUT /v3/rooms/{roomId}/state/{eventType}/{stateKey}",
                format!(
                    "/_matrix/client/v3/rooms/{}/state/{}/{}",
                    enc(room_id),
                    enc(event_type),
                    enc(state_key)
                ),
            )
            .json(content.clone())
            .in_room(room_id);
        if let Some(ts) = ts {
            req = req.query("ts", ts.to_string());
        }
        let resp: EventIdResponse = self.send_in_room(room_id, req).await?;
        let cache = self.client.cache();
        if event_type == "m.room.power_levels" && state_key.is_empty() {
            cache.set_power_levels(room_id, content).await?;
        } else if event_type == "m.room.member"
            && let Some(m) = content
                .get("membership")
                .and_then(Value::as_str)
                .and_then(|m| m.parse::<Membership>().ok())
        {
            cache.set_membership(room_id, state_key, m).await?;
        }
        Ok(resp.event_id)
    }

    /// Redacts an event (`PUT /v3/rooms/{roomId}/redact/{eventId}/{txnId}`);
    /// returns the redaction's event id.
    pub async fn redact(
        &self,
        room_id: &str,
        event_id: &str,
        reason: Option<&str>,
    ) -> Result<String, ClientError> {
        check_id("room id", room_id, ROOM)?;
        check_id("event id", event_id, EVENT)?;
        let txn_id = self.client.new_txn_id();
        let body = match reason {
            Some(r) => json!({ "reason": r }),
            None => json!({}),
        };
        let req = self
            .req(
                Method::PUT,
                "PUT /v3/rooms/{roomId}/redact/{eventId}/{txnId}",
                format!(
                    "/_matrix/client/v3/rooms/{}/redact/{}/{}",
                    enc(room_id),
                    enc(event_id),
                    enc(&txn_id)
                ),
            )
            .json(body)
            .in_room(room_id);
        let resp: EventIdResponse = self.send_in_room(room_id, req).await?;
        Ok(resp.event_id)
    }

    /// Sends an `m.reaction` annotation with `key` to `event_id`.
    pub async fn react(
        &self,
        room_id: &str,
        event_id: &str,
        key: &str,
    ) -> Result<String, ClientError> {
        check_id("event id", event_id, EVENT)?;
        let content = json!({
            "m.relates_to": { "rel_type": "m.annotation", "event_id": event_id, "key": key }
        });
        self.send_event(room_id, "m.reaction", content, None).await
    }

    /// Sets the global display name.
    pub async fn set_displayname(&self, displayname: &str) -> Result<(), ClientError> {
        self.check_self()?;
        let req = self
            .req(
                Method::PUT,
                "PUT /v3/profile/{userId}/displayname",
                format!("/_matrix/client/v3/profile/{}/displayname", enc(&self.user_id)),
            )
            .json(json!({ "displayname": displayname }));
        self.client.execute(req).await.map(drop)
    }

    /// Sets the global avatar (`mxc://` URI).
    pub async fn set_avatar_url(&self, avatar_url: &str) -> Result<(), ClientError> {
        self.check_self()?;
        let req = self
            .req(
                Method::PUT,
                "PUT /v3/profile/{userId}/avatar_url",
                format!("/_matrix/client/v3/profile/{}/avatar_url", enc(&self.user_id)),
            )
            .json(json!({ "avatar_url": avatar_url }));
        self.client.execute(req).await.map(drop)
    }

    /// Fetches a user's global profile.
    pub async fn get_profile(&self, user_id: &str) -> Result<Profile, ClientError> {
        check_id("user id", user_id, USER)?;
        let req = self.req(
            Method::GET,
            "GET /v3/profile/{userId}",
            format!("/_matrix/client/v3/profile/{}", enc(user_id)),
        );
        self.client.send_json(req).await
    }

    /// Starts or stops typing in a room (not queued: ephemeral).
    pub async fn set_typing(
        &self,
        room_id: &str,
        typing: bool,
        timeout: Duration,
    ) -> Result<(), ClientError> {
        check_id("room id", room_id, ROOM)?;
        self.check_self()?;
        let body = if typing {
            json!({ "typing": true, "timeout": u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX) })
        } else {
            json!({ "typing": false })
        };
        let req = self
            .req(
                Method::PUT,
                "PUT /v3/rooms/{roomId}/typing/{userId}",
                format!("/_matrix/client/v3/rooms/{}/typing/{}", enc(room_id), enc(&self.user_id)),
            )
            .json(body);
        self.client.execute(req).await.map(drop)
    }

    /// Sends an `m.read` receipt for `event_id` (not queued: ephemeral).
    pub async fn send_receipt(&self, room_id: &str, event_id: &str) -> Result<(), ClientError> {
        check_id("room id", room_id, ROOM)?;
        check_id("event id", event_id, EVENT)?;
        let req = self
            .req(
                Method::POST,
                "POST /v3/rooms/{roomId}/receipt/{receiptType}/{eventId}",
                format!(
                    "/_matrix/client/v3/rooms/{}/receipt/m.read/{}",
                    enc(room_id),
                    enc(event_id)
                ),
            )
            .json(json!({}));
        self.client.execute(req).await.map(drop)
    }

    /// Sets presence and an optional status message.
    pub async fn set_presence(
        &self,
        presence: Presence,
        status_msg: Option<&str>,
    ) -> Result<(), ClientError> {
        self.check_self()?;
        let mut body = json!({ "presence": presence });
        if let Some(msg) = status_msg {
            body["status_msg"] = Value::String(msg.to_owned());
        }
        let req = self
            .req(
                Method::PUT,
                "PUT /v3/presence/{userId}/status",
                format!("/_matrix/client/v3/presence/{}/status", enc(&self.user_id)),
            )
            .json(body);
        self.client.execute(req).await.map(drop)
    }

    /// Creates a room (`POST /v3/createRoom`) and returns its id.
    ///
    /// Room version 12 aware: when the effective room version (the given
    /// one, or the server default from `/capabilities` if none is given) has
    /// privileged creators, this user and any `additional_creators` are
    /// removed from `power_level_content_override.users`, since the server
    /// would reject them there.
    pub async fn create_room(&self, opts: &CreateRoom) -> Result<String, ClientError> {
        self.check_self()?;
        for user in &opts.invite {
            check_id("invitee", user, USER)?;
        }
        let mut body = serde_json::Map::new();
        let mut put = |k: &str, v: Value| {
            body.insert(k.to_owned(), v);
        };
        if let Some(v) = &opts.name {
            put("name", json!(v));
        }
        if let Some(v) = &opts.topic {
            put("topic", json!(v));
        }
        if let Some(v) = &opts.alias_localpart {
            put("room_alias_name", json!(v));
        }
        if !opts.invite.is_empty() {
            put("invite", json!(opts.invite));
        }
        if opts.is_direct {
            put("is_direct", json!(true));
        }
        if let Some(v) = opts.preset {
            put("preset", json!(v));
        }
        if let Some(v) = opts.visibility {
            put("visibility", json!(v));
        }
        if !opts.initial_state.is_empty() {
            put("initial_state", json!(opts.initial_state));
        }
        if let Some(v) = &opts.room_version {
            put("room_version", json!(v));
        }
        if let Some(v) = &opts.creation_content {
            put("creation_content", v.clone());
        }
        if let Some(pl) = &opts.power_level_content_override {
            let pl = self.strip_creators_from_pl(opts, pl.clone()).await;
            put("power_level_content_override", pl);
        }
        let req = self
            .req(Method::POST, "POST /v3/createRoom", "/_matrix/client/v3/createRoom".to_owned())
            .json(Value::Object(body));
        let resp: RoomIdResponse = self.client.send_json(req).await?;
        self.client.cache().set_membership(&resp.room_id, &self.user_id, Membership::Join).await?;
        Ok(resp.room_id)
    }

    async fn strip_creators_from_pl(&self, opts: &CreateRoom, mut pl: Value) -> Value {
        let mut creators = vec![self.user_id.clone()];
        if let Some(extra) = opts
            .creation_content
            .as_ref()
            .and_then(|c| c.get("additional_creators"))
            .and_then(Value::as_array)
        {
            creators.extend(extra.iter().filter_map(Value::as_str).map(str::to_owned));
        }
        let mentions_creator = pl
            .get("users")
            .and_then(Value::as_object)
            .is_some_and(|users| creators.iter().any(|c| users.contains_key(c)));
        if !mentions_creator {
            return pl;
        }
        let version = match &opts.room_version {
            Some(v) => Some(v.clone()),
            None => match self.client.default_room_version().await {
                Ok(v) => Some(v),
                Err(e) => {
                    warn!(error = %e, "could not learn the default room version; keeping creators in power levels");
                    None
                }
            },
        };
        if version.as_deref().is_some_and(room_version_has_privileged_creators)
            && let Some(users) = pl.get_mut("users").and_then(Value::as_object_mut)
        {
            for c in &creators {
                if users.remove(c).is_some() {
                    debug!(creator = %c, "removed creator from power_level_content_override.users (room v12+)");
                }
            }
        }
        pl
    }

    /// All current state events of a room.
    pub async fn get_room_state(&self, room_id: &str) -> Result<Vec<Value>, ClientError> {
        check_id("room id", room_id, ROOM)?;
        let req = self.req(
            Method::GET,
            "GET /v3/rooms/{roomId}/state",
            format!("/_matrix/client/v3/rooms/{}/state", enc(room_id)),
        );
        self.client.send_json(req).await
    }

    /// The content of one state event, or `None` if it does not exist (`404 M_NOT_FOUND`).
    pub async fn get_state_event(
        &self,
        room_id: &str,
        event_type: &str,
        state_key: &str,
    ) -> Result<Option<Value>, ClientError> {
        self.get_state_inner(room_id, event_type, state_key, false).await
    }

    async fn get_state_inner(
        &self,
        room_id: &str,
        event_type: &str,
        state_key: &str,
        full_event: bool,
    ) -> Result<Option<Value>, ClientError> {
        check_id("room id", room_id, ROOM)?;
        check_token("event type", event_type)?;
        let mut req = self.req(
            Method::GET,
            "GET /v3/rooms/{roomId}/state/{eventType}/{stateKey}",
            format!(
                "/_matrix/client/v3/rooms/{}/state/{}/{}",
                enc(room_id),
                enc(event_type),
                enc(state_key)
            ),
        );
        if full_event {
            req = req.query("format", "event");
        }
        match self.client.send_json(req).await {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.status() == Some(StatusCode::NOT_FOUND) && e.is_errcode("M_NOT_FOUND") => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Joined members of a room, keyed by user id.
    pub async fn joined_members(
        &self,
        room_id: &str,
    ) -> Result<BTreeMap<String, JoinedMember>, ClientError> {
        #[derive(Deserialize)]
        struct Resp {
            #[serde(default)]
            joined: BTreeMap<String, JoinedMember>,
        }
        check_id("room id", room_id, ROOM)?;
        let req = self.req(
            Method::GET,
            "GET /v3/rooms/{roomId}/joined_members",
            format!("/_matrix/client/v3/rooms/{}/joined_members", enc(room_id)),
        );
        let resp: Resp = self.client.send_json(req).await?;
        Ok(resp.joined)
    }

    /// Rooms this user is joined to.
    pub async fn joined_rooms(&self) -> Result<Vec<String>, ClientError> {
        #[derive(Deserialize)]
        struct Resp {
            #[serde(default)]
            joined_rooms: Vec<String>,
        }
        let req = self.req(
            Method::GET,
            "GET /v3/joined_rooms",
            "/_matrix/client/v3/joined_rooms".to_owned(),
        );
        let resp: Resp = self.client.send_json(req).await?;
        Ok(resp.joined_rooms)
    }

    /// The room's `m.room.power_levels` content, from the cache if present.
    /// A room without the event yields `{}`.
    pub async fn power_levels(&self, room_id: &str) -> Result<Value, ClientError> {
        check_id("room id", room_id, ROOM)?;
        let cache = self.client.cache();
        if let Some(pl) = cache.power_levels(room_id).await? {
            return Ok(pl);
        }
        let pl = self
            .get_state_event(room_id, "m.room.power_levels", "")
            .await?
            .unwrap_or_else(|| json!({}));
        cache.set_power_levels(room_id, pl.clone()).await?;
        Ok(pl)
    }

    /// Sets `user_id`'s power level in a room (read-modify-write of fresh
    /// power levels, serialized per room within this client). In rooms with privileged creators (v12+), setting a
    /// creator's level is a no-op: creators already have infinite power and
    /// may not appear in `users`.
    pub async fn set_user_power_level(
        &self,
        room_id: &str,
        user_id: &str,
        level: i64,
    ) -> Result<(), ClientError> {
        check_id("room id", room_id, ROOM)?;
        check_id("user id", user_id, USER)?;
        // Concurrent edits in this client must not overwrite each other.
        let _edit = self.client.lock_power_levels(room_id).await;
        if self.is_room_creator(room_id, user_id).await? {
            debug!(
                room_id,
                user_id, "user is a room creator with infinite power level; not touching users"
            );
            return Ok(());
        }
        let mut pl = self
            .get_state_event(room_id, "m.room.power_levels", "")
            .await?
            .unwrap_or_else(|| json!({}));
        let Some(obj) = pl.as_object_mut() else {
            return Err(ClientError::Decode {
                endpoint: "GET /v3/rooms/{roomId}/state/{eventType}/{stateKey}",
                message: "power levels content is not an object".to_owned(),
            });
        };
        let users = obj.entry("users").or_insert_with(|| json!({}));
        if !users.is_object() {
            *users = json!({});
        }
        if users.get(user_id).and_then(Value::as_i64) == Some(level) {
            return Ok(());
        }
        users[user_id] = json!(level);
        self.send_state(room_id, "m.room.power_levels", "", pl, None).await?;
        Ok(())
    }

    /// True if the room's version has privileged creators and `user_id` is one.
    pub async fn is_room_creator(&self, room_id: &str, user_id: &str) -> Result<bool, ClientError> {
        let Some(create) = self.get_state_inner(room_id, "m.room.create", "", true).await? else {
            return Ok(false);
        };
        // With `format=event` we get the whole event; older servers return only content.
        let (content, sender) = match create.get("content") {
            Some(c) if create.get("sender").is_some() => {
                (c.clone(), create.get("sender").and_then(Value::as_str).map(str::to_owned))
            }
            _ => (create.clone(), None),
        };
        let version = content.get("room_version").and_then(Value::as_str).unwrap_or("1");
        if !room_version_has_privileged_creators(version) {
            return Ok(false);
        }
        let additional = content
            .get("additional_creators")
            .and_then(Value::as_array)
            .is_some_and(|a| a.iter().any(|u| u.as_str() == Some(user_id)));
        Ok(additional || sender.as_deref() == Some(user_id))
    }

    /// Creates a room alias pointing to `room_id` (`PUT /v3/directory/room/{roomAlias}`).
    pub async fn create_alias(&self, alias: &str, room_id: &str) -> Result<(), ClientError> {
        check_id("alias", alias, ALIAS)?;
        check_id("room id", room_id, ROOM)?;
        let req = self
            .req(
                Method::PUT,
                "PUT /v3/directory/room/{roomAlias}",
                format!("/_matrix/client/v3/directory/room/{}", enc(alias)),
            )
            .json(json!({ "room_id": room_id }));
        self.client.execute(req).await.map(drop)
    }

    /// Deletes a room alias.
    pub async fn delete_alias(&self, alias: &str) -> Result<(), ClientError> {
        check_id("alias", alias, ALIAS)?;
        let req = self.req(
            Method::DELETE,
            "DELETE /v3/directory/room/{roomAlias}",
            format!("/_matrix/client/v3/directory/room/{}", enc(alias)),
        );
        self.client.execute(req).await.map(drop)
    }

    /// Resolves a room alias; `None` if it does not exist.
    pub async fn resolve_alias(&self, alias: &str) -> Result<Option<ResolvedAlias>, ClientError> {
        check_id("alias", alias, ALIAS)?;
        let req = self.req(
            Method::GET,
            "GET /v3/directory/room/{roomAlias}",
            format!("/_matrix/client/v3/directory/room/{}", enc(alias)),
        );
        match self.client.send_json(req).await {
            Ok(r) => Ok(Some(r)),
            Err(e) if e.is_errcode("M_NOT_FOUND") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Publishes or unpublishes a room in the application service's room
    /// directory for `network_id`
    /// (`PUT /v3/directory/list/appservice/{networkId}/{roomId}`). Always sent
    /// as the application service itself (no identity assertion).
    pub async fn set_room_directory_visibility(
        &self,
        network_id: &str,
        room_id: &str,
        public: bool,
    ) -> Result<(), ClientError> {
        check_token("network id", network_id)?;
        check_id("room id", room_id, ROOM)?;
        let req = Request::new(
            Method::PUT,
            "PUT /v3/directory/list/appservice/{networkId}/{roomId}",
            format!(
                "/_matrix/client/v3/directory/list/appservice/{}/{}",
                enc(network_id),
                enc(room_id)
            ),
        )
        .json(json!({ "visibility": if public { "public" } else { "private" } }));
        self.client.execute(req).await.map(drop)
    }

    /// Sets global account data (e.g. `m.direct`).
    pub async fn set_account_data(
        &self,
        data_type: &str,
        content: Value,
    ) -> Result<(), ClientError> {
        self.check_self()?;
        check_token("account data type", data_type)?;
        let req = self
            .req(
                Method::PUT,
                "PUT /v3/user/{userId}/account_data/{type}",
                format!(
                    "/_matrix/client/v3/user/{}/account_data/{}",
                    enc(&self.user_id),
                    enc(data_type)
                ),
            )
            .json(content);
        self.client.execute(req).await.map(drop)
    }

    /// Sets per-room account data.
    pub async fn set_room_account_data(
        &self,
        room_id: &str,
        data_type: &str,
        content: Value,
    ) -> Result<(), ClientError> {
        self.check_self()?;
        check_id("room id", room_id, ROOM)?;
        check_token("account data type", data_type)?;
        let req = self
            .req(
                Method::PUT,
                "PUT /v3/user/{userId}/rooms/{roomId}/account_data/{type}",
                format!(
                    "/_matrix/client/v3/user/{}/rooms/{}/account_data/{}",
                    enc(&self.user_id),
                    enc(room_id),
                    enc(data_type)
                ),
            )
            .json(content);
        self.client.execute(req).await.map(drop)
    }

    /// Uploads media (`POST /_matrix/media/v3/upload`) and returns its `mxc://` URI.
    pub async fn upload_media(
        &self,
        data: impl Into<Bytes>,
        content_type: &str,
        filename: Option<&str>,
    ) -> Result<String, ClientError> {
        #[derive(Deserialize)]
        struct Resp {
            content_uri: String,
        }
        if http::HeaderValue::from_str(content_type).is_err() || content_type.is_empty() {
            return Err(ClientError::InvalidInput(format!(
                "invalid content type {content_type:?}"
            )));
        }
        let mut req = self
            .req(Method::POST, "POST /media/v3/upload", "/_matrix/media/v3/upload".to_owned())
            .bytes(data.into(), content_type.to_owned());
        if let Some(name) = filename {
            req = req.query("filename", name.to_owned());
        }
        let resp: Resp = self.client.send_json(req).await?;
        parse_mxc(&resp.content_uri).map_err(|_| ClientError::Decode {
            endpoint: "POST /media/v3/upload",
            message: format!("homeserver returned invalid content_uri {:?}", resp.content_uri),
        })?;
        Ok(resp.content_uri)
    }

    /// Downloads media by `mxc://` URI with authenticated media
    /// (`GET /v1/media/download/{serverName}/{mediaId}`), falling back to the
    /// legacy `/_matrix/media/v3/download` on `404 M_UNRECOGNIZED`. Returns the
    /// bytes and the `Content-Type`. Bodies above `max_media_bytes` are refused.
    pub async fn download_media(&self, mxc: &str) -> Result<(Bytes, Option<String>), ClientError> {
        let (server, media_id) = parse_mxc(mxc)?;
        let limit = self.client.config().max_media_bytes;
        let authed = self
            .req(
                Method::GET,
                "GET /v1/media/download/{serverName}/{mediaId}",
                format!("/_matrix/client/v1/media/download/{}/{}", enc(server), enc(media_id)),
            )
            .max_body(limit);
        let raw = match self.client.execute(authed).await {
            Err(e) if is_unrecognized(&e) => {
                debug!("authenticated media not supported; using legacy download");
                let legacy = self
                    .req(
                        Method::GET,
                        "GET /media/v3/download/{serverName}/{mediaId}",
                        format!("/_matrix/media/v3/download/{}/{}", enc(server), enc(media_id)),
                    )
                    .max_body(limit);
                self.client.execute(legacy).await?
            }
            other => other?,
        };
        let content_type = raw
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Ok((raw.body, content_type))
    }

    /// `GET /v3/account/whoami` as this user.
    pub async fn whoami(&self) -> Result<WhoAmI, ClientError> {
        let req = self.req(
            Method::GET,
            "GET /v3/account/whoami",
            "/_matrix/client/v3/account/whoami".to_owned(),
        );
        self.client.send_json(req).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mxc_parsing() {
        assert_eq!(
            parse_mxc("mxc://example.org/abc_DEF-1").ok(),
            Some(("example.org", "abc_DEF-1"))
        );
        assert_eq!(parse_mxc("mxc://[::1]:8448/x").ok(), Some(("[::1]:8448", "x")));
        for bad in [
            "http://example.org/abc",
            "mxc://example.org",
            "mxc:///abc",
            "mxc://example.org/",
            "mxc://example.org/a/b",
            "mxc://ex ample.org/a",
            "mxc://example.org/a%2F",
            "mxc://example.org/a\r\n",
            "mxc://exa/mple.org/../a",
        ] {
            assert!(parse_mxc(bad).is_err(), "{bad}");
        }
    }
}
