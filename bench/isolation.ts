// Benchmark: the "seed table" of the isolation tiers, measured on this host. For every tier whose
// driver is healthy (GET /v1/info), each beside the bare runtime on the same rootfs and the same
// OCI config the driver generates:
//   1. cold start to first output (busybox `echo ready`): Berth = POST workload → first line of the
//      followed ndjson log stream; bare = spawning `runc run` / `runsc run` (foreground) → first
//      stdout byte. Interleaved, p50 and p90.
//   2. host memory (and CPU) of idle workloads beyond the workload's own processes: conmon (Berth's monitor),
//      berthd's growth, and for gVisor the runtime's own sandbox + gofer processes (bare and under Berth).
//   3. density: idle workloads started one by one through Berth until a bound is hit.
// Usage: node dist/bench/isolation.js [--runs 30] [--density-max N] [--tiers container,gvisor,microvm] [--write BENCHMARKS.md]
//        (or `berth bench isolation …`); as root.
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, rmdirSync, statSync, writeFileSync } from 'node:fs';
import { cpus, release, totalmem } from 'node:os';
import { basename, join } from 'node:path';
import { parseArgs } from 'node:util';
import { TestDaemon } from '../test/harness.js';
import { ensureBusyboxImage } from '../src/images/busybox.js';
import { buildOciConfig, hostNofileLimit } from '../src/drivers/oci/ocispec.js';
import { loadDefaultSeccomp } from '../src/drivers/oci/seccomp.js';
import { DEFAULT_CAPS } from '../src/drivers/oci/driver.js';
import { updateBenchmarks } from './report.js';
import { BareMicroVm, type BareVm } from './microvm-bare.js';
import { MigrationWarmer } from '../src/lib/cgroupwarm.js';
import { taskMonitorPids } from './monitors.js';
import type { Fingerprint } from '../src/core/driver.js';
import { processCpuMs } from '../src/lib/host.js';
import { Interrupted, catchInterrupts } from './interrupt.js';

const { values } = parseArgs({
  options: { runs: { type: 'string', default: '30' }, 'density-max': { type: 'string' }, write: { type: 'string' }, tiers: { type: 'string' } },
});
const RUNS = Number(values.runs);
if (!Number.isInteger(RUNS) || RUNS < 1) throw new Error('--runs must be a whole number ≥ 1');
const DENSITY_OVERRIDE = values['density-max'] === undefined ? undefined : Number(values['density-max']);
if (DENSITY_OVERRIDE !== undefined && (!Number.isInteger(DENSITY_OVERRIDE) || DENSITY_OVERRIDE < 1)) throw new Error('--density-max must be a whole number ≥ 1');
const DENSITY_DEFAULT: Record<string, number> = { container: 50, gvisor: 20, microvm: 20 };
const IDLE = 5;
const MIN_AVAILABLE = 2 * 2 ** 30;
const START_BOUND_MS = 10_000;
/** A microVM boots a kernel under TCG: seconds, not milliseconds. */
const START_BOUND_MS_VM = 30_000;
const W = '/v1/projects/default/workloads';

// ---------------------------------------------------------------------------------------------
// Interruption: a signal ends the current step and lets `finally` clean up.
const checkInterrupted = catchInterrupts('isolation bench');

// ---------------------------------------------------------------------------------------------
// Small helpers

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const sorted = (xs: number[]) => [...xs].sort((a, b) => a - b);
function median(xs: number[]): number {
  const s = sorted(xs);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}
const pct = (xs: number[], p: number) => sorted(xs)[Math.min(xs.length - 1, Math.floor((p / 100) * xs.length))]!;
const ms = (x: number) => `${x.toFixed(1)} ms`;
const kib = (x: number) => `${Math.round(x).toLocaleString('en-US')} KiB`;
const mib = (kb: number) => `${(kb / 1024).toFixed(2)} MiB`;

function sh(cmd: string, args: string[], opts: { allowFail?: boolean } = {}): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: 60_000 });
  if (r.status !== 0 && !opts.allowFail) throw new Error(`${cmd} ${args.join(' ')}: ${r.error?.message ?? ''}${r.stderr}`);
  return r.stdout ?? '';
}

/**
 * A detached `run`: the container keeps the stdio it was given, so it gets /dev/null (a pipe would
 * stay open as long as the container runs).
 */
async function runDetached(bin: string, args: string[]): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    const p = spawn(bin, args, { stdio: 'ignore' });
    const timer = setTimeout(() => p.kill('SIGKILL'), 60_000);
    p.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    p.on('exit', (code, signal) => {
      clearTimeout(timer);
      if (code === 0) resolve();
      else reject(new Error(`${bin} ${args.join(' ')} exited ${code ?? signal}`));
    });
  });
}

/** Median of five MemAvailable readings 200 ms apart (it jitters with the rest of the host). */
async function steadyMemAvailable(): Promise<number> {
  const xs: number[] = [];
  for (let i = 0; i < 5; i++) {
    if (i) await sleep(200);
    xs.push(memAvailable());
  }
  return median(xs);
}

/** Bytes charged to a cgroup (v1: memory.usage_in_bytes, hierarchical; v2: memory.current); undefined if absent. */
function cgroupMemory(parent: string): number | undefined {
  const p = existsSync('/sys/fs/cgroup/cgroup.controllers') ? `/sys/fs/cgroup/${parent}/memory.current` : `/sys/fs/cgroup/memory/${parent}/memory.usage_in_bytes`;
  try {
    return Number(readFileSync(p, 'utf8').trim());
  } catch {
    return undefined;
  }
}

