import { createRoute, type OpenAPIHono } from '@hono/zod-openapi';
import { CreateProject, ListQuery, Project, listOf } from '../schemas.js';
import { failedPrecondition } from '../../core/errors.js';
import type { ApiContext } from '../context.js';
import type { AppEnv } from '../app.js';
import { PROJECT, ProjectParams, auth, body, errorResponses, json, requireAdmin, useProject, view } from './common.js';

const tags = ['projects'];

export function registerProjectRoutes(app: OpenAPIHono<AppEnv>, ctx: ApiContext): void {
  app.openapi(
    createRoute({ method: 'post', path: '/v1/projects', tags, request: { body: body(CreateProject) }, responses: { 201: json(Project, 'Created'), ...errorResponses } }),
    (c) => {
      requireAdmin(c);
      const b = c.req.valid('json');
      const p = ctx.store.create(PROJECT, { project: '', name: b.name, labels: b.labels ?? {}, spec: { description: b.spec?.description ?? '' }, status: {} });
      return c.json(view(p) as never, 201);
    },
  );

  app.openapi(
    createRoute({ method: 'get', path: '/v1/projects', tags, request: { query: ListQuery }, responses: { 200: json(listOf(Project, 'ProjectList')), ...errorResponses } }),
    (c) => {
      const q = c.req.valid('query');
      const a = auth(c);
      const res = ctx.store.list(PROJECT, { project: '', ...q });
      const items = res.items.filter((p) => a.project === null || p.name === a.project);
      return c.json({ items: items.map((p) => view(p)), nextPageToken: res.nextPageToken } as never, 200);
    },
  );

  app.openapi(
    createRoute({ method: 'get', path: '/v1/projects/{project}', tags, request: { params: ProjectParams }, responses: { 200: json(Project), ...errorResponses } }),
    (c) => {
      const { project } = c.req.valid('param');
      return c.json(view(useProject(ctx, c, project)) as never, 200);
    },
  );

  app.openapi(
    createRoute({ method: 'delete', path: '/v1/projects/{project}', tags, request: { params: ProjectParams }, responses: { 200: json(Project, 'Deleted'), ...errorResponses } }),
    (c) => {
      requireAdmin(c);
      const { project } = c.req.valid('param');
      const p = useProject(ctx, c, project);
      const counts = ['service', 'workload', 'job'].map((k) => [k, ctx.store.count(k, project)] as const).filter(([, n]) => n > 0);
      if (counts.length) {
        throw failedPrecondition(`project "${project}" still has ${counts.map(([k, n]) => `${n} ${k}(s)`).join(' and ')}; delete them first`);
      }
      ctx.store.remove(p.id);
      return c.json(view(p) as never, 200);
    },
  );
}
