#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Documentation and packaging checks:
#   1. rustdoc of every workspace crate with warnings denied (broken intra-doc links, bad
#      code blocks, missing docs where a crate denies them);
#   2. the shipped examples: systemd units (`systemd-analyze verify`, where available) and the
#      vhost-user backend descriptor (JSON with the schema's required fields);
#   3. `cargo package` of every publishable library crate, verified: the crates are packaged
#      together in one invocation, so cargo resolves the path dependencies between them through
#      a temporary local registry (target/package/tmp-registry) instead of crates.io, where
#      they are not published yet. Measured with cargo 1.95: a crate with irqbridge
#      dependencies packaged alone (`cargo package -p irqbridge-kvm`) fails even with
#      `--no-verify`, because cargo resolves its lock file against crates.io; it packages with
#      `--no-verify --exclude-lockfile`. `cargo package --workspace` fails on the unpublished
#      packages (irqbridge, irqbridge-integration, irqbridge-guest), whose path dependencies
#      carry no version.
#
# Usage: ci/doc.sh [--no-package]
set -euo pipefail
cd "$(dirname "$0")/.."

PUBLISHED=(irqbridge-core irqbridge-sys irqbridge-vfio-user irqbridge-vhost-user irqbridge-kvm)

echo "== cargo doc (warnings denied)"
RUSTDOCFLAGS="${RUSTDOCFLAGS:-} -D warnings" cargo doc --no-deps --workspace --quiet

echo "== docs/systemd units and docs/vhost-user descriptor"
python3 - docs/vhost-user/*.json <<'PY'
import json, sys
for path in sys.argv[1:]:
    d = json.load(open(path))
    for field in ("description", "type", "binary"):
        if not isinstance(d.get(field), str):
            sys.exit(f"{path}: '{field}' must be a string")
    if not d["binary"].startswith("/"):
        sys.exit(f"{path}: 'binary' must be an absolute path")
PY
if command -v systemd-analyze >/dev/null; then
    units=$(mktemp -d)
    trap 'rm -rf "$units"' EXIT
    # Template units are verified as an instance ("@ci"), with ExecStart= pointing at a binary
    # that exists here.
    bin=$(command -v true)
    for u in docs/systemd/*@.socket docs/systemd/*@.service; do
        name=$(basename "$u")
        sed "s#/usr/bin/irqbridge#$bin#" "$u" >"$units/${name/@./@ci.}"
    done
    # Unknown keys are only warnings for systemd-analyze: any output fails the check.
    out=$(SYSTEMD_LOG_LEVEL=notice systemd-analyze verify --man=no "$units"/* 2>&1) || {
        echo "$out" >&2
        exit 1
    }
    if [ -n "$out" ]; then
        echo "$out" >&2
        exit 1
    fi
else
    echo "systemd-analyze not found: units not verified"
fi

if [ "${1:-}" != --no-package ]; then
    echo "== cargo package (${PUBLISHED[*]})"
    args=()
    for c in "${PUBLISHED[@]}"; do args+=(-p "$c"); done
    # cargo verifies each package against the others through a temporary local registry and
    # unpacks them under $CARGO_HOME/registry/src/-<hash>/ (one hash per checkout path); a
    # second run with the same version reuses that unpacked copy, and its builds (registry
    # sources are never re-fingerprinted), even when the sources changed. Start both afresh:
    # our crates' unpacked copies (never crates.io's) and a target dir of its own.
    for d in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/-*/irqbridge-*; do
        [ -d "$d" ] && rm -rf "$d"
    done
    verify_dir="${CARGO_TARGET_DIR:-target}/package-verify"
    rm -rf "$verify_dir"
    # --allow-dirty: CI checks out exactly the commit, but local runs may have edits.
    cargo package --quiet --allow-dirty --target-dir "$verify_dir" "${args[@]}"
    # Every other package must say so.
    unpublished=$(cargo metadata --no-deps --format-version 1 |
        python3 -c 'import json,sys
pub=set(sys.argv[1:])
for p in json.load(sys.stdin)["packages"]:
    if p["name"] not in pub and p.get("publish") != []:
        print(p["name"])' "${PUBLISHED[@]}")
    if [ -n "$unpublished" ]; then
        echo "error: packages neither checked here nor publish = false: $unpublished" >&2
        exit 1
    fi
fi
echo "== docs and packages OK"
