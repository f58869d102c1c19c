// API edge: every bad input gets the documented 4xx with a machine-readable code and a message
// that says how to fix it, and leaves the state unchanged.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { TestDaemon } from './harness.js';

let d: TestDaemon;
before(async () => {
  d = await TestDaemon.start();
});
after(async () => {
  await d.deleteAllWorkloads().catch(() => undefined);
  await d.destroy();
});

const W = '/v1/projects/default/workloads';
const okSpec = { image: 'busybox', command: ['sleep', '300'] };

/** A snapshot of everything the API can show; compared before and after each bad request. */
async function snapshot(): Promise<string> {
  const parts = await Promise.all([
    d.api('GET', '/v1/projects?limit=1000'),
    d.api('GET', `${W}?limit=1000`),
    d.api('GET', '/v1/projects/default/jobs?limit=1000'),
    d.api('GET', '/v1/tokens'),
  ]);
  // Status (and the versions/timestamps its writes bump) belongs to the reconcilers, which keep
  // working in the background; what a request could change is everything else.
  const strip = (body: any) => ({
    ...body,
    items: (body.items ?? []).map(({ status, observedGeneration, resourceVersion, updatedAt, ...rest }: any) => rest),
  });
  return JSON.stringify(parts.map((p) => strip(p.body)));
}

async function expectError(method: string, path: string, body: unknown, status: number, code: string, opts: Parameters<TestDaemon['api']>[3] = {}, messageRe?: RegExp) {
  const before = await snapshot();
  const r = await d.api(method, path, body, opts);
  assert.equal(r.status, status, `${method} ${path} ${JSON.stringify(body)?.slice(0, 200)} → ${r.status} ${JSON.stringify(r.body)}`);
  assert.equal(r.body?.error?.code, code, JSON.stringify(r.body));
  assert.equal(typeof r.body.error.message, 'string');
  assert.ok(r.body.error.message.length > 10, 'message must explain');
  if (messageRe) assert.match(r.body.error.message, messageRe);
  assert.equal(await snapshot(), before, 'state must not change');
  return r;
}

describe('authentication', () => {
  test('no token → 401 unauthenticated, naming where the token is', async () => {
    await expectError('GET', W, undefined, 401, 'unauthenticated', { token: '' }, /admin\.token/);
  });
  test('wrong token → 401', async () => {
    await expectError('GET', W, undefined, 401, 'unauthenticated', { token: 'berth_nope' });
    await expectError('POST', W, { spec: okSpec }, 401, 'unauthenticated', { token: 'berth_nope' });
  });
  test('admin token file is readable only by root', async () => {
    const { statSync } = await import('node:fs');
    const st = statSync(`${d.dataDir}/admin.token`);
    assert.equal(st.mode & 0o777, 0o600);
    assert.equal(st.uid, 0);
  });
  test('a project-scoped token cannot touch another project → 403', async () => {
    assert.equal((await d.api('POST', '/v1/projects', { name: 'team-a' })).status, 201);
    assert.equal((await d.api('POST', '/v1/projects', { name: 'team-b' })).status, 201);
    const t = await d.api('POST', '/v1/tokens', { name: 'a-token', project: 'team-a' });
    assert.equal(t.status, 201);
    const tok = t.body.token as string;
    await expectError('GET', '/v1/projects/team-b/workloads', undefined, 403, 'permission_denied', { token: tok }, /team-a/);
    await expectError('POST', '/v1/projects/team-b/workloads', { spec: okSpec }, 403, 'permission_denied', { token: tok });
    await expectError('POST', '/v1/projects', { name: 'team-c' }, 403, 'permission_denied', { token: tok });
    await expectError('POST', '/v1/tokens', { name: 'x' }, 403, 'permission_denied', { token: tok });
    const own = await d.api('GET', '/v1/projects/team-a/workloads', undefined, { token: tok });
    assert.equal(own.status, 200);
    const projects = await d.api('GET', '/v1/projects', undefined, { token: tok });
    assert.deepEqual(projects.body.items.map((p: any) => p.name), ['team-a']);
    assert.equal((await d.api('DELETE', '/v1/tokens/a-token')).status, 204);
    await expectError('GET', '/v1/projects/team-a/workloads', undefined, 401, 'unauthenticated', { token: tok });
  });
});

