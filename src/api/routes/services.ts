import { createRoute, z, type OpenAPIHono } from '@hono/zod-openapi';
import { stream } from 'hono/streaming';
import { CreateService, ListQuery, RollbackService, ScaleService, Service, ServiceRevision, ServiceSpec, UpdateService, listOf } from '../schemas.js';
import { conflict, failedPrecondition, notFound } from '../../core/errors.js';
import type { ApiContext } from '../context.js';
import type { AppEnv } from '../app.js';
import { ProjectNameParams, ProjectParams, body, errorResponses, getLive, json, useProject, registerEventsRoute, view } from './common.js';
import { admitRunSpec } from './workloads.js';
import { readLog } from '../logs.js';
import { SERVICE, initialServiceStatus, withTemplate, type ServiceResource, type StoredServiceStatus } from '../../reconcilers/services.js';
import { WORKLOAD, type StoredWorkloadStatus } from '../../reconcilers/workloads.js';
import type { WorkloadSpec } from '../schemas.js';

const tags = ['services'];
const serviceView = (s: ServiceResource) => view(s, ['progressMark']);

/** A public tcp port's host port is the service's alone: not another service's, not the ingress's own. */
function checkHostPorts(ctx: ApiContext, project: string, name: string, spec: ServiceSpec): void {
  const want = spec.ports.flatMap((p) => (p.hostPort === undefined ? [] : [p.hostPort]));
  if (!want.length) return;
  const ing = ctx.ingress.opts.settings;
  for (const [l, what] of [[ing.http, 'HTTP'], [ing.https, 'HTTPS']] as const) {
    if (l && want.includes(l.port)) throw conflict(`host port ${l.port} is the ingress's ${what} port; choose another hostPort`);
  }
  for (let page: string | null | undefined; page !== null; ) {
    const res = ctx.store.list<ServiceSpec, StoredServiceStatus>(SERVICE, { limit: 1000, ...(page ? { pageToken: page } : {}) });
    for (const o of res.items) {
      if (o.deletionRequestedAt || (o.project === project && o.name === name)) continue;
      const clash = o.spec.ports.find((p) => p.hostPort !== undefined && want.includes(p.hostPort));
      if (clash) throw conflict(`host port ${clash.hostPort} is already published by service "${o.name}" in project "${o.project}"; choose another hostPort`);
    }
    page = res.nextPageToken;
  }
}

const LogQuery = z.strictObject({
  follow: z.enum(['true', 'false', '1', '0']).optional(),
  tail: z.coerce.number().int().min(0).max(1_000_000).optional().openapi({ description: 'Lines per replica' }),
});

