// Test harness: runs a real berthd process on a throw-away data directory, talks to it over
// HTTP, and checks that nothing Berth created on the host is left behind.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, readdirSync, readlinkSync, rmSync, rmdirSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { cgroupHierarchies, mountPointsUnder } from '../src/lib/host.js';
import { instanceId } from '../src/network/manager.js';
import { randomBytes } from 'node:crypto';
import assert from 'node:assert/strict';

export const ROOT = resolve(new URL('../..', import.meta.url).pathname);
export const BERTHD = join(ROOT, 'dist/src/daemon/main.js');

export interface ApiResponse<T = any> {
  status: number;
  body: T;
}

export class TestDaemon {
  proc: ChildProcess | undefined;
  addr = '';
  token = '';
  readonly cgroupParent: string;
  /** Each test daemon cuts its project subnets from its own block (daemons may run side by side). */
  readonly networkPool = `10.${100 + Math.floor(Math.random() * 150)}.0.0/16`;
  /** Extra berthd flags. The ingress is off unless a test passes its own --ingress-* flags. */
  args: string[] = [];
  private logs: string[] = [];

  constructor(
    readonly dataDir: string,
    cgroupParent?: string,
  ) {
    this.cgroupParent = cgroupParent ?? `berth-test-${randomBytes(3).toString('hex')}`;
  }

  static async start(): Promise<TestDaemon> {
    const d = new TestDaemon(mkdtempSync('/tmp/berth-test-'));
    await d.start();
    return d;
  }

