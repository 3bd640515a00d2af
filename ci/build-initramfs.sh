#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Builds the guest initramfs: busybox-static, the modules for uio_pci_generic and vfio-pci (with
# vfio_iommu_type1 and all their dependencies, decompressed), the statically linked guest test
# program irqbridge-guest, and an /init that runs it and powers off.
#
# Usage: ci/build-initramfs.sh OUT.cpio.gz
# Env:   IRQBRIDGE_CACHE               cache root (see ci/guest-kernel.sh)
#        IRQBRIDGE_GUEST_BIN=PATH      use this guest binary instead of building it
#        IRQBRIDGE_GUEST_TARGET_DIR    cargo target dir for the guest build (default target-guest)
#        IRQBRIDGE_GUEST_SERVER=1      also put a static irqbridge binary in /bin (the passthrough
#                                      case runs `irqbridge passthrough` inside the guest)
#
# Kernel command line understood by /init:
#   irqbridge.args=a,b,c   arguments for irqbridge-guest (commas become spaces)
#   irqbridge.reboot=1     reboot -f instead of poweroff -f when the program is done
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
# shellcheck source=ci/lib-qemu.sh
. "$HERE/lib-qemu.sh"

[ $# = 1 ] || die "usage: $0 OUT.cpio.gz"
OUT=$1
start=$(now)

KENV=$("$HERE/guest-kernel.sh")
# shellcheck disable=SC1090
. "$KENV"
apt_ensure busybox-static cpio kmod xz-utils zstd

BUSYBOX=/bin/busybox
file_is_static() { ! LC_ALL=C readelf -l "$1" 2>/dev/null | grep -q 'Requesting program interpreter'; }
file_is_static "$BUSYBOX" || die "$BUSYBOX is not the static busybox (package busybox-static)"

if [ -n "${IRQBRIDGE_GUEST_BIN:-}" ]; then
    GUEST=$IRQBRIDGE_GUEST_BIN
else
    TDIR=${IRQBRIDGE_GUEST_TARGET_DIR:-$REPO/target-guest}
    PKGS=(-p irqbridge-guest)
    [ "${IRQBRIDGE_GUEST_SERVER:-0}" = 1 ] && PKGS+=(-p irqbridge)
    log "cargo build --release ${PKGS[*]} (static, target dir $TDIR)"
    (cd "$REPO" && CARGO_TARGET_DIR=$TDIR RUSTFLAGS='-C target-feature=+crt-static' \
        nice cargo build --quiet --release "${PKGS[@]}" --target x86_64-unknown-linux-gnu)
    GUEST=$TDIR/x86_64-unknown-linux-gnu/release/irqbridge-guest
    GUEST_SERVER=$TDIR/x86_64-unknown-linux-gnu/release/irqbridge
fi
[ -x "$GUEST" ] || die "no guest binary at $GUEST"
file_is_static "$GUEST" || die "$GUEST is dynamically linked"
if [ "${IRQBRIDGE_GUEST_SERVER:-0}" = 1 ]; then
    [ -x "${GUEST_SERVER:-}" ] || die "no static irqbridge binary for the guest (IRQBRIDGE_GUEST_SERVER=1)"
    file_is_static "$GUEST_SERVER" || die "$GUEST_SERVER is dynamically linked"
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/irqbridge-initramfs.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
R=$WORK/root
mkdir -p "$R"/{bin,dev,proc,sys,tmp,run,lib/modules}
cp "$BUSYBOX" "$R/bin/busybox"
ln -s busybox "$R/bin/sh"
cp "$GUEST" "$R/bin/irqbridge-guest"
if [ "${IRQBRIDGE_GUEST_SERVER:-0}" = 1 ]; then
    strip -o "$R/bin/irqbridge" "$GUEST_SERVER" 2>/dev/null || cp "$GUEST_SERVER" "$R/bin/irqbridge"
fi

# Modules in load order (dependencies first), decompressed so that busybox insmod can load them.
: >"$R/lib/modules/load-order"
for mod in uio_pci_generic vfio_iommu_type1 vfio-pci; do
    modprobe -C /dev/null -d "$KROOT" -S "$KVER" --show-depends "$mod" | while read -r kind path _; do
        [ "$kind" = insmod ] || continue
        name=$(basename "$path")
        name=${name%.xz}
        name=${name%.zst}
        name=${name%.gz}
        grep -qx "$name" "$R/lib/modules/load-order" && continue
        case "$path" in
        *.xz) xz -dc "$path" >"$R/lib/modules/$name" ;;
        *.zst) zstd -qdc "$path" >"$R/lib/modules/$name" ;;
        *.gz) gzip -dc "$path" >"$R/lib/modules/$name" ;;
        *) cp "$path" "$R/lib/modules/$name" ;;
        esac
        echo "$name" >>"$R/lib/modules/load-order"
    done
done
[ -s "$R/lib/modules/load-order" ] || die "no modules resolved for $KVER"

cat >"$R/init" <<'EOF'
#!/bin/sh
# irqbridge guest init: mount, load modules, run irqbridge-guest, power off (or reboot).
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "IRQBRIDGE-BOOT kernel=$(uname -r)"
for m in $(cat /lib/modules/load-order); do
    insmod "/lib/modules/$m" || echo "IRQBRIDGE-INIT insmod-failed=$m"
done
ARGS=
REBOOT=0
for w in $(cat /proc/cmdline); do
    case "$w" in
    irqbridge.args=*) ARGS=$(echo "${w#irqbridge.args=}" | tr ',' ' ') ;;
    irqbridge.reboot=1) REBOOT=1 ;;
    esac
done
/bin/irqbridge-guest $ARGS
echo "IRQBRIDGE-EXIT code=$?"
sync
if [ "$REBOOT" = 1 ]; then
    reboot -f
else
    poweroff -f
fi
# poweroff -f does not return; if it did, make the kernel panic (QEMU -no-reboot exits).
exit 1
EOF
chmod 755 "$R/init"

mkdir -p "$(dirname "$OUT")"
(cd "$R" && find . -print0 | LC_ALL=C sort -z | cpio --quiet -o -0 -H newc -R 0:0 | gzip -1 >"$WORK/out.cpio.gz")
mv "$WORK/out.cpio.gz" "$OUT"
log "initramfs $OUT ($(du -h "$OUT" | cut -f1), modules: $(tr '\n' ' ' <"$R/lib/modules/load-order")) in $(elapsed "$start") s"
