# shellcheck shell=bash
# Shared by bench/compare.sh, bench/fleet.sh and bench/overload.sh (sourced):
# stopping the broker under test, cleanup on exit, and a port probe.
# The sourcing script sets BROKER_PID (the running broker, or empty) and WORK
# (its temporary directory, removed on exit).

# Stop the broker: SIGTERM, up to 10 s to drain, then SIGKILL.
stop_broker() {
    if [ -n "$BROKER_PID" ]; then
        kill -TERM "$BROKER_PID" 2>/dev/null
        for _ in $(seq 1 100); do
            kill -0 "$BROKER_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$BROKER_PID" 2>/dev/null
        wait "$BROKER_PID" 2>/dev/null
        BROKER_PID=""
    fi
}

cleanup() {
    stop_broker
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Whether something accepts TCP connections on 127.0.0.1:$1.
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