function memAvailable(): number {
  return Number(/^MemAvailable:\s+(\d+)/m.exec(readFileSync('/proc/meminfo', 'utf8'))?.[1] ?? 0) * 1024;
}

interface Mem {
  rss: number;
  pss: number;
}
/** RSS and PSS (KiB) of one process, from smaps_rollup; undefined if it is gone. */
function memOf(pid: number): Mem | undefined {
  try {
    const t = readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8');
    const kb = (k: string) => Number(new RegExp(`^${k}:\\s+(\\d+)`, 'm').exec(t)?.[1] ?? 0);
    return { rss: kb('Rss'), pss: kb('Pss') };
  } catch {
    return undefined;
  }
}

interface Proc {
  pid: number;
  ppid: number;
  argv: string[];
}
function processes(): Proc[] {
  const out: Proc[] = [];
  for (const p of readdirSync('/proc')) {
    if (!/^\d+$/.test(p)) continue;
    try {
      const stat = readFileSync(`/proc/${p}/stat`, 'utf8');
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      const argv = readFileSync(`/proc/${p}/cmdline`, 'utf8').split('\0').filter((a, i, all) => a !== '' || i < all.length - 1);
      out.push({ pid: Number(p), ppid, argv });
    } catch {
      /* raced */
    }
  }
  return out;
}
/** Berth's per-container monitor: conmon, or the guest agent in monitor mode. */
const isConmon = (p: Proc) => basename(p.argv[0] ?? '') === 'conmon' || (basename(p.argv[0] ?? '') === 'berth-agent' && p.argv[1] === 'monitor');

/** The monitors of a driver's tasks (found by their pid files: bench/monitors.ts). */
function taskMonitors(all: Proc[], stateDir: string): Proc[] {
  const pids = new Set(taskMonitorPids(stateDir));
  return all.filter((p) => isConmon(p) && pids.has(p.pid));
}

/** Processes matching `pred` plus all their descendants (conmon excluded). */
function withDescendants(all: Proc[], pred: (p: Proc) => boolean): Proc[] {
  const picked = new Map<number, Proc>();
  for (const p of all) if (!isConmon(p) && pred(p)) picked.set(p.pid, p);
  for (let grew = true; grew; ) {
    grew = false;
    for (const p of all) {
      if (!picked.has(p.pid) && picked.has(p.ppid) && !isConmon(p)) {
        picked.set(p.pid, p);
        grew = true;
      }
    }
  }
  return [...picked.values()];
}

/** runsc's long-lived processes (sandbox, gofer and what they spawn) of one runsc --root. */
function runscProcesses(all: Proc[], root: string): Proc[] {
  return withDescendants(all, (p) => p.argv.includes(`--root=${root}`) && (p.argv.includes('boot') || p.argv.includes('gofer')));
}

/** "runsc-sandbox ×5, runsc-gofer ×5": argv[0] names with counts, for the progress log. */
function describe(ps: Proc[]): string {
  const n = new Map<string, number>();
  for (const p of ps) {
    // systrap's stub processes have no command line.
    const k = p.argv[0] ? basename(p.argv[0]) : 'stub (no cmdline)';
    n.set(k, (n.get(k) ?? 0) + 1);
  }
  return [...n].map(([k, v]) => `${k} ×${v}`).join(', ') || 'none';
}

/** A group of processes: how many, their memory (KiB) and their CPU while idle (ms per s). */
type Usage = Mem & { n: number; cpu: number };

/** How long idle workloads are watched for the CPU they use. */
const IDLE_CPU_WINDOW_MS = 10_000;

/** CPU (ms per s, user + system, all threads) that each group of processes uses over IDLE_CPU_WINDOW_MS. */
async function idleCpu(groups: Proc[][]): Promise<number[]> {
  const total = (ps: Proc[]) => ps.reduce((ms, p) => ms + processCpuMs(p.pid), 0);
  const before = groups.map(total);
  await sleep(IDLE_CPU_WINDOW_MS);
  return groups.map((g, i) => ((total(g) - before[i]!) * 1000) / IDLE_CPU_WINDOW_MS);
}

function sumMem(ps: Proc[]): Mem & { n: number } {
  let rss = 0;
  let pss = 0;
  let n = 0;
  for (const p of ps) {
    const m = memOf(p.pid);
    if (!m) continue;
    rss += m.rss;
    pss += m.pss;
    n++;
  }
  return { rss, pss, n };
}

function isMounted(path: string): boolean {
  return readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .some((l) => l.split(' ')[4] === path);
}

/** Removes a cgroup directory tree bottom-up (cgroup dirs are removed with rmdir). */
function rmCgroupTree(dir: string): void {
  let entries: string[] = [];
  try {
    if (!statSync(dir).isDirectory()) return;
    entries = readdirSync(dir, { withFileTypes: true })
      .filter((e) => e.isDirectory())
      .map((e) => e.name);
  } catch {
    return;
  }
  for (const e of entries) rmCgroupTree(join(dir, e));
  try {
    rmdirSync(dir);
  } catch {
    /* busy: reported by the caller */
  }
}

// ---------------------------------------------------------------------------------------------
// Tiers

/** GET /v1/info's view of a driver. */
type DriverInfo = Fingerprint;

interface Tier {
  isolation: string;
  driver: string;
  label: string;
  /** Bare runtime: binary and global flags. */
  bin: string;
  global: string[];
  root: string;
  /** How the runtime runs a container detached. */
  detachFlag: string;
  hostOverlay: boolean;
  /** oci: runc/runsc with a bundle; microvm: QEMU with the driver's own command line. */
  kind: 'oci' | 'microvm';
}

