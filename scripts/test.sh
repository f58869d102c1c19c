#!/usr/bin/env bash
# Command (2): install what is needed, build, run the whole test suite (real runc, conmon, SQLite).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
mapfile -t files < <(find dist/src dist/test -name '*.test.js' | sort)
echo "==> node --test (${#files[@]} files)"
node --test --test-concurrency=1 "${files[@]}"
