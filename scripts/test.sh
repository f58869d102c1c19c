#!/usr/bin/env bash
# Command (2): install what is needed, build, run the whole test suite (real runc, conmon, SQLite).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
# The Go guest agent (microVM tier; may serve the other tiers too).
if command -v go >/dev/null; then
  echo "==> agent: go vet + go test"
  (cd agent && go vet ./... && test -z "$(gofmt -l .)" && go test -count=1 ./...)
else
  echo "==> agent: skipped (no Go toolchain)"
fi
mapfile -t files < <(find dist/src dist/test -name '*.test.js' | sort)
echo "==> node --test (${#files[@]} files)"
node --test --test-concurrency=1 "${files[@]}"
