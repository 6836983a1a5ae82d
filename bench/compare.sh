#!/usr/bin/env bash
# Race Millet against Mosquitto with millet-bench and write BENCHMARKS.md.
#
# Usage: bench/compare.sh [--quick] [--no-pinned] [--skip-build] [--only LIST]
#
#   --quick       small counts (CI smoke test, ~2 minutes)
#   --no-pinned   skip the taskset pass (broker on CPU 0, load tool on CPU 1)
#   --skip-build  use the existing target/release binaries
#   --only LIST   run only these passes (comma-separated: default, durability,
#                 pinned, idle, scale, fleet, cluster, ws) and keep the other passes'
#                 results in bench/results (BENCHMARKS.md is regenerated from
#                 all of them; the new passes' date and notes go to
#                 bench/results/meta-<pass>.json)
#
# Idle pass: broker memory per idle connection, plain TCP and TLS (a throwaway
# CA and server certificate made with openssl; both brokers use the same).
# Scale pass: ~19,000 idle connections (the "100k" scenario at this machine's
# open-files limit of 20,000 per process), from 4 source addresses.
# Fleet pass: bench/fleet.sh (devices with persistent sessions, QoS 1
# telemetry and commands; Millet vs Mosquitto with and without persistence).
# Before every connection case the script waits (at most 60 s) until fewer
# than 1,000 sockets are in TIME_WAIT and logs the listen-queue counters
# (nstat TcpExtListenOverflows / TcpExtListenDrops) around it.
#
# WebSocket pass (only with --only ws): the clients of QoS 0 fan-in and of
# QoS 1 at 1,000 msg/s over ws:// (millet-bench --transport ws: one masked
# binary frame per MQTT packet, like MQTT.js); Mosquitto's websockets
# listener (libwebsockets) against Millet's ws_listen.
#
# Durability pass: QoS 1 to a persistent session (millet-bench scenario
# qos1-persistent) against Millet with --durability sync / interval / none and
# Mosquitto with persistence (autosave_interval 1).
#
# Output: bench/results/*.json (one file per pass/case/broker plus meta.json),
# BENCHMARKS.md at the repository root and the chart bench/results.png.
# Millet may not start (or not build) yet: its cells are then "n/a" and the
# Mosquitto column is produced anyway. Everything talks to 127.0.0.1 only and
# every run is bounded by `timeout`.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1

MODE=full
PINNED=1
BUILD=1
ONLY=""
EXPECT_ONLY=0
for arg in "$@"; do
    if [ "$EXPECT_ONLY" = 1 ]; then
        ONLY="$arg"
        EXPECT_ONLY=0
        continue
    fi
    case "$arg" in
        --quick) MODE=quick ;;
        --no-pinned) PINNED=0 ;;
        --skip-build) BUILD=0 ;;
        --only) EXPECT_ONLY=1 ;;
        --only=*) ONLY="${arg#--only=}" ;;
        -h | --help)
            sed -n '2,33p' "$0"
            exit 0
            ;;
        *)
            echo "unknown argument: $arg" >&2
            exit 2
            ;;
    esac
done

RESULTS="$ROOT/bench/results"
# wanted PASS: is this pass part of the run?
wanted() {
    if [ -z "$ONLY" ]; then
        case "$1" in default | durability | pinned | idle | scale) return 0 ;; *) return 1 ;; esac
    fi
    [[ ",$ONLY," == *",$1,"* ]]
}
WORK="$(mktemp -d /tmp/millet-compare.XXXXXX)"
BENCH="${MILLET_BENCH_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/millet-bench}"
MILLET="${MILLET_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/millet}"
MOSQ_PORT="${MOSQ_PORT:-21883}"
MILLET_PORT="${MILLET_PORT:-21884}"
MOSQ_TLS_PORT="${MOSQ_TLS_PORT:-28883}"
MILLET_TLS_PORT="${MILLET_TLS_PORT:-28884}"
MOSQ_WS_PORT="${MOSQ_WS_PORT:-28083}"
MILLET_WS_PORT="${MILLET_WS_PORT:-28084}"
TLS=0
WS=0
BROKER_PID=""
NOTES=()
START_TS=$(date +%s)

