#!/usr/bin/env bash
# Inbound-path benchmark: matrix-appservice-bridge (MAB) and Trestle side by side, same load.
#
#   scripts/bench-inbound.sh [--quick] [--transactions N] [--events-per-txn N] [--only mab|trestle]
#
# For each bridge and for 1 and 8 requests in flight: start a fresh bridge process pointed at the
# load generator's fake homeserver, send N transactions of Synapse-shaped m.room.message events
# (after a warm-up), wait until the bridge reports every event handled, stop the bridge. Prints a
# side-by-side markdown table with the Trestle/MAB ratios at the end. Results (JSON lines) and
# logs are kept in target/bench-inbound/<timestamp>/.
#
# Environment:
#   TRESTLE_BIN   Trestle bridge binary to benchmark (default: target/release/bench_bridge,
#                 a bridge that only lets the framework count events, built here).
#   SKIP_BUILD=1  Do not run cargo build / npm ci.
#   BENCH_NICE    Niceness of the benchmark processes (default 19). Both sides saturate the two
#                 cores with loopback traffic; at normal priority that starved the machine's own
#                 agent here. Niceness is the same for every process under test, so it is fair.
set -euo pipefail
renice -n "${BENCH_NICE:-19}" -p $$ >/dev/null

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TRANSACTIONS=15000
EVENTS_PER_TXN=100
ONLY=""
IN_FLIGHTS=(1 8)

while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) TRANSACTIONS=2000; shift ;;
        --transactions) TRANSACTIONS="$2"; shift 2 ;;
        --events-per-txn) EVENTS_PER_TXN="$2"; shift 2 ;;
        --only) ONLY="$2"; shift 2 ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

OUT="$ROOT/target/bench-inbound/$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
BENCH="$ROOT/target/release/bench_inbound"
MAB_DIR="$ROOT/tests/bench/mab"
TRESTLE_BIN="${TRESTLE_BIN:-$ROOT/target/release/bench_bridge}"

log() { printf '== %s\n' "$*" >&2; }

# --- process bookkeeping: only the processes started here are ever signalled -------------------
FAKEHS_PID=""
BRIDGE_PID=""

