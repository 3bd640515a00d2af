#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# SPDX license headers on the project's source files.
#
#   ci/spdx.sh --check   list the files without the header; exit 1 if there is any
#   ci/spdx.sh --fix     add the header where it is missing (idempotent)
#
# Files: tracked *.rs, *.sh, *.s and shell scripts without an extension (a `#!` first line).
# The header goes on the first line, or right after a `#!` line:
#   Rust:            // SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#   shell, assembly: # SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Paths under .ci/ (session tooling, not part of the project) are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

LICENSE="Apache-2.0 OR BSD-3-Clause"
TAG="SPDX-License-Identifier: $LICENSE"

mode=${1:-}
case "$mode" in
--check | --fix) ;;
*)
    echo "usage: $0 --check | --fix" >&2
    exit 2
    ;;
esac

# The comment leader for a file, or nothing if the file is not covered.
leader() {
    case "$1" in
    *.rs) echo "//" ;;
    *.sh | *.s) echo "#" ;;
    *.*) ;;
    *) head -c 2 "$1" | grep -q '^#!' && echo "#" ;;
    esac
    return 0
}

missing=0
while IFS= read -r -d '' f; do
    case "$f" in .ci/*) continue ;; esac
    [ -f "$f" ] && [ ! -L "$f" ] || continue
    lead=$(leader "$f")
    [ -n "$lead" ] || continue
    # The header counts only in the first three lines (after a shebang, a blank line at most).
    if head -n 3 "$f" | grep -qF "$TAG"; then
        continue
    fi
    # Another SPDX identifier is a conflict for a human, not something to paper over.
    if head -n 3 "$f" | grep -q 'SPDX-License-Identifier:'; then
        echo "$f: different SPDX identifier: $(head -n 3 "$f" | grep 'SPDX-License-Identifier:')" >&2
        missing=$((missing + 1))
        continue
    fi
    if [ "$mode" = --check ]; then
        echo "$f"
        missing=$((missing + 1))
        continue
    fi
    tmp=$(mktemp "$f.spdx.XXXXXX")
    if head -n 1 "$f" | grep -q '^#!'; then
        { head -n 1 "$f"; echo "$lead $TAG"; tail -n +2 "$f"; } >"$tmp"
    else
        { echo "$lead $TAG"; cat "$f"; } >"$tmp"
    fi
    chmod --reference="$f" "$tmp"
    mv "$tmp" "$f"
    echo "added: $f"
done < <(git ls-files -z)

if [ "$mode" = --check ] && [ "$missing" -gt 0 ]; then
    echo "error: $missing file(s) without '$TAG' (run ci/spdx.sh --fix)" >&2
    exit 1
fi
exit 0
