// Service reconciler: a service is a replica template plus a count. Each change of the template
// (not of replicas, deploy or domains) is a new revision; replicas are child workloads (owned by
// the service, restartPolicy always, labelled with their service and revision) that the workload
// reconciler runs. This reconciler is level-triggered over the service's children: it never
// trusts its own status for what exists, so a crash at any point converges without duplicates.
//
// Rolling deploys: new replicas are added while replicas (not draining) ≤ replicas + maxSurge;
// an old replica is taken out only while ready replicas stay ≥ replicas − maxUnavailable. Taking
// a replica out = draining: it leaves the ready set (status → routes and DNS) first, and is
// stopped deploy.drainMs later. A deploy that makes no progress for progressDeadlineMs, or whose
// replicas crash-loop, is rolled back: the spec's template goes back to the current revision's,
// the new replicas are drained and the failure is recorded on the revision and in events.
import { createHash, randomBytes } from 'node:crypto';
import type { Logger } from 'pino';
import type { IngressRoute } from '../ingress/types.js';
import type { Resource, ResourceStore } from '../store/resources.js';
import { ServiceTemplateFields, type Condition, type HealthCheck, type ServiceInstance, type ServiceRevision, type ServiceSpec, type ServiceStatusT, type WorkloadSpec } from '../api/schemas.js';
import type { NameProvider } from '../network/manager.js';
import type { ReconcileResult } from './controller.js';
import type { Checks, HealthProber } from './prober.js';
import { WORKLOAD, initialWorkloadStatus, type StoredWorkloadStatus, type WorkloadResource } from './workloads.js';

export const SERVICE = 'service';
export const SERVICE_LABEL = 'berth.dev/service';
export const REVISION_LABEL = 'berth.dev/revision';
/** Revisions kept in status (the current and target ones always are). */
export const REVISION_HISTORY = 20;
/** A new replica that restarts this often before it is ready fails the deploy (crash loop). */
export const CRASH_LOOP_RESTARTS = 3;

export interface StoredServiceStatus extends ServiceStatusT {
  /** Ready replicas of the target revision when progress was last made. */
  progressMark?: number;
}
export type ServiceResource = Resource<ServiceSpec, StoredServiceStatus>;

export const initialServiceStatus = (): StoredServiceStatus => ({ replicas: 0, readyReplicas: 0, updatedReplicas: 0, instances: [], conditions: [], revisions: [] });

/** JSON with object keys sorted (a template's hash must not depend on key order). */
function stableJson(v: unknown): string {
  if (Array.isArray(v)) return `[${v.map(stableJson).join(',')}]`;
  if (v && typeof v === 'object') {
    return `{${Object.keys(v)
      .sort()
      .filter((k) => (v as Record<string, unknown>)[k] !== undefined)
      .map((k) => `${JSON.stringify(k)}:${stableJson((v as Record<string, unknown>)[k])}`)
      .join(',')}}`;
  }
  return JSON.stringify(v);
}

/** The replica template: the spec fields a revision is made of. */
export function serviceTemplate(spec: ServiceSpec): Record<string, unknown> {
  const t: Record<string, unknown> = {};
  for (const k of ServiceTemplateFields) if (spec[k] !== undefined) t[k] = spec[k];
  return t;
}

export const templateHash = (t: Record<string, unknown>) => createHash('sha256').update(stableJson(t)).digest('hex').slice(0, 16);

/** The spec with its template replaced by `template` (replicas, deploy and domains kept). */
export function withTemplate(spec: ServiceSpec, template: Record<string, unknown>): ServiceSpec {
  const out: Record<string, unknown> = { ...spec };
  for (const k of ServiceTemplateFields) delete out[k];
  return { ...out, ...template } as ServiceSpec;
}

/** Implied readiness check when none is given and the service has ports: TCP on the first port, every second. */
export const DEFAULT_READINESS = { periodMs: 1000, timeoutMs: 1000, failureThreshold: 3, successThreshold: 1, initialDelayMs: 0 };

export function effectiveChecks(t: Pick<ServiceSpec, 'ports' | 'healthChecks'>): Checks {
  const h = t.healthChecks ?? {};
  const first = t.ports?.[0];
  const readiness: HealthCheck | undefined = h.readiness ?? (first ? { tcp: { port: first.port }, ...DEFAULT_READINESS } : undefined);
  return { startup: h.startup, readiness, liveness: h.liveness };
}

