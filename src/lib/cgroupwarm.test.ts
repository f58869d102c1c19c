// The migration warmer (src/lib/cgroupwarm.ts): which cgroup.procs it writes, that it writes only
// while held and moves this process nowhere, that it turns itself off where it cannot write, and —
// on a host where a migration after a pause waits for an RCU grace period — that it makes one cheap.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, rmdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { MigrationWarmer, ownCgroupProcs } from './cgroupwarm.js';
import { cgroupHierarchies } from './host.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const root = process.getuid?.() !== 0 ? 'needs root' : ownCgroupProcs() === undefined ? 'no cgroup file system' : undefined;

test('ownCgroupProcs: the first hierarchy whose cgroup.procs exists, v1 and v2', () => {
  const dir = mkdtempSync('/tmp/berth-cgwarm-');
  try {
    // v1: "name=systemd" lives in …/systemd; a controller list in its own directory.
    mkdirSync(join(dir, 'cpu,cpuacct', 'berth.service'), { recursive: true });
    writeFileSync(join(dir, 'cpu,cpuacct', 'berth.service', 'cgroup.procs'), '');
    assert.equal(ownCgroupProcs('12:name=systemd:/berth.service\n4:cpu,cpuacct:/berth.service\n', dir), join(dir, 'cpu,cpuacct', 'berth.service', 'cgroup.procs'));
    mkdirSync(join(dir, 'systemd', 'berth.service'), { recursive: true });
    writeFileSync(join(dir, 'systemd', 'berth.service', 'cgroup.procs'), '');
    assert.equal(ownCgroupProcs('12:name=systemd:/berth.service\n4:cpu,cpuacct:/berth.service\n', dir), join(dir, 'systemd', 'berth.service', 'cgroup.procs'));
    // A hybrid host's "0::" line is not the root's when the root is no cgroup v2.
    assert.equal(ownCgroupProcs('0::/berth.service\n', dir), undefined);
    // v2: the root is the unified hierarchy.
    writeFileSync(join(dir, 'cgroup.controllers'), 'cpu memory');
    mkdirSync(join(dir, 'system.slice', 'berth.service'), { recursive: true });
    writeFileSync(join(dir, 'system.slice', 'berth.service', 'cgroup.procs'), '');
    assert.equal(ownCgroupProcs('0::/system.slice/berth.service\n', dir), join(dir, 'system.slice', 'berth.service', 'cgroup.procs'));
    assert.equal(ownCgroupProcs('garbage\n', dir), undefined);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('the warmer writes only while held, and this process stays in its cgroups', { skip: root }, async () => {
  const w = new MigrationWarmer();
  const before = readFileSync('/proc/self/cgroup', 'utf8');
  const a = w.hold();
  const b = w.hold();
  await sleep(60);
  a();
  a(); // (idempotent: b still holds)
  const during = w.writes;
  assert.ok(during >= 3, `writes while held: ${during}`);
  await sleep(30);
  assert.ok(w.writes > during, 'still writing while one holder is left');
  b();
  await sleep(30);
  assert.equal(w.active, false);
  const stopped = w.writes;
  await sleep(30);
  assert.equal(w.writes, stopped, 'no writes once released');
  assert.equal(readFileSync('/proc/self/cgroup', 'utf8'), before);
  // Held again: it starts again.
  const c = w.hold();
  await sleep(30);
  c();
  assert.ok(w.writes > stopped);
});

test('during(): the function runs with the warmer held, which is released after it, also when it fails', { skip: root }, async () => {
  const w = new MigrationWarmer();
  assert.equal(await w.during(async () => (await sleep(20), w.active)), true);
  await assert.rejects(w.during(async () => Promise.reject(new Error('boom'))), /boom/);
  await sleep(20);
  assert.equal(w.active, false);
});

test('the warmer turns itself off where it cannot write', async () => {
  const none = new MigrationWarmer(() => undefined);
  none.hold()();
  assert.equal(none.active, false);
  const unwritable = new MigrationWarmer(() => '/proc/self/stat'); // (opens for writing fail)
  const release = unwritable.hold();
  await sleep(20);
  release();
  assert.equal(unwritable.active, false);
  assert.equal(unwritable.writes, 0);
  unwritable.hold()(); // (stays off: no new attempt)
  assert.equal(unwritable.active, false);
});

test('held, a migration after a pause does not wait for a grace period', { skip: root }, async (t) => {
  // A sleeping child moved into a cgroup of its own and back, each after a pause (the semaphore
  // idle), five times without and five times with the warmer; medians compared.
  const h = cgroupHierarchies().find((x) => /(^|,)pids(,|$)/.test(x.split('/').pop()!) || x === '/sys/fs/cgroup');
  if (!h) return t.skip('no pids hierarchy');
  const cg = join(h, `berth-cgwarm-test-${process.pid}`);
  const v2 = h === '/sys/fs/cgroup';
  const line = readFileSync('/proc/self/cgroup', 'utf8').split('\n').find((l) => (v2 ? l.startsWith('0::') : l.split(':')[1]?.split(',').includes('pids')));
  if (!line) return t.skip('not in a pids cgroup');
  const home = join(h, line.split(':')[2]!, 'cgroup.procs'); // where the child starts (ours), and goes back to
  const child = spawn('sleep', ['60'], { stdio: 'ignore' });
  mkdirSync(cg);
  const move = async (): Promise<number> => {
    await sleep(80);
    const t0 = performance.now();
    writeFileSync(join(cg, 'cgroup.procs'), String(child.pid));
    const ms = performance.now() - t0;
    writeFileSync(home, String(child.pid));
    return ms;
  };
  const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
  try {
    const cold: number[] = [];
    for (let i = 0; i < 5; i++) cold.push(await move());
    const w = new MigrationWarmer();
    const warm: number[] = [];
    for (let i = 0; i < 5; i++) {
      const release = w.hold();
      await sleep(20); // (its first write waits for the grace period)
      warm.push(await move());
      release();
    }
    t.diagnostic(`migration after a pause: ${median(cold).toFixed(2)} ms, held: ${median(warm).toFixed(2)} ms`);
    if (median(cold) < 2) return t.skip(`migrations are cheap on this host anyway (${median(cold).toFixed(2)} ms)`);
    assert.ok(median(warm) < median(cold) / 3, `held ${median(warm).toFixed(2)} ms vs ${median(cold).toFixed(2)} ms`);
  } finally {
    child.kill();
    await new Promise((r) => child.once('exit', r));
    rmdirSync(cg);
  }
});
