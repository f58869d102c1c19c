// Warm pools of sandboxes: PUT one per image/tier/limits with a size; matching creates claim a
// started sandbox at once (see reconcilers/sandboxpools.ts).
import { createRoute, z, type OpenAPIHono } from '@hono/zod-openapi';
import { SANDBOXPOOL, type SandboxPoolResource, type SandboxPoolSpecT, type SandboxPoolStatusT } from '../../reconcilers/sandboxpools.js';
import type { AppEnv } from '../app.js';
import type { ApiContext } from '../context.js';
import { Isolation, Resources } from '../schemas.js';
import { ProjectNameParams, ProjectParams, body, errorResponses, json, useProject, view } from './common.js';
import { admitRunSpec } from './workloads.js';

const tags = ['sandboxes'];

const PoolSpec = z
  .strictObject({
    image: z.string().min(1).max(400).default('busybox'),
    isolation: Isolation.default('gvisor'),
    resources: Resources.optional(),
    size: z.number().int().min(0).max(100).openapi({ description: 'Started, unclaimed sandboxes to keep (0 = none)' }),
  })
  .openapi('SandboxPoolSpec');
const PutPool = z.strictObject({ spec: PoolSpec }).openapi('PutSandboxPool');
const Pool = z.object({ id: z.string(), name: z.string(), project: z.string(), spec: PoolSpec, status: z.object({ ready: z.number(), starting: z.number(), claimed: z.number() }).partial() }).passthrough().openapi('SandboxPool');

export function registerSandboxPoolRoutes(app: OpenAPIHono<AppEnv>, ctx: ApiContext): void {
  const base = '/v1/projects/{project}/sandbox-pools';

  app.openapi(
    createRoute({ method: 'put', path: `${base}/{name}`, tags, request: { params: ProjectNameParams, body: body(PutPool) }, responses: { 200: json(Pool), ...errorResponses } }),
    async (c) => {
      const { project, name } = c.req.valid('param');
      useProject(ctx, c, project);
      const { spec } = c.req.valid('json');
      await admitRunSpec(ctx, { isolation: spec.isolation, image: spec.image, resources: spec.resources });
      const cur = ctx.store.find<SandboxPoolSpecT, SandboxPoolStatusT>(SANDBOXPOOL, project, name);
      const r = cur
        ? ctx.store.updateSpec(cur.id, { spec })
        : ctx.store.create<SandboxPoolSpecT, SandboxPoolStatusT>(SANDBOXPOOL, { project, name, spec, status: { ready: 0, starting: 0, claimed: 0 } });
      ctx.kick(SANDBOXPOOL, r.id);
      return c.json(view(r as SandboxPoolResource) as never, 200);
    },
  );

  app.openapi(
    createRoute({ method: 'get', path: base, tags, request: { params: ProjectParams }, responses: { 200: json(z.object({ items: z.array(Pool) })), ...errorResponses } }),
    (c) => {
      const { project } = c.req.valid('param');
      useProject(ctx, c, project);
      return c.json({ items: ctx.store.list(SANDBOXPOOL, { project, limit: 1000 }).items.map((p) => view(p)) } as never, 200);
    },
  );

  app.openapi(
    createRoute({ method: 'get', path: `${base}/{name}`, tags, request: { params: ProjectNameParams }, responses: { 200: json(Pool), ...errorResponses } }),
    (c) => {
      const { project, name } = c.req.valid('param');
      useProject(ctx, c, project);
      return c.json(view(ctx.store.get(SANDBOXPOOL, project, name)) as never, 200);
    },
  );

  app.openapi(
    createRoute({ method: 'delete', path: `${base}/{name}`, tags, request: { params: ProjectNameParams }, responses: { 202: json(Pool, 'Deletion started: unclaimed members are killed'), ...errorResponses } }),
    (c) => {
      const { project, name } = c.req.valid('param');
      useProject(ctx, c, project);
      const p = ctx.store.get(SANDBOXPOOL, project, name);
      const r = ctx.store.markForDeletion(p.id);
      ctx.kick(SANDBOXPOOL, p.id);
      return c.json(view(r) as never, 202);
    },
  );
}
