// Warm pools: per image, tier and limits, keep `size` sandboxes started and unclaimed, so that a
// matching create is answered at once by claiming one (api/routes/sandboxes.ts). Members are
// ordinary sandboxes labelled berth.dev/pool=<pool>; claiming removes the label, and this
// reconciler starts a replacement in the background (REFILL_QUIET_MS after the last claim, at most
// REFILL_CONCURRENCY at a time). Failed members are replaced, extras removed.
import type { Logger } from 'pino';
import { randomBytes } from 'node:crypto';
import { cpus } from 'node:os';
import type { Resource, ResourceStore } from '../store/resources.js';
import type { ReconcileResult } from './controller.js';
import { SANDBOX, initialSandboxStatus, type SandboxSpecT, type SandboxStatusT } from './sandboxes.js';

export const SANDBOXPOOL = 'sandboxpool';
export const POOL_LABEL = 'berth.dev/pool';
/** A pool member's life time until it is claimed (the claim sets the caller's). */
export const POOL_MEMBER_TIMEOUT_MS = 86_400_000;
/**
 * Refills wait this long after the last claim, so that they do not compete for the CPU with the
 * sandboxes just handed out (their first commands) while claims come in; see BENCHMARKS.md.
 */
export const REFILL_QUIET_MS = 1000;
/** Members started at once: booting more at a time is no faster on a busy host, and every boot slows claims. */
export const REFILL_CONCURRENCY = Math.max(1, Math.floor(cpus().length / 2));

export interface SandboxPoolSpecT {
  image: string;
  isolation: SandboxSpecT['isolation'];
  resources?: SandboxSpecT['resources'];
  size: number;
}

export interface SandboxPoolStatusT {
  ready: number;
  starting: number;
  claimed: number;
  /** When a member was last claimed (refills wait REFILL_QUIET_MS after it). */
  lastClaimAt?: string;
}

export type SandboxPoolResource = Resource<SandboxPoolSpecT, SandboxPoolStatusT>;

/** Whether a sandbox request can be served by this pool (same image, tier and limits). */
export function poolMatches(pool: SandboxPoolSpecT, req: Pick<SandboxSpecT, 'image' | 'isolation' | 'resources' | 'network'>): boolean {
  const norm = (r: SandboxSpecT['resources']) => JSON.stringify(Object.entries(r ?? {}).filter(([, v]) => v !== undefined).sort());
  // Pool members have the default network (project, egress deny-all); other networks start cold.
  return pool.size > 0 && pool.image === req.image && pool.isolation === req.isolation && norm(pool.resources) === norm(req.resources) && req.network === undefined;
}

export function poolMembers(store: ResourceStore, pool: Resource): Resource<SandboxSpecT, SandboxStatusT>[] {
  return store.list<SandboxSpecT, SandboxStatusT>(SANDBOX, { project: pool.project, labelSelector: `${POOL_LABEL}=${pool.name}`, limit: 1000 }).items;
}

export function makeSandboxPoolReconciler(deps: { store: ResourceStore; log: Logger; kickSandbox: (id: string) => void }) {
  const { store, log } = deps;
  return async function reconcilePool(id: string): Promise<ReconcileResult | void> {
    const pool = store.getById<SandboxPoolSpecT, SandboxPoolStatusT>(id);
    if (!pool || pool.kind !== SANDBOXPOOL) return;
    const members = poolMembers(store, pool).filter((m) => !m.deletionRequestedAt);
    const remove = (m: Resource) => {
      store.markForDeletion(m.id);
      deps.kickSandbox(m.id);
    };
    if (pool.deletionRequestedAt) {
      for (const m of members) remove(m);
      if (poolMembers(store, pool).length === 0) {
        store.remove(id);
        return;
      }
      return { requeueAfterMs: 500 };
    }
    // Members that died are replaced.
    const live = members.filter((m) => m.status.phase !== 'failed' && m.status.phase !== 'stopped');
    for (const m of members) if (!live.includes(m)) remove(m);
    // Surplus (the pool shrank): the ones not running yet go first.
    const surplus = live.length - pool.spec.size;
    if (surplus > 0) {
      const order = [...live].sort((a, b) => Number(a.status.phase === 'running') - Number(b.status.phase === 'running'));
      for (const m of order.slice(0, surplus)) remove(m);
    }
    const quietFor = pool.status.lastClaimAt ? Date.now() - Date.parse(pool.status.lastClaimAt) : Infinity;
    const starting = live.filter((m) => m.status.phase !== 'running').length;
    const canStart = quietFor >= REFILL_QUIET_MS ? Math.max(0, REFILL_CONCURRENCY - starting) : 0;
    for (let i = live.length; i < Math.min(pool.spec.size, live.length + canStart); i++) {
      const s = store.create<SandboxSpecT, SandboxStatusT>(SANDBOX, {
        project: pool.project,
        name: `sbx-${randomBytes(5).toString('hex')}`,
        labels: { [POOL_LABEL]: pool.name },
        spec: { image: pool.spec.image, isolation: pool.spec.isolation, ...(pool.spec.resources ? { resources: pool.spec.resources } : {}), timeoutMs: POOL_MEMBER_TIMEOUT_MS, state: 'running' },
        status: initialSandboxStatus(),
      });
      store.addEvent(s.id, 'Created', `warm pool ${pool.name} member`);
      deps.kickSandbox(s.id);
    }
    const kept = poolMembers(store, pool).filter((m) => !m.deletionRequestedAt);
    const ready = kept.filter((m) => m.status.phase === 'running').length;
    const status: SandboxPoolStatusT = { ready, starting: kept.length - ready, claimed: pool.status.claimed ?? 0, ...(pool.status.lastClaimAt ? { lastClaimAt: pool.status.lastClaimAt } : {}) };
    if (JSON.stringify(status) !== JSON.stringify(pool.status) || pool.observedGeneration < pool.generation) store.updateStatus(id, status, pool.generation);
    if (live.length < pool.spec.size) log.debug({ pool: pool.name, ready, want: pool.spec.size }, 'warm pool refilling');
    // Members change phase on their own: look again soon while the pool is not full of ready ones.
    if (quietFor < REFILL_QUIET_MS && live.length < pool.spec.size) return { requeueAfterMs: Math.min(250, REFILL_QUIET_MS - quietFor) };
    return { requeueAfterMs: ready < pool.spec.size ? 250 : 5000 };
  };
}