/** The workload spec of a replica of this template. */
export function replicaSpec(t: Record<string, unknown>): WorkloadSpec {
  const spec: Record<string, unknown> = { restartPolicy: 'always', state: 'running' };
  for (const k of ['image', 'command', 'args', 'env', 'workingDir', 'user', 'resources', 'isolation', 'network', 'stopTimeoutMs', 'stopSignal']) {
    if (t[k] !== undefined) spec[k] = t[k];
  }
  return spec as WorkloadSpec;
}

export interface ServiceDeps {
  store: ResourceStore;
  prober: HealthProber;
  log: Logger;
  /** The set of ready endpoints changed (the ingress re-reads serviceRoutes()). */
  onRoutesChanged?: () => void;
}

const revisionOf = (w: Resource) => Number(w.labels[REVISION_LABEL] ?? 0);

export function makeServiceReconciler(deps: ServiceDeps) {
  const { store, prober, log } = deps;
  /** What the ingress and DNS see of each service (in memory: after a restart the first reconcile tells once). */
  const lastRoutes = new Map<string, string>();


  return async function reconcileService(id: string): Promise<ReconcileResult | void> {
    const s = store.getById<ServiceSpec, StoredServiceStatus>(id);
    if (!s || s.kind !== SERVICE) return;
    const children = store.list<WorkloadSpec, StoredWorkloadStatus>(WORKLOAD, { ownerId: s.id, limit: 1000 }).items as WorkloadResource[];
    const before = s.status;
    const st: StoredServiceStatus = structuredClone(before);
    const now = Date.now();
    const nowIso = new Date(now).toISOString();
    const ev = (reason: string, message: string, type: 'Normal' | 'Warning' = 'Normal') => store.addEvent(s.id, reason, message, type);
    const finish = (requeueAfterMs?: number): ReconcileResult | void => {
      writeStatus(s, st, before);
      return requeueAfterMs !== undefined ? { requeueAfterMs } : undefined;
    };

    // Deletion: out of the routes first, then every replica, then the record.
    if (s.deletionRequestedAt) {
      for (const c of children) {
        prober.forget(c.id);
        if (!c.deletionRequestedAt) store.markForDeletion(c.id);
      }
      if (children.length === 0) {
        for (const wid of prober.probed(s.id)) prober.forget(wid);
        store.remove(s.id);
        lastRoutes.delete(s.id);
        deps.onRoutesChanged?.();
        log.info({ service: s.name, project: s.project }, 'service deleted');
        return;
      }
      st.instances = st.instances.map((i) => ({ ...i, ready: false }));
      st.readyReplicas = 0;
      return finish(1000);
    }

    // 1. Revisions: a template that differs from the target's is a new revision.
    const tpl = serviceTemplate(s.spec);
    const hash = templateHash(tpl);
    const rev = (n: number | undefined) => st.revisions.find((r) => r.number === n);
    let target = rev(st.targetRevision);
    const current = rev(st.currentRevision);
    if (!target || target.hash !== hash) {
      if (target && target.outcome === 'progressing') {
        target.outcome = 'superseded';
        target.finishedAt = nowIso;
        target.reason = 'replaced by a newer deploy before it finished';
      }
      if (current && current.hash === hash) {
        target = current; // back to what serves: the unfinished deploy's replicas are drained below
      } else {
        const number = (st.revisions.at(-1)?.number ?? 0) + 1;
        target = { number, hash, template: tpl, createdAt: nowIso, outcome: 'progressing' };
        st.revisions.push(target);
        ev('RevisionCreated', `revision ${number} (image ${String(tpl.image)})${current ? `; rolling out over revision ${current.number}` : ''}`);
      }
      st.targetRevision = target.number;
      st.lastProgressAt = nowIso;
      st.progressMark = 0;
    }
    const T = target.number;
    const spec = s.spec;
    const N = spec.replicas;
    const deploy = spec.deploy;

    // 2. Observe the replicas.
    const draining = new Map(st.instances.filter((i) => i.drainingSince).map((i) => [i.id, i.drainingSince!]));
    const prev = new Map(st.instances.map((i) => [i.id, i]));
    const liveChildren = children.filter((c) => !c.deletionRequestedAt);
    const checksOf = (w: WorkloadResource) => effectiveChecks((rev(revisionOf(w))?.template ?? tpl) as ServiceSpec);
    for (const c of children) {
      if (c.deletionRequestedAt) prober.forget(c.id);
      else prober.ensure(c.id, s.id, checksOf(c), prev.get(c.id) && { ready: prev.get(c.id)!.ready, startedAt: prev.get(c.id)!.startedAt });
    }
    const known = new Set(children.map((c) => c.id));
    for (const wid of prober.probed(s.id)) if (!known.has(wid)) prober.forget(wid);
    const isReady = (w: WorkloadResource) => w.status.phase === 'running' && !w.deletionRequestedAt && !draining.has(w.id) && prober.ready(w.id);
    const drain = (w: WorkloadResource, why: string) => {
      if (draining.has(w.id)) return;
      draining.set(w.id, nowIso);
      ev('Draining', `replica ${w.name} (revision ${revisionOf(w)}) leaves the routes: ${why}; stopped in ${deploy.drainMs} ms`);
    };

    // Unhealthy replicas (liveness or startup failed) are replaced.
    for (const c of liveChildren) {
      const why = prober.failed(c.id);
      if (why && !draining.has(c.id)) {
        ev('Unhealthy', `replica ${c.name}: ${why}; replacing it`, 'Warning');
        drain(c, 'unhealthy');
      }
    }

    // 3. Deploy failure: no progress within the deadline, or the new replicas crash-loop.
    const active = () => liveChildren.filter((c) => !draining.has(c.id));
    const rolling = () => current !== undefined && T !== current.number;
    if (target.outcome === 'progressing') {
      const newOnes = active().filter((c) => revisionOf(c) === T);
      const readyNew = newOnes.filter(isReady).length;
      if (readyNew > (st.progressMark ?? 0)) {
        st.progressMark = readyNew;
        st.lastProgressAt = nowIso;
      }
      const crashing = newOnes.find((c) => c.status.restartCount >= CRASH_LOOP_RESTARTS && !isReady(c));
      const stalled = now - Date.parse(st.lastProgressAt ?? nowIso) > deploy.progressDeadlineMs;
      if (crashing || stalled) {
        const reason = crashing
          ? `replica ${crashing.name} is crash-looping (${crashing.status.restartCount} restarts; last: ${crashing.status.reason ?? 'exited'})`
          : `no new replica became ready within progressDeadlineMs (${deploy.progressDeadlineMs} ms): ${readyNew}/${N} ready`;
        target.outcome = 'failed';
        target.reason = reason;
        target.finishedAt = nowIso;
        if (current) {
          // Roll back: the spec's template goes back to what serves (level-triggered: the spec is
          // the truth), the failed revision's replicas are drained.
          for (const c of newOnes) drain(c, `revision ${T} failed`);
          ev('RolledBack', `revision ${T} failed: ${reason}; rolled back to revision ${current.number}`, 'Warning');
          log.warn({ service: s.name, project: s.project, revision: T, reason }, 'deploy failed; rolled back');
          st.targetRevision = current.number;
          setCondition(st, 'Progressing', 'False', crashing ? 'CrashLoop' : 'ProgressDeadlineExceeded', `revision ${T} rolled back: ${reason}`, nowIso);
          st.instances = instancesOf(children, draining, isReady);
          // The spec first (a concurrent change by a user wins: conflict → retried), then status.
          store.updateSpec(s.id, { spec: withTemplate(spec, current.template) }, s.resourceVersion);
          writeStatus(s, st, before);
          return { requeueAfterMs: 0 };
        }
        ev('DeployFailed', `revision ${T} failed: ${reason}; there is no earlier revision to roll back to`, 'Warning');
        setCondition(st, 'Progressing', 'False', crashing ? 'CrashLoop' : 'ProgressDeadlineExceeded', reason, nowIso);
      }
    }

    // 4. Scale: add replicas of the target revision, take out others while enough stay ready.
    let act = active();
    const newR = () => act.filter((c) => revisionOf(c) === T);
    const oldR = () => act.filter((c) => revisionOf(c) !== T);
    const maxTotal = oldR().length > 0 ? N + deploy.maxSurge : N;
    let created = 0;
    while (newR().length + created < N && act.length + created < maxTotal) {
      const name = `${s.name}-${T}-${randomBytes(3).toString('hex')}`;
      store.create<WorkloadSpec, StoredWorkloadStatus>(WORKLOAD, {
        project: s.project,
        name,
        labels: { [SERVICE_LABEL]: s.name, [REVISION_LABEL]: String(T) },
        spec: replicaSpec(target.template),
        status: initialWorkloadStatus(),
        ownerId: s.id,
      });
      ev('ReplicaCreated', `replica ${name} (revision ${T})`);
      created++;
    }
    // Least useful first: not ready, then newest.
    const order = (xs: WorkloadResource[]) => [...xs].sort((a, b) => Number(isReady(a)) - Number(isReady(b)) || b.createdAt.localeCompare(a.createdAt));
    const extra = newR().length - N;
    if (extra > 0) for (const c of order(newR()).slice(0, extra)) drain(c, `scaled to ${N}`);
    act = active();
    const minReady = Math.max(0, N - deploy.maxUnavailable);
    let readyCount = act.filter(isReady).length;
    for (const c of order(oldR())) {
      if (!isReady(c)) drain(c, `replaced by revision ${T}`);
      else if (readyCount - 1 >= minReady) {
        drain(c, `replaced by revision ${T}`);
        readyCount--;
      }
    }

    // 5. Drained long enough: stop them (the workload reconciler stops and removes the task).
    let wakeIn = Infinity;
    for (const c of liveChildren) {
      const since = draining.get(c.id);
      if (!since) continue;
      const left = Date.parse(since) + deploy.drainMs - now;
      if (left <= 0) {
        prober.forget(c.id);
        store.markForDeletion(c.id);
      } else wakeIn = Math.min(wakeIn, left);
    }

    // 6. Rollout finished?
    act = active();
    const newReady = newR().filter(isReady).length;
    const unfinished = target.outcome === 'progressing' || (target.outcome === 'failed' && !current);
    if (unfinished && newR().length === N && newReady === N && oldR().length === 0) {
      target.outcome = 'deployed';
      delete target.reason;
      target.finishedAt = nowIso;
      if (current && current.number !== T) current.outcome = 'superseded';
      st.currentRevision = T;
      ev('Deployed', `revision ${T} serves with ${N} ready replica(s)`);
      setCondition(st, 'Progressing', 'True', 'Deployed', `revision ${T} is deployed`, nowIso);
    } else if (target.outcome === 'progressing') {
      setCondition(st, 'Progressing', 'True', 'Deploying', `revision ${T}: ${newReady}/${N} ready`, nowIso);
    }

    st.instances = instancesOf(children, draining, isReady);
    st.replicas = act.length;
    st.readyReplicas = st.instances.filter((i) => i.ready).length;
    st.updatedReplicas = newR().length;
    setCondition(
      st,
      'Available',
      st.readyReplicas >= minReady && (N === 0 || st.readyReplicas > 0) ? 'True' : 'False',
      st.readyReplicas >= minReady ? 'MinimumReplicasReady' : 'NotEnoughReady',
      `${st.readyReplicas}/${N} ready`,
      nowIso,
    );
    pruneRevisions(st);
    if (target.outcome === 'progressing' || rolling()) wakeIn = Math.min(wakeIn, Math.max(50, Date.parse(st.lastProgressAt ?? nowIso) + deploy.progressDeadlineMs - now + 10), 2000);
    return finish(wakeIn === Infinity ? undefined : wakeIn);
  };

  function writeStatus(s: ServiceResource, st: StoredServiceStatus, before: StoredServiceStatus): void {
    if (JSON.stringify(st) !== JSON.stringify(before)) store.updateStatus(s.id, st, s.generation);
    const key = JSON.stringify([s.spec.domains, s.spec.ports, st.instances.filter((i) => i.ready).map((i) => i.ip)]);
    if (lastRoutes.get(s.id) !== key) {
      lastRoutes.set(s.id, key);
      deps.onRoutesChanged?.();
    }
  }
}

