import { createRoute, z, type OpenAPIHono } from '@hono/zod-openapi';
import type { Context } from 'hono';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { ErrorBody, Event, Name } from '../schemas.js';
import { BerthError, notFound, permissionDenied } from '../../core/errors.js';
import type { ApiContext, AuthInfo } from '../context.js';
import type { Resource } from '../../store/resources.js';
import type { AppEnv } from '../app.js';

export const PROJECT = 'project';

export const errorResponses = {
  400: { description: 'Invalid argument', content: { 'application/json': { schema: ErrorBody } } },
  401: { description: 'Unauthenticated', content: { 'application/json': { schema: ErrorBody } } },
  403: { description: 'Permission denied', content: { 'application/json': { schema: ErrorBody } } },
  404: { description: 'Not found', content: { 'application/json': { schema: ErrorBody } } },
  409: { description: 'Already exists or conflict', content: { 'application/json': { schema: ErrorBody } } },
  412: { description: 'Failed precondition', content: { 'application/json': { schema: ErrorBody } } },
} as const;

export const json = <T extends z.ZodTypeAny>(schema: T, description = 'OK') => ({ description, content: { 'application/json': { schema } } });
export const body = <T extends z.ZodTypeAny>(schema: T) => ({ required: true, content: { 'application/json': { schema } } });

export const ProjectParams = z.strictObject({ project: Name.openapi({ param: { name: 'project', in: 'path' } }) });
export const ProjectNameParams = z.strictObject({
  project: Name.openapi({ param: { name: 'project', in: 'path' } }),
  name: Name.openapi({ param: { name: 'name', in: 'path' } }),
});

const signals = new WeakMap<IncomingMessage, AbortSignal>();

/**
 * The request's abort signal: aborted when the client goes away before the answer is complete. Under
 * @hono/node-server, c.req.raw.signal first builds the fetch-API Request (headers, a web stream over
 * the body: ~0.5 ms on a 2-core host, measured on the path of every sandbox create and command);
 * this watches Node's response instead, which is what node-server's own signal does too.
 */
export function requestSignal(c: Context): AbortSignal {
  const { incoming, outgoing } = (c.env ?? {}) as { incoming?: IncomingMessage; outgoing?: ServerResponse };
  if (!incoming || !outgoing) return c.req.raw.signal;
  let signal = signals.get(incoming);
  if (!signal) {
    const ac = new AbortController();
    outgoing.once('close', () => {
      if (!outgoing.writableFinished) ac.abort(incoming.errored ?? new Error('Client connection prematurely closed.'));
    });
    signal = ac.signal;
    signals.set(incoming, signal);
  }
  return signal;
}

export function auth(c: Context): AuthInfo {
  return c.get('auth') as AuthInfo;
}

export function requireAdmin(c: Context): void {
  if (auth(c).project !== null) throw permissionDenied('this token is limited to one project; use an admin token for this call');
}

/** The project must exist and the token must be allowed to use it. */
export function useProject(ctx: ApiContext, c: Context, project: string): Resource {
  const a = auth(c);
  if (a.project !== null && a.project !== project) {
    throw permissionDenied(`this token is limited to project "${a.project}"; use a token for project "${project}" or an admin token`);
  }
  const p = ctx.store.find(PROJECT, '', project);
  if (!p || p.deletionRequestedAt) throw notFound(`project "${project}" not found; create it with POST /v1/projects or \`berth project create ${project}\``);
  return p;
}

/** Public view of a resource: internal bookkeeping fields of the status are dropped. */
export function view<R extends Resource>(r: R, hide: string[] = []): Record<string, unknown> {
  const status = { ...(r.status as Record<string, unknown>) };
  for (const k of hide) delete status[k];
  return {
    id: r.id,
    name: r.name,
    project: r.project,
    labels: r.labels,
    spec: r.spec,
    status,
    generation: r.generation,
    observedGeneration: r.observedGeneration,
    resourceVersion: r.resourceVersion,
    createdAt: r.createdAt,
    updatedAt: r.updatedAt,
    deletionRequestedAt: r.deletionRequestedAt,
  };
}

export function getLive<S, T>(ctx: ApiContext, kind: string, project: string, name: string): Resource<S, T> {
  const r = ctx.store.get<S, T>(kind, project, name);
  if (r.deletionRequestedAt) throw notFound(`${kind} "${name}" is being deleted in project "${project}"`);
  return r;
}

export function assertNever(x: never): never {
  throw new BerthError('internal', `unexpected ${String(x)}`);
}

/** `GET {base}/{name}/events`: what happened to one resource, newest last (every kind that keeps events). */
export function registerEventsRoute(app: OpenAPIHono<AppEnv>, ctx: ApiContext, o: { base: string; kind: string; tags: string[]; description?: string }): void {
  app.openapi(
    createRoute({ method: 'get', path: `${o.base}/{name}/events`, tags: o.tags, request: { params: ProjectNameParams }, responses: { 200: json(z.object({ items: z.array(Event) }), o.description), ...errorResponses } }),
    (c) => {
      const { project, name } = c.req.valid('param');
      useProject(ctx, c, project);
      return c.json({ items: ctx.store.events(ctx.store.get(o.kind, project, name).id) } as never, 200);
    },
  );
}
