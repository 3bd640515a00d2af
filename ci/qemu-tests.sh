#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# QEMU + Linux guest tests: QEMU 11.1 (TCG) with a vfio-user-pci device served by
# `irqbridge vfio-user`, driven from inside a Debian guest kernel by irqbridge-guest through
# sysfs, uio_pci_generic and vfio-pci (behind an emulated intel-iommu); and the virtio
# event-channel device served by the irqbridge vhost-user backend behind QEMU's generic
# vhost-user-test-device-pci, driven by irqbridge-guest's userspace virtio-pci driver.
#
# Cases (all by default; choose with IRQBRIDGE_QEMU_CASES="uio vfio reboot vhost"):
#   uio     no vIOMMU:   boot enum doorbell uio-intx
#   vfio    intel-iommu: all scenarios (enum doorbell uio-intx vfio evtchn)
#   reboot  intel-iommu: the guest runs vfio evtchn doorbell, reboots (QEMU resets the device),
#           runs them again; then a second QEMU connects to the same, still running server
#           and runs them a third time (the server keeps serving after a client disconnects).
#   vhost   intel-iommu: `-chardev socket -device vhost-user-test-device-pci` connected to the
#           event-channel backend (`irqbridge vhost-user` with loopback links
#           --link 1:5 --link 2:70 --link 3:700), one upcall (num_vqs 3, config_size 24); the guest binds the
#           device to vfio-pci and runs scenario vhost-evtchn (INTx, exact upcall counts).
#   passthrough  intel-iommu + QEMU's edu device: the guest binds edu to its vfio-pci, runs
#           `irqbridge passthrough --device BDF --socket-path /tmp/p.sock --mmap-bars` (a static
#           build in the initramfs) and drives it with a vfio-user client holding plain eventfds
#           (scenario passthrough: INTx with the resample eventfd, MSI, DMA, server wakeups,
#           reset, a second client); then the same for QEMU's e1000e: MSI-X raised with IMS/ICS,
#           table mask and function mask → pending → exactly one on unmask; then the irqbridge
#           test device, served into QEMU by a host `irqbridge vfio-user`, passed through again
#           (INTx with the resample eventfd, MSI-X with mask → pending → exactly one).
#
# Every QEMU run has a hard timeout. Fails on any FAIL line, a missing result or DONE line, a
# timeout or a server that died. Prints "SKIPPED: <reason>" and exits 0 only on a machine where
# QEMU cannot be set up at all (not x86_64, no apt, not root with no cache).
#
# Env: IRQBRIDGE_CACHE           cache for QEMU, kernel (default /var/cache/irqbridge)
#      IRQBRIDGE_QEMU_OUT        logs and sockets (default target-qemu-tests in the repo)
#      IRQBRIDGE_QEMU_TIMEOUT    seconds per QEMU run (default 240)
#      IRQBRIDGE_QEMU_CASES      cases to run
#      CARGO_TARGET_DIR          where the server is built (cargo's default otherwise)
#      IRQBRIDGE_SERVER          an irqbridge binary to use instead of building bin/irqbridge (run
#                                as `$IRQBRIDGE_SERVER vfio-user --socket-path PATH` and
#                                `$IRQBRIDGE_SERVER vhost-user --socket-path PATH --link ...`)
#      IRQBRIDGE_VHOST_VIRTIO_ID virtio device ID of the vhost case (default 21, the backend's
#                                default). QEMU 11.1 aborts on an ID it has no name for (only
#                                1-13, 16-41 and 45 work).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
# shellcheck source=ci/lib-qemu.sh
. "$HERE/lib-qemu.sh"

T0=$(now)
OUT=${IRQBRIDGE_QEMU_OUT:-$REPO/target-qemu-tests}
QTIMEOUT=${IRQBRIDGE_QEMU_TIMEOUT:-240}
CASES=${IRQBRIDGE_QEMU_CASES:-uio vfio reboot vhost passthrough}
VHOST_VIRTIO_ID=${IRQBRIDGE_VHOST_VIRTIO_ID:-21}
# One upcall: control + doorbell + one event queue (crates/irqbridge-vhost-user/src/abi.rs).
VHOST_UPCALLS=1
VHOST_CONFIG_SIZE=24
# Sender:receiver port pairs; integration/guest/src/vhost_evtchn.rs (LINKS) expects these.
VHOST_LINKS=(1:5 2:70 3:700)

