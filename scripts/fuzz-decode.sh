#!/usr/bin/env bash
# Fuzz the MQTT decoder (fuzz/fuzz_targets/decode.rs) for a number of seconds.
#
#   scripts/fuzz-decode.sh [SECONDS]      # default 30
#
# Installs cargo-fuzz if missing. Uses a nightly toolchain when rustup has one,
# otherwise stable with RUSTC_BOOTSTRAP=1 (cargo-fuzz needs -Z flags).
# Extra libFuzzer flags can be passed in FUZZ_ARGS (e.g. FUZZ_ARGS=-jobs=2).
# Crashes are written to fuzz/artifacts/decode/ and make the script fail.
set -euo pipefail

secs="${1:-30}"
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root/fuzz"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz-decode: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

toolchain=()
if command -v rustup >/dev/null 2>&1 && rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    toolchain=(+nightly)
else
    export RUSTC_BOOTSTRAP=1
fi

# Keep the fuzz build out of the main target directory.
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$root/fuzz/target}"

corpus="$root/fuzz/corpus/decode"
mkdir -p "$corpus"

# shellcheck disable=SC2086
cargo "${toolchain[@]}" fuzz run decode "$corpus" -- \
    -dict="$root/fuzz/decode.dict" \
    -max_total_time="$secs" \
    -max_len=4096 \
    -timeout=10 \
    -print_final_stats=1 \
    ${FUZZ_ARGS:-}
