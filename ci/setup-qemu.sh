#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Installs QEMU 11.x (with vfio-user-pci) for the Linux guest tests, cached and idempotent.
#
# Debian 12 has no QEMU with a vfio-user client, so this debootstraps a minimal Debian trixie
# root into the cache and installs qemu-system-x86 from trixie-backports inside it. The QEMU
# binary then runs on the host through that root's own dynamic loader: see ci/qemu.
#
# Usage: ci/setup-qemu.sh            (root; a second run is a no-op)
# Env:   IRQBRIDGE_CACHE (default /var/cache/irqbridge); the root is $IRQBRIDGE_CACHE/qemu-root.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=ci/lib-qemu.sh
. "$HERE/lib-qemu.sh"

ROOT=${IRQBRIDGE_QEMU_ROOT:-$IRQBRIDGE_CACHE/qemu-root}
STAMP=$ROOT/.irqbridge-qemu-ready
# Bump when the recipe below changes, so that cached roots are rebuilt.
RECIPE=1

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$RECIPE" ] && "$HERE/qemu" -device help 2>/dev/null |
    grep -q '"vfio-user-pci"'; then
    log "QEMU root ready: $ROOT ($("$HERE/qemu" --version | head -n1))"
    exit 0
fi

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot)"
start=$(now)

# Host tools for this script and the guest kernel/initramfs scripts.
apt_ensure debootstrap debian-archive-keyring kmod busybox-static xz-utils zstd lz4 cpio binutils

MIRROR=$(debian_mirror)
SECURITY=$(debian_security_mirror)
log "Debian mirror: $MIRROR (security: $SECURITY)"

mkdir -p "$IRQBRIDGE_CACHE/logs"
if [ ! -x "$ROOT/usr/bin/apt-get" ] || [ ! -f "$ROOT/.irqbridge-debootstrap-done" ]; then
    log "debootstrap --variant=minbase trixie $ROOT"
    rm -rf "$ROOT" "$ROOT.partial"
    t=$(now)
    debootstrap --variant=minbase --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
        trixie "$ROOT.partial" "$MIRROR" >"$IRQBRIDGE_CACHE/logs/debootstrap.log" 2>&1 || {
        tail -n 30 "$IRQBRIDGE_CACHE/logs/debootstrap.log" >&2
        die "debootstrap failed (log: $IRQBRIDGE_CACHE/logs/debootstrap.log)"
    }
    mv "$ROOT.partial" "$ROOT"
    touch "$ROOT/.irqbridge-debootstrap-done"
    log "debootstrap took $(elapsed "$t") s"
fi

cat >"$ROOT/etc/apt/sources.list" <<EOF
deb $MIRROR trixie main
deb $MIRROR trixie-updates main
deb $SECURITY trixie-security main
deb $MIRROR trixie-backports main
EOF
rm -f "$ROOT/etc/apt/sources.list.d/debian.sources"
# No daemons start inside the chroot.
printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
chmod 755 "$ROOT/usr/sbin/policy-rc.d"
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true

mounted=()
cleanup() {
    local i
    for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
        umount -l "${mounted[$i]}" 2>/dev/null || true
    done
}
trap cleanup EXIT
for m in proc dev; do
    if ! mountpoint -q "$ROOT/$m"; then
        if [ "$m" = proc ]; then mount -t proc proc "$ROOT/proc"; else mount --bind /dev "$ROOT/dev"; fi
        mounted+=("$ROOT/$m")
    fi
done

t=$(now)
log "chroot: apt-get install -t trixie-backports qemu-system-x86"
LOGF=$IRQBRIDGE_CACHE/logs/qemu-root-apt.log
quietly "$LOGF" chroot "$ROOT" env DEBIAN_FRONTEND=noninteractive LC_ALL=C \
    apt-get -o DPkg::Lock::Timeout=300 -o Acquire::Retries=3 -y -q update
quietly "$LOGF" chroot "$ROOT" env DEBIAN_FRONTEND=noninteractive LC_ALL=C \
    apt-get -o DPkg::Lock::Timeout=300 -o Acquire::Retries=3 -y -q install --no-install-recommends \
    -t trixie-backports qemu-system-x86
quietly "$LOGF" chroot "$ROOT" apt-get clean
log "QEMU install took $(elapsed "$t") s"
cleanup
mounted=()

"$HERE/qemu" --version | head -n1 >&2
if ! "$HERE/qemu" -device help | grep -q '"vfio-user-pci"'; then
    die "the installed QEMU lists no vfio-user-pci device"
fi
echo "$RECIPE" >"$STAMP"
log "QEMU root ready in $(elapsed "$start") s: $ROOT ($(du -sh "$ROOT" | cut -f1))"
