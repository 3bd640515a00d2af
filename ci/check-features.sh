#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Builds, lints and documents irqbridge-vfio-user with each role alone, with neither and with both, and
# checks that the irqbridge-kvm plugin's dependency tree holds no server-side crate
# (irqbridge-core, serde_json). Exits non-zero on the first failure.
set -eu
cd "$(dirname "$0")/.."

crate=irqbridge-vfio-user
for features in "--no-default-features --features client" \
                "--no-default-features --features server" \
                "--no-default-features" \
                ""; do
    echo "== $crate ${features:-(default features)}"
    # shellcheck disable=SC2086 # word splitting of $features is intended
    cargo build -p "$crate" $features
    # shellcheck disable=SC2086
    cargo clippy -p "$crate" --all-targets $features -- -D warnings
    # Docs must not link to a module the feature set leaves out.
    # shellcheck disable=SC2086
    RUSTDOCFLAGS="-D warnings" cargo doc -p "$crate" --no-deps $features
done

echo "== cargo tree -p irqbridge-kvm -e normal"
tree=$(cargo tree -p irqbridge-kvm -e normal --prefix none)
for forbidden in irqbridge-core serde_json; do
    if printf '%s\n' "$tree" | grep -q "^$forbidden v"; then
        echo "irqbridge-kvm depends on $forbidden:" >&2
        cargo tree -p irqbridge-kvm -e normal -i "$forbidden" >&2
        exit 1
    fi
done
echo "irqbridge-kvm: no irqbridge-core, no serde_json"
