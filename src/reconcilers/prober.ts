// Health prober for service replicas: one timer per replica, in berthd. Level-triggered: every
// tick reads the replica workload from the store (phase, start time, address, task handle), so a
// restarted task starts from scratch and a daemon restart needs nothing but ensure() again.
// http and tcp checks go from the host to the replica's address on its project network (the
// firewall lets host → workload traffic through); exec checks run inside the replica through the
// driver's exec(). Kubernetes semantics: a startup check gates the others; readiness flips after
// successThreshold successes / failureThreshold failures; a failed liveness (or startup) check
// marks the replica for replacement.
import { request } from 'node:http';
import { connect } from 'node:net';
import type { Logger } from 'pino';
import type { DriverRegistry } from '../core/driver.js';
import type { ResourceStore } from '../store/resources.js';
import type { HealthCheck } from '../api/schemas.js';
import type { StoredWorkloadStatus } from './workloads.js';

export interface Checks {
  startup?: HealthCheck | undefined;
  readiness?: HealthCheck | undefined;
  liveness?: HealthCheck | undefined;
}

type Kind = keyof Checks;

interface Counter {
  successes: number;
  failures: number;
  nextAt: number;
  last?: string;
}

interface Entry {
  workloadId: string;
  serviceId: string;
  checks: Checks;
  /** startedAt of the task this state belongs to. */
  startedAt: string | undefined;
  startupDone: boolean;
  ready: boolean;
  /** Why the replica must be replaced (liveness or startup failed); undefined while healthy. */
  failed: string | undefined;
  counters: Record<Kind, Counter>;
  timer: NodeJS.Timeout | undefined;
  busy: boolean;
}

export interface ProberDeps {
  store: ResourceStore;
  drivers: DriverRegistry;
  log: Logger;
  /** Readiness or health of one of the service's replicas changed. */
  onChange(serviceId: string): void;
}

const fresh = (): Record<Kind, Counter> => ({ startup: { successes: 0, failures: 0, nextAt: 0 }, readiness: { successes: 0, failures: 0, nextAt: 0 }, liveness: { successes: 0, failures: 0, nextAt: 0 } });

export class HealthProber {
  private readonly entries = new Map<string, Entry>();
  private closed = false;

  constructor(private readonly deps: ProberDeps) {}

  /**
   * Probe this replica (idempotent). `seed` is the readiness last persisted for the same task
   * (after a daemon restart): a replica that was ready stays in the routes until a check says otherwise.
   */
  ensure(workloadId: string, serviceId: string, checks: Checks, seed?: { ready: boolean; startedAt?: string | undefined }): void {
    if (this.closed) return;
    const cur = this.entries.get(workloadId);
    if (cur) {
      cur.checks = checks;
      return;
    }
    const seeded = !!seed?.ready && !!seed.startedAt;
    const e: Entry = {
      workloadId,
      serviceId,
      checks,
      startedAt: seeded ? seed!.startedAt : undefined,
      startupDone: seeded,
      ready: seeded,
      failed: undefined,
      counters: fresh(),
      timer: undefined,
      busy: false,
    };
    if (seeded && checks.readiness) e.counters.readiness.successes = checks.readiness.successThreshold;
    this.entries.set(workloadId, e);
    this.schedule(e, 0);
  }

  forget(workloadId: string): void {
    const e = this.entries.get(workloadId);
    if (!e) return;
    clearTimeout(e.timer);
    this.entries.delete(workloadId);
  }

  /** Ids probed for one service. */
  probed(serviceId: string): string[] {
    return [...this.entries.values()].filter((e) => e.serviceId === serviceId).map((e) => e.workloadId);
  }

  ready(workloadId: string): boolean {
    return this.entries.get(workloadId)?.ready ?? false;
  }

  /** Why the replica must be replaced, if it must. */
  failed(workloadId: string): string | undefined {
    return this.entries.get(workloadId)?.failed;
  }

  close(): void {
    this.closed = true;
    for (const e of this.entries.values()) clearTimeout(e.timer);
    this.entries.clear();
  }

  private schedule(e: Entry, delayMs: number): void {
    clearTimeout(e.timer);
    if (this.closed || this.entries.get(e.workloadId) !== e) return;
    e.timer = setTimeout(() => void this.tick(e), Math.max(0, delayMs));
    e.timer.unref();
  }

  private set(e: Entry, patch: Partial<Pick<Entry, 'ready' | 'failed' | 'startupDone'>>): void {
    const before = `${e.ready}/${e.failed}`;
    Object.assign(e, patch);
    if (`${e.ready}/${e.failed}` !== before) this.deps.onChange(e.serviceId);
  }

  private async tick(e: Entry): Promise<void> {
    if (e.busy || this.entries.get(e.workloadId) !== e) return;
    e.busy = true;
    let next = 1000;
    try {
      next = await this.probe(e);
    } catch (err) {
      this.deps.log.warn({ replica: e.workloadId, err: (err as Error).message }, 'health probe failed to run');
    } finally {
      e.busy = false;
    }
    this.schedule(e, next);
  }

