//! Trestle: a framework for Matrix application-service bridges.
//!
//! # Layout
//!
//! - [`bridge`]: **the seam** — the [`Bridge`](bridge::Bridge) trait a bridge implements.
//! - [`context`]: what a bridge receives: config, store, intents, ghost and portal helpers.
//! - [`runtime`]: the command line and run loop every bridge binary shares.
//! - [`appservice`]: the homeserver → bridge HTTP API (axum), errors mapped to errcodes.
//! - [`inbound`]: the durable, ordered inbound queue (persist before 200, per-room lanes).
//! - [`client`]: the homeserver client and per-user intents, with retries and ordered sends.
//! - [`store`]: the [`Store`](store::Store) trait, the SQLite backend, secrets at rest.
//! - [`event`]: Matrix events parsed and classified for bridges.
//! - [`config`], [`registration`]: configuration and the registration file.
//! - [`commands`]: the bot's admin-room commands with permission levels.
//! - [`media`]: signed, expiring links to Matrix media.
//! - [`metrics`]: Prometheus metrics.
//! - [`util`]: helpers every bridge needs (escaping, formatting, splitting, reply fallbacks).
#![warn(missing_docs)]

pub mod appservice;
pub mod bridge;
pub mod client;
pub mod commands;
pub mod config;
pub mod context;
pub mod event;
pub mod fetch;
pub mod inbound;
pub mod media;
pub mod metrics;
pub mod registration;
pub mod runtime;
pub mod store;
pub mod util;

pub use runtime::run;
