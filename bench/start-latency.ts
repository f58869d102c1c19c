// Benchmark: "API create → workload running" through Berth vs a bare `runc run -d` of the same
// prepared bundle, interleaved in the same run; plus the host memory Berth adds per idle workload.
// Usage: node dist/bench/start-latency.js [--runs 30] [--idle 20] [--write BENCHMARKS.md]
import { spawn, spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, release, totalmem } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { TestDaemon } from '../test/harness.js';
import { ensureBusyboxImage } from '../src/images/busybox.js';
import { buildOciConfig, hostNofileLimit } from '../src/drivers/oci/ocispec.js';
import { loadDefaultSeccomp } from '../src/drivers/oci/seccomp.js';
import { DEFAULT_CAPS } from '../src/drivers/runc/driver.js';
import { updateBenchmarks } from './report.js';
import { Interrupted, catchInterrupts } from './interrupt.js';
import { MigrationWarmer } from '../src/lib/cgroupwarm.js';
import { taskMonitorPids } from './monitors.js';
import { cni } from '../src/network/cni.js';

const { values } = parseArgs({ options: { runs: { type: 'string', default: '30' }, idle: { type: 'string', default: '20' }, write: { type: 'string' } } });
const RUNS = Number(values.runs);
const checkInterrupted = catchInterrupts('start-latency bench');
const IDLE = Number(values.idle);

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};
const pct = (xs: number[], p: number) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor((p / 100) * xs.length))]!;