describe('bad input is refused and changes nothing', () => {
  test('unknown fields → 400 naming the field', async () => {
    await expectError('POST', W, { spec: { ...okSpec, imagee: 'x' } }, 400, 'invalid_argument', {}, /imagee/);
    await expectError('POST', W, { spec: okSpec, extra: 1 }, 400, 'invalid_argument', {}, /extra/);
    await expectError('POST', W, { spec: { ...okSpec, resources: { memoryMb: 5 } } }, 400, 'invalid_argument', {}, /memoryMb/);
    await expectError('POST', '/v1/projects', { name: 'p1', owner: 'me' }, 400, 'invalid_argument', {}, /owner/);
  });
  test('wrong types → 400 naming the path', async () => {
    await expectError('POST', W, { spec: { ...okSpec, command: 'sleep 300' } }, 400, 'invalid_argument', {}, /spec\.command/);
    await expectError('POST', W, { spec: { ...okSpec, resources: { cpuMillis: '500' } } }, 400, 'invalid_argument', {}, /cpuMillis/);
    await expectError('POST', W, { spec: { ...okSpec, env: { A: 1 } } }, 400, 'invalid_argument', {}, /env/);
    await expectError('POST', W, { spec: { ...okSpec, restartPolicy: 'sometimes' } }, 400, 'invalid_argument', {}, /restartPolicy/);
    await expectError('POST', W, { spec: { ...okSpec, resources: { memoryMiB: 1.5 } } }, 400, 'invalid_argument');
    await expectError('POST', W, [], 400, 'invalid_argument');
  });
  test('out-of-range values → 400', async () => {
    await expectError('POST', W, { spec: { ...okSpec, resources: { memoryMiB: 1 } } }, 400, 'invalid_argument', {}, /memoryMiB/);
    await expectError('POST', W, { spec: { ...okSpec, resources: { cpuMillis: 0 } } }, 400, 'invalid_argument');
    await expectError('POST', W, { spec: { ...okSpec, resources: { pids: -1 } } }, 400, 'invalid_argument');
    await expectError('POST', W, { spec: { ...okSpec, workingDir: 'relative/dir' } }, 400, 'invalid_argument', {}, /absolute/);
    await expectError('POST', W, { spec: { ...okSpec, env: { '1BAD': 'x' } } }, 400, 'invalid_argument');
    await expectError('POST', W, { spec: { ...okSpec, user: 'root; rm -rf /' } }, 400, 'invalid_argument', {}, /user/);
  });
  test('bad names → 400 explaining the rule', async () => {
    for (const name of ['Upper', '-lead', 'trail-', 'a_b', 'x'.repeat(64), '', 'a.b', 'ü']) {
      await expectError('POST', W, { name, spec: okSpec }, 400, 'invalid_argument', {}, /lowercase/);
    }
    await expectError('POST', '/v1/projects', { name: 'Bad Name' }, 400, 'invalid_argument');
    await expectError('GET', '/v1/projects/Bad_Project/workloads', undefined, 400, 'invalid_argument');
    await expectError('POST', W, { name: 'ok', labels: { 'bad key!': 'v' }, spec: okSpec }, 400, 'invalid_argument', {}, /label/);
  });
  test('malformed JSON and missing body → 400', async () => {
    await expectError('POST', W, undefined, 400, 'invalid_argument', { raw: '{"spec": ' });
    await expectError('POST', W, undefined, 400, 'invalid_argument', { raw: '' });
    await expectError('POST', W, undefined, 400, 'invalid_argument', { raw: '{"name":"x","spec":{"image":"busybox"}}', headers: { 'content-type': 'text/plain' } });
  });
  test('body over 1 MiB → 400', async () => {
    const big = { spec: { ...okSpec, env: { BIG: 'x'.repeat(1024 * 1024 + 10) } } };
    await expectError('POST', W, big, 400, 'invalid_argument', {}, /1 MiB/);
  });
  test('isolation tiers without a driver are refused clearly', async () => {
    const info = await d.api('GET', '/v1/info');
    const microvm = info.body.drivers.find((x: any) => x.isolation === 'microvm');
    if (!microvm?.healthy) await expectError('POST', W, { name: 'vm', spec: { ...okSpec, isolation: 'microvm' } }, 412, 'failed_precondition', {}, /isolation "microvm" is not available/);
    else await expectError('POST', W, { name: 'vm', spec: { ...okSpec, isolation: 'microvm', resources: { memoryMiB: 8 } } }, 400, 'invalid_argument', {}, /memoryMiB ≥ 16/);
    const gvisor = info.body.drivers.find((x: any) => x.isolation === 'gvisor');
    if (!gvisor?.healthy) await expectError('POST', W, { name: 'gv', spec: { ...okSpec, isolation: 'gvisor' } }, 412, 'failed_precondition', {}, /container/);
    else {
      await expectError('POST', W, { name: 'gv', spec: { ...okSpec, isolation: 'gvisor', resources: { pids: 10 } } }, 400, 'invalid_argument', {}, /pids/);
      await expectError('POST', W, { name: 'gv', spec: { ...okSpec, isolation: 'gvisor', resources: { memoryMiB: 16 } } }, 400, 'invalid_argument', {}, /memoryMiB ≥ 32/);
    }
    await expectError('POST', W, { name: 'xx', spec: { ...okSpec, isolation: 'kata' } }, 400, 'invalid_argument');
  });
  test('unknown image or user → 400', async () => {
    await expectError('POST', W, { spec: { ...okSpec, image: 'nginx' } }, 400, 'invalid_argument', {}, /busybox/);
    await expectError('POST', W, { spec: { ...okSpec, user: 'nosuchuser' } }, 400, 'invalid_argument', {}, /passwd/);
  });
  test('bad cron schedule or time zone → 400', async () => {
    const tpl = { template: okSpec };
    await expectError('POST', '/v1/projects/default/jobs', { name: 'j', spec: { ...tpl, schedule: 'every minute' } }, 400, 'invalid_argument', {}, /cron/);
    await expectError('POST', '/v1/projects/default/jobs', { name: 'j', spec: { ...tpl, schedule: '* * * * *', timeZone: 'Mars/Olympus' } }, 400, 'invalid_argument', {}, /IANA/);
    await expectError('POST', '/v1/projects/default/jobs', { name: 'j', spec: { ...tpl, concurrencyPolicy: 'never' } }, 400, 'invalid_argument');
    await expectError('POST', '/v1/projects/default/jobs', { name: 'j', spec: { template: { ...okSpec, restartPolicy: 'always' } } }, 400, 'invalid_argument', {}, /restartPolicy/);
  });
  test('bad list parameters → 400', async () => {
    await expectError('GET', `${W}?limit=0`, undefined, 400, 'invalid_argument');
    await expectError('GET', `${W}?labelSelector=${encodeURIComponent('a==b==c')}`, undefined, 400, 'invalid_argument', {}, /selector/);
    await expectError('GET', `${W}?pageToken=garbage`, undefined, 400, 'invalid_argument', {}, /pageToken/);
    await expectError('GET', `${W}?bogus=1`, undefined, 400, 'invalid_argument');
  });
});

