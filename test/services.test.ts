// Services end to end on a real berthd: replicas as busybox httpd workloads, health checks,
// DNS for the service name from another workload, rolling deploys under a client loop that must
// see no failure, automatic rollback of a deploy that never becomes ready, manual rollback,
// scaling, deletion without residue, and convergence after kill -9 of berthd.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { request } from 'node:http';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { TestDaemon, sleep } from './harness.js';

let d: TestDaemon;

before(async () => {
  d = await TestDaemon.start();
});
after(async () => {
  await d.deleteAllSandboxes().catch(() => undefined);
  await d.destroy();
});

/**
 * A busybox httpd replica serving `$V` at / on 8080. It ends at once on SIGTERM, like most servers
 * (httpd itself as PID 1 would ignore SIGTERM and keep serving until SIGKILL, which would hide a
 * missing drain delay).
 */
const HTTPD = ['sh', '-c', 'mkdir -p /tmp/www && echo "$V" > /tmp/www/index.html && echo "serving $V"; trap "exit 0" TERM; httpd -f -p 8080 -h /tmp/www & wait'];
const fast = { periodMs: 200, timeoutMs: 500, failureThreshold: 2, successThreshold: 1, initialDelayMs: 0 };
const spec = (version: string, over: Record<string, unknown> = {}) => ({
  image: 'busybox',
  command: HTTPD,
  env: { V: version },
  ports: [{ port: 8080, protocol: 'http', public: true }],
  replicas: 2,
  healthChecks: { readiness: { http: { path: '/', port: 8080 }, ...fast } },
  deploy: { maxSurge: 1, maxUnavailable: 0, progressDeadlineMs: 20_000, drainMs: 1000 },
  stopTimeoutMs: 2000,
  ...over,
});

const S = (name: string) => `/v1/projects/default/services/${name}`;

async function svc(name: string): Promise<any> {
  const r = await d.api('GET', S(name));
  assert.equal(r.status, 200, JSON.stringify(r.body));
  return r.body;
}

async function waitSvc(name: string, pred: (s: any) => boolean, timeoutMs = 30_000, what = 'condition'): Promise<any> {
  const deadline = Date.now() + timeoutMs;
  let last: any;
  for (;;) {
    last = await svc(name);
    if (pred(last)) return last;
    if (Date.now() > deadline) {
      const events = (await d.api('GET', `${S(name)}/events`)).body.items.slice(-20).map((e: any) => `${e.at} ${e.reason}: ${e.message}`);
      throw new Error(`service ${name}: timed out waiting for ${what}; last status: ${JSON.stringify(last.status)}\nevents:\n${events.join('\n')}`);
    }
    await sleep(100);
  }
}

const settled = (rev: number, n: number) => (s: any) =>
  s.status.currentRevision === rev && s.status.targetRevision === rev && s.status.readyReplicas === n && s.status.instances.length === n && s.status.instances.every((i: any) => i.ready && i.revision === rev);

/** GET http://ip:8080/ from the host; the body, or throws. */
function get(ip: string, timeoutMs = 2000): Promise<string> {
  return new Promise((resolve, reject) => {
    const req = request({ host: ip, port: 8080, path: '/', agent: false, timeout: timeoutMs }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c) => (body += c));
      res.on('end', () => (res.statusCode === 200 ? resolve(body.trim()) : reject(new Error(`HTTP ${res.statusCode}`))));
    });
    req.on('timeout', () => req.destroy(new Error('timeout')));
    req.on('error', reject);
    req.end();
  });
}

/**
 * What an ingress does: it keeps the ready set from the service's status (re-read every 400 ms, a
 * slow ingress: without the drain delay a stopped replica would still get requests) and sends
 * requests round-robin to it, 4 at a time. Counts failures and the versions seen.
 */
