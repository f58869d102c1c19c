import { createRoute, z, type OpenAPIHono } from '@hono/zod-openapi';
import { CreateJob, Job, JobRun, ListQuery, Name, UpdateJob, listOf, type JobRunSpecT, type JobRunStatusT, type JobSpec } from '../schemas.js';
import { failedPrecondition } from '../../core/errors.js';
import type { ApiContext } from '../context.js';
import type { AppEnv } from '../app.js';
import { ProjectNameParams, ProjectParams, body, errorResponses, getLive, json, useProject, registerEventsRoute, view } from './common.js';
import { JOB, JOBRUN, triggerRun, type StoredJobStatus } from '../../reconcilers/jobs.js';
import { WORKLOAD } from '../../reconcilers/workloads.js';
import { admitRunSpec, streamLogs } from './workloads.js';

const tags = ['jobs'];
const HIDDEN = ['runSeq'];
const RunParams = ProjectNameParams.extend({ run: Name.openapi({ param: { name: 'run', in: 'path' } }) });
const LogQuery = z.strictObject({
  follow: z.enum(['true', 'false', '1', '0']).optional(),
  timestamps: z.enum(['true', 'false', '1', '0']).optional(),
  format: z.enum(['text', 'ndjson']).optional(),
});

export function registerJobRoutes(app: OpenAPIHono<AppEnv>, ctx: ApiContext): void {
  const base = '/v1/projects/{project}/jobs';

  const getRun = (project: string, job: string, run: string) => {
    const j = getLive<JobSpec, StoredJobStatus>(ctx, JOB, project, job);
    const r = ctx.store.get<JobRunSpecT, JobRunStatusT>(JOBRUN, project, run);
    if (r.ownerId !== j.id) throw failedPrecondition(`run "${run}" does not belong to job "${job}"`);
    return { j, r };
  };

  app.openapi(
    createRoute({ method: 'post', path: base, tags, request: { params: ProjectParams, body: body(CreateJob) }, responses: { 201: json(Job, 'Created'), ...errorResponses } }),
    async (c) => {
      const { project } = c.req.valid('param');
      const b = c.req.valid('json');
      useProject(ctx, c, project);
      await admitRunSpec(ctx, b.spec.template);
      const j = ctx.store.create(JOB, { project, name: b.name, labels: b.labels ?? {}, spec: b.spec, status: { active: [] } });
      ctx.kick(JOB, j.id);
      return c.json(view(j, HIDDEN) as never, 201);
    },
  );

  app.openapi(
    createRoute({ method: 'get', path: base, tags, request: { params: ProjectParams, query: ListQuery }, responses: { 200: json(listOf(Job, 'JobList')), ...errorResponses } }),
    (c) => {
      const { project } = c.req.valid('param');
      useProject(ctx, c, project);
      const res = ctx.store.list(JOB, { project, ...c.req.valid('query') });
      return c.json({ items: res.items.map((j) => view(j, HIDDEN)), nextPageToken: res.nextPageToken } as never, 200);
    },
  );

  app.openapi(
    createRoute({ method: 'get', path: `${base}/{name}`, tags, request: { params: ProjectNameParams }, responses: { 200: json(Job), ...errorResponses } }),
    (c) => {
      const { project, name } = c.req.valid('param');
      useProject(ctx, c, project);
      return c.json(view(ctx.store.get(JOB, project, name), HIDDEN) as never, 200);
    },
  );

  app.openapi(
    createRoute({ method: 'put', path: `${base}/{name}`, tags, request: { params: ProjectNameParams, body: body(UpdateJob) }, responses: { 200: json(Job), ...errorResponses } }),
    async (c) => {
      const { project, name } = c.req.valid('param');
      const b = c.req.valid('json');
      useProject(ctx, c, project);
      const j = getLive(ctx, JOB, project, name);
      await admitRunSpec(ctx, b.spec.template);
      const u = ctx.store.updateSpec(j.id, { spec: b.spec, ...(b.labels ? { labels: b.labels } : {}) }, b.resourceVersion);
      ctx.kick(JOB, j.id);
      return c.json(view(u, HIDDEN) as never, 200);
    },
  );

  app.openapi(
    createRoute({ method: 'delete', path: `${base}/{name}`, tags, request: { params: ProjectNameParams }, responses: { 202: json(Job, 'Deletion started'), ...errorResponses } }),
    (c) => {
      const { project, name } = c.req.valid('param');
      useProject(ctx, c, project);
      const j = ctx.store.get(JOB, project, name);
      const r = ctx.store.markForDeletion(j.id);
      ctx.kick(JOB, j.id);
      return c.json(view(r, HIDDEN) as never, 202);
    },
  );

  app.openapi(
    createRoute({ method: 'post', path: `${base}/{name}/runs`, tags, request: { params: ProjectNameParams }, responses: { 201: json(JobRun, 'Run created'), ...errorResponses } }),
    (c) => {
      const { project, name } = c.req.valid('param');
      useProject(ctx, c, project);
      const j = getLive(ctx, JOB, project, name);
      const run = triggerRun(ctx.store, j.id, 'manual')!;
      ctx.kick(JOBRUN, run.id);
      ctx.kick(JOB, j.id);
      return c.json(view(run) as never, 201);
    },
  );

  app.openapi(
    createRoute({ method: 'get', path: `${base}/{name}/runs`, tags, request: { params: ProjectNameParams }, responses: { 200: json(listOf(JobRun, 'JobRunList')), ...errorResponses } }),
    (c) => {
      const { project, name } = c.req.valid('param');
      useProject(ctx, c, project);
      const j = ctx.store.get(JOB, project, name);
      const runs = ctx.store.list(JOBRUN, { ownerId: j.id, limit: 1000 }).items.sort((a, b) => b.createdAt.localeCompare(a.createdAt));
      return c.json({ items: runs.map((r) => view(r)), nextPageToken: null } as never, 200);
    },
  );

  app.openapi(
    createRoute({ method: 'get', path: `${base}/{name}/runs/{run}`, tags, request: { params: RunParams }, responses: { 200: json(JobRun), ...errorResponses } }),
    (c) => {
      const { project, name, run } = c.req.valid('param');
      useProject(ctx, c, project);
      return c.json(view(getRun(project, name, run).r) as never, 200);
    },
  );

  app.openapi(
    createRoute({ method: 'post', path: `${base}/{name}/runs/{run}/cancel`, tags, request: { params: RunParams }, responses: { 200: json(JobRun), ...errorResponses } }),
    (c) => {
      const { project, name, run } = c.req.valid('param');
      useProject(ctx, c, project);
      const { r } = getRun(project, name, run);
      const u = ctx.store.updateSpec(r.id, { spec: { ...r.spec, cancel: true } });
      ctx.kick(JOBRUN, r.id);
      return c.json(view(u) as never, 200);
    },
  );

  app.openapi(
    createRoute({
      method: 'get',
      path: `${base}/{name}/runs/{run}/logs`,
      tags,
      request: { params: RunParams, query: LogQuery },
      responses: { 200: { description: 'Logs of every attempt, in order', content: { 'text/plain': { schema: z.string() } } }, ...errorResponses },
    }),
    (c) => {
      const { project, name, run } = c.req.valid('param');
      useProject(ctx, c, project);
      const { r } = getRun(project, name, run);
      const attempts = () => {
        const cur = ctx.store.getById<JobRunSpecT, JobRunStatusT>(r.id);
        if (!cur) return [];
        return cur.status.attempts.map((a) => ctx.store.find(WORKLOAD, project, a.workload)?.id).filter((x): x is string => !!x);
      };
      const finished = () => {
        const cur = ctx.store.getById<JobRunSpecT, JobRunStatusT>(r.id);
        return !cur || ['succeeded', 'failed', 'cancelled'].includes(cur.status.phase);
      };
      return streamLogs(ctx, c, attempts, c.req.valid('query'), finished) as never;
    },
  );

  registerEventsRoute(app, ctx, { base, kind: JOB, tags });
}