describe('not found, conflicts, preconditions', () => {
  test('unknown project / workload / route → 404', async () => {
    await expectError('GET', '/v1/projects/nope/workloads', undefined, 404, 'not_found', {}, /berth project create nope/);
    await expectError('POST', '/v1/projects/nope/workloads', { spec: okSpec }, 404, 'not_found');
    await expectError('GET', `${W}/ghost`, undefined, 404, 'not_found');
    await expectError('DELETE', `${W}/ghost`, undefined, 404, 'not_found');
    await expectError('GET', '/v1/nothing-here', undefined, 404, 'not_found');
  });
  test('duplicate names → 409 already_exists', async () => {
    assert.equal((await d.api('POST', W, { name: 'dup', spec: okSpec })).status, 201);
    await expectError('POST', W, { name: 'dup', spec: okSpec }, 409, 'already_exists', {}, /dup/);
    await expectError('POST', '/v1/projects', { name: 'default' }, 409, 'already_exists');
  });
  test('stale resourceVersion → 409 conflict; current version → 200', async () => {
    const cur = await d.api('GET', `${W}/dup`);
    const rv = cur.body.resourceVersion as number;
    const stale = await d.api('PUT', `${W}/dup`, { spec: { ...okSpec, env: { A: '1' } }, resourceVersion: rv - 1 });
    assert.equal(stale.status, 409);
    assert.equal(stale.body.error.code, 'conflict');
    assert.match(stale.body.error.message, /fetch it again/);
    const after = await d.api('GET', `${W}/dup`);
    assert.equal(after.body.spec.env, undefined, 'spec unchanged');
    // The reconciler writes status too (every write bumps resourceVersion): retry like a client would.
    let ok = await d.api('PUT', `${W}/dup`, { spec: { ...okSpec, env: { A: '1' } }, resourceVersion: after.body.resourceVersion });
    for (let i = 0; ok.status === 409 && i < 10; i++) {
      const latest = await d.api('GET', `${W}/dup`);
      ok = await d.api('PUT', `${W}/dup`, { spec: { ...okSpec, env: { A: '1' } }, resourceVersion: latest.body.resourceVersion });
    }
    assert.equal(ok.status, 200);
    assert.equal(ok.body.spec.env.A, '1');
    assert.equal(ok.body.generation, 2);
  });
  test('deleting a non-empty project → 412', async () => {
    await expectError('DELETE', '/v1/projects/default', undefined, 412, 'failed_precondition', {}, /delete them first/);
  });
});

