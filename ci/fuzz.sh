#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Runs every cargo-fuzz target of every crate that has a fuzz/ directory (crates/*/fuzz, each
# its own workspace) for $IRQBRIDGE_FUZZ_SECONDS seconds (default 60) and fails on the first
# crash, leak or timeout. The committed corpus (fuzz/corpus/<target>) seeds each run and is
# only read: new inputs go to a scratch directory. Installs cargo-fuzz if it is missing; needs
# the nightly toolchain (cargo +nightly).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
seconds="${IRQBRIDGE_FUZZ_SECONDS:-60}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

ran=0
for dir in "$root"/crates/*/fuzz; do
    [ -f "$dir/Cargo.toml" ] || continue
    crate="$(basename "$(dirname "$dir")")"
    targets="$(cd "$dir" && cargo +nightly fuzz list)"
    for target in $targets; do
        echo "fuzz.sh: $crate/$target for ${seconds}s"
        mkdir -p "$scratch/$crate/$target" "$dir/corpus/$target"
        (
            cd "$dir"
            cargo +nightly fuzz run "$target" "$scratch/$crate/$target" "corpus/$target" -- \
                -max_total_time="$seconds" -timeout=20 -rss_limit_mb=4096 -print_final_stats=1
        ) || {
            echo "fuzz.sh: $crate/$target FAILED (the crashing input is in $dir/artifacts/$target)" >&2
            exit 1
        }
        ran=$((ran + 1))
    done
done

if [ "$ran" -eq 0 ]; then
    echo "fuzz.sh: no fuzz targets found under crates/*/fuzz" >&2
    exit 1
fi
echo "fuzz.sh: $ran targets ran ${seconds}s each without a crash"
