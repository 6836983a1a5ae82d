#!/usr/bin/env bash
# Cluster mode next to one node: millet-bench against Mosquitto, Millet on its
# embedded engine, and Millet's cluster mode (engine = nats) with 1, 2 and 3
# nodes on one three-server NATS cluster (scripts/cluster-up.sh; JetStream,
# replicas 3). Every process runs on this machine, so the figures show what
# crossing nodes costs (a NATS hop; for QoS 1 the JetStream store before the
# PUBACK), not how a cluster scales out.
#
# Usage: bench/cluster.sh [--quick] [--skip-build] [--results DIR]
#        CASES="resume conn" bench/cluster.sh   # only these cases (default: all:
#        qos0-fanin qos1 lat-qos1-1k conn resume); the other cases' results stay
#
# Placement: 1 node: every client on node 1. 2 nodes: publishers on node 1,
# subscribers on node 2 (every message crosses). 3 nodes: publisher i on node
# i, subscriber i on node i+1 (millet-bench --pub-ports / --sub-ports).
# Connection rate: `conn` to node 1 (each connect takes the client id's owner
# entry in JetStream KV). Resume (`millet-bench resume`: 10,000 QoS 1
# messages queued for an offline persistent session, then it reconnects):
# the session made on node 1, the messages published on node 2, the session
# resumed on the last node N (it moves between nodes); one port for Mosquitto
# (restarted for the case with `max_queued_messages 10000`, Millet's
# `max_queued`: its default keeps 1,000) and the embedded engine.
#
# Results: bench/results/cluster__<case>__<deployment>__r1.json, rendered by
# `millet-bench report` into BENCHMARKS.md's "Cluster mode" section (printed
# at the end with --section cluster); the commands go to
# bench/results/cluster-params.txt.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1

QUICK=0 BUILD=1
RESULTS="$ROOT/bench/results"
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
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

N_FANIN=200000 N_Q1=50000 LAT_DUR=10s CONNS=2000 N_RESUME=10000
ALL_CASES="qos0-fanin qos1 lat-qos1-1k conn resume"
CASES="${CASES:-$ALL_CASES}"
for c in $CASES; do
    case " $ALL_CASES " in
        *" $c "*) ;;
        *)
            echo "unknown case in CASES: $c (cases: $ALL_CASES)" >&2
            exit 2
            ;;
    esac
done
want() { case " $CASES " in *" $1 "*) return 0 ;; esac; return 1; }
if [ "$QUICK" = 1 ]; then
    N_FANIN=20000 N_Q1=5000 LAT_DUR=3s CONNS=500
fi

BENCH="${MILLET_BENCH_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/millet-bench}"
MILLET="${MILLET_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/millet}"
MOSQUITTO="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
WORK="$(mktemp -d /tmp/millet-cluster.XXXXXX)"
NATS_RUN="$WORK/nats"
BROKER_PID=""
NODE_PIDS=()
log() { echo "[cluster $(date +%H:%M:%S)] $*" >&2; }

# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
stop_nodes() {
    local p
    for p in "${NODE_PIDS[@]}"; do
        kill -TERM "$p" 2>/dev/null
    done
    for p in "${NODE_PIDS[@]}"; do
        wait "$p" 2>/dev/null
    done
    NODE_PIDS=()
}
finish() {
    stop_nodes
    stop_broker
    [ -f "$NATS_RUN/pids" ] && "$ROOT/scripts/cluster-down.sh" "$NATS_RUN" >/dev/null 2>&1
    rm -rf "$WORK"
}
trap finish EXIT

if [ "$BUILD" = 1 ]; then
    log "building millet and millet-bench (release)"
    nice -n 10 cargo build --release -p millet -p millet-bench >"$WORK/build.log" 2>&1 || {
        tail -20 "$WORK/build.log" >&2
        exit 1
    }
fi
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

free_port() { # from $1 up
    local p="$1"
    while port_open "$p"; do p=$((p + 1)); done
    echo "$p"
}
wait_port() { # PORT PID
    for _ in $(seq 1 100); do
        kill -0 "$2" 2>/dev/null || return 1
        port_open "$1" && return 0
        sleep 0.1
    done
    return 1
}

NATS_BASE="${CLUSTER_BENCH_NATS_BASE:-26100}"
mkdir -p "$NATS_RUN"
log "starting a three-server NATS cluster at $NATS_BASE"
NATS_PORT_BASE="$NATS_BASE" MILLET_NODES=0 "$ROOT/scripts/cluster-up.sh" "$NATS_RUN" >"$WORK/nats-up.log" 2>&1 || {
    cat "$WORK/nats-up.log" >&2
    exit 1
}

# start_nodes N: N Millet nodes, node i on NATS server i; their ports in NODE_PORTS.
NODE_PORTS=()
start_nodes() {
    local n="$1" i port
    NODE_PORTS=()
    for i in $(seq 1 "$n"); do
        port="$(free_port $((26200 + 10 * i)))"
        rm -rf "$WORK/node$i"
        MILLET_LOG=warn "$MILLET" --listen "127.0.0.1:$port" --data-dir "$WORK/node$i" --no-admin \
            --nats "nats://127.0.0.1:$((NATS_BASE + i))" --node-id "bench$i" >"$WORK/node$i.log" 2>&1 &
        NODE_PIDS+=($!)
        wait_port "$port" $! || {
            log "node $i did not start: $(tail -3 "$WORK/node$i.log")"
            return 1
        }
        NODE_PORTS+=("$port")
    done
}

