// The ingress: HTTP/HTTPS entry point that routes Host names to workload backends (and relays the
// host ports of services' public tcp ports).
// The desired set of routes is the union of what registered providers return (services own
// theirs, sandboxes theirs); sync() computes it and hands the whole set to the data plane
// (HAProxy, chosen on measurements: see BENCHMARKS.md "Ingress"). Level-triggered and idempotent:
// an unchanged set is not reloaded, a failed apply is retried, and a proxy that died or was left
// by a crashed berthd is restarted or adopted and gets the full set again.
import { existsSync, mkdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { dirname, join } from 'node:path';
import type { Logger } from 'pino';
import { conflict, failedPrecondition, invalidArgument, unavailable } from '../core/errors.js';
import { sleep } from '../lib/exec.js';
import { AcmeIssuer } from './acme.js';
import { CertStore } from './certs.js';
import { BusyPollGovernor, type BusyPollMode, type BusyPollPolicy } from './busypoll.js';
import { buildHaproxyConfig, tcpPortsIn, type HaproxyFiles } from './haproxy-config.js';
import { HaproxyProcess } from './haproxy-process.js';
import { routeProblems, tcpListenHost, type IngressRoute, type IngressSettings } from './types.js';

export type RouteProvider = () => IngressRoute[];

export interface IngressOptions {
  /** Directory for the proxy's state: <dataDir>/ingress. */
  dir: string;
  settings: IngressSettings;
  log: Logger;
  /** HAProxy binary (default $BERTH_HAPROXY or `haproxy` on PATH). */
  haproxyBin?: string;
  /** HAProxy worker threads (default 1: measured best on a 2-core host, BENCHMARKS.md "Ingress"). */
  threads?: number;
  /** How often the proxy process is checked (and restarted if it died). */
  watchMs?: number;
  /** Where setRoutes() keeps the static routes across restarts (default: not kept). */
  staticFile?: string;
  /** When busy-polling turns on and off in mode "auto" (default DEFAULT_BUSY_POLL_POLICY; tests shorten it). */
  busyPollPolicy?: BusyPollPolicy;
}

export interface IngressStatus {
  enabled: boolean;
  http: string | null;
  https: string | null;
  baseDomain: string;
  acme: { directory: string; email: string } | null;
  proxy: { kind: 'haproxy'; pid: number | null; running: boolean; adopted: boolean; busyPolling: { mode: BusyPollMode; on: boolean } };
  routes: { id: string; hosts: string[]; backends: number; tls: string; auth: boolean; tcpPort?: number }[];
  /** Routes left out of the applied set, with the reason (bad field, host already taken). */
  rejected: { id: string; reason: string }[];
  lastSyncAt: string | null;
  lastError: string | null;
}

const STATIC = 'static';

export class Ingress {
  private readonly providers = new Map<string, RouteProvider>();
  private readonly proxy: HaproxyProcess;
  private readonly certs: CertStore;
  private readonly acme: AcmeIssuer | undefined;
  private applied: string | undefined;
  private appliedRoutes: IngressRoute[] = [];
  private rejected: { id: string; reason: string }[] = [];
  private lastSyncAt: Date | undefined;
  private lastError: string | undefined;
  private syncing: Promise<void> | undefined;
  private pending: Promise<void> | undefined;
  private started = false;
  private watch: NodeJS.Timeout | undefined;
  private retry: NodeJS.Timeout | undefined;
  private readonly governor: BusyPollGovernor;
  private governorTimer: NodeJS.Timeout | undefined;

  constructor(readonly opts: IngressOptions) {
    this.proxy = new HaproxyProcess(opts.dir, opts.haproxyBin ?? process.env.BERTH_HAPROXY ?? 'haproxy', opts.log);
    this.certs = new CertStore(opts.dir);
    this.governor = new BusyPollGovernor(opts.busyPollPolicy);
    const acme = opts.settings.acme;
    this.acme = acme ? new AcmeIssuer(acme, opts.dir, this.proxy.paths.acmeSocket, this.certs, opts.log, () => void this.sync().catch(() => undefined)) : undefined;
    if (opts.staticFile && existsSync(opts.staticFile)) {
      const routes = JSON.parse(readFileSync(opts.staticFile, 'utf8')) as IngressRoute[];
      this.providers.set(STATIC, () => routes);
    }
    this.proxy.onExit(() => {
      if (!this.started) return;
      this.applied = undefined;
      void this.sync().catch(() => undefined);
    });
  }

  get enabled(): boolean {
    return Boolean(this.opts.settings.http || this.opts.settings.https);
  }

  /** The name an ingress gives a service by default: `<service>.<project>.<baseDomain>`. */
  hostFor(...labels: string[]): string {
    return [...labels, this.opts.settings.baseDomain].join('.').toLowerCase();
  }

  /**
   * Start the proxy (or adopt the one a crashed berthd left) and apply the current desired set.
   * When the ingress is off, a proxy left by an earlier run with the ingress on is stopped.
   */
  async start(): Promise<void> {
    if (!this.enabled) {
      await this.proxy.stop();
      return;
    }
    this.started = true;
    // Berth before HAProxy ran Caddy, with its state in <dir>/caddy: nothing reads it any more.
    rmSync(join(this.opts.dir, 'caddy'), { recursive: true, force: true });
    try {
      await this.sync();
    } catch (e) {
      await this.stop(); // no proxy is left behind by a start that failed
      throw unavailable(`the ingress did not start: ${(e as Error).message}`);
    }
    this.watch = setInterval(() => {
      if (!this.proxy.running()) {
        this.applied = undefined;
        void this.sync().catch(() => undefined);
      }
    }, this.opts.watchMs ?? 2_000);
    this.watch.unref();
    if (this.busyPollMode === 'auto') this.governBusyPolling();
  }

  /** Mode "auto": read the proxy's request counter every sampleMs; a flip of the decision re-renders and reloads. */
  private governBusyPolling(): void {
    const next = () => {
      this.governorTimer = setTimeout(() => void tick(), this.governor.policy.sampleMs);
      this.governorTimer.unref();
    };
    const tick = async () => {
      if (!this.started) return;
      if (this.proxy.running() && this.governor.sample(await this.proxy.requestCount(), Date.now())) {
        this.opts.log.info({ busyPolling: this.governor.busy }, `ingress: busy-polling ${this.governor.busy ? 'on (sustained load)' : 'off (load gone)'}`);
        await this.sync().catch(() => undefined);
      }
      if (this.started) next();
    };
    next();
  }

  private get busyPollMode(): BusyPollMode {
    return this.opts.settings.busyPolling ?? 'auto';
  }

  private busyPolling(): boolean {
    return this.busyPollMode === 'on' || (this.busyPollMode === 'auto' && this.governor.busy);
  }

  /** Stop the proxy and remove its runtime files. */
  async stop(): Promise<void> {
    this.started = false;
    clearInterval(this.watch);
    clearTimeout(this.retry);
    clearTimeout(this.governorTimer);
    await this.syncing?.catch(() => undefined);
    await this.acme?.close();
    await this.proxy.stop();
    this.applied = undefined;
  }

  /** A provider owns a share of the routes; the desired set is the union over providers. */
  register(name: string, provider: RouteProvider): void {
    this.providers.set(name, provider);
  }

  unregister(name: string): void {
    this.providers.delete(name);
  }

  /** The static routes (set with setRoutes). */
  staticRoutes(): IngressRoute[] {
    return this.providers.get(STATIC)?.() ?? [];
  }

  /** Replace the routes not owned by any provider (a static provider, kept in opts.staticFile) and apply. */
  async setRoutes(routes: IngressRoute[]): Promise<void> {
    const bad = routes.flatMap((r) => routeProblems(r, Boolean(this.opts.settings.acme)).map((p) => `route ${r.id || '(no id)'}: ${p}`));
    if (bad.length) throw invalidArgument(bad.join('; '));
    const ids = new Set(routes.map((r) => r.id));
    if (ids.size !== routes.length) throw invalidArgument('two routes have the same id; give each route its own id');
    const hosts = routes.flatMap((r) => r.hosts);
    const dup = hosts.find((h, i) => hosts.indexOf(h) !== i);
    if (dup) throw invalidArgument(`host ${dup} is in two routes; a host belongs to one route`);
    const others = [...this.providers].filter(([name]) => name !== STATIC).flatMap(([, f]) => safely(f));
    const owner = new Map(others.flatMap((r) => r.hosts.map((h) => [h, r.id] as const)));
    const taken = hosts.filter((h) => owner.has(h));
    if (taken.length) throw conflict(`host ${taken.map((h) => `${h} is routed by ${owner.get(h)}`).join(', ')}; pick another host name`);
    if (!this.enabled) throw failedPrecondition('the ingress is off; start berthd with --ingress-http and/or --ingress-https to route hosts');
    const copy = structuredClone(routes);
    if (this.opts.staticFile) writeFileAtomic(this.opts.staticFile, JSON.stringify(copy));
    this.providers.set(STATIC, () => copy);
    await this.sync();
  }

  /** The desired set now: valid routes, each host owned by one route. */
  desired(): { routes: IngressRoute[]; rejected: { id: string; reason: string }[] } {
    const all: IngressRoute[] = [];
    const rejected: { id: string; reason: string }[] = [];
    for (const [name, provider] of this.providers) {
      try {
        all.push(...provider());
      } catch (e) {
        rejected.push({ id: `provider ${name}`, reason: `failed: ${(e as Error).message}` });
      }
    }
    // A contested host stays with the route that is serving it (no flapping, no take-over by a
    // newcomer); among newcomers the lowest id wins.
    const serving = new Set(this.appliedRoutes.map((r) => r.id));
    const rank = (r: IngressRoute) => (serving.has(r.id) ? 0 : 1);
    all.sort((a, b) => rank(a) - rank(b) || (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
    const owner = new Map<string, string>();
    const ids = new Set<string>();
    const routes: IngressRoute[] = [];
    // Host ports: the HTTP and HTTPS listeners', then each tcp route's (one route per port).
    const s = this.opts.settings;
    const ports = new Map<number, string>([...(s.http ? [[s.http.port, 'the ingress\'s HTTP listener'] as const] : []), ...(s.https ? [[s.https.port, 'the ingress\'s HTTPS listener'] as const] : [])]);
    for (const r of all) {
      const problems = routeProblems(r, Boolean(this.opts.settings.acme));
      if (ids.has(r.id)) problems.push('another route has the same id');
      const taken = r.hosts.filter((h) => owner.has(h));
      if (taken.length) problems.push(`host ${taken.map((h) => `${h} (owned by ${owner.get(h)})`).join(', ')} already routed`);
      if (r.tcpPort !== undefined && ports.has(r.tcpPort)) problems.push(`host port ${r.tcpPort} is already used by ${ports.get(r.tcpPort)}; choose another hostPort`);
      if (problems.length) {
        rejected.push({ id: r.id, reason: problems.join('; ') });
        continue;
      }
      ids.add(r.id);
      for (const h of r.hosts) owner.set(h, r.id);
      if (r.tcpPort !== undefined) ports.set(r.tcpPort, `route ${r.id}`);
      routes.push(r);
    }
    return { routes, rejected };
  }

  /**
   * Apply the desired set. Calls made while one runs are coalesced into one more run after it.
   * Resolves when a run that started after the call has finished; errors are kept in status()
   * and retried, and rethrown to the caller.
   */
  sync(): Promise<void> {
    if (!this.started) return Promise.resolve();
    if (this.syncing) {
      this.pending ??= this.syncing
        .catch(() => undefined)
        .then(() => {
          this.pending = undefined;
          return this.sync();
        });
      return this.pending;
    }
    this.syncing = this.syncOnce().finally(() => (this.syncing = undefined));
    return this.syncing;
  }

  /** Resolves once no apply is running or queued (at most timeoutMs): status() then shows the changes made so far. */
  async settled(timeoutMs = 5_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while ((this.syncing || this.pending) && Date.now() < deadline) {
      await Promise.race([(this.pending ?? this.syncing)!.catch(() => undefined), sleep(deadline - Date.now())]);
    }
  }

  private async syncOnce(): Promise<void> {
    clearTimeout(this.retry);
    const { routes, rejected } = await this.withFreePorts(this.desired());
    for (const r of rejected) if (!this.rejected.some((o) => o.id === r.id && o.reason === r.reason)) this.opts.log.warn(r, 'ingress: route rejected');
    this.rejected = rejected;
    try {
      const files = await this.render(routes);
      const text = JSON.stringify(files);
      const changed = text !== this.applied;
      if (changed || !this.proxy.running()) {
        this.write(files);
        await this.proxy.check();
      }
      const how = await this.proxy.ensure();
      if (how === 'adopted' || (how === 'running' && changed)) await this.proxy.reload();
      if (how !== 'running' || changed) this.opts.log.debug({ routes: routes.length, how }, 'ingress: routes applied');
      this.applied = text;
      this.appliedRoutes = routes;
      this.lastSyncAt = new Date();
      this.lastError = undefined;
      this.forgetCertificates(routes);
      // A host port taken by another program: look again until it is free (nothing else would).
      if (this.started && rejected.some((r) => r.reason.includes(PORT_IN_USE))) {
        this.retry = setTimeout(() => void this.sync().catch(() => undefined), 2_000);
        this.retry.unref();
      }
    } catch (e) {
      this.applied = undefined;
      this.lastError = (e as Error).message;
      this.opts.log.error({ err: this.lastError }, 'ingress: applying routes failed; retrying');
      if (this.started) {
        this.retry = setTimeout(() => void this.sync().catch(() => undefined), 2_000);
        this.retry.unref();
      }
      throw e;
    }
  }

  /**
   * A tcp route whose host port the proxy does not hold yet is kept only if the port is free now:
   * one taken by another program would make the whole new configuration fail to load (every route
   * with it), so that route alone is rejected, with the reason in status(), and tried again at the
   * next sync.
   */
  private async withFreePorts(d: { routes: IngressRoute[]; rejected: { id: string; reason: string }[] }): Promise<typeof d> {
    // Ports the running proxy holds: those of the routes applied, and (after a restart of berthd that
    // adopted the proxy) those of the configuration it runs, still on disk.
    const held = new Set(this.appliedRoutes.map((r) => r.tcpPort));
    if (this.proxy.running()) for (const port of tcpPortsIn(readText(this.proxy.paths.config))) held.add(port);
    const host = tcpListenHost(this.opts.settings);
    const routes: IngressRoute[] = [];
    for (const r of d.routes) {
      if (r.tcpPort === undefined || held.has(r.tcpPort) || (await portFree(host, r.tcpPort))) routes.push(r);
      else d.rejected.push({ id: r.id, reason: `host port ${r.tcpPort} ${PORT_IN_USE}; free it or choose another hostPort` });
    }
    return { routes, rejected: d.rejected };
  }

  /** Certificates for the routes (local ones made now, ACME ones ordered), then the proxy's files. */
  private async render(routes: IngressRoute[]): Promise<HaproxyFiles> {
    await this.certs.ensureCa();
    const certs = new Map<string, string>();
    const tlsHosts = (tls: string) => routes.filter((r) => r.tls === tls).flatMap((r) => r.hosts);
    if (this.opts.settings.https) for (const h of tlsHosts('local')) certs.set(h, await this.certs.ensureLocal(h));
    if (this.acme) {
      await this.acme.listen();
      this.acme.want(tlsHosts('acme'));
      for (const h of tlsHosts('acme')) if (this.certs.valid(this.certs.file('acme', h), 0)) certs.set(h, this.certs.file('acme', h));
    }
    const p = this.proxy.paths;
    return buildHaproxyConfig(routes, this.opts.settings, { ...p, defaultCert: this.certs.defaultCert }, { threads: this.opts.threads ?? 1, busyPolling: this.busyPolling() }, certs);
  }

  /** The map files and the crt-list first, the config last: each replaced atomically. */
  private write(files: HaproxyFiles): void {
    const p = this.proxy.paths;
    writeFileAtomic(p.hostsMap, files.hostsMap);
    writeFileAtomic(p.tlsHostsMap, files.tlsHostsMap);
    writeFileAtomic(p.crtList, files.crtList);
    writeFileAtomic(p.config, files.config);
  }

  /** Certificates of hosts no route has any more: removed, so a deleted owner leaves nothing. */
  private forgetCertificates(routes: IngressRoute[]): void {
    for (const issuer of ['local', 'acme'] as const) this.certs.forget(issuer, new Set(routes.filter((r) => r.tls === issuer).flatMap((r) => r.hosts)));
  }

  /** Berth's local CA certificate (PEM): clients trust it to reach `tls: local` hosts over HTTPS. */
  caCertPem(): string {
    try {
      return this.certs.caPem();
    } catch {
      if (!this.enabled) throw failedPrecondition('the ingress is off (berthd --ingress-http off --ingress-https off), so there is no local CA; turn the ingress on');
      throw unavailable('the local CA is not created yet; retry once the ingress has started');
    }
  }

  status(): IngressStatus {
    const s = this.opts.settings;
    const addr = (a: { host: string; port: number } | undefined) => (a ? `${a.host}:${a.port}` : null);
    return {
      enabled: this.enabled,
      http: addr(s.http),
      https: addr(s.https),
      baseDomain: s.baseDomain,
      acme: s.acme ? { directory: s.acme.directory, email: s.acme.email } : null,
      proxy: { kind: 'haproxy', pid: this.proxy.pid ?? null, running: this.proxy.running(), adopted: this.proxy.adopted, busyPolling: { mode: this.busyPollMode, on: this.busyPolling() } },
      routes: this.appliedRoutes.map((r) => ({ id: r.id, hosts: r.hosts, backends: r.backends.length, tls: r.tls, auth: Boolean(r.auth), ...(r.tcpPort !== undefined ? { tcpPort: r.tcpPort } : {}) })),
      rejected: this.rejected,
      lastSyncAt: this.lastSyncAt?.toISOString() ?? null,
      lastError: this.lastError ?? null,
    };
  }
}

function writeFileAtomic(file: string, text: string): void {
  mkdirSync(dirname(file), { recursive: true, mode: 0o700 });
  const tmp = `${file}.tmp`;
  writeFileSync(tmp, text, { mode: 0o600 });
  renameSync(tmp, file);
}

const PORT_IN_USE = 'is in use by another program on this host';

function readText(file: string): string {
  try {
    return readFileSync(file, 'utf8');
  } catch {
    return '';
  }
}

/** Whether a TCP listener could bind host:port now (tried and closed at once). */
function portFree(host: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const srv = createServer();
    srv.once('error', () => resolve(false));
    srv.listen({ host, port, exclusive: true }, () => srv.close(() => resolve(true)));
  });
}

function safely(f: RouteProvider): IngressRoute[] {
  try {
    return f();
  } catch {
    return [];
  }
}
