//! The command line every bridge binary shares, and the run loop.
//!
//! ```text
//! trestle-irc example-config                      # print the commented example config
//! trestle-irc generate-registration -c CONFIG -o FILE [--force]
//! trestle-irc check-config -c CONFIG              # validate; names every bad key
//! trestle-irc run -c CONFIG                       # run (also the default)
//! ```

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::{
    appservice::{
        self, ApiError, AppState, QueryHandler,
        txn::{ItemKind, TxnItem},
    },
    bridge::{Bridge, BridgeError, RoomContext},
    client::{ClientConfig, HomeserverClient},
    commands::CommandRegistry,
    config::{Config, ConfigError, LogFormat, PermissionLevel, example_config},
    context::Context,
    event::{EphemeralEvent, MatrixEvent, RoomEvent},
    inbound::{HandleError, Inbound, ItemHandler},
    metrics::Metrics,
    registration::Registration,
    store::{SqliteStore, Store},
};

#[derive(Parser, Debug)]
#[command(version, about = "A Matrix bridge built on Trestle")]
struct Cli {
    /// Config file (for `run` when no subcommand is given).
    #[arg(short, long, global = true, default_value = "config.yaml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print a complete, commented example config.
    ExampleConfig,
    /// Write the registration file for the homeserver, with fresh tokens.
    GenerateRegistration {
        /// Where to write it (default: `appservice.registration` from the config).
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Validate the config and name every bad key.
    CheckConfig,
    /// Run the bridge.
    Run,
}

/// The whole `main` of a bridge binary: `fn main() -> ExitCode { trestle::run::<MyBridge>() }`.
pub fn run<B: Bridge>() -> ExitCode {
    let cli = Cli::parse();
    let info = B::info();
    match cli.command.unwrap_or(Command::Run) {
        Command::ExampleConfig => {
            print!("{}", example_config::<B::Config>(info.name, info.default_port));
            ExitCode::SUCCESS
        }
        Command::CheckConfig => match Config::<B::Config>::load(&cli.config) {
            Ok(_) => {
                println!("{}: ok", cli.config.display());
                ExitCode::SUCCESS
            }
            Err(e) => config_failure(&cli.config, &e),
        },
        Command::GenerateRegistration { output, force } => {
            let config = match Config::<B::Config>::load(&cli.config) {
                Ok(c) => c,
                Err(e) => return config_failure(&cli.config, &e),
            };
            let path = output.unwrap_or_else(|| config.appservice.registration.clone());
            let reg = Registration::generate(
                &config.appservice.id,
                config.appservice.url.as_str(),
                &config.appservice.bot_localpart,
                B::namespaces(&config),
                info.protocols.iter().map(|p| (*p).to_owned()).collect(),
                config.appservice.receive_ephemeral,
            );
            match reg.write(&path, force) {
                Ok(()) => {
                    println!("wrote {}", path.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run => {
            let config = match Config::<B::Config>::load(&cli.config) {
                Ok(c) => c,
                Err(e) => return config_failure(&cli.config, &e),
            };
            init_tracing(&config.logging.level, config.logging.format);
            let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(serve::<B>(config, shutdown_signal())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn config_failure(path: &Path, e: &ConfigError) -> ExitCode {
    eprintln!("{}: invalid configuration:", path.display());
    for line in e.to_string().lines() {
        eprintln!("  {line}");
    }
    ExitCode::from(2)
}

fn init_tracing(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut term) = signal(SignalKind::terminate()) else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Runs a bridge until `shutdown` completes: opens the store, resumes pending events, serves the
/// appservice API, pings the homeserver, then drains on shutdown.
pub async fn serve<B: Bridge>(
    config: Config<B::Config>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let info = B::info();
    let registration = Registration::load(&config.appservice.registration).context(
        "cannot load the registration; create it with `generate-registration -c CONFIG` \
         and give it to the homeserver",
    )?;
    let matcher = registration.matcher()?;
    let metrics = Metrics::new();
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&config.database.path)
            .await
            .with_context(|| format!("cannot open database {}", config.database.path.display()))?,
    );
    let token = CancellationToken::new();
    let client = HomeserverClient::new(
        ClientConfig::new(
            config.homeserver.url.clone(),
            registration.as_token.clone(),
            registration.id.clone(),
            config.homeserver.domain.clone(),
            config.appservice.bot_localpart.clone(),
        ),
        Arc::new(crate::store::StoreCache::new(Arc::clone(&store))),
        metrics.registry(),
    )?;
    let ctx = Context::new(
        config.clone(),
        info.clone(),
        registration.clone(),
        matcher.clone(),
        client.clone(),
        Arc::clone(&store),
        metrics.clone(),
        token.clone(),
    );
    let bridge = Arc::new(B::start(ctx.clone()).await.context("the bridge failed to start")?);
    let mut commands = CommandRegistry::<B>::new("!");
    bridge.commands(&mut commands);
    let glue = Arc::new(Glue { bridge: Arc::clone(&bridge), ctx: ctx.clone(), commands });
    let inbound = Inbound::new(
        Arc::clone(&store),
        glue.clone(),
        metrics.clone(),
        config.queue.clone(),
        token.child_token(),
    );
    inbound.recover().await.context("cannot resume pending events")?;

    let ready = Arc::new(AtomicBool::new(false));
    let state = AppState {
        hs_token: Arc::from(registration.hs_token.as_str()),
        inbound: Arc::clone(&inbound),
        queries: glue.clone(),
        metrics: metrics.clone(),
        matcher: Arc::new(matcher),
        ready: Arc::clone(&ready),
        max_body: config.appservice.max_body_bytes,
        metrics_enabled: config.metrics.enabled,
        pings: Arc::new(Mutex::new(Vec::new())),
        media: Some((ctx.media_signer().clone(), client.clone())),
    };
    let app = appservice::router(state, config.appservice.url.path());
    let listener = tokio::net::TcpListener::bind(config.appservice.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.appservice.listen))?;
    tracing::info!(listen = %config.appservice.listen, bridge = info.name, version = info.version, "listening for the homeserver");

    // Prune old transaction ids now and then.
    let prune_store = Arc::clone(&store);
    let retention_ms = i64::from(config.database.txn_retention_days) * 86_400_000;
    let prune_token = token.clone();
    tokio::spawn(async move {
        loop {
            let cutoff = crate::store::now_ms() - retention_ms;
            match prune_store.prune_transactions(cutoff, 10_000).await {
                Ok(n) if n > 0 => tracing::debug!(removed = n, "pruned old transaction ids"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "could not prune transaction ids"),
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(3600)) => {}
                () = prune_token.cancelled() => return,
            }
        }
    });

    // Reach the homeserver (retrying while it is down), then set up the bot.
    let startup_ctx = ctx.clone();
    let startup_token = token.clone();
    let startup_ready = Arc::clone(&ready);
    let startup = tokio::spawn(async move {
        match startup_ctx.client().wait_until_reachable(startup_token.cancelled()).await {
            Ok(Some(d)) => tracing::info!(
                duration_ms = d.as_millis() as u64,
                "homeserver reached us (appservice ping ok)"
            ),
            Ok(None) => tracing::warn!(
                "the homeserver has no appservice ping; it is up, but whether it can reach us is unknown"
            ),
            Err(e) => {
                tracing::error!(error = %e, "the homeserver ping failed; check the registration and appservice.url");
                return;
            }
        }
        let bot = startup_ctx.bot();
        if let Err(e) = bot.ensure_registered().await {
            tracing::error!(error = %e, "could not register the bot user");
        }
        let name = startup_ctx.config().appservice.bot_displayname.as_deref();
        if let Some(Err(e)) =
            futures::future::OptionFuture::from(name.map(|n| bot.set_displayname(n))).await
        {
            tracing::warn!(error = %e, "could not set the bot's displayname");
        }
        startup_ready.store(true, Ordering::Release);
        tracing::info!("bridge ready");
    });

    let server_token = token.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        tokio::select! {
            () = shutdown => {}
            () = server_token.cancelled() => {}
        }
    });
    let result = server.await;
    tracing::info!("shutting down: draining the queue");
    ready.store(false, Ordering::Release);
    token.cancel();
    startup.abort();
    inbound.shutdown().await;
    bridge.stop().await;
    tracing::info!("stopped");
    result.context("the HTTP server failed")
}

/// Connects the queue and the HTTP queries to the bridge.
struct Glue<B: Bridge> {
    bridge: Arc<B>,
    ctx: Context<B::Config>,
    commands: CommandRegistry<B>,
}

impl<B: Bridge> Glue<B> {
    fn admin_key(room_id: &str) -> String {
        format!("trestle.admin_room:{room_id}")
    }

    async fn room_context(&self, room_id: &str) -> Result<RoomContext, BridgeError> {
        Ok(RoomContext {
            portal: self.ctx.store().portal_by_room(room_id).await?,
            is_admin_room: self.ctx.store().kv_get(&Self::admin_key(room_id)).await?.is_some(),
        })
    }

    /// Keeps the membership and power-level caches in step with the room.
    async fn update_caches(&self, ev: &MatrixEvent) -> Result<(), BridgeError> {
        match (ev.event_type.as_str(), &ev.state_key) {
            ("m.room.member", Some(user)) => {
                if let Some(m) = ev.content.get("membership").and_then(Value::as_str) {
                    self.ctx.store().set_membership(&ev.room_id, user, m).await?;
                }
            }
            ("m.room.power_levels", Some(k)) if k.is_empty() => {
                self.ctx.store().set_power_levels(&ev.room_id, &ev.content).await?;
            }
            _ => {}
        }
        Ok(())
    }

    /// The bot was invited: join if the inviter may use the bridge; a DM becomes an admin room.
    async fn bot_invited(&self, ev: &MatrixEvent, is_direct: bool) -> Result<(), BridgeError> {
        let level = self.ctx.permission(&ev.sender);
        let bot = self.ctx.bot();
        if level < PermissionLevel::User {
            tracing::info!(
                room_id = ev.room_id,
                sender = ev.sender,
                "declining invite from a user without permission"
            );
            bot.leave(&ev.room_id).await?;
            return Ok(());
        }
        bot.join(&ev.room_id).await?;
        if is_direct {
            self.ctx.store().kv_set(&Self::admin_key(&ev.room_id), &ev.sender).await?;
            let name = B::info().network_name;
            self.ctx
                .notice(&ev.room_id, &format!("Hello! This is your admin room for the {name} bridge. Send !help for the commands."))
                .await;
        }
        Ok(())
    }

    async fn command(&self, ev: &MatrixEvent, body: &str) -> Result<(), BridgeError> {
        let level = self.ctx.permission(&ev.sender);
        let reply = self.commands.dispatch(&ev.sender, level, body, Arc::clone(&self.bridge)).await;
        let text = match reply {
            None => return Ok(()),
            Some(Ok(t)) => t,
            Some(Err(e)) => e.to_string(),
        };
        let content = json!({"msgtype": "m.notice", "body": text,
            "m.relates_to": {"m.in_reply_to": {"event_id": ev.event_id}}});
        let txn = self.ctx.txn_id_for(&ev.event_id, 0);
        self.ctx
            .bot()
            .send_event_with_txn(&ev.room_id, "m.room.message", content, &txn, None)
            .await?;
        Ok(())
    }

    async fn room_event(&self, ev: MatrixEvent) -> Result<(), BridgeError> {
        self.update_caches(&ev).await?;
        let classified = RoomEvent::classify(&ev);
        let bot_id = self.ctx.bot_user_id();
        if let RoomEvent::Membership { user_id, membership, is_direct, .. } = &classified
            && *user_id == bot_id
            && membership == "invite"
            && ev.sender != bot_id
        {
            return self.bot_invited(&ev, *is_direct).await;
        }
        // Echo suppression: what the bridge's own users did is never bridged back.
        if self.ctx.is_bridge_user(&ev.sender) {
            return Ok(());
        }
        let room = self.room_context(&ev.room_id).await?;
        let b = &self.bridge;
        match &classified {
            RoomEvent::Message(m) if room.is_admin_room && room.portal.is_none() => {
                if m.body.starts_with('!') || !m.body.trim().is_empty() {
                    let line = if m.body.starts_with('!') {
                        m.body.clone()
                    } else {
                        format!("!{}", m.body.trim())
                    };
                    return self.command(&ev, &line).await;
                }
                Ok(())
            }
            RoomEvent::Message(m) => b.on_message(&room, &ev, m).await,
            RoomEvent::Edit { target, new } => b.on_edit(&room, &ev, target, new).await,
            RoomEvent::Reaction { target, key } => b.on_reaction(&room, &ev, target, key).await,
            RoomEvent::Redaction { target, reason } => {
                b.on_redaction(&room, &ev, target, reason.as_deref()).await
            }
            RoomEvent::Membership { user_id, membership, prev_membership, .. } => {
                if room.is_admin_room && user_id == &ev.sender && membership == "leave" {
                    // The owner left the admin room: the bot leaves too.
                    self.ctx.store().kv_delete(&Self::admin_key(&ev.room_id)).await?;
                    let _ = self.ctx.bot().leave(&ev.room_id).await;
                }
                b.on_membership(&room, &ev, user_id, membership, prev_membership.as_deref()).await
            }
            RoomEvent::Encrypted => {
                if room.portal.is_some() {
                    self.ctx.notice(&ev.room_id, "This bridge cannot read encrypted messages; your message was not delivered.").await;
                }
                Ok(())
            }
            RoomEvent::Name(_)
            | RoomEvent::Topic(_)
            | RoomEvent::Avatar(_)
            | RoomEvent::PowerLevels(_)
            | RoomEvent::Tombstone { .. }
            | RoomEvent::Other => {
                if ev.state_key.is_some() {
                    b.on_room_state(&room, &ev).await
                } else {
                    Ok(())
                }
            }
        }
    }
}

fn to_handle_error(e: &BridgeError) -> HandleError {
    HandleError { retryable: e.is_retryable(), message: e.to_string() }
}

#[async_trait]
impl<B: Bridge> ItemHandler for Glue<B> {
    async fn handle(&self, _txn_id: &str, item: &TxnItem) -> Result<(), HandleError> {
        let result = match item.kind {
            ItemKind::Event => match serde_json::from_slice::<MatrixEvent>(&item.raw) {
                Ok(ev) => self.room_event(ev).await,
                Err(e) => {
                    tracing::debug!(error = %e, event_type = item.event_type, "skipping event without the usual fields");
                    Ok(())
                }
            },
            ItemKind::Ephemeral => {
                let raw: Value = serde_json::from_slice(&item.raw).unwrap_or(Value::Null);
                let mut r = Ok(());
                for e in EphemeralEvent::parse(&raw) {
                    // A typing event is the room's whole list: one that is empty or holds only
                    // ghosts is how a Matrix user's typing ends, so it always goes through.
                    if !matches!(e, EphemeralEvent::Typing { .. })
                        && e.user_ids().iter().all(|u| self.ctx.is_bridge_user(u))
                    {
                        continue;
                    }
                    r = self.bridge.on_ephemeral(&e).await;
                    if r.is_err() {
                        break;
                    }
                }
                r
            }
            ItemKind::ToDevice => {
                let raw: Value = serde_json::from_slice(&item.raw).unwrap_or(Value::Null);
                self.bridge.on_to_device(&raw).await
            }
        };
        result.map_err(|e| to_handle_error(&e))
    }

    async fn dead_lettered(&self, item: &TxnItem, error: &HandleError) {
        if item.kind != ItemKind::Event {
            return;
        }
        let what = if item.event_type == "m.room.message" { "a message" } else { "an event" };
        self.ctx
            .notice(
                &item.lane,
                &format!(
                    "⚠️ The bridge could not deliver {what} ({}) and gave up: {}",
                    item.event_id.as_deref().unwrap_or("?"),
                    error.message
                ),
            )
            .await;
    }
}

fn api_error(e: &BridgeError) -> ApiError {
    ApiError::Internal(e.to_string())
}

#[async_trait]
impl<B: Bridge> QueryHandler for Glue<B> {
    async fn query_user(&self, user_id: &str) -> Result<bool, ApiError> {
        let Some(profile) = self.bridge.query_user(user_id).await.map_err(|e| api_error(&e))?
        else {
            return Ok(false);
        };
        self.ctx.ensure_ghost(user_id, &profile).await.map_err(|e| api_error(&e))?;
        Ok(true)
    }

    async fn query_alias(&self, alias: &str) -> Result<bool, ApiError> {
        let Some(spec) = self.bridge.query_alias(alias).await.map_err(|e| api_error(&e))? else {
            return Ok(false);
        };
        let (portal, created) =
            self.ctx.ensure_portal(&spec, Some(alias)).await.map_err(|e| api_error(&e))?;
        if !created {
            // The portal exists under another alias (or its alias was removed): add this one.
            if let Err(e) = self.ctx.bot().create_alias(alias, &portal.room_id).await
                && !e.is_errcode("M_UNKNOWN")
            {
                tracing::warn!(alias, error = %e, "could not add alias to existing portal");
            }
        }
        if spec.public {
            let _ = self
                .ctx
                .bot()
                .set_room_directory_visibility(&self.ctx.registration().id, &portal.room_id, true)
                .await;
        }
        if created {
            self.bridge.portal_created(&portal).await.map_err(|e| api_error(&e))?;
        }
        Ok(true)
    }

    async fn thirdparty_protocol(&self, protocol: &str) -> Result<Option<Value>, ApiError> {
        match self.bridge.third_party() {
            Some(tp) => tp.protocol(protocol).await.map_err(|e| api_error(&e)),
            None => Ok(None),
        }
    }

    async fn thirdparty_users(
        &self,
        protocol: Option<&str>,
        fields: &BTreeMap<String, String>,
    ) -> Result<Vec<Value>, ApiError> {
        match self.bridge.third_party() {
            Some(tp) => tp.users(protocol, fields).await.map_err(|e| api_error(&e)),
            None => Ok(Vec::new()),
        }
    }

    async fn thirdparty_locations(
        &self,
        protocol: Option<&str>,
        fields: &BTreeMap<String, String>,
    ) -> Result<Vec<Value>, ApiError> {
        match self.bridge.third_party() {
            Some(tp) => tp.locations(protocol, fields).await.map_err(|e| api_error(&e)),
            None => Ok(Vec::new()),
        }
    }
}
