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
# xattrs), for the image tests a registry (docker-registry) and htpasswd (apache2-utils), and for
# the microVM tier QEMU, the guest kernel (Debian's cloud kernel) and cpio (the guest's initramfs);
# for workload networks the CNI plugins (bridge, host-local, loopback), nftables and util-linux's
# unshare/nsenter.
APT_PACKAGES=(runc conmon busybox-static golang-github-containers-common iproute2 build-essential python3 attr docker-registry apache2-utils
  qemu-system-x86 linux-image-cloud-amd64 cpio e2fsprogs containernetworking-plugins nftables util-linux haproxy pebble wrk
  mmdebstrap buildah skopeo umoci)
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
  # Same for HAProxy: berthd runs its own (the ingress); the packaged service must never hold ports.
  if [[ " ${missing[*]} " == *" haproxy "* ]] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl disable --now haproxy >/dev/null 2>&1 || true
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

# The guest agent (agent/, Go): a static binary that is /init of every microVM. Rebuilt when its
# sources change.
AGENT=/usr/local/lib/berth/berth-agent
if command -v go >/dev/null; then
  want_agent=$(cat agent/go.mod agent/go.sum agent/*.go | sha256sum | cut -d' ' -f1)
  if [ ! -x "$AGENT" ] || [ "$(cat "$AGENT.src-hash" 2>/dev/null)" != "$want_agent" ]; then
    echo "==> building the guest agent"
    (cd agent && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$AGENT.tmp" .)
    mv "$AGENT.tmp" "$AGENT"
    echo "$want_agent" > "$AGENT.src-hash"
  fi
else
  echo "berth: no Go toolchain: the microVM tier stays unavailable (its guest agent is built with Go)" >&2
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
rm -rf dist sdk/dist   # no stale output of moved or deleted sources
npx --no-install tsc -p tsconfig.json
npx --no-install tsc -p sdk/tsconfig.json   # the SDK package's own dist/ (npm install ./sdk)
