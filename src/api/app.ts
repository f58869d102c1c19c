// The HTTP API: one Hono app served on TCP and on a unix socket. Validation happens here at the
// edge (zod schemas from ./schemas.ts); handlers receive typed input. Errors leave as
// { "error": { "code", "message" } } with the status from core/errors.ts's one table.
import { noteArrival } from '../lib/trace.js';
import { OpenAPIHono } from '@hono/zod-openapi';
import { bodyLimit } from 'hono/body-limit';
import { HTTPException } from 'hono/http-exception';
import type { Context } from 'hono';
import type { IncomingMessage } from 'node:http';
import type { Logger } from 'pino';
import { BerthError, invalidArgument, isBerthError } from '../core/errors.js';
import type { ApiContext, AuthInfo } from './context.js';
import { registerProjectRoutes } from './routes/projects.js';
import { registerWorkloadRoutes } from './routes/workloads.js';
import { registerJobRoutes } from './routes/jobs.js';
import { registerSandboxRoutes } from './routes/sandboxes.js';
import { registerSandboxPoolRoutes } from './routes/sandboxpools.js';
import { registerSystemRoutes } from './routes/system.js';
import { registerImageRoutes } from './routes/images.js';
import { registerIngressRoutes } from './routes/ingress.js';
import { registerServiceRoutes } from './routes/services.js';

export const MAX_BODY_BYTES = 1024 * 1024;

/** The whole body as UTF-8 text, or undefined once it is over `max` bytes (the rest is not read). */
function readBody(req: IncomingMessage, max: number): Promise<string | undefined> {
  const declared = Number(req.headers['content-length']);
  if (Number.isFinite(declared) && declared > max) return Promise.resolve(undefined);
  if (req.readableEnded) return Promise.resolve('');
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    const onData = (b: Buffer) => {
      size += b.length;
      if (size > max) {
        cleanup();
        req.pause();
        resolve(undefined);
        return;
      }
      chunks.push(b);
    };
    const onEnd = () => {
      cleanup();
      resolve(Buffer.concat(chunks, size).toString('utf8'));
    };
    const onError = (e: Error) => {
      cleanup();
      reject(e);
    };
    const cleanup = () => {
      req.off('data', onData);
      req.off('end', onEnd);
      req.off('error', onError);
    };
    req.on('data', onData);
    req.on('end', onEnd);
    req.on('error', onError);
  });
}

export type AppEnv = { Variables: { auth: AuthInfo } };

/** Turn zod issues into one message that names each bad field and what it must be. */
function describeIssues(issues: ReadonlyArray<{ path: ReadonlyArray<PropertyKey>; message: string; code?: string; keys?: string[] }>, target: string): string {
  return issues
    .slice(0, 10)
    .map((i) => {
      const path = i.path.map(String).join('.');
      if (i.code === 'unrecognized_keys' && i.keys) {
        return `${path ? `${path}: ` : ''}unknown field(s) ${i.keys.map((k) => `"${k}"`).join(', ')}; remove them (see /v1/openapi.json for the accepted fields)`;
      }
      return `${path || target}: ${i.message}`;
    })
    .join('; ');
}