function instancesOf(children: WorkloadResource[], draining: Map<string, string>, isReady: (w: WorkloadResource) => boolean): ServiceInstance[] {
  return [...children]
    .sort((a, b) => a.createdAt.localeCompare(b.createdAt) || a.name.localeCompare(b.name))
    .map((c) => {
      const i: ServiceInstance = { id: c.id, name: c.name, revision: revisionOf(c), phase: c.deletionRequestedAt ? 'stopping' : c.status.phase, ready: isReady(c), restartCount: c.status.restartCount };
      if (c.status.network?.ip) i.ip = c.status.network.ip;
      if (c.status.startedAt) i.startedAt = c.status.startedAt;
      const d = draining.get(c.id);
      if (d) i.drainingSince = d;
      return i;
    });
}

function setCondition(st: StoredServiceStatus, type: string, status: 'True' | 'False', reason: string, message: string, at: string): void {
  const cur = st.conditions.find((c) => c.type === type);
  if (cur && cur.status === status && cur.reason === reason && cur.message === message) return;
  const c: Condition = { type, status, reason, message, lastTransitionAt: cur && cur.status === status ? cur.lastTransitionAt : at };
  st.conditions = [...st.conditions.filter((x) => x.type !== type), c].sort((a, b) => a.type.localeCompare(b.type));
}