function clientLoop(name: string) {
  let stop = false;
  let backends: string[] = [];
  const seen = new Map<string, number>();
  const failures: string[] = [];
  let ok = 0;
  let n = 0;
  const refresher = (async () => {
    while (!stop) {
      const s = await svc(name);
      backends = s.status.instances.filter((i: any) => i.ready && i.ip).map((i: any) => i.ip);
      await sleep(400);
    }
  })();
  const worker = async () => {
    while (!stop) {
      if (backends.length === 0) {
        await sleep(20);
        continue;
      }
      const ip = backends[n++ % backends.length]!;
      try {
        const v = await get(ip);
        seen.set(v, (seen.get(v) ?? 0) + 1);
        ok++;
      } catch (e) {
        failures.push(`${ip}: ${(e as Error).message}`);
      }
    }
  };
  const workers = [worker(), worker(), worker(), worker()];
  return {
    async end() {
      stop = true;
      await Promise.all([refresher, ...workers]);
      return { ok, failures, seen };
    },
  };
}

async function sh(sandbox: string, cmd: string, timeoutMs = 30_000): Promise<string> {
  const res = await fetch(`${d.addr}/v1/projects/default/sandboxes/${sandbox}/commands`, {
    method: 'POST',
    headers: { authorization: `Bearer ${d.token}`, 'content-type': 'application/json' },
    body: JSON.stringify({ cmd, timeoutMs }),
  });
  const text = await res.text();
  assert.equal(res.status, 200, text);
  return text
    .split('\n')
    .filter(Boolean)
    .map((l) => JSON.parse(l))
    .filter((e) => e.type === 'stdout' || e.type === 'stderr')
    .map((e) => e.data)
    .join('');
}

const CLI = fileURLToPath(new URL('../src/cli/main.js', import.meta.url));

/** The berth CLI against the test daemon. */
function berth(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const env: NodeJS.ProcessEnv = { ...process.env, BERTH_ADDR: d.addr, BERTH_TOKEN: d.token };
    delete env.BERTH_PROJECT;
    const child = spawn(process.execPath, [CLI, ...args], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (x: string) => (stdout += x));
    child.stderr.setEncoding('utf8').on('data', (x: string) => (stderr += x));
    child.on('close', (code) => resolve({ code, stdout, stderr }));
  });
}

