// One field moves a workload between isolation tiers; everything else (API, logs, exit codes,
// limits, crash recovery) stays the same.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { release } from 'node:os';
import { TestDaemon, sleep } from './harness.js';

let d: TestDaemon;
let tiers: string[] = [];
before(async () => {
  d = await TestDaemon.start();
  const info = await d.api('GET', '/v1/info');
  tiers = info.body.drivers.filter((x: any) => x.healthy).map((x: any) => x.isolation);
});
after(async () => {
  await d.deleteAllWorkloads().catch(() => undefined);
  await d.destroy();
});

const W = '/v1/projects/default/workloads';
const probe = ['sh', '-c', 'echo "kernel=$(uname -r)"; echo "mem=$(head -1 /proc/meminfo)"; echo err >&2; exit 3'];

test('berth info fingerprints every tier: installed or not, version, reason', async () => {
  const info = await d.api('GET', '/v1/info');
  const byIso = Object.fromEntries(info.body.drivers.map((x: any) => [x.isolation, x]));
  assert.equal(byIso.container.healthy, true);
  assert.match(byIso.container.version, /\d/);
  assert.ok(byIso.gvisor, 'gvisor driver is fingerprinted');
  assert.equal(typeof byIso.gvisor.reason, 'string');
  if (byIso.gvisor.healthy) {
    assert.match(byIso.gvisor.reason, /platform (systrap|ptrace)/);
    assert.ok(byIso.gvisor.version);
  }
});

test('changing only `isolation` moves the same workload between tiers', { timeout: 120_000 }, async (t) => {
  if (!tiers.includes('gvisor')) return t.skip('gVisor is not installed on this host');
  const spec = { image: 'busybox', command: probe, resources: { memoryMiB: 64, cpuMillis: 500 } };
  const c = await d.api('POST', W, { name: 'mover', spec: { ...spec, isolation: 'container' } });
  assert.equal(c.status, 201);
  const w1 = await d.waitWorkload('default', 'mover', (w) => w.status.phase === 'failed', 30_000);
  assert.equal(w1.status.exitCode, 3);
  const logs1 = (await d.api('GET', `${W}/mover/logs`)).body as string;
  assert.match(logs1, new RegExp(`kernel=${release().replace(/[.+]/g, '\\$&')}\n`), 'container shares the host kernel');

  const cur = await d.api('GET', `${W}/mover`);
  const u = await d.api('PUT', `${W}/mover`, { spec: { ...cur.body.spec, isolation: 'gvisor' }, resourceVersion: cur.body.resourceVersion });
  assert.equal(u.status, 200, JSON.stringify(u.body));
  const w2 = await d.waitWorkload('default', 'mover', (w) => w.status.phase === 'failed' && w.observedGeneration === 2, 60_000);
  assert.equal(w2.status.exitCode, 3, 'same exit code on gVisor');
  const logs2 = (await d.api('GET', `${W}/mover/logs`)).body as string;
  const kernel = /kernel=(\S+)/.exec(logs2)?.[1];
  assert.ok(kernel && kernel !== release(), `gVisor reports its own kernel (${kernel})`);
  assert.match(logs2, /err\n/);
  const mem = Number(/MemTotal:\s+(\d+)/.exec(logs2)?.[1]);
  assert.ok(mem > 0 && mem <= 64 * 1024 + 1024, `the sandbox sees its memory limit: ${mem} kB`);
  await d.deleteAllWorkloads();
  assert.deepEqual(d.hostResidue(), []);
});

test('gVisor workloads survive kill -9 of berthd and are adopted', { timeout: 120_000 }, async (t) => {
  if (!tiers.includes('gvisor')) return t.skip('gVisor is not installed on this host');
  for (const n of ['g1', 'g2']) {
    const r = await d.api('POST', W, { name: n, spec: { image: 'busybox', isolation: 'gvisor', command: ['sh', '-c', n === 'g2' ? 'sleep 2; exit 5' : 'exec sleep 1000'] } });
    assert.equal(r.status, 201);
  }
  const g1 = await d.waitWorkload('default', 'g1', (w) => w.status.phase === 'running', 30_000);
  await d.waitWorkload('default', 'g2', (w) => w.status.phase === 'running', 30_000);
  await d.kill9();
  await sleep(4000);
  await d.start();
  const g2 = await d.waitWorkload('default', 'g2', (w) => w.status.phase === 'failed', 30_000);
  assert.equal(g2.status.exitCode, 5);
  const again = await d.waitWorkload('default', 'g1', (w) => w.status.phase === 'running');
  assert.equal(again.status.pid, g1.status.pid, 'same sandbox process');
  const ev = await d.api('GET', `${W}/g1/events`);
  assert.equal(ev.body.items.filter((e: any) => e.reason === 'Started').length, 1);
  await d.deleteAllWorkloads();
  assert.deepEqual(d.hostResidue(), []);
});
