// Jobs: manual runs, retries with back-off, run history with exit codes and logs, concurrency
// policies, and a cron schedule that fires on time.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { TestDaemon, sleep } from './harness.js';

let d: TestDaemon;
before(async () => {
  d = await TestDaemon.start();
});
after(async () => {
  const jobs = await d.api('GET', '/v1/projects/default/jobs');
  for (const j of jobs.body.items ?? []) await d.api('DELETE', `/v1/projects/default/jobs/${j.name}`);
  await d.deleteAllWorkloads().catch(() => undefined);
  await d.destroy();
});

const J = '/v1/projects/default/jobs';

async function waitRun(job: string, run: string, pred: (r: any) => boolean, timeoutMs = 30_000): Promise<any> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const r = await d.api('GET', `${J}/${job}/runs/${run}`);
    if (r.status === 200 && pred(r.body)) return r.body;
    if (Date.now() > deadline) throw new Error(`run ${run}: ${JSON.stringify(r.body)}`);
    await sleep(100);
  }
}

async function deleteJob(name: string) {
  await d.api('DELETE', `${J}/${name}`);
  const deadline = Date.now() + 30_000;
  while ((await d.api('GET', `${J}/${name}`)).status !== 404) {
    assert.ok(Date.now() < deadline, `job ${name} deleted`);
    await sleep(100);
  }
}

describe('manual runs', () => {
  test('success: exit 0, logs kept in the run history', async () => {
    assert.equal((await d.api('POST', J, { name: 'hello', spec: { template: { image: 'busybox', command: ['sh', '-c', 'echo hi from job'] } } })).status, 201);
    const run = await d.api('POST', `${J}/hello/runs`);
    assert.equal(run.status, 201, JSON.stringify(run.body));
    assert.equal(run.body.spec.trigger, 'manual');
    const done = await waitRun('hello', run.body.name, (r) => r.status.phase === 'succeeded');
    assert.equal(done.status.exitCode, 0);
    assert.equal(done.status.attempts.length, 1);
    const logs = await d.api('GET', `${J}/hello/runs/${run.body.name}/logs`);
    assert.equal(logs.body, 'hi from job\n');
    await deleteJob('hello');
    assert.equal((await d.api('GET', '/v1/projects/default/workloads')).body.items.length, 0, 'attempt workloads removed with the job');
  });

  test('retries with growing back-off, then failed with the exit code', async () => {
    const spec = { template: { image: 'busybox', command: ['sh', '-c', 'echo attempt; exit 3'] }, retries: 2, retryBackoffMs: 300 };
    assert.equal((await d.api('POST', J, { name: 'flaky', spec })).status, 201);
    const run = await d.api('POST', `${J}/flaky/runs`);
    const done = await waitRun('flaky', run.body.name, (r) => r.status.phase === 'failed');
    assert.equal(done.status.exitCode, 3);
    assert.deepEqual(done.status.attempts.map((a: any) => a.exitCode), [3, 3, 3]);
    const starts = done.status.attempts.map((a: any) => Date.parse(a.startedAt));
    const ends = done.status.attempts.map((a: any) => Date.parse(a.finishedAt));
    const gap1 = starts[1] - ends[0];
    const gap2 = starts[2] - ends[1];
    assert.ok(gap1 >= 250, `first back-off ${gap1} ms`);
    assert.ok(gap2 >= 550 && gap2 > gap1, `second back-off doubles: ${gap1} then ${gap2}`);
    const logs = await d.api('GET', `${J}/flaky/runs/${run.body.name}/logs`);
    assert.equal(logs.body, 'attempt\nattempt\nattempt\n');
    await deleteJob('flaky');
  });

  test('OOM-killed attempt is reported as such', async () => {
    const spec = { template: { image: 'busybox', command: ['sh', '-c', 'x=aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa; while true; do x=$x$x; done'], resources: { memoryMiB: 16 } } };
    assert.equal((await d.api('POST', J, { name: 'hog', spec })).status, 201);
    const run = await d.api('POST', `${J}/hog/runs`);
    const done = await waitRun('hog', run.body.name, (r) => r.status.phase === 'failed');
    assert.equal(done.status.attempts[0].oomKilled, true);
    assert.equal(done.status.exitCode, 137);
    await deleteJob('hog');
  });

  test('concurrency forbid refuses a second manual run; replace cancels the active one', async () => {
    const tpl = { image: 'busybox', command: ['sleep', '60'], stopTimeoutMs: 500 };
    assert.equal((await d.api('POST', J, { name: 'single', spec: { template: tpl, concurrencyPolicy: 'forbid' } })).status, 201);
    const r1 = await d.api('POST', `${J}/single/runs`);
    await waitRun('single', r1.body.name, (r) => r.status.phase === 'running');
    const r2 = await d.api('POST', `${J}/single/runs`);
    assert.equal(r2.status, 409);
    assert.equal(r2.body.error.code, 'conflict');
    assert.match(r2.body.error.message, /forbid/);
    await deleteJob('single');

    assert.equal((await d.api('POST', J, { name: 'latest', spec: { template: tpl, concurrencyPolicy: 'replace' } })).status, 201);
    const a = await d.api('POST', `${J}/latest/runs`);
    await waitRun('latest', a.body.name, (r) => r.status.phase === 'running');
    const b = await d.api('POST', `${J}/latest/runs`);
    assert.equal(b.status, 201);
    await waitRun('latest', a.body.name, (r) => r.status.phase === 'cancelled');
    await waitRun('latest', b.body.name, (r) => r.status.phase === 'running');
    const wa = await d.waitWorkload('default', `${a.body.name}-a1`, (w) => w.status.phase === 'stopped', 15_000);
    assert.equal(wa.spec.state, 'stopped');
    await deleteJob('latest');
  });

  test('history keeps the newest historyLimit finished runs', async () => {
    assert.equal((await d.api('POST', J, { name: 'hist', spec: { template: { image: 'busybox', command: ['true'] }, historyLimit: 2 } })).status, 201);
    const names: string[] = [];
    for (let i = 0; i < 4; i++) {
      const r = await d.api('POST', `${J}/hist/runs`);
      names.push(r.body.name);
      await waitRun('hist', r.body.name, (x) => x.status.phase === 'succeeded');
    }
    const deadline = Date.now() + 15_000;
    for (;;) {
      const runs = await d.api('GET', `${J}/hist/runs`);
      const kept = runs.body.items.map((r: any) => r.name).sort();
      if (kept.length === 2) {
        assert.deepEqual(kept, names.slice(2).sort());
        break;
      }
      assert.ok(Date.now() < deadline, `history trimmed: ${kept}`);
      await sleep(100);
    }
    await deleteJob('hist');
  });
});