describe('services', () => {
  test('bad specs are refused with a clear error and change nothing', async () => {
    const bad: [unknown, RegExp][] = [
      [{ ...spec('v1'), replicas: 101 }, /replicas/],
      [{ ...spec('v1'), ports: [{ port: 8080 }, { port: 8080 }] }, /listed twice/],
      [{ ...spec('v1'), healthChecks: { readiness: { http: { port: 8080 }, tcp: { port: 8080 } } } }, /exactly one of/],
      [{ ...spec('v1'), healthChecks: { readiness: { periodMs: 200 } } }, /exactly one of/],
      [{ ...spec('v1'), deploy: { maxSurge: 0, maxUnavailable: 0 } }, /cannot both be 0/],
      [{ ...spec('v1'), network: { mode: 'none' } }, /need a network/],
      [{ ...spec('v1'), domains: ['Not A Host'] }, /domains/],
      [{ ...spec('v1'), maxConnectionsPerReplica: 0 }, /maxConnectionsPerReplica/],
      [{ ...spec('v1'), ports: [{ port: 8080, protocol: 'udp' }] }, /protocol/],
      [{ ...spec('v1'), bogus: 1 }, /unknown field/],
    ];
    for (const [s, re] of bad) {
      const r = await d.api('POST', '/v1/projects/default/services', { name: 'bad', spec: s });
      assert.equal(r.status, 400, JSON.stringify(s));
      assert.equal(r.body.error.code, 'invalid_argument');
      assert.match(r.body.error.message, re);
    }
    const long = await d.api('POST', '/v1/projects/default/services', { name: 'a'.repeat(49), spec: spec('v1') });
    assert.equal(long.status, 400);
    assert.match(long.body.error.message, /48 characters/);
    assert.equal((await d.api('GET', S('bad'))).status, 404);
    assert.equal((await d.api('GET', '/v1/projects/default/workloads')).body.items.length, 0);
    const missing = await d.api('POST', `${S('nope')}/rollback`, {});
    assert.equal(missing.status, 404);
  });

  test('replicas become ready, resolve by service name, survive a kill, deploy and roll back without a failed request', { timeout: 240_000 }, async (t) => {
    const c = await d.api('POST', '/v1/projects/default/services', { name: 'web', spec: spec('v1') });
    assert.equal(c.status, 201, JSON.stringify(c.body));
    let s = await waitSvc('web', settled(1, 2), 30_000, '2 ready replicas of revision 1');
    const ips = s.status.instances.map((i: any) => i.ip);
    for (const ip of ips) assert.equal(await get(ip), 'v1');
    const w = (await d.api('GET', '/v1/projects/default/workloads?labelSelector=berth.dev/service=web')).body.items;
    assert.equal(w.length, 2);
    for (const x of w) {
      assert.equal(x.spec.restartPolicy, 'always');
      assert.equal(x.labels['berth.dev/revision'], '1');
      assert.match(x.name, /^web-1-[0-9a-f]{6}$/);
    }

    // DNS: `web` and `web.default.internal` from another workload answer with the ready replicas.
    const sb = await d.api('POST', '/v1/projects/default/sandboxes?pool=none', { name: 'client', spec: { isolation: 'container', timeoutMs: 600_000, network: { egress: { policy: 'allow-all' } } } });
    assert.equal(sb.status, 201, JSON.stringify(sb.body));
    let out = await sh('client', 'nslookup web 2>&1; wget -qO- http://web:8080/; wget -qO- http://web.default.internal:8080/');
    for (const ip of ips) assert.ok(out.includes(ip), out);
    assert.match(out, /v1\nv1\n$/, out);

    // Kill one replica's process: it leaves the ready set, is restarted, and comes back.
    const victim = s.status.instances[0];
    const vw = (await d.api('GET', `/v1/projects/default/workloads/${victim.name}`)).body;
    process.kill(vw.status.pid, 'SIGKILL');
    s = await waitSvc('web', (x) => x.status.instances.some((i: any) => i.name === victim.name && !i.ready), 10_000, 'the killed replica to leave the ready set');
    assert.equal(s.status.readyReplicas, 1);
    out = await sh('client', 'nslookup web 2>&1');
    assert.ok(!out.includes(`Address: ${victim.ip}\n`) || s.status.instances.find((i: any) => i.name === victim.name)?.ready, `DNS still answers the killed replica: ${out}`);
    s = await waitSvc('web', (x) => x.status.readyReplicas === 2 && x.status.instances.length === 2, 20_000, 'the killed replica to come back');
    const back = (await d.api('GET', `/v1/projects/default/workloads/${victim.name}`)).body;
    assert.ok(back.status.restartCount >= 1, JSON.stringify(back.status));
    const events = (await d.api('GET', `${S('web')}/events`)).body.items.map((e: any) => e.reason);
    assert.ok(events.includes('ReplicaCreated') && events.includes('Deployed'), events.join(','));

    // Rolling deploys v2 then v3 under a client loop: no failed request; revisions 2 and 3.
    const loop = clientLoop('web');
    // And a client inside the project that finds the replicas through DNS (`web`) on every request.
    const inside = sh('client', 'n=0; f=0; while [ ! -f /tmp/stop ]; do if wget -qO- http://web:8080/ >/dev/null 2>&1; then n=$((n+1)); else f=$((f+1)); fi; done; echo "ok=$n failed=$f"', 180_000);
    await sleep(500);
    for (const [v, rev] of [['v2', 2], ['v3', 3]] as const) {
      const u = await d.api('PUT', S('web'), { spec: spec(v) });
      assert.equal(u.status, 200, JSON.stringify(u.body));
      await waitSvc('web', settled(rev, 2), 40_000, `revision ${rev} to be deployed`);
      for (const i of (await svc('web')).status.instances) assert.equal(await get(i.ip), v);
    }
    await sleep(500);
    await sh('client', 'touch /tmp/stop');
    const insideOut = await inside;
    const res = await loop.end();
    const m = /ok=(\d+) failed=(\d+)/.exec(insideOut);
    assert.ok(m, insideOut);
    t.diagnostic(`rolling deploys v1→v2→v3: host loop ${res.ok} requests, ${res.failures.length} failed; in-project DNS loop ${m[1]} requests, ${m[2]} failed`);
    assert.equal(m[2], '0', `requests through DNS failed during the rolling deploys: ${insideOut}`);
    assert.ok(Number(m[1]) > 20, insideOut);
    assert.deepEqual(res.failures, [], `failed requests during the rolling deploys (${res.ok} ok)`);
    assert.ok(res.ok > 100, `only ${res.ok} requests`);
    for (const v of ['v1', 'v2', 'v3']) assert.ok((res.seen.get(v) ?? 0) > 0, `never saw ${v}: ${JSON.stringify([...res.seen])}`);

    // A deploy that never becomes ready (nothing listens) is rolled back; v3 keeps serving.
    const loop2 = clientLoop('web');
    const broken = spec('v4', { command: ['sh', '-c', 'exec sleep 1000'], deploy: { maxSurge: 1, maxUnavailable: 0, progressDeadlineMs: 4000, drainMs: 1000 } });
    assert.equal((await d.api('PUT', S('web'), { spec: broken })).status, 200);
    s = await waitSvc('web', (x) => x.status.revisions.some((r: any) => r.number === 4 && r.outcome === 'failed'), 30_000, 'revision 4 to fail');
    s = await waitSvc('web', settled(3, 2), 20_000, 'revision 3 to serve alone again');
    const r2 = await loop2.end();
    assert.deepEqual(r2.failures, [], 'failed requests while a bad deploy was rolled back');
    assert.deepEqual([...r2.seen.keys()], ['v3']);
    const rev4 = s.status.revisions.find((r: any) => r.number === 4);
    assert.match(rev4.reason, /progressDeadlineMs/);
    assert.deepEqual(s.spec.command, HTTPD, 'the spec is back to the serving template');
    assert.ok(s.status.conditions.some((c: any) => c.type === 'Progressing' && c.status === 'False' && c.reason === 'ProgressDeadlineExceeded'), JSON.stringify(s.status.conditions));
    const ev2 = (await d.api('GET', `${S('web')}/events`)).body.items;
    assert.ok(ev2.some((e: any) => e.reason === 'RolledBack' && /revision 4 failed/.test(e.message)), JSON.stringify(ev2.slice(-5)));

    // The same template again is no new revision (this restores the deploy settings of spec('v3')).
    assert.equal((await d.api('PUT', S('web'), { spec: spec('v3') })).status, 200);
    await sleep(300);
    assert.equal((await svc('web')).status.revisions.length, 4);

    // Manual rollback (default: the previous good revision, 2) → a new revision 5 with v2.
    const rb = await d.api('POST', `${S('web')}/rollback`, {});
    assert.equal(rb.status, 200, JSON.stringify(rb.body));
    s = await waitSvc('web', settled(5, 2), 40_000, 'rollback revision 5');
    for (const i of s.status.instances) assert.equal(await get(i.ip), 'v2');
    const revs = (await d.api('GET', `${S('web')}/revisions`)).body;
    assert.deepEqual(revs.items.map((r: any) => [r.number, r.outcome]), [[5, 'deployed'], [4, 'failed'], [3, 'superseded'], [2, 'superseded'], [1, 'superseded']]);
    assert.equal(revs.items[0].hash, revs.items[3].hash, 'revision 5 re-deploys revision 2’s template');
    assert.equal((await d.api('POST', `${S('web')}/rollback`, { revision: 99 })).status, 404);

    // Scale up and down (no new revision).
    assert.equal((await d.api('PATCH', S('web'), { replicas: 3 })).status, 200);
    await waitSvc('web', settled(5, 3), 30_000, '3 replicas');
    assert.equal((await d.api('PATCH', S('web'), { replicas: 1 })).status, 200);
    s = await waitSvc('web', settled(5, 1), 30_000, '1 replica');
    assert.equal(s.status.revisions.length, 5);

    // Delete: every replica goes, nothing is left on the host.
    assert.equal((await d.api('DELETE', '/v1/projects/default/sandboxes/client')).status, 202);
    assert.equal((await d.api('DELETE', S('web'))).status, 202);
    const deadline = Date.now() + 30_000;
    while ((await d.api('GET', S('web'))).status !== 404) {
      assert.ok(Date.now() < deadline, 'service not deleted within 30 s');
      await sleep(100);
    }
    await d.deleteAllSandboxes();
    assert.equal((await d.api('GET', '/v1/projects/default/workloads')).body.items.length, 0);
    for (let i = 0; i < 50 && d.hostResidue().length > 0; i++) await sleep(100);
    assert.deepEqual(d.hostResidue(), []);
  });

  test('CLI: create, ls, inspect, deploy --wait, scale, revisions, logs, rollback --wait, rm', { timeout: 180_000 }, async () => {
    const cli = (...args: string[]) => berth(args);
    let r = await cli('service', 'create', '-r', '1', '--public-port', '8080', '-e', 'V=c1', '--readiness', 'http:8080/', '--check-period', '200', '--wait', 'cli', 'busybox', ...HTTPD);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /cli: revision 1 deployed \(1\/1 ready\)/);
    r = await cli('service', 'ls');
    assert.match(r.stdout, /^NAME\s+READY\s+UP-TO-DATE\s+REVISION\s+IMAGE\s+PORTS/m);
    assert.match(r.stdout, /^cli\s+1\/1\s+1\s+1\s+busybox\s+8080\/http \(public\)/m);
    r = await cli('service', 'inspect', 'cli', '-o', 'json');
    const ins = JSON.parse(r.stdout);
    assert.equal(ins.status.readyReplicas, 1);
    assert.equal(await get(ins.status.instances[0].ip), 'c1');
    r = await cli('service', 'deploy', 'cli', '-e', 'V=c2', '--wait');
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /revision 2 deployed/);
    r = await cli('service', 'scale', 'cli', '2');
    assert.equal(r.code, 0, r.stderr);
    await waitSvc('cli', settled(2, 2), 30_000, '2 replicas');
    r = await cli('service', 'revisions', 'cli');
    assert.match(r.stdout, /^2 \*\s+deployed\s+busybox/m);
    assert.match(r.stdout, /^1\s+superseded/m);
    r = await cli('service', 'logs', 'cli');
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /^cli-2-[0-9a-f]{6} \| /m, r.stdout);
    const s = await svc('cli');
    r = await cli('service', 'rollback', 'cli', '--wait');
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /revision 3 deployed/);
    for (const i of (await waitSvc('cli', settled(3, 2), 20_000, 'old replicas drained')).status.instances) assert.equal(await get(i.ip), 'c1');
    r = await cli('service', 'inspect', 'cli');
    assert.match(r.stdout, /Replicas:\s+2 ready \/ 2 desired/);
    assert.match(r.stdout, /^REPLICA\s+REVISION\s+PHASE\s+READY\s+IP/m);
    assert.ok(s.status.instances.length === 2);
    r = await cli('service', 'scale', 'cli', '101');
    assert.notEqual(r.code, 0);
    r = await cli('service', 'rm', 'cli');
    assert.equal(r.code, 0, r.stderr);
    assert.equal((await d.api('GET', S('cli'))).status, 404);
  });

  test('exec checks: readiness through the driver; a failing liveness check replaces the replica', { timeout: 120_000 }, async () => {
    const sick = ['sh', '-c', 'trap "exit 0" TERM; (sleep 2; touch /tmp/ok; sleep 3; touch /tmp/sick) & sleep 1000 & wait'];
    const r = await d.api('POST', '/v1/projects/default/services', {
      name: 'ex',
      spec: {
        image: 'busybox',
        command: sick,
        replicas: 1,
        healthChecks: {
          readiness: { exec: { command: ['test', '-f', '/tmp/ok'] }, ...fast },
          liveness: { exec: { command: ['sh', '-c', '! test -f /tmp/sick'] }, ...fast },
        },
        deploy: { drainMs: 200 },
        stopTimeoutMs: 1000,
      },
    });
    assert.equal(r.status, 201, JSON.stringify(r.body));
    const t0 = Date.now();
    const first = await waitSvc('ex', (x) => x.status.readyReplicas === 1, 20_000, 'the exec readiness check to pass');
    assert.ok(Date.now() - t0 >= 1500, 'ready before /tmp/ok existed');
    const name = first.status.instances[0].name;
    const replaced = await waitSvc('ex', (x) => x.status.instances.some((i: any) => i.name !== name && i.ready) && !x.status.instances.some((i: any) => i.name === name), 30_000, 'the sick replica to be replaced');
    assert.equal(replaced.status.instances.length, 1);
    const ev = (await d.api('GET', `${S('ex')}/events`)).body.items;
    assert.ok(ev.some((e: any) => e.reason === 'Unhealthy' && e.message.includes(name) && /liveness check failed/.test(e.message)), JSON.stringify(ev.map((e: any) => e.message)));
    assert.equal((await d.api('DELETE', S('ex'))).status, 202);
    const deadline = Date.now() + 30_000;
    while ((await d.api('GET', S('ex'))).status !== 404) {
      assert.ok(Date.now() < deadline, 'service not deleted');
      await sleep(100);
    }
  });

  test('a deploy whose replicas crash-loop is rolled back before its deadline', { timeout: 120_000 }, async () => {
    assert.equal((await d.api('POST', '/v1/projects/default/services', { name: 'cl', spec: spec('v1', { replicas: 1 }) })).status, 201);
    await waitSvc('cl', settled(1, 1), 30_000, 'revision 1');
    assert.equal((await d.api('PUT', S('cl'), { spec: spec('v2', { replicas: 1, command: ['sh', '-c', 'echo boom; exit 1'] }) })).status, 200);
    const s = await waitSvc('cl', (x) => x.status.revisions.some((r: any) => r.number === 2 && r.outcome === 'failed'), 40_000, 'revision 2 to fail');
    assert.match(s.status.revisions[1].reason, /crash-looping \(3 restarts/);
    const back = await waitSvc('cl', settled(1, 1), 20_000, 'revision 1 alone');
    assert.equal(await get(back.status.instances[0].ip), 'v1');
    assert.ok(back.status.conditions.some((c: any) => c.type === 'Progressing' && c.reason === 'CrashLoop'), JSON.stringify(back.status.conditions));
    assert.equal((await d.api('DELETE', S('cl'))).status, 202);
    const deadline = Date.now() + 30_000;
    while ((await d.api('GET', S('cl'))).status !== 404) {
      assert.ok(Date.now() < deadline, 'service not deleted');
      await sleep(100);
    }
  });

  test('kill -9 of berthd mid-deploy: converges, readiness kept, no duplicate replicas', { timeout: 180_000 }, async () => {
    assert.equal((await d.api('POST', '/v1/projects/default/services', { name: 'api', spec: spec('v1', { replicas: 3 }) })).status, 201);
    await waitSvc('api', settled(1, 3), 30_000, '3 ready replicas');
    assert.equal((await d.api('PUT', S('api'), { spec: spec('v2', { replicas: 3 }) })).status, 200);
    await waitSvc('api', (x) => x.status.instances.some((i: any) => i.revision === 2), 20_000, 'the deploy to start');
    await d.kill9();
    await d.start();
    // maxUnavailable 0: at least 3 replicas are ready all the way, also across the restart (the
    // prober is seeded from the persisted readiness, so the new berthd does not empty the routes).
    let minReady = Infinity;
    const s = await waitSvc(
      'api',
      (x) => {
        minReady = Math.min(minReady, x.status.readyReplicas);
        return settled(2, 3)(x);
      },
      40_000,
      'revision 2 after the restart',
    );
    assert.ok(minReady >= 3, `only ${minReady} ready replicas at some point after the restart`);
    const ws = (await d.api('GET', '/v1/projects/default/workloads?labelSelector=berth.dev/service=api')).body.items;
    assert.equal(ws.length, 3, JSON.stringify(ws.map((w: any) => w.name)));
    for (const i of s.status.instances) assert.equal(await get(i.ip), 'v2');
    assert.equal((await d.api('DELETE', S('api'))).status, 202);
    await d.deleteAllWorkloads();
    const deadline = Date.now() + 30_000;
    while ((await d.api('GET', S('api'))).status !== 404) {
      assert.ok(Date.now() < deadline, 'service not deleted');
      await sleep(100);
    }
    for (let i = 0; i < 50 && d.hostResidue().length > 0; i++) await sleep(100);
    assert.deepEqual(d.hostResidue(), []);
  });
});
