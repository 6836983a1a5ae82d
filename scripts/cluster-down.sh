#!/usr/bin/env bash
# Stop what scripts/cluster-up.sh started (by the PIDs it recorded) and
# remove its state.   scripts/cluster-down.sh [RUN_DIR]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
run="${1:-$root/target/cluster}"
[[ -f "$run/pids" ]] || { echo "cluster-down: no $run/pids" >&2; exit 0; }
while read -r pid; do
    kill "$pid" 2>/dev/null || true
done < "$run/pids"
while read -r pid; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
done < "$run/pids"
rm -rf "$run"
echo "cluster stopped"
