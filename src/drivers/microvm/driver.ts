// The microVM driver (isolation "microvm"): each task is its own QEMU `microvm` machine with its own
// guest kernel (Debian's cloud kernel), booted straight into the Berth guest agent (agent/, as the
// initramfs's /init), which mounts the image, runs the workload and powers the VM off when it ends.
//
// Per task (folder tasks/<id>):
//   rootfs  the image as a read-only ext4 block device, shared by every task of the image (cache/)
//   rw.ext4 the task's writable layer (sparse ext4; overlay upper inside the guest)
//   cfg.img the workload's config as raw NUL-padded JSON on a tiny read-only block device
//   ctr.log k8s-file log lines, written by QEMU itself from the guest's "berth.log" port
//   exit.json the exit record, written by QEMU from the guest's "berth.exit" port
//   agent.sock the control channel (QEMU listens; the guest agent answers over virtio-serial)
//   qemu.pid, console.log (guest kernel console, for failures)
// QEMU runs in a session of its own (like a daemon, but not daemonized: see launch()) and writes
// logs and the exit record itself, so berthd keeps nothing per task and can be killed at any time:
// a restarted berthd adopts the VM by its pid file (recover()).
//
// Acceleration: KVM only where it really works (see assets.detectAccel); otherwise TCG. Limits:
// the VM gets vCPUs = ceil(cpu) and RAM = memory + guest overhead; inside, the workload sits in a
// guest cgroup with the exact cpu/memory/pids limits (OOM and fork bombs are reported like the
// other tiers); outside, the QEMU process sits in a host cgroup capped at its size.
import { randomBytes } from 'node:crypto';
import { spawn } from 'node:child_process';
import { EventEmitter } from 'node:events';
import { chmodSync, copyFileSync, existsSync, mkdirSync, readFileSync, readdirSync, readlinkSync, rmSync, rmdirSync, statSync, watch, writeFileSync, type FSWatcher } from 'node:fs';
import { constants as osConstants, cpus } from 'node:os';
import { dirname, join } from 'node:path';
import type { NetworkAttachment, NetworkManager } from '../../network/manager.js';
import type { DriverCapabilities, ExitResult, Fingerprint, RuntimeDriver, StopOptions, TaskConfig, TaskExecResult, TaskHandle, TaskStatus } from '../../core/driver.js';
import { BerthError, invalidArgument } from '../../core/errors.js';
import { qmp, QmpSession } from './qmp.js';
import { pidAlive, runOk, sleep, startDetached } from '../../lib/exec.js';
import { cgroupHierarchies, processCpuMs } from '../../lib/host.js';
import { migrationWarmer } from '../../lib/cgroupwarm.js';
import { copyDataMap, dataMap, type DataMap } from '../../lib/disk.js';
import { mkdir, writeFile } from 'node:fs/promises';
import { AgentConnection, type AgentFrame } from '../agent/client.js';
import { AgentPool } from '../agent/pool.js';
import {
  detectAccel,
  ensureInitramfs,
  ensureRootImage,
  findAgent,
  findKernel,
  hostTscKhz,
  makeWritableDisk,
  qemuVersion,
  type Accel,
  type GuestKernel,
} from './assets.js';

/** The memfd holding a VM's RAM (as /proc/<pid>/fd/N), when it has one (see GuestRam). */
function ramMemfd(pid: number): string | undefined {
  let fds: string[] = [];
  try {
    fds = readdirSync(`/proc/${pid}/fd`);
  } catch {
    return undefined;
  }
  for (const fd of fds) {
    const p = `/proc/${pid}/fd/${fd}`;
    try {
      if (readlinkSync(p).startsWith('/memfd:memory-backend-memfd')) return p;
    } catch {
      /* closed meanwhile */
    }
  }
  return undefined;
}

/** BERTH_MICROVM_TRACE=1: the time each stage of a start took, on stderr (for measuring; off by default). */
function stageTimer(what: string): (stage: string) => void {
  if (!process.env.BERTH_MICROVM_TRACE) return () => undefined;
  let last = performance.now();
  return (stage) => {
    const now = performance.now();
    process.stderr.write(`microvm ${what}: ${stage} +${(now - last).toFixed(1)} ms @${(performance.timeOrigin + now).toFixed(1)}\n`);
    last = now;
  };
}

const SIGNALS = osConstants.signals as Record<string, number>;
const signalName = (n: number) => Object.keys(SIGNALS).find((k) => SIGNALS[k] === n);

export const QEMU = '/usr/bin/qemu-system-x86_64';
/** Smallest workload memory limit: the guest's own kernel and agent live beside it, not inside. */
export const MICROVM_MIN_MEMORY_MIB = 16;
/** Guest RAM added to the workload's limit for the guest kernel, agent and page cache. */
export const GUEST_OVERHEAD_MIB = 128;
/** Guest RAM when the workload has no memory limit (only pages the guest touches cost host memory). */
export const DEFAULT_GUEST_MIB = 512;
/** Host memory allowed to the QEMU process beyond the guest RAM (TCG code cache, devices). */
const QEMU_OVERHEAD_MIB = 256;

export interface MicroVmDriverOptions {
  stateDir: string;
  cgroupParent?: string;
  qemuPath?: string;
  /** Size of each task's sparse writable layer. */
  diskMiB?: number;
  /**
   * How much CPU time QEMU may spend booting before the guest agent answers (default 60 s). Counted
   * in CPU time, not wall time: under TCG twenty VMs booting at once on two cores each get a tenth of
   * a core, and a boot that is only starved is not a boot that hangs.
   */
  bootTimeoutMs?: number;
  /** Wall-clock limit on a boot however starved it is (default 5 × bootTimeoutMs). */
  bootWallTimeoutMs?: number;
  /** Gives tasks with TaskConfig.network their namespace (QEMU runs in it, with a tap device). */
  network?: NetworkManager;
}

/** A VM's machine: everything of its command line but the task folder (kept for snapshots). */
export interface VmMachine {
  accel: Accel;
  kernel: string;
  initramfs: string;
  rootImage: string;
  vcpus: number;
  memoryMiB: number;
  tscKhz?: number | undefined;
  epochMs: number;
  /** Has a NIC (a restored VM must have the same devices as the one snapshotted). */
  net?: boolean;
  /**
   * The guest has VM_NET's fixed address (every VM started since it exists). A snapshot taken before
   * has its sandbox's own CNI address instead: a restore gives the guest the fixed one (net.configure).
   */
  fixedNet?: boolean;
}

type CgroupSize = { memoryMiB: number; vcpus: number; background?: boolean | undefined };

/** The descriptor on which a restored QEMU reads its snapshot's migration stream (`fd:3`). */
const STREAM_FD = 3;
/** A snapshot's map of its writable disk's data (lib/disk.ts DataMap), written by snapshot(). */
const RW_MAP = 'rw.map.json';
/** Above this much data a fork's disk is copied by `cp` (which reflinks where the file system can). */
const RW_MAP_MAX_BYTES = 64 * 2 ** 20;

