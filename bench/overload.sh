#!/usr/bin/env bash
# Overload-isolation suite (issue 11): Millet, then Mosquitto, freshly
# started for every scenario, through each scenario of `millet-bench overload`; the table goes
# into BENCHMARKS.md (the section between the overload markers).
#
# Usage: bench/overload.sh [--quick] [--skip-build] [--scenario LIST] [--no-report]
#
#   --quick          small counts and short phases (about a minute per broker)
#   --skip-build     use the existing release binaries
#   --scenario LIST  comma-separated scenario names (default: all)
#   --no-report      leave BENCHMARKS.md alone
#
# Binaries: $MILLET_BIN / $MILLET_BENCH_BIN, else ${CARGO_TARGET_DIR:-target}/release/.
# Brokers: Millet with its default configuration (`--listen`, `--data-dir` in a
# temporary directory, MILLET_LOG=warn) except `--memory-budget`, set to the
# RSS budget the suite judges against ($RSS_BUDGET_MIB, default 512 MiB: the
# target is "RSS within the configured budget"); Mosquitto with a listener,
# allow_anonymous and `log_type error`, everything else default.
# Output: bench/results/overload-<broker>-<scenario>.json (overload-quick-... with --quick).
# The attacker's client threads run at nice 19 (millet-bench's --attacker-nice: on a
# real deployment it is another machine; see crates/millet-bench/src/overload.rs).
# Extra millet-bench overload flags: $OVERLOAD_ARGS (e.g. "--rss-budget-mib 256",
# "--attacker-nice 0").
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1

QUICK=""
BUILD=1
REPORT=1
SCENARIO=all
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK="--quick" ;;
        --skip-build) BUILD=0 ;;
        --no-report) REPORT=0 ;;
        --scenario)
            SCENARIO="$2"
            shift
            ;;
        -h | --help)
            sed -n '2,18p' "$0"
            exit 0
            ;;
        *)
            echo "unknown argument: $1" >&2
            exit 2
            ;;
    esac
    shift
done

TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
BENCH="${MILLET_BENCH_BIN:-$TARGET/release/millet-bench}"
MILLET="${MILLET_BIN:-$TARGET/release/millet}"
MOSQUITTO="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
RESULTS="$ROOT/bench/results"
WORK="$(mktemp -d /tmp/millet-overload.XXXXXX)"
PORT="${OVERLOAD_PORT:-22883}"
BROKER_PID=""

log() { echo "[overload $(date +%H:%M:%S)] $*" >&2; }

# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

if [ "$BUILD" = 1 ]; then
    log "building millet and millet-bench (release)"
    cargo build --release -p millet -p millet-bench >"$WORK/build.log" 2>&1 || {
        tail -30 "$WORK/build.log" >&2
        exit 1
    }
fi
for b in "$BENCH" "$MILLET" "$MOSQUITTO"; do
    [ -x "$b" ] || {
        log "missing $b"
        exit 1
    }
done
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
for _ in $(seq 1 20); do
    port_open "$PORT" || break
    PORT=$((PORT + 2))
done
mkdir -p "$RESULTS"
chmod 755 "$WORK"
cat >"$WORK/mosquitto.conf" <<CONF
listener $PORT 127.0.0.1
allow_anonymous true
log_dest stderr
log_type error
CONF
chmod 644 "$WORK/mosquitto.conf"

RSS_BUDGET_MIB="${RSS_BUDGET_MIB:-512}"
MILLET_CMD="MILLET_LOG=warn $MILLET --listen 127.0.0.1:$PORT --data-dir DIR --memory-budget $((RSS_BUDGET_MIB << 20))"
MOSQ_CMD="$MOSQUITTO -c mosquitto.conf  # listener $PORT 127.0.0.1; allow_anonymous true; log_type error"
tag="overload${QUICK:+-quick}"
if [ "$SCENARIO" = all ]; then
    SCENARIO="stalled-subscriber,offline-queues,cpu-heavy,outbound-aliases,inbound-aliases,big-offline-qos0,retained-flood,preauth-hog"
fi
files=()
start_broker() {
    case "$1" in
        millet)
            rm -rf "$WORK/millet-data"
            mkdir -p "$WORK/millet-data"
            MILLET_LOG=warn "$MILLET" --listen "127.0.0.1:$PORT" --data-dir "$WORK/millet-data" \
                --memory-budget $((RSS_BUDGET_MIB << 20)) >>"$WORK/millet.log" 2>&1 &
            ;;
        mosquitto)
            "$MOSQUITTO" -c "$WORK/mosquitto.conf" >>"$WORK/mosquitto.log" 2>&1 &
            ;;
    esac
    BROKER_PID=$!
    for _ in $(seq 1 100); do
        port_open "$PORT" && return 0
        sleep 0.1
    done
    return 1
}
# A fresh broker for every scenario: each one's peak RSS is its own (freed
# memory is not always given back to the OS).
for broker in millet mosquitto; do
    for sc in ${SCENARIO//,/ }; do
        if ! start_broker "$broker"; then
            log "$broker did not start"
            tail -20 "$WORK/$broker.log" >&2
            stop_broker
            continue
        fi
        out="$RESULTS/$tag-$broker-$sc.json"
        rm -f "$out"
        log "$broker (pid $BROKER_PID, port $PORT): millet-bench overload $QUICK --scenario $sc"
        # shellcheck disable=SC2086
        timeout 600 "$BENCH" --port "$PORT" --label "$broker" --json-out "$out" \
            overload $QUICK --scenario "$sc" --broker-pid "$BROKER_PID" --rss-budget-mib "$RSS_BUDGET_MIB" ${OVERLOAD_ARGS:-} >/dev/null ||
            log "$broker: millet-bench exited with $?"
        kill -0 "$BROKER_PID" 2>/dev/null || log "$broker died during $sc"
        stop_broker
        [ -s "$out" ] && files+=("$out")
        sleep 1
    done
    grep -v "session queue full" "$WORK/$broker.log" | tail -5 >&2
done

if [ "$REPORT" = 1 ] && [ "${#files[@]}" -gt 0 ]; then
    intro="Generated by \`bench/overload.sh${QUICK:+ $QUICK}\` on $(date -u +%Y-%m-%d) ($(nproc) CPUs, shared machine: other builds and tests may run at the same time). Brokers one after the other on 127.0.0.1, freshly started for every scenario: \`$MILLET_CMD\` (default configuration, but its memory budget set to the RSS budget below) and \`$MOSQ_CMD\` (everything else default: persistence off, max_queued_messages 1000, QoS 0 not queued for offline clients). Raw results: \`bench/results/$tag-<broker>-<scenario>.json\`."
    "$BENCH" overload-report "${files[@]}" --splice "$ROOT/BENCHMARKS.md" --intro "$intro"
fi
