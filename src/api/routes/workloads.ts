import { createRoute, z, type OpenAPIHono } from '@hono/zod-openapi';
import { stream } from 'hono/streaming';
import type { Context } from 'hono';
import { CreateWorkload, ListQuery, StopRequest, UpdateWorkload, Workload, WorkloadSpec, listOf } from '../schemas.js';
import { BerthError, failedPrecondition, invalidArgument } from '../../core/errors.js';
import type { Isolation } from '../../core/driver.js';
import type { Resource } from '../../store/resources.js';
import type { ApiContext } from '../context.js';
import type { AppEnv } from '../app.js';
import { ProjectNameParams, ProjectParams, body, errorResponses, getLive, json, requestSignal, useProject, registerEventsRoute, view } from './common.js';
import { WORKLOAD, initialWorkloadStatus, type StoredWorkloadStatus, type WorkloadResource } from '../../reconcilers/workloads.js';
import { resolveUser } from '../../images/catalog.js';
import { readLog } from '../logs.js';
import { randomBytes } from 'node:crypto';

const tags = ['workloads'];
const HIDDEN = ['task', 'taskSpecHash'];
export const workloadView = (w: WorkloadResource) => view(w, HIDDEN);

/** Checks that need the host: the isolation tier is usable, the limits fit it, the image and user resolve. */
export async function admitRunSpec(
  ctx: ApiContext,
  spec: { isolation: string; image: string; user?: string | undefined; resources?: { memoryMiB?: number | undefined; pids?: number | undefined } | undefined },
): Promise<void> {
  const iso = spec.isolation as Isolation;
  const driver = ctx.drivers.get(iso);
  const fp = ctx.drivers.fingerprintOf(iso);
  if (!driver || (fp && !fp.healthy)) {
    const have = ctx.drivers
      .all()
      .filter((d) => ctx.drivers.fingerprintOf(d.capabilities.isolation)?.healthy !== false)
      .map((d) => `"${d.capabilities.isolation}"`)
      .join(', ');
    throw failedPrecondition(`isolation "${spec.isolation}" is not available on this host${fp ? ` (${fp.reason})` : ' yet'}; available: ${have}`);
  }
  const caps = driver.capabilities;
  if (spec.resources?.pids !== undefined && !caps.limits.pids) {
    throw invalidArgument(`isolation "${spec.isolation}" cannot enforce a pids limit; remove spec.resources.pids or use isolation "container"`);
  }
  if (spec.resources?.memoryMiB !== undefined && caps.minMemoryMiB && spec.resources.memoryMiB < caps.minMemoryMiB) {
    throw invalidArgument(`isolation "${spec.isolation}" needs spec.resources.memoryMiB ≥ ${caps.minMemoryMiB} (the smallest limit this tier can run a workload in)`);
  }
  const img = await ctx.images.resolve(spec.image);
  if (spec.user) resolveUser(img.rootfs, spec.user);
}

const LogQuery = z.strictObject({
  follow: z.enum(['true', 'false', '1', '0']).optional(),
  tail: z.coerce.number().int().min(0).max(1_000_000).optional(),
  timestamps: z.enum(['true', 'false', '1', '0']).optional(),
  format: z.enum(['text', 'ndjson']).optional().openapi({ description: 'ndjson: one {"time","stream","text","partial"} object per line' }),
});

const WatchQuery = z.strictObject({
  afterResourceVersion: z.coerce.number().int().min(0).optional().openapi({
    description: 'Long poll: answer only once the resourceVersion is greater than this (or timeoutMs passes)',
  }),
  untilPhase: z
    .string()
    .regex(/^(pending|starting|running|stopping|backoff|exited|failed|stopped)(,(pending|starting|running|stopping|backoff|exited|failed|stopped))*$/, {
      message: 'untilPhase is a comma-separated list of phases, e.g. "running,failed,exited"',
    })
    .optional()
    .openapi({ description: 'Long poll: answer once status.phase is one of these (or timeoutMs passes), like `kubectl wait`' }),
  timeoutMs: z.coerce.number().int().min(0).max(300_000).optional(),
});

/** Resolves with the resource once its resourceVersion exceeds `after`, or as it is at the timeout. */
export function waitForChange(ctx: ApiContext, id: string, after: number, timeoutMs: number, signal?: AbortSignal): Promise<Resource> {
  return new Promise((resolve, reject) => {
    const finish = () => {
      clearTimeout(timer);
      ctx.store.off('change', onChange);
      signal?.removeEventListener('abort', finish);
      const cur = ctx.store.getById(id);
      if (cur) resolve(cur);
      else reject(new BerthError('not_found', 'the resource was deleted while waiting'));
    };
    const onChange = (n: { id: string }) => {
      if (n.id !== id) return;
      const cur = ctx.store.getById(id);
      if (!cur || cur.resourceVersion > after) finish();
    };
    const timer = setTimeout(finish, timeoutMs);
    ctx.store.on('change', onChange);
    signal?.addEventListener('abort', finish, { once: true });
  });
}

const TERMINAL = new Set(['exited', 'failed', 'stopped']);

