// One field moves a workload between isolation tiers; everything else (API, logs, exit codes,
// limits, crash recovery) stays the same.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
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
  assert.ok(byIso.microvm, 'microvm driver is fingerprinted');
  if (byIso.microvm.healthy) {
    assert.ok(byIso.microvm.version);
    assert.match(byIso.microvm.attributes.accel, /^(kvm|tcg)$/);
    assert.match(byIso.microvm.reason, /(KVM|TCG).*: /, 'the reason says why KVM is or is not used');
  } else assert.match(byIso.microvm.reason, /qemu|kernel|agent/i);
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

  if (tiers.includes('microvm')) {
    const cur2 = await d.api('GET', `${W}/mover`);
    const u2 = await d.api('PUT', `${W}/mover`, { spec: { ...cur2.body.spec, isolation: 'microvm' }, resourceVersion: cur2.body.resourceVersion });
    assert.equal(u2.status, 200, JSON.stringify(u2.body));
    const w3 = await d.waitWorkload('default', 'mover', (w) => w.status.phase === 'failed' && w.observedGeneration === 3, 90_000);
    assert.equal(w3.status.exitCode, 3, 'same exit code in the microVM');
    const logs3 = (await d.api('GET', `${W}/mover/logs`)).body as string;
    const vmKernel = [...logs3.matchAll(/kernel=(\S+)/g)].pop()?.[1];
    assert.ok(vmKernel && vmKernel !== release() && vmKernel !== kernel, `the microVM runs its own kernel (${vmKernel})`);
    const vmMem = Number([...logs3.matchAll(/MemTotal:\s+(\d+)/g)].pop()?.[1]);
    const hostMem = Number(/MemTotal:\s+(\d+)/.exec(readFileSync('/proc/meminfo', 'utf8'))?.[1]);
    assert.ok(vmMem > 64 * 1024 && vmMem < hostMem / 4, `the microVM has its own memory size: ${vmMem} kB (host ${hostMem} kB)`);
  } else t.diagnostic('microvm tier not installed: checked container and gvisor only');
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

test('microVM workloads survive kill -9 of berthd and are adopted', { timeout: 180_000 }, async (t) => {
  if (!tiers.includes('microvm')) return t.skip('the microVM tier is not installed on this host');
  for (const n of ['m1', 'm2']) {
    const r = await d.api('POST', W, { name: n, spec: { image: 'busybox', isolation: 'microvm', command: ['sh', '-c', n === 'm2' ? 'sleep 3; exit 5' : 'exec sleep 1000'] } });
    assert.equal(r.status, 201);
  }
  const m1 = await d.waitWorkload('default', 'm1', (w) => w.status.phase === 'running', 60_000);
  await d.waitWorkload('default', 'm2', (w) => w.status.phase === 'running', 60_000);
  await d.kill9();
  await sleep(4000);
  await d.start();
  const m2 = await d.waitWorkload('default', 'm2', (w) => w.status.phase === 'failed', 30_000);
  assert.equal(m2.status.exitCode, 5);
  const again = await d.waitWorkload('default', 'm1', (w) => w.status.phase === 'running');
  assert.equal(again.status.pid, m1.status.pid, 'same VM process');
  const ev = await d.api('GET', `${W}/m1/events`);
  assert.equal(ev.body.items.filter((e: any) => e.reason === 'Started').length, 1);
  const stop = await d.api('POST', `${W}/m1/stop`);
  assert.ok(stop.status < 300, JSON.stringify(stop.body));
  await d.waitWorkload('default', 'm1', (w) => w.status.phase === 'stopped', 30_000);
  await d.deleteAllWorkloads();
  assert.deepEqual(d.hostResidue(), []);
});