function sh(cmd: string, args: string[]) {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: ${r.stderr}`);
  return r.stdout;
}

async function bareRuncRun(root: string, bundle: string, id: string): Promise<number> {
  const t0 = performance.now();
  await new Promise<void>((resolve, reject) => {
    const p = spawn('runc', ['--root', root, 'run', '-d', '--bundle', bundle, id], { stdio: 'ignore' });
    p.on('error', reject);
    p.on('exit', (code) => (code === 0 ? resolve() : reject(new Error(`runc run exited ${code}`))));
  });
  return performance.now() - t0;
}

/**
 * The networked baseline: what a bare runtime user does to get the same network without Berth —
 * a namespace, CNI loopback + bridge (host-local IPAM) on a test bridge, then `runc run -d` in it.
 */
async function bareRuncRunNetworked(root: string, bundle: string, id: string, net: { dir: string; bridge: string; subnet: string }): Promise<number> {
  const t0 = performance.now();
  const ns = join(net.dir, id);
  writeFileSync(ns, '');
  sh('unshare', [`--net=${ns}`, 'true']);
  await cni({ command: 'ADD', containerId: id, netns: ns, ifname: 'lo', config: { cniVersion: '1.0.0', name: 'lo', type: 'loopback' } });
  await cni({ command: 'ADD', containerId: id, netns: ns, ifname: 'eth0', config: bareBridge(net) });
  const cfg = JSON.parse(readFileSync(join(bundle, 'config.json'), 'utf8'));
  cfg.linux.namespaces = cfg.linux.namespaces.map((n: { type: string }) => (n.type === 'network' ? { type: 'network', path: ns } : n));
  writeFileSync(join(bundle, 'config.json'), JSON.stringify(cfg));
  await new Promise<void>((resolve, reject) => {
    const p = spawn('runc', ['--root', root, 'run', '-d', '--bundle', bundle, id], { stdio: 'ignore' });
    p.on('error', reject);
    p.on('exit', (code) => (code === 0 ? resolve() : reject(new Error(`runc run exited ${code}`))));
  });
  return performance.now() - t0;
}
const bareBridge = (net: { dir: string; bridge: string; subnet: string }) => ({
  cniVersion: '1.0.0', name: 'bench', type: 'bridge', bridge: net.bridge, isGateway: true, ipam: { type: 'host-local', ranges: [[{ subnet: net.subnet }]], dataDir: join(net.dir, 'ipam') },
});
async function bareNetworkedCleanup(root: string, id: string, net: { dir: string; bridge: string; subnet: string }): Promise<void> {
  sh('runc', ['--root', root, 'delete', '--force', id]);
  const ns = join(net.dir, id);
  await cni({ command: 'DEL', containerId: id, netns: ns, ifname: 'eth0', config: bareBridge(net) });
  sh('umount', [ns]);
  rmSync(ns);
}

async function berthCreate(d: TestDaemon, name: string, networked = false): Promise<number> {
  const t0 = performance.now();
  // Like for like: the bare baseline has no network unless networked.
  const network = networked ? {} : { network: { mode: 'none' } };
  const r = await d.api('POST', '/v1/projects/default/workloads?wait=running&timeoutMs=30000', { name, spec: { image: 'busybox', command: ['sleep', '1000'], stopSignal: 'SIGKILL', ...network } });
  if (r.status !== 201) throw new Error(JSON.stringify(r.body));
  if (r.body.status.phase !== 'running') throw new Error(JSON.stringify(r.body.status));
  return performance.now() - t0;
}

function memOf(pid: number): { rss: number; pss: number; uss: number } {
  const t = readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8');
  const kb = (k: string) => Number(new RegExp(`^${k}:\\s+(\\d+)`, 'm').exec(t)?.[1] ?? 0);
  return { rss: kb('Rss'), pss: kb('Pss'), uss: kb('Private_Clean') + kb('Private_Dirty') };
}

async function main() {
  const d = await TestDaemon.start();
  const work = mkdtempSync('/tmp/berth-bench-');
  const root = join(work, 'runc');
  const bundle = join(work, 'bundle');
  try {
    // The bare baseline: the same image and the same OCI config Berth generates (read-only image
    // root with the writable overlay that runc mounts inside the container), run by runc directly.
    const img = await ensureBusyboxImage(join(d.dataDir, 'images'));
    for (const x of ['upper', 'work']) mkdirSync(join(work, x), { recursive: true });
    mkdirSync(bundle, { recursive: true });
    const cfg = buildOciConfig(
      { id: 'bench', imageRootfs: img.rootfs, args: ['sleep', '1000'], env: {}, cwd: '/', user: { uid: 0, gid: 0 }, resources: {} },
      {
        rootfsPath: img.rootfs,
        rootOverlay: { upperDir: join(work, 'upper'), workDir: join(work, 'work') },
        cgroupsPath: `/${d.cgroupParent}-bare/bench`,
        seccomp: loadDefaultSeccomp({ capabilities: DEFAULT_CAPS }),
        nofileLimit: hostNofileLimit(),
      },
    );
    writeFileSync(join(bundle, 'config.json'), JSON.stringify(cfg));

    // Warm-up of both paths, then interleaved measured runs.
    await bareRuncRun(root, bundle, 'warm');
    sh('runc', ['--root', root, 'delete', '--force', 'warm']);
    await berthCreate(d, 'warm');
    await d.api('DELETE', '/v1/projects/default/workloads/warm');
    await d.deleteAllWorkloads();
    const bare: number[] = [];
    const bareWarm: number[] = [];
    const berth: number[] = [];
    const warmer = new MigrationWarmer();
    for (let i = 0; i < RUNS; i++) {
      checkInterrupted();
      bare.push(await bareRuncRun(root, bundle, `b${i}`));
      sh('runc', ['--root', root, 'delete', '--force', `b${i}`]);
      // Like for like: the same run while cgroup migrations are kept warm, as berthd's starts have them.
      bareWarm.push(await warmer.during(() => bareRuncRun(root, bundle, `bw${i}`)));
      sh('runc', ['--root', root, 'delete', '--force', `bw${i}`]);
      berth.push(await berthCreate(d, `w${i}`));
      await d.api('DELETE', `/v1/projects/default/workloads/w${i}`);
      await d.deleteAllWorkloads();
    }
    const ratio = median(berth) / median(bare);

    // The same with a network on both sides: Berth's default (project bridge, CNI, nftables, DNS)
    // vs bare runc in a namespace wired by the same CNI plugins (no firewall, no DNS).
    const net = { dir: join(work, 'netns'), bridge: `bbench${process.pid % 10000}`, subnet: '10.250.77.0/24' };
    mkdirSync(net.dir, { recursive: true });
    const bareNet: number[] = [];
    const berthNet: number[] = [];
    for (let i = 0; i < RUNS; i++) {
      checkInterrupted();
      bareNet.push(await bareRuncRunNetworked(root, bundle, `n${i}`, net));
      await bareNetworkedCleanup(root, `n${i}`, net);
      berthNet.push(await berthCreate(d, `nw${i}`, true));
      await d.api('DELETE', `/v1/projects/default/workloads/nw${i}`);
      await d.deleteAllWorkloads();
    }
    spawnSync('ip', ['link', 'del', net.bridge]);
    const ratioNet = median(berthNet) / median(bareNet);

    // Memory: IDLE idle workloads; what Berth adds per workload is its monitor (conmon) plus any
    // growth of berthd itself. The workload's own processes (sleep) are not counted.
    const daemonBefore = memOf(d.pid);
    for (let i = 0; i < IDLE; i++) await berthCreate(d, `idle${i}`, true);
    await new Promise((r) => setTimeout(r, 2000));
    const monitors: Array<{ rss: number; pss: number; uss: number }> = [];
    for (const pid of taskMonitorPids(join(d.dataDir, 'runtime', 'runc'))) {
      try {
        monitors.push(memOf(pid));
      } catch {
        /* raced */
      }
    }
    const daemonAfter = memOf(d.pid);
    await d.deleteAllWorkloads();
    const residue = d.hostResidue();
    if (residue.length) throw new Error(`leaks: ${residue.join(', ')}`);
    if (monitors.length !== IDLE) throw new Error(`expected ${IDLE} monitors, found ${monitors.length}`);
    const avg = (k: 'rss' | 'pss' | 'uss') => monitors.reduce((s, m) => s + m[k], 0) / monitors.length / 1024;
    const daemonGrowth = (daemonAfter.rss - daemonBefore.rss) / IDLE / 1024;

    const f = (x: number) => x.toFixed(1);
    const lines = [
      `Host: ${cpus().length} × ${cpus()[0]?.model ?? 'cpu'}, ${(totalmem() / 2 ** 30).toFixed(0)} GiB, kernel ${release()}, runc ${/runc version (\S+)/.exec(sh('runc', ['--version']))?.[1]}, ${new Date().toISOString().slice(0, 10)}.`,
      '',
      `| measure (${RUNS} interleaved runs, busybox \`sleep\`) | median | p90 |`,
      '|---|---|---|',
      `| bare \`runc run -d\` of the same prepared bundle (same config.json) | ${f(median(bare))} ms | ${f(pct(bare, 90))} ms |`,
      `| Berth: API create → status running (one \`POST …/workloads?wait=running\`: SQLite, reconciler, monitor, runc create, start) | ${f(median(berth))} ms | ${f(pct(berth, 90))} ms |`,
      `| **ratio Berth / bare** (target ≤ 1.2×) | **${ratio.toFixed(2)}×** | |`,
      `| bare \`runc run -d\` with cgroup migrations kept warm, as berthd keeps them during a start (src/lib/cgroupwarm.ts) | ${f(median(bareWarm))} ms | ${f(pct(bareWarm, 90))} ms |`,
      `| ratio Berth / that (the time Berth itself adds) | ${(median(berth) / median(bareWarm)).toFixed(2)}× | |`,
      `| networked: bare — netns + CNI loopback + bridge/host-local, then \`runc run -d\` in it | ${f(median(bareNet))} ms | ${f(pct(bareNet, 90))} ms |`,
      `| networked: Berth with its default network (the same CNI plugins + nftables rules + DNS name) | ${f(median(berthNet))} ms | ${f(pct(berthNet, 90))} ms |`,
      `| **ratio networked Berth / networked bare** | **${ratioNet.toFixed(2)}×** | |`,
      '',
      `| memory Berth adds per idle workload (${IDLE} idle workloads) | per workload |`,
      '|---|---|',
      `| monitor (${process.env.BERTH_MONITOR ?? 'berth'}), RSS | ${f(avg('rss') * 1024)} KiB |`,
      `| monitor, PSS (shared pages split between monitors) | ${f(avg('pss') * 1024)} KiB |`,
      `| monitor, private (USS) | ${f(avg('uss') * 1024)} KiB |`,
      `| berthd RSS growth | ${f(daemonGrowth * 1024)} KiB |`,
      `| **total (PSS + berthd growth)** (target ≤ 2 MiB) | **${((avg('pss') + Math.max(0, daemonGrowth))).toFixed(2)} MiB** |`,
    ];
    const text = lines.join('\n');
    console.log(text);
    if (values.write) updateBenchmarks(values.write, 'start-latency', 'Workload start latency and per-workload memory (runc)', 'node dist/bench/start-latency.js --runs 30 --idle 20 --write BENCHMARKS.md', text);
  } finally {
    for (const id of spawnSync('runc', ['--root', root, 'list', '-q'], { encoding: 'utf8' }).stdout.split('\n').filter(Boolean)) spawnSync('runc', ['--root', root, 'delete', '--force', id]);
    rmSync(work, { recursive: true, force: true });
    for (const c of readdirSync('/sys/fs/cgroup')) spawnSync('rmdir', [`/sys/fs/cgroup/${c}/${d.cgroupParent}-bare`]);
    await d.deleteAllWorkloads().catch(() => undefined);
    await d.destroy();
  }
}

void main().catch((e) => {
  console.error(e);
  process.exit(e instanceof Interrupted ? 130 : 1);
});