// ---------------------------------------------------------------------------------------------

async function main(): Promise<void> {
  const d = await TestDaemon.start();
  const work = mkdtempSync('/tmp/berth-isolation-bench-');
  const bareCgroupParent = `${d.cgroupParent}-bare`;
  const mounts = new Set<string>();
  const bareIds = new Map<Tier, Set<string>>();
  const tiers: Tier[] = [];
  const nofile = hostNofileLimit();
  try {
    const info = (await d.api('GET', '/v1/info')).body as { version: string; drivers: DriverInfo[]; isolations: string[] };
    const unavailable: Array<{ isolation: string; reason: string }> = [];
    let microvmFp: DriverInfo | undefined;
    const only = values.tiers?.split(',');
    for (const iso of info.isolations) {
      if (only && !only.includes(iso)) continue;
      const drv = info.drivers.find((x) => x.isolation === iso);
      if (!drv) {
        unavailable.push({ isolation: iso, reason: 'no driver for this isolation tier (not implemented yet)' });
        continue;
      }
      if (!drv.healthy) {
        unavailable.push({ isolation: iso, reason: drv.reason });
        continue;
      }
      const root = join(work, `${drv.driver}-root`);
      mkdirSync(root, { recursive: true, mode: 0o700 });
      if (iso === 'container') {
        tiers.push({ isolation: iso, driver: drv.driver, label: `container (runc ${drv.version ?? '?'})`, bin: 'runc', global: ['--root', root], root, detachFlag: '-d', hostOverlay: false, kind: 'oci' });
      } else if (iso === 'gvisor') {
        const bin = drv.attributes.runsc ?? '/usr/local/lib/berth/runsc';
        const platform = drv.attributes.platform ?? 'systrap';
        tiers.push({
          isolation: iso,
          driver: drv.driver,
          label: `gvisor (runsc ${drv.version ?? '?'}, ${platform})`,
          bin,
          global: [`--root=${root}`, `--platform=${platform}`, '--network=none', '--overlay2=none'],
          root,
          detachFlag: '--detach',
          hostOverlay: true,
          kind: 'oci',
        });
      } else if (iso === 'microvm') {
        const a = drv.attributes;
        tiers.push({
          isolation: iso,
          driver: drv.driver,
          label: `microvm (QEMU ${drv.version ?? '?'} microvm, ${(a.accel ?? '?').toUpperCase()}, guest kernel ${a.kernel ?? '?'})`,
          bin: a.qemu ?? '/usr/bin/qemu-system-x86_64',
          global: [],
          root,
          detachFlag: '',
          hostOverlay: false,
          kind: 'microvm',
        });
        microvmFp = drv;
      } else {
        unavailable.push({ isolation: iso, reason: `healthy driver ${drv.driver}, but this benchmark has no bare baseline for it yet` });
      }
    }
    for (const t of tiers) bareIds.set(t, new Set());

    // Resolve the image through Berth first (it builds it), then use the same rootfs for the bare runs.
    if (tiers.length === 0) throw new Error(`no isolation tier is available: ${unavailable.map((u) => `${u.isolation}: ${u.reason}`).join('; ')}`);
    await berthEcho(d, 'warm-image', tiers[0]!.isolation);
    const img = await ensureBusyboxImage(join(d.dataDir, 'images'));
    const bareVm = microvmFp ? new BareMicroVm(work, join(d.dataDir, 'runtime', 'microvm', 'cache'), microvmFp, img.rootfs, img.digest) : undefined;

    // --- bare runtime helpers -----------------------------------------------------------------
    let seq = 0;
    const bareBundle = (t: Tier, args: string[]): { id: string; bundle: string; dir: string } => {
      const id = `bare-${t.isolation.slice(0, 1)}-${seq++}`;
      const dir = join(work, 'tasks', id);
      const bundle = join(dir, 'bundle');
      for (const x of ['upper', 'work', 'bundle']) mkdirSync(join(dir, x), { recursive: true, mode: 0o700 });
      const task = { id, imageRootfs: img.rootfs, args, env: {}, cwd: '/', user: { uid: 0, gid: 0 }, resources: {} };
      const cgroupsPath = `/${bareCgroupParent}/${id}`;
      let cfg;
      if (t.hostOverlay) {
        const rootfs = join(bundle, 'rootfs');
        mkdirSync(rootfs, { mode: 0o755 });
        sh('mount', ['-t', 'overlay', 'overlay', '-o', `lowerdir=${img.rootfs},upperdir=${join(dir, 'upper')},workdir=${join(dir, 'work')}`, rootfs]);
        mounts.add(rootfs);
        cfg = buildOciConfig(task, { rootfsPath: rootfs, cgroupsPath, seccomp: null, nofileLimit: nofile });
      } else {
        cfg = buildOciConfig(task, {
          rootfsPath: img.rootfs,
          rootOverlay: { upperDir: join(dir, 'upper'), workDir: join(dir, 'work') },
          cgroupsPath,
          seccomp: loadDefaultSeccomp({ capabilities: DEFAULT_CAPS }),
          nofileLimit: nofile,
        });
      }
      writeFileSync(join(bundle, 'config.json'), JSON.stringify(cfg));
      bareIds.get(t)!.add(id);
      return { id, bundle, dir };
    };
    const bareRemove = (t: Tier, id: string, dir: string) => {
      sh(t.bin, [...t.global, 'delete', '--force', id], { allowFail: true });
      const rootfs = join(dir, 'bundle', 'rootfs');
      if (mounts.has(rootfs)) {
        if (isMounted(rootfs)) sh('umount', [rootfs], { allowFail: true });
        if (isMounted(rootfs)) sh('umount', ['-l', rootfs], { allowFail: true });
        mounts.delete(rootfs);
      }
      rmSync(dir, { recursive: true, force: true });
      bareIds.get(t)!.delete(id);
    };
    /**
     * Foreground `run` of `echo ready`: ms from preparing the bundle to the first stdout byte. The
     * clock starts before the bundle is prepared because Berth's figure includes the same
     * preparation (task folders, config.json, and for gVisor the host overlay mount on the rootfs);
     * for runc the overlay is mounted by runc itself, inside the timed run, on both sides.
     */
    const bareEcho = async (t: Tier): Promise<number> => {
      const t0 = performance.now();
      const { id, bundle, dir } = bareBundle(t, ['echo', 'ready']);
      try {
        return await new Promise<number>((resolve, reject) => {
          const p = spawn(t.bin, [...t.global, 'run', '--bundle', bundle, id], { stdio: ['ignore', 'pipe', 'pipe'] });
          let t1: number | undefined;
          let out = '';
          let err = '';
          const timer = setTimeout(() => p.kill('SIGKILL'), 60_000);
          p.stdout!.on('data', (b: Buffer) => {
            t1 ??= performance.now();
            out += b.toString();
          });
          p.stderr!.on('data', (b: Buffer) => (err += b.toString()));
          p.on('error', (e) => {
            clearTimeout(timer);
            reject(e);
          });
          p.on('close', (code) => {
            clearTimeout(timer);
            if (code !== 0 || t1 === undefined || !out.startsWith('ready')) reject(new Error(`${t.bin} run exited ${code}: stdout ${JSON.stringify(out)} stderr ${err.trim()}`));
            else resolve(t1 - t0);
          });
        });
      } finally {
        bareRemove(t, id, dir);
      }
    };

    const bareOf = (t: Tier): Promise<number> => (t.kind === 'microvm' ? bareVm!.echo(t.bin) : bareEcho(t));

    // --- 1. cold start to first output ---------------------------------------------------------
    const cold = new Map<Tier, { bare: number[]; bareWarm: number[]; berth: number[]; written: number[] }>();
    // Like for like: the OCI runtimes' bare runs again while cgroup migrations are kept warm, as
    // berthd keeps them during its starts (src/lib/cgroupwarm.ts); the bare QEMU boot joins no cgroup.
    const warmer = new MigrationWarmer();
    const bareWarmOf = (t: Tier): Promise<number> => warmer.during(() => bareEcho(t));
    for (const t of tiers) {
      checkInterrupted();
      console.error(`cold start: ${t.isolation}, ${RUNS} interleaved runs`);
      for (let i = 0; i < 2; i++) {
        await bareOf(t);
        await berthEcho(d, `warm-${t.isolation.slice(0, 1)}-${i}`, t.isolation);
      }
      writtenAfter.delete(t.isolation);
      const bare: number[] = [];
      const bareWarm: number[] = [];
      const berth: number[] = [];
      for (let i = 0; i < RUNS; i++) {
        checkInterrupted();
        if (t.kind === 'oci') bareWarm.push(await bareWarmOf(t));
        // Alternate which goes first so neither always runs right after the other's clean-up.
        if (i % 2 === 0) {
          bare.push(await bareOf(t));
          berth.push(await berthEcho(d, `cs-${t.isolation.slice(0, 1)}-${i}`, t.isolation));
        } else {
          berth.push(await berthEcho(d, `cs-${t.isolation.slice(0, 1)}-${i}`, t.isolation));
          bare.push(await bareOf(t));
        }
      }
      cold.set(t, { bare, bareWarm, berth, written: writtenAfter.get(t.isolation) ?? [] });
    }

    // --- 2. memory of idle workloads ------------------------------------------------------------
    interface MemResult {
      bareRuntime: Usage;
      berthRuntime: Usage;
      conmon: Usage;
      daemonGrowthKb: number;
    }
    const memory = new Map<Tier, MemResult>();
    for (const t of tiers) {
      checkInterrupted();
      console.error(`memory: ${t.isolation}, ${IDLE} idle workloads (bare, then Berth)`);
      if (t.kind === 'microvm') {
        memory.set(t, await microvmMemory(d, t, bareVm!));
        continue;
      }
      // Bare: IDLE detached containers.
      const started: Array<{ id: string; dir: string }> = [];
      let bareRuntime: Usage;
      try {
        for (let i = 0; i < IDLE; i++) {
          const b = bareBundle(t, ['sleep', '1000']);
          started.push(b);
          await runDetached(t.bin, [...t.global, 'run', t.detachFlag, '--bundle', b.bundle, b.id]);
        }
        await sleep(2000);
        const all = processes();
        // runc: after `run -d` nothing but the container's own process is left on the host.
        const ps = t.hostOverlay ? runscProcesses(all, t.root) : withDescendants(all, (p) => p.argv.includes(t.root));
        console.error(`  bare ${t.bin}: ${ps.length} runtime processes (${describe(ps)})`);
        bareRuntime = { ...sumMem(ps), cpu: (await idleCpu([ps]))[0]! };
      } finally {
        for (const b of started) bareRemove(t, b.id, b.dir);
      }
      checkInterrupted();
      // Through Berth.
      const before = memOf(d.pid)!;
      for (let i = 0; i < IDLE; i++) {
        const r = await berthStart(d, `idle-${t.isolation.slice(0, 1)}-${i}`, t.isolation, 30_000);
        if (r.outcome !== 'running') throw new Error(`idle workload ${i} (${t.isolation}) did not run: ${r.outcome} ${r.detail ?? ''}`);
      }
      await sleep(2000);
      const after = memOf(d.pid)!;
      const all = processes();
      const stateDir = join(d.dataDir, 'runtime', t.driver);
      const conmons = taskMonitors(all, stateDir);
      const conmon = sumMem(conmons);
      const rps = t.hostOverlay ? runscProcesses(all, join(stateDir, 'runsc')) : [];
      if (t.hostOverlay) console.error(`  Berth ${t.driver}: ${rps.length} runtime processes (${describe(rps)})`);
      const berthRuntime = sumMem(rps);
      const [conmonCpu, rpsCpu] = await idleCpu([conmons, rps]);
      await d.deleteAllWorkloads();
      if (conmon.n !== IDLE) throw new Error(`expected ${IDLE} monitors for ${t.isolation}, found ${conmon.n}`);
      memory.set(t, { bareRuntime, berthRuntime: { ...berthRuntime, cpu: rpsCpu! }, conmon: { ...conmon, cpu: conmonCpu! }, daemonGrowthKb: after.rss - before.rss });
    }

    // --- 3. density -----------------------------------------------------------------------------
    interface DensityResult {
      bound: number;
      ran: number;
      stoppedBy: string;
      perWorkloadBytes: number;
      cgroupPerWorkloadBytes: number | undefined;
      pssPerWorkloadKb: number;
      totalMs: number;
      slowestMs: number;
    }
    const density = new Map<Tier, DensityResult>();
    for (const t of tiers) {
      checkInterrupted();
      const bound = DENSITY_OVERRIDE ?? DENSITY_DEFAULT[t.isolation] ?? 20;
      console.error(`density: ${t.isolation}, up to ${bound}`);
      await sleep(1000);
      const availBefore = await steadyMemAvailable();
      const cgBefore = cgroupMemory(d.cgroupParent) ?? 0;
      let stoppedBy = `--density-max ${bound}`;
      let ran = 0;
      let slowest = 0;
      const t0 = performance.now();
      try {
        for (let i = 0; i < bound; i++) {
          checkInterrupted();
          if (memAvailable() < MIN_AVAILABLE) {
            stoppedBy = 'MemAvailable < 2 GiB';
            break;
          }
            const startBound = t.kind === 'microvm' ? START_BOUND_MS_VM : START_BOUND_MS;
          const r = await berthStart(d, `dense-${t.isolation.slice(0, 1)}-${i}`, t.isolation, startBound);
          slowest = Math.max(slowest, r.ms);
          if (r.outcome === 'running') ran++;
          if (r.outcome === 'timeout') {
            stoppedBy = `a start took > ${startBound / 1000} s`;
            break;
          }
          if (r.outcome !== 'running') {
            stoppedBy = `a start failed: ${r.detail ?? r.outcome}`;
            break;
          }
        }
        const totalMs = performance.now() - t0;
        await sleep(2000);
        const list = await d.api('GET', `${W}?limit=1000`);
        const running = (list.body.items ?? []).filter((w: any) => w.status.phase === 'running').length;
        if (running !== ran) throw new Error(`density ${t.isolation}: ${ran} starts succeeded but ${running} workloads are running`);
        const availAfter = await steadyMemAvailable();
        const cgAfter = cgroupMemory(d.cgroupParent);
        // The workloads' host processes: each conmon of this driver and everything under it.
        const all = processes();
        const stateDir = join(d.dataDir, 'runtime', t.driver);
        const conmonPids = new Set(taskMonitors(all, stateDir).map((p) => p.pid));
        const host =
          t.kind === 'microvm'
            ? sumMem(all.filter((p) => p.argv.some((a) => a.includes(`${stateDir}/`)))) // the QEMU processes
            : sumMem([...all.filter((p) => conmonPids.has(p.pid)), ...withDescendants(all, (p) => conmonPids.has(p.ppid))]);
        density.set(t, {
          bound,
          ran,
          stoppedBy,
          perWorkloadBytes: ran ? (availBefore - availAfter) / ran : 0,
          cgroupPerWorkloadBytes: ran && cgAfter !== undefined ? (cgAfter - cgBefore) / ran : undefined,
          pssPerWorkloadKb: ran ? host.pss / ran : 0,
          totalMs,
          slowestMs: slowest,
        });
      } finally {
        await d.deleteAllWorkloads();
      }
      const residue = d.hostResidue();
      if (residue.length) throw new Error(`host residue after density (${t.isolation}): ${residue.join(', ')}`);
    }

    // --- report ---------------------------------------------------------------------------------
    const runscTier = tiers.find((t) => t.hostOverlay);
    const runscVersion = runscTier ? /runsc version (\S+)/.exec(sh(runscTier.bin, ['--version'], { allowFail: true }))?.[1] ?? '?' : undefined;
    const runscPlatform = runscTier ? (runscTier.global.find((a) => a.startsWith('--platform='))?.slice('--platform='.length) ?? '?') : undefined;
    const lines: string[] = [];
    lines.push(
      `Host: ${cpus()[0]?.model ?? 'cpu'}, ${cpus().length} cores, ${(totalmem() / 2 ** 30).toFixed(1)} GiB, kernel ${release()}, ` +
        `runc ${/runc version (\S+)/.exec(sh('runc', ['--version'], { allowFail: true }))?.[1] ?? '?'}, ` +
        (runscTier ? `runsc ${runscVersion} (${runscTier.bin}, platform ${runscPlatform}), ` : 'runsc not available, ') +
        `${new Date().toISOString().slice(0, 10)}.`,
      '',
      `**Cold start to first output** — busybox \`echo ready\`, ${RUNS} runs per tier, bare and Berth interleaved. ` +
        'Berth: `POST /v1/projects/default/workloads` → first line of `GET …/logs?follow=true&format=ndjson`. ' +
        'Bare: preparing the same bundle (same config.json, a fresh writable layer per run: task folders, and for gVisor the host overlay mount, as Berth does) and spawning the runtime\'s foreground `run` → first stdout byte; ' +
        'for the microVM, spawning QEMU in the foreground with the command line the driver builds (same kernel, initramfs with the agent, image disk; writable disk made beforehand) → first log line (boot to agent ready plus the echo). ' +
        '"Bare, migrations warm": the bare run again while the benchmark keeps cgroup migrations from waiting for an RCU grace period, as berthd does during its starts (src/lib/cgroupwarm.ts); Berth over it is the time Berth itself adds.',
      '',
      '| tier | bare p50 | bare p90 | Berth p50 | Berth p90 | ratio Berth / bare at p50 (target ≤ 1.2×) | bare, migrations warm p50 (Berth / it) | Berth p50, POST → line written (monitor timestamp) |',
      '|---|---|---|---|---|---|---|---|',
    );
    for (const t of tiers) {
      const c = cold.get(t)!;
      const warm = c.bareWarm.length ? `${ms(median(c.bareWarm))} (${(median(c.berth) / median(c.bareWarm)).toFixed(2)}×)` : 'n/a';
      lines.push(`| ${t.label} | ${ms(median(c.bare))} | ${ms(pct(c.bare, 90))} | ${ms(median(c.berth))} | ${ms(pct(c.berth, 90))} | **${(median(c.berth) / median(c.bare)).toFixed(2)}×** | ${warm} | ${c.written.length ? ms(median(c.written)) : '-'} |`);
    }
    for (const u of unavailable) lines.push(`| ${u.isolation} | not available: ${u.reason} | | | | | | |`);

    lines.push(
      '',
      `**Host memory of an idle workload beyond its own processes** — ${IDLE} idle \`sleep 1000\` workloads per tier, averaged per workload ` +
        '(PSS from /proc/PID/smaps_rollup splits shared pages between the processes sharing them). ' +
        `Bare: the same number of \`runc run -d\` / \`runsc run --detach\` containers. CPU: what those processes used while idle, over ${IDLE_CPU_WINDOW_MS / 1000} s.`,
      '',
      '| tier | what | processes / workload | RSS / workload | PSS / workload | idle CPU / workload (ms per s) |',
      '|---|---|---|---|---|---|',
    );
    for (const t of tiers) {
      const m = memory.get(t)!;
      const per = (x: number) => x / IDLE;
      const row = (what: string, g: { n: number; rss: number; pss: number; cpu: number }) =>
        lines.push(`| ${t.label} | ${what} | ${per(g.n).toFixed(1)} | ${kib(per(g.rss))} | ${kib(per(g.pss))} | ${per(g.cpu).toFixed(1)} |`);
      if (t.kind === 'microvm') {
        row('bare QEMU process per VM (guest RAM it touched, TCG code cache, devices)', m.bareRuntime);
        row('QEMU process per VM under Berth', m.berthRuntime);
        lines.push(`| ${t.label} | Berth overhead: berthd RSS growth / ${IDLE} (no per-VM monitor: QEMU itself writes log and exit files) | | ${kib(per(m.daemonGrowthKb))} | | |`);
        lines.push(
          `| ${t.label} | **Berth adds per workload** (berthd growth + QEMU PSS under Berth beyond bare, if any; target ≤ 2 MiB) | | | **${mib(Math.max(0, per(m.daemonGrowthKb)) + Math.max(0, per(m.berthRuntime.pss - m.bareRuntime.pss)))}** | |`,
        );
        continue;
      }
      if (t.hostOverlay) {
        row('runtime overhead, bare runsc (sandbox, gofer, systrap stubs)', m.bareRuntime);
        row('runtime overhead under Berth (sandbox, gofer, systrap stubs)', m.berthRuntime);
      } else {
        row("bare runc: processes beyond the workload's own", m.bareRuntime);
      }
      row('Berth overhead: per-container monitor', m.conmon);
      lines.push(`| ${t.label} | Berth overhead: berthd RSS growth / ${IDLE} | | ${kib(per(m.daemonGrowthKb))} | | |`);
      lines.push(`| ${t.label} | **Berth adds per workload** (monitor PSS + berthd growth; target ≤ 2 MiB) | | | **${mib(per(m.conmon.pss) + Math.max(0, per(m.daemonGrowthKb)))}** | |`);
    }
    for (const u of unavailable) lines.push(`| ${u.isolation} | not available: ${u.reason} | | | | |`);

    lines.push(
      '',
      '**Density (bounded)** — idle `sleep 1000` workloads started one by one through Berth (each waited for until running) until ' +
        `the bound (--density-max), MemAvailable < 2 GiB, a start taking > ${START_BOUND_MS / 1000} s, or a failed start; then all deleted and the host checked for residue (none). ` +
        'MemAvailable is host-wide and moves with everything else on the host (it can even grow during the run); the two columns after it are per workload: ' +
        "the growth of the memory charged to Berth's parent cgroup (the workloads' own processes, kernel memory and page cache they caused; the monitor runs outside it), " +
        'and the PSS of the host processes of each workload (its monitor and everything under it).',
      '',
      "| tier | ran at once | stopped by | host memory / workload (MemAvailable Δ / N) | cgroup memory / workload | host processes' PSS / workload | time to start all | slowest start |",
      '|---|---|---|---|---|---|---|---|',
    );
    for (const t of tiers) {
      const x = density.get(t)!;
      const cg = x.cgroupPerWorkloadBytes === undefined ? '-' : `${(x.cgroupPerWorkloadBytes / 2 ** 20).toFixed(2)} MiB`;
      lines.push(
        `| ${t.label} | ${x.ran} | ${x.stoppedBy} | ${(x.perWorkloadBytes / 2 ** 20).toFixed(2)} MiB | ${cg} | ${mib(x.pssPerWorkloadKb)} | ${(x.totalMs / 1000).toFixed(1)} s | ${ms(x.slowestMs)} |`,
      );
    }
    for (const u of unavailable) lines.push(`| ${u.isolation} | not available: ${u.reason} | | | | | | |`);

    const text = lines.join('\n');
    console.log(text);
    if (values.write) {
      updateBenchmarks(
        values.write,
        'isolation',
        'Isolation tiers: startup, memory overhead, density (the seed table, measured)',
        'node dist/src/cli/main.js bench isolation --runs 30 --write BENCHMARKS.md',
        text,
      );
    }
  } finally {
    await cleanup(d, work, tiers, bareIds, mounts, bareCgroupParent);
  }
}