  /** One round: runs the checks that are due; returns the delay until the next one is. */
  private async probe(e: Entry): Promise<number> {
    const w = this.deps.store.getById<unknown, StoredWorkloadStatus>(e.workloadId);
    if (!w) {
      this.forget(e.workloadId);
      return 0;
    }
    const st = w.status;
    if (st.phase !== 'running' || !st.task || !st.startedAt) {
      e.startedAt = undefined;
      e.counters = fresh();
      this.set(e, { ready: false, startupDone: false, failed: undefined });
      return 200;
    }
    if (e.startedAt !== st.startedAt) {
      // A new task (first start, or a restart): nothing is known about it yet.
      e.startedAt = st.startedAt;
      e.counters = fresh();
      this.set(e, { ready: false, startupDone: false, failed: undefined });
    }
    if (e.failed) return 1000; // waiting to be replaced
    const now = Date.now();
    const since = Date.parse(st.startedAt);
    const due = (k: Kind) => {
      const c = e.checks[k];
      if (!c) return false;
      return now >= since + c.initialDelayMs && now >= e.counters[k].nextAt;
    };
    const kinds: Kind[] = e.checks.startup && !e.startupDone ? ['startup'] : ['readiness', 'liveness'];
    if (!e.checks.startup && !e.startupDone) e.startupDone = true;
    const results = await Promise.all(kinds.filter(due).map(async (k) => [k, await this.check(e.checks[k]!, st)] as const));
    for (const [k, failure] of results) {
      const c = e.counters[k];
      const spec = e.checks[k]!;
      c.nextAt = Date.now() + spec.periodMs;
      if (failure === undefined) {
        c.successes++;
        c.failures = 0;
      } else {
        c.failures++;
        c.successes = 0;
        c.last = failure;
      }
      if (k === 'startup') {
        if (c.successes >= 1) this.set(e, { startupDone: true });
        else if (c.failures >= spec.failureThreshold) this.set(e, { failed: `startup check failed ${c.failures} times: ${failure}`, ready: false });
      } else if (k === 'readiness') {
        if (c.successes >= spec.successThreshold) this.set(e, { ready: true });
        else if (c.failures >= spec.failureThreshold) this.set(e, { ready: false });
      } else if (c.failures >= spec.failureThreshold) {
        this.set(e, { failed: `liveness check failed ${c.failures} times: ${failure}`, ready: false });
      }
    }
    if (e.startupDone && !e.checks.readiness && !e.failed) this.set(e, { ready: true });
    // Next due check (startup gates the others).
    const active: Kind[] = e.checks.startup && !e.startupDone ? ['startup'] : ['readiness', 'liveness'];
    let nextAt = Infinity;
    for (const k of active) {
      const c = e.checks[k];
      if (c) nextAt = Math.min(nextAt, Math.max(e.counters[k].nextAt, since + c.initialDelayMs));
    }
    return nextAt === Infinity ? 1000 : Math.max(10, nextAt - Date.now());
  }

  /** Runs one check; undefined = success, else why it failed. */
  private async check(c: HealthCheck, st: StoredWorkloadStatus): Promise<string | undefined> {
    const ip = st.network?.ip;
    if (c.http) {
      if (!ip) return 'the replica has no network address';
      return httpCheck(ip, c.http.port, c.http.path, c.timeoutMs);
    }
    if (c.tcp) {
      if (!ip) return 'the replica has no network address';
      return tcpCheck(ip, c.tcp.port, c.timeoutMs);
    }
    const driver = st.task ? this.deps.drivers.byName(st.task.driver) : undefined;
    if (!driver?.exec) return `isolation driver ${st.task?.driver ?? '?'} cannot run exec checks`;
    const r = await driver.exec(st.task!, c.exec!.command, c.timeoutMs);
    if (r.exitCode === 0) return undefined;
    return r.exitCode < 0 ? `timed out after ${c.timeoutMs} ms` : `exit ${r.exitCode}: ${r.output.trim().slice(0, 200)}`;
  }
}

/** GET http://ip:port/path; 2xx and 3xx pass. */
export function httpCheck(ip: string, port: number, path: string, timeoutMs: number): Promise<string | undefined> {
  return new Promise((resolve) => {
    const timer = setTimeout(() => {
      req.destroy();
      resolve(`no answer within ${timeoutMs} ms`);
    }, timeoutMs);
    const done = (r: string | undefined) => {
      clearTimeout(timer);
      resolve(r);
    };
    const req = request({ host: ip, port, path, method: 'GET', agent: false, headers: { 'user-agent': 'berth-health-check/1', connection: 'close' } }, (res) => {
      res.resume();
      const code = res.statusCode ?? 0;
      done(code >= 200 && code < 400 ? undefined : `HTTP ${code} from ${path}`);
    });
    req.on('error', (e) => done(e.message));
    req.end();
  });
}

/** A TCP connection to ip:port is accepted. */
export function tcpCheck(ip: string, port: number, timeoutMs: number): Promise<string | undefined> {
  return new Promise((resolve) => {
    const sock = connect({ host: ip, port });
    const timer = setTimeout(() => {
      sock.destroy();
      resolve(`no connection within ${timeoutMs} ms`);
    }, timeoutMs);
    sock.once('connect', () => {
      clearTimeout(timer);
      sock.destroy();
      resolve(undefined);
    });
    sock.once('error', (e) => {
      clearTimeout(timer);
      resolve(e.message);
    });
  });
}
