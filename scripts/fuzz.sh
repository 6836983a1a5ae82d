#!/usr/bin/env bash
# Fuzz the codec and the protocol state machine (fuzz/fuzz_targets/*.rs),
# each target for a number of seconds, one after the other.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]   # default: 30 s each, decode protocol
#
# Installs cargo-fuzz if missing. Uses a nightly toolchain when rustup has one,
# otherwise stable with RUSTC_BOOTSTRAP=1 (cargo-fuzz needs -Z flags).
# Extra libFuzzer flags can be passed in FUZZ_ARGS (e.g. FUZZ_ARGS=-jobs=2).
# A crash (panic, broken invariant, timeout, OOM) is written to
# fuzz/artifacts/TARGET/ and makes the script fail. See docs/FUZZING.md.
set -euo pipefail

secs="${1:-30}"
shift || true
targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
    targets=(decode protocol)
fi
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root/fuzz"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz" >&2
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

for target in "${targets[@]}"; do
    corpus="$root/fuzz/corpus/$target"
    mkdir -p "$corpus"
    extra=()
    if [[ -f "$root/fuzz/$target.dict" ]]; then
        extra=(-dict="$root/fuzz/$target.dict")
    fi
    echo "fuzz: $target for ${secs}s" >&2
    # shellcheck disable=SC2086
    cargo "${toolchain[@]}" fuzz run "$target" "$corpus" -- \
        "${extra[@]}" \
        -max_total_time="$secs" \
        -max_len=4096 \
        -timeout=10 \
        -print_final_stats=1 \
        ${FUZZ_ARGS:-}
done