log() { echo "[compare $(date +%H:%M:%S)] $*" >&2; }

# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

json_escape() {
    local s="$1"
    s="${s//\\/\\\\}"
    s="${s//\"/\\\"}"
    s="${s//$'\t'/ }"
    s="${s//$'\n'/ }"
    printf '%s' "$s"
}

# ---------------------------------------------------------------- setup
if ! [ -x /usr/sbin/mosquitto ] && ! command -v mosquitto >/dev/null 2>&1; then
    log "installing mosquitto (apt-get)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null ||
        {
            log "cannot install mosquitto"
            exit 1
        }
    # Do not leave a system broker running on 1883.
    service mosquitto stop >/dev/null 2>&1 || true
fi
MOSQUITTO="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
MOSQ_VERSION="$("$MOSQUITTO" -h 2>/dev/null | head -1 | sed 's/^mosquitto version //')"

MILLET_STATUS="built"
if [ "$BUILD" = 1 ]; then
    log "building millet-bench (release)"
    if ! nice -n 10 cargo build --release -p millet-bench >"$WORK/bench-build.log" 2>&1; then
        tail -30 "$WORK/bench-build.log" >&2
        log "millet-bench does not build"
        exit 1
    fi
    log "building millet (release)"
    if ! nice -n 10 cargo build --release -p millet >"$WORK/millet-build.log" 2>&1; then
        MILLET_STATUS="build failed"
        NOTES+=("Millet did not build: $(grep -m1 '^error' "$WORK/millet-build.log" || echo 'see cargo output')")
        log "millet does not build; its column will be n/a"
    fi
fi
[ -x "$BENCH" ] || {
    log "missing $BENCH"
    exit 1
}
if [ "$MILLET_STATUS" = built ] && ! [ -x "$MILLET" ]; then
    MILLET_STATUS="binary missing"
fi

# Every connection is a file descriptor, in the broker and in the tool.
ulimit -n 200000 2>/dev/null || ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE="$(ulimit -n)"

for var in MOSQ_PORT MILLET_PORT MOSQ_TLS_PORT MILLET_TLS_PORT MOSQ_WS_PORT MILLET_WS_PORT; do
    p="${!var}"
    for _ in $(seq 1 20); do
        port_open "$p" || break
        p=$((p + 2))
    done
    printf -v "$var" '%s' "$p"
done

if [ "$MODE" = quick ]; then
    N_FANIN=10000 N_Q1=10000 N_Q1OV=10000 FANOUT_SUBS=200 FANOUT_N=50
    LAT_DUR=3s CONN_SMALL=1000 CONN_BIG=0 CONN_RATE=1000 HOLD=2s
    SMALL_CASE=conn-10k REPEAT=1 N_PERSIST=10000 DUR_REPEAT=1
    N_IDLE=1000 N_SCALE=2000 FLEET_ARGS=(--devices 1000 --warmup 5 --window 10)
else
    N_FANIN=50000 N_Q1=50000 N_Q1OV=50000 FANOUT_SUBS=1000 FANOUT_N=300
    LAT_DUR=10s CONN_SMALL=10000 CONN_BIG=50000 CONN_RATE=5000 HOLD=5s
    SMALL_CASE=conn-10k REPEAT=3 N_PERSIST=25000 DUR_REPEAT=3
    N_IDLE=10000 N_SCALE=19000 FLEET_ARGS=(--devices 18000 --warmup 15 --window 60 --runs 3)
fi

mkdir -p "$RESULTS"
if [ -z "$ONLY" ]; then
    # (bench/overload.sh owns overload-*.json)
    find "$RESULTS" -maxdepth 1 -name "*.json" ! -name "overload-*" -delete 2>/dev/null
else
    IFS=, read -r -a only_list <<<"$ONLY"
    for p in "${only_list[@]}"; do rm -f "$RESULTS/${p}__"*.json "$RESULTS/meta-$p.json"; done
fi