/** Stream the logs of one or more workloads (job attempts are read in order). */
export function streamLogs(ctx: ApiContext, c: Context, workloadIds: () => string[], q: z.infer<typeof LogQuery>, isFinished?: () => boolean): Response {
  const follow = q.follow === 'true' || q.follow === '1';
  const ts = q.timestamps === 'true' || q.timestamps === '1';
  const ndjson = q.format === 'ndjson';
  c.header('Content-Type', ndjson ? 'application/x-ndjson; charset=utf-8' : 'text/plain; charset=utf-8');
  return stream(c, async (s) => {
    const ac = new AbortController();
    s.onAbort(() => ac.abort());
    const seen = new Set<string>();
    for (;;) {
      const ids = workloadIds().filter((id) => !seen.has(id));
      if (ids.length === 0) {
        if (!follow || !isFinished || isFinished()) break;
        await new Promise((r) => setTimeout(r, 200));
        if (ac.signal.aborted) break;
        continue;
      }
      for (const id of ids) {
        seen.add(id);
        const finished = () => {
          const w = ctx.store.getById<WorkloadSpec, StoredWorkloadStatus>(id);
          return !w || (TERMINAL.has(w.status.phase) && !w.status.task && w.observedGeneration >= w.generation);
        };
        const driver = ctx.drivers.all()[0]!;
        const w = ctx.store.getById<WorkloadSpec, StoredWorkloadStatus>(id);
        const d = (w && ctx.drivers.get(w.spec.isolation)) ?? driver;
        for await (const l of readLog(d.logPath(id), { follow, ...(q.tail !== undefined ? { tail: q.tail } : {}), finished, signal: ac.signal })) {
          const out = ndjson ? JSON.stringify(l) + '\n' : `${ts ? l.time + ' ' : ''}${l.text}${l.partial ? '' : '\n'}`;
          await s.write(out);
        }
      }
      if (!follow || !isFinished) break;
    }
  });
}

const CreateWaitQuery = z.strictObject({
  wait: z.enum(['none', 'running']).default('none').openapi({ description: 'running: answer once the workload runs, or has failed, exited or backed off' }),
  timeoutMs: z.coerce.number().int().min(1).max(600_000).optional().openapi({ description: 'Longest wait (default 60 s)' }),
});
/** Phases after which a create with wait=running answers. */
const STARTED = new Set(['running', 'exited', 'failed', 'backoff', 'stopped']);

