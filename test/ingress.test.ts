// The ingress end to end through a real berthd and a real HAProxy: routing by Host over HTTP, HTTPS
// (client trusts Berth's local CA) and HTTP/2, load balancing, a dead backend costs no request,
// WebSockets, the access token, certificates from pebble over ACME, and the proxy process's life:
// adopted after kill -9 of berthd, restarted when it dies, gone after a graceful stop.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { connect, createServer, type AddressInfo } from 'node:net';
import http from 'node:http';
import pino from 'pino';
import { Ingress } from '../src/ingress/ingress.js';
import { DnsServer } from '../src/network/dns.js';
import { BERTHD, TestDaemon, sleep } from './harness.js';
import { Backend, Pebble, eventually, freePort, get, getH2, getTls, proxyPids, wsEcho } from './ingress-helpers.js';

const HOST = 'web.default.berth.localhost';
let d: TestDaemon;
let httpPort = 0;
let httpsPort = 0;
let a: Backend;
let b: Backend;
let ca = '';

async function putRoutes(routes: unknown[]): Promise<void> {
  const r = await d.api('PUT', '/v1/ingress/routes', { routes });
  assert.equal(r.status, 200, JSON.stringify(r.body));
}

before(async () => {
  httpPort = await freePort();
  httpsPort = await freePort();
  d = new TestDaemon(mkdtempSync('/tmp/berth-test-'));
  d.args = ['--ingress-http', `127.0.0.1:${httpPort}`, '--ingress-https', `127.0.0.1:${httpsPort}`];
  await d.start();
  a = await new Backend('A').listen();
  b = await new Backend('B').listen();
});
after(async () => {
  await d.destroy();
  await a.kill().catch(() => undefined);
  await b.kill().catch(() => undefined);
});

test('two backends behind one host name answer over HTTP, round robin', async () => {
  await putRoutes([{ id: 'test/web', hosts: [HOST], backends: [{ address: '127.0.0.1', port: a.port }, { address: '127.0.0.1', port: b.port }] }]);
  const seen = { A: 0, B: 0 } as Record<string, number>;
  for (let i = 0; i < 20; i++) {
    const r = await get(httpPort, HOST, `/req${i}`);
    assert.equal(r.status, 200, r.body);
    seen[r.body.split(' ')[0]!]!++;
  }
  assert.equal(seen.A, 10, JSON.stringify(seen));
  assert.equal(seen.B, 10, JSON.stringify(seen));
  const unknown = await get(httpPort, 'nobody.berth.localhost');
  assert.equal(unknown.status, 404);
  assert.match(unknown.body, /no Berth ingress route for host nobody\.berth\.localhost/);
});

test("HTTPS with a certificate from Berth's local CA (served by the API, kept 0600), and HTTP/2", async () => {
  const pem = await d.api('GET', '/v1/ingress/ca.pem');
  assert.equal(pem.status, 200);
  ca = pem.body as string;
  assert.match(ca, /BEGIN CERTIFICATE/);
  const pki = join(d.dataDir, 'ingress', 'pki');
  assert.equal(statSync(join(pki, 'ca.key')).mode & 0o777, 0o600);
  assert.equal(readFileSync(join(pki, 'ca.crt'), 'utf8'), ca);
  const r = await eventually(() => getTls(httpsPort, HOST, ca), (x) => x.status === 200);
  assert.match(r.body, /^[AB] \/$/);
  assert.match(r.issuer, /Berth Local CA/);
  const h2 = await getH2(httpsPort, HOST, ca);
  assert.equal(h2.alpn, 'h2');
  assert.equal(h2.status, 200);
  assert.match(h2.body, /^[AB] \/h2$/);
  // The CLI prints the same certificate.
  const cli = spawnSync(process.execPath, [join(BERTHD, '..', '..', 'cli', 'main.js'), '--addr', d.addr, '--token', d.token, 'ingress', 'ca'], { encoding: 'utf8' });
  assert.equal(cli.status, 0, cli.stderr);
  assert.equal(cli.stdout, ca);
  const st = spawnSync(process.execPath, [join(BERTHD, '..', '..', 'cli', 'main.js'), '--addr', d.addr, '--token', d.token, 'ingress', 'status'], { encoding: 'utf8' });
  assert.equal(st.status, 0, st.stderr);
  assert.match(st.stdout, new RegExp(`ingress on; http 127\\.0\\.0\\.1:${httpPort}, https 127\\.0\\.0\\.1:${httpsPort}`));
  assert.match(st.stdout, /test\/web +web\.default\.berth\.localhost +2 +local/);
});

