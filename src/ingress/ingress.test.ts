// Unit tests of the ingress's pure parts: flags, route checks, the union of providers, and the
// Caddy config they produce. (The data plane itself is tested end to end in test/ingress.test.ts.)
import { test } from 'node:test';
import assert from 'node:assert/strict';
import pino from 'pino';
import { buildCaddyConfig } from './caddy-config.js';
import { Ingress } from './ingress.js';
import { routeProblems, settingsFromFlags, type IngressRoute } from './types.js';

const flags = { ingressHttp: '0.0.0.0:80', ingressHttps: '0.0.0.0:443', baseDomain: 'berth.localhost' };
const route = (id: string, hosts: string[], extra: Partial<IngressRoute> = {}): IngressRoute => ({ id, hosts, backends: [{ address: '10.88.0.2', port: 8080 }], tls: 'local', ...extra });

test('settingsFromFlags: listeners, off, base domain, ACME', () => {
  const s = settingsFromFlags({ ...flags, ingressHttp: 'off', baseDomain: 'Apps.Example.COM' });
  assert.equal(s.http, undefined);
  assert.deepEqual(s.https, { host: '0.0.0.0', port: 443 });
  assert.equal(s.baseDomain, 'apps.example.com');
  assert.deepEqual(settingsFromFlags({ ...flags, ingressHttp: '[::1]:8080' }).http, { host: '::1', port: 8080 });
  assert.throws(() => settingsFromFlags({ ...flags, ingressHttp: '80' }), /must be host:port/);
  assert.throws(() => settingsFromFlags({ ...flags, acmeEmail: 'a@b.test' }), /needs both/);
  assert.throws(() => settingsFromFlags({ ...flags, acmeDirectory: 'https://acme.test/dir', acmeEmail: 'nope' }), /not an e-mail/);
  assert.throws(() => settingsFromFlags({ ingressHttp: 'off', ingressHttps: 'off', baseDomain: 'b.test', acmeDirectory: 'https://acme.test/dir', acmeEmail: 'a@b.test' }), /needs an ingress listener/);
  assert.deepEqual(settingsFromFlags({ ...flags, acmeDirectory: 'https://acme.test/dir', acmeEmail: 'a@b.test' }).acme, { directory: 'https://acme.test/dir', email: 'a@b.test' });
});

test('routeProblems: each bad field is named with its fix', () => {
  assert.deepEqual(routeProblems(route('a', ['x.berth.localhost']), false), []);
  assert.match(routeProblems(route('a', ['X.berth.localhost']), false).join(), /lower-case DNS name/);
  assert.match(routeProblems(route('a', ['x.berth.localhost:80']), false).join(), /no port/);
  assert.match(routeProblems(route('a', []), false).join(), /at least one host/);
  assert.match(routeProblems(route('a', ['x.test'], { backends: [{ address: '::1', port: 1 }] }), false).join(), /IPv4/);
  assert.match(routeProblems(route('a', ['x.test'], { tls: 'acme' }), false).join(), /--acme-directory/);
  assert.deepEqual(routeProblems(route('a', ['x.test'], { tls: 'acme' }), true), []);
  assert.match(routeProblems(route('a', ['x.test'], { auth: { token: 'has space in it 1234' } }), false).join(), /auth\.token/);
});

test('the desired set is the union of providers; a host taken twice stays with the route that has it, else goes to the first id, the other is reported', () => {
  const ing = new Ingress({ dir: '/nonexistent', settings: settingsFromFlags(flags), log: pino({ level: 'silent' }) });
  ing.register('services', () => [route('service/p/web', ['web.p.berth.localhost']), route('service/p/api', ['api.p.berth.localhost', 'shop.test'])]);
  ing.register('sandboxes', () => [route('sandbox/p/box/8080', ['8080-box.p.berth.localhost']), route('service/p/shop', ['shop.test'])]);
  ing.register('broken', () => {
    throw new Error('store closed');
  });
  const { routes, rejected } = ing.desired();
  assert.deepEqual(routes.map((r) => r.id), ['sandbox/p/box/8080', 'service/p/api', 'service/p/web']);
  assert.deepEqual(rejected.map((r) => r.id), ['provider broken', 'service/p/shop']);
  assert.match(rejected[1]!.reason, /shop\.test \(owned by service\/p\/api\) already routed/);
  ing.unregister('broken');
  assert.equal(ing.desired().rejected.length, 1);
  assert.equal(ing.hostFor('web', 'p'), 'web.p.berth.localhost');
});

test('setRoutes: static routes cannot take a host a provider owns, and need the ingress on', async () => {
  const ing = new Ingress({ dir: '/nonexistent', settings: settingsFromFlags(flags), log: pino({ level: 'silent' }) });
  ing.register('services', () => [route('service/p/web', ['web.p.berth.localhost'])]);
  await assert.rejects(ing.setRoutes([route('static/x', ['web.p.berth.localhost'])]), /web\.p\.berth\.localhost is routed by service\/p\/web/);
  await ing.setRoutes([route('static/x', ['x.test'])]);
  assert.deepEqual(ing.staticRoutes().map((r) => r.id), ['static/x']);
  const off = new Ingress({ dir: '/nonexistent', settings: settingsFromFlags({ ...flags, ingressHttp: 'off', ingressHttps: 'off' }), log: pino({ level: 'silent' }) });
  await assert.rejects(off.setRoutes([route('static/x', ['x.test'])]), /the ingress is off/);
});

test('buildCaddyConfig: deterministic, tls none only on HTTP, ACME only for acme hosts, never a public CA by default', () => {
  const s = { ...settingsFromFlags(flags), acme: { directory: 'https://acme.test/dir', email: 'a@b.test' } };
  const paths = { adminSocket: '/d/admin.sock', storage: '/d/caddy' };
  const routes = [route('b', ['plain.test'], { tls: 'none' }), route('a', ['a.test']), route('c', ['c.test'], { tls: 'acme' })];
  const cfg = buildCaddyConfig(routes, s, paths) as any;
  assert.equal(JSON.stringify(cfg), JSON.stringify(buildCaddyConfig([...routes].reverse(), s, paths)));
  const hostsOf = (srv: string) => cfg.apps.http.servers[srv].routes.flatMap((r: any) => r.match?.[0].host ?? []);
  assert.deepEqual(hostsOf('http'), ['a.test', 'plain.test', 'c.test']);
  assert.deepEqual(hostsOf('https'), ['a.test', 'c.test']);
  const policies = cfg.apps.tls.automation.policies;
  assert.deepEqual(policies[0], { subjects: ['a.test'], issuers: [{ module: 'internal', ca: 'local' }] });
  assert.deepEqual(policies[1].subjects, ['c.test']);
  assert.equal(policies[1].issuers[0].ca, 'https://acme.test/dir');
  assert.deepEqual(policies.at(-1), { issuers: [{ module: 'internal', ca: 'local' }] });
  assert.equal(cfg.admin.listen, 'unix//d/admin.sock');
  assert.deepEqual([cfg.apps.http.http_port, cfg.apps.http.https_port], [80, 443]);
  const proxy = cfg.apps.http.servers.http.routes[0].handle[0];
  assert.equal(proxy.handler, 'reverse_proxy');
  assert.ok(proxy.load_balancing.try_duration, 'refused connections are retried on another backend');
});
