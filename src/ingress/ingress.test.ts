// Unit tests of the ingress's pure parts: flags, route checks, the union of providers, and the
// HAProxy config they produce. (The data plane itself is tested end to end in test/ingress.test.ts.)
import { test } from 'node:test';
import assert from 'node:assert/strict';
import pino from 'pino';
import { backendName, buildHaproxyConfig, quoteLf, tcpPortsIn } from './haproxy-config.js';
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

const paths = { workerSocket: '/d/worker.sock', hostsMap: '/d/hosts.map', tlsHostsMap: '/d/hosts-tls.map', crtList: '/d/crt-list', defaultCert: '/d/certs/default.pem', acmeSocket: '/d/acme.sock' };

test('buildHaproxyConfig: deterministic; tls none only on HTTP; certificates only for hosts that have one; ACME challenges routed to berthd', () => {
  const s = { ...settingsFromFlags(flags), acme: { directory: 'https://acme.test/dir', email: 'a@b.test' } };
  const routes = [route('b', ['plain.test'], { tls: 'none' }), route('a', ['a.test', 'www.a.test']), route('c', ['c.test'], { tls: 'acme' })];
  const certs = new Map([['a.test', '/d/certs/local/a.test.pem'], ['www.a.test', '/d/certs/local/www.a.test.pem'], ['plain.test', '/x.pem']]);
  const f = buildHaproxyConfig(routes, s, paths, { threads: 1 }, certs);
  assert.deepEqual(f, buildHaproxyConfig([...routes].reverse(), s, paths, { threads: 1 }, new Map([...certs].reverse())));
  const [ra, rb, rc] = ['a', 'b', 'c'].map(backendName);
  assert.equal(f.hostsMap, `a.test ${ra}\nc.test ${rc}\nplain.test ${rb}\nwww.a.test ${ra}\n`);
  assert.equal(f.tlsHostsMap, `a.test ${ra}\nc.test ${rc}\nwww.a.test ${ra}\n`);
  // A route's backend keeps its name when other routes come and go (the server state saved across a reload is matched by it).
  assert.equal(buildHaproxyConfig(routes.slice(1), s, paths, { threads: 1 }, certs).hostsMap, `a.test ${ra}\nc.test ${rc}\nwww.a.test ${ra}\n`);
  assert.match(ra!, /^r[0-9a-f]{12}$/);
  assert.notEqual(ra, rb);
  // plain.test is tls none (no certificate even if a file exists); c.test has no ACME certificate yet.
  assert.equal(f.crtList, '/d/certs/local/a.test.pem a.test\n/d/certs/local/www.a.test.pem www.a.test\n');
  assert.match(f.config, /^ {2}bind 0\.0\.0\.0:80$/m);
  assert.match(f.config, /^ {2}bind 0\.0\.0\.0:443 ssl crt \/d\/certs\/default\.pem crt-list \/d\/crt-list alpn h2,http\/1\.1$/m);
  assert.match(f.config, /use_backend acme_challenge if \{ path_beg \/\.well-known\/acme-challenge\/ \}/);
  assert.match(f.config, /server berthd unix@\/d\/acme\.sock/);
  assert.match(f.config, /^ {2}nbthread 1$/m);
  // A refused connection is retried on another server.
  assert.match(f.config, /^ {2}retries \d+$/m);
  assert.match(f.config, /^ {2}option redispatch 1$/m);
  assert.match(f.config, /^ {2}retry-on conn-failure$/m); // not L7 retries: they would replay a POST a replica got
  assert.match(f.config, /^ {2}server s0 10\.88\.0\.2:8080 check /m);
  const noAcme = buildHaproxyConfig(routes.slice(0, 2), settingsFromFlags({ ...flags, ingressHttps: 'off' }), paths, { threads: 2 }, certs);
  assert.doesNotMatch(noAcme.config, /acme|frontend https/);
  assert.match(noAcme.config, /nbthread 2/);
});

