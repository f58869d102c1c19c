// Images: list, pull (optionally streaming per-layer progress as NDJSON), inspect, delete.
// Images are host-wide (not per project). References travel in the body or the query string
// (they contain "/" and ":"), e.g. GET /v1/images/inspect?ref=127.0.0.1:5000/team/app:v1.
// Registry credentials given to a pull are used for that pull only: never stored, never logged.
import { createRoute, z, type OpenAPIHono } from '@hono/zod-openapi';
import { stream } from 'hono/streaming';
import type { Context } from 'hono';
import type { IncomingMessage } from 'node:http';
import { Readable } from 'node:stream';
import { BerthError, isBerthError } from '../../core/errors.js';
import { ImageService } from '../../images/catalog.js';
import { REF_HINT, parseRef } from '../../images/ref.js';
import type { LayerProgress } from '../../images/registry.js';
import type { ApiContext } from '../context.js';
import type { AppEnv } from '../app.js';
import { body, errorResponses, json, requireAdmin } from './common.js';

const tags = ['images'];

const ImageRef = z
  .string()
  .min(1)
  .max(400)
  .superRefine((v, c) => {
    if (v === 'busybox' || v === 'busybox:latest') return;
    try {
      parseRef(v);
    } catch {
      c.addIssue({ code: 'custom', message: `"${v.slice(0, 100)}" is not a valid image reference; ${REF_HINT}` });
    }
  })
  .openapi({ example: '127.0.0.1:5000/team/app:v1' });

const ProcessConfig = z.object({
  env: z.record(z.string(), z.string()),
  entrypoint: z.array(z.string()),
  cmd: z.array(z.string()),
  workingDir: z.string(),
  user: z.string(),
});

export const ImageSummary = z
  .object({
    ref: z.string(),
    digest: z.string(),
    size: z.number().int().openapi({ description: 'Bytes of config and layers as stored (compressed); 0 for the built-in image' }),
    layers: z.number().int(),
    builtin: z.boolean(),
    created: z.string().optional(),
  })
  .openapi('ImageSummary');

export const ImageDetailSchema = ImageSummary.extend({
  mediaType: z.string(),
  os: z.string().optional(),
  architecture: z.string().optional(),
  config: ProcessConfig,
  layerDescriptors: z.array(z.object({ digest: z.string(), size: z.number().int(), mediaType: z.string() })),
  unpacked: z.boolean(),
  labels: z.record(z.string(), z.string()),
}).openapi('Image');

const PullRequest = z
  .strictObject({
    ref: ImageRef,
    auth: z
      .strictObject({
        username: z.string().min(1).max(256),
        password: z.string().min(1).max(8192),
      })
      .optional()
      .openapi({ description: 'Registry credentials for this pull only (not stored, not logged)' }),
    progress: z.boolean().default(false).openapi({
      description: 'Stream application/x-ndjson: {"progress": {...}} per layer event, then {"image": {...}} or {"error": {...}}',
    }),
  })
  .openapi('PullImage');

const RefQuery = z.strictObject({ ref: ImageRef });

const ImportQuery = z.strictObject({
  tag: ImageRef.optional().openapi({ description: 'Name to import the image as (an archive of one image); default: the names in the archive' }),
});

const ExportQuery = z.strictObject({
  ref: ImageRef,
  format: z.enum(['oci', 'docker']).default('oci').openapi({ description: 'oci: an OCI archive (tar of an OCI layout); docker: a `docker load`-able archive (also an OCI layout)' }),
});

/** The request body as a Node stream (straight from node:http when served by it). */
export function requestBody(c: Context): Readable {
  const incoming = (c.env as { incoming?: IncomingMessage } | undefined)?.incoming;
  if (incoming) return incoming;
  const b = c.req.raw.body;
  return b ? Readable.fromWeb(b as never) : Readable.from([]);
}

const RemoveResult = z
  .object({ ref: z.string(), digest: z.string(), removedBlobs: z.array(z.string()), freedBytes: z.number().int() })
  .openapi('ImageRemoved');

/**
 * Image references still needed by workloads, jobs and job runs (any project), keyed by their
 * canonical store key, with who uses them.
 */