start_single() { # mosquitto | millet [EXTRA MOSQUITTO CONF LINE]
    local port
    port="$(free_port 26300)"
    if [ "$1" = mosquitto ]; then
        printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_inflight_messages 32\n%s\n' "$port" "${2:-}" >"$WORK/mosquitto.conf"
        "$MOSQUITTO" -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
    else
        rm -rf "$WORK/single"
        MILLET_LOG=warn "$MILLET" --listen "127.0.0.1:$port" --data-dir "$WORK/single" --no-admin \
            >"$WORK/single.log" 2>&1 &
    fi
    BROKER_PID=$!
    wait_port "$port" "$BROKER_PID" || return 1
    NODE_PORTS=("$port")
}

mkdir -p "$RESULTS"
if [ "$CASES" = "$ALL_CASES" ]; then
    rm -f "$RESULTS"/cluster__*.json
    : >"$RESULTS/cluster-params.txt"
else
    # Only these cases: their old results and commands go, the others stay.
    touch "$RESULTS/cluster-params.txt"
    for c in $CASES; do
        rm -f "$RESULTS"/cluster__"$c"__*.json
        grep -v "^[^/ ]*/$c: " "$RESULTS/cluster-params.txt" >"$WORK/params" || true
        cat "$WORK/params" >"$RESULTS/cluster-params.txt"
    done
fi

# bench DEPLOYMENT CASE ARGS...: one millet-bench run against NODE_PORTS.
bench() {
    local dep="$1" case="$2"
    shift 2
    local ports=("${NODE_PORTS[@]}") placement=()
    local n="${#ports[@]}"
    # `conn` and `resume` place their clients themselves (not `run` options).
    if [ "$1" != conn ] && [ "$1" != resume ] && [ "$n" -gt 1 ]; then
        local pubs subs i
        pubs="$(IFS=,; echo "${ports[*]}")"
        subs=""
        for i in $(seq 1 "$n"); do
            subs="$subs${subs:+,}${ports[$((i % n))]}"
        done
        placement=(--pub-ports "$pubs" --sub-ports "$subs")
    fi
    local out="$RESULTS/cluster__${case}__${dep}__r1.json"
    log "$dep/$case: $* ${placement[*]}"
    echo "$dep/$case: millet-bench --port ${ports[0]} $* ${placement[*]}" >>"$RESULTS/cluster-params.txt"
    local rc=0
    timeout 300 "$BENCH" --port "${ports[0]}" --label "$dep" --case "$case" --json-out "$out" \
        "$@" "${placement[@]}" >/dev/null 2>"$WORK/run.log" || rc=$?
    if [ "$rc" != 0 ]; then
        log "  exit $rc: $(tail -3 "$WORK/run.log")"
        local f
        for f in "$WORK"/node*.log "$WORK/single.log" "$WORK/mosquitto.log"; do
            [ -s "$f" ] && log "  ${f##*/}: $(tail -5 "$f")"
        done
    fi
}

cases() { # DEPLOYMENT
    local dep="$1" p=4
    want qos0-fanin && bench "$dep" qos0-fanin scenario fan-in -p "$p" --qos 0 --size 64 --count "$N_FANIN"
    want qos1 && bench "$dep" qos1 run -p "$p" -s 1 --qos 1 --inflight 32 --size 64 --count "$N_Q1"
    want lat-qos1-1k && bench "$dep" lat-qos1-1k run -p 1 -s 1 --qos 1 --size 64 --rate 1000 --duration "$LAT_DUR"
    case "$dep" in
        cluster-2 | cluster-3) ;;
        *) want conn && bench "$dep" conn conn -n "$CONNS" --rate 0 --hold 2s --keepalive 30 ;;
    esac
    if want resume; then
        if [ "$dep" = mosquitto ]; then
            # Mosquitto keeps 1,000 queued messages per client by default.
            stop_broker
            start_single mosquitto "max_queued_messages $N_RESUME" || {
                log "mosquitto did not restart"
                return
            }
        fi
        # Session made on node 1, messages published on node 2, resumed on
        # the last node (one port: all the same).
        local n="${#NODE_PORTS[@]}"
        local sub="${NODE_PORTS[0]}" pub="${NODE_PORTS[$((n > 1 ? 1 : 0))]}" res="${NODE_PORTS[$((n - 1))]}"
        bench "$dep" resume resume --count "$N_RESUME" --size 64 --inflight 32 \
            --sub-port "$sub" --pub-port "$pub" --resume-port "$res"
    fi
    return 0
}

for single in mosquitto millet; do
    if start_single "$single"; then
        cases "$single"
    else
        log "$single did not start"
    fi
    stop_broker
done
for n in 1 2 3; do
    if start_nodes "$n"; then
        cases "cluster-$n"
    fi
    stop_nodes
done

"$BENCH" report --results "$RESULTS" --section cluster
