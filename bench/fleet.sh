#!/usr/bin/env bash
# Device-fleet comparison: `millet-bench fleet` against Millet and Mosquitto,
# same parameters, one broker at a time, each freshly started.
#
# Usage: bench/fleet.sh [options]
#
#   --devices N      devices (default 18000: the open-files limit here is
#                    20,000 per process; the spec's shape is 100,000)
#   --rate R         device connections per second (default 2000)
#   --interval S     telemetry period per device, seconds (default 10)
#   --cmd-pct P      % of devices commanded per second (default 1)
#   --warmup S       warm-up after connecting, seconds (default 15)
#   --window S       measured window, seconds (default 60)
#   --version 4|5    MQTT version (default 4 = 3.1.1)
#   --clean          clean sessions (default: persistent sessions)
#   --brokers LIST   comma-separated, default millet,mosquitto-persist,mosquitto;
#                    also millet-interval, millet-none (Millet --durability
#                    interval / none: shown as extra columns)
#   --runs K         runs per broker, alternating (default 1)
#   --no-pinned      do not pin (default: broker `taskset -c 0`, tool
#                    `taskset -c 1 ... --threads 1`)
#   --skip-build     use the existing target/release binaries
#   --results DIR    where the JSON results go (default bench/results); files
#                    are named fleet__fleet__<broker>__r<K>.json, which
#                    `millet-bench report` renders into BENCHMARKS.md
#
# Brokers: millet = target/release/millet with its defaults (embedded store,
# --durability sync); mosquitto-persist = Mosquitto with `persistence true`,
# `autosave_interval 1` (as compare.sh's durability pass); mosquitto =
# Mosquitto in memory only. Both log errors and warnings only.
#
# Prints the markdown table (`millet-bench report --section fleet`) at the end.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1

DEVICES=18000 RATE=2000 INTERVAL=10 CMD_PCT=1 WARMUP=15 WINDOW=60 VERSION=4
CLEAN=false BROKERS=millet,mosquitto-persist,mosquitto RUNS=1 PINNED=1 BUILD=1
RESULTS="$ROOT/bench/results"
while [ $# -gt 0 ]; do
    case "$1" in
        --devices) DEVICES="$2"; shift ;;
        --rate) RATE="$2"; shift ;;
        --interval) INTERVAL="$2"; shift ;;
        --cmd-pct) CMD_PCT="$2"; shift ;;
        --warmup) WARMUP="$2"; shift ;;
        --window) WINDOW="$2"; shift ;;
        --version) VERSION="$2"; shift ;;
        --clean) CLEAN=true ;;
        --brokers) BROKERS="$2"; shift ;;
        --runs) RUNS="$2"; shift ;;
        --no-pinned) PINNED=0 ;;
        --skip-build) BUILD=0 ;;
        --results) RESULTS="$2"; shift ;;
        -h | --help)
            sed -n '2,30p' "$0"
            exit 0
            ;;
        *)
            echo "unknown argument: $1" >&2
            exit 2
            ;;
    esac
    shift
done

BENCH="${MILLET_BENCH_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/millet-bench}"
MILLET="${MILLET_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/millet}"
MOSQUITTO="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
PORT="${FLEET_PORT:-21890}"
WORK="$(mktemp -d /tmp/millet-fleet.XXXXXX)"
BROKER_PID=""
log() { echo "[fleet $(date +%H:%M:%S)] $*" >&2; }

# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

if [ "$BUILD" = 1 ]; then
    log "building millet and millet-bench (release)"
    nice -n 10 cargo build --release -p millet -p millet-bench >"$WORK/build.log" 2>&1 || {
        tail -20 "$WORK/build.log" >&2
        exit 1
    }
fi
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE="$(ulimit -n)"
if [ "$DEVICES" -gt $((NOFILE - 200)) ]; then
    log "warning: $DEVICES devices but the open-files limit is $NOFILE"
fi
for _ in $(seq 1 20); do
    port_open "$PORT" || break
    PORT=$((PORT + 1))
done
PIN_B=() PIN_T=() THREADS=2
if [ "$PINNED" = 1 ] && command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
    PIN_B=(taskset -c 0) PIN_T=(taskset -c 1) THREADS=1
fi

