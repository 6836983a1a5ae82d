#!/usr/bin/env bash
# Black-box MQTT conformance suite (tests/conformance) against Millet or Mosquitto.
#
#   scripts/test-conformance.sh [pytest args...]                  # against Millet
#   BROKER=mosquitto scripts/test-conformance.sh [pytest args...]  # validate the suite on Mosquitto
#
# Millet binary: $MILLET_BIN, else target/release/millet, else target/debug/millet;
# extra broker flags: $MILLET_ARGS. Exits with pytest's exit code.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
REQ="$REPO/tests/conformance/requirements.txt"

if [[ ! -x "$VENV/bin/python" ]]; then
    python3 -m venv "$VENV"
fi
# reinstall only when requirements changed
STAMP="$VENV/.conformance-requirements"
if [[ ! -f "$STAMP" ]] || ! cmp -s "$REQ" "$STAMP"; then
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQ"
    cp "$REQ" "$STAMP"
fi

if [[ "${BROKER:-millet}" == "mosquitto" ]]; then
    if ! command -v mosquitto >/dev/null 2>&1 && [[ ! -x /usr/sbin/mosquitto ]]; then
        if [[ "$(id -u)" == "0" ]] && command -v apt-get >/dev/null 2>&1; then
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
        else
            echo "mosquitto not found: apt-get update && apt-get install -y mosquitto" >&2
            exit 3
        fi
    fi
    # the suite starts its own mosquitto on free loopback ports; a system instance on 1883 is harmless
fi

# the security tests use mosquitto_pub / mosquitto_sub as independent TLS clients;
# test_readme_recipes.py runs the README's recipes, which use them and openssl
if ! command -v mosquitto_pub >/dev/null 2>&1 || ! command -v openssl >/dev/null 2>&1; then
    if [[ "$(id -u)" == "0" ]] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto-clients openssl >/dev/null \
            || echo "warning: cannot install mosquitto-clients / openssl; the tests needing them are skipped" >&2
    else
        echo "warning: mosquitto_pub or openssl not found (apt-get install mosquitto-clients openssl); the tests needing them are skipped" >&2
    fi
fi

cd "$REPO"
set +e
"$VENV/bin/python" -m pytest tests/conformance -q "$@"
rc=$?
set -e
exit $rc
