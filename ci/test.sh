#!/usr/bin/env bash
# Every test of irqbridge, in the order a failure is cheapest to find: formatting and lints,
# then the Rust test suites (unit, protocol, KVM on /dev/kvm), then the QEMU + Linux guest tests.
# Tests that need /dev/kvm or QEMU and cannot have it print "SKIPPED: <reason>".
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test"
cargo test --workspace
if [ -x ci/qemu-tests.sh ]; then
    echo "== QEMU guest tests"
    ci/qemu-tests.sh
fi
