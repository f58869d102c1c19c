// The ingress over the API: its status, Berth's local CA certificate (what clients trust for
// HTTPS through the ingress), and the admin's static routes (host → backends the admin names
// directly; services and sandboxes own their routes through their reconcilers).
import { createRoute, z, type OpenAPIHono } from '@hono/zod-openapi';
import type { ApiContext } from '../context.js';
import type { AppEnv } from '../app.js';
import { body, errorResponses, json, requireAdmin } from './common.js';

const Route = z
  .strictObject({
    id: z.string().min(1).max(256),
    hosts: z.array(z.string()).min(1).max(100),
    backends: z.array(z.strictObject({ address: z.string(), port: z.number().int() })).max(1000),
    tls: z.enum(['local', 'acme', 'none']).default('local'),
    auth: z.strictObject({ token: z.string() }).optional(),
  })
  .openapi('IngressRoute');
const Routes = z.strictObject({ routes: z.array(Route).max(10_000) }).openapi('IngressRoutes');
const Status = z.record(z.string(), z.unknown()).openapi('IngressStatus');

export function registerIngressRoutes(app: OpenAPIHono<AppEnv>, ctx: ApiContext): void {
  app.openapi(createRoute({ method: 'get', path: '/v1/ingress', tags: ['ingress'], responses: { 200: json(Status), ...errorResponses } }), async (c) => {
    requireAdmin(c); // it lists every project's host names
    await ctx.ingress.settled(); // a change already under way (a reload) is shown applied
    return c.json(ctx.ingress.status() as never, 200);
  });
  app.openapi(
    createRoute({
      method: 'get',
      path: '/v1/ingress/ca.pem',
      tags: ['ingress'],
      responses: { 200: { description: "Berth's local CA certificate (PEM)", content: { 'application/x-pem-file': { schema: z.string() } } }, ...errorResponses },
    }),
    (c) => c.body(ctx.ingress.caCertPem(), 200, { 'content-type': 'application/x-pem-file' }) as never,
  );
  app.openapi(
    createRoute({ method: 'get', path: '/v1/ingress/ca', tags: ['ingress'], responses: { 200: json(z.object({ pem: z.string() }).openapi('IngressCa')), ...errorResponses } }),
    (c) => c.json({ pem: ctx.ingress.caCertPem() }, 200),
  );
  app.openapi(createRoute({ method: 'get', path: '/v1/ingress/routes', tags: ['ingress'], responses: { 200: json(Routes), ...errorResponses } }), (c) => {
    requireAdmin(c);
    return c.json({ routes: ctx.ingress.staticRoutes() } as never, 200);
  });
  app.openapi(
    createRoute({ method: 'put', path: '/v1/ingress/routes', tags: ['ingress'], request: { body: body(Routes) }, responses: { 200: json(Status), ...errorResponses } }),
    async (c) => {
      requireAdmin(c);
      const b = c.req.valid('json');
      await ctx.ingress.setRoutes(b.routes.map((r) => ({ ...r, hosts: r.hosts.map((h) => h.toLowerCase()) })));
      return c.json(ctx.ingress.status() as never, 200);
    },
  );
}