test('cron: every-minute schedule fires on time (±2 s) and concurrency forbid skips an overlapping run', { timeout: 200_000 }, async () => {
  const spec = {
    template: { image: 'busybox', command: ['sh', '-c', 'echo tick; sleep 75'], stopTimeoutMs: 500 },
    schedule: '* * * * *',
    timeZone: 'Europe/Paris',
    concurrencyPolicy: 'forbid',
  };
  const created = await d.api('POST', J, { name: 'ticker', spec });
  assert.equal(created.status, 201);
  // First run: due at the next minute boundary.
  const deadline = Date.now() + 70_000;
  let first: any;
  for (;;) {
    const runs = await d.api('GET', `${J}/ticker/runs`);
    first = runs.body.items[0];
    if (first && first.status.attempts.length > 0) break;
    assert.ok(Date.now() < deadline, 'a scheduled run appears within a minute');
    await sleep(100);
  }
  assert.equal(first.spec.trigger, 'schedule');
  const due = Date.parse(first.spec.scheduledAt);
  assert.equal(new Date(due).getUTCSeconds(), 0, 'due on a minute boundary');
  const w = await d.waitWorkload('default', first.status.attempts[0].workload, (x) => x.status.phase === 'running');
  const lateMs = Date.parse(w.status.startedAt) - due;
  assert.ok(Math.abs(lateMs) <= 2000, `started ${lateMs} ms after its due time`);
  // Next minute: the first run is still going (sleep 75), so forbid skips it.
  await sleep(Math.max(0, due + 60_000 + 3000 - Date.now()));
  const runs = await d.api('GET', `${J}/ticker/runs`);
  assert.equal(runs.body.items.length, 1, 'no second run while the first is active');
  const ev = await d.api('GET', `${J}/ticker/events`);
  const skipped = ev.body.items.filter((e: any) => e.reason === 'Skipped');
  assert.equal(skipped.length, 1, JSON.stringify(ev.body.items));
  assert.match(skipped[0].message, new RegExp(new Date(due + 60_000).toISOString()));
  const job = await d.api('GET', `${J}/ticker`);
  assert.equal(job.body.status.nextScheduleTime, new Date(due + 120_000).toISOString());
  assert.deepEqual(job.body.status.active, [first.name]);
  await deleteJob('ticker');
  assert.deepEqual(d.hostResidue(), []);
});
