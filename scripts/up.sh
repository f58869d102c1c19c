#!/usr/bin/env bash
# Command (1): install, start berthd with its embedded default state, run a demo workload.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh

export BERTH_DATA_DIR=${BERTH_DATA_DIR:-/var/lib/berth}
LISTEN=${BERTH_LISTEN:-127.0.0.1:7878}
berth() { node dist/src/cli/main.js "$@"; }

# A berthd that already runs is restarted gracefully so that it runs the code just built: its
# workloads keep running and the new berthd adopts them.
if [ -f "$BERTH_DATA_DIR/berthd.pid" ] && kill -0 "$(cat "$BERTH_DATA_DIR/berthd.pid")" 2>/dev/null && [ -S "$BERTH_DATA_DIR/berthd.sock" ]; then
  old=$(cat "$BERTH_DATA_DIR/berthd.pid")
  if tr '\0' ' ' < "/proc/$old/cmdline" | grep -q 'daemon/main.js'; then
    echo "==> restarting berthd (pid $old) on the fresh build; its workloads keep running"
    kill -TERM "$old"
    for _ in $(seq 1 300); do kill -0 "$old" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$old" 2>/dev/null; then echo "berthd (pid $old) did not stop within 30 s; stop it and run this again" >&2; exit 1; fi
  fi
fi
mkdir -p "$BERTH_DATA_DIR"
rm -f "$BERTH_DATA_DIR/berthd.sock"   # a crashed berthd's stale socket must not look like the new one
echo "==> starting berthd (data in $BERTH_DATA_DIR, API on http://$LISTEN and unix:$BERTH_DATA_DIR/berthd.sock)"
nohup node dist/src/daemon/main.js --data-dir "$BERTH_DATA_DIR" --listen "$LISTEN" >>"$BERTH_DATA_DIR/berthd.log" 2>&1 &
for _ in $(seq 1 100); do [ -S "$BERTH_DATA_DIR/berthd.sock" ] && [ -f "$BERTH_DATA_DIR/admin.token" ] && break; sleep 0.1; done
[ -S "$BERTH_DATA_DIR/berthd.sock" ] || { echo "berthd did not start; see $BERTH_DATA_DIR/berthd.log" >&2; tail -20 "$BERTH_DATA_DIR/berthd.log" >&2; exit 1; }

echo "==> berth info"
berth info
echo
echo "==> berth run busybox -- sh -c '…'   (a container on runc, 64 MiB / half a core, supervised by its monitor)"
berth run --memory 64 --cpus 0.5 --pids 64 busybox -- sh -c 'echo "Hello from Berth!"; echo "kernel: $(uname -r), hostname: $(hostname), user: $(id -u)"; echo "memory limit: $(( $(cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max) / 1048576 )) MiB"; ls /'
echo
echo "==> berth run --isolation gvisor busybox -- …   (the same image under gVisor's user-space kernel)"
berth run --isolation gvisor --memory 64 -e HOST_KERNEL="$(uname -r)" busybox -- sh -c 'echo "Hello from gVisor! kernel inside: $(uname -r), host kernel: $HOST_KERNEL"' \
  || echo "(gVisor is not usable on this host: see berth info)"
echo
echo "==> berth run --isolation microvm busybox -- …   (the same image in its own VM: own kernel, own memory size)"
berth run --isolation microvm --memory 64 -e HOST_KERNEL="$(uname -r)" busybox -- sh -c 'echo "Hello from a microVM! kernel inside: $(uname -r), host kernel: $HOST_KERNEL, $(head -1 /proc/meminfo | tr -s " ")"' \
  || echo "(the microVM tier is not usable on this host: see berth info)"
echo
echo "==> berth service create … demo busybox   (2 replicas on the project network, behind the ingress, health-checked)"
berth service rm demo >/dev/null 2>&1 || true
if berth service create --public-port 8080 -r 2 --readiness http:8080/index.html --wait demo busybox -- \
    sh -c 'echo "hello from replica $(hostname)" > /tmp/index.html; trap "exit 0" TERM; httpd -f -p 8080 -h /tmp & wait'; then
  port=$(berth ingress status -o json | node -e 'const s=JSON.parse(require("fs").readFileSync(0,"utf8")); console.log((s.http||":80").split(":").pop())')
  get() { busybox wget -qO- --header "Host: demo.default.berth.localhost" "http://127.0.0.1:$port/index.html"; }
  # The ingress learns the replicas from Berth's DNS every 0.5 s: wait (at most ~5 s) until it has both.
  for _ in $(seq 25); do
    [ "$(for _ in 1 2 3 4; do get 2>/dev/null; done | sort -u | wc -l)" -ge 2 ] && break
    sleep 0.2
  done
  for _ in 1 2 3 4; do get || true; done
  berth service ls
fi
echo
cat <<TXT
==> Done. berthd keeps running in the background (pid $(cat "$BERTH_DATA_DIR/berthd.pid")), log: $BERTH_DATA_DIR/berthd.log
Next, with the CLI (alias berth="node $(pwd)/dist/src/cli/main.js"):
  berth run -d --name web busybox -- httpd -f -p 8080      # a long-running workload (DNS name: web)
  berth run busybox -- wget -qO- http://web:8080/          # reach it by name from the project network
  berth service deploy -e V=2 --wait demo                  # rolling deploy of the demo service
  berth service inspect demo && berth service rm demo
  berth ps -a                                              # list workloads
  berth logs -f web                                        # follow its output
  berth stop web && berth rm web
  berth job create nightly --schedule '0 3 * * *' --tz Europe/Paris busybox -- echo backup
  berth job run nightly                                    # run it now and see its output
The API: curl -H "Authorization: Bearer \$(cat $BERTH_DATA_DIR/admin.token)" http://$LISTEN/v1/openapi.json
Stop berthd (workloads keep running): kill \$(cat $BERTH_DATA_DIR/berthd.pid)
TXT
