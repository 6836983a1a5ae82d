#!/usr/bin/env bash
# Fuzz the MQTT decoder only (fuzz/fuzz_targets/decode.rs) for a number of
# seconds; kept for compatibility, see scripts/fuzz.sh (all targets).
#
#   scripts/fuzz-decode.sh [SECONDS]      # default 30
set -euo pipefail
exec "$(dirname "$0")/fuzz.sh" "${1:-30}" decode