MOSQ_CONF="$WORK/mosquitto.conf"
cat >"$MOSQ_CONF" <<EOF
listener $MOSQ_PORT 127.0.0.1
allow_anonymous true
max_connections -1
max_inflight_messages 32
log_dest stderr
log_type error
log_type warning
EOF
MOSQ_CONF_TEXT="listener $MOSQ_PORT 127.0.0.1; allow_anonymous true; max_connections -1; max_inflight_messages 32; log_type error+warning"
# Mosquitto's WebSocket listener (ws pass), next to its TCP one.
MOSQ_WS_CONF="$WORK/mosquitto-ws.conf"
{
    cat "$MOSQ_CONF"
    echo "listener $MOSQ_WS_PORT 127.0.0.1"
    echo "protocol websockets"
} >"$MOSQ_WS_CONF"
# Mosquitto with persistence for the durability pass: an in-memory broker that
# writes a snapshot of everything every autosave_interval seconds (and at exit).
# The directory must be writable after it drops privileges to user mosquitto.
MOSQ_PERSIST_DIR="$WORK/mosquitto-persist/"
MOSQ_PERSIST_CONF="$WORK/mosquitto-persist.conf"
chmod 755 "$WORK"
{
    cat "$MOSQ_CONF"
    echo "persistence true"
    echo "persistence_location $MOSQ_PERSIST_DIR"
    echo "autosave_interval 1"
} >"$MOSQ_PERSIST_CONF"
chmod 644 "$MOSQ_CONF" "$MOSQ_PERSIST_CONF" "$MOSQ_WS_CONF"
MOSQ_PERSIST_CONF_TEXT="$MOSQ_CONF_TEXT; persistence true; persistence_location DIR; autosave_interval 1"