/** Everything this benchmark created: bare containers, overlay mounts, runsc's null-netns, cgroups, temp dirs, the daemon. */
async function cleanup(d: TestDaemon, work: string, tiers: Tier[], bareIds: Map<Tier, Set<string>>, mounts: Set<string>, bareCgroupParent: string): Promise<void> {
  const problems: string[] = [];
  for (const t of tiers) {
    if (t.kind !== 'oci') continue; // bare microVMs are processes under `work`: killed below
    const listed = sh(t.bin, [...t.global, 'list', '-q'], { allowFail: true }).split('\n').filter(Boolean);
    for (const id of new Set([...listed, ...(bareIds.get(t) ?? [])])) {
      sh(t.bin, [...t.global, 'kill', id, 'KILL'], { allowFail: true });
      sh(t.bin, [...t.global, 'delete', '--force', id], { allowFail: true });
    }
  }
  for (const m of mounts) {
    if (isMounted(m)) sh('umount', [m], { allowFail: true });
    if (isMounted(m)) sh('umount', ['-l', m], { allowFail: true });
  }
  for (const t of tiers) {
    const nullNetns = join(t.root, 'null-netns');
    if (isMounted(nullNetns)) sh('umount', [nullNetns], { allowFail: true });
    if (isMounted(nullNetns)) sh('umount', ['-l', nullNetns], { allowFail: true });
  }
  // Anything else still mounted under the work dir.
  for (const l of readFileSync('/proc/self/mountinfo', 'utf8').split('\n')) {
    const mp = l.split(' ')[4];
    if (mp && mp.startsWith(`${work}/`)) {
      sh('umount', ['-l', mp], { allowFail: true });
      problems.push(`mount ${mp} (detached)`);
    }
  }
  // Leftover runtime processes (a bare container whose delete failed).
  for (const p of processes()) {
    if (p.argv.some((a) => a.includes(work)) && p.pid !== process.pid) {
      try {
        process.kill(p.pid, 'SIGKILL');
        problems.push(`process ${p.pid} ${p.argv[0]} (killed)`);
      } catch {
        /* gone */
      }
    }
  }
  const cgroupDirs = existsSync('/sys/fs/cgroup/cgroup.controllers')
    ? [`/sys/fs/cgroup/${bareCgroupParent}`]
    : readdirSync('/sys/fs/cgroup').map((c) => `/sys/fs/cgroup/${c}/${bareCgroupParent}`);
  for (const dir of cgroupDirs) rmCgroupTree(dir);
  for (const dir of cgroupDirs) if (existsSync(dir)) problems.push(`cgroup ${dir} (not removable)`);
  try {
    rmSync(work, { recursive: true, force: true });
  } catch (e) {
    problems.push(`${work}: ${(e as Error).message}`);
  }
  await d.deleteAllWorkloads().catch(() => undefined);
  const residue = d.hostResidue();
  await d.destroy();
  if (residue.length) problems.push(...residue.map((r) => `berth ${r}`));
  if (problems.length) console.error(`isolation bench clean-up: ${problems.join('; ')}`);
}

