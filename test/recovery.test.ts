// Crash safety: workloads outlive a `kill -9` of berthd, exits that happen while it is down are
// not lost, a restarted berthd adopts what runs (same PIDs) and starts nothing twice; deleting
// everything leaves nothing on the host.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, readdirSync } from 'node:fs';
import { TestDaemon, cgroupParentDirs, sleep } from './harness.js';

let d: TestDaemon;
before(async () => {
  d = await TestDaemon.start();
});
after(async () => {
  await d.deleteAllWorkloads().catch(() => undefined);
  await d.destroy();
});

const W = '/v1/projects/default/workloads';
const procStart = (pid: number) => readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ')[19];

test('20 workloads survive kill -9 of berthd; the one that exits meanwhile keeps its exit code and logs', { timeout: 180_000 }, async () => {
  const N = 20;
  for (let i = 0; i < N - 1; i++) {
    const r = await d.api('POST', W, { name: `s${i}`, labels: { suite: 'recovery' }, spec: { image: 'busybox', command: ['sh', '-c', `echo up ${i}; exec sleep 1000`] } });
    assert.equal(r.status, 201, JSON.stringify(r.body));
  }
  const running = await Promise.all(Array.from({ length: N - 1 }, (_, i) => d.waitWorkload('default', `s${i}`, (w) => w.status.phase === 'running', 60_000)));
  const pids = new Map(running.map((w) => [w.name, { pid: w.status.pid as number, start: procStart(w.status.pid) }]));

  // The 20th exits about 3 s after it starts; berthd is killed right after it is running.
  const r = await d.api('POST', W, { name: 'quitter', spec: { image: 'busybox', command: ['sh', '-c', 'echo before-crash; sleep 3; echo while-daemon-down >&2; exit 7'] } });
  assert.equal(r.status, 201);
  await d.waitWorkload('default', 'quitter', (w) => w.status.phase === 'running');
  await d.kill9();
  const downAt = Date.now();

  // While berthd is down: every workload keeps running, the quitter exits.
  for (const { pid } of pids.values()) assert.ok(readFileSync(`/proc/${pid}/cmdline`, 'utf8').startsWith('sleep'), `pid ${pid} still runs sleep`);
  await sleep(Math.max(0, 5000 - (Date.now() - downAt)));

  await d.start();
  // After restart: the 19 are adopted with the same processes, the quitter shows exit 7.
  const quitter = await d.waitWorkload('default', 'quitter', (w) => w.status.phase === 'failed', 30_000);
  assert.equal(quitter.status.exitCode, 7);
  assert.equal(quitter.status.oomKilled, false);
  const logs = await d.api('GET', `${W}/quitter/logs`);
  assert.match(logs.body, /before-crash\n/);
  assert.match(logs.body, /while-daemon-down\n/);
  assert.ok(Date.parse(quitter.status.finishedAt) < Date.now() - 1000, 'finish time is the real one, from while berthd was down');

  for (const [name, { pid, start }] of pids) {
    const w = await d.waitWorkload('default', name, (x) => x.status.phase === 'running');
    assert.equal(w.status.pid, pid, `${name} keeps its pid`);
    assert.equal(procStart(pid), start, `${name} is the same process (start time unchanged)`);
    const ev = await d.api('GET', `${W}/${name}/events`);
    const started = ev.body.items.filter((e: any) => e.reason === 'Started');
    assert.equal(started.length, 1, `${name} was started once: ${JSON.stringify(ev.body.items)}`);
  }
  const qev = await d.api('GET', `${W}/quitter/events`);
  assert.equal(qev.body.items.filter((e: any) => e.reason === 'Started').length, 1, 'quitter not restarted');
  assert.ok(qev.body.items.some((e: any) => e.reason === 'Exited' && /exited 7/.test(e.message)));

  // Nothing started twice: exactly the 19 containers exist in runc.
  const { execFileSync } = await import('node:child_process');
  const listed = execFileSync('runc', ['--root', `${d.dataDir}/runtime/runc/runc`, 'list', '-q']).toString().trim().split('\n').filter(Boolean);
  assert.equal(listed.length, N - 1);

  // Delete everything: nothing of those workloads remains on the host.
  await d.deleteAllWorkloads();
  assert.deepEqual(d.hostResidue(), []);
  for (const { pid } of pids.values()) {
    let alive = true;
    try {
      process.kill(pid, 0);
    } catch {
      alive = false;
    }
    assert.equal(alive, false, `pid ${pid} is gone`);
  }
});

