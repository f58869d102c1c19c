// berthd: wires the store, the drivers, the reconcilers and the API together.
// Stopping berthd does not stop workloads (they are supervised by their own monitors); a new
// berthd adopts them.
import { createAdaptorServer } from '@hono/node-server';
import { chmodSync, existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import type { Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join, resolve } from 'node:path';
import pino, { type Logger } from 'pino';
import { DriverRegistry } from '../core/driver.js';
import { openDatabase, type DB } from '../store/db.js';
import { ResourceStore } from '../store/resources.js';
import { Controller } from '../reconcilers/controller.js';
import { WORKLOAD, makeWorkloadReconciler, type StoredWorkloadStatus } from '../reconcilers/workloads.js';
import { JOB, JOBRUN, makeJobReconciler, makeJobRunReconciler } from '../reconcilers/jobs.js';
import { RuncDriver } from '../drivers/runc/driver.js';
import { GvisorDriver } from '../drivers/gvisor/driver.js';
import { MicroVmDriver } from '../drivers/microvm/driver.js';
import { SANDBOX, makeSandboxReconciler, sandboxRoutes } from '../reconcilers/sandboxes.js';
import { SANDBOXPOOL, makeSandboxPoolReconciler } from '../reconcilers/sandboxpools.js';
import { SERVICE, makeServiceReconciler, serviceNameProvider, serviceRoutes } from '../reconcilers/services.js';
import { HealthProber } from '../reconcilers/prober.js';
import { ImageService } from '../images/catalog.js';
import { NetworkManager, instanceId } from '../network/manager.js';
import { imagesInUse } from '../api/routes/images.js';
import { createApp } from '../api/app.js';
import { TokenStore } from './tokens.js';
import { PROJECT } from '../api/routes/common.js';
import { pidAlive } from '../lib/exec.js';
import type { WorkloadSpec } from '../api/schemas.js';
import { Ingress } from '../ingress/ingress.js';
import { DEFAULT_BASE_DOMAIN, type IngressRoute, type IngressSettings } from '../ingress/types.js';

export const VERSION = '0.1.0';

export interface DaemonConfig {
  dataDir: string;
  /** host:port for the TCP listener; port 0 picks a free one. */
  listen: string;
  /** Unix socket path; default <dataDir>/berthd.sock. */
  socketPath?: string;
  cgroupParent?: string;
  logLevel?: string;
  resyncMs?: number;
  /** Period of the garbage collection of unreferenced image blobs (default: env BERTH_IMAGE_GC_MS, else 1 h; 0 = off). */
  imageGcMs?: number;
  /** Tests may shorten restart back-off. */
  restartBackoff?: { initialMs: number; maxMs: number; resetAfterMs: number };
  logger?: Logger;
  /** Workload networks: the pool project subnets are cut from, and their prefix length. */
  network?: { pool?: string; subnetPrefix?: number };
  /** HTTP/HTTPS ingress; undefined = off. */
  ingress?: IngressSettings;
}

export class Daemon {
  readonly log: Logger;
  readonly db: DB;
  readonly store: ResourceStore;
  readonly drivers = new DriverRegistry();
  readonly tokens: TokenStore;
  readonly runc: RuncDriver;
  readonly gvisor: GvisorDriver;
  readonly microvm: MicroVmDriver;
  readonly network: NetworkManager;
  readonly controllers: { workloads: Controller; jobRuns: Controller; jobs: Controller; sandboxes: Controller; sandboxPools: Controller; services: Controller };
  readonly prober: HealthProber;
  readonly adminTokenPath: string;
  readonly socketPath: string;
  readonly ingress: Ingress;
  private servers: Server[] = [];
  private resync: NodeJS.Timeout | undefined;
  private imageGc: NodeJS.Timeout | undefined;
  private offExit: (() => void) | undefined;
  private readonly pidFile: string;
  address: { host: string; port: number } | undefined;

  constructor(readonly config: DaemonConfig) {
    this.log = config.logger ?? pino({ level: config.logLevel ?? 'info', base: { svc: 'berthd' } });
    mkdirSync(config.dataDir, { recursive: true, mode: 0o700 });
    chmodSync(config.dataDir, 0o700);
    this.pidFile = join(config.dataDir, 'berthd.pid');
    this.takeLock();
    this.db = openDatabase(join(config.dataDir, 'state.db'));
    this.store = new ResourceStore(this.db);
    this.tokens = new TokenStore(this.db);
    this.adminTokenPath = join(config.dataDir, 'admin.token');
    this.socketPath = config.socketPath ?? join(config.dataDir, 'berthd.sock');
    this.network = new NetworkManager({
      dir: join(config.dataDir, 'network'),
      db: this.db,
      instance: instanceId(resolve(config.dataDir)),
      ...(config.network?.pool ? { pool: config.network.pool } : {}),
      ...(config.network?.subnetPrefix ? { subnetPrefix: config.network.subnetPrefix } : {}),
      log: this.log,
    });
    const common = { cgroupParent: config.cgroupParent ?? 'berth', network: this.network };
    this.runc = new RuncDriver({ stateDir: join(config.dataDir, 'runtime', 'runc'), ...common });
    this.gvisor = new GvisorDriver({ stateDir: join(config.dataDir, 'runtime', 'gvisor'), ...common });
    this.microvm = new MicroVmDriver({ stateDir: join(config.dataDir, 'runtime', 'microvm'), ...common });
    this.drivers.register(this.runc);
    this.drivers.register(this.gvisor);
    this.drivers.register(this.microvm);
    this.ingress = new Ingress({
      dir: join(config.dataDir, 'ingress'),
      settings: config.ingress ?? { http: undefined, https: undefined, baseDomain: DEFAULT_BASE_DOMAIN, acme: undefined },
      staticFile: join(config.dataDir, 'ingress', 'static-routes.json'),
      log: this.log,
    });
    this.ingress.register('sandboxes', () => sandboxRoutes(this.store, this.ingress));
    this.ingress.register('services', () => this.serviceRoutes());
    const images = new ImageService(join(config.dataDir, 'images'));
    this.images = images;
    const log = this.log;
    this.prober = new HealthProber({ store: this.store, drivers: this.drivers, log, onChange: (id) => this.controllers.services.enqueue(id) });
    this.network.addNameProvider(serviceNameProvider(this.store));
    this.controllers = {
      services: new Controller({
        name: 'services',
        log,
        // The ready set, ports or domains changed: the ingress re-reads every route provider.
        reconcile: makeServiceReconciler({ store: this.store, prober: this.prober, log, onRoutesChanged: () => void this.ingress.sync().catch(() => undefined) }),
      }),
      workloads: new Controller({
        name: 'workloads',
        log,
        concurrency: 16,
        reconcile: makeWorkloadReconciler({ store: this.store, drivers: this.drivers, images, log, ...(config.restartBackoff ? { restartBackoff: config.restartBackoff } : {}) }),
      }),
      sandboxes: new Controller({ name: 'sandboxes', log, concurrency: 16, reconcile: makeSandboxReconciler({ store: this.store, drivers: this.drivers, images, log }) }),
      sandboxPools: new Controller({
        name: 'sandboxpools',
        log,
        reconcile: makeSandboxPoolReconciler({ store: this.store, log, kickSandbox: (id) => this.controllers.sandboxes.enqueue(id) }),
      }),
      jobRuns: new Controller({ name: 'jobruns', log, reconcile: makeJobRunReconciler({ store: this.store, log }) }),
      jobs: new Controller({
        name: 'jobs',
        log,
        reconcile: makeJobReconciler({ store: this.store, log, onRunCreated: (id) => this.controllers.jobRuns.enqueue(id) }),
      }),
    };
  }
  readonly images: ImageService;

  /** Ingress routes of every service with a public http port (backends: ready replicas). */
  serviceRoutes(): IngressRoute[] {
    return serviceRoutes(this.store, (name, project) => this.ingress.hostFor(name, project), (project) => this.network.dnsServerFor(project), this.config.ingress?.acme !== undefined);
  }

  private takeLock(): void {
    if (existsSync(this.pidFile)) {
      const pid = Number(readFileSync(this.pidFile, 'utf8').trim());
      if (pid && pid !== process.pid && pidAlive(pid)) {
        let cmd = '';
        try {
          cmd = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
        } catch {
          /* gone */
        }
        if (cmd.includes('node') || cmd.includes('berthd')) {
          throw new Error(`another berthd (pid ${pid}) is using ${this.config.dataDir}; stop it first or use another --data-dir`);
        }
      }
    }
    writeFileSync(this.pidFile, String(process.pid));
  }

  kick(kind: string, id: string): void {
    if (kind === WORKLOAD) this.controllers.workloads.enqueue(id);
    else if (kind === JOBRUN) this.controllers.jobRuns.enqueue(id);
    else if (kind === JOB) this.controllers.jobs.enqueue(id);
    else if (kind === SANDBOX) this.controllers.sandboxes.enqueue(id);
    else if (kind === SANDBOXPOOL) this.controllers.sandboxPools.enqueue(id);
    else if (kind === SERVICE) this.controllers.services.enqueue(id);
  }

  async start(): Promise<void> {
    this.tokens.ensureAdminToken(this.adminTokenPath);
    if (!this.store.find(PROJECT, '', 'default')) {
      this.store.create(PROJECT, { project: '', name: 'default', spec: { description: 'Default project' }, status: {} });
    }
    this.store.on('change', (n: { kind: string; id: string; ownerId: string | null }) => {
      this.kick(n.kind, n.id);
      // Owners watch their children: a workload change wakes its job run, a run change its job.
      if (n.ownerId && n.kind === WORKLOAD) this.controllers.jobRuns.enqueue(n.ownerId);
      if (n.ownerId && n.kind === JOBRUN) this.controllers.jobs.enqueue(n.ownerId);
      // Sandboxes own preview routes (their address changes as they start, pause and end).
      if (n.kind === SANDBOX) {
        // Only a sandbox with exposed ports, or one that is gone, can change a route.
        const s = this.store.getById<{ ports?: unknown[] }>(n.id);
        if (!s || s.spec.ports?.length) void this.ingress.sync().catch(() => undefined);
      }
      if (n.ownerId && n.kind === WORKLOAD) this.controllers.services.enqueue(n.ownerId);
    });
    for (const fp of await this.drivers.fingerprintAll()) this.log.info({ driver: fp.driver, healthy: fp.healthy, reason: fp.reason }, 'driver fingerprint');
    const offs = this.drivers.all().map((d) =>
      d.onExit((id) => {
        // Task ids are resource ids: wake whichever controller owns it.
        if (this.store.getById(id)?.kind === SANDBOX) this.controllers.sandboxes.enqueue(id);
        else this.controllers.workloads.enqueue(id);
      }),
    );
    this.offExit = () => offs.forEach((f) => f());
    await this.network.init();
    await this.collectOrphans();
    await this.ingress.start();
    this.resyncAll();
    this.resync = setInterval(() => this.resyncAll(), this.config.resyncMs ?? 30_000);
    const gcMs = this.config.imageGcMs ?? Number(process.env.BERTH_IMAGE_GC_MS ?? 3_600_000);
    if (gcMs > 0) this.imageGc = setInterval(() => void this.images.gc(imagesInUse(this)).catch((err: unknown) => this.log.warn({ err }, 'image garbage collection failed')), gcMs);
    this.resync.unref();
    try {
      await this.listen();
    } catch (e) {
      await this.ingress.stop(); // no proxy outlives a berthd that failed to start
      throw e;
    }
    this.log.info({ address: this.address, socket: this.socketPath, dataDir: this.config.dataDir }, 'berthd ready');
  }

  /** Level-triggered safety net: every object is looked at again now and then. */
  private resyncAll(): void {
    let page: string | null = null;
    do {
      const res: { items: { id: string }[]; nextPageToken: string | null } = this.store.list(WORKLOAD, { limit: 1000, ...(page ? { pageToken: page } : {}) });
      for (const w of res.items) this.controllers.workloads.enqueue(w.id);
      page = res.nextPageToken;
    } while (page);
    for (const r of this.store.list(JOBRUN, { limit: 1000 }).items) this.controllers.jobRuns.enqueue(r.id);
    for (const j of this.store.list(JOB, { limit: 1000 }).items) this.controllers.jobs.enqueue(j.id);
    for (const s of this.store.list(SANDBOX, { limit: 1000 }).items) this.controllers.sandboxes.enqueue(s.id);
    for (const p of this.store.list(SANDBOXPOOL, { limit: 1000 }).items) this.controllers.sandboxPools.enqueue(p.id);
    void this.ingress.sync().catch(() => undefined); // errors are kept in its status and retried
    for (const s of this.store.list(SERVICE, { limit: 1000 }).items) this.controllers.services.enqueue(s.id);
  }

  /** Host state with no record (a crash between record removal and cleanup): remove it. */
  private async collectOrphans(): Promise<void> {
    for (const driver of this.drivers.all()) {
      for (const id of await driver.listTasks()) {
        const w = this.store.getById<WorkloadSpec, StoredWorkloadStatus>(id);
        if (!w || (w.spec.isolation !== driver.capabilities.isolation && w.status.task?.driver !== driver.name)) {
          this.log.warn({ task: id, driver: driver.name }, 'removing orphaned task left by an earlier crash');
          await driver.destroy(id, { force: true });
        }
      }
    }
  }

  private async listen(): Promise<void> {
    const app = createApp(
      {
        version: VERSION,
        store: this.store,
        drivers: this.drivers,
        images: this.images,
        tokens: this.tokens,
        adminTokenPath: this.adminTokenPath,
        templatesDir: join(this.config.dataDir, 'templates'),
        kick: (k, id) => this.kick(k, id),
        ingress: this.ingress,
      },
      this.log,
    );
    const [host, portStr] = splitHostPort(this.config.listen);
    const tcp = createAdaptorServer({ fetch: app.fetch }) as Server;
    await new Promise<void>((resolve, reject) => {
      tcp.once('error', reject);
      tcp.listen(Number(portStr), host, () => resolve());
    });
    const a = tcp.address() as AddressInfo;
    this.address = { host: a.address, port: a.port };
    this.servers.push(tcp);
    rmSync(this.socketPath, { force: true });
    const unix = createAdaptorServer({ fetch: app.fetch }) as Server;
    await new Promise<void>((resolve, reject) => {
      unix.once('error', reject);
      unix.listen(this.socketPath, () => resolve());
    });
    chmodSync(this.socketPath, 0o600);
    this.servers.push(unix);
    writeFileSync(join(this.config.dataDir, 'berthd.addr'), `${this.address.host}:${this.address.port}\n`);
  }

  /** Graceful stop: stop accepting requests, let in-flight reconciles finish. Workloads keep running. */
  async stop(): Promise<void> {
    clearInterval(this.resync);
    clearInterval(this.imageGc);
    this.offExit?.();
    await Promise.all(
      this.servers.map(
        (s) =>
          new Promise<void>((r) => {
            s.close(() => r());
            (s as Server & { closeAllConnections?: () => void }).closeAllConnections?.();
          }),
      ),
    );
    this.servers = [];
    await Promise.all(Object.values(this.controllers).map((c) => c.stop()));
    await this.ingress.stop();
    this.prober.close();
    for (const d of this.drivers.all()) {
      d.close();
      d.removeCgroupParent();
    }
    this.network.close();
    rmSync(this.socketPath, { force: true });
    this.images.close();
    this.db.close();
    try {
      if (readFileSync(this.pidFile, 'utf8').trim() === String(process.pid)) rmSync(this.pidFile, { force: true });
    } catch {
      /* already gone */
    }
    this.log.info('berthd stopped');
  }
}

export function splitHostPort(s: string): [string, string] {
  const m = /^\[?([^\]]*)\]?:(\d+)$/.exec(s);
  if (!m) throw new Error(`listen address "${s}" must be host:port, e.g. 127.0.0.1:7878`);
  return [m[1]!, m[2]!];
}