/** Idle microVMs, bare then through Berth: the QEMU processes' RSS/PSS, and berthd's growth. */
async function microvmMemory(d: TestDaemon, t: Tier, bare: BareMicroVm): Promise<{ bareRuntime: Usage; berthRuntime: Usage; conmon: Usage; daemonGrowthKb: number }> {
  const vms: BareVm[] = [];
  let bareRuntime: Usage;
  try {
    for (let i = 0; i < IDLE; i++) vms.push(await bare.idle(t.bin));
    await sleep(2000);
    const ps = vms.map((v) => ({ pid: v.child.pid!, ppid: 0, argv: [] }));
    bareRuntime = { ...sumMem(ps), cpu: (await idleCpu([ps]))[0]! };
  } finally {
    for (const v of vms) await bare.kill(v);
  }
  const before = memOf(d.pid)!;
  for (let i = 0; i < IDLE; i++) {
    const r = await berthStart(d, `idle-m-${i}`, t.isolation, START_BOUND_MS_VM);
    if (r.outcome !== 'running') throw new Error(`idle workload ${i} (microvm) did not run: ${r.outcome} ${r.detail ?? ''}`);
  }
  await sleep(2000);
  const after = memOf(d.pid)!;
  const stateDir = join(d.dataDir, 'runtime', t.driver);
  const qemus = processes().filter((p) => p.argv.some((a) => a.includes(`${stateDir}/`)));
  const berthRuntime = { ...sumMem(qemus), cpu: (await idleCpu([qemus]))[0]! };
  await d.deleteAllWorkloads();
  if (berthRuntime.n !== IDLE) throw new Error(`expected ${IDLE} QEMU processes under Berth, found ${berthRuntime.n}`);
  return { bareRuntime, berthRuntime, conmon: { rss: 0, pss: 0, n: 0, cpu: 0 }, daemonGrowthKb: after.rss - before.rss };
}

