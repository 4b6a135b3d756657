//! The Trestle side of the inbound benchmark: a bridge that does nothing with events, so what is
//! measured is the framework's inbound path (authentication, parsing, persisting every
//! transaction before its 200, per-room ordering, classification, dispatch). Handled events are
//! counted by the framework's `trestle_events_processed_total` — the counterpart of the counting
//! matrix-appservice-bridge bridge in `tests/bench/mab`.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use trestle::{
    bridge::{Bridge, BridgeError, BridgeInfo},
    config::{BridgeConfig, Config},
    context::Context,
    registration::{Namespace, Namespaces},
};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BenchConfig {}

impl BridgeConfig for BenchConfig {
    const EXAMPLE: &'static str = "  {}\n";
}

#[derive(Debug)]
struct BenchBridge;

#[async_trait]
impl Bridge for BenchBridge {
    type Config = BenchConfig;

    fn info() -> BridgeInfo {
        BridgeInfo {
            name: "bench",
            network_name: "Bench",
            default_port: 9999,
            protocols: &[],
            version: "0",
        }
    }

    fn namespaces(config: &Config<BenchConfig>) -> Namespaces {
        Namespaces {
            users: vec![Namespace::prefixed('@', "bench_", &config.homeserver.domain)],
            ..Namespaces::default()
        }
    }

    async fn start(_ctx: Context<BenchConfig>) -> Result<Self, BridgeError> {
        Ok(Self)
    }
}

fn main() -> std::process::ExitCode {
    trestle::run::<BenchBridge>()
}