function pruneRevisions(st: StoredServiceStatus): void {
  while (st.revisions.length > REVISION_HISTORY) {
    const i = st.revisions.findIndex((r) => r.number !== st.currentRevision && r.number !== st.targetRevision);
    if (i < 0) break;
    st.revisions.splice(i, 1);
  }
}

// ---- hooks for the ingress and DNS (pure functions of the store) ----


/** How often the ingress re-reads a service's ready replicas from DNS; drainMs must exceed it. */
export const DNS_REFRESH_MS = 500;

function allServices(store: ResourceStore): ServiceResource[] {
  const out: ServiceResource[] = [];
  let page: string | null = null;
  do {
    const res: { items: ServiceResource[]; nextPageToken: string | null } = store.list<ServiceSpec, StoredServiceStatus>(SERVICE, { limit: 1000, ...(page ? { pageToken: page } : {}) });
    out.push(...res.items);
    page = res.nextPageToken;
  } while (page);
  return out;
}

/**
 * Ingress routes: one per service with a public http port (its first one): hosts
 * `<service>.<project>.<baseDomain>` plus spec.domains, backends = the READY replicas' ip:port;
 * and one per public tcp port, on its hostPort.
 */
export function serviceRoutes(
  store: ResourceStore,
  hostFor: (name: string, project: string) => string,
  dnsServerFor: (project: string) => string | undefined = () => undefined,
  /** berthd has an ACME account: custom domains get their certificates from it. */
  acme = false,
): IngressRoute[] {
  const routes: IngressRoute[] = [];
  for (const s of allServices(store)) {
    if (s.deletionRequestedAt) continue;
    const dns = dnsServerFor(s.project);
    const ready = s.status.instances.filter((i) => i.ready && i.ip);
    const follow = (port: number) => (dns ? { dynamic: { name: `${s.name}.${s.project}.internal`, port, resolvers: [dns], refreshMs: DNS_REFRESH_MS } } : {});
    for (const p of s.spec.ports) {
      if (!p.public || p.protocol !== 'tcp' || p.hostPort === undefined) continue;
      routes.push({ id: `service/${s.project}/${s.name}/tcp/${p.port}`, hosts: [], tcpPort: p.hostPort, tls: 'none', backends: ready.map((i) => ({ address: i.ip!, port: p.port })), ...follow(p.port) });
    }
    const port = s.spec.ports.find((p) => p.public && p.protocol === 'http');
    if (!port) continue;
    const route: IngressRoute = {
      id: `service/${s.project}/${s.name}`,
      hosts: [hostFor(s.name, s.project), ...(acme ? [] : s.spec.domains ?? [])],
      backends: ready.map((i) => ({ address: i.ip!, port: port.port })),
      tls: 'local',
      ...(s.spec.maxConnectionsPerReplica ? { maxConnsPerBackend: s.spec.maxConnectionsPerReplica } : {}),
      // The proxy follows the ready set through Berth's DNS (no config load per replica change).
      ...follow(port.port),
    };
    routes.push(route);
    // Custom domains: publicly trusted certificates (ACME) when berthd has an ACME account.
    if (acme && s.spec.domains?.length) routes.push({ ...route, id: `${route.id}/domains`, hosts: [...s.spec.domains], tls: 'acme' });
  }
  return routes;
}

/** DNS: `<service>` (and `<service>.<project>.internal`) → the ready replicas' addresses. */
export function serviceNameProvider(store: ResourceStore): NameProvider {
  return (project, name) => {
    const s = store.find<ServiceSpec, StoredServiceStatus>(SERVICE, project, name);
    if (!s) return undefined;
    return s.status.instances.filter((i) => i.ready && i.ip).map((i) => i.ip!);
  };
}

export type { ServiceRevision };