# --- can this machine run QEMU at all? ---------------------------------------------------------
[ "$(uname -m)" = x86_64 ] || skip "QEMU guest tests need an x86_64 host (this is $(uname -m))"
if [ "$(id -u)" != 0 ] && ! "$HERE/qemu" --version >/dev/null 2>&1; then
    skip "QEMU is not set up in $IRQBRIDGE_CACHE and setting it up needs root"
fi
command -v apt-get >/dev/null || "$HERE/qemu" --version >/dev/null 2>&1 ||
    skip "no apt-get to install QEMU 11 with (not a Debian machine)"

# --- setup (cached) ------------------------------------------------------------------------------
t=$(now)
"$HERE/setup-qemu.sh"
mkdir -p "$OUT"
rm -f "$OUT"/*.log "$OUT"/*.sock
if [[ " $CASES " == *" passthrough "* ]]; then
    export IRQBRIDGE_GUEST_SERVER=1
fi
"$HERE/build-initramfs.sh" "$OUT/initramfs.cpio.gz"
KENV=$("$HERE/guest-kernel.sh" 2>/dev/null)
# shellcheck disable=SC1090
. "$KENV"
SERVER=
if [[ " $CASES " =~ \ (uio|vfio|reboot|vhost|passthrough)\  ]]; then
    if [ -n "${IRQBRIDGE_SERVER:-}" ]; then
        SERVER=$IRQBRIDGE_SERVER
    else
        log "building the server (cargo build -p irqbridge)"
        (cd "$REPO" && nice cargo build --quiet -p irqbridge)
        SERVER=${CARGO_TARGET_DIR:-$REPO/target}/debug/irqbridge
    fi
    [ -x "$SERVER" ] || die "no server binary at $SERVER"
fi
VHOST_DEVICE=
if [[ " $CASES " == *" vhost "* ]]; then
    # The generic device was vhost-user-device-pci before QEMU 10.2.
    for d in vhost-user-test-device-pci vhost-user-device-pci; do
        if "$HERE/qemu" -device help 2>/dev/null | grep -q "\"$d\""; then
            VHOST_DEVICE=$d
            break
        fi
    done
fi
SETUP_TIME=$(elapsed "$t")
log "setup done in $SETUP_TIME s"

# --- helpers -------------------------------------------------------------------------------------
PASSED=0
FAILED=0
FAILURES=()
SERVER_PID=
QEMU_PID=

cleanup() {
    if [ -n "$QEMU_PID" ] && kill -0 "$QEMU_PID" 2>/dev/null; then kill "$QEMU_PID" 2>/dev/null || true; fi
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then kill "$SERVER_PID" 2>/dev/null || true; fi
}
trap cleanup EXIT

fail() {
    FAILED=$((FAILED + 1))
    FAILURES+=("$1")
    log "FAIL: $1"
}

# start_server NAME: starts the server on $OUT/NAME.sock (sets SOCK and SERVER_PID).
start_server() {
    local sock=$OUT/$1.sock
    SOCK=$sock
    rm -f "$sock"
    RUST_LOG=${RUST_LOG:-info} "$SERVER" vfio-user --socket-path "$SOCK" >"$OUT/$1.server.log" 2>&1 &
    SERVER_PID=$!
    local deadline=$((SECONDS + 20))
    until [ -S "$SOCK" ]; do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            tail -n 20 "$OUT/$1.server.log" >&2
            SERVER_PID=
            return 1
        fi
        [ "$SECONDS" -lt "$deadline" ] || { tail -n 20 "$OUT/$1.server.log" >&2; return 1; }
        sleep 0.1
    done
}

# start_vhost_backend NAME: starts `irqbridge vhost-user` on $OUT/NAME.sock and waits for the
# socket, which it binds only after the links exist (sets SOCK and SERVER_PID, so that
# stop_server stops it).
start_vhost_backend() {
    local sock=$OUT/$1.sock log=$OUT/$1.server.log l links=()
    SOCK=$sock
    rm -f "$sock"
    for l in "${VHOST_LINKS[@]}"; do links+=(--link "$l"); done
    RUST_LOG=${RUST_LOG:-info} "$SERVER" vhost-user --socket-path "$SOCK" --upcalls "$VHOST_UPCALLS" \
        --virtio-id "$VHOST_VIRTIO_ID" "${links[@]}" >"$log" 2>&1 &
    SERVER_PID=$!
    local deadline=$((SECONDS + 20))
    until [ -S "$SOCK" ]; do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            tail -n 20 "$log" >&2
            SERVER_PID=
            return 1
        fi
        [ "$SECONDS" -lt "$deadline" ] || { tail -n 20 "$log" >&2; return 1; }
        sleep 0.1
    done
}

stop_server() { # name; fails if the server had died
    local rc=0
    if [ -n "$SERVER_PID" ]; then
        if kill -0 "$SERVER_PID" 2>/dev/null; then
            kill "$SERVER_PID"
            wait "$SERVER_PID" 2>/dev/null || true
        else
            wait "$SERVER_PID" 2>/dev/null || rc=$?
            fail "$1: the server exited early (status $rc); log $OUT/$1.server.log"
            tail -n 30 "$OUT/$1.server.log" >&2
        fi
    fi
    SERVER_PID=
}

# run_qemu NAME SOCK IOMMU(0|1) BOOTS GUEST-ARGS [DEVICE-ARGS...]: boots QEMU until BOOTS
# IRQBRIDGE-DONE lines appeared on the serial console (the guest reboots between them), QEMU
# exited, or the timeout. The device is a vfio-user-pci on SOCK unless DEVICE-ARGS (QEMU
# arguments) are given.
run_qemu() {
    local name=$1 sock=$2 iommu=$3 boots=$4 args=$5
    shift 5
    local devargs=("$@")
    local serial=$OUT/$name.serial.log cmdline dev
    cmdline="console=ttyS0 loglevel=4 panic=-1 irqbridge.args=$args"
    local extra=()
    if [ "$iommu" = 1 ]; then
        extra+=(-device "intel-iommu,intremap=on,caching-mode=on")
        cmdline="$cmdline intel_iommu=on"
    fi
    if [ "$boots" -gt 1 ]; then
        cmdline="$cmdline irqbridge.reboot=1"
    else
        extra+=(-no-reboot)
    fi
    if [ "${#devargs[@]}" = 0 ]; then
        dev=$(printf '{"driver":"vfio-user-pci","socket":{"type":"unix","path":"%s"}}' "$sock")
        devargs=(-device "$dev")
    fi
    : >"$serial"
    local t
    t=$(now)
    timeout -k 5 "$QTIMEOUT" "$HERE/qemu" -accel tcg -nodefaults -no-user-config -display none \
        -machine q35,memory-backend=mem -m 512M -smp 1 \
        -object memory-backend-memfd,id=mem,size=512M,share=on \
        "${extra[@]}" "${devargs[@]}" \
        -serial "file:$serial" -kernel "$KERNEL" -initrd "$OUT/initramfs.cpio.gz" \
        -append "$cmdline" </dev/null >"$OUT/$name.qemu.log" 2>&1 &
    QEMU_PID=$!
    local rc=running
    while :; do
        if ! kill -0 "$QEMU_PID" 2>/dev/null; then
            rc=0
            wait "$QEMU_PID" || rc=$?
            break
        fi
        if [ "$(tr -d '\r' <"$serial" | grep -c '^IRQBRIDGE-DONE')" -ge "$boots" ] && [ "$boots" -gt 1 ]; then
            kill "$QEMU_PID" 2>/dev/null || true
            wait "$QEMU_PID" 2>/dev/null || true
            rc=0
            break
        fi
        sleep 0.2
    done
    QEMU_PID=
    log "$name: QEMU ran $(elapsed "$t") s (exit $rc)"
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        fail "$name: QEMU timed out after $QTIMEOUT s"
    elif [ "$rc" != 0 ]; then
        fail "$name: QEMU exited with status $rc ($(tail -n 3 "$OUT/$name.qemu.log" | tr '\n' ' '))"
    fi
}

# check_serial NAME BOOTS RESULT-NAME...: every named result passed in each of BOOTS boots.
check_serial() {
    local name=$1 boots=$2
    shift 2
    local serial=$OUT/$name.serial.log text r n
    text=$(tr -d '\r' <"$serial")
    grep -a '^IRQBRIDGE-RESULT' <<<"$text" | sed "s/^/  [$name] /" || true
    n=$(grep -ac '^IRQBRIDGE-DONE' <<<"$text" || true)
    if [ "$n" -lt "$boots" ]; then
        fail "$name: $n of $boots IRQBRIDGE-DONE lines on the serial console"
        tail -n 40 "$serial" >&2
    fi
    while read -r r; do
        [ -n "$r" ] && fail "$name: $r"
    done < <(grep -a '^IRQBRIDGE-RESULT .* status=FAIL' <<<"$text" || true)
    for r in "$@"; do
        n=$(grep -ac "^IRQBRIDGE-RESULT name=$r status=PASS" <<<"$text" || true)
        if [ "$n" -ge "$boots" ]; then
            PASSED=$((PASSED + 1))
        else
            fail "$name: result $r passed $n times, expected $boots"
        fi
    done
}

VFIO_RESULTS=(vfio-open vfio-intx vfio-msix vfio-msix-mask vfio-msi vfio-msi-mask vfio-msi-disable)
EVTCHN_RESULTS=(evtchn-setup evtchn-basic evtchn-coalesce evtchn-mask evtchn-unbind-close evtchn-totals)
PASSTHROUGH_RESULTS=(pt-open pt-intx pt-msi pt-dma pt-wakeups pt-reset pt-reconnect pt-bench pt-msix-direct pt-msix
    pt-nested-intx pt-nested-msix)
VHOST_RESULTS=(vhost-open vhost-init vhost-evtchn-setup vhost-evtchn-send vhost-evtchn-coalesce
    vhost-evtchn-doorbell vhost-evtchn-mask vhost-evtchn-totals)

# --- cases ---------------------------------------------------------------------------------------
for c in $CASES; do
    case "$c" in
    uio)
        start_server uio || { fail "uio: the server did not start"; continue; }
        run_qemu uio "$SOCK" 0 1 boot,enum,doorbell,uio-intx
        stop_server uio
        check_serial uio 1 boot enum doorbell uio-intx
        ;;
    vfio)
        start_server vfio || { fail "vfio: the server did not start"; continue; }
        run_qemu vfio "$SOCK" 1 1 all
        stop_server vfio
        check_serial vfio 1 enum doorbell uio-intx "${VFIO_RESULTS[@]}" "${EVTCHN_RESULTS[@]}"
        ;;
    reboot)
        start_server reboot || { fail "reboot: the server did not start"; continue; }
        run_qemu reboot "$SOCK" 1 2 vfio,evtchn,doorbell
        # The same server, a new client: QEMU connects again from scratch.
        if kill -0 "$SERVER_PID" 2>/dev/null; then
            run_qemu reconnect "$SOCK" 1 1 vfio,evtchn,doorbell
        else
            fail "reconnect: the server died during the reboot case"
        fi
        stop_server reboot
        check_serial reboot 2 "${VFIO_RESULTS[@]}" "${EVTCHN_RESULTS[@]}" doorbell
        [ -s "$OUT/reconnect.serial.log" ] &&
            check_serial reconnect 1 "${VFIO_RESULTS[@]}" "${EVTCHN_RESULTS[@]}" doorbell
        n=$(tr -d '\r' <"$OUT/reboot.serial.log" | grep -ac '^IRQBRIDGE-BOOT' || true)
        [ "$n" -ge 2 ] || fail "reboot: the guest booted $n times, expected 2"
        ;;
    vhost)
        if [ -z "$VHOST_DEVICE" ]; then
            fail "vhost: QEMU has neither vhost-user-test-device-pci nor vhost-user-device-pci"
            continue
        fi
        start_vhost_backend vhost || { fail "vhost: the backend did not start"; continue; }
        run_qemu vhost "$SOCK" 1 1 "boot,--virtio-id=$VHOST_VIRTIO_ID,vhost-evtchn" \
            -chardev "socket,id=vu,path=$SOCK" \
            -device "$VHOST_DEVICE,chardev=vu,virtio-id=$VHOST_VIRTIO_ID,num_vqs=$((2 + VHOST_UPCALLS)),config_size=$VHOST_CONFIG_SIZE"
        stop_server vhost
        check_serial vhost 1 boot "${VHOST_RESULTS[@]}"
        ;;
    passthrough)
        # The irqbridge test device comes from a host `irqbridge vfio-user` and is passed
        # through a second time inside the guest.
        start_server passthrough || { fail "passthrough: the server did not start"; continue; }
        run_qemu passthrough "$SOCK" 1 1 boot,passthrough -device edu -device e1000e \
            -device "$(printf '{"driver":"vfio-user-pci","socket":{"type":"unix","path":"%s"}}' "$SOCK")"
        stop_server passthrough
        check_serial passthrough 1 boot "${PASSTHROUGH_RESULTS[@]}"
        ;;
    *) die "unknown case $c (known: uio vfio reboot vhost passthrough)" ;;
    esac
done

echo
log "total $(elapsed "$T0") s (setup $SETUP_TIME s); logs in $OUT"
if [ "$FAILED" -gt 0 ]; then
    printf '  FAILED: %s\n' "${FAILURES[@]}" >&2
fi
echo "qemu-tests: $PASSED passed, $FAILED failed"
[ "$FAILED" = 0 ]
