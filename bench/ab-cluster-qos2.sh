#!/bin/bash
# A/B of two Millet builds in cluster mode: two nodes on a three-server NATS
# cluster (scripts/cluster-up.sh), QoS 2 from four publishers on node 1 to
# one persistent subscriber on node 2 (millet-bench, 4,000 messages each),
# ROUNDS rounds alternating the builds. Prints each run's rates.
#   OLD=/tmp/millet-old NEW=target/release/millet bench/ab-cluster-qos2.sh
# The first run after the NATS cluster starts may fail while its streams
# are created (0 msg/s): read the later rounds.
set -u
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
B="${MILLET_BENCH_BIN:-$ROOT/target/release/millet-bench}"
OLD="${OLD:?the build before}" NEW="${NEW:?the build after}" ROUNDS="${ROUNDS:-3}"
RUN="$(mktemp -d /tmp/ab-cluster-qos2.XXXXXX)"
NATS_PORT_BASE=26500 MILLET_NODES=0 "$ROOT/scripts/cluster-up.sh" "$RUN/nats" >"$RUN/up.log" 2>&1 || {
    cat "$RUN/up.log"
    exit 1
}
trap '"$ROOT/scripts/cluster-down.sh" "$RUN/nats" >/dev/null 2>&1; rm -rf "$RUN"' EXIT
for round in $(seq 1 "$ROUNDS"); do
    for v in old new; do
        bin="$OLD"
        [ "$v" = new ] && bin="$NEW"
        pids=()
        for i in 1 2; do
            MILLET_LOG=warn "$bin" --listen "127.0.0.1:$((26600 + i))" --data-dir "$RUN/n$i.$round$v" --no-admin \
                --nats "nats://127.0.0.1:$((26500 + i))" --node-id "ab$i" >"$RUN/n$i.log" 2>&1 &
            pids+=($!)
        done
        for i in 1 2; do
            for _ in $(seq 100); do
                (echo >"/dev/tcp/127.0.0.1/$((26600 + i))") 2>/dev/null && break
                sleep 0.1
            done
        done
        sleep 1
        out=$("$B" --port 26601 run -p 4 -s 1 --qos 2 --sub-qos 2 --persistent --inflight 32 --size 64 \
            --count 4000 --drain 20s --pub-ports 26601 --sub-ports 26602 --client-prefix "ab$round$v" 2>/dev/null | tail -1)
        kill -TERM "${pids[@]}"
        wait "${pids[@]}" 2>/dev/null
        echo "$round $v $(echo "$out" | python3 -c 'import json,sys; j=json.load(sys.stdin); print({k: round(v) for k, v in j.items() if k.endswith("_rate")})')"
    done
done
