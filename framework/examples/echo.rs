//! The smallest useful Trestle bridge: every `m.text` in a portal room is answered by a ghost.
//! `docs/writing-a-bridge.md` walks through it line by line.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::json;
use trestle::{
    bridge::{Bridge, BridgeError, BridgeInfo, GhostProfile, PortalSpec, RoomContext},
    config::{BridgeConfig, Config},
    context::Context,
    event::{MatrixEvent, Message, MessageType},
    registration::{Namespace, Namespaces},
};

/// The `bridge:` section of the config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EchoConfig {
    reply_prefix: String,
}

impl BridgeConfig for EchoConfig {
    const EXAMPLE: &'static str =
        "  # Put before every echoed message.\n  reply_prefix: \"echo: \"\n";
}

struct Echo {
    ctx: Context<EchoConfig>,
}

impl Echo {
    fn user_id(&self, name: &str) -> String {
        format!("@echo_{name}:{}", self.ctx.domain())
    }
}

#[async_trait]
impl Bridge for Echo {
    type Config = EchoConfig;

    fn info() -> BridgeInfo {
        BridgeInfo {
            name: "echo",
            network_name: "Echo",
            default_port: 9000,
            protocols: &[],
            version: "0.1.0",
        }
    }

    fn namespaces(config: &Config<EchoConfig>) -> Namespaces {
        let domain = &config.homeserver.domain;
        Namespaces {
            users: vec![Namespace::prefixed('@', "echo_", domain)],
            aliases: vec![Namespace::prefixed('#', "echo_", domain)],
            rooms: vec![],
        }
    }

    async fn start(ctx: Context<EchoConfig>) -> Result<Self, BridgeError> {
        Ok(Self { ctx })
    }

    // `@echo_alice:domain` exists for any name; its displayname is the name.
    async fn query_user(&self, user_id: &str) -> Result<Option<GhostProfile>, BridgeError> {
        let name = user_id.strip_prefix("@echo_").and_then(|r| r.split(':').next()).unwrap_or("");
        Ok(Some(GhostProfile {
            remote_id: name.to_owned(),
            displayname: Some(name.to_owned()),
            avatar_url: None,
        }))
    }

    // `#echo_lobby:domain` is created on demand as a public room.
    async fn query_alias(&self, alias: &str) -> Result<Option<PortalSpec>, BridgeError> {
        let name = alias.strip_prefix("#echo_").and_then(|r| r.split(':').next()).unwrap_or("");
        let mut spec = PortalSpec::new(name, name);
        spec.name = Some(format!("Echo {name}"));
        spec.public = true;
        Ok(Some(spec))
    }

    async fn on_message(
        &self,
        room: &RoomContext,
        event: &MatrixEvent,
        msg: &Message,
    ) -> Result<(), BridgeError> {
        if room.portal.is_none() || msg.msgtype != MessageType::Text {
            return Ok(());
        }
        let ghost = self.user_id("echo");
        let profile = GhostProfile {
            remote_id: "echo".into(),
            displayname: Some("Echo".into()),
            avatar_url: None,
        };
        self.ctx.ensure_ghost(&ghost, &profile).await?;
        let content = json!({
            "msgtype": "m.text",
            "body": format!("{}{}", self.ctx.config().bridge.reply_prefix, msg.body),
            "m.relates_to": {"m.in_reply_to": {"event_id": event.event_id}},
        });
        // The transaction id is derived from the event: a replay after a crash is a no-op.
        let txn = self.ctx.txn_id_for(&event.event_id, 0);
        self.ctx.send_as(&ghost, &event.room_id, "m.room.message", content, &txn, None).await?;
        Ok(())
    }
}

fn main() -> std::process::ExitCode {
    trestle::runtime::run::<Echo>()
}
