// Sandbox ports as preview URLs through the ingress (issue 6 "Ports"): a server inside a sandbox
// (deny-all egress, the default) is reached at https://<port>-<name>.<project>.<base-domain>/ with
// the sandbox's access token unless the port is public; a paused sandbox answers 503; routes go
// with the port and with the sandbox.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import type { TestDaemon } from './harness.js';
import { eventually, get, getTls, startWithIngress } from './ingress-helpers.js';
import { Sandbox } from '../sdk/src/index.js';

let d: TestDaemon;
let httpPort = 0;
let httpsPort = 0;
let tiers: string[] = [];

before(async () => {
  ({ d, httpPort, httpsPort } = await startWithIngress());
  tiers = (await d.api('GET', '/v1/info')).body.drivers.filter((x: any) => x.healthy).map((x: any) => x.isolation);
});
after(async () => {
  await d.deleteAllSandboxes().catch(() => undefined);
  await d.destroy();
});

/** eventually(), with the ingress's status and the sandbox's phase in the message if it times out. */
const served = <T>(name: string, f: () => Promise<T>, ok: (x: T) => boolean) =>
  eventually(f, ok, 20_000, async () => {
    const { proxy, routes, rejected, lastSyncAt, lastError } = (await d.api('GET', '/v1/ingress')).body;
    const s = await d.api('GET', `/v1/projects/default/sandboxes/${name}`);
    return { ingress: { proxy, routes, rejected, lastSyncAt, lastError }, sandbox: { phase: s.body.status?.phase, network: s.body.status?.network, ports: s.body.spec?.ports }, at: new Date().toISOString() };
  });

async function sh(name: string, cmd: string): Promise<void> {
  const res = await fetch(`${d.addr}/v1/projects/default/sandboxes/${name}/commands`, {
    method: 'POST',
    headers: { authorization: `Bearer ${d.token}`, 'content-type': 'application/json' },
    body: JSON.stringify({ cmd }),
  });
  const text = await res.text();
  assert.equal(res.status, 200, text);
  assert.match(text, /"exitCode":0/, text);
}

for (const tier of ['container', 'gvisor']) {
  test(`${tier}: a sandbox port as a preview URL, private then public, paused, removed`, { timeout: 120_000 }, async (t) => {
    if (!tiers.includes(tier)) return t.skip(`${tier} is not installed`);
    const name = `prev-${tier}`;
    const c = await d.api('POST', '/v1/projects/default/sandboxes?pool=none', { name, spec: { isolation: tier } });
    assert.equal(c.status, 201, JSON.stringify(c.body));
    assert.equal(c.body.spec.network, undefined, 'default network: egress deny-all');
    await sh(name, 'mkdir -p /tmp/www && echo preview-ok > /tmp/www/index.html && (httpd -p 3000 -h /tmp/www &)');

    const bad = await d.api('POST', `/v1/projects/default/sandboxes/${name}/ports`, { port: 0 });
    assert.equal(bad.status, 400);
    const exp = await d.api('POST', `/v1/projects/default/sandboxes/${name}/ports`, { port: 3000 });
    assert.equal(exp.status, 200, JSON.stringify(exp.body));
    const host = `3000-${name}.default.berth.localhost`;
    assert.equal(exp.body.url, `https://${host}:${httpsPort}/`);
    assert.equal(exp.body.public, false);
    const token: string = exp.body.token;
    assert.ok(token && token.length >= 16);

    // Private: no token → 401; header or query token → the sandbox's server, over HTTP and HTTPS.
    const denied = await served(name, () => get(httpPort, host), (r) => r.status === 401);
    assert.doesNotMatch(denied.body, /preview-ok/);
    const ok = await served(name, () => get(httpPort, host, '/index.html', { 'x-berth-token': token }), (r) => r.status === 200);
    assert.equal(ok.body, 'preview-ok\n');
    assert.equal((await get(httpPort, host, `/index.html?berth_token=${token}`)).status, 200);
    assert.equal((await get(httpPort, host, '/index.html', { 'x-berth-token': 'x'.repeat(32) })).status, 401);
    const ca = (await d.api('GET', '/v1/ingress/ca.pem')).body as string;
    const tls = await served(name, () => getTls(httpsPort, host, ca, `/index.html?berth_token=${token}`), (r) => r.status === 200);
    assert.equal(tls.body, 'preview-ok\n');

    // Public: no token needed; listed once.
    assert.equal((await d.api('POST', `/v1/projects/default/sandboxes/${name}/ports`, { port: 3000, public: true })).status, 200);
    await served(name, () => get(httpPort, host, '/index.html'), (r) => r.status === 200 && r.body === 'preview-ok\n');
    const list = await d.api('GET', `/v1/projects/default/sandboxes/${name}/ports`);
    assert.deepEqual(list.body.items.map((p: any) => [p.port, p.public, p.token]), [[3000, true, undefined]]);

    // Paused: no backend (503); resumed: served again.
    assert.equal((await d.api('POST', `/v1/projects/default/sandboxes/${name}/pause`)).status, 200);
    await served(name, () => get(httpPort, host, '/index.html'), (r) => r.status === 503);
    assert.equal((await d.api('POST', `/v1/projects/default/sandboxes/${name}/resume`)).status, 200);
    await served(name, () => get(httpPort, host, '/index.html'), (r) => r.status === 200);

    // The SDK's view of the same (sandbox.ports), then removed: the ingress no longer knows the host.
    const sbx = await Sandbox.connect(name, { apiUrl: d.addr, apiKey: d.token });
    assert.deepEqual((await sbx.ports.list()).map((p) => [p.port, p.public, p.url]), [[3000, true, exp.body.url]]);
    await sbx.ports.remove(3000);
    assert.equal((await d.api('DELETE', `/v1/projects/default/sandboxes/${name}/ports/3000`)).status, 404);
    await served(name, () => get(httpPort, host, '/index.html'), (r) => r.status !== 200 && r.status !== 503);
    assert.equal((await d.api('POST', `/v1/projects/default/sandboxes/${name}/ports`, { port: 3000 })).status, 200);
    assert.equal((await d.api('DELETE', `/v1/projects/default/sandboxes/${name}`)).status, 202);
    await d.deleteAllSandboxes();
    const st = await d.api('GET', '/v1/ingress');
    assert.deepEqual(st.body.routes.filter((r: any) => r.id.includes(name)), [], 'routes go with the sandbox');
    // (The proxy itself lives as long as berthd.)
    assert.deepEqual(d.hostResidue().filter((x) => !/^(proxy process|ingress )/.test(x)), []);
  });
}
