#!/usr/bin/env bash
# Installs what Berth needs on Debian 12 (as root), idempotently, then builds it.
# Sourced by scripts/up.sh and scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then echo "berth: run this as root (Berth manages mounts, cgroups and containers)" >&2; exit 1; fi
if ! command -v node >/dev/null || ! node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)'; then
  echo "berth: Node.js 20 or newer is required" >&2; exit 1
fi

# Host packages: container runtime + monitor, the busybox image source, Docker's default
# seccomp profile (containers-common), a toolchain for native npm modules, setfattr (layer
# xattrs), and for the image tests a registry (docker-registry) and htpasswd (apache2-utils).
APT_PACKAGES=(runc conmon busybox-static golang-github-containers-common iproute2 build-essential python3 attr docker-registry apache2-utils)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Berth's tests start docker-registry themselves (own config, 127.0.0.1); the packaged
  # service (port 5000, htpasswd) is not wanted.
  if [[ " ${missing[*]} " == *" docker-registry "* ]] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl disable --now docker-registry >/dev/null 2>&1 || true
  fi
fi

# gVisor: a current runsc, pinned, built with Go (static: CGO_ENABLED=0) into /usr/local/lib/berth.
# Debian's runsc (2022) is the fallback when Go is absent; it lacks systrap and, on kernels ≥ 6.11,
# network sandboxing (gVisor #10704).
RUNSC_MODULE=gvisor.dev/gvisor/runsc@v0.0.0-20260905035102-160fafc42237
RUNSC_VERSION=release-20260905-go-160fafc42237
RUNSC=/usr/local/lib/berth/runsc
have_runsc=$("$RUNSC" --version 2>/dev/null || true)   # (not piped into grep -q: pipefail + SIGPIPE)
if [[ "$have_runsc" != *"$RUNSC_VERSION"* ]]; then
  if command -v go >/dev/null; then
    echo "==> building runsc $RUNSC_VERSION (once, about 2 minutes)"
    tmpbin=$(mktemp -d)
    CGO_ENABLED=0 GOBIN="$tmpbin" go install -ldflags "-s -w -X gvisor.dev/gvisor/runsc/version.version=$RUNSC_VERSION" "$RUNSC_MODULE"
    install -D -m 0755 "$tmpbin/runsc" "$RUNSC"
    rm -rf "$tmpbin"
  elif ! command -v runsc >/dev/null; then
    echo "==> apt-get install runsc (no Go toolchain to build a current one)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends runsc >/dev/null
  fi
fi

# npm packages (exact versions from package-lock.json).
stamp=node_modules/.berth-lock-hash
want=$(sha256sum package-lock.json | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "==> npm ci"
  npm ci --no-audit --no-fund --loglevel=error
  echo "$want" > "$stamp"
fi

echo "==> build"
rm -rf dist   # no stale output of moved or deleted sources
npx --no-install tsc -p tsconfig.json