export function registerServiceRoutes(app: OpenAPIHono<AppEnv>, ctx: ApiContext): void {
  const base = '/v1/projects/{project}/services';
  const live = (project: string, name: string) => getLive<ServiceSpec, StoredServiceStatus>(ctx, SERVICE, project, name) as ServiceResource;

  app.openapi(
    createRoute({ method: 'post', path: base, tags, request: { params: ProjectParams, body: body(CreateService) }, responses: { 201: json(Service, 'Created'), ...errorResponses } }),
    async (c) => {
      const { project } = c.req.valid('param');
      const b = c.req.valid('json');
      useProject(ctx, c, project);
      await admitRunSpec(ctx, b.spec);
      checkHostPorts(ctx, project, b.name, b.spec);
      const s = ctx.store.create<ServiceSpec, StoredServiceStatus>(SERVICE, { project, name: b.name, labels: b.labels ?? {}, spec: b.spec, status: initialServiceStatus() });
      ctx.store.addEvent(s.id, 'Created', `service created (image ${b.spec.image}, ${b.spec.replicas} replica(s))`);
      ctx.kick(SERVICE, s.id);
      return c.json(serviceView(s as ServiceResource) as never, 201);
    },
  );

  app.openapi(
    createRoute({ method: 'get', path: base, tags, request: { params: ProjectParams, query: ListQuery }, responses: { 200: json(listOf(Service, 'ServiceList')), ...errorResponses } }),
    (c) => {
      const { project } = c.req.valid('param');
      useProject(ctx, c, project);
      const res = ctx.store.list<ServiceSpec, StoredServiceStatus>(SERVICE, { project, ...c.req.valid('query') });
      return c.json({ items: res.items.map((s) => serviceView(s as ServiceResource)), nextPageToken: res.nextPageToken } as never, 200);
    },
  );

  app.openapi(
    createRoute({ method: 'get', path: `${base}/{name}`, tags, request: { params: ProjectNameParams }, responses: { 200: json(Service), ...errorResponses } }),
    (c) => {
      const { project, name } = c.req.valid('param');
      useProject(ctx, c, project);
      return c.json(serviceView(ctx.store.get(SERVICE, project, name) as ServiceResource) as never, 200);
    },
  );

  app.openapi(
    createRoute({
      method: 'put',
      path: `${base}/{name}`,
      tags,
      summary: 'Deploy: replace the spec; a changed replica template rolls out as a new revision',
      request: { params: ProjectNameParams, body: body(UpdateService) },
      responses: { 200: json(Service), ...errorResponses },
    }),
    async (c) => {
      const { project, name } = c.req.valid('param');
      const b = c.req.valid('json');
      useProject(ctx, c, project);
      const s = live(project, name);
      await admitRunSpec(ctx, b.spec);
      checkHostPorts(ctx, project, name, b.spec);
      const r = ctx.store.updateSpec(s.id, { spec: b.spec, ...(b.labels ? { labels: b.labels } : {}) }, b.resourceVersion);
      ctx.kick(SERVICE, s.id);
      return c.json(serviceView(r as ServiceResource) as never, 200);
    },
  );

  app.openapi(
    createRoute({ method: 'patch', path: `${base}/{name}`, tags, summary: 'Scale: change spec.replicas only', request: { params: ProjectNameParams, body: body(ScaleService) }, responses: { 200: json(Service), ...errorResponses } }),
    (c) => {
      const { project, name } = c.req.valid('param');
      const b = c.req.valid('json');
      useProject(ctx, c, project);
      const s = live(project, name);
      const r = s.spec.replicas === b.replicas ? s : ctx.store.updateSpec(s.id, { spec: { ...s.spec, replicas: b.replicas } }, b.resourceVersion);
      ctx.kick(SERVICE, s.id);
      return c.json(serviceView(r as ServiceResource) as never, 200);
    },
  );

  app.openapi(
    createRoute({
      method: 'post',
      path: `${base}/{name}/rollback`,
      tags,
      summary: "Re-deploy an earlier revision's template as a new revision (default: the one before the current)",
      request: { params: ProjectNameParams, body: { required: false, content: { 'application/json': { schema: RollbackService } } } },
      responses: { 200: json(Service), ...errorResponses },
    }),
    (c) => {
      const { project, name } = c.req.valid('param');
      const b = (c.req.valid('json') ?? {}) as z.infer<typeof RollbackService>;
      useProject(ctx, c, project);
      const s = live(project, name);
      const revs = s.status.revisions;
      const list = revs.map((r) => `${r.number} (${r.outcome})`).join(', ') || 'none yet';
      let to;
      if (b.revision !== undefined) {
        to = revs.find((r) => r.number === b.revision);
        if (!to) throw notFound(`service "${name}" has no revision ${b.revision} in its history; revisions: ${list}`);
      } else {
        to = [...revs].reverse().find((r) => r.number !== s.status.currentRevision && r.number < (s.status.currentRevision ?? 0) && r.outcome !== 'failed');
        if (!to) throw failedPrecondition(`service "${name}" has no earlier good revision to roll back to (revisions: ${list}); name one with {"revision": N}`);
      }
      if (to.number === s.status.currentRevision && s.status.targetRevision === s.status.currentRevision) {
        throw failedPrecondition(`revision ${to.number} of service "${name}" is already the one serving; pick another revision (revisions: ${list})`);
      }
      const r = ctx.store.updateSpec(s.id, { spec: withTemplate(s.spec, to.template) });
      ctx.store.addEvent(s.id, 'RollbackRequested', `rollback to the template of revision ${to.number} requested`);
      ctx.kick(SERVICE, s.id);
      return c.json(serviceView(r as ServiceResource) as never, 200);
    },
  );

  app.openapi(
    createRoute({
      method: 'get',
      path: `${base}/{name}/revisions`,
      tags,
      request: { params: ProjectNameParams },
      responses: { 200: json(z.object({ items: z.array(ServiceRevision), currentRevision: z.number().int().optional(), targetRevision: z.number().int().optional() })), ...errorResponses },
    }),
    (c) => {
      const { project, name } = c.req.valid('param');
      useProject(ctx, c, project);
      const s = ctx.store.get<ServiceSpec, StoredServiceStatus>(SERVICE, project, name);
      return c.json({ items: [...s.status.revisions].reverse(), currentRevision: s.status.currentRevision, targetRevision: s.status.targetRevision } as never, 200);
    },
  );

  app.openapi(
    createRoute({ method: 'delete', path: `${base}/{name}`, tags, request: { params: ProjectNameParams }, responses: { 202: json(Service, 'Deletion started'), ...errorResponses } }),
    (c) => {
      const { project, name } = c.req.valid('param');
      useProject(ctx, c, project);
      const s = ctx.store.get(SERVICE, project, name);
      const r = ctx.store.markForDeletion(s.id);
      ctx.kick(SERVICE, s.id);
      return c.json(serviceView(r as ServiceResource) as never, 202);
    },
  );

  registerEventsRoute(app, ctx, { base, kind: SERVICE, tags });

  app.openapi(
    createRoute({
      method: 'get',
      path: `${base}/{name}/logs`,
      tags,
      summary: "The replicas' logs merged, each line prefixed with its replica's name",
      request: { params: ProjectNameParams, query: LogQuery },
      responses: { 200: { description: 'Log stream', content: { 'text/plain': { schema: z.string() } } }, ...errorResponses },
    }),
    (c) => {
      const { project, name } = c.req.valid('param');
      const q = c.req.valid('query');
      useProject(ctx, c, project);
      const s = ctx.store.get(SERVICE, project, name);
      const follow = q.follow === 'true' || q.follow === '1';
      c.header('Content-Type', 'text/plain; charset=utf-8');
      return stream(c, async (out) => {
        const ac = new AbortController();
        out.onAbort(() => ac.abort());
        const started = new Set<string>();
        const readers: Promise<void>[] = [];
        // Writes are chained so lines of different replicas never interleave mid-line.
        let chain: Promise<unknown> = Promise.resolve();
        const follow1 = (id: string, replica: string) => async () => {
          const w = ctx.store.getById<WorkloadSpec, StoredWorkloadStatus>(id);
          const driver = (w && ctx.drivers.get(w.spec.isolation)) ?? ctx.drivers.all()[0]!;
          const gone = () => !ctx.store.getById(id);
          for await (const l of readLog(driver.logPath(id), { follow, ...(q.tail !== undefined ? { tail: q.tail } : {}), finished: gone, signal: ac.signal })) {
            chain = chain.then(() => out.write(`${replica} | ${l.text}${l.partial ? '' : '\n'}`));
          }
        };
        for (;;) {
          for (const w of ctx.store.list(WORKLOAD, { ownerId: s.id, limit: 1000 }).items) {
            if (started.has(w.id)) continue;
            started.add(w.id);
            readers.push(follow1(w.id, w.name)().catch(() => undefined));
          }
          if (!follow || ac.signal.aborted || !ctx.store.getById(s.id)) break;
          await new Promise((r) => setTimeout(r, 500));
        }
        await Promise.all(readers);
        await chain;
      }) as never;
    },
  );
}