// ---------------------------------------------------------------------------------------------
// Berth side

/** conmon's RFC 3339 timestamp with nanoseconds → epoch ms (with the fraction). */
function parseLogTime(s: string): number {
  const m = /^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$/.exec(s);
  if (!m) return NaN;
  return Date.parse(`${m[1]}${m[3]}`) + Number(`0${m[2] ?? ''}`) * 1000;
}

/** Milliseconds from the POST to conmon's timestamp on the first log line, per cold-start run (a diagnostic). */
const writtenAfter = new Map<string, number[]>();

/** Creates an `echo ready` workload; ms from the POST until the followed log stream yields its first line. Then deletes it. */
async function berthEcho(d: TestDaemon, name: string, isolation: string): Promise<number> {
  const ac = new AbortController();
  const timer = setTimeout(() => ac.abort(new Error('no log line within 60 s')), 60_000);
  let elapsed: number;
  try {
    const wall0 = Date.now();
    const t0 = performance.now();
    // network none: the bare baselines run without a network too (like for like).
    const r = await d.api('POST', W, { name, spec: { image: 'busybox', isolation, command: ['echo', 'ready'], network: { mode: 'none' } } });
    if (r.status !== 201) throw new Error(`create ${name}: ${r.status} ${JSON.stringify(r.body)}`);
    const res = await fetch(`${d.addr}${W}/${name}/logs?follow=true&format=ndjson`, { headers: { authorization: `Bearer ${d.token}` }, signal: ac.signal });
    if (res.status !== 200 || !res.body) throw new Error(`logs ${name}: ${res.status} ${await res.text()}`);
    const reader = res.body.getReader();
    const dec = new TextDecoder();
    let buf = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) throw new Error(`log stream of ${name} ended without a line`);
      buf += dec.decode(value, { stream: true });
      const nl = buf.indexOf('\n');
      if (nl < 0) continue;
      elapsed = performance.now() - t0;
      const line = JSON.parse(buf.slice(0, nl)) as { text?: string; stream?: string; time?: string };
      if (line.text !== 'ready') throw new Error(`first log line of ${name}: ${JSON.stringify(line)}`);
      const written = parseLogTime(line.time ?? '') - wall0;
      if (Number.isFinite(written)) writtenAfter.set(isolation, [...(writtenAfter.get(isolation) ?? []), written]);
      break;
    }
  } finally {
    clearTimeout(timer);
    ac.abort();
  }
  await deleteAndWait(d, name);
  return elapsed;
}