export function createApp(ctx: ApiContext, log: Logger): OpenAPIHono<AppEnv> {
  const app = new OpenAPIHono<AppEnv>({
    defaultHook: (result, c) => {
      if (!result.success) {
        const target = (result as { target?: string }).target ?? 'request';
        const err = invalidArgument(`invalid ${target === 'json' ? 'request body' : target}: ${describeIssues(result.error.issues as never, target)}`);
        return c.json(err.toJSON(), 400);
      }
      return undefined;
    },
  });

  app.onError((e, c) => errorResponse(e, c, log));
  app.notFound((c) =>
    c.json(new BerthError('not_found', `no route for ${c.req.method} ${c.req.path}; see /v1/openapi.json for the API`).toJSON(), 404),
  );

  app.use('*', async (c, next) => {
    noteArrival(c.req.raw);
    const t0 = performance.now();
    await next();
    log.debug({ method: c.req.method, path: c.req.path, status: c.res.status, ms: +(performance.now() - t0).toFixed(1) }, 'request');
  });
  const tooLarge = (c: Context) => {
    // The rest of the body is not read: the connection cannot be reused.
    c.header('Connection', 'close');
    return c.json(invalidArgument(`request body is larger than ${MAX_BODY_BYTES} bytes (1 MiB); send a smaller body`).toJSON(), 400);
  };
  const limit = bodyLimit({ maxSize: MAX_BODY_BYTES, onError: tooLarge });
  const STREAMED_UPLOAD = /^\/v1\/projects\/[^/]+\/sandboxes\/[^/]+\/files$/;
  // Image archives and build contexts are streamed to their route (never held whole, no 1 MiB cap).
  const streamed = (c: Context) => (c.req.method === 'PUT' && STREAMED_UPLOAD.test(c.req.path)) || (c.req.method === 'POST' && /^\/v1\/images\/(import|build)$/.test(c.req.path));
  app.use('*', async (c, next) => {
    // Served by @hono/node-server: read the body straight from Node's request and hand it to
    // Hono's body cache, which c.req.json() (the validators) reads first. Going through the
    // fetch-API Request instead (what bodyLimit and c.req.json() do by default) builds an undici
    // Request and a web stream over the same bytes and takes several event-loop turns: most of
    // the ~1.4 ms between a POST's arrival and its handler in bench/start-latency.
    const incoming = (c.env as { incoming?: IncomingMessage } | undefined)?.incoming;
    if (!incoming) return streamed(c) ? next() : limit(c, next);
    if (c.req.method === 'GET' || c.req.method === 'HEAD') return next();
    // File uploads into a sandbox are streamed through in chunks (never held whole, no 1 MiB cap).
    if (streamed(c)) return next();
    const body = await readBody(incoming, MAX_BODY_BYTES);
    if (body === undefined) return tooLarge(c);
    // (Typed as the Body members themselves; at run time it holds their promises.)
    (c.req.bodyCache as Record<string, unknown>).text = Promise.resolve(body);
    return next();
  });
  app.use('*', async (c, next) => {
    const header = c.req.header('authorization') ?? '';
    const m = /^Bearer\s+(\S+)$/i.exec(header);
    if (!m) {
      throw new BerthError('unauthenticated', `missing API token: send "Authorization: Bearer <token>"; the admin token is in ${ctx.adminTokenPath}`);
    }
    const auth = ctx.tokens.verify(m[1]!);
    if (!auth) throw new BerthError('unauthenticated', 'the API token is not valid (revoked or mistyped); use the admin token or create a new one with POST /v1/tokens');
    c.set('auth', auth);
    await next();
  });

  registerSystemRoutes(app, ctx);
  registerProjectRoutes(app, ctx);
  registerWorkloadRoutes(app, ctx);
  registerJobRoutes(app, ctx);
  registerSandboxRoutes(app, ctx);
  registerSandboxPoolRoutes(app, ctx);
  registerImageRoutes(app, ctx);
  registerIngressRoutes(app, ctx);
  registerServiceRoutes(app, ctx);

  app.doc31('/v1/openapi.json', {
    openapi: '3.1.0',
    info: { title: 'Berth API', version: ctx.version, description: 'Self-hosted workloads with per-workload isolation.' },
  });
  app.openAPIRegistry.registerComponent('securitySchemes', 'bearer', { type: 'http', scheme: 'bearer' });
  return app;
}

export function errorResponse(e: unknown, c: Context, log: Logger): Response {
  if (isBerthError(e)) return c.json(e.toJSON(), e.httpStatus as 400);
  if (e instanceof HTTPException) {
    const msg = e.status === 400 ? `${e.message || 'bad request'}; send a valid JSON body with Content-Type: application/json` : e.message;
    const code = e.status === 401 ? 'unauthenticated' : e.status === 404 ? 'not_found' : e.status >= 500 ? 'internal' : 'invalid_argument';
    return c.json(new BerthError(code, msg).toJSON(), (e.status >= 500 ? 500 : e.status === 401 || e.status === 404 ? e.status : 400) as 400);
  }
  log.error({ err: e }, 'unhandled error');
  return c.json(new BerthError('internal', 'internal error; see the berthd log for details').toJSON(), 500);
}