test('a dead backend costs no request: refused connections are retried on another replica', async () => {
  const dead = await freePort(); // nothing listens there
  await putRoutes([{ id: 'test/web', hosts: [HOST], backends: [{ address: '127.0.0.1', port: dead }, { address: '127.0.0.1', port: a.port }] }]);
  for (let i = 0; i < 10; i++) assert.equal((await get(httpPort, HOST)).status, 200);
  // A replica that dies between route updates: B is still in the route but refuses connections.
  await putRoutes([{ id: 'test/web', hosts: [HOST], backends: [{ address: '127.0.0.1', port: a.port }, { address: '127.0.0.1', port: b.port }] }]);
  const hitsA = a.hits;
  await b.kill();
  const results = await Promise.all(Array.from({ length: 30 }, (_, i) => get(httpPort, HOST, `/after-kill-${i}`)));
  assert.deepEqual(
    results.filter((r) => r.status !== 200),
    [],
  );
  assert.equal(a.hits - hitsA, 30);
  b = await new Backend('B').listen();
});

test('route changes do not drop in-flight requests', async () => {
  const slow = await new Backend('slow').listen();
  slow.server.removeAllListeners('request');
  slow.server.on('request', (_req, res) => setTimeout(() => res.end('slow done'), 1500));
  await putRoutes([{ id: 'test/web', hosts: [HOST], backends: [{ address: '127.0.0.1', port: slow.port }] }]);
  const inflight = get(httpPort, HOST, '/slow');
  await sleep(300);
  await putRoutes([{ id: 'test/web', hosts: [HOST], backends: [{ address: '127.0.0.1', port: a.port }] }]);
  assert.equal((await get(httpPort, HOST)).body, 'A /');
  const r = await inflight;
  assert.equal(r.status, 200);
  assert.equal(r.body, 'slow done');
  await slow.kill();
});

test('WebSockets are relayed both ways', async () => {
  await putRoutes([{ id: 'test/web', hosts: [HOST], backends: [{ address: '127.0.0.1', port: a.port }] }]);
  const r = await wsEcho(httpPort, HOST, 'ping through the ingress');
  assert.equal(r.status, 101);
  assert.equal(r.echoed, 'ping through the ingress');
});

test('an access token guards a route: 401 without, header or ?berth_token (then cookie) with', async () => {
  const token = 'sbx_0123456789abcdefXYZ';
  const host = '8080-box.default.berth.localhost';
  await putRoutes([
    { id: 'test/web', hosts: [HOST], backends: [{ address: '127.0.0.1', port: a.port }] },
    { id: 'sandbox/default/box/8080', hosts: [host], backends: [{ address: '127.0.0.1', port: b.port }], auth: { token } },
    { id: 'test/empty', hosts: ['empty.default.berth.localhost'], backends: [] },
  ]);
  const denied = await get(httpPort, host);
  assert.equal(denied.status, 401);
  assert.match(denied.body, /x-berth-token/);
  assert.equal((await get(httpPort, host, '/', { 'x-berth-token': 'wrong-token-0123456789' })).status, 401);
  const byHeader = await get(httpPort, host, '/h', { 'x-berth-token': token });
  assert.equal(byHeader.status, 200);
  assert.equal(b.lastHeaders['x-berth-token'], undefined, 'the token is not passed on to the backend');
  const byQuery = await get(httpPort, host, `/q?${'berth_token'}=${token}`);
  assert.equal(byQuery.status, 200);
  const cookie = String(byQuery.headers['set-cookie']?.[0] ?? '').split(';')[0]!;
  assert.equal(cookie, `berth_token=${token}`);
  assert.equal((await get(httpPort, host, '/c', { cookie: `other=1; ${cookie}` })).status, 200);
  const empty = await get(httpPort, 'empty.default.berth.localhost');
  assert.equal(empty.status, 503);
  assert.match(empty.body, /no ready backend/);
});