export function imagesInUse(ctx: Pick<ApiContext, 'store'>): { refs: Map<string, string[]> } {
  const refs = new Map<string, string[]>();
  for (const kind of ['workload', 'job', 'jobrun']) {
    let page: string | null = null;
    do {
      const res: { items: { name: string; project: string; spec: unknown }[]; nextPageToken: string | null } = ctx.store.list(kind, { limit: 1000, ...(page ? { pageToken: page } : {}) });
      for (const r of res.items) {
        const spec = r.spec as { image?: string; template?: { image?: string } };
        const image = spec.image ?? spec.template?.image;
        const key = image && ImageService.key(image);
        if (!key) continue;
        const list = refs.get(key) ?? [];
        list.push(`${kind} ${r.project}/${r.name}`);
        refs.set(key, list);
      }
      page = res.nextPageToken;
    } while (page);
  }
  return { refs };
}

/**
 * Answer with an NDJSON stream: {"progress": …} per layer event (byte counts at most every 100 ms,
 * state changes always), {"log": "…"} lines, then {<resultKey>: …} or {"error": …}. A client that
 * goes away aborts `ac`.
 */
export function ndjsonStream(
  c: Context,
  ac: AbortController,
  work: (onProgress: (p: LayerProgress) => void, log: (line: string) => void) => Promise<unknown>,
  resultKey: string,
): Response {
  c.header('Content-Type', 'application/x-ndjson');
  return stream(c, async (s) => {
    s.onAbort(() => ac.abort());
    const write = (o: unknown) => s.write(`${JSON.stringify(o)}\n`);
    let last = 0;
    let pending: Promise<unknown> = Promise.resolve();
    const onProgress = (p: LayerProgress) => {
      const now = Date.now();
      if ((p.status === 'downloading' || p.status === 'uploading') && p.bytes > 0 && p.bytes < p.size && now - last < 100) return;
      last = now;
      pending = pending.then(() => write({ progress: p }));
    };
    const log = (line: string) => void (pending = pending.then(() => write({ log: line })));
    let result: unknown;
    try {
      result = await work(onProgress, log);
    } catch (e) {
      await pending;
      const err = isBerthError(e) ? e : new BerthError('internal', `${(e as Error).message}`);
      await write(err.toJSON());
      return;
    }
    await pending;
    await write({ [resultKey]: result });
  });
}

const RegistryHost = z
  .string()
  .min(1)
  .max(255)
  .superRefine((v, c) => {
    let ok = false;
    try {
      ok = parseRef(`${v}/x`).registry === v;
    } catch {
      /* reported below */
    }
    if (!ok) c.addIssue({ code: 'custom', message: `"${v.slice(0, 100)}" is not a registry host[:port] such as "127.0.0.1:5000" or "registry.example.com"` });
  })
  .openapi({ example: '127.0.0.1:5000' });

const Auth = z
  .strictObject({ username: z.string().min(1).max(256), password: z.string().min(1).max(8192) })
  .optional()
  .openapi({ description: 'Registry credentials for this call only (not stored, not logged); default: those stored with POST /v1/registries/login' });

const PushRequest = z
  .strictObject({
    ref: ImageRef,
    auth: Auth,
    progress: z.boolean().default(false).openapi({ description: 'Stream application/x-ndjson: {"progress": {...}} per layer, then {"result": {...}} or {"error": {...}}' }),
  })
  .openapi('PushImage');

const PushResultSchema = z
  .object({ ref: z.string(), digest: z.string(), uploaded: z.array(z.string()), mounted: z.array(z.string()), existing: z.array(z.string()) })
  .openapi('ImagePushed');

const TagRequest = z.strictObject({ source: ImageRef, target: ImageRef }).openapi('TagImage');

const LoginRequest = z.strictObject({ registry: RegistryHost, username: z.string().min(1).max(256), password: z.string().min(1).max(8192) }).openapi('RegistryLogin');
const RegistryEntry = z.object({ registry: z.string(), username: z.string() }).openapi('RegistryCredentials');

const BaseRequest = z
  .strictObject({
    kind: z.enum(['debian', 'busybox']),
    suite: z.string().regex(/^[a-z][a-z0-9-]{1,30}$/, { message: 'must be a Debian suite name such as "bookworm"' }).optional().openapi({ description: 'Debian suite (default bookworm); debian only' }),
    include: z.array(z.string().regex(/^[a-z0-9][a-z0-9+.-]{0,99}$/, { message: 'must be a Debian package name' })).max(200).optional().openapi({ description: 'Extra packages; debian only' }),
    tag: ImageRef.optional().openapi({ description: 'Default: localhost/debian:<suite>[-<hash of packages>] or localhost/busybox:latest' }),
    progress: z.boolean().default(false).openapi({ description: 'Stream application/x-ndjson: {"log": "..."} lines, then {"result": {...}} or {"error": {...}}' }),
  })
  .openapi('BaseImage');

