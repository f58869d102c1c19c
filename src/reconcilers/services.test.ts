// The pieces of the service reconciler that need no host: template hashing, the implied readiness
// check, and the two hooks berthd hands to the ingress and to DNS (pure functions of the store).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { openDatabase } from '../store/db.js';
import { ResourceStore } from '../store/resources.js';
import { ServiceSpec } from '../api/schemas.js';
import pino from 'pino';
import { DriverRegistry } from '../core/driver.js';
import { HealthProber } from './prober.js';
import { WORKLOAD } from './workloads.js';
import { SERVICE, makeServiceReconciler, effectiveChecks, initialServiceStatus, serviceNameProvider, serviceRoutes, serviceTemplate, templateHash, withTemplate, type StoredServiceStatus } from './services.js';

function withStore(f: (s: ResourceStore) => void) {
  const dir = mkdtempSync('/tmp/berth-svc-');
  const db = openDatabase(join(dir, 'state.db'));
  try {
    f(new ResourceStore(db));
  } finally {
    db.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

const parse = (x: unknown) => ServiceSpec.parse(x);

test('template: replicas, deploy and domains are not part of it; key order does not matter', () => {
  const a = parse({ image: 'busybox', env: { A: '1', B: '2' }, ports: [{ port: 80 }], replicas: 2 });
  const b = parse({ image: 'busybox', env: { B: '2', A: '1' }, ports: [{ port: 80 }], replicas: 5, deploy: { maxSurge: 3 }, domains: ['x.example.com'] });
  assert.equal(templateHash(serviceTemplate(a)), templateHash(serviceTemplate(b)));
  const c = parse({ image: 'busybox', env: { A: '1', B: '3' }, ports: [{ port: 80 }] });
  assert.notEqual(templateHash(serviceTemplate(a)), templateHash(serviceTemplate(c)));
  // Rolling back to a's template keeps b's replicas and deploy settings, drops fields a lacks.
  const back = withTemplate({ ...b, command: ['x'] }, serviceTemplate(a));
  assert.equal(back.replicas, 5);
  assert.equal(back.deploy.maxSurge, 3);
  assert.equal(back.command, undefined);
  assert.deepEqual(back.env, { A: '1', B: '2' });
});

test('readiness: given, implied TCP on the first port, or none', () => {
  assert.deepEqual(effectiveChecks(parse({ image: 'busybox', ports: [{ port: 8080 }, { port: 9090, protocol: 'tcp' }] })).readiness?.tcp, { port: 8080 });
  assert.equal(effectiveChecks(parse({ image: 'busybox' })).readiness, undefined);
  const own = effectiveChecks(parse({ image: 'busybox', ports: [{ port: 8080 }], healthChecks: { readiness: { http: { path: '/ready', port: 8080 } } } }));
  assert.deepEqual(own.readiness?.http, { path: '/ready', port: 8080 });
  assert.equal(own.readiness?.periodMs, 5000);
});

test('ports: a public tcp port without hostPort, a hostPort elsewhere or twice, and a second public http port are refused with the fix in the message', () => {
  const tcp = ServiceSpec.safeParse({ image: 'busybox', ports: [{ port: 5432, protocol: 'tcp', public: true }] });
  assert.equal(tcp.success, false);
  assert.deepEqual(tcp.error!.issues[0]!.path, ['ports', 0, 'hostPort']);
  assert.match(tcp.error!.issues[0]!.message, /public tcp port 5432 needs a hostPort.*"hostPort": 5432.*<service>:5432/);
  assert.equal(ServiceSpec.safeParse({ image: 'busybox', ports: [{ port: 5432, protocol: 'tcp', public: true, hostPort: 15432 }] }).success, true);
  for (const [ports, re] of [
    [[{ port: 80, hostPort: 8080 }], /hostPort is for public tcp ports only/],
    [[{ port: 5432, protocol: 'tcp', hostPort: 15432 }], /hostPort is for public tcp ports only/],
    [[{ port: 1, protocol: 'tcp', public: true, hostPort: 9000 }, { port: 2, protocol: 'tcp', public: true, hostPort: 9000 }], /hostPort 9000 is given to two ports/],
  ] as const) {
    const r = ServiceSpec.safeParse({ image: 'busybox', ports });
    assert.equal(r.success, false, JSON.stringify(ports));
    assert.match(r.error!.issues[0]!.message, re);
  }
  const two = ServiceSpec.safeParse({ image: 'busybox', ports: [{ port: 80, public: true }, { port: 81, public: true }, { port: 82 }] });
  assert.equal(two.success, false);
  assert.match(two.error!.issues[0]!.message, /keep 80 public and set public: false on 81/);
  assert.equal(ServiceSpec.safeParse({ image: 'busybox', ports: [{ port: 80, public: true }, { port: 81 }, { port: 5432, protocol: 'tcp' }] }).success, true);
});

test('routes and DNS: ready replicas only; public http ports only; base domain and custom domains', () => {
  withStore((store) => {
    const mk = (name: string, spec: unknown, ready: boolean[], project = 'default') => {
      const s = store.create(SERVICE, { project, name, spec: parse(spec), status: initialServiceStatus() });
      const st: StoredServiceStatus = {
        ...initialServiceStatus(),
        instances: ready.map((r, i) => ({ id: `w${i}`, name: `${name}-1-${i}`, revision: 1, phase: 'running', ip: `10.0.0.${i + 2}`, ready: r, restartCount: 0 })),
      };
      store.updateStatus(s.id, st);
    };
    mk('web', { image: 'busybox', ports: [{ port: 8080, public: true }], domains: ['www.example.com'] }, [true, false, true]);
    mk('db', { image: 'busybox', ports: [{ port: 5432, protocol: 'tcp' }] }, [true]);
    mk('internal', { image: 'busybox', ports: [{ port: 80 }] }, [true]);
    mk('web', { image: 'busybox', ports: [{ port: 9000, protocol: 'tcp' }, { port: 80, public: true }] }, [false], 'other');
    mk('pg', { image: 'busybox', ports: [{ port: 5432, protocol: 'tcp', public: true, hostPort: 15432 }] }, [true, false], 'other');
    const routes = serviceRoutes(store, (name, project) => `${name}.${project}.apps.test`);
    assert.deepEqual(routes, [
      { id: 'service/default/web', hosts: ['web.default.apps.test', 'www.example.com'], backends: [{ address: '10.0.0.2', port: 8080 }, { address: '10.0.0.4', port: 8080 }], tls: 'local' },
      { id: 'service/other/pg/tcp/5432', hosts: [], tcpPort: 15432, tls: 'none', backends: [{ address: '10.0.0.2', port: 5432 }] },
      { id: 'service/other/web', hosts: ['web.other.apps.test'], backends: [], tls: 'local' },
    ]);
    // With the project's DNS known the proxy follows the replicas by name; with ACME, custom
    // domains get a route of their own with publicly trusted certificates.
    const withDns = serviceRoutes(store, (name, project) => `${name}.${project}.apps.test`, (p) => (p === 'default' ? '10.0.0.1:53' : undefined), true);
    assert.deepEqual(withDns[0]!.dynamic, { name: 'web.default.internal', port: 8080, resolvers: ['10.0.0.1:53'], refreshMs: 500 });
    assert.deepEqual(withDns[0]!.hosts, ['web.default.apps.test']);
    assert.deepEqual([withDns[1]!.id, withDns[1]!.hosts, withDns[1]!.tls], ['service/default/web/domains', ['www.example.com'], 'acme']);
    assert.equal(withDns[2]!.dynamic, undefined, 'no DNS for that project yet: static backends');
    const dns = serviceNameProvider(store);
    assert.deepEqual(dns('default', 'web'), ['10.0.0.2', '10.0.0.4']);
    assert.deepEqual(dns('other', 'web'), []);
    assert.equal(dns('default', 'nothing'), undefined, 'not a service: other sources answer');
  });
});

test('reconciler: replicas as owned workloads, one revision per template, the ingress told when its view changes', async () => {
  const dir = mkdtempSync('/tmp/berth-svc-');
  const db = openDatabase(join(dir, 'state.db'));
  const store = new ResourceStore(db);
  const log = pino({ level: 'silent' });
  const prober = new HealthProber({ store, drivers: new DriverRegistry(), log, onChange: () => undefined });
  let told = 0;
  const reconcile = makeServiceReconciler({ store, prober, log, onRoutesChanged: () => told++ });
  try {
    const s = store.create(SERVICE, { project: 'default', name: 'web', spec: parse({ image: 'busybox', replicas: 2, ports: [{ port: 80, public: true }] }), status: initialServiceStatus() });
    await reconcile(s.id);
    const kids = () => store.list(WORKLOAD, { ownerId: s.id }).items;
    assert.equal(kids().length, 2);
    assert.deepEqual(kids().map((k) => k.labels), [{ 'berth.dev/service': 'web', 'berth.dev/revision': '1' }, { 'berth.dev/service': 'web', 'berth.dev/revision': '1' }]);
    assert.equal(told, 1, 'first look at the service');
    await reconcile(s.id);
    assert.equal(kids().length, 2, 'no duplicates');
    assert.equal(told, 1, 'nothing changed');
    const cur = store.getById<ServiceSpec, StoredServiceStatus>(s.id)!;
    store.updateSpec(s.id, { spec: { ...cur.spec, domains: ['www.example.com'], replicas: 3 } });
    await reconcile(s.id);
    assert.equal(told, 2, 'a new domain changes the routes');
    assert.equal(kids().length, 3);
    assert.equal(store.getById<ServiceSpec, StoredServiceStatus>(s.id)!.status.revisions.length, 1, 'replicas and domains are no new revision');
    store.markForDeletion(s.id);
    await reconcile(s.id);
    assert.ok(kids().every((k) => k.deletionRequestedAt), 'every replica is being deleted');
    for (const k of kids()) store.remove(k.id);
    await reconcile(s.id);
    assert.equal(store.getById(s.id), undefined);
    assert.equal(told, 3);
  } finally {
    prober.close();
    db.close();
    rmSync(dir, { recursive: true, force: true });
  }
});