chmod 755 "$WORK"
cat >"$WORK/mosquitto.conf" <<EOF
listener $PORT 127.0.0.1
allow_anonymous true
max_connections -1
max_inflight_messages 32
log_dest stderr
log_type error
log_type warning
EOF
mkdir -p "$WORK/mosq-persist" && chmod 777 "$WORK/mosq-persist"
{
    cat "$WORK/mosquitto.conf"
    echo "persistence true"
    echo "persistence_location $WORK/mosq-persist/"
    echo "autosave_interval 1"
} >"$WORK/mosquitto-persist.conf"
chmod 644 "$WORK"/*.conf

start_broker() { # NAME
    case "$1" in
        millet | millet-sync | millet-interval | millet-none)
            local durability=()
            [ "$1" != millet ] && durability=(--durability "${1#millet-}")
            rm -rf "$WORK/millet-data"
            MILLET_LOG=warn "${PIN_B[@]}" "$MILLET" --listen "127.0.0.1:$PORT" \
                --data-dir "$WORK/millet-data" "${durability[@]}" >"$WORK/broker.log" 2>&1 &
            ;;
        mosquitto-persist)
            rm -rf "$WORK/mosq-persist"/*
            "${PIN_B[@]}" "$MOSQUITTO" -c "$WORK/mosquitto-persist.conf" >"$WORK/broker.log" 2>&1 &
            ;;
        mosquitto)
            "${PIN_B[@]}" "$MOSQUITTO" -c "$WORK/mosquitto.conf" >"$WORK/broker.log" 2>&1 &
            ;;
        *)
            log "unknown broker $1"
            return 1
            ;;
    esac
    BROKER_PID=$!
    for _ in $(seq 1 100); do
        kill -0 "$BROKER_PID" 2>/dev/null || return 1
        port_open "$PORT" && return 0
        sleep 0.1
    done
    return 1
}

# Let the previous run's sockets leave TIME_WAIT (Linux keeps them 60 s) so
# that every run starts from the same state.
wait_time_wait() {
    local n
    for _ in $(seq 1 75); do
        n=$(ss -tan state time-wait "( sport = :$PORT or dport = :$PORT )" 2>/dev/null | tail -n +2 | wc -l)
        [ "$n" -lt 1000 ] && return
        sleep 1
    done
    log "still $n sockets in TIME_WAIT"
}

mkdir -p "$RESULTS"
rm -f "$RESULTS"/fleet__*.json
CLEAN_ARG=()
[ "$CLEAN" = true ] && CLEAN_ARG=(--clean true)
IFS=, read -r -a LIST <<<"$BROKERS"
for run in $(seq 1 "$RUNS"); do
    for b in "${LIST[@]}"; do
        out="$RESULTS/fleet__fleet__${b}__r${run}.json"
        wait_time_wait
        if ! start_broker "$b"; then
            printf '{"unavailable":"%s did not start: %s"}\n' "$b" "$(tail -2 "$WORK/broker.log" | tr '\n"' ' ')" >"$out"
            stop_broker
            continue
        fi
        log "$b#$run (pid $BROKER_PID, port $PORT): $DEVICES devices"
        timeout 900 "${PIN_T[@]}" "$BENCH" --port "$PORT" --threads "$THREADS" --label "$b" \
            --case fleet --json-out "$out" fleet -n "$DEVICES" --rate "$RATE" \
            --interval "$INTERVAL" --cmd-pct "$CMD_PCT" --warmup "$WARMUP" --window "$WINDOW" \
            --version "$VERSION" "${CLEAN_ARG[@]}" --broker-pid "$BROKER_PID" \
            >/dev/null 2>"$WORK/run.log"
        rc=$?
        grep -v '^\[' "$WORK/run.log" | sed 's/^/    /' >&2
        if ! kill -0 "$BROKER_PID" 2>/dev/null; then
            printf '{"unavailable":"%s died during the run (exit %s)"}\n' "$b" "$rc" >"$out"
            BROKER_PID=""
        elif ! [ -s "$out" ]; then
            printf '{"unavailable":"millet-bench exit %s"}\n' "$rc" >"$out"
        fi
        stop_broker
    done
done

{
    echo "fleet: $DEVICES devices, MQTT $VERSION, clean=$CLEAN, telemetry every ${INTERVAL}s, commands ${CMD_PCT}%/s, warm-up ${WARMUP}s, window ${WINDOW}s, pinned=$PINNED, open-files limit $NOFILE"
    echo "command: bench/fleet.sh --devices $DEVICES --rate $RATE --interval $INTERVAL --cmd-pct $CMD_PCT --warmup $WARMUP --window $WINDOW --version $VERSION$([ "$CLEAN" = true ] && echo ' --clean')$([ "$PINNED" = 0 ] && echo ' --no-pinned')"
} >"$RESULTS/fleet-params.txt"
cat "$RESULTS/fleet-params.txt"
"$BENCH" report --results "$RESULTS" --section fleet