  async start(): Promise<void> {
    rmSync(join(this.dataDir, 'berthd.addr'), { force: true });
    this.proc = spawn(process.execPath, [BERTHD, '--data-dir', this.dataDir, '--listen', '127.0.0.1:0', '--cgroup-parent', this.cgroupParent, '--log-level', process.env.BERTH_TEST_LOG ?? 'warn', '--network-pool', this.networkPool, ...this.ingressArgs()], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    const keep = (d: Buffer) => {
      this.logs.push(d.toString());
      if (this.logs.length > 200) this.logs.shift();
      if (process.env.BERTH_TEST_LOG) process.stderr.write(d);
    };
    this.proc.stdout!.on('data', keep);
    this.proc.stderr!.on('data', keep);
    const deadline = Date.now() + 20_000;
    // berthd writes the file non-atomically: wait for the whole line, not only for the file.
    const addrLine = () => (existsSync(join(this.dataDir, 'berthd.addr')) ? readFileSync(join(this.dataDir, 'berthd.addr'), 'utf8') : '');
    while (!addrLine().endsWith('\n')) {
      if (this.proc.exitCode !== null) throw new Error(`berthd exited ${this.proc.exitCode}: ${this.logs.join('')}`);
      if (Date.now() > deadline) throw new Error(`berthd did not start: ${this.logs.join('')}`);
      await new Promise((r) => setTimeout(r, 25));
    }
    this.addr = `http://${addrLine().trim()}`;
    this.token = readFileSync(join(this.dataDir, 'admin.token'), 'utf8').trim();
  }

  private ingressArgs(): string[] {
    const off = [...(this.args.includes('--ingress-http') ? [] : ['--ingress-http', 'off']), ...(this.args.includes('--ingress-https') ? [] : ['--ingress-https', 'off'])];
    return [...off, ...this.args];
  }

  get pid(): number {
    return this.proc!.pid!;
  }

  recentLogs(): string {
    return this.logs.join('');
  }

  /** SIGKILL, no cleanup: what a crash looks like. */
  async kill9(): Promise<void> {
    const p = this.proc!;
    if (p.exitCode !== null || p.signalCode !== null) return;
    const exited = new Promise((r) => p.once('exit', r));
    p.kill('SIGKILL');
    await exited;
  }

  async stop(): Promise<void> {
    const p = this.proc;
    if (!p || p.exitCode !== null || p.signalCode !== null) return;
    const exited = new Promise((r) => p.once('exit', r));
    p.kill('SIGTERM');
    await exited;
  }

  async api<T = any>(method: string, path: string, body?: unknown, opts: { token?: string; raw?: string; headers?: Record<string, string> } = {}): Promise<ApiResponse<T>> {
    const headers: Record<string, string> = { ...(opts.headers ?? {}) };
    const token = opts.token ?? this.token;
    if (token) headers.authorization = `Bearer ${token}`;
    let payload: string | undefined;
    if (opts.raw !== undefined) payload = opts.raw;
    else if (body !== undefined) payload = JSON.stringify(body);
    if (payload !== undefined && !headers['content-type']) headers['content-type'] = 'application/json';
    const res = await fetch(this.addr + path, { method, headers, ...(payload !== undefined ? { body: payload } : {}) });
    const text = await res.text();
    let parsed: unknown = text;
    try {
      parsed = JSON.parse(text);
    } catch {
      /* text */
    }
    return { status: res.status, body: parsed as T };
  }

  /** Poll a workload until `pred` holds. */
  async waitWorkload(project: string, name: string, pred: (w: any) => boolean, timeoutMs = 20_000): Promise<any> {
    const deadline = Date.now() + timeoutMs;
    let last: any;
    for (;;) {
      const r = await this.api('GET', `/v1/projects/${project}/workloads/${name}`);
      last = r.body;
      if (r.status === 200 && pred(r.body)) return r.body;
      if (Date.now() > deadline) throw new Error(`timed out waiting for workload ${name}; last: ${JSON.stringify(last)}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  async deleteAllSandboxes(project = 'default'): Promise<void> {
    const list = await this.api('GET', `/v1/projects/${project}/sandboxes?limit=1000`);
    for (const s of list.body.items ?? []) await this.api('DELETE', `/v1/projects/${project}/sandboxes/${s.name}`);
    const deadline = Date.now() + 60_000;
    while (((await this.api('GET', `/v1/projects/${project}/sandboxes?limit=1000`)).body.items ?? []).length > 0) {
      if (Date.now() > deadline) throw new Error('sandboxes not deleted within 60 s');
      await new Promise((r) => setTimeout(r, 100));
    }
  }

  async deleteAllWorkloads(project = 'default'): Promise<void> {
    const list = await this.api('GET', `/v1/projects/${project}/workloads?limit=1000`);
    for (const w of list.body.items ?? []) await this.api('DELETE', `/v1/projects/${project}/workloads/${w.name}`);
    const deadline = Date.now() + 60_000;
    for (;;) {
      const l = await this.api('GET', `/v1/projects/${project}/workloads?limit=1000`);
      if ((l.body.items ?? []).length === 0) return;
      if (Date.now() > deadline) throw new Error(`workloads not deleted: ${JSON.stringify(l.body.items.map((w: any) => [w.name, w.status.phase]))}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }

  /** Everything on the host that belongs to this daemon's workloads. Empty = no leaks. */
  hostResidue(): string[] {
    const found: string[] = [];
    for (const mp of mountPointsUnder(this.dataDir)) found.push(`mount ${mp}`);
    for (const [driver, root] of [['runc', 'runc'], ['gvisor', 'runsc'], ['microvm', 'probe']]) {
      const runtime = join(this.dataDir, 'runtime', driver!);
      for (const sub of ['tasks', 'exits', root!]) {
        const d = join(runtime, sub);
        if (existsSync(d)) for (const f of readdirSync(d)) found.push(`${driver} ${sub}/${f}`);
      }
    }
    for (const pid of readdirSync('/proc').filter((p) => /^\d+$/.test(p))) {
      try {
        const cmd = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
        if (cmd.startsWith('conmon') || cmd.includes('/conmon\0') || cmd.includes('berth-agent\0monitor\0')) {
          // A monitor started ahead of time (`monitor --spare`) got its arguments on stdin: its working directory is the task's.
          if (cmd.includes(this.dataDir) || readlinkSync(`/proc/${pid}/cwd`).startsWith(this.dataDir)) found.push(`monitor process ${pid}`);
        }
        if (cmd.includes('qemu-system') && cmd.includes(this.dataDir)) found.push(`microVM process ${pid}`);
        if (cmd.split('\0')[0]!.endsWith('haproxy') && cmd.includes(this.dataDir)) found.push(`proxy process ${pid}`);
      } catch {
        /* raced */
      }
    }
    for (const f of ['haproxy.pid', 'master.sock', 'worker.sock', 'haproxy.cfg', 'hosts.map', 'hosts-tls.map', 'crt-list', 'acme.sock']) if (existsSync(join(this.dataDir, 'ingress', f))) found.push(`ingress ${f}`);
    for (const dir of cgroupParentDirs(this.cgroupParent)) {
      if (existsSync(dir)) for (const f of readdirSync(dir, { withFileTypes: true })) if (f.isDirectory()) found.push(`cgroup ${join(dir, f.name)}`);
    }
    found.push(...this.networkResidue());
    return found;
  }

  /** Network objects of this daemon: bridges, nftables tables, namespaces, per-task files. */
  networkResidue(): string[] {
    const found: string[] = [];
    const inst = instanceId(this.dataDir);
    for (const l of readdirSync('/sys/class/net')) if (l.startsWith(`b${inst}`)) found.push(`bridge ${l}`);
    const tables = spawnSync('nft', ['list', 'tables']).stdout?.toString() ?? '';
    for (const t of tables.split('\n')) if (t.includes(`berth_${inst}`)) found.push(`nft ${t.trim()}`);
    for (const sub of ['ns', 'etc']) {
      const d = join(this.dataDir, 'network', sub);
      if (existsSync(d)) for (const f of readdirSync(d)) found.push(`network ${sub}/${f}`);
    }
    return found;
  }

  /** Stop the daemon and remove its data dir and (empty) cgroup parents. */
  async destroy(): Promise<void> {
    await this.stop();
    // A failed test may leave containers and mounts behind: end them (they are ours, found by
    // this daemon's own runc root) so the next tests start clean. The leak itself is reported
    // by the test that checks hostResidue().
    for (const [bin, root] of [['runc', 'runtime/runc/runc'], [process.env.BERTH_RUNSC ?? '/usr/local/lib/berth/runsc', 'runtime/gvisor/runsc']]) {
      if (!existsSync(join(this.dataDir, root!))) continue;
      const args = bin === 'runc' ? ['--root', join(this.dataDir, root!)] : [`--root=${join(this.dataDir, root!)}`, '--network=none', '--overlay2=none', '--host-uds=create'];
      const ids = spawnSync(bin!, [...args, 'list', bin === 'runc' ? '-q' : '-quiet']).stdout?.toString().split('\n').filter(Boolean) ?? [];
      for (const id of ids) {
        spawnSync(bin!, [...args, 'kill', id, 'KILL']);
        spawnSync(bin!, [...args, 'delete', '--force', id]);
      }
    }
    // MicroVMs and workload monitors this daemon started (found by their state under its data dir):
    // end them by pid.
    for (const pid of readdirSync('/proc').filter((p) => /^\d+$/.test(p))) {
      try {
        const cmd = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
        if (cmd.includes('qemu-system') && cmd.includes(join(this.dataDir, 'runtime', 'microvm'))) process.kill(Number(pid), 'SIGKILL');
        if (cmd.includes('berth-agent\0monitor\0') && cmd.includes(join(this.dataDir, 'runtime'))) process.kill(Number(pid), 'SIGKILL');
        if (cmd.split('\0')[0]!.endsWith('haproxy') && cmd.includes(join(this.dataDir, 'ingress'))) process.kill(Number(pid), 'SIGKILL');
      } catch {
        /* raced */
      }
    }
    // Mounts: detach them so the next tests start clean
    // (the leak itself is reported by the test that checks hostResidue()).
    for (const mp of mountPointsUnder(this.dataDir)) spawnSync('umount', ['-l', mp]);
    const inst = instanceId(this.dataDir);
    for (const l of readdirSync('/sys/class/net')) if (l.startsWith(`b${inst}`)) spawnSync('ip', ['link', 'del', l]);
    spawnSync('nft', ['-f', '-'], { input: ['inet', 'bridge'].map((f) => `add table ${f} berth_${inst}\ndelete table ${f} berth_${inst}\n`).join('') });
    // The cgroups of workloads left running: what still runs in them is this daemon's (its sandboxes'
    // processes), ended by pid; then the groups are removed, deepest first.
    for (const dir of cgroupParentDirs(this.cgroupParent)) await removeCgroupTree(dir);
    rmSync(this.dataDir, { recursive: true, force: true });
  }
}

/** Ends the processes in a cgroup and its descendants and removes them, deepest first (a killed process leaves its group within ~2 s). */
async function removeCgroupTree(dir: string): Promise<void> {
  let subs: string[];
  try {
    subs = readdirSync(dir, { withFileTypes: true }).filter((f) => f.isDirectory()).map((f) => join(dir, f.name));
  } catch {
    return; // (gone)
  }
  for (const sub of subs) await removeCgroupTree(sub);
  const deadline = Date.now() + 2000;
  for (;;) {
    let pids: string[] = [];
    try {
      pids = readFileSync(join(dir, 'cgroup.procs'), 'utf8').split('\n').filter(Boolean);
    } catch {
      /* gone */
    }
    for (const pid of pids) {
      try {
        process.kill(Number(pid), 'SIGKILL');
      } catch {
        /* just exited */
      }
    }
    try {
      rmdirSync(dir);
      return;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT' || Date.now() > deadline) return; // (what is left is reported by hostResidue)
      await sleep(20);
    }
  }
}

export function cgroupParentDirs(parent: string): string[] {
  return cgroupHierarchies()
    .map((h) => join(h, parent))
    .filter((d) => existsSync(d));
}

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/**
 * A shell command that ends as the guest's wall clock turns a second, printing that second: the host's
 * clock when its output arrives, minus that second, is how far the guest's clock is behind (plus the
 * output's way back), to the millisecond although `date` in the guest has whole seconds only.
 */
export const GUEST_SECOND_TURN = 't=$(date +%s); while [ "$(date +%s)" = "$t" ]; do :; done; date +%s';

/** The guest's clock (`guestS`, GUEST_SECOND_TURN's output, arrived at `arrivedMs`) is the host's: at most 700 ms behind, 100 ms ahead. */
export function assertWallClock(guestS: number, arrivedMs: number): void {
  const behindMs = arrivedMs - guestS * 1000;
  assert.ok(Number.isInteger(guestS) && behindMs <= 700 && behindMs >= -100, `guest clock ${guestS} s, turned ${behindMs} ms before the host's clock read it`);
}