describe('listing', () => {
  test('pagination and label filters', async () => {
    assert.equal((await d.api('POST', '/v1/projects', { name: 'listing' })).status, 201);
    const base = '/v1/projects/listing/workloads';
    for (let i = 0; i < 5; i++) {
      const r = await d.api('POST', base, { name: `l${i}`, labels: { tier: i % 2 ? 'odd' : 'even', app: 'x' }, spec: { ...okSpec, state: 'stopped' } });
      assert.equal(r.status, 201, JSON.stringify(r.body));
    }
    const p1 = await d.api('GET', `${base}?limit=2`);
    assert.equal(p1.body.items.length, 2);
    assert.ok(p1.body.nextPageToken);
    const p2 = await d.api('GET', `${base}?limit=2&pageToken=${p1.body.nextPageToken}`);
    const p3 = await d.api('GET', `${base}?limit=2&pageToken=${p2.body.nextPageToken}`);
    assert.equal(p3.body.nextPageToken, null);
    const names = [...p1.body.items, ...p2.body.items, ...p3.body.items].map((w: any) => w.name);
    assert.deepEqual(names, ['l0', 'l1', 'l2', 'l3', 'l4']);
    const odd = await d.api('GET', `${base}?labelSelector=tier%3Dodd`);
    assert.deepEqual(odd.body.items.map((w: any) => w.name), ['l1', 'l3']);
    const notOdd = await d.api('GET', `${base}?labelSelector=${encodeURIComponent('tier!=odd,app')}`);
    assert.deepEqual(notOdd.body.items.map((w: any) => w.name), ['l0', 'l2', 'l4']);
    await d.deleteAllWorkloads('listing');
    assert.equal((await d.api('DELETE', '/v1/projects/listing')).status, 200);
  });
});

test('OpenAPI 3.1 document describes the API', async () => {
  const r = await d.api('GET', '/v1/openapi.json');
  assert.equal(r.status, 200);
  assert.equal(r.body.openapi, '3.1.0');
  for (const p of ['/v1/projects', '/v1/projects/{project}/workloads', '/v1/projects/{project}/workloads/{name}/logs', '/v1/projects/{project}/jobs/{name}/runs']) {
    assert.ok(r.body.paths[p], `missing ${p}`);
  }
  const spec = r.body.components.schemas.WorkloadSpec;
  assert.equal(spec.additionalProperties, false, 'strict schemas are published as such');
  assert.deepEqual(spec.properties.isolation.enum, ['container', 'gvisor', 'microvm']);
});