export function registerWorkloadRoutes(app: OpenAPIHono<AppEnv>, ctx: ApiContext): void {
  const base = '/v1/projects/{project}/workloads';

  app.openapi(
    createRoute({ method: 'post', path: base, tags, request: { params: ProjectParams, query: CreateWaitQuery, body: body(CreateWorkload) }, responses: { 201: json(Workload, 'Created'), ...errorResponses } }),
    async (c) => {
      const { project } = c.req.valid('param');
      const b = c.req.valid('json');
      useProject(ctx, c, project);
      await admitRunSpec(ctx, b.spec);
      const name = b.name ?? `w-${randomBytes(4).toString('hex')}`;
      const w = ctx.store.create(WORKLOAD, { project, name, labels: b.labels ?? {}, spec: b.spec, status: initialWorkloadStatus() });
      ctx.store.addEvent(w.id, 'Created', `workload created (image ${b.spec.image}, isolation ${b.spec.isolation})`);
      ctx.kick(WORKLOAD, w.id);
      const q = c.req.valid('query');
      let cur = w as WorkloadResource;
      if (q.wait === 'running') {
        // Like `docker run -d`: answer once the task runs (or could not start), in one round trip.
        const deadline = Date.now() + (q.timeoutMs ?? 60_000);
        while (!STARTED.has(cur.status.phase) && Date.now() < deadline && !requestSignal(c).aborted) {
          cur = (await waitForChange(ctx, cur.id, cur.resourceVersion, deadline - Date.now(), requestSignal(c))) as WorkloadResource;
        }
      }
      return c.json(workloadView(cur) as never, 201);
    },
  );

  app.openapi(
    createRoute({ method: 'get', path: base, tags, request: { params: ProjectParams, query: ListQuery }, responses: { 200: json(listOf(Workload, 'WorkloadList')), ...errorResponses } }),
    (c) => {
      const { project } = c.req.valid('param');
      useProject(ctx, c, project);
      const res = ctx.store.list<WorkloadSpec, StoredWorkloadStatus>(WORKLOAD, { project, ...c.req.valid('query') });
      return c.json({ items: res.items.map((w) => workloadView(w)), nextPageToken: res.nextPageToken } as never, 200);
    },
  );

  app.openapi(
    createRoute({ method: 'get', path: `${base}/{name}`, tags, request: { params: ProjectNameParams, query: WatchQuery }, responses: { 200: json(Workload), ...errorResponses } }),
    async (c) => {
      const { project, name } = c.req.valid('param');
      const q = c.req.valid('query');
      useProject(ctx, c, project);
      let w = ctx.store.get(WORKLOAD, project, name) as WorkloadResource;
      if (q.afterResourceVersion !== undefined && w.resourceVersion <= q.afterResourceVersion) {
        w = (await waitForChange(ctx, w.id, q.afterResourceVersion, q.timeoutMs ?? 30_000, requestSignal(c))) as WorkloadResource;
      }
      if (q.untilPhase) {
        const want = new Set(q.untilPhase.split(','));
        const deadline = Date.now() + (q.timeoutMs ?? 30_000);
        while (!want.has(w.status.phase) && Date.now() < deadline && !requestSignal(c).aborted) {
          w = (await waitForChange(ctx, w.id, w.resourceVersion, deadline - Date.now(), requestSignal(c))) as WorkloadResource;
        }
      }
      return c.json(workloadView(w) as never, 200);
    },
  );

  app.openapi(
    createRoute({ method: 'put', path: `${base}/{name}`, tags, request: { params: ProjectNameParams, body: body(UpdateWorkload) }, responses: { 200: json(Workload), ...errorResponses } }),
    async (c) => {
      const { project, name } = c.req.valid('param');
      const b = c.req.valid('json');
      useProject(ctx, c, project);
      const w = getLive<WorkloadSpec, StoredWorkloadStatus>(ctx, WORKLOAD, project, name);
      if (w.ownerId) throw failedPrecondition(`workload "${name}" is managed by its owner (a job run or a service); change the job or service instead`);
      await admitRunSpec(ctx, b.spec);
      const updated = ctx.store.updateSpec(w.id, { spec: b.spec, ...(b.labels ? { labels: b.labels } : {}) }, b.resourceVersion);
      ctx.kick(WORKLOAD, w.id);
      return c.json(workloadView(updated as WorkloadResource) as never, 200);
    },
  );

  app.openapi(
    createRoute({ method: 'delete', path: `${base}/{name}`, tags, request: { params: ProjectNameParams }, responses: { 202: json(Workload, 'Deletion started'), ...errorResponses } }),
    (c) => {
      const { project, name } = c.req.valid('param');
      useProject(ctx, c, project);
      const w = ctx.store.get(WORKLOAD, project, name);
      const r = ctx.store.markForDeletion(w.id);
      ctx.kick(WORKLOAD, w.id);
      return c.json(workloadView(r as WorkloadResource) as never, 202);
    },
  );

  const setState = (state: 'running' | 'stopped') => (c: Context) => {
    const { project, name } = c.req.param() as { project: string; name: string };
    useProject(ctx, c, project);
    const w = getLive<WorkloadSpec, StoredWorkloadStatus>(ctx, WORKLOAD, project, name);
    return { w, apply: (spec: WorkloadSpec) => ctx.store.updateSpec(w.id, { spec }) as WorkloadResource, state };
  };

  app.openapi(
    createRoute({
      method: 'post',
      path: `${base}/{name}/stop`,
      tags,
      request: { params: ProjectNameParams, body: { required: false, content: { 'application/json': { schema: StopRequest } } } },
      responses: { 200: json(Workload), ...errorResponses },
    }),
    async (c) => {
      c.req.valid('param');
      const b = (c.req.valid('json') ?? {}) as z.infer<typeof StopRequest>;
      const { w, apply } = setState('stopped')(c);
      const spec: WorkloadSpec = { ...w.spec, state: 'stopped', ...(b.timeoutMs !== undefined ? { stopTimeoutMs: b.timeoutMs } : {}), ...(b.signal ? { stopSignal: b.signal } : {}) };
      const r = w.spec.state === 'stopped' && b.timeoutMs === undefined && !b.signal ? w : apply(spec);
      ctx.kick(WORKLOAD, w.id);
      return c.json(workloadView(r) as never, 200);
    },
  );

  app.openapi(
    createRoute({ method: 'post', path: `${base}/{name}/start`, tags, request: { params: ProjectNameParams }, responses: { 200: json(Workload), ...errorResponses } }),
    (c) => {
      c.req.valid('param');
      const { w, apply } = setState('running')(c);
      if (w.ownerId) throw failedPrecondition(`workload "${w.name}" is a job attempt; trigger a new job run instead`);
      if (w.status.phase === 'running' && w.spec.state === 'running') return c.json(workloadView(w) as never, 200);
      const r = apply({ ...w.spec, state: 'running' });
      ctx.kick(WORKLOAD, w.id);
      return c.json(workloadView(r) as never, 200);
    },
  );

  app.openapi(
    createRoute({
      method: 'get',
      path: `${base}/{name}/logs`,
      tags,
      request: { params: ProjectNameParams, query: LogQuery },
      responses: { 200: { description: 'Log stream (text/plain or application/x-ndjson)', content: { 'text/plain': { schema: z.string() } } }, ...errorResponses },
    }),
    (c) => {
      const { project, name } = c.req.valid('param');
      useProject(ctx, c, project);
      const w = ctx.store.get(WORKLOAD, project, name);
      return streamLogs(ctx, c, () => [w.id], c.req.valid('query')) as never;
    },
  );

  registerEventsRoute(app, ctx, { base, kind: WORKLOAD, tags });
}

