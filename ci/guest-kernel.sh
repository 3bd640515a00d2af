#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Fetches and unpacks the guest kernel (Debian's linux-image-cloud-amd64), cached and idempotent.
#
# The versioned package behind the metapackage changes with every security update, so it is
# resolved with apt-cache, fetched with apt-get download and unpacked with dpkg -x (never
# installed). The ELF vmlinux is cut out of vmlinuz: it carries the PVH entry note, and QEMU boots
# it directly (fastest under TCG). depmod -b creates the modules.dep that the .deb does not ship.
#
# Usage: ci/guest-kernel.sh      prints the path of kernel.env (KVER, KROOT, KERNEL: the image to boot, VMLINUZ)
# Env:   IRQBRIDGE_CACHE (default /var/cache/irqbridge)
#        IRQBRIDGE_KERNEL_REFRESH=1  re-resolve the package even when a kernel is cached
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=ci/lib-qemu.sh
. "$HERE/lib-qemu.sh"

KBASE=$IRQBRIDGE_CACHE/kernel
CURRENT=$KBASE/current
META=linux-image-cloud-amd64

if [ "${IRQBRIDGE_KERNEL_REFRESH:-0}" != 1 ] && [ -f "$CURRENT/kernel.env" ]; then
    log "guest kernel cached: $(readlink -f "$CURRENT")"
    echo "$CURRENT/kernel.env"
    exit 0
fi

[ "$(id -u)" = 0 ] || die "must run as root (apt-get)"
start=$(now)
mkdir -p "$IRQBRIDGE_CACHE/logs"
apt_ensure kmod xz-utils zstd lz4 binutils

resolve() {
    LC_ALL=C apt-cache depends "$META" 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'
}
# resolve_version: sets PKG and VERSION from the apt lists (updating them once if needed).
resolve_version() {
    PKG=$(resolve || true)
    if [ -z "$PKG" ]; then
        apt_update_once
        PKG=$(resolve || true)
    fi
    [ -n "$PKG" ] || die "apt-cache could not resolve $META to a versioned linux-image package"
    VERSION=$(LC_ALL=C apt-cache policy "$PKG" | awk '$1 == "Candidate:" { print $2 }')
    DIR=$KBASE/$PKG-$VERSION
}

download() { # into $DIR.partial/deb
    rm -rf "$DIR" "$DIR.partial"
    mkdir -p "$DIR.partial/deb"
    (cd "$DIR.partial/deb" && "${APT_GET[@]}" download "$PKG=$VERSION") >>"$IRQBRIDGE_CACHE/logs/apt.log" 2>&1
}

resolve_version
log "guest kernel package: $PKG $VERSION"
if [ ! -f "$DIR/kernel.env" ]; then
    if ! download; then
        # Stale lists name a version the mirror no longer has: update, resolve again, retry.
        rm -rf "$DIR.partial"
        apt_update_once
        resolve_version
        log "guest kernel package after apt-get update: $PKG $VERSION"
        download || {
            tail -n 20 "$IRQBRIDGE_CACHE/logs/apt.log" >&2
            die "apt-get download $PKG=$VERSION failed"
        }
    fi
    dpkg -x "$DIR.partial"/deb/*.deb "$DIR.partial/root"
    KVER=$(basename "$(find "$DIR.partial/root/lib/modules" "$DIR.partial/root/usr/lib/modules" \
        -mindepth 1 -maxdepth 1 -type d 2>/dev/null | head -n1)")
    [ -n "$KVER" ] || die "no lib/modules/<version> in $PKG"
    # Modules may sit under usr/lib (merged /usr); depmod -b wants BASE/lib/modules.
    if [ ! -d "$DIR.partial/root/lib/modules/$KVER" ]; then
        mkdir -p "$DIR.partial/root/lib"
        ln -s ../usr/lib/modules "$DIR.partial/root/lib/modules"
    fi
    depmod -b "$DIR.partial/root" "$KVER"
    VMLINUZ=$DIR.partial/root/boot/vmlinuz-$KVER
    [ -f "$VMLINUZ" ] || die "no boot/vmlinuz-$KVER in $PKG"

    # Cut the ELF vmlinux out of the bzImage: try each compressor magic until one yields an ELF.
    vml=$DIR.partial/vmlinux
    found=0
    for spec in 'xz:\xfd\x37\x7a\x58\x5a\x00' 'zstd:\x28\xb5\x2f\xfd' 'gzip:\x1f\x8b\x08' \
        'lz4:\x02\x21\x4c\x18'; do
        tool=${spec%%:*}
        magic=${spec#*:}
        for off in $(LC_ALL=C grep -obUaP "$magic" "$VMLINUZ" | cut -d: -f1 | head -n 8); do
            tail -c "+$((off + 1))" "$VMLINUZ" | "$tool" -dc >"$vml" 2>/dev/null || true
            if [ "$(head -c 4 "$vml" | od -An -c | tr -d ' ')" = '177ELF' ]; then
                found=1
                break 2
            fi
        done
    done
    if [ "$found" = 1 ]; then
        if LC_ALL=C readelf -n "$vml" 2>/dev/null | grep -q 'Xen'; then
            BOOT=$DIR/vmlinux
            log "vmlinux extracted ($tool), PVH note present"
        else
            BOOT=$DIR/root/boot/vmlinuz-$KVER
            log "vmlinux has no PVH note: booting the bzImage"
        fi
    else
        rm -f "$vml"
        BOOT=$DIR/root/boot/vmlinuz-$KVER
        log "could not extract an ELF vmlinux: booting the bzImage"
    fi
    rm -rf "$DIR.partial/deb"
    cat >"$DIR.partial/kernel.env" <<EOF
KPKG=$PKG
KPKG_VERSION=$VERSION
KVER=$KVER
KROOT=$DIR/root
VMLINUZ=$DIR/root/boot/vmlinuz-$KVER
KERNEL=$BOOT
EOF
    mv "$DIR.partial" "$DIR"
fi
ln -sfn "$(basename "$DIR")" "$CURRENT.tmp"
mv -T "$CURRENT.tmp" "$CURRENT"
# Older kernels in the cache are superseded.
find "$KBASE" -mindepth 1 -maxdepth 1 -type d ! -name "$(basename "$DIR")" -exec rm -rf {} +
log "guest kernel ready in $(elapsed "$start") s: $DIR"
echo "$CURRENT/kernel.env"