test('buildHaproxyConfig: empty route answers 503, token guard, per-replica limit, DNS-discovered replicas', () => {
  const s = settingsFromFlags(flags);
  const token = 'sbx_0123456789abcdefXYZ';
  const routes = [
    route('p/empty "x" 100%', ['empty.test'], { backends: [] }),
    route('p/guarded', ['g.test'], { auth: { token } }),
    route('p/svc', ['svc.test'], { maxConnsPerBackend: 8, dynamic: { name: 'web.p.internal', port: 8080, resolvers: ['10.88.0.1:53'], refreshMs: 500 } }),
  ];
  const { config } = buildHaproxyConfig(routes, s, paths, { threads: 1 }, new Map());
  assert.match(config, /http-request return status 503 .*\(route p\/empty \\"x\\" 100%%\)/);
  assert.match(config, new RegExp(`acl tok_hdr req.hdr\\(x-berth-token\\) -m str ${token}`));
  assert.match(config, /http-request return status 401 .* unless tok_hdr \|\| tok_cookie \|\| tok_query/);
  assert.match(config, new RegExp(`Set-Cookie "berth_token=${token}; Path=/; HttpOnly; SameSite=Lax"`));
  assert.match(config, /^ {2}http-request del-header x-berth-token$/m);
  assert.match(config, /^resolvers dns0\n {2}nameserver ns0 10\.88\.0\.1:53$/m);
  assert.match(config, /^ {2}timeout resolve 500ms$/m);
  assert.match(config, /server-template s 1-\d+ web\.p\.internal:8080 resolvers dns0 resolve-prefer ipv4 init-addr none maxconn 8 check/);
  // With a server-state file: the state saved before a reload is loaded, and the addresses in it are used first.
  const withState = buildHaproxyConfig(routes, s, { ...paths, serverState: '/d/server-state' }, { threads: 1 }, new Map()).config;
  assert.match(withState, /^ {2}server-state-file \/d\/server-state$/m);
  // Only DNS-discovered servers take their saved state: a static server's address comes from the config
  // (a route whose backend changed must not get the old address back from the file).
  assert.match(withState, /^ {2}balance roundrobin\n {2}load-server-state-from-file global\n {2}server-template /m);
  assert.equal(withState.match(/load-server-state-from-file/g)?.length, routes.filter((r) => r.dynamic).length);
  assert.match(withState, /server-template s 1-\d+ web\.p\.internal:8080 resolvers dns0 resolve-prefer ipv4 init-addr last,none maxconn 8 check/);
  assert.equal(quoteLf('a\nb"c\\d%e'), 'ab\\"c\\\\d%%e');
});

test('routeProblems: maxConnsPerBackend must be a positive integer', () => {
  assert.deepEqual(routeProblems(route('a', ['x.test'], { maxConnsPerBackend: 8 }), false), []);
  assert.match(routeProblems(route('a', ['x.test'], { maxConnsPerBackend: 0 }), false).join(), /maxConnsPerBackend/);
});

test('tcp routes: a listener on the HTTP listener\'s address relaying as is; one route per host port, not the ingress\'s own', () => {
  const tcp = (id: string, port: number, extra: Partial<IngressRoute> = {}) => route(id, [], { tls: 'none', tcpPort: port, ...extra });
  assert.deepEqual(routeProblems(tcp('t', 15432), false), []);
  assert.match(routeProblems(tcp('t', 70000), false).join(), /tcpPort 70000 must be 1-65535/);
  assert.match(routeProblems(tcp('t', 15432, { hosts: ['x.test'] }), false).join(), /no hosts/);
  assert.match(routeProblems(tcp('t', 15432, { tls: 'local' }), false).join(), /tls "none"/);
  const s = settingsFromFlags({ ...flags, ingressHttp: '127.0.0.1:8080' });
  const dyn = { name: 'db.p.internal', port: 5432, resolvers: ['10.88.0.1:53'], refreshMs: 500 };
  const { config, hostsMap } = buildHaproxyConfig([tcp('service/p/db/tcp/5432', 15432, { dynamic: dyn }), route('service/p/web', ['web.test'])], s, paths, { threads: 1 }, new Map());
  const [db, web] = ['service/p/db/tcp/5432', 'service/p/web'].map(backendName) as [string, string];
  assert.match(config, new RegExp(`^frontend t${db.slice(1)}\\n {2}mode tcp\\n {2}bind 127\\.0\\.0\\.1:15432\\n {2}timeout client 1h\\n {2}default_backend ${db}$`, 'm'));
  const back = config.slice(config.indexOf(`\nbackend ${db}`) + 1);
  assert.match(back, new RegExp(`^backend ${db}\\n {2}# route service\\/p\\/db\\/tcp\\/5432\\n {2}mode tcp\\n {2}timeout server 1h\\n`));
  assert.match(back, /server-template s 1-\d+ db\.p\.internal:5432 resolvers dns0/);
  assert.doesNotMatch(back.slice(0, back.indexOf('\nbackend ')), /http-request/);
  assert.equal(hostsMap, `web.test ${web}\n`);
  assert.deepEqual(tcpPortsIn(config), [15432]); // what berthd reads back from a proxy it adopts
  const ing = new Ingress({ dir: '/nonexistent', settings: s, log: pino({ level: 'silent' }) });
  ing.register('services', () => [tcp('service/p/a/tcp/1', 15432), tcp('service/p/b/tcp/1', 15432), tcp('service/p/c/tcp/1', 8080), tcp('service/p/d/tcp/1', 443)]);
  const { routes, rejected } = ing.desired();
  assert.deepEqual(routes.map((r) => r.id), ['service/p/a/tcp/1']);
  assert.deepEqual(rejected.map((r) => [r.id, r.reason]), [
    ['service/p/b/tcp/1', 'host port 15432 is already used by route service/p/a/tcp/1; choose another hostPort'],
    ['service/p/c/tcp/1', "host port 8080 is already used by the ingress's HTTP listener; choose another hostPort"],
    ['service/p/d/tcp/1', "host port 443 is already used by the ingress's HTTPS listener; choose another hostPort"],
  ]);
});
