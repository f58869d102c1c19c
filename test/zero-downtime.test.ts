// Issue 5 acceptance 1 and 2 through the real ingress: two replicas behind
// <service>.<project>.<base-domain> answer over HTTP and HTTPS; wrk sends requests for 30 s while
// the service is redeployed twice: no failed request; a deploy that never becomes ready is rolled
// back and the old revision keeps serving (again under wrk).
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { sleep, type TestDaemon } from './harness.js';
import { eventually, get, getTls, startWithIngress } from './ingress-helpers.js';

let d: TestDaemon;
let httpPort = 0;
let httpsPort = 0;
const HOST = 'web.default.berth.localhost';

before(async () => {
  ({ d, httpPort, httpsPort } = await startWithIngress());
});
after(async () => {
  await d.api('DELETE', '/v1/projects/default/services/web').catch(() => undefined);
  for (let i = 0; i < 100 && (await d.api('GET', '/v1/projects/default/services/web')).status === 200; i++) await sleep(200);
  await d.deleteAllWorkloads().catch(() => undefined);
  await d.destroy();
});

// A replica that serves $V and ends at once on SIGTERM (see services.test.ts).
const HTTPD = ['sh', '-c', 'mkdir -p /tmp/www && echo "$V" > /tmp/www/index.html; trap "exit 0" TERM; httpd -f -p 8080 -h /tmp/www & wait'];
const fast = { periodMs: 200, timeoutMs: 500, failureThreshold: 2, successThreshold: 1, initialDelayMs: 0 };
const spec = (v: string, command = HTTPD) => ({
  image: 'busybox',
  command,
  env: { V: v },
  ports: [{ port: 8080, protocol: 'http', public: true }],
  replicas: 2,
  healthChecks: { readiness: { http: { path: '/', port: 8080 }, ...fast } },
  deploy: { maxSurge: 1, maxUnavailable: 0, progressDeadlineMs: 10_000 },
  stopTimeoutMs: 2000,
});

async function waitSvc(pred: (s: any) => boolean, timeoutMs = 60_000): Promise<any> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const s = (await d.api('GET', '/v1/projects/default/services/web')).body;
    if (pred(s)) return s;
    if (Date.now() > deadline) throw new Error(`timed out; status ${JSON.stringify(s.status)}`);
    await sleep(100);
  }
}
const settled = (rev: number) => (s: any) => s.status.currentRevision === rev && s.status.targetRevision === rev && s.status.readyReplicas === 2 && s.status.instances.length === 2;

/**
 * wrk against the ingress for `seconds`; resolves with its counts.
 * 4 connections, not more: busybox httpd listens with a backlog of 9 and closes every connection, so
 * when more connect at once than it accepts (a starved CPU during a deploy), the kernel drops SYNs
 * (TcpExtListenOverflows in the replica's namespace) and the client retransmits after 1 s, 3 s — a
 * wrk "timeout" that is the toy server's, not the deploy's. With 4 in flight through the proxy, at
 * most 4 connections wait on any replica: a failed request here can only come from routing.
 */
function wrk(seconds: number): Promise<{ requests: number; errors: number; non2xx: number; text: string }> {
  return new Promise((resolve, reject) => {
    const p = spawn('wrk', ['-t2', '-c4', `-d${seconds}s`, '-H', `Host: ${HOST}`, `http://127.0.0.1:${httpPort}/index.html`]);
    let text = '';
    p.stdout.setEncoding('utf8').on('data', (x: string) => (text += x));
    p.stderr.setEncoding('utf8').on('data', (x: string) => (text += x));
    p.on('error', reject);
    p.on('close', () => {
      const requests = Number(/(\d+) requests in/.exec(text)?.[1] ?? NaN);
      const sock = /Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)/.exec(text);
      const errors = sock ? sock.slice(1).reduce((a, x) => a + Number(x), 0) : 0;
      const non2xx = Number(/Non-2xx or 3xx responses: (\d+)/.exec(text)?.[1] ?? 0);
      resolve({ requests, errors, non2xx, text });
    });
  });
}

test('two replicas behind the ingress over HTTP and HTTPS; redeployed twice under wrk: no failed request', { timeout: 240_000 }, async () => {
  const c = await d.api('POST', '/v1/projects/default/services', { name: 'web', spec: spec('v1') });
  assert.equal(c.status, 201, JSON.stringify(c.body));
  await waitSvc(settled(1));
  const seen = new Set<string>();
  const ok = await eventually(() => get(httpPort, HOST, '/index.html'), (r) => r.status === 200);
  assert.equal(ok.body, 'v1\n');
  // Load-balanced over both replicas: the ingress's backends are the two ready replicas.
  const st = (await d.api('GET', '/v1/ingress')).body;
  const route = st.routes.find((r: any) => r.id === 'service/default/web');
  assert.equal(route.backends, 2, JSON.stringify(st.routes));
  const ca = (await d.api('GET', '/v1/ingress/ca.pem')).body as string;
  const tls = await eventually(() => getTls(httpsPort, HOST, ca, '/index.html'), (r) => r.status === 200);
  assert.equal(tls.body, 'v1\n');
  seen.add(tls.body);

  const load = wrk(30);
  await sleep(3000);
  for (const [v, rev] of [['v2', 2], ['v3', 3]] as const) {
    assert.equal((await d.api('PUT', '/v1/projects/default/services/web', { spec: spec(v) })).status, 200);
    await waitSvc(settled(rev));
    await sleep(2000);
  }
  const r = await load;
  assert.ok(r.requests > 100, r.text);
  assert.equal(r.errors, 0, r.text);
  assert.equal(r.non2xx, 0, r.text);
  assert.equal((await get(httpPort, HOST, '/index.html')).body, 'v3\n');
});

test('a deploy that never becomes ready is rolled back; the old revision serves throughout', { timeout: 180_000 }, async () => {
  const load = wrk(20);
  await sleep(1000);
  // Listens nowhere: readiness never passes.
  assert.equal((await d.api('PUT', '/v1/projects/default/services/web', { spec: spec('broken', ['sh', '-c', 'trap "exit 0" TERM; sleep 1000 & wait']) })).status, 200);
  const s = await waitSvc(
    (x) => x.status.currentRevision === 3 && x.status.revisions.some((rv: any) => rv.number === 4 && rv.outcome === 'failed') && x.status.instances.length === 2 && x.status.instances.every((i: any) => i.revision === 3),
    90_000,
  );
  assert.equal(s.status.readyReplicas, 2);
  const r = await load;
  assert.equal(r.errors, 0, r.text);
  assert.equal(r.non2xx, 0, r.text);
  assert.equal((await get(httpPort, HOST, '/index.html')).body, 'v3\n');
});