test('bad routes are refused with a clear 400 and change nothing', async () => {
  const before = (await d.api('GET', '/v1/ingress/routes')).body;
  for (const bad of [
    { id: 'x', hosts: ['*.wild.berth.localhost'], backends: [] },
    { id: 'x', hosts: ['ok.berth.localhost'], backends: [{ address: 'example.com', port: 80 }] },
    { id: 'x', hosts: ['ok.berth.localhost'], backends: [{ address: '127.0.0.1', port: 70000 }] },
    { id: 'x', hosts: ['ok.berth.localhost'], backends: [], auth: { token: 'short' } },
    { id: 'x', hosts: ['ok.berth.localhost'], backends: [], tls: 'acme' },
  ]) {
    const r = await d.api('PUT', '/v1/ingress/routes', { routes: [bad] });
    assert.equal(r.status, 400, JSON.stringify(r.body));
    assert.equal(r.body.error.code, 'invalid_argument');
  }
  const dup = await d.api('PUT', '/v1/ingress/routes', { routes: [{ id: 'x', hosts: ['h.berth.localhost'], backends: [] }, { id: 'y', hosts: ['h.berth.localhost'], backends: [] }] });
  assert.equal(dup.status, 400);
  assert.match(dup.body.error.message, /host h\.berth\.localhost is in two routes/);
  assert.deepEqual((await d.api('GET', '/v1/ingress/routes')).body, before);
});

/** A raw TCP exchange: connect, send, read until the peer closes (or timeoutMs). */
function tcpExchange(port: number, send: string, timeoutMs = 5000): Promise<string> {
  return new Promise((resolve, reject) => {
    const sock = connect({ host: '127.0.0.1', port });
    let got = '';
    const t = setTimeout(() => sock.destroy(new Error(`no answer on port ${port} within ${timeoutMs} ms`)), timeoutMs);
    sock.on('connect', () => sock.write(send));
    sock.on('data', (b) => (got += b.toString()));
    sock.on('close', () => {
      clearTimeout(t);
      resolve(got);
    });
    sock.on('error', (e) => {
      clearTimeout(t);
      reject(e);
    });
  });
}