const BuildQuery = z.strictObject({
  tag: ImageRef.openapi({ description: 'Name of the built image, e.g. app:v1' }),
  dockerfile: z.string().min(1).max(1024).optional().openapi({ description: 'Path of the Dockerfile inside the context (default Dockerfile)' }),
  buildArg: z
    .union([z.string(), z.array(z.string())])
    .optional()
    .transform((v) => (v === undefined ? [] : Array.isArray(v) ? v : [v]))
    .pipe(z.array(z.string().regex(/^[A-Za-z_][A-Za-z0-9_]*=/, { message: 'build args are KEY=VALUE' }).max(8192)).max(200))
    .openapi({ description: 'KEY=VALUE, repeatable' }),
  network: z.enum(['true', 'false']).optional().openapi({ description: 'true: RUN steps get the host network (default: none)' }),
});

export function registerImageRoutes(app: OpenAPIHono<AppEnv>, ctx: ApiContext): void {
  const images = ctx.images;

  app.openapi(
    createRoute({ method: 'get', path: '/v1/images', tags, responses: { 200: json(z.object({ items: z.array(ImageSummary) }).openapi('ImageList')), ...errorResponses } }),
    async (c) => c.json({ items: await images.summaries() } as never, 200),
  );

  app.openapi(
    createRoute({ method: 'get', path: '/v1/images/inspect', tags, request: { query: RefQuery }, responses: { 200: json(ImageDetailSchema), ...errorResponses } }),
    async (c) => c.json((await images.inspect(c.req.valid('query').ref)) as never, 200),
  );

  app.openapi(
    createRoute({
      method: 'post',
      path: '/v1/images/pull',
      tags,
      request: { body: body(PullRequest) },
      responses: { 200: { description: 'Pulled (and unpacked); with progress: true, an NDJSON stream', content: { 'application/json': { schema: ImageDetailSchema }, 'application/x-ndjson': { schema: z.string() } } }, ...errorResponses },
    }),
    async (c) => {
      const b = c.req.valid('json');
      // Only a streaming client that goes away cancels its pull (s.onAbort below).
      const ac = new AbortController();
      const req = { ref: b.ref, ...(b.auth ? { credentials: b.auth } : {}), signal: ac.signal };
      if (!b.progress) return c.json((await images.pull(req)) as never, 200);
      return ndjsonStream(c, ac, (onProgress) => images.pull({ ...req, onProgress }), 'image') as never;
    },
  );

  app.openapi(
    createRoute({
      method: 'post',
      path: '/v1/images/push',
      tags,
      request: { body: body(PushRequest) },
      responses: { 200: { description: 'Pushed; with progress: true, an NDJSON stream', content: { 'application/json': { schema: PushResultSchema }, 'application/x-ndjson': { schema: z.string() } } }, ...errorResponses },
    }),
    async (c) => {
      requireAdmin(c);
      const b = c.req.valid('json');
      const ac = new AbortController();
      const req = { ref: b.ref, ...(b.auth ? { credentials: b.auth } : {}), signal: ac.signal };
      if (!b.progress) return c.json((await images.push(req)) as never, 200);
      return ndjsonStream(c, ac, (onProgress) => images.push({ ...req, onProgress }), 'result') as never;
    },
  );

  app.openapi(
    createRoute({ method: 'post', path: '/v1/images/tag', tags, request: { body: body(TagRequest) }, responses: { 200: json(ImageDetailSchema, 'The target now names the source image'), ...errorResponses } }),
    async (c) => {
      requireAdmin(c);
      const b = c.req.valid('json');
      return c.json((await images.tag(b.source, b.target)) as never, 200);
    },
  );

  app.openapi(
    createRoute({ method: 'get', path: '/v1/registries', tags, responses: { 200: json(z.object({ items: z.array(RegistryEntry) }).openapi('RegistryList'), 'Registries with stored credentials (user names only)'), ...errorResponses } }),
    async (c) => {
      requireAdmin(c);
      return c.json({ items: images.credentials.list() } as never, 200);
    },
  );

  app.openapi(
    createRoute({
      method: 'post',
      path: '/v1/registries/login',
      tags,
      request: { body: body(LoginRequest) },
      responses: { 200: json(RegistryEntry, 'The registry accepted the credentials; they are stored for its pulls and pushes'), ...errorResponses },
    }),
    async (c) => {
      requireAdmin(c);
      const b = c.req.valid('json');
      await images.login(b.registry, { username: b.username, password: b.password });
      return c.json({ registry: b.registry, username: b.username } as never, 200);
    },
  );

  app.openapi(
    createRoute({
      method: 'delete',
      path: '/v1/registries/login',
      tags,
      request: { query: z.strictObject({ registry: RegistryHost }) },
      responses: { 200: json(z.object({ registry: z.string(), removed: z.boolean() }), 'Stored credentials removed (removed: false when there were none)'), ...errorResponses },
    }),
    async (c) => {
      requireAdmin(c);
      const { registry } = c.req.valid('query');
      return c.json({ registry, removed: images.credentials.delete(registry) } as never, 200);
    },
  );

  app.openapi(
    createRoute({
      method: 'post',
      path: '/v1/images/base',
      tags,
      request: { body: body(BaseRequest) },
      responses: {
        200: { description: 'Built (or taken from the cache), unpacked and tagged; with progress: true, an NDJSON stream', content: { 'application/json': { schema: ImageDetailSchema.extend({ cached: z.boolean() }) }, 'application/x-ndjson': { schema: z.string() } } },
        ...errorResponses,
      },
    }),
    async (c) => {
      requireAdmin(c);
      const b = c.req.valid('json');
      const ac = new AbortController();
      const req = { kind: b.kind, ...(b.suite ? { suite: b.suite } : {}), ...(b.include ? { include: b.include } : {}), ...(b.tag ? { tag: b.tag } : {}), signal: ac.signal };
      if (!b.progress) return c.json((await images.makeBase({ ...req, log: () => undefined })) as never, 200);
      return ndjsonStream(c, ac, (_p, log) => images.makeBase({ ...req, log }), 'result') as never;
    },
  );

  app.openapi(
    createRoute({
      method: 'post',
      path: '/v1/images/build',
      tags,
      request: { query: BuildQuery, body: { required: true, content: { 'application/x-tar': { schema: z.string().openapi({ format: 'binary' }) } } } },
      responses: { 200: { description: 'NDJSON: {"log": "..."} lines of the build, then {"result": Image} or {"error": {...}}', content: { 'application/x-ndjson': { schema: z.string() } } }, ...errorResponses },
    }),
    async (c) => {
      requireAdmin(c);
      const q = c.req.valid('query');
      const buildArgs: Record<string, string> = {};
      for (const kv of q.buildArg) buildArgs[kv.slice(0, kv.indexOf('='))] = kv.slice(kv.indexOf('=') + 1);
      const ac = new AbortController();
      const context = requestBody(c);
      return ndjsonStream(
        c,
        ac,
        (_p, log) => images.build({ tag: q.tag, context, ...(q.dockerfile ? { dockerfile: q.dockerfile } : {}), buildArgs, network: q.network === 'true', log, signal: ac.signal }),
        'result',
      ) as never;
    },
  );

  app.openapi(
    createRoute({
      method: 'post',
      path: '/v1/images/import',
      tags,
      request: { query: ImportQuery, body: { required: true, content: { 'application/x-tar': { schema: z.string().openapi({ format: 'binary' }) } } } },
      responses: { 200: json(z.object({ items: z.array(ImageDetailSchema) }).openapi('ImportedImages'), 'Imported, unpacked and tagged'), ...errorResponses },
    }),
    async (c) => {
      requireAdmin(c);
      const { tag } = c.req.valid('query');
      return c.json({ items: await images.importArchive(requestBody(c), tag !== undefined ? { tag } : {}) } as never, 200);
    },
  );

  app.openapi(
    createRoute({
      method: 'get',
      path: '/v1/images/export',
      tags,
      request: { query: ExportQuery },
      responses: { 200: { description: 'The archive, streamed', content: { 'application/x-tar': { schema: z.string().openapi({ format: 'binary' }) } } }, ...errorResponses },
    }),
    async (c) => {
      const { ref, format } = c.req.valid('query');
      const archive = await images.exportArchive(ref, format);
      return new Response(Readable.toWeb(archive) as ReadableStream, { status: 200, headers: { 'content-type': 'application/x-tar' } }) as never;
    },
  );

  app.openapi(
    createRoute({
      method: 'delete',
      path: '/v1/images',
      tags,
      request: { query: RefQuery },
      responses: { 200: json(RemoveResult, 'Tag removed; blobs no tag or workload references were garbage-collected'), ...errorResponses },
    }),
    async (c) => {
      requireAdmin(c);
      return c.json((await images.remove(c.req.valid('query').ref, imagesInUse(ctx))) as never, 200);
    },
  );
}