/** The snapshot's writable-disk map, if it has a usable one (older snapshots have none). */
function readRwMap(snapshotDir: string): DataMap | undefined {
  try {
    const m = JSON.parse(readFileSync(join(snapshotDir, RW_MAP), 'utf8')) as DataMap;
    const ok =
      Number.isSafeInteger(m.size) &&
      Array.isArray(m.extents) &&
      m.extents.every((e) => Array.isArray(e) && e.length === 2 && e.every((x) => Number.isSafeInteger(x) && x >= 0) && e[0]! + e[1]! <= m.size);
    return ok && m.extents.reduce((a, [, len]) => a + len, 0) <= RW_MAP_MAX_BYTES && statSync(join(snapshotDir, 'rw.ext4')).size === m.size ? m : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Where guest RAM lives, when not in QEMU's own anonymous memory:
 * - memfd: a sandbox VM's RAM, shared (share=on) so that a snapshot can leave it out of the
 *   migration stream (capability x-ignore-shared) and copy it as a file instead; freed with QEMU.
 * - file: a VM restored from such a snapshot maps the snapshot's RAM file privately (share=off):
 *   pages fault in from the page cache when the guest touches them, writes are copy-on-write, the
 *   file stays as it was, and forks of one template share its unmodified pages.
 * Either way the backend keeps the machine's default RAM id ("microvm.ram"), so the migration stream
 * matches a VM with plain `-m` RAM (older snapshots restore as before).
 */
export type GuestRam = { memfd: true } | { file: string };
const RAM_ID = 'microvm.ram';

/**
 * The QEMU command line of one task (pure; the driver adds nothing else). With `incoming` (a
 * migration source, or "defer") the VM is restored, not booted: it gets no kernel, initramfs or
 * command line (the guest's are in its memory; QEMU would read and copy ~20 MiB for nothing).
 */
export function buildQemuArgs(o: VmMachine & { dir: string; ram?: GuestRam | undefined; incoming?: string | undefined }): string[] {
  // (Not init_on_free=1: it shrinks snapshots by a third but makes the guest write every page it
  // frees, so an idle VM's host RSS grew from ~230 MiB to ~600 MiB; measured with bench isolation.)
  const append = ['console=ttyS0', 'quiet', 'panic=-1', 'cryptomgr.notests', `berth.epoch_ms=${o.epochMs}`];
  // Less guest code on every path, which TCG translates afresh in each VM (a fork of a snapshot too):
  // no pressure accounting at each context switch (nothing in the guest reads it), no
  // AppArmor or TOMOYO hooks on exec, open and signals (nothing loads a profile in the guest; Yama and
  // Landlock stay), and the agent (PID 1, whose environment this is) preempts its goroutines without
  // signals: under cold TCG a goroutine often runs past Go's 10 ms slice, and each SIGURG is
  // delivered, handled and returned from (counted in translated blocks: BENCHMARKS.md, session 14).
  append.push('psi=0', 'lsm=capability,landlock,yama,bpf', 'GODEBUG=asyncpreemptoff=1');
  if (o.accel === 'tcg' && o.tscKhz) append.push(`tsc_early_khz=${o.tscKhz}`);
  // Under TCG the guest's TSC is the host's (QEMU's RDTSC reads the host counter), as steady as the
  // host clock; what is not steady is the guest's timer tick, which falls behind on a busy host. The
  // clocksource watchdog compares the two, and, measured with 6 VMs booting at once, marked the TSC
  // unstable in all 6 (~2 s into the boot): their clock fell back to refined-jiffies, 4 ms steps
  // for every clock read for the VM's whole life, and no vDSO. tsc=reliable turns that check off.
  if (o.accel === 'tcg') append.push('tsc=reliable');
  // (Not mitigations=off under TCG: TCG's CPU (qemu64) reports AuthenticAMD, so the guest has no KPTI
  // ("meltdown: Not affected"); turning off its retpolines and barriers measured no gain in
  // bench/sandboxes.ts, nor did init_on_alloc=0 or randomize_kstack_offset=off. BENCHMARKS.md,
  // microvm-restore-notes.)
  const f = (name: string) => join(o.dir, name);
  const size = `size=${o.memoryMiB}M`;
  const ram = !o.ram
    ? []
    : 'memfd' in o.ram
      ? ['-object', `memory-backend-memfd,id=${RAM_ID},${size},share=on`]
      : ['-object', `memory-backend-file,id=${RAM_ID},${size},mem-path=${o.ram.file},share=off`];
  return [
    '-M', `microvm,x-option-roms=off,isa-serial=on,rtc=on${o.ram ? `,memory-backend=${RAM_ID}` : ''}`,
    ...ram,
    '-accel', o.accel === 'tcg' ? 'tcg,tb-size=32' : 'kvm',
    // (TCG: QEMU's default CPU, without ARAT. With `-cpu qemu64,+arat` the guest stops its tick when
    // idle (nohz; without ARAT and with no HPET it keeps 250 ticks a second): an idle VM cost the host
    // ~5 ms of CPU a second instead of ~27 (5 idle VMs, 30 s), but a claimed warm-pool member's first
    // command got ~15 ms slower (claim → first output 41–47 ms against 27–28 ms, interleaved A/B, 10
    // claims each, four runs). Kept off for the claim; BENCHMARKS.md, session 11.)
    ...(o.accel === 'kvm' ? ['-cpu', 'host'] : []),
    '-smp', String(o.vcpus),
    '-m', `${o.memoryMiB}M`,
    '-nodefaults', '-no-user-config', '-display', 'none', '-no-reboot',
    ...(o.incoming ? ['-incoming', o.incoming] : ['-kernel', o.kernel, '-initrd', o.initramfs, '-append', append.join(' ')]),
    // After an incoming migration QEMU "announces" the VM 5 times over ~1.5 s (by default), so that
    // switches learn where a live-migrated guest now is: virtio-net asks the guest, which sends
    // gratuitous ARP, unsolicited neighbour adverts and MLD reports. A restored VM's tap is new and
    // private to its namespace, where nothing learns addresses; the guest would only run that code
    // cold under TCG before its agent answers (~1300 of ~12700 blocks translated, with eth0's IPv6
    // autoconfiguration: agent/net.go; BENCHMARKS.md, session 12).
    ...(o.incoming ? ['-global', 'migration.announce-rounds=0'] : []),
    '-serial', `file:${f('console.log')}`,
    '-drive', `id=root,file=${o.rootImage},format=raw,if=none,readonly=on`,
    '-device', 'virtio-blk-device,drive=root,serial=berth-root',
    '-drive', `id=rw,file=${f('rw.ext4')},format=raw,if=none`,
    '-device', 'virtio-blk-device,drive=rw,serial=berth-rw',
    '-drive', `id=cfg,file=${f('cfg.img')},format=raw,if=none,readonly=on`,
    '-device', 'virtio-blk-device,drive=cfg,serial=berth-cfg',
    '-device', 'virtio-serial-device',
    '-chardev', `socket,id=agent,path=${f('agent.sock')},server=on,wait=off`,
    '-device', 'virtserialport,chardev=agent,name=berth.agent',
    '-chardev', `file,id=log,path=${f('ctr.log')},append=on`,
    '-device', 'virtserialport,chardev=log,name=berth.log',
    '-chardev', `file,id=exit,path=${f('exit.json')}`,
    '-device', 'virtserialport,chardev=exit,name=berth.exit',
    // No vhost-net on these hosts (host-facts): the tap is served by QEMU itself.
    ...(o.net ? ['-netdev', 'tap,id=net0,ifname=tap0,script=no,downscript=no,vhost=off', '-device', `virtio-net-device,netdev=net0,mac=${VM_NET.guestMac}`] : []),
    '-qmp', `unix:${f('qmp.sock')},server=on,wait=off`,
    '-pidfile', f('qemu.pid'),
  ];
}

/**
 * The network inside every microVM task's namespace, booted or restored (as Firecracker setups such
 * as E2B's do it): the guest always has the same link-local address and MAC, and its gateway is the
 * namespace's tap0, with the same address and MAC everywhere. The namespace keeps the eth0 that CNI
 * made, with the task's address S, forwards, and NATs: everything addressed to S from outside goes to
 * the guest (DNAT), and the guest's traffic leaves as S (masquerade). The host, its firewall
 * (isolation, egress, anti-spoofing), DNS and the ingress see only S, as for the other tiers. A guest
 * restored from a snapshot so needs no reconfiguration: its address, route and neighbour entry for
 * its gateway are still right in the new namespace.
 */
export const VM_NET = { guestIp: '169.254.0.21', gatewayIp: '169.254.0.22', prefix: 30, guestMac: '06:00:a9:fe:00:15', tapMac: '06:00:a9:fe:00:16' } as const;

/** The guest's side of a task network (agent/net.go configures eth0 with it). */
export function guestNet(net: NetworkAttachment): Record<string, unknown> {
  // The task's own name maps to the guest's own address, which a program in it can also bind to
  // (S is the namespace's; connections to S from the guest come back to it too, see NAT_TABLE).
  const hosts = readFileSync(net.hosts, 'utf8')
    .split('\n')
    .map((l) => (l.startsWith(`${net.ip}\t`) ? VM_NET.guestIp + l.slice(net.ip.length) : l))
    .join('\n');
  return {
    ip: VM_NET.guestIp,
    prefix: VM_NET.prefix,
    gateway: VM_NET.gatewayIp,
    mac: VM_NET.guestMac,
    resolvConf: readFileSync(net.resolvConf, 'utf8'),
    hosts,
  };
}

/**
 * Wires a task's namespace for its VM (see VM_NET): tap0, QEMU's NIC backend (opened from inside the
 * namespace), gets the gateway's address and MAC; forwarding on; an nftables table with the NAT. The
 * rules say "a local address" rather than S, so that they hold whether or not CNI has made eth0 yet
 * (a restore runs the VM while CNI runs). All of it lives in the namespace and goes with it.
 * A booted VM's tap0 is made (TAP_CREATE) and wired before QEMU starts; a restored VM's QEMU makes
 * tap0 itself (opening a tap that does not exist creates it), and it is wired while the memory loads,
 * off the critical path.
 */
const NAT_TABLE = [
  'add table ip berth_vm', // ("add" then "delete": replaced if there, as in firewall.ts)
  'delete table ip berth_vm',
  'table ip berth_vm {',
  '  chain prerouting {',
  '    type nat hook prerouting priority dstnat; policy accept;',
  `    ip daddr != ${VM_NET.gatewayIp} fib daddr type local dnat to ${VM_NET.guestIp}`,
  '  }',
  '  chain postrouting {',
  '    type nat hook postrouting priority srcnat; policy accept;',
  `    oifname "eth0" ip saddr ${VM_NET.guestIp} masquerade`,
  // The guest at its own project address (its DNS name): back to it from the gateway's address
  // (a packet from its own address it would drop).
  `    oifname "tap0" ip saddr ${VM_NET.guestIp} snat to ${VM_NET.gatewayIp}`,
  '  }',
  '}',
].join('\n');
const TAP_CREATE = 'ip tuntap add dev tap0 mode tap';
const TAP_WIRE = [
  // No IPv6 on the host's side of tap0 (Berth's networks are IPv4 only; the guest has none on
  // eth0): else its link-local address, DAD and MLD reports reach the guest, which runs its
  // receive path for them, cold under TCG, at its boot. (Where the host has no IPv6, nothing to do.)
  '{ [ ! -e /proc/sys/net/ipv6/conf/tap0 ] || echo 1 > /proc/sys/net/ipv6/conf/tap0/disable_ipv6; }',
  `ip link set dev tap0 address ${VM_NET.tapMac} up`,
  `ip addr replace ${VM_NET.gatewayIp}/${VM_NET.prefix} dev tap0`,
  'echo 1 > /proc/sys/net/ipv4/ip_forward',
  // (No ICMP redirects for what goes back out of tap0, the guest's hairpin.)
  'echo 0 > /proc/sys/net/ipv4/conf/all/send_redirects',
  'echo 0 > /proc/sys/net/ipv4/conf/tap0/send_redirects',
  `echo '${NAT_TABLE}' | nft -f -`,
].join(' && ');
const inNetns = (netns: string, script: string) => runOk('nsenter', [`--net=${netns}`, '--', 'sh', '-c', script], { timeoutMs: 10_000 });

/**
 * Resolves once a namespace is bound at `path` (an nsfs mount: another device than its folder's);
 * rejects if `launched` (the start of the process meant to make it) ends first without one.
 */
async function namespaceBound(path: string, launched: Promise<unknown>): Promise<void> {
  let ended: { e?: unknown } | undefined;
  launched.then(
    () => (ended = {}),
    (e: unknown) => (ended = { e }),
  );
  const dirDev = statSync(dirname(path)).dev;
  for (;;) {
    if (statSync(path).dev !== dirDev) return;
    if (ended) throw ended.e ?? new Error(`no network namespace was bound at ${path}`);
    await sleep(1);
  }
}

/** The network namespace QEMU is started in: entered (nsenter), or made at `path` (unshare). */
type NetnsLaunch = { path: string; make: boolean };

/** Guest RAM and vCPUs for a task's limits. */
export function vmSize(resources: TaskConfig['resources'], hostCpus: number): { memoryMiB: number; vcpus: number } {
  const memoryMiB = resources.memoryMiB !== undefined ? resources.memoryMiB + GUEST_OVERHEAD_MIB : DEFAULT_GUEST_MIB;
  const vcpus = resources.cpuMillis !== undefined ? Math.min(Math.max(1, Math.ceil(resources.cpuMillis / 1000)), hostCpus) : 1;
  return { memoryMiB, vcpus };
}

/** The guest agent's config disk (agent/vm.go vmConfig): JSON, NUL-padded to whole 4 KiB blocks. */
export function encodeVmConfig(cfg: TaskConfig, net?: NetworkAttachment): Buffer {
  const json = Buffer.from(
    JSON.stringify({
      ...(net ? { net: guestNet(net) } : {}),
      args: cfg.args,
      env: cfg.env,
      cwd: cfg.cwd,
      uid: cfg.user.uid,
      gid: cfg.user.gid,
      hostname: cfg.hostname ?? cfg.id.slice(0, 63),
      memoryBytes: cfg.resources.memoryMiB !== undefined ? cfg.resources.memoryMiB * 2 ** 20 : 0,
      pids: cfg.resources.pids ?? 0,
      cpuMillis: cfg.resources.cpuMillis ?? 0,
      sandbox: cfg.sandbox === true,
    }),
  );
  const buf = Buffer.alloc(Math.max(4096, Math.ceil(json.length / 4096) * 4096));
  json.copy(buf);
  return buf;
}

export class MicroVmDriver implements RuntimeDriver {
  readonly name = 'microvm';
  readonly capabilities: DriverCapabilities = {
    isolation: 'microvm',
    limits: { cpu: true, memory: true, pids: true },
    oomDetection: true,
    survivesDaemonRestart: true,
    signals: true,
    sharesHostKernel: false,
    minMemoryMiB: MICROVM_MIN_MEMORY_MIB,
  };
  readonly stateDir: string;
  readonly qemu: string;
  private readonly cgroupParent: string;
  private readonly diskMiB: number;
  private readonly bootTimeoutMs: number;
  private readonly bootWallTimeoutMs: number;
  private accel: Promise<{ accel: Accel; reason: string }> | undefined;
  private readonly exits = new EventEmitter();
  private readonly tracking = new Map<string, AbortController>();
  /** One shared agent connection per task (QEMU's socket serves one client at a time). */
  private readonly agents = new AgentPool();
  private closed = false;

  constructor(opts: MicroVmDriverOptions) {
    this.stateDir = opts.stateDir;
    this.qemu = opts.qemuPath ?? process.env.BERTH_QEMU ?? QEMU;
    this.cgroupParent = opts.cgroupParent ?? 'berth';
    this.diskMiB = opts.diskMiB ?? 1024;
    this.bootTimeoutMs = opts.bootTimeoutMs ?? 60_000;
    this.bootWallTimeoutMs = opts.bootWallTimeoutMs ?? 5 * this.bootTimeoutMs;
    this.net = opts.network;
    this.exits.setMaxListeners(0);
  }
  private readonly net: NetworkManager | undefined;

  private taskDir(id: string): string {
    return join(this.stateDir, 'tasks', id);
  }
  private get cacheDir(): string {
    return join(this.stateDir, 'cache');
  }
  logPath(id: string): string {
    return join(this.taskDir(id), 'ctr.log');
  }

  onExit(listener: (id: string) => void): () => void {
    this.exits.on('exit', listener);
    return () => this.exits.off('exit', listener);
  }

  close(): void {
    this.closed = true;
    this.agents.closeAll();
    for (const c of this.tracking.values()) c.abort();
    this.tracking.clear();
  }

  private assets(): { kernel: GuestKernel; agent: string } {
    const kernel = findKernel();
    if (!kernel) throw invalidArgument('isolation "microvm" needs a guest kernel: apt-get install linux-image-cloud-amd64 (scripts/setup.sh does)');
    const agent = findAgent();
    if (!agent) throw invalidArgument('isolation "microvm" needs the guest agent: run scripts/setup.sh to build it (needs Go)');
    return { kernel, agent };
  }

  private getAccel(): Promise<{ accel: Accel; reason: string }> {
    this.accel ??= detectAccel(() => this.probeKvm());
    return this.accel;
  }

  /** Boots the guest under KVM with berth.probe: the agent powers off right after loading its modules. */
  private async probeKvm(): Promise<boolean> {
    let kernel: GuestKernel, agent: string;
    try {
      ({ kernel, agent } = this.assets());
    } catch {
      return false;
    }
    const initramfs = await ensureInitramfs(this.cacheDir, kernel, agent);
    const dir = join(this.stateDir, `probe-${process.pid}`);
    mkdirSync(dir, { recursive: true });
    try {
      const args = ['-M', 'microvm', '-accel', 'kvm', '-cpu', 'host', '-m', '256M', '-nodefaults', '-no-user-config', '-display', 'none', '-no-reboot',
        '-kernel', kernel.path, '-initrd', initramfs, '-append', 'console=ttyS0 panic=-1 berth.probe=1', '-serial', `file:${join(dir, 'console.log')}`];
      const ok = await new Promise<boolean>((resolve) => {
        const p = spawn(this.qemu, args, { stdio: 'ignore' });
        const timer = setTimeout(() => {
          p.kill('SIGKILL');
          resolve(false);
        }, 15_000);
        p.on('error', () => resolve(false));
        p.on('exit', () => {
          clearTimeout(timer);
          resolve(true);
        });
      });
      return ok && /berth probe ok/.test(readFileSync(join(dir, 'console.log'), 'utf8'));
    } catch {
      return false;
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }

  async fingerprint(): Promise<Fingerprint> {
    const attributes: Record<string, string> = { qemu: this.qemu };
    const unhealthy = (reason: string): Fingerprint => ({ driver: this.name, isolation: 'microvm', healthy: false, reason, attributes });
    const version = existsSync(this.qemu) ? await qemuVersion(this.qemu) : undefined;
    if (!version) return unhealthy(`${this.qemu} not found or not runnable; apt-get install qemu-system-x86 (scripts/setup.sh does)`);
    let kernel: GuestKernel, agent: string;
    try {
      ({ kernel, agent } = this.assets());
    } catch (e) {
      return { ...unhealthy((e as Error).message), version };
    }
    const { accel, reason } = await this.getAccel();
    Object.assign(attributes, { accel, kernel: kernel.version, agent, machine: 'microvm' });
    return { driver: this.name, isolation: 'microvm', healthy: true, reason: `QEMU ${version} microvm, guest kernel ${kernel.version}; ${reason}`, version, attributes };
  }

  async start(cfg: TaskConfig): Promise<TaskHandle> {
    const mem = cfg.resources.memoryMiB;
    if (mem !== undefined && mem < MICROVM_MIN_MEMORY_MIB) throw invalidArgument(`isolation "microvm" needs resources.memoryMiB ≥ ${MICROVM_MIN_MEMORY_MIB}`);
    if (this.isRunning(cfg.id)) throw invalidArgument(`task ${cfg.id} is already running`);
    if (cfg.restoreFrom) return this.startFromSnapshot(cfg);
    const { kernel, agent } = this.assets();
    const dir = this.taskDir(cfg.id);
    const restart = existsSync(join(dir, 'rw.ext4'));
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    for (const f of ['exit.json', 'qemu.pid', 'agent.sock', 'qmp.sock', 'killed', 'console.log', 'cfg.img']) rmSync(join(dir, f), { force: true });
    let pid: number | undefined;
    // QEMU is moved into the task's cgroups twice: kept from waiting for a grace period (src/lib/cgroupwarm.ts).
    const unwarm = migrationWarmer.hold();
    try {
      const [{ accel }, initramfs, rootImage, tscKhz] = await Promise.all([
        this.getAccel(),
        ensureInitramfs(this.cacheDir, kernel, agent),
        ensureRootImage(this.cacheDir, cfg.imageRootfs, cfg.imageDigest),
        hostTscKhz(),
        restart ? Promise.resolve() : makeWritableDisk(join(dir, 'rw.ext4'), cfg.resources.diskMiB ?? this.diskMiB),
      ]);
      const size = vmSize(cfg.resources, cpus().length);
      const net = await this.joinNetwork(cfg);
      this.writeConfig(dir, cfg, net);
      const machine: VmMachine = {
        accel, kernel: kernel.path, initramfs, rootImage, vcpus: size.vcpus, memoryMiB: size.memoryMiB, ...(tscKhz ? { tscKhz } : {}), epochMs: Date.now(), net: net !== undefined, fixedNet: true,
      };
      // What a snapshot of this VM needs to be restored: the same machine (paths aside).
      writeFileSync(join(dir, 'vm.json'), JSON.stringify(machine));
      const args = buildQemuArgs({ dir, ...machine, ...(cfg.sandbox ? { ram: { memfd: true } as const } : {}) });
      const cgroups = await this.makeCgroups(cfg.id, { ...size, background: cfg.background });
      const vm = await this.launch(dir, args, cgroups, net ? { path: net.netns, make: false } : undefined);
      pid = vm.pid;
      vm.qmp.close();
      unwarm();
      await this.awaitAgent(cfg.id, dir, pid, cfg.sandbox === true);
      return this.tracked(cfg, pid, net);
    } catch (e) {
      unwarm();
      if (pid && this.isRunning(cfg.id)) await this.killVm(cfg.id, pid);
      await this.destroy(cfg.id, { force: true, keepData: restart });
      throw e;
    }
  }

  /**
   * Snapshot of a running VM into `dest`: its memory and device state (QEMU migration to a file),
   * its writable disk and config disk as they were at that instant, and the machine description.
   * The VM is stopped meanwhile and continues afterwards (a fork, not a move).
   * A VM whose RAM is a memfd (GuestRam) is saved as `state` (the migration stream without RAM) +
   * `ram` (a sparse copy of the memfd), which a restore maps lazily; any other VM (one restored
   * from a snapshot) as `memory`, the whole stream, which a restore loads before the VM runs.
   */
  async snapshot(handle: TaskHandle, dest: string): Promise<{ ms: number; bytes: number }> {
    const dir = this.taskDir(handle.id);
    if (!this.vmAlive(handle.id, handle.pid)) throw new BerthError('failed_precondition', `microVM ${handle.id} is not running`);
    if (!existsSync(join(dir, 'vm.json'))) throw new BerthError('failed_precondition', `microVM ${handle.id} was started by an older berthd and cannot be snapshotted`);
    const t0 = performance.now();
    const sock = join(dir, 'qmp.sock');
    mkdirSync(dest, { recursive: true, mode: 0o700 });
    // One QMP connection for the whole snapshot (its status polls included).
    const q = await QmpSession.open(sock);
    let memfd: string | undefined;
    try {
      const status = (await q.cmd('query-status')) as { status?: string };
      const wasRunning = status.status === 'running';
      memfd = ramMemfd(handle.pid);
      // QEMU caps migration at 128 MiB/s by default: a local file can take far more.
      await q.cmd('migrate-set-parameters', { 'max-bandwidth': 64 * 2 ** 30 });
      await q.cmd('migrate-set-capabilities', { capabilities: [{ capability: 'x-ignore-shared', state: memfd !== undefined }] });
      // (Not when paused: the stopped guest would keep the request half-read in its port, and every
      // fork would inherit it.)
      const agent = wasRunning ? await this.agent(handle.id, 2000).catch(() => undefined) : undefined;
      if (handle.state?.sandbox === true && !memfd) {
        // Less page cache, fewer pages for QEMU to write into the snapshot. (Not with a memfd: freed
        // pages stay in it, and the forks' first commands would find their programs' pages gone.)
        await agent?.request({ type: 'run', args: ['/bin/sh', '-c', 'sync; echo 3 > /proc/sys/vm/drop_caches'], env: {} }, 10_000).catch(() => undefined);
      }
      // The guest finishes what it has queued (writeback, the announcement of a link that just came up):
      // else every fork does it again, cold (agent/settle.go). An older agent refuses; so be it.
      await agent?.request({ type: 'settle' }, 5000).catch(() => undefined);
      await q.cmd('stop');
      try {
        // The disks are consistent while the vCPUs are stopped (stop drains in-flight I/O).
        await runOk('cp', ['--sparse=always', join(dir, 'rw.ext4'), join(dest, 'rw.ext4')], { timeoutMs: 300_000 });
        // Where the copy holds data, so that a fork copies that in-process (startFromSnapshot).
        const map = await dataMap(join(dest, 'rw.ext4'));
        if (map) writeFileSync(join(dest, RW_MAP), JSON.stringify(map));
        copyFileSync(join(dir, 'cfg.img'), join(dest, 'cfg.img'));
        copyFileSync(join(dir, 'vm.json'), join(dest, 'vm.json'));
        await q.cmd('migrate', { uri: `exec:cat > '${join(dest, memfd ? 'state' : 'memory')}'` });
        const deadline = Date.now() + 300_000;
        for (;;) {
          const m = (await q.cmd('query-migrate')) as { status?: string; 'error-desc'?: string };
          if (m.status === 'completed') break;
          if (m.status === 'failed' || m.status === 'cancelled') throw new Error(`snapshot of ${handle.id} failed: ${m['error-desc'] ?? m.status}`);
          if (Date.now() > deadline) throw new Error(`snapshot of ${handle.id} did not finish within 300 s`);
          await sleep(10);
        }
        // Only the pages the guest has touched have data: holes stay holes (SEEK_DATA).
        if (memfd) await runOk('cp', ['--sparse=always', memfd, join(dest, 'ram')], { timeoutMs: 300_000 });
      } finally {
        // (On a connection of its own if this one broke: the VM must go on either way.)
        if (wasRunning) await q.cmd('cont').catch(() => qmp(sock, 'cont')).catch(() => undefined);
      }
    } finally {
      q.close();
    }
    if (!memfd) return { ms: performance.now() - t0, bytes: statSync(join(dest, 'memory')).size };
    chmodSync(join(dest, 'ram'), 0o600);
    return { ms: performance.now() - t0, bytes: statSync(join(dest, 'state')).size + statSync(join(dest, 'ram')).blocks * 512 };
  }

  /** A new VM from a snapshot: its own copies of the disks, memory loaded from the snapshot. */
  private async startFromSnapshot(cfg: TaskConfig): Promise<TaskHandle> {
    const src = cfg.restoreFrom!;
    const dir = this.taskDir(cfg.id);
    if (existsSync(dir)) throw invalidArgument(`task ${cfg.id} already has state; destroy it first`);
    let machine: VmMachine;
    try {
      machine = JSON.parse(readFileSync(join(src, 'vm.json'), 'utf8')) as VmMachine;
    } catch {
      throw invalidArgument(`${src} is not a microVM snapshot (no vm.json)`);
    }
    for (const f of [machine.kernel, machine.initramfs, machine.rootImage]) {
      if (!existsSync(f)) throw new BerthError('failed_precondition', `the snapshot needs ${f}, which is gone; take a new snapshot`);
    }
    if ((machine.net === true) !== (cfg.network !== undefined)) {
      throw invalidArgument(
        machine.net ? 'the template was taken from a sandbox with a network: start it with network mode "project"' : 'the template was taken from a sandbox without a network: start it with network mode "none"',
      );
    }
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    let pid: number | undefined;
    const T = stageTimer(`restore ${cfg.id}`);
    const unwarm = migrationWarmer.hold(); // (see start())
    let cgroups: Promise<string[]> | undefined;
    try {
      // The disks are copied while the network namespace is made; the VM waits for both.
      const disks = (async () => {
        const map = readRwMap(src);
        if (map) await copyDataMap(join(src, 'rw.ext4'), join(dir, 'rw.ext4'), map);
        else await runOk('cp', ['--sparse=always', '--reflink=auto', join(src, 'rw.ext4'), join(dir, 'rw.ext4')], { timeoutMs: 300_000 });
        copyFileSync(join(src, 'cfg.img'), join(dir, 'cfg.img'));
        writeFileSync(join(dir, 'vm.json'), JSON.stringify({ ...machine, fixedNet: true } satisfies VmMachine)); // (an older guest gets the fixed address below)
        T('disks');
      })();
      disks.catch(() => undefined); // awaited by boot; a failure is handled there
      // A lazy snapshot (see snapshot()): map its RAM file, load only the device state. The
      // capability must match the stream's, and can only be set before the incoming migration starts.
      const lazy = existsSync(join(src, 'ram'));
      // (Made meanwhile: QEMU is started before they exist and joins them when they do, see launch().)
      const made = this.makeCgroups(cfg.id, { memoryMiB: machine.memoryMiB, vcpus: machine.vcpus, background: cfg.background });
      made.catch(() => undefined); // awaited by launch(); a failure is handled there
      cgroups = made;
      // A guest snapshotted before VM_NET existed has its sandbox's own address: it gets the fixed one
      // (net.configure) once CNI is done. Any other needs nothing but its agent up.
      const convert = machine.net === true && !machine.fixedNet;
      let wiring: Promise<unknown> | undefined;
      const boot = async (netns: NetnsLaunch | undefined): Promise<void> => {
        await disks;
        // QEMU reads the stream from a descriptor it inherits (not `exec:cat`: a shell and a cat to
        // start on the fork's path).
        const incoming = lazy ? 'defer' : `fd:${STREAM_FD}`;
        const args = buildQemuArgs({ dir, ...machine, incoming, ...(lazy ? { ram: { file: join(src, 'ram') } } : {}) });
        const vm = await this.launch(dir, args, made, netns, join(src, lazy ? 'state' : 'memory')).finally(unwarm);
        pid = vm.pid;
        const q = vm.qmp;
        T('qemu up');
        await this.loadSnapshot(cfg.id, q, lazy);
        T('memory loaded');
        // tap0 is wired while the guest runs (a restored guest sends nothing by itself; the create
        // answers once it is wired), not before: its processes (nsenter, sh, ip, nft) would take CPU
        // from QEMU's start and the snapshot's load. (They are started by the spawner, see
        // src/lib/spawner.ts; measured in session 18, when berthd started them itself.)
        if (netns) {
          wiring = inNetns(netns.path, TAP_WIRE);
          wiring.catch(() => undefined); // awaited below; a failure is handled there
        }
        if (convert) return;
        await this.awaitAgent(cfg.id, dir, pid, cfg.sandbox === true);
        T('agent: hello');
      };
      // The VM is restored, tap0 wired and the agent asked while CNI makes the namespace's eth0 (QEMU
      // needs only the namespace, which it is started in: see NetworkManager.attach): the guest has
      // VM_NET's address, as when it was snapshotted, and S reaches it once CNI is done.
      let booting: Promise<void> | undefined;
      const startBoot = (netns: NetnsLaunch | undefined) => {
        booting = boot(netns);
        booting.catch(() => undefined); // awaited below; a failure is handled there
        return booting;
      };
      let net: NetworkAttachment | undefined;
      if (cfg.network) {
        net = await this.attachNetwork(cfg, (ns) => namespaceBound(ns, startBoot({ path: ns, make: true }))).catch(async (e: unknown) => {
          const [, b] = await Promise.allSettled([disks, booting]); // the cleanup below needs QEMU's pid, and the copies done
          throw b.status === 'rejected' ? b.reason : e; // (QEMU's own failure, if it failed, says more)
        });
        T('network');
        // (An attachment that existed already: no namespace was made, the VM starts now.)
        if (!booting) startBoot({ path: net.netns, make: false });
        await booting;
      } else {
        startBoot(undefined);
        await booting;
      }
      if (convert) {
        // (Answered, it also tells that the agent is up.)
        await this.awaitAgent(cfg.id, dir, pid!, cfg.sandbox === true, { type: 'net.configure', net: guestNet(net!) });
        T('agent: net.configure');
      }
      await wiring;
      return this.tracked(cfg, pid!, net); // (pid: set by boot, which succeeded)
    } catch (e) {
      unwarm();
      if (pid && this.isRunning(cfg.id)) await this.killVm(cfg.id, pid);
      await cgroups?.catch(() => undefined); // (made by then, so that destroy removes them)
      await this.destroy(cfg.id, { force: true });
      throw e;
    }
  }

  /** Lets a VM started with -incoming load its snapshot, and run. `q`: launch()'s QMP session, closed here. */
  private async loadSnapshot(id: string, q: QmpSession, lazy: boolean): Promise<void> {
    // Connected before the guest runs, the agent's port is as it was when snapshotted (the host
    // was connected then too): the guest's pending read goes on. Connected later, QEMU would tell
    // the guest that the host went away, and its agent would reopen the port first (~20 ms).
    // (A sandbox keeps this connection; a workload's is dropped by awaitAgent.)
    const agent = this.agent(id, 5000);
    agent.catch(() => undefined); // (awaited below)
    try {
      if (lazy) {
        await q.cmd('migrate-set-capabilities', { capabilities: [{ capability: 'x-ignore-shared', state: true }] });
        await q.cmd('migrate-incoming', { uri: `fd:${STREAM_FD}` }); // (the state file, see startFromSnapshot)
      }
      await agent;
      // The snapshot was taken with the vCPUs stopped, so the loaded VM waits paused: once the
      // memory is in, let it run. Its agent is already up and answers at once.
      const deadline = Date.now() + 60_000;
      for (;;) {
        const st = (await q.cmd('query-status')) as { status?: string };
        if (st.status === 'running') return;
        if (st.status !== 'inmigrate') {
          await q.cmd('cont');
          return;
        }
        if (Date.now() > deadline) throw new Error('loading the snapshot took more than 60 s');
        await sleep(1); // (a lazy snapshot's device state loads within milliseconds)
      }
    } finally {
      q.close();
    }
  }

  /** The handle of a VM that just started (booted or restored), watched for its exit. */
  private tracked(cfg: TaskConfig, pid: number, net: NetworkAttachment | undefined): TaskHandle {
    const handle: TaskHandle = {
      driver: this.name,
      id: cfg.id,
      pid,
      monitorPid: pid,
      startedAt: new Date().toISOString(),
      ...(net ? { network: { ip: net.ip } } : {}),
      ...(cfg.sandbox ? { state: { sandbox: true } } : {}),
    };
    this.track(handle);
    return handle;
  }

  private writeConfig(dir: string, cfg: TaskConfig, net?: NetworkAttachment): void {
    writeFileSync(join(dir, 'cfg.img'), encodeVmConfig(cfg, net), { mode: 0o600 });
  }

  /** The task's network namespace (src/network), wired for the VM (TAP_WIRE). */
  private async joinNetwork(cfg: TaskConfig): Promise<NetworkAttachment | undefined> {
    if (!cfg.network) return undefined;
    const net = await this.attachNetwork(cfg);
    await inNetns(net.netns, `${TAP_CREATE} && ${TAP_WIRE}`);
    return net;
  }

  private attachNetwork(cfg: TaskConfig, makeNamespace?: (netns: string) => Promise<void>): Promise<NetworkAttachment> {
    if (!this.net) throw invalidArgument('the microvm driver has no network manager: run the task with network mode "none"');
    return this.net.attach(cfg.id, this.name, { ...cfg.network!, hostname: cfg.hostname ?? cfg.id.slice(0, 63) }, makeNamespace);
  }

  /**
   * The task's host cgroups, one per controller used: memory (guest RAM + QEMU) and cpu (vCPUs,
   * and the priority: a background VM — a warm-pool member booting — gets cpu.weight 1 / cpu.shares 2
   * so that it takes only CPU time nothing else wants, e.g. not from a claimed sandbox's command).
   */
  private cgroupPlan(id: string): { dir: string; files: (size: CgroupSize) => [string, string][] }[] {
    const out: { dir: string; files: (size: CgroupSize) => [string, string][] }[] = [];
    const mem = (s: { memoryMiB: number }) => (s.memoryMiB + QEMU_OVERHEAD_MIB) * 2 ** 20;
    for (const h of cgroupHierarchies()) {
      const dir = join(h, this.cgroupParent, id);
      if (h === '/sys/fs/cgroup') {
        out.push({ dir, files: (s) => [['memory.max', String(mem(s))], ['cpu.max', `${s.vcpus * 100000} 100000`], ['cpu.weight', s.background ? '1' : '100']] });
        continue;
      }
      const ctrls = h.split('/').pop()!.split(',');
      if (ctrls.includes('memory')) out.push({ dir, files: (s) => [['memory.limit_in_bytes', String(mem(s))]] });
      else if (ctrls.includes('cpu')) out.push({ dir, files: (s) => [['cpu.cfs_period_us', '100000'], ['cpu.cfs_quota_us', String(s.vcpus * 100000)], ['cpu.shares', s.background ? '2' : '1024']] });
    }
    return out;
  }

  setBackground(id: string, background: boolean): void {
    for (const h of cgroupHierarchies()) {
      const v2 = h === '/sys/fs/cgroup';
      if (!v2 && !h.split('/').pop()!.split(',').includes('cpu')) continue;
      try {
        writeFileSync(join(h, this.cgroupParent, id, v2 ? 'cpu.weight' : 'cpu.shares'), v2 ? (background ? '1' : '100') : background ? '2' : '1024');
      } catch {
        /* the task is gone */
      }
    }
  }

  /**
   * Makes the task's cgroups, in the thread pool: a cgroup mkdir takes the kernel's cgroup_mutex,
   * which a migration holds while it waits for an RCU grace period (src/lib/cgroupwarm.ts; 10–40 ms
   * on the benchmark host). Made on the event loop, a start's disk copy, CNI and QEMU waited for it.
   */
  private async makeCgroups(id: string, size: CgroupSize): Promise<string[]> {
    const dirs: string[] = [];
    for (const cg of this.cgroupPlan(id)) {
      if (cg.dir.startsWith('/sys/fs/cgroup/') && existsSync('/sys/fs/cgroup/cgroup.controllers')) {
        // cgroup v2: controllers must be enabled on every ancestor.
        const parent = join('/sys/fs/cgroup', this.cgroupParent);
        await mkdir(parent, { recursive: true });
        for (const d of ['/sys/fs/cgroup', parent]) {
          try {
            await writeFile(join(d, 'cgroup.subtree_control'), '+memory +cpu');
          } catch {
            /* already enabled, or not delegable: the limit write below reports it */
          }
        }
      }
      await mkdir(cg.dir, { recursive: true });
      for (const [f, v] of cg.files(size)) await writeFile(join(cg.dir, f), v);
      dirs.push(cg.dir);
    }
    return dirs;
  }

  /** (In the thread pool: a migration can wait for an RCU grace period, see src/lib/cgroupwarm.ts.) */
  private async joinCgroups(dirs: string[], pid: number): Promise<void> {
    for (const d of dirs) await writeFile(join(d, 'cgroup.procs'), String(pid));
  }

  /**
   * Starts QEMU in its own session (not daemonized, see below); resolves once QEMU has set up, its
   * QMP monitor answering, and sits in the task's cgroups. Returns its pid and that QMP session.
   *
   * Not `-daemonize`: QEMU's daemonizing forks it after its libraries are loaded and its options
   * parsed, and the child then copies, page by page, all that the parent had written (the
   * libraries' relocations, the heap of its ~1,000 QOM types) as it goes on. Measured with a
   * fork's command line (BENCHMARKS.md, session 19): 72 ms to a ready monitor daemonized, 43 ms
   * not. Like a daemon, QEMU is in a session of its own and outlives berthd (a restarted berthd
   * adopts it by its pid file, see recover()). Its stderr is the task's qemu.stderr, read when it
   * fails to start.
   */
  private async launch(dir: string, args: string[], cgroups: string[] | Promise<string[]>, netns?: NetnsLaunch, streamFile?: string): Promise<{ pid: number; qmp: QmpSession }> {
    // In a network namespace, QEMU is exec'd (same pid) by nsenter, or by unshare when it is to make
    // the namespace (bound at the path before QEMU runs), so that it opens the tap there. Started by
    // the spawner in berthd (src/lib/spawner.ts): a start from berthd itself stalled its event loop
    // ~6.6 ms (the fork of its ~110 MiB), on the start's path. QEMU's stderr goes to a file of the
    // task (what it says when it fails to start is read from there); the stream to restore is opened
    // as STREAM_FD.
    const stderrFile = join(dir, 'qemu.stderr');
    const file = netns ? (netns.make ? 'unshare' : 'nsenter') : this.qemu;
    const started = await startDetached(file, netns ? [`--net=${netns.path}`, '--', this.qemu, ...args] : args, {
      cwd: dir,
      stderrFile,
      ...(streamFile !== undefined ? { fdFiles: [streamFile] } : {}),
    }).catch((e: unknown) => Promise.reject(new Error(`qemu failed to start: ${(e as Error).message}`)));
    const { pid } = started;
    let exited = false;
    const ended = started.exited.then((why) => {
      exited = true;
      let said = '';
      try {
        said = readFileSync(stderrFile, 'utf8').slice(-4000).trim().slice(0, 1000);
      } catch {
        /* (none) */
      }
      return said || why;
    });
    const failed = ended.then((why) => Promise.reject(new Error(`qemu failed to start: ${why}`)));
    failed.catch(() => undefined); // (raced below)
    // Joined while QEMU sets up (moving a process moves all its threads). A restored guest runs only
    // once loadSnapshot() lets it; a booted one as soon as QEMU is set up, ~40 ms after this join
    // began (as before: the daemon was forked while the launcher was being moved).
    const joined = Promise.resolve(cgroups).then((dirs) => this.joinCgroups(dirs, pid));
    joined.catch(() => undefined); // (awaited below)
    const deadline = Date.now() + 60_000;
    const ready = (async (): Promise<QmpSession> => {
      // The monitor's socket exists once QEMU has parsed its options; it answers once all is set up.
      for (;;) {
        try {
          return await QmpSession.open(join(dir, 'qmp.sock'), Math.max(1000, deadline - Date.now()));
        } catch (e) {
          const code = (e as NodeJS.ErrnoException).code;
          if ((code !== 'ENOENT' && code !== 'ECONNREFUSED') || exited) throw e;
          if (Date.now() > deadline) throw new Error('qemu did not open its QMP socket within 60 s', { cause: e });
          await sleep(2);
        }
      }
    })();
    let q: QmpSession | undefined;
    try {
      q = await Promise.race([ready, failed]);
      await Promise.race([joined, failed]);
      started.unwatch();
      return { pid, qmp: q };
    } catch (e) {
      q?.close();
      void ready.then((s) => s.close(), () => undefined);
      // A QEMU that ended tells why better than the connection it dropped (its monitor's socket
      // exists before the rest of its set-up, which can still fail).
      const why = await Promise.race([ended, sleep(1000).then(() => undefined)]);
      started.unwatch();
      throw why !== undefined ? new Error(`qemu failed to start: ${why}`) : e; // (QEMU, if it still runs, is ended by the caller's destroy(), found by its pid file)
    }
  }

  /** Waits until the guest agent answers `probe` (hello) with the workload started (or the VM is gone). */
  private async awaitAgent(id: string, dir: string, pid: number, keep: boolean, probe: Record<string, unknown> = { type: 'hello' }): Promise<void> {
    const deadline = Date.now() + this.bootWallTimeoutMs;
    const gone = new AbortController();
    const watchdog = (async () => {
      while (!gone.signal.aborted) {
        if (!this.vmAlive(id, pid)) return 'gone' as const;
        if (processCpuMs(pid) > this.bootTimeoutMs) return 'cpu' as const;
        await sleep(50, gone.signal).catch(() => undefined); // (ends at once when the agent answered)
      }
      return 'aborted' as const;
    })();
    let ok = false;
    try {
      const hello = (async (): Promise<AgentFrame> => {
        const conn = await this.agents.get(id, join(dir, 'agent.sock'), 5000);
        // (A restored VM's clock goes on from its snapshot's time; a booted one's misses QEMU's start.)
        return stampedHello(conn, probe, Math.max(1000, deadline - Date.now()), gone.signal);
      })();
      // A connection reset by a VM that powered off is the VM's end, not the reason: wait for it.
      const helloOrGone = hello.catch(async (e: unknown) => ((await this.waitGone(id, pid, 3000)) ? ('gone' as const) : Promise.reject(e)));
      const first = await Promise.race([helloOrGone, watchdog]);
      if (first === 'gone') {
        // The VM ended before the agent answered: a workload that ran and exited at once is fine;
        // a boot or exec failure is the start's failure.
        const rec = this.readExitRecord(id);
        if (rec?.error !== undefined || !rec) throw new Error(this.bootError(dir, rec?.error));
        return;
      }
      if (first === 'aborted') throw new Error('aborted');
      if (first === 'cpu') {
        const tail = consoleTail(dir);
        throw new Error(
          `the microVM's agent did not answer although the VM used ${(processCpuMs(pid) / 1000).toFixed(1)} s of CPU booting (limit: ${this.bootTimeoutMs} ms of CPU time)${tail ? `; guest console:\n${tail}` : ''}`,
        );
      }
      ok = true;
    } finally {
      gone.abort();
      if (!ok || !keep) this.agents.drop(id); // workloads need no standing connection; sandboxes keep it
      await watchdog;
    }
  }

  private bootError(dir: string, agentError: string | undefined): string {
    if (agentError) return agentError;
    const tail = consoleTail(dir);
    return `the microVM stopped before its agent was ready${tail ? `; guest console:\n${tail}` : ''}`;
  }

  /** The task's guest agent (sandbox VMs; also how a workload is signalled). */
  agent(id: string, timeoutMs = 5000): Promise<AgentConnection> {
    return this.agents.get(id, join(this.taskDir(id), 'agent.sock'), timeoutMs);
  }

  /** A command in the guest, through the agent's `run` request (as sandbox commands are run); killed at the time limit. */
  async exec(h: TaskHandle, args: string[], timeoutMs: number): Promise<TaskExecResult> {
    let output = '';
    const proc = `exec-${randomBytes(6).toString('hex')}`;
    let agent: AgentConnection | undefined;
    try {
      agent = await this.agent(h.id, Math.min(timeoutMs, 5000));
      const end = await agent.request({ id: proc, type: 'run', args, env: {}, stdin: false }, timeoutMs, undefined, (f) => {
        if ((f.type === 'stdout' || f.type === 'stderr') && output.length < 4096) output += Buffer.from(String(f.data ?? ''), 'base64').toString('utf8');
      });
      return { exitCode: typeof end.code === 'number' ? end.code : -1, output: output.slice(0, 4096) };
    } catch (e) {
      await agent?.request({ type: 'signal', proc, sig: 'SIGKILL', group: true }, 2000).catch(() => undefined);
      return { exitCode: -1, output: (output + (e as Error).message).slice(0, 4096) };
    }
  }

  private readPid(id: string): number | undefined {
    try {
      const pid = Number(readFileSync(join(this.taskDir(id), 'qemu.pid'), 'utf8').trim());
      return Number.isInteger(pid) && pid > 0 ? pid : undefined;
    } catch {
      return undefined;
    }
  }

  /** The pid is this task's QEMU (not a reused pid) and not a zombie. */
  private vmAlive(id: string, pid: number | undefined): boolean {
    if (!pid || !pidAlive(pid)) return false;
    try {
      const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
      if (stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) === 'Z') return false;
      return readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes(`${this.taskDir(id)}/qemu.pid`);
    } catch {
      return false;
    }
  }

  private isRunning(id: string): boolean {
    return this.vmAlive(id, this.readPid(id));
  }

  private readExitRecord(id: string): { exitCode: number; signal?: string; oomKilled?: boolean; finishedAt?: string; error?: string } | undefined {
    try {
      const lines = readFileSync(join(this.taskDir(id), 'exit.json'), 'utf8').trim().split('\n');
      return JSON.parse(lines[lines.length - 1]!) as { exitCode: number };
    } catch {
      return undefined;
    }
  }

  /** The exit of a VM that is gone: the agent's record, else a kill by Berth, else an unexplained end. */
  private exitResult(id: string): ExitResult {
    const rec = this.readExitRecord(id);
    if (rec && typeof rec.exitCode === 'number') {
      // Like the other tiers (conmon reports 128+n): a status above 128 names the signal, also when
      // a shell passed its child's death on as its own exit status.
      const signal = rec.signal ?? (rec.exitCode > 128 ? signalName(rec.exitCode - 128) : undefined);
      return {
        exitCode: rec.exitCode,
        ...(signal ? { signal } : {}),
        oomKilled: rec.oomKilled === true,
        finishedAt: rec.finishedAt ?? new Date().toISOString(),
      };
    }
    let finishedAt = new Date().toISOString();
    try {
      finishedAt = statSync(join(this.taskDir(id), 'console.log')).mtime.toISOString();
    } catch {
      /* keep now */
    }
    if (existsSync(join(this.taskDir(id), 'killed'))) return { exitCode: 137, signal: 'SIGKILL', oomKilled: false, finishedAt };
    return { exitCode: 255, oomKilled: false, finishedAt };
  }

  async wait(handle: TaskHandle, signal?: AbortSignal): Promise<ExitResult> {
    const dir = this.taskDir(handle.id);
    if (!existsSync(dir)) throw new Error(`task ${handle.id} does not exist`);
    let w: FSWatcher | undefined;
    try {
      let wake: () => void = () => undefined;
      try {
        w = watch(dir, () => wake());
      } catch {
        /* polling only */
      }
      while (this.vmAlive(handle.id, handle.pid)) {
        if (signal?.aborted) throw signal.reason instanceof Error ? signal.reason : new Error('aborted');
        await new Promise<void>((r) => {
          const t = setTimeout(r, 100);
          wake = () => {
            clearTimeout(t);
            r();
          };
        });
      }
    } finally {
      w?.close();
    }
    return this.exitResult(handle.id);
  }

  /** Emits 'exit' for the task once its VM is gone (for the reconciler), until close(). */
  private track(handle: TaskHandle): void {
    if (this.closed || this.tracking.has(handle.id)) return;
    const ac = new AbortController();
    this.tracking.set(handle.id, ac);
    this.wait(handle, ac.signal).then(
      () => {
        if (this.tracking.get(handle.id) === ac) this.tracking.delete(handle.id);
        this.exits.emit('exit', handle.id);
      },
      () => {
        if (this.tracking.get(handle.id) === ac) this.tracking.delete(handle.id);
      },
    );
  }

  private async signalMain(id: string, sig: string, timeoutMs = 3000): Promise<boolean> {
    try {
      await (await this.agent(id, 2000)).request({ type: 'signal', proc: 'main', sig }, timeoutMs);
      return true;
    } catch {
      return false;
    }
  }

  private async waitGone(id: string, pid: number, ms: number): Promise<boolean> {
    const deadline = Date.now() + ms;
    while (this.vmAlive(id, pid)) {
      if (Date.now() > deadline) return false;
      await sleep(20);
    }
    return true;
  }

  private async killVm(id: string, pid: number): Promise<void> {
    writeFileSync(join(this.taskDir(id), 'killed'), '');
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      /* already gone */
    }
    await this.waitGone(id, pid, 10_000);
  }

  async stop(handle: TaskHandle, opts: StopOptions): Promise<ExitResult> {
    const sig = opts.signal ?? 'SIGTERM';
    if (!(sig in SIGNALS)) throw invalidArgument(`unknown signal ${sig}; use a name such as SIGTERM or SIGINT`);
    const pid = handle.pid;
    if (this.vmAlive(handle.id, pid)) await qmp(join(this.taskDir(handle.id), 'qmp.sock'), 'cont', undefined, 3000).catch(() => undefined); // a paused VM cannot act
    if (handle.state?.sandbox === true && this.vmAlive(handle.id, pid)) {
      // A sandbox has no main process: ask the agent to power the VM off, else pull the plug.
      const asked = await this.agent(handle.id, 2000)
        .then((c) => c.request({ type: 'shutdown', poweroff: true }, 3000))
        .then(() => true, () => false);
      if (!asked || !(await this.waitGone(handle.id, pid, Math.max(opts.timeoutMs, 1000)))) await this.killVm(handle.id, pid);
    } else if (this.vmAlive(handle.id, pid)) {
      // The signal goes to the workload through the agent; the VM powers off when it has exited.
      // A guest slowed down by its host may take seconds to answer: that is time of the grace period,
      // not a reason to escalate to SIGKILL before it ends.
      const delivered = await this.signalMain(handle.id, sig, Math.max(3000, opts.timeoutMs));
      if (!delivered || !(await this.waitGone(handle.id, pid, opts.timeoutMs))) {
        const killed = (await this.signalMain(handle.id, 'SIGKILL')) && (await this.waitGone(handle.id, pid, 5000));
        if (!killed) await this.killVm(handle.id, pid);
      }
    }
    return this.exitResult(handle.id);
  }

  async destroy(id: string, opts: { force?: boolean; keepData?: boolean } = {}): Promise<void> {
    this.agents.drop(id);
    this.tracking.get(id)?.abort();
    this.tracking.delete(id);
    const dir = this.taskDir(id);
    const pid = this.readPid(id);
    if (pid && this.vmAlive(id, pid)) await this.killVm(id, pid);
    for (const cg of this.cgroupPlan(id)) {
      for (let i = 0; i < 50 && existsSync(cg.dir); i++) {
        try {
          rmdirSync(cg.dir);
        } catch {
          await sleep(20); // the killed QEMU leaves its cgroup a moment after it is reaped
        }
      }
    }
    // The network lives as long as one run of the VM (the namespace goes, with the tap in it).
    await this.net?.detach(id, this.name);
    if (!existsSync(dir)) return;
    if (opts.keepData) {
      for (const f of readdirSync(dir)) if (f !== 'rw.ext4' && f !== 'ctr.log') rmSync(join(dir, f), { recursive: true, force: true });
    } else {
      rmSync(dir, { recursive: true, force: true });
    }
  }

  /** Stops the VM's vCPUs (QMP stop): guest memory stays, no CPU is used until resume. */
  async pause(handle: TaskHandle): Promise<void> {
    if (!this.vmAlive(handle.id, handle.pid)) throw new BerthError('failed_precondition', `microVM ${handle.id} is not running`);
    await qmp(join(this.taskDir(handle.id), 'qmp.sock'), 'stop');
  }

  async resume(handle: TaskHandle): Promise<void> {
    if (!this.vmAlive(handle.id, handle.pid)) throw new BerthError('failed_precondition', `microVM ${handle.id} is not running`);
    await qmp(join(this.taskDir(handle.id), 'qmp.sock'), 'cont');
    // The guest's clock stood still while its vCPUs were stopped: its agent steps it to the host's.
    try {
      await stampedHello(await this.agent(handle.id), { type: 'hello' }, 10_000);
    } finally {
      if (handle.state?.sandbox !== true) this.agents.drop(handle.id); // (as after a start: workloads keep no connection)
    }
  }

  async inspect(handle: TaskHandle): Promise<TaskStatus> {
    if (this.vmAlive(handle.id, handle.pid)) return { state: 'running', pid: handle.pid, monitorPid: handle.pid };
    if (!existsSync(join(this.taskDir(handle.id), 'cfg.img'))) return { state: 'missing' };
    return { state: 'exited', exit: this.exitResult(handle.id) };
  }

  async recover(handle: TaskHandle): Promise<TaskStatus> {
    const pid = handle.pid || this.readPid(handle.id);
    const h = { ...handle, pid: pid ?? 0 };
    const st = await this.inspect(h);
    if (st.state === 'running') this.track(h);
    return st;
  }

  async listTasks(): Promise<string[]> {
    const ids = new Set<string>(this.net?.tasksOf(this.name) ?? []);
    try {
      for (const d of readdirSync(join(this.stateDir, 'tasks'))) ids.add(d);
    } catch {
      /* none */
    }
    return [...ids];
  }

  /** Remove the (empty) parent cgroups; called when berthd stops. */
  removeCgroupParent(): void {
    for (const h of cgroupHierarchies()) {
      try {
        rmdirSync(join(h, this.cgroupParent));
      } catch {
        /* busy or absent */
      }
    }
  }
}

/**
 * Sends `probe` (a hello) stamped with the host's time, so that the agent steps a guest clock that is
 * behind it forward (agent/PROTOCOL.md). A stamp that waited in the agent's port while the VM booted or
 * was restored is that much in the past: when the answer shows the guest behind the host by more than
 * 100 ms, one more stamped hello, answered at once, steps it again. Resolves with the first answer.
 */
async function stampedHello(conn: AgentConnection, probe: Record<string, unknown>, timeoutMs: number, signal?: AbortSignal): Promise<AgentFrame> {
  const answer = await conn.request({ ...probe, epochMs: Date.now() }, timeoutMs, signal);
  if (typeof answer.epochMs === 'number' && Date.now() - answer.epochMs > 100) await conn.request({ type: 'hello', epochMs: Date.now() }, 5000, signal);
  return answer;
}

/** The last lines of a VM's serial console ('' when it wrote none). */
function consoleTail(dir: string): string {
  try {
    return readFileSync(join(dir, 'console.log'), 'utf8').trim().split('\n').slice(-8).join('\n');
  } catch {
    return '';
  }
}
