#!/usr/bin/env bash
# The demo: installs what is missing, starts a local Synapse and IRC server with the Trestle IRC
# bridge registered,
# shows a message crossing both ways, and leaves everything running (Ctrl-C stops it).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build -q -p trestle-irc -p trestle --bins --examples
cargo run -q -p trestle-e2e --bin demo
