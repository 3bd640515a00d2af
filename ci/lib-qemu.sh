# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Shared helpers for the QEMU + Linux guest scripts (sourced, not run).
# shellcheck shell=bash

IRQBRIDGE_CACHE=${IRQBRIDGE_CACHE:-/var/cache/irqbridge}
export IRQBRIDGE_CACHE

log() { printf '[%s %s] %s\n' "$(date +%H:%M:%S)" "${0##*/}" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Prints "SKIPPED: <reason>" loudly and exits 0. Only for a machine that cannot run QEMU at all.
skip() {
    printf '\n*** SKIPPED: %s ***\n\n' "$*" >&2
    printf 'SKIPPED: %s\n' "$*"
    exit 0
}

APT_GET=(apt-get -o DPkg::Lock::Timeout=300 -o Acquire::Retries=3 -o APT::Sandbox::User=root -y -q)
_apt_updated=0

# Runs a command with its output in LOGFILE; on failure shows the log's tail and fails.
quietly() {
    local logfile=$1
    shift
    mkdir -p "$(dirname "$logfile")"
    if ! "$@" >>"$logfile" 2>&1; then
        tail -n 40 "$logfile" >&2
        die "failed: $* (log: $logfile)"
    fi
}

apt_update_once() {
    if [ "$_apt_updated" = 0 ]; then
        log "apt-get update"
        quietly "$IRQBRIDGE_CACHE/logs/apt.log" "${APT_GET[@]}" update
        _apt_updated=1
    fi
}

# True when every named Debian package is installed on the host.
apt_have() {
    local p st
    for p in "$@"; do
        st=$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null || true)
        [ "${st:0:2}" = "ii" ] || return 1
    done
}

# Installs the named host packages that are missing (one apt-get update at most).
apt_ensure() {
    local missing=() p
    for p in "$@"; do
        apt_have "$p" || missing+=("$p")
    done
    [ "${#missing[@]}" = 0 ] && return 0
    [ "$(id -u)" = 0 ] || die "need root to install: ${missing[*]}"
    apt_update_once
    log "apt-get install ${missing[*]}"
    quietly "$IRQBRIDGE_CACHE/logs/apt.log" env DEBIAN_FRONTEND=noninteractive \
        "${APT_GET[@]}" install --no-install-recommends "${missing[@]}"
}

# The Debian archive URL the host's apt sources already use (deb822 or one-line format).
debian_mirror() {
    local url
    url=$(
        {
            grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{for (i = 2; i <= NF; i++) print $i}'
            grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list |
                sed -E 's/^deb +(\[[^]]*\] +)?//' | awk '{print $1}'
        } | grep -E '/debian/?$' | grep -v -- '-security' | head -n1
    )
    printf '%s\n' "${url:-http://deb.debian.org/debian}" | sed 's:/*$::'
}

# The Debian security archive URL that goes with debian_mirror.
debian_security_mirror() {
    local url
    url=$(
        {
            grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{for (i = 2; i <= NF; i++) print $i}'
            grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list |
                sed -E 's/^deb +(\[[^]]*\] +)?//' | awk '{print $1}'
        } | grep -E '/debian-security/?$' | head -n1
    )
    if [ -z "$url" ]; then
        url="$(debian_mirror)-security"
    fi
    printf '%s\n' "$url" | sed 's:/*$::'
}

# Seconds since the epoch with a fraction, for timings.
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
