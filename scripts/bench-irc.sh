#!/usr/bin/env bash
# IRC scale benchmark: connections (time to connect, memory per connection) and message latency
# through Synapse and trestle-irc (puppet mode). Prints markdown rows for the README.
#
#   scripts/bench-irc.sh [N ...]      (default: 1000 10000)
#   IRC_SERVER=ngircd scripts/bench-irc.sh   (default: inspircd)
#
# Needs InspIRCd or ngIRCd and the Synapse venv (scripts/install-deps.sh). Runs at nice 10.
set -euo pipefail
cd "$(dirname "$0")/.."
renice -n 10 -p $$ >/dev/null
sizes=("$@"); [ ${#sizes[@]} -gt 0 ] || sizes=(1000 10000)
[ -n "${SKIP_BUILD:-}" ] || cargo build -q --release -p trestle-e2e --bin bench_irc -p trestle-irc
bin=${CARGO_TARGET_DIR:-target}/release/bench_irc
echo "| connections | time to connect s | connections/s | process RSS MiB | KiB per connection | KiB per connection after 60 s idle |"
echo "|---|---|---|---|---|---|"
for n in "${sizes[@]}"; do
  "$bin" --server "${IRC_SERVER:-inspircd}" connections --n "$n" --idle 60
done
echo
echo "| path | messages | p50 ms | p99 ms | max ms |"
echo "|---|---|---|---|---|"
TRESTLE_PROFILE=release "$bin" --server "${IRC_SERVER:-inspircd}" latency --messages 200