test('a workload deleted while berthd is down is cleaned up on restart; orphans are collected', { timeout: 60_000 }, async () => {
  const r = await d.api('POST', W, { name: 'orphan', spec: { image: 'busybox', command: ['sleep', '1000'] } });
  assert.equal(r.status, 201);
  await d.waitWorkload('default', 'orphan', (w) => w.status.phase === 'running');
  // Mark for deletion and crash before the reconciler can act on it.
  const del = d.api('DELETE', `${W}/orphan`).catch(() => undefined);
  await d.kill9();
  await del;
  await d.start();
  const deadline = Date.now() + 30_000;
  for (;;) {
    const g = await d.api('GET', `${W}/orphan`);
    if (g.status === 404) break;
    // If the DELETE never reached the store, ask again (the point is: no half-state survives).
    if (g.body.deletionRequestedAt === null) await d.api('DELETE', `${W}/orphan`);
    assert.ok(Date.now() < deadline, 'deleted after restart');
    await sleep(100);
  }
  assert.deepEqual(d.hostResidue(), []);
});

test('restart policy always restarts with back-off and keeps counting', { timeout: 60_000 }, async () => {
  const r = await d.api('POST', W, { name: 'flappy', spec: { image: 'busybox', command: ['sh', '-c', 'echo run; exit 1'], restartPolicy: 'always' } });
  assert.equal(r.status, 201);
  const w = await d.waitWorkload('default', 'flappy', (x) => x.status.restartCount >= 2, 30_000);
  assert.ok(['backoff', 'running', 'starting'].includes(w.status.phase), w.status.phase);
  const ev = await d.api('GET', `${W}/flappy/events`);
  const backoffs = ev.body.items.filter((e: any) => e.reason === 'BackOff').map((e: any) => Number(/restarting in (\d+) ms/.exec(e.message)![1]));
  assert.ok(backoffs.length >= 2);
  assert.ok(backoffs[1]! > backoffs[0]!, `back-off grows: ${backoffs}`);
  const logs = await d.api('GET', `${W}/flappy/logs`);
  assert.ok((logs.body.match(/run\n/g) ?? []).length >= 2, 'logs of every run are kept');
  await d.api('DELETE', `${W}/flappy`);
  await d.deleteAllWorkloads();
  assert.deepEqual(d.hostResidue(), []);
});

test('the test harness ends what a failed test left running: sandboxes of every tier, their processes and cgroups', { timeout: 120_000 }, async (t) => {
  // destroy() is the safety net between test files: a test that fails half-way must not leave the
  // next ones a runtime, a microVM or a cgroup (it once missed gVisor's: `runsc list -q` is not a flag).
  const x = await TestDaemon.start();
  const info = await x.api('GET', '/v1/info');
  const tiers: string[] = info.body.drivers.filter((v: any) => v.healthy).map((v: any) => v.isolation);
  if (!tiers.includes('gvisor')) t.diagnostic('gVisor not installed: container and microVM only');
  for (const isolation of tiers) {
    const r = await x.api('POST', '/v1/projects/default/sandboxes?pool=none', { spec: { isolation, timeoutMs: 600_000 } });
    assert.equal(r.status, 201, `${isolation}: ${JSON.stringify(r.body)}`);
  }
  const ours = () => {
    const found: string[] = [];
    for (const p of readdirSync('/proc').filter((n) => /^\d+$/.test(n))) {
      try {
        const cmd = readFileSync(`/proc/${p}/cmdline`, 'utf8');
        if (cmd.includes(x.dataDir) && readFileSync(`/proc/${p}/stat`, 'utf8').split(') ')[1]![0] !== 'Z') found.push(`${p} ${cmd.replaceAll('\0', ' ').slice(0, 80)}`);
      } catch {
        /* exited */
      }
    }
    return found;
  };
  assert.ok(ours().length >= tiers.length, 'each sandbox has a process naming the daemon\'s data dir');
  await x.destroy();
  await sleep(200);
  assert.deepEqual(ours(), []);
  assert.deepEqual(cgroupParentDirs(x.cgroupParent), [], 'the cgroup parent is removed in every hierarchy');
});