test('a public tcp port: the ingress relays its host port to the ready replicas; host ports are checked; a busy port waits; deleted, nothing listens', { timeout: 120_000 }, async () => {
  const hostPort = await freePort();
  const S = '/v1/projects/default/services';
  // busybox httpd stands in for any tcp server: the relay carries the bytes as they are.
  const svc = (hp: number) => ({
    image: 'busybox',
    command: ['sh', '-c', 'mkdir -p /tmp/www && echo tcp-ok > /tmp/www/index.html; trap "exit 0" TERM; httpd -f -p 7000 -h /tmp/www & wait'],
    ports: [{ port: 7000, protocol: 'tcp', public: true, hostPort: hp }],
  });
  const c = await d.api('POST', S, { name: 'rawtcp', spec: svc(hostPort) });
  assert.equal(c.status, 201, JSON.stringify(c.body));
  const answer = await eventually(() => tcpExchange(hostPort, 'GET /index.html HTTP/1.0\r\n\r\n'), (x) => x.includes('tcp-ok'), 60_000);
  assert.match(answer, /^HTTP\/1\.[01] 200/);
  const st = (await d.api('GET', '/v1/ingress')).body;
  assert.deepEqual(st.routes.find((r: any) => r.id === 'service/default/rawtcp/tcp/7000'), { id: 'service/default/rawtcp/tcp/7000', hosts: [], backends: 1, tls: 'none', auth: false, tcpPort: hostPort });
  // The edge refuses what cannot be served, and changes nothing.
  for (const [spec, status, re] of [
    [{ ...svc(hostPort), ports: [{ port: 7000, protocol: 'tcp', public: true }] }, 400, /needs a hostPort/],
    [{ ...svc(hostPort), ports: [{ port: 7000, protocol: 'http', public: true, hostPort }] }, 400, /hostPort is for public tcp ports only/],
    [svc(hostPort), 409, new RegExp(`host port ${hostPort} is already published by service "rawtcp"`)],
    [svc(httpPort), 409, /is the ingress's HTTP port/],
  ] as const) {
    const r = await d.api('POST', S, { name: 'other', spec });
    assert.equal(r.status, status, JSON.stringify(r.body));
    assert.match(r.body.error.message, re);
  }
  assert.equal((await d.api('GET', `${S}/other`)).status, 404);
  // A host port another program holds: that route alone waits (the others keep serving), then serves once it is free.
  const blocker = createServer();
  const busy = await new Promise<number>((r) => blocker.listen(0, '127.0.0.1', () => r((blocker.address() as AddressInfo).port)));
  assert.equal((await d.api('POST', S, { name: 'waits', spec: svc(busy) })).status, 201);
  const rej = await eventually(async () => (await d.api('GET', '/v1/ingress')).body.rejected, (x: any[]) => x.some((r) => r.id === 'service/default/waits/tcp/7000'), 60_000);
  assert.match(rej.find((r: any) => r.id === 'service/default/waits/tcp/7000').reason, new RegExp(`host port ${busy} is in use by another program on this host`));
  assert.match(await tcpExchange(hostPort, 'GET /index.html HTTP/1.0\r\n\r\n'), /tcp-ok/);
  await new Promise((r) => blocker.close(r));
  assert.match(await eventually(() => tcpExchange(busy, 'GET /index.html HTTP/1.0\r\n\r\n'), (x) => x.includes('tcp-ok'), 30_000), /tcp-ok/);
  // Deleted: the listener goes with the service.
  for (const n of ['rawtcp', 'waits']) assert.equal((await d.api('DELETE', `${S}/${n}`)).status, 202);
  for (const p of [hostPort, busy]) await eventually(() => tcpExchange(p, '').then(() => 'open', (e: NodeJS.ErrnoException) => e.code ?? 'error'), (x) => x === 'ECONNREFUSED', 30_000);
  await eventually(async () => (await d.api('GET', S)).body.items.length, (n) => n === 0, 60_000);
});

test('kill -9 of berthd: the proxy keeps serving, the restarted berthd adopts it (no second proxy) and re-syncs', { timeout: 60_000 }, async () => {
  await putRoutes([{ id: 'test/web', hosts: [HOST], backends: [{ address: '127.0.0.1', port: a.port }] }]);
  const [pid] = proxyPids(d.dataDir);
  assert.ok(pid);
  await d.kill9();
  assert.equal((await get(httpPort, HOST)).body, 'A /', 'served while berthd is down');
  // What an older berthd left: the former Caddy data plane's folder.
  mkdirSync(join(d.dataDir, 'ingress', 'caddy', 'data'), { recursive: true });
  await d.start();
  assert.equal(existsSync(join(d.dataDir, 'ingress', 'caddy')), false, 'the old Caddy folder is removed');
  assert.deepEqual(proxyPids(d.dataDir), [pid]);
  const st = (await d.api('GET', '/v1/ingress')).body;
  assert.equal(st.proxy.adopted, true);
  assert.equal(st.proxy.pid, pid);
  assert.deepEqual(st.routes.map((r: { id: string }) => r.id), ['test/web']);
  await putRoutes([{ id: 'test/web', hosts: [HOST], backends: [{ address: '127.0.0.1', port: b.port }] }]);
  assert.equal((await get(httpPort, HOST)).body, 'B /');
});

test('a proxy that dies is restarted with the routes; a stale pid file naming another process is not signalled', { timeout: 60_000 }, async () => {
  const [pid] = proxyPids(d.dataDir);
  process.kill(pid!, 'SIGKILL');
  const r = await eventually(() => get(httpPort, HOST), (x) => x.status === 200 && x.body === 'B /', 15_000);
  assert.equal(r.body, 'B /');
  const [fresh] = proxyPids(d.dataDir);
  assert.ok(fresh && fresh !== pid);

  // Crash, then the pid in the file belongs to someone else (here: this test process).
  await d.kill9();
  process.kill(fresh, 'SIGKILL');
  while (proxyPids(d.dataDir).length) await sleep(20);
  writeFileSync(join(d.dataDir, 'ingress', 'haproxy.pid'), `${process.pid}\n`);
  await d.start(); // would kill this test process if it signalled by pid without checking
  assert.equal(proxyPids(d.dataDir).length, 1);
  assert.equal((await get(httpPort, HOST)).body, 'B /');

  // Crash, then restart with the ingress turned off: the orphaned proxy is stopped, not left.
  await d.kill9();
  assert.equal(proxyPids(d.dataDir).length, 1);
  const args = d.args;
  d.args = [];
  await d.start();
  assert.deepEqual(proxyPids(d.dataDir), []);
  const off = await d.api('PUT', '/v1/ingress/routes', { routes: [] });
  assert.equal(off.status, 412);
  assert.match(off.body.error.message, /the ingress is off/);
  await d.stop();
  assert.deepEqual(d.hostResidue(), []);
  d.args = args;
  await d.start();
  assert.equal((await eventually(() => get(httpPort, HOST), (x) => x.status === 200)).body, 'B /');
});

test('graceful stop stops the proxy and leaves no process or runtime file; the CA survives a restart', { timeout: 60_000 }, async () => {
  await d.stop();
  assert.deepEqual(d.hostResidue(), []);
  assert.deepEqual(proxyPids(d.dataDir), []);
  await assert.rejects(get(httpPort, HOST), /ECONNREFUSED/);
  await d.start();
  assert.equal((await d.api('GET', '/v1/ingress/ca.pem')).body, ca, 'the local CA is made once per data dir');
  const r = await eventually(() => getTls(httpsPort, HOST, ca), (x) => x.status === 200);
  assert.equal(r.body, 'B /');
  // Routes of a deleted owner leave nothing: neither the route nor its certificate.
  await putRoutes([]);
  assert.equal((await get(httpPort, HOST)).status, 404);
  assert.deepEqual(spawnSync('ls', [join(d.dataDir, 'ingress', 'certs', 'local')], { encoding: 'utf8' }).stdout.trim(), '');
});

test('bad ingress flags are rejected with clear errors', () => {
  const dir = mkdtempSync('/tmp/berth-test-');
  try {
    const cases: [string[], RegExp][] = [
      [['--ingress-http', 'nonsense'], /--ingress-http "nonsense" must be host:port/],
      [['--ingress-https', '127.0.0.1:99999'], /port 1-65535/],
      [['--ingress-http', '127.0.0.1:8080', '--ingress-https', '127.0.0.1:8080'], /different ports/],
      [['--base-domain', 'not a domain'], /--base-domain/],
      [['--acme-directory', 'https://127.0.0.1:1/dir'], /needs both --acme-directory URL and --acme-email/],
      [['--acme-directory', 'http://127.0.0.1:1/dir', '--acme-email', 'a@b.test'], /must be an https:\/\/ URL/],
      [['--acme-directory', 'https://127.0.0.1:1/dir', '--acme-email', 'a@b.test', '--acme-ca-root', '/nonexistent.pem'], /cannot be read/],
    ];
    for (const [args, re] of cases) {
      const r = spawnSync(process.execPath, [BERTHD, '--data-dir', dir, '--listen', '127.0.0.1:0', '--ingress-http', 'off', '--ingress-https', 'off', ...args], { encoding: 'utf8', timeout: 20_000 });
      assert.equal(r.status, 1, `${args.join(' ')}: ${r.stderr}`);
      assert.match(r.stderr, re);
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('an ingress port already in use stops berthd at start with the reason, leaving no proxy behind', { timeout: 60_000 }, async () => {
  const busy = createServer();
  await new Promise<void>((r) => busy.listen(0, '127.0.0.1', () => r()));
  const port = (busy.address() as AddressInfo).port;
  const e = new TestDaemon(mkdtempSync('/tmp/berth-test-'));
  e.args = ['--ingress-http', `127.0.0.1:${port}`];
  try {
    await assert.rejects(e.start(), /address already in use/);
    assert.deepEqual(proxyPids(e.dataDir), []);
    assert.deepEqual(e.hostResidue(), []);
  } finally {
    busy.close();
    await e.destroy();
  }
});

test('certificates from an ACME server (pebble on loopback, challenges validated against the ingress)', { timeout: 120_000 }, async () => {
  const pebble = new Pebble();
  const hp = await freePort();
  const sp = await freePort();
  const e = new TestDaemon(mkdtempSync('/tmp/berth-test-'));
  try {
    await pebble.start(hp, sp);
    e.args = ['--ingress-http', `127.0.0.1:${hp}`, '--ingress-https', `127.0.0.1:${sp}`, '--acme-directory', pebble.directory, '--acme-email', 'ops@berth.test', '--acme-ca-root', pebble.caFile];
    await e.start();
    const c = await new Backend('C').listen();
    const host = 'shop.example.test';
    const r0 = await e.api('PUT', '/v1/ingress/routes', { routes: [{ id: 'test/acme', hosts: [host], backends: [{ address: '127.0.0.1', port: c.port }], tls: 'acme' }] });
    assert.equal(r0.status, 200, JSON.stringify(r0.body));
    const root = await pebble.issuingRoot();
    const r = await eventually(() => getTls(sp, host, root), (x) => x.status === 200, 60_000);
    assert.equal(r.body, 'C /');
    assert.match(r.issuer, /Pebble/i);
    await c.kill();
  } finally {
    await e.destroy();
    await pebble.stop();
  }
  assert.deepEqual(proxyPids(e.dataDir), []);
});

test("DNS-discovered replicas (services): one that leaves Berth's DNS answer gets no request 1 s later; one that joins gets some; no reload", { timeout: 60_000 }, async () => {
  const port = await freePort();
  const hits = new Map<string, number[]>([['127.0.0.1', []], ['127.0.0.2', []]]);
  const servers = [...hits.keys()].map((ip) => http.createServer((_req, res) => (hits.get(ip)!.push(Date.now()), res.end(ip))));
  await Promise.all(servers.map((srv, i) => new Promise<void>((r) => srv.listen(port, [...hits.keys()][i], () => r()))));
  let ips = ['127.0.0.1', '127.0.0.2'];
  const log = pino({ level: 'silent' });
  const dns = new DnsServer((name) => (name === 'web.p.internal' ? ips : undefined), [], log);
  const dnsPort = await dns.listen('127.0.0.1', 0);
  const dir = mkdtempSync('/tmp/berth-test-');
  const hp = await freePort();
  const ing = new Ingress({ dir: join(dir, 'ingress'), settings: { http: { host: '127.0.0.1', port: hp }, https: undefined, baseDomain: 'berth.localhost', acme: undefined }, log });
  const host = 'web.p.berth.localhost';
  try {
    await ing.start();
    ing.register('services', () => [{ id: 'service/p/web', hosts: [host], backends: [], tls: 'none', dynamic: { name: 'web.p.internal', port, resolvers: [`127.0.0.1:${dnsPort}`], refreshMs: 500 } }]);
    await ing.sync();
    const master = ing.status().proxy.pid!;
    const workers = () => readFileSync(`/proc/${master}/task/${master}/children`, 'utf8').trim();
    const worker = workers();
    await eventually(() => get(hp, host), () => hits.get('127.0.0.1')!.length > 0 && hits.get('127.0.0.2')!.length > 0);
    // Leaves: requests keep succeeding, and none reaches it once 1 s has passed.
    ips = ['127.0.0.1'];
    const left = Date.now();
    while (Date.now() - left < 2500) assert.equal((await get(hp, host)).status, 200);
    const late = hits.get('127.0.0.2')!.filter((t) => t - left > 1000);
    assert.deepEqual(late, [], 'requests reached a replica more than 1 s after it left the DNS answer');
    console.log(`# the replica that left got its last request ${Math.max(0, ...hits.get('127.0.0.2')!.map((t) => t - left))} ms after it left`);
    // None left: 503 (within a few resolutions); back: served again.
    ips = [];
    await eventually(() => get(hp, host), (r) => r.status === 503, 3000);
    ips = ['127.0.0.1', '127.0.0.2'];
    const joined = Date.now();
    const before = hits.get('127.0.0.2')!.length;
    await eventually(() => get(hp, host), () => hits.get('127.0.0.2')!.length > before, 3000);
    console.log(`# a replica joining got its first request after ${Date.now() - joined} ms`);
    assert.equal(workers(), worker, 'replicas came and went without a reload');
  } finally {
    await ing.stop();
    dns.close();
    for (const srv of servers) srv.close();
    rmSync(dir, { recursive: true, force: true });
  }
  assert.deepEqual(spawnSync('pgrep', ['-f', dir]).stdout.toString().trim(), '');
});

test('busy-polling "auto": on under sustained load (a seamless reload, no failed request), off once the load is gone', { timeout: 60_000 }, async () => {
  const backend = await new Backend('busy').listen();
  const dir = mkdtempSync('/tmp/berth-test-');
  const hp = await freePort();
  const configFile = join(dir, 'ingress', 'haproxy.cfg');
  // The default policy (3 s at ≥ 2,000 req/s on, 30 s below 500 off) shortened for the test.
  const policy = { sampleMs: 200, onRps: 150, onSamples: 2, offRps: 20, offSamples: 5 };
  const ing = new Ingress({ dir: join(dir, 'ingress'), settings: { http: { host: '127.0.0.1', port: hp }, https: undefined, baseDomain: 'berth.localhost', acme: undefined }, log: pino({ level: 'silent' }), busyPollPolicy: policy });
  const host = 'busy.p.berth.localhost';
  try {
    await ing.start();
    ing.register('services', () => [{ id: 'service/p/busy', hosts: [host], backends: [{ address: '127.0.0.1', port: backend.port }], tls: 'none' }]);
    await ing.sync();
    assert.equal(readFileSync(configFile, 'utf8').includes('busy-polling'), false, 'idle: no busy-polling');
    assert.deepEqual(ing.status().proxy.busyPolling, { mode: 'auto', on: false });
    const master = ing.status().proxy.pid!;
    const workers = () => readFileSync(`/proc/${master}/task/${master}/children`, 'utf8').trim();
    const idleWorker = workers();
    // Load: 4 clients back to back until told to stop; every answer must be a 200 across the reloads.
    let stop = false;
    let sent = 0;
    const failures: string[] = [];
    const client = async () => {
      while (!stop) {
        const r = await get(hp, host).catch((e: Error) => ({ status: 0, body: e.message }));
        sent++;
        if (r.status !== 200) failures.push(`${r.status} ${r.body}`);
      }
    };
    const load = Promise.all([client(), client(), client(), client()]);
    await eventually(async () => ing.status().proxy.busyPolling.on, (on) => on, 15_000);
    await eventually(async () => readFileSync(configFile, 'utf8'), (c) => /^ {2}busy-polling$/m.test(c), 5_000);
    await eventually(async () => workers(), (w) => w !== '' && !w.split(' ').includes(idleWorker), 10_000);
    const busyWorker = workers();
    await sleep(500); // served by the busy-polling worker for a while
    stop = true;
    await load;
    assert.deepEqual(failures, [], 'no request failed while busy-polling turned on');
    assert.ok(sent > 100, `the load sent ${sent} requests`);
    // Load gone: off again after offSamples quiet samples (a second reload).
    await eventually(async () => ing.status().proxy.busyPolling.on, (on) => !on, 10_000);
    await eventually(async () => readFileSync(configFile, 'utf8'), (c) => !c.includes('busy-polling'), 5_000);
    await eventually(async () => workers(), (w) => w !== '' && w !== busyWorker, 10_000);
    assert.equal((await get(hp, host)).status, 200);
  } finally {
    await ing.stop();
    await backend.kill();
    rmSync(dir, { recursive: true, force: true });
  }
  assert.deepEqual(spawnSync('pgrep', ['-f', dir]).stdout.toString().trim(), '');
});
