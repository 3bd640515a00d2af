#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Builds Cloud Hypervisor from a source checkout into the cache, for the Cloud Hypervisor test
# (integration/tests/cloud_hypervisor.rs). Idempotent: a second run with the same sources is a
# no-op. It downloads nothing itself; cargo fetches crates from crates.io.
#
# Usage: CH_SRC=/path/to/cloud-hypervisor [MICRO_HTTP_SRC=/path/to/micro-http] \
#            ci/setup-cloud-hypervisor.sh
#   CH_SRC          a working tree of github.com/cloud-hypervisor/cloud-hypervisor (required).
#   MICRO_HTTP_SRC  a working tree of github.com/firecracker-microvm/micro-http at the commit
#                   CH_SRC's Cargo.lock pins; when set, cargo uses it instead of fetching that git
#                   dependency (through a [patch] given on the cargo command line; no file in
#                   CH_SRC or in this repository is edited except CH_SRC's Cargo.lock source line).
#   IRQBRIDGE_CACHE cache root (default /var/cache/irqbridge).
# Result: $IRQBRIDGE_CACHE/cloud-hypervisor/bin/cloud-hypervisor (the test looks there), build
# log in $IRQBRIDGE_CACHE/cloud-hypervisor/build.log. Takes about 5-15 minutes on 2 cores.
set -euo pipefail

IRQBRIDGE_CACHE=${IRQBRIDGE_CACHE:-/var/cache/irqbridge}
DIR=$IRQBRIDGE_CACHE/cloud-hypervisor
BIN=$DIR/bin/cloud-hypervisor
STAMP=$DIR/bin/.source
LOG=$DIR/build.log
# Bump when the recipe below changes, so that a cached binary is rebuilt.
RECIPE=1
MICRO_HTTP_URL=https://github.com/firecracker-microvm/micro-http

log() { printf '[%s %s] %s\n' "$(date +%H:%M:%S)" "${0##*/}" "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ -n "${CH_SRC:-}" ] || die "set CH_SRC to a Cloud Hypervisor source checkout"
[ -f "$CH_SRC/Cargo.toml" ] && [ -d "$CH_SRC/vmm" ] || die "CH_SRC=$CH_SRC is not a Cloud Hypervisor source tree"
CH_SRC=$(cd "$CH_SRC" && pwd)

# What identifies the sources: the commit (plus "-dirty" for local changes) or, without git,
# the checkout's path.
source_id() {
    local src=$1 id
    if id=$(git -C "$src" rev-parse HEAD 2>/dev/null); then
        # Cargo.lock is rewritten by the [patch] below: not a change of the sources.
        if [ -n "$(git -C "$src" status --porcelain --untracked-files=no -- . ':!Cargo.lock' 2>/dev/null)" ]; then
            id="$id-dirty"
        fi
        echo "$id"
    else
        echo "path:$src"
    fi
}

# First line of `cloud-hypervisor --version`.
version() {
    local v
    v=$("$BIN" --version 2>/dev/null) || return 1
    echo "${v%%$'\n'*}"
}

WANT="recipe=$RECIPE ch=$(source_id "$CH_SRC")"
PATCH=()
if [ -n "${MICRO_HTTP_SRC:-}" ]; then
    [ -f "$MICRO_HTTP_SRC/Cargo.toml" ] || die "MICRO_HTTP_SRC=$MICRO_HTTP_SRC has no Cargo.toml"
    MICRO_HTTP_SRC=$(cd "$MICRO_HTTP_SRC" && pwd)
    pinned=$(sed -n 's/^source = "git+https:\/\/github.com\/firecracker-microvm\/micro-http[^#]*#\([0-9a-f]*\)"$/\1/p' "$CH_SRC/Cargo.lock" | head -n1)
    have=$(git -C "$MICRO_HTTP_SRC" rev-parse HEAD 2>/dev/null || echo unknown)
    if [ -n "$pinned" ] && [ "$have" != "$pinned" ]; then
        log "warning: MICRO_HTTP_SRC is at $have, CH_SRC's Cargo.lock pins $pinned"
    fi
    PATCH=(--config "patch.\"$MICRO_HTTP_URL\".micro_http.path=\"$MICRO_HTTP_SRC\"")
    WANT="$WANT micro-http=$(source_id "$MICRO_HTTP_SRC")"
fi

if [ -x "$BIN" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && version >/dev/null; then
    log "Cloud Hypervisor ready: $BIN ($(version))"
    exit 0
fi

command -v cargo >/dev/null || die "cargo not found"
mkdir -p "$DIR/bin"
log "building Cloud Hypervisor from $CH_SRC (log: $LOG)"
start=$(date +%s)
if ! (cd "$CH_SRC" && nice cargo build "${PATCH[@]}" --release --bin cloud-hypervisor \
    --no-default-features --features kvm --target-dir "$DIR/target") >"$LOG" 2>&1; then
    tail -n 40 "$LOG" >&2
    if [ ${#PATCH[@]} = 0 ] && grep -q micro-http "$LOG"; then
        log "hint: cargo could not fetch the micro-http git dependency; set MICRO_HTTP_SRC to a" \
            "checkout of $MICRO_HTTP_URL at the commit CH_SRC's Cargo.lock pins"
    fi
    die "cargo build failed (log: $LOG)"
fi
install -m 755 "$DIR/target/release/cloud-hypervisor" "$BIN.new"
mv "$BIN.new" "$BIN"
echo "$WANT" >"$STAMP"
log "built in $(($(date +%s) - start)) s: $BIN ($(version))"