async function deleteAndWait(d: TestDaemon, name: string): Promise<void> {
  const r = await d.api('DELETE', `${W}/${name}`);
  if (r.status !== 200 && r.status !== 202 && r.status !== 204 && r.status !== 404) throw new Error(`delete ${name}: ${r.status} ${JSON.stringify(r.body)}`);
  const deadline = Date.now() + 60_000;
  while ((await d.api('GET', `${W}/${name}`)).status !== 404) {
    if (Date.now() > deadline) throw new Error(`workload ${name} not deleted within 60 s`);
    await sleep(20);
  }
}

/** Creates an idle workload and waits (long poll) until it runs, fails, or `timeoutMs` passes. */
async function berthStart(d: TestDaemon, name: string, isolation: string, timeoutMs: number): Promise<{ outcome: 'running' | 'failed' | 'timeout'; ms: number; detail?: string }> {
  const t0 = performance.now();
  // SIGKILL on stop: `sleep` as PID 1 ignores SIGTERM, and the grace period is not what is measured here.
  const r = await d.api('POST', W, { name, spec: { image: 'busybox', isolation, command: ['sleep', '1000'], stopSignal: 'SIGKILL', network: { mode: 'none' } } });
  if (r.status !== 201) return { outcome: 'failed', ms: performance.now() - t0, detail: `${r.status} ${JSON.stringify(r.body)}` };
  let rv = r.body.resourceVersion as number;
  for (;;) {
    const left = timeoutMs - (performance.now() - t0);
    if (left <= 0) return { outcome: 'timeout', ms: performance.now() - t0 };
    const g = await d.api('GET', `${W}/${name}?afterResourceVersion=${rv}&timeoutMs=${Math.ceil(left)}`);
    if (g.status !== 200) return { outcome: 'failed', ms: performance.now() - t0, detail: `${g.status} ${JSON.stringify(g.body)}` };
    if (g.body.status.phase === 'running') return { outcome: 'running', ms: performance.now() - t0 };
    if (['failed', 'exited', 'stopped'].includes(g.body.status.phase)) {
      return { outcome: 'failed', ms: performance.now() - t0, detail: `${g.body.status.phase}: ${g.body.status.reason ?? ''} ${g.body.status.message ?? ''}` };
    }
    rv = g.body.resourceVersion;
  }
}

void main().then(
  () => process.exit(0),
  (e) => {
    console.error(e);
    process.exit(e instanceof Interrupted ? 130 : 1);
  },
);
