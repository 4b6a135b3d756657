#!/usr/bin/env bash
# Runs every test: unit tests, in-process HTTP tests, and the end-to-end tests against a real
# Synapse (and the IRC, XMPP and SMS servers), installing what is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
echo "[test] building the workspace"
cargo build --workspace --all-targets --locked
echo "[test] running the tests"
cargo test --workspace --all-targets --locked -- --test-threads="${TRESTLE_TEST_THREADS:-4}"
