#!/usr/bin/env bash
# Fleet instructions per message under callgrind: Millet against Mosquitto.
#
# CPU percentages on this shared 2-core VM move by ±15% from run to run;
# instruction counts do not. This runs a small fleet (millet-bench fleet:
# persistent devices, QoS 1 telemetry, QoS 1 commands from one backend)
# against each broker under `valgrind --tool=callgrind`, twice: with a
# measured window of W and of 2W seconds. The difference between the two
# runs' totals is the steady state of W seconds (the start-up, connect phase
# and warm-up cancel out), divided by the messages of W seconds. It counts
# user-space instructions only (the kernel's share is not in it), all of
# the broker's threads.
#
# usage: bench/fleet-callgrind.sh [--devices N] [--window W] [--skip-build]
#                                 [--only millet|mosquitto] [--keep DIR]
#   --keep DIR: keep each run's callgrind output there (KIND-W.out), for
#   callgrind_annotate (where the instructions go, function by function).
#   defaults: 600 devices, telemetry every 2 s (300 msg/s), commands to 2%
#   of the devices each second, W = 20 s. About 5 minutes for both brokers.
# Installs valgrind and mosquitto with apt-get when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICES=600
WINDOW=20
BUILD=1
ONLY=""
KEEP=""
while [ $# -gt 0 ]; do
    case "$1" in
        --devices) DEVICES=$2; shift 2 ;;
        --window) WINDOW=$2; shift 2 ;;
        --skip-build) BUILD=0; shift ;;
        --only) ONLY=$2; shift 2 ;;
        --keep) KEEP=$2; shift 2 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
INTERVAL=2
CMD_PCT=2
MILLET="${MILLET_BIN:-$PWD/target/release/millet}"
BENCH="${MILLET_BENCH_BIN:-$PWD/target/release/millet-bench}"
MOSQUITTO="${MOSQUITTO_BIN:-$(command -v mosquitto || echo /usr/sbin/mosquitto)}"
missing=()
command -v valgrind >/dev/null || missing+=(valgrind)
[ -x "$MOSQUITTO" ] || missing+=(mosquitto)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]} (apt-get)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
fi
if [ "$BUILD" = 1 ]; then
    cargo build --release -p millet -p millet-bench >&2
fi
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# run KIND WINDOW -> prints the total instructions of one run
run() {
    local kind=$1 window=$2 dir port broker
    dir=$(mktemp -d)
    chmod 777 "$dir"
    port=$(free_port)
    local vg=(valgrind --tool=callgrind "--callgrind-out-file=$dir/cg.out")
    case $kind in
        millet)
            MILLET_LOG=warn "${vg[@]}" "$MILLET" --listen "127.0.0.1:$port" --data-dir "$dir/data" \
                --no-admin --no-ws > "$dir/broker.log" 2>&1 &
            ;;
        mosquitto)
            # `user root`: Mosquitto run as root otherwise drops to user
            # mosquitto, which cannot write callgrind's output file.
            printf 'user root\nlistener %s 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location %s/\n' \
                "$port" "$dir" > "$dir/mosquitto.conf"
            "${vg[@]}" "$MOSQUITTO" -c "$dir/mosquitto.conf" > "$dir/broker.log" 2>&1 &
            ;;
    esac
    broker=$!
    # Under valgrind the broker starts slowly: wait for its port.
    for _ in $(seq 1 100); do
        if python3 -c "import socket,sys; s=socket.socket(); sys.exit(s.connect_ex(('127.0.0.1',$port)))"; then
            break
        fi
        sleep 0.1
    done
    "$BENCH" --port "$port" --threads 1 fleet -n "$DEVICES" --rate 300 --interval "$INTERVAL" \
        --cmd-pct "$CMD_PCT" --warmup 6 --window "$window" --drain 5 > "$dir/run.txt" 2>&1
    kill "$broker"
    wait "$broker" 2>/dev/null || true
    if [ "$(grep -c '^\(telemetry\|commands\) .* lost 0 ' "$dir/run.txt")" != 2 ]; then
        echo "$kind: messages lost or the run failed (see $dir/run.txt)" >&2
        exit 1
    fi
    callgrind_annotate "$dir/cg.out" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1; exit }'
    if [ -n "$KEEP" ]; then
        mkdir -p "$KEEP"
        cp "$dir/cg.out" "$KEEP/$kind-$window.out"
    fi
    rm -rf "$dir"
}

# Messages in W seconds: telemetry (devices / interval per second) and
# commands (cmd_pct % of the devices per second).
MSGS=$(python3 -c "print($DEVICES / $INTERVAL * $WINDOW + $DEVICES * $CMD_PCT / 100 * $WINDOW)")
echo "fleet under callgrind: $DEVICES devices, telemetry every ${INTERVAL} s, commands to ${CMD_PCT}%/s; steady state of ${WINDOW} s = $MSGS messages"
for kind in millet mosquitto; do
    if [ -n "$ONLY" ] && [ "$ONLY" != "$kind" ]; then
        continue
    fi
    short=$(run "$kind" "$WINDOW")
    long=$(run "$kind" $((2 * WINDOW)))
    python3 -c "
d = $long - $short
print(f'$kind: {d:,} instructions in the steady ${WINDOW} s, {d / $MSGS:,.0f} per message')"
done