stop_pid() {
    local pid="$1"
    [[ -n "$pid" ]] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "pid $pid did not stop on SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    stop_pid "$BRIDGE_PID"
    BRIDGE_PID=""
    stop_pid "$FAKEHS_PID"
    FAKEHS_PID=""
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

random_token() { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'; }

# wait_for CMD... : retry for up to 30 s.
wait_for() {
    for _ in $(seq 1 300); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        if [[ -n "$BRIDGE_PID" ]] && ! kill -0 "$BRIDGE_PID" 2>/dev/null; then return 1; fi
        sleep 0.1
    done
    return 1
}

# --- build ------------------------------------------------------------------------------------
HAVE_TRESTLE=0
if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    log "building the load generator (release)"
    (cd "$ROOT" && cargo build --release -p trestle-e2e --bin bench_inbound)
    if [[ "$ONLY" != mab && "$TRESTLE_BIN" == "$ROOT/target/release/bench_bridge" ]]; then
        log "building the Trestle bench bridge (release)"
        (cd "$ROOT" && cargo build --release -p trestle-e2e --bin bench_bridge)
    fi
    if [[ "$ONLY" != trestle ]]; then
        log "installing matrix-appservice-bridge (npm ci)"
        (cd "$MAB_DIR" && npm ci --no-audit --no-fund --loglevel=error)
    fi
fi
[[ -x "$TRESTLE_BIN" ]] && HAVE_TRESTLE=1

# --- fake homeserver --------------------------------------------------------------------------
"$BENCH" fake-hs --port-file "$OUT/fakehs.port" 2>"$OUT/fakehs.log" &
FAKEHS_PID=$!
wait_for test -s "$OUT/fakehs.port" || { log "fake homeserver did not start"; cat "$OUT/fakehs.log" >&2; exit 1; }
FAKEHS_PORT=$(cat "$OUT/fakehs.port")
FAKEHS_URL="http://127.0.0.1:$FAKEHS_PORT"
log "fake homeserver on $FAKEHS_URL"

# run_load LABEL IN_FLIGHT TARGET HS_TOKEN COUNT_URL
run_load() {
    "$BENCH" load --label "$1" --in-flight "$2" --target "$3" --hs-token "$4" --count-url "$5" \
        --pid "$BRIDGE_PID" --transactions "$TRANSACTIONS" --events-per-txn "$EVENTS_PER_TXN" \
        --json-out "$RESULTS"
}

# --- matrix-appservice-bridge -----------------------------------------------------------------
# Sets BRIDGE_PID, MAB_URL, MAB_COUNT_URL, MAB_HS_TOKEN.
start_mab() {
    local log_file="$1" port count_port
    port=$(free_port)
    count_port=$(free_port)
    MAB_HS_TOKEN=$(random_token)
    node "$MAB_DIR/bridge.js" --port "$port" --count-port "$count_port" \
        --homeserver "$FAKEHS_URL" --hs-token "$MAB_HS_TOKEN" --as-token "$(random_token)" \
        >"$log_file" 2>&1 &
    BRIDGE_PID=$!
    MAB_URL="http://127.0.0.1:$port"
    MAB_COUNT_URL="http://127.0.0.1:$count_port/"
    if ! wait_for grep -q "mab-bench: listening" "$log_file"; then
        log "matrix-appservice-bridge did not start:"; cat "$log_file" >&2; return 1
    fi
}

run_mab() {
    local mab_version node_version
    mab_version=$(node -p 'require(process.argv[1]).version' "$MAB_DIR/node_modules/matrix-appservice-bridge/package.json")
    node_version=$(node --version)
    log "matrix-appservice-bridge $mab_version on node $node_version"
    for f in "${IN_FLIGHTS[@]}"; do
        start_mab "$OUT/mab-$f.log"
        run_load mab "$f" "$MAB_URL" "$MAB_HS_TOKEN" "$MAB_COUNT_URL"
        stop_pid "$BRIDGE_PID"; BRIDGE_PID=""
    done
}

# --- Trestle ----------------------------------------------------------------------------------
# HOOK: start_trestle CONFIG LOG — start our bench bridge with the given config, set BRIDGE_PID
# to the bridge process itself (not a wrapper: its /proc entry is sampled for RSS and CPU) and
# return once it accepts connections. Swap the binary through TRESTLE_BIN, or edit this function
# for a dedicated counting example.
start_trestle() {
    local config="$1" log_file="$2"
    "$TRESTLE_BIN" run -c "$config" >"$log_file" 2>&1 &
    BRIDGE_PID=$!
    if ! wait_for curl -sf "http://127.0.0.1:$TRESTLE_PORT/health/live"; then
        log "Trestle did not start:"; cat "$log_file" >&2; return 1
    fi
}

# write_trestle_config DIR PORT — writes DIR/config.yaml and DIR/reg.yaml, sets TRESTLE_HS_TOKEN.
write_trestle_config() {
    local dir="$1" port="$2"
    mkdir -p "$dir"
    cat >"$dir/config.yaml" <<EOF
homeserver: { url: "$FAKEHS_URL", domain: localhost }
appservice: { id: bench, listen: "127.0.0.1:$port", url: "http://127.0.0.1:$port", bot_localpart: benchbot, registration: $dir/reg.yaml }
database: { path: $dir/bench.db }
logging: { level: warn, format: human }
metrics: { enabled: true }
permissions: { "*": user }
bridge: {}
EOF
    "$TRESTLE_BIN" generate-registration -c "$dir/config.yaml" -o "$dir/reg.yaml" >/dev/null
    TRESTLE_HS_TOKEN=$(sed -n 's/^hs_token: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' "$dir/reg.yaml")
    [[ -n "$TRESTLE_HS_TOKEN" ]] || { log "no hs_token in $dir/reg.yaml"; return 1; }
}

run_trestle() {
    log "Trestle: $TRESTLE_BIN"
    for f in "${IN_FLIGHTS[@]}"; do
        TRESTLE_PORT=$(free_port)
        # A fresh database per run: every run starts from the same empty state.
        write_trestle_config "$OUT/trestle-$f" "$TRESTLE_PORT"
        start_trestle "$OUT/trestle-$f/config.yaml" "$OUT/trestle-$f.log"
        run_load trestle "$f" "http://127.0.0.1:$TRESTLE_PORT" "$TRESTLE_HS_TOKEN" \
            "http://127.0.0.1:$TRESTLE_PORT/metrics"
        stop_pid "$BRIDGE_PID"; BRIDGE_PID=""
    done
}

# --- run --------------------------------------------------------------------------------------
log "machine: $(nproc) cores, $(uname -sr); $TRANSACTIONS transactions x $EVENTS_PER_TXN events per run"
[[ "$ONLY" == trestle ]] || run_mab
if [[ "$ONLY" != mab ]]; then
    if [[ "$HAVE_TRESTLE" == 1 ]]; then
        run_trestle
    else
        log "Trestle bridge binary not found at $TRESTLE_BIN: only the MAB half was run"
    fi
fi

stop_pid "$FAKEHS_PID"; FAKEHS_PID=""
log "homeserver endpoints the bridges called (fake-hs log):"
grep -v 'first ' "$OUT/fakehs.log" >&2 || true

echo
"$BENCH" compare --results "$RESULTS"
log "results: $RESULTS"
