import { createRoute, z, type OpenAPIHono } from '@hono/zod-openapi';
import { CreateToken, Name } from '../schemas.js';
import { notFound } from '../../core/errors.js';
import type { ApiContext } from '../context.js';
import type { AppEnv } from '../app.js';
import { PROJECT, body, errorResponses, json, requireAdmin } from './common.js';

const Fingerprint = z
  .object({
    driver: z.string(),
    isolation: z.string(),
    healthy: z.boolean(),
    reason: z.string(),
    version: z.string().optional(),
    attributes: z.record(z.string(), z.string()),
    capabilities: z.record(z.string(), z.unknown()),
  })
  .openapi('DriverInfo');
const Info = z.object({ version: z.string(), drivers: z.array(Fingerprint), isolations: z.array(z.string()) }).openapi('Info');
const Token = z.object({ id: z.string(), name: z.string(), project: z.string().nullable(), createdAt: z.string(), token: z.string().optional() }).openapi('Token');

export function registerSystemRoutes(app: OpenAPIHono<AppEnv>, ctx: ApiContext): void {
  app.openapi(createRoute({ method: 'get', path: '/v1/info', tags: ['system'], responses: { 200: json(Info), ...errorResponses } }), async (c) => {
    const drivers = await Promise.all(ctx.drivers.all().map(async (d) => ({ ...(await d.fingerprint()), capabilities: { ...d.capabilities } })));
    return c.json({ version: ctx.version, drivers, isolations: ['container', 'gvisor', 'microvm'] } as never, 200);
  });

  app.openapi(
    createRoute({ method: 'post', path: '/v1/tokens', tags: ['tokens'], request: { body: body(CreateToken) }, responses: { 201: json(Token, 'Created; the secret is shown only once'), ...errorResponses } }),
    (c) => {
      requireAdmin(c);
      const b = c.req.valid('json');
      if (b.project && !ctx.store.find(PROJECT, '', b.project)) throw notFound(`project "${b.project}" not found; create it first`);
      const { token, record } = ctx.tokens.create(b.name, b.project ?? null);
      return c.json({ ...record, token } as never, 201);
    },
  );
  app.openapi(createRoute({ method: 'get', path: '/v1/tokens', tags: ['tokens'], responses: { 200: json(z.object({ items: z.array(Token) })), ...errorResponses } }), (c) => {
    requireAdmin(c);
    return c.json({ items: ctx.tokens.list() } as never, 200);
  });
  app.openapi(
    createRoute({
      method: 'delete',
      path: '/v1/tokens/{name}',
      tags: ['tokens'],
      request: { params: z.strictObject({ name: Name.openapi({ param: { name: 'name', in: 'path' } }) }) },
      responses: { 204: { description: 'Deleted' }, ...errorResponses },
    }),
    (c) => {
      requireAdmin(c);
      ctx.tokens.remove(c.req.valid('param').name);
      return c.body(null, 204);
    },
  );
}