# TLS (idle pass): a throwaway CA and a P-256 server certificate for
# localhost / 127.0.0.1, used by both brokers.
make_certs() {
    local d="$WORK/tls"
    mkdir -p "$d" && chmod 755 "$d"
    (
        cd "$d" || exit 1
        openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=bench CA" \
            -keyout ca.key -out ca.csr &&
            printf 'basicConstraints = critical, CA:TRUE\nkeyUsage = critical, keyCertSign, cRLSign\n' >ca.ext &&
            openssl x509 -req -in ca.csr -signkey ca.key -days 30 -extfile ca.ext -out ca.pem &&
            openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
                -keyout server.key -out server.csr &&
            printf 'subjectAltName = DNS:localhost, IP:127.0.0.1\nextendedKeyUsage = serverAuth\n' >server.ext &&
            openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 \
                -extfile server.ext -out server.pem
    ) >"$WORK/openssl.log" 2>&1 || return 1
    chmod 644 "$d"/*
    {
        cat "$MOSQ_CONF"
        echo "listener $MOSQ_TLS_PORT 127.0.0.1"
        echo "cafile $d/ca.pem"
        echo "certfile $d/server.pem"
        echo "keyfile $d/server.key"
    } >"$WORK/mosquitto-tls.conf"
    cat >"$WORK/millet-tls.toml" <<EOF2
listen = ["127.0.0.1:$MILLET_PORT"]
tls_listen = ["127.0.0.1:$MILLET_TLS_PORT"]

[security.tls]
cert = "$d/server.pem"
key = "$d/server.key"
EOF2
    chmod 644 "$WORK/mosquitto-tls.conf" "$WORK/millet-tls.toml"
}
log "Mosquitto $MOSQ_VERSION: max_queued_messages left at its default (1000 per client)"

# ------------------------------------------------------------- brokers
# start_broker NAME PASS -> sets BROKER_PID and PORT, returns 1 (with the
# reason in $WORK/reason) when the broker does not come up.
start_broker() {
    local name="$1" pass="$2" pin=()
    if [ "$pass" = pinned ]; then pin=(taskset -c 0); fi
    : >"$WORK/reason"
    case "$name" in
        mosquitto)
            PORT="$MOSQ_PORT"
            local conf="$MOSQ_CONF"
            if [ "$TLS" = 1 ]; then
                PORT="$MOSQ_TLS_PORT"
                conf="$WORK/mosquitto-tls.conf"
            fi
            if [ "$WS" = 1 ]; then
                PORT="$MOSQ_WS_PORT"
                conf="$MOSQ_WS_CONF"
            fi
            "${pin[@]}" "$MOSQUITTO" -c "$conf" >"$WORK/mosquitto.log" 2>&1 &
            BROKER_PID=$!
            ;;
        mosquitto-persist)
            PORT="$MOSQ_PORT"
            rm -rf "$MOSQ_PERSIST_DIR"
            mkdir -p "$MOSQ_PERSIST_DIR" && chmod 777 "$MOSQ_PERSIST_DIR"
            "${pin[@]}" "$MOSQUITTO" -c "$MOSQ_PERSIST_CONF" >"$WORK/$name.log" 2>&1 &
            BROKER_PID=$!
            ;;
        millet | millet-sync | millet-interval | millet-none)
            PORT="$MILLET_PORT"
            if [ "$MILLET_STATUS" != built ]; then
                echo "Millet $MILLET_STATUS" >"$WORK/reason"
                return 1
            fi
            local durability=() listen=(--listen "127.0.0.1:$PORT")
            if [ "$name" != millet ]; then durability=(--durability "${name#millet-}"); fi
            if [ "$TLS" = 1 ]; then
                PORT="$MILLET_TLS_PORT"
                listen=(--config "$WORK/millet-tls.toml")
            fi
            if [ "$WS" = 1 ]; then
                PORT="$MILLET_WS_PORT"
                listen+=(--ws-listen "127.0.0.1:$PORT" --ws-path /mqtt)
            fi
            rm -rf "$WORK/millet-data"
            MILLET_LOG=warn "${pin[@]}" "$MILLET" "${listen[@]}" \
                --data-dir "$WORK/millet-data" "${durability[@]}" >"$WORK/$name.log" 2>&1 &
            BROKER_PID=$!
            ;;
    esac
    for _ in $(seq 1 100); do
        if ! kill -0 "$BROKER_PID" 2>/dev/null; then
            wait "$BROKER_PID" 2>/dev/null
            echo "$name exited at startup: $(tail -3 "$WORK/$name.log" | tr '\n' ' ')" >"$WORK/reason"
            BROKER_PID=""
            return 1
        fi
        if port_open "$PORT"; then
            return 0
        fi
        sleep 0.1
    done
    echo "$name did not listen on 127.0.0.1:$PORT within 10s" >"$WORK/reason"
    stop_broker
    return 1
}

MILLET_STARTS=0
MILLET_FAILS=0
MILLET_FAIL_REASON=""

unavailable() { # FILE REASON
    printf '{"unavailable":"%s"}\n' "$(json_escape "$2")" >"$1"
}

# Sockets in TIME_WAIT to or from the brokers' ports (other work on the
# machine may have its own).
time_wait_count() {
    local f="" p
    for p in "$MOSQ_PORT" "$MILLET_PORT" "$MOSQ_TLS_PORT" "$MILLET_TLS_PORT" "$MOSQ_WS_PORT" "$MILLET_WS_PORT"; do
        f="$f${f:+ or }sport = :$p or dport = :$p"
    done
    ss -tan state time-wait "( $f )" 2>/dev/null | tail -n +2 | wc -l
}
listen_drops() {
    nstat -az TcpExtListenOverflows TcpExtListenDrops 2>/dev/null | awk 'NR>1 {printf "%s%s", sep, $2; sep="/"}'
}
# A connection case starts from a quiet network stack: the previous case's
# sockets in TIME_WAIT (10k+ after a conn case) must leave first (at most 75 s;
# Linux keeps them 60 s).
settle_net() {
    local n
    for _ in $(seq 1 75); do
        n="$(time_wait_count)"
        [ "$n" -lt 1000 ] && return
        sleep 1
    done
    log "still $n sockets in TIME_WAIT after 75 s"
}

# run_case PASS CASE BROKER RUN ARGS... : one broker instance, one load run.
run_case() {
    local pass="$1" case="$2" broker="$3" run="$4"
    shift 4
    [ "${1:-}" = conn ] && settle_net
    local out="$RESULTS/${pass}__${case}__${broker}__r${run}.json"
    local tool=("$BENCH") threads=2
    if [ "$pass" = pinned ]; then
        tool=(taskset -c 1 "$BENCH")
        threads=1
    fi
    if ! start_broker "$broker" "$pass"; then
        if [[ "$broker" == millet* ]]; then
            MILLET_FAILS=$((MILLET_FAILS + 1))
            MILLET_FAIL_REASON="$(cat "$WORK/reason")"
        fi
        log "$pass/$case/$broker#$run: n/a ($(cat "$WORK/reason"))"
        unavailable "$out" "$(cat "$WORK/reason")"
        return
    fi
    [[ "$broker" == millet* ]] && MILLET_STARTS=$((MILLET_STARTS + 1))
    local is_conn=0 lq0=""
    if [ "${1:-}" = conn ]; then
        is_conn=1
        lq0="$(listen_drops)"
    fi
    log "$pass/$case/$broker#$run: $*"
    timeout 600 "${tool[@]}" --port "$PORT" --threads "$threads" --label "$broker" \
        --case "$case" --json-out "$out" "$@" --broker-pid "$BROKER_PID" \
        >/dev/null 2>"$WORK/run.log"
    local rc=$?
    grep -v '^\[' "$WORK/run.log" | sed 's/^/    /' >&2
    if [ "$is_conn" = 1 ]; then
        log "    listen overflows/drops before: $lq0; after: $(listen_drops); TIME_WAIT now $(time_wait_count)"
    fi
    if ! kill -0 "$BROKER_PID" 2>/dev/null; then
        unavailable "$out" "$broker died during the run (millet-bench exit $rc): $(tail -2 "$WORK/$broker.log" | tr '\n' ' ')"
        log "$pass/$case/$broker#$run: broker died"
        BROKER_PID=""
        return
    fi
    if ! [ -s "$out" ]; then
        unavailable "$out" "millet-bench exit $rc: $(tail -2 "$WORK/run.log" | tr '\n' ' ')"
    fi
    stop_broker
}

# both PASS CASE RUNS ARGS... : alternate the brokers, RUNS times each.
both() {
    local pass="$1" case="$2" runs="$3"
    shift 3
    for run in $(seq 1 "$runs"); do
        run_case "$pass" "$case" mosquitto "$run" "$@"
        run_case "$pass" "$case" millet "$run" "$@"
    done
}

throughput_cases() { # PASS
    local pass="$1" R="$REPEAT"
    both "$pass" qos0-fanin "$R" scenario fan-in -p 4 --qos 0 --size 64 --count "$N_FANIN"
    both "$pass" qos1-single "$R" run -p 1 -s 1 --qos 1 --inflight 32 --size 64 --count "$N_Q1"
    both "$pass" qos1-overload "$R" scenario fan-in -p 4 --qos 1 --inflight 32 --size 64 --count "$N_Q1OV"
    both "$pass" qos0-fanout "$R" scenario fan-out -s "$FANOUT_SUBS" --qos 0 --size 64 --count "$FANOUT_N"
    both "$pass" lat-qos0-1k 1 run -p 1 -s 1 --qos 0 --size 64 --rate 1000 --duration "$LAT_DUR"
}

# Durability pass: QoS 1 to a persistent session (4 publishers, one online
# clean_session=false subscriber on bench/#), alternating the configurations.
durability_cases() {
    local run b
    for run in $(seq 1 "$DUR_REPEAT"); do
        for b in mosquitto-persist millet-sync millet-interval millet-none; do
            run_case durability qos1-persistent "$b" "$run" scenario qos1-persistent \
                --inflight 32 --size 64 --count "$N_PERSIST"
        done
    done
}

# ----------------------------------------------------------------- runs
LOADAVG="$(cut -d' ' -f1-3 /proc/loadavg)"
log "mode $MODE; ports mosquitto $MOSQ_PORT, millet $MILLET_PORT; open-files limit $NOFILE"

if wanted default; then
    throughput_cases default
    both default lat-qos1-1k 1 run -p 1 -s 1 --qos 1 --size 64 --rate 1000 --duration "$LAT_DUR"
    both default "$SMALL_CASE" 1 conn -n "$CONN_SMALL" --rate "$CONN_RATE" --hold "$HOLD" --keepalive 4
    if [ "$CONN_BIG" -gt 0 ]; then
        if [ "$NOFILE" -ge $((CONN_BIG + 1000)) ]; then
            both default conn-50k 1 conn -n "$CONN_BIG" --rate 5000 --hold "$HOLD" --keepalive 4 --connect-timeout 30s
        else
            reason="skipped: the open-files hard limit here is $NOFILE (< $((CONN_BIG + 1000))), so no broker can hold $CONN_BIG connections (see the scale pass for $N_SCALE)"
            unavailable "$RESULTS/default__conn-50k__mosquitto__r1.json" "$reason"
            unavailable "$RESULTS/default__conn-50k__millet__r1.json" "$reason"
            NOTES+=("conn-50k $reason; raise it (e.g. run as a user allowed to \`ulimit -n 200000\`) to run it.")
            log "conn-50k $reason"
        fi
    fi
fi

if wanted durability; then
    durability_cases
fi

if wanted pinned && [ "$PINNED" = 1 ]; then
    if command -v taskset >/dev/null 2>&1 && [ "$(nproc)" -ge 2 ]; then
        throughput_cases pinned
    else
        NOTES+=("Pinned pass skipped: needs taskset and at least 2 CPUs.")
    fi
fi

PASS_NOTES=()
declare -A PASS_NOTE=()
if wanted idle; then
    both idle idle-tcp 1 conn -n "$N_IDLE" --rate 2000 --hold "$HOLD" --keepalive 30
    if make_certs; then
        TLS=1
        # 500/s: Mosquitto's single thread does not keep up with 2,000 TLS
        # handshakes a second here (listen-queue overflows, failed connects),
        # and this case is about memory.
        both idle idle-tls 1 conn -n "$N_IDLE" --rate 500 --hold "$HOLD" --keepalive 30 \
            --tls "$WORK/tls/ca.pem" --tls-server-name localhost
        TLS=0
    else
        unavailable "$RESULTS/idle__idle-tls__millet__r1.json" "openssl failed: $(tail -1 "$WORK/openssl.log")"
        unavailable "$RESULTS/idle__idle-tls__mosquitto__r1.json" "openssl failed"
    fi
    PASS_NOTE[idle]="Idle pass: $N_IDLE connections opened at 2,000/s (TLS: 500/s) with keep-alive 30 s, broker VmRSS sampled 2 s after the last CONNACK; per connection = (RSS then - RSS before) / connections. TLS: TLS 1.3 (rustls client), P-256 ECDSA server certificate from a throwaway CA (openssl), the same files for both brokers; Mosquitto \`listener PORT 127.0.0.1\` + \`cafile\`/\`certfile\`/\`keyfile\`, Millet \`tls_listen\` + \`[security.tls]\` (README, TLS)."
    PASS_NOTES+=("${PASS_NOTE[idle]}")
fi
if wanted scale; then
    SCALE_NOFILE_NOTE="open-files limit $NOFILE per process"
    both scale conn-19k 1 conn -n "$N_SCALE" --rate 5000 --hold 10s --keepalive 30 \
        --source-ips 4 --connect-timeout 30s
    PASS_NOTE[scale]="Scale pass: $N_SCALE idle connections at 5,000/s from 127.0.0.1-4 (keep-alive 30 s, held 10 s), the \"100k connections on one box\" scenario bounded by the $SCALE_NOFILE_NOTE (every connection is a file descriptor in the broker and in the load tool; raising the hard limit is not possible here)."
    PASS_NOTES+=("${PASS_NOTE[scale]}")
fi
if wanted fleet; then
    fleet_pin=()
    [ "$PINNED" = 1 ] || fleet_pin=(--no-pinned)
    MILLET_BIN="$MILLET" MILLET_BENCH_BIN="$BENCH" bench/fleet.sh --skip-build --results "$RESULTS" \
        "${FLEET_ARGS[@]}" "${fleet_pin[@]}" >&2
    PASS_NOTE[fleet]="Fleet pass: bench/fleet.sh (parameters in the section)."
    PASS_NOTES+=("${PASS_NOTE[fleet]}")
fi
if wanted cluster; then
    # Cluster mode (issue 13): bench/cluster.sh starts its own NATS cluster
    # and Millet nodes; its section is rendered from its results as the others.
    cluster_args=(--skip-build --results "$RESULTS")
    [ "$MODE" = quick ] && cluster_args+=(--quick)
    MILLET_BIN="$MILLET" MILLET_BENCH_BIN="$BENCH" bench/cluster.sh "${cluster_args[@]}" >&2
    PASS_NOTE[cluster]="Cluster pass: bench/cluster.sh (commands in the section)."
    PASS_NOTES+=("${PASS_NOTE[cluster]}")
fi
if wanted ws; then
    WS=1
    both ws qos0-fanin-ws "$REPEAT" scenario fan-in -p 4 --qos 0 --size 64 --count "$N_FANIN" --transport ws --ws-path /mqtt
    both ws lat-qos1-1k-ws 1 run -p 1 -s 1 --qos 1 --size 64 --rate 1000 --duration "$LAT_DUR" --transport ws --ws-path /mqtt
    WS=0
    PASS_NOTE[ws]="WebSocket pass: every client (publishers and subscriber) speaks MQTT over WebSocket (\`millet-bench --transport ws --ws-path /mqtt\`: HTTP upgrade with sub-protocol \`mqtt\`, then one masked binary frame per MQTT packet, as MQTT.js sends them). Mosquitto: \`listener PORT 127.0.0.1\` + \`protocol websockets\` (libwebsockets); Millet: \`--ws-listen 127.0.0.1:PORT --ws-path /mqtt\`. Compare with the plain-TCP qos0-fanin of the same run date for the cost of the WebSocket layer."
    PASS_NOTES+=("${PASS_NOTE[ws]}")
fi
TW_NOTE="Connection cases wait until fewer than 1,000 sockets to or from the brokers' ports are in TIME_WAIT before they start (at most 75 s); the load tool leaves the source port to \`connect()\` with one source address and picks ports itself with several (\`--source-ips\` > 1) instead of \`bind(ip:0)\`: see bench/HISTORY.md, the 10k-connection case."
PASS_NOTES+=("$TW_NOTE")

# ---------------------------------------------------------------- report
if [ "$MILLET_STATUS" = built ]; then
    if [ "$MILLET_STARTS" -gt 0 ] && [ "$MILLET_FAILS" -eq 0 ]; then
        MILLET_STATUS="started for every case"
    elif [ "$MILLET_STARTS" -gt 0 ]; then
        MILLET_STATUS="started $MILLET_STARTS times, failed $MILLET_FAILS times ($MILLET_FAIL_REASON)"
    else
        MILLET_STATUS="did not start: $MILLET_FAIL_REASON"
    fi
fi
NOTES+=("Mosquitto logs only errors and warnings (\`log_type error\`, \`log_type warning\`) and Millet runs with \`MILLET_LOG=warn\`, so that per-connection logging does not dominate the connection cases.")
NOTES+=("Fleet work per message in user-space instructions (callgrind, independent of the machine's load, unlike CPU percentages): bench/fleet-callgrind.sh, Millet against Mosquitto; the latest figures are in bench/HISTORY.md (\"Where fleet CPU goes\").")
NOTES+=("Mosquitto keeps its default \`set_tcp_nodelay false\`: Nagle's algorithm can delay its small PUBACKs, which shows in PUBLISH→PUBACK latency at low rates.")
NOTES+=("Unlimited-rate QoS 0 cases measure delivery throughput; their latency percentiles are mostly queueing time in socket buffers, not broker latency. Use the 1k msg/s cases for latency.")
NOTES+=("\"acknowledged but lost\": the broker PUBACKed a QoS 1 message to its publisher but never delivered it to the subscriber within the drain period (2 s without progress). Mosquitto drops messages beyond \`max_queued_messages\` (default 1000) per subscriber.")
NOTES+=("Durability pass: Millet \`--durability sync\` makes every acknowledged QoS 1/2 message to a persistent session durable (fsync, shared by concurrent publishers through group commit) before its PUBACK; \`interval\` acknowledges after the (unsynced) commit and fsyncs every \`interval_ms\` (100 ms), so a crash can lose the last interval; \`none\` keeps everything in memory. The other cases run Millet with its default (\`sync\`), but their clean sessions never touch the store.")
NOTES+=("Mosquitto with \`persistence true\` keeps messages in memory and only writes a snapshot of its whole state every \`autosave_interval\` seconds (1 s here) and at a clean exit: it acknowledges messages before they are on disk, so a crash (kill -9, power loss) loses every message acknowledged since the last snapshot. Its throughput compares with Millet's \`interval\` / \`none\`, not with \`sync\`.")
NOTES+=("Millet status for this run: $MILLET_STATUS.")
NOTES+=("${PASS_NOTES[@]}")
if [ -n "$ONLY" ]; then
    for p in "${only_list[@]}"; do
        {
            printf '{"date":"%s","only":"%s","nofile":"%s","loadavg":"%s","notes":[' \
                "$(date -u '+%Y-%m-%d %H:%M UTC')" "$(json_escape "$ONLY")" "$NOFILE" "$LOADAVG"
            sep=""
            for n in "${PASS_NOTE[$p]:-}" "$TW_NOTE"; do
                [ -n "$n" ] || continue
                printf '%s"%s"' "$sep" "$(json_escape "$n")"
                sep=","
            done
            printf ']}\n'
        } >"$RESULTS/meta-$p.json"
    done
fi
if [ -z "$ONLY" ] || ! [ -s "$RESULTS/meta.json" ]; then
{
    printf '{'
    printf '"date":"%s",' "$(date -u '+%Y-%m-%d %H:%M UTC')"
    printf '"mode":"%s",' "$MODE"
    printf '"nproc":"%s",' "$(nproc)"
    printf '"cpu":"%s",' "$(json_escape "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')")"
    printf '"kernel":"%s",' "$(json_escape "$(uname -sr)")"
    printf '"mem":"%s",' "$(json_escape "$(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)")"
    printf '"nofile":"%s",' "$NOFILE"
    printf '"loadavg":"%s",' "$LOADAVG"
    printf '"mosquitto_version":"%s",' "$(json_escape "$MOSQ_VERSION")"
    printf '"mosquitto_cmd":"%s",' "$(json_escape "mosquitto -c mosquitto.conf")"
    printf '"mosquitto_conf":"%s",' "$(json_escape "$MOSQ_CONF_TEXT")"
    printf '"mosquitto_max_queued":"1000",'
    printf '"mosquitto_persist_conf":"%s",' "$(json_escape "$MOSQ_PERSIST_CONF_TEXT")"
    printf '"millet_status":"%s",' "$(json_escape "$MILLET_STATUS")"
    printf '"millet_cmd":"%s",' "$(json_escape "MILLET_LOG=warn target/release/millet --listen 127.0.0.1:PORT --data-dir DIR")"
    printf '"millet_durability_cmd":"%s",' "$(json_escape "MILLET_LOG=warn target/release/millet --listen 127.0.0.1:PORT --data-dir DIR --durability sync|interval|none")"
    printf '"notes":['
    sep=""
    for n in "${NOTES[@]}"; do
        printf '%s"%s"' "$sep" "$(json_escape "$n")"
        sep=","
    done
    printf ']}\n'
} >"$RESULTS/meta.json"
fi

"$BENCH" report --results "$RESULTS" --out "$ROOT/BENCHMARKS.md" --chart "$ROOT/bench/results.png" ||
    {
        log "report failed"
        exit 1
    }
log "done in $(($(date +%s) - START_TS))s: BENCHMARKS.md, bench/results.png, bench/results/*.json (Millet: $MILLET_STATUS)"
