#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Every test of irqbridge, in the order a failure is cheapest to find: formatting and lints,
# feature sets, docs and packaging, then the Rust test suites (unit, protocol, hostile peers,
# KVM on /dev/kvm, Cloud Hypervisor when built), the fuzz targets, then the QEMU + Linux guest
# tests. Tests that need /dev/kvm, Cloud Hypervisor or QEMU and cannot have them print
# "SKIPPED: <reason>".
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== SPDX headers"
ci/spdx.sh --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== feature sets (client / server roles)"
ci/check-features.sh
echo "== docs and packaging"
ci/doc.sh
echo "== cargo test"
cargo test --workspace
if [ -x ci/fuzz.sh ]; then
    echo "== fuzz targets"
    ci/fuzz.sh
fi
if [ -x ci/qemu-tests.sh ]; then
    echo "== QEMU guest tests"
    ci/qemu-tests.sh
fi