test('the unix socket serves the same API', async () => {
  const http = await import('node:http');
  const body: string = await new Promise((resolve, reject) => {
    const req = http.request({ socketPath: `${d.dataDir}/berthd.sock`, path: '/v1/projects', headers: { authorization: `Bearer ${d.token}` } }, (res) => {
      let b = '';
      res.on('data', (c) => (b += c));
      res.on('end', () => resolve(b));
    });
    req.on('error', reject);
    req.end();
  });
  assert.ok(JSON.parse(body).items.some((p: any) => p.name === 'default'));
});

test('long poll: GET ?untilPhase answers once the phase is reached; a bad phase list is a 400', async () => {
  const r = await d.api('POST', W, { name: 'waiter', spec: { image: 'busybox', command: ['sh', '-c', 'sleep 0.5; exit 4'] } });
  assert.equal(r.status, 201);
  const t0 = Date.now();
  const g = await d.api('GET', `${W}/waiter?untilPhase=exited,failed&timeoutMs=20000`);
  assert.equal(g.status, 200);
  assert.equal(g.body.status.phase, 'failed');
  assert.equal(g.body.status.exitCode, 4);
  assert.ok(Date.now() - t0 >= 400, 'it waited for the exit');
  await expectError('GET', `${W}/waiter?untilPhase=done`, undefined, 400, 'invalid_argument', {}, /untilPhase/);
  assert.equal((await d.api('DELETE', `${W}/waiter`)).status, 202);
});

test('create with ?wait=running answers once the workload runs (or could not start), in one round trip', async () => {
  const t0 = Date.now();
  const r = await d.api('POST', `${W}?wait=running`, { name: 'waited', spec: { ...okSpec, stopSignal: 'SIGKILL' } });
  assert.equal(r.status, 201);
  assert.equal(r.body.status.phase, 'running', JSON.stringify(r.body.status));
  assert.ok(r.body.status.pid > 0);
  assert.ok(Date.now() - t0 < 20_000);
  const bad = await d.api('POST', `${W}?wait=running`, { name: 'waited-bad', spec: { image: 'busybox', command: ['/no/such/program'] } });
  assert.equal(bad.status, 201);
  assert.equal(bad.body.status.phase, 'failed', JSON.stringify(bad.body.status));
  assert.match(bad.body.status.message ?? '', /no\/such\/program|not found|no such file/i);
  const wrong = await d.api('POST', `${W}?wait=forever`, { name: 'x', spec: okSpec });
  assert.equal(wrong.status, 400);
  for (const n of ['waited', 'waited-bad']) assert.equal((await d.api('DELETE', `${W}/${n}`)).status, 202);
});

test("a name that is not there: 404 whose message names the kind and a list path the API serves", async () => {
  for (const [method, path, kind] of [
    ['GET', `${W}/nope`, 'workload'],
    ['GET', '/v1/projects/default/services/nope', 'service'],
    ['GET', '/v1/projects/default/jobs/nope', 'job'],
    ['GET', '/v1/projects/default/sandboxes/nope', 'sandbox'],
    ['GET', '/v1/projects/default/sandbox-pools/nope', 'warm pool'],
    ['DELETE', '/v1/projects/default/sandbox-templates/nope', 'sandbox template'],
  ] as const) {
    const r = await d.api(method, path);
    assert.equal(r.status, 404, `${method} ${path}: ${JSON.stringify(r.body)}`);
    assert.equal(r.body.error.code, 'not_found');
    const m = /^(.+) "nope" not found.*; list them with GET (\S+)$/.exec(r.body.error.message);
    assert.ok(m, `${path}: ${r.body.error.message}`);
    assert.equal(m[1], kind);
    const list = await d.api('GET', m[2]!);
    assert.equal(list.status, 200, `the list path ${m[2]} in "${r.body.error.message}" answers ${list.status}`);
  }
});
