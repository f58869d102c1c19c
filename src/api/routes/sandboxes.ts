// Sandboxes: short-lived, strongly isolated tasks driven remotely — run commands (output streamed as
// NDJSON), move files (streamed both ways), list and signal processes. Every call goes to the guest
// agent inside the sandbox (agent/PROTOCOL.md), which resolves paths inside the sandbox's root, so
// no path, symlink or archive can reach outside it. Same API on every isolation tier.
import { createRoute, z, type OpenAPIHono } from '@hono/zod-openapi';
import { stream } from 'hono/streaming';
import { randomBytes } from 'node:crypto';
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { StringDecoder } from 'node:string_decoder';
import type { AgentChannel, AgentFrame } from '../../core/driver.js';
import { BerthError, failedPrecondition, type ErrorCode } from '../../core/errors.js';
import { SANDBOX, SANDBOXTEMPLATE, initialSandboxStatus, previewHost, sandboxActivity, type SandboxResource, type SandboxSpecT, type SandboxStatusT, type SandboxTemplateSpecT, type SandboxTemplateStatusT } from '../../reconcilers/sandboxes.js';
import type { AppEnv } from '../app.js';
import type { ApiContext } from '../context.js';
import { Isolation, Labels, ListQuery, Name, NetworkSpec, Resources, listOf } from '../schemas.js';
import { ProjectNameParams, ProjectParams, body, errorResponses, getLive, json, requestSignal, useProject, registerEventsRoute, view } from './common.js';
import { admitRunSpec, waitForChange } from './workloads.js';
import { traceArrival, traceMark } from '../../lib/trace.js';
import { SANDBOXPOOL, poolMatches, poolMembers, type SandboxPoolSpecT, type SandboxPoolStatusT } from '../../reconcilers/sandboxpools.js';

const tags = ['sandboxes'];
const HIDDEN = ['task', 'background'];
const sandboxView = (s: SandboxResource) => view(s, HIDDEN);

const EnvMap = z.record(z.string().regex(/^[A-Za-z_][A-Za-z0-9_]*$/, { message: 'environment variable names are letters, digits and "_"' }), z.string().max(131072));
const Path = z.string().min(1).max(4096).refine((p) => !p.includes('\0'), { message: 'paths cannot contain NUL bytes' });

const PortNumber = z.number().int().min(1).max(65535);
const PortSpec = z
  .strictObject({ port: PortNumber, public: z.boolean().default(false).openapi({ description: "false: requests need the sandbox's access token (header x-berth-token or ?berth_token=)" }) })
  .openapi('SandboxPort');
const PortView = z
  .object({ port: z.number(), public: z.boolean(), url: z.string().openapi({ example: 'https://3000-sbx-1a2b.default.berth.localhost/' }), token: z.string().optional() })
  .openapi('SandboxPreview');
const PortParams = z.strictObject({ project: Name, name: Name, port: z.coerce.number().int().min(1).max(65535) });

export const SandboxSpec = z
  .strictObject({
    image: z.string().min(1).max(255).default('busybox'),
    isolation: Isolation.default('gvisor').openapi({ description: 'gvisor (default) | microvm | container' }),
    resources: Resources.optional(),
    env: EnvMap.optional(),
    timeoutMs: z.number().int().min(1000).max(86_400_000).default(300_000).openapi({ description: 'The sandbox is killed this long after it started (extend with POST …/timeout); time paused does not count' }),
    state: z.enum(['running', 'paused']).default('running').openapi({ description: 'Desired state; change it with POST …/pause and …/resume' }),
    template: Name.optional().openapi({ description: 'Start from this template (a snapshot of a sandbox: memory, processes, files) instead of booting; its image, isolation and resources apply' }),
    network: NetworkSpec.optional().openapi({ description: "Default: on the project's network with egress deny-all (DNS only); allow destinations with an allowlist" }),
    ports: z.array(PortSpec).max(16).optional().openapi({ description: 'Ports served as preview URLs through the ingress (also: POST …/ports)' }),
    autoPause: z
      .strictObject({ idleMs: z.number().int().min(1000).max(86_400_000) })
      .optional()
      .openapi({ description: 'Pause by itself after idleMs without a command, file or terminal call (an open command, terminal or file transfer counts as activity): processes frozen, no CPU used, life time stopped. The next command, file or terminal call resumes it transparently (status.autoPaused says why it is paused); POST …/pause and …/resume work as usual' }),
  })
  .openapi('SandboxSpec');

const CreateSandbox = z
  .strictObject({ name: Name.optional(), labels: Labels.optional().openapi({ description: 'Metadata; filter lists with labelSelector' }), spec: SandboxSpec.default({ image: 'busybox', isolation: 'gvisor', timeoutMs: 300_000, state: 'running' }) })
  .openapi('CreateSandbox');

const Sandbox = z
  .object({
    id: z.string(),
    name: z.string(),
    project: z.string(),
    labels: z.record(z.string(), z.string()),
    spec: SandboxSpec,
    status: z.object({ phase: z.enum(['pending', 'starting', 'running', 'paused', 'stopping', 'stopped', 'failed']) }).passthrough(),
  })
  .passthrough()
  .openapi('Sandbox');

const CreateQuery = z.strictObject({
  wait: z.enum(['true', 'false']).default('true').openapi({ description: 'Answer once the sandbox runs (or failed to start)' }),
  pool: z.enum(['auto', 'none']).default('auto').openapi({ description: 'auto: claim a started sandbox from a matching warm pool when one is ready (only without a name)' }),
});
const TimeoutBody = z.strictObject({ timeoutMs: z.number().int().min(1000).max(86_400_000).openapi({ description: 'New life time, counted from now' }) }).openapi('SandboxTimeout');

const CommandBody = z
  .strictObject({
    cmd: z.union([z.string().min(1).max(131072), z.array(z.string().max(131072)).min(1).max(4096)]).openapi({ description: 'A shell command line (run with sh -c) or an argv array' }),
    env: EnvMap.optional(),
    cwd: z.string().max(4096).regex(/^\//, { message: 'cwd must be an absolute path' }).optional(),
    user: z.string().regex(/^\d{1,10}(:\d{1,10})?$/, { message: 'user must be "uid" or "uid:gid"' }).optional(),
    stdin: z.string().max(1 << 20).optional().openapi({ description: 'Text written to the command’s stdin, then closed' }),
    timeoutMs: z.number().int().min(1).max(86_400_000).optional().openapi({ description: 'The command is killed (SIGKILL) after this long' }),
    background: z.boolean().default(false).openapi({ description: 'Answer at once with the process id; the output is discarded' }),
    pty: z
      .strictObject({ cols: z.number().int().min(1).max(1000).default(80), rows: z.number().int().min(1).max(1000).default(24) })
      .optional()
      .openapi({ description: 'Run on a pseudo-terminal of this size (an interactive shell): its output (stdout and stderr, as a terminal mixes them) comes as pty events {data: base64}; type into it with POST …/processes/{id}/input, resize it with POST …/processes/{id}/resize. TERM defaults to xterm-256color' }),
  })
  .openapi('SandboxCommand');
const SignalBody = z.strictObject({ signal: z.string().regex(/^SIG[A-Z0-9]+$/, { message: 'signal must be a name such as "SIGTERM"' }).default('SIGTERM') });
const PathQuery = z.strictObject({ path: Path });
const WriteQuery = z.strictObject({ path: Path, mode: z.string().regex(/^[0-7]{3,4}$/, { message: 'mode is octal, e.g. 644' }).optional() });
const MkdirBody = z.strictObject({ path: Path, parents: z.boolean().default(false), mode: z.number().int().min(0).max(0o7777).optional() });
const RemoveBody = z.strictObject({ path: Path, recursive: z.boolean().default(false) });
const RenameBody = z.strictObject({ path: Path, to: Path });
const InputBody = z.strictObject({ data: z.string().max(1 << 19).regex(/^[A-Za-z0-9+/]*={0,2}$/, { message: 'data is base64' }).openapi({ description: 'Bytes to type (base64, at most 512 KiB of text: send more in several calls)' }) }).openapi('ProcessInput');
const ResizeBody = z.strictObject({ cols: z.number().int().min(1).max(1000), rows: z.number().int().min(1).max(1000) }).openapi('PtyResize');
const WatchQuery = z.strictObject({ path: Path, recursive: z.enum(['true', 'false']).default('false') });
const ProcParams = ProjectNameParams.extend({ proc: z.string().regex(/^[a-z0-9-]{1,64}$/).openapi({ param: { name: 'proc', in: 'path' } }) });

const AGENT_TIMEOUT_MS = 30_000;
const WRITE_CHUNK = 512 * 1024; // raw bytes per file.write frame (base64 keeps it under the 1 MiB frame limit)

/** Errors from the agent, as API errors (the same closed set). */
function agentError(e: unknown): BerthError {
  if (e instanceof BerthError) return e;
  const code = (e as { code?: string }).code;
  const msg = (e as Error).message;
  const known: Record<string, ErrorCode> = { invalid_argument: 'invalid_argument', not_found: 'not_found', permission_denied: 'permission_denied', failed_precondition: 'failed_precondition' };
  if (code && known[code]) return new BerthError(known[code], msg);
  return new BerthError('unavailable', `the sandbox's agent did not answer: ${msg}`);
}

/**
 * A ready member of a warm pool matching the request, handed over: the pool label is replaced by
 * the caller's labels, env and life time (counted from now) become the caller's. No await between
 * the lookup and the update, so two creates never get the same sandbox.
 */
function claimFromPool(ctx: ApiContext, project: string, b: z.infer<typeof CreateSandbox>): SandboxResource | undefined {
  for (const pool of ctx.store.list<SandboxPoolSpecT, SandboxPoolStatusT>(SANDBOXPOOL, { project, limit: 1000 }).items) {
    if (pool.deletionRequestedAt || !poolMatches(pool.spec, b.spec)) continue;
    const member = poolMembers(ctx.store, pool).find((m) => m.status.phase === 'running' && !m.deletionRequestedAt && m.status.startedAt);
    if (!member) continue;
    const elapsed = Date.now() - Date.parse(member.status.startedAt!) - (member.status.pausedTotalMs ?? 0);
    const spec: SandboxSpecT = { ...member.spec, timeoutMs: elapsed + b.spec.timeoutMs, ...(b.spec.env ? { env: b.spec.env } : {}), ...(b.spec.autoPause ? { autoPause: b.spec.autoPause } : {}) };
    // Full CPU priority from now on: the caller's first command must not wait behind the pool's refills.
    // (Before the claim is recorded: a crash in between leaves an unclaimed member at full priority,
    // never a claimed sandbox at the lowest.)
    if (member.status.background && member.status.task) ctx.drivers.byName(member.status.task.driver)?.setBackground?.(member.id, false);
    const { background: _bg, ...status } = member.status;
    // One transaction: a claim is recorded whole or not at all (and costs one commit, not four).
    const r = ctx.store.db.transaction(() => {
      ctx.store.updateSpec(member.id, { spec, labels: b.labels ?? {} }, member.resourceVersion);
      const claimed = ctx.store.updateStatus(member.id, { ...status, expiresAt: new Date(Date.now() + b.spec.timeoutMs).toISOString() }) as SandboxResource;
      ctx.store.addEvent(member.id, 'Claimed', `claimed from warm pool ${pool.name}`);
      ctx.store.updateStatus(pool.id, { ...pool.status, claimed: (pool.status.claimed ?? 0) + 1, lastClaimAt: new Date().toISOString() });
      return claimed;
    })();
    sandboxActivity.touch(member.id);
    ctx.kick(SANDBOX, member.id);
    ctx.kick(SANDBOXPOOL, pool.id);
    return r;
  }
  return undefined;
}

export function registerSandboxRoutes(app: OpenAPIHono<AppEnv>, ctx: ApiContext): void {
  const base = '/v1/projects/{project}/sandboxes';

  /** A running sandbox and its agent connection. */
  const agentOf = async (project: string, name: string, signal?: AbortSignal): Promise<{ s: SandboxResource; agent: AgentChannel }> => {
    let s = getLive<SandboxSpecT, SandboxStatusT>(ctx, SANDBOX, project, name) as SandboxResource;
    sandboxActivity.touch(s.id);
    if (s.status.phase === 'paused' && s.status.autoPaused) {
      // Paused for being idle: this call wakes it (the reconciler resumes it on seeing the activity).
      ctx.kick(SANDBOX, s.id);
      const deadline = Date.now() + 60_000;
      while (s.status.phase === 'paused' && Date.now() < deadline && !signal?.aborted) {
        s = (await waitForChange(ctx, s.id, s.resourceVersion, deadline - Date.now(), signal)) as SandboxResource;
      }
    }
    if (s.status.phase !== 'running' || !s.status.task) {
      throw failedPrecondition(`sandbox "${name}" is ${s.status.phase}${s.status.reason ? ` (${s.status.reason})` : ''}; only a running sandbox takes commands and file calls${s.status.phase === 'paused' ? ' (resume it with POST …/resume)' : ''}`);
    }
    const driver = ctx.drivers.byName(s.status.task.driver);
    if (!driver?.agent) throw failedPrecondition(`the ${s.status.task.driver} driver cannot reach a sandbox agent`);
    try {
      return { s, agent: await driver.agent(s.id, 5000) };
    } catch (e) {
      throw agentError(e);
    }
  };
  /** Holds the sandbox busy (no auto-pause) until the returned function is called. */
  const hold = (id: string) => {
    const release = sandboxActivity.hold(id);
    return () => {
      release();
      ctx.kick(SANDBOX, id);
    };
  };
  const call = async (agent: AgentChannel, req: Record<string, unknown>, signal?: AbortSignal, onEvent?: (f: AgentFrame) => void | Promise<void>) => {
    try {
      return await agent.request(req, AGENT_TIMEOUT_MS, signal, onEvent);
    } catch (e) {
      throw agentError(e);
    }
  };

  app.openapi(
    createRoute({ method: 'post', path: base, tags, request: { params: ProjectParams, query: CreateQuery, body: body(CreateSandbox) }, responses: { 201: json(Sandbox, 'Created'), ...errorResponses } }),
    async (c) => {
      const entered = performance.now();
      const { project } = c.req.valid('param');
      const b = c.req.valid('json');
      useProject(ctx, c, project);
      if (b.spec.template) {
        const tpl = ctx.store.find<SandboxTemplateSpecT, SandboxTemplateStatusT>(SANDBOXTEMPLATE, project, b.spec.template);
        if (!tpl || tpl.deletionRequestedAt) throw new BerthError('not_found', `template "${b.spec.template}" not found in project "${project}"; make one with POST …/sandboxes/{name}/snapshot`);
        if (tpl.status.phase !== 'ready') throw failedPrecondition(`template "${b.spec.template}" is ${tpl.status.phase}: ${tpl.status.message ?? ''}`);
        b.spec = { ...b.spec, image: tpl.spec.image, isolation: tpl.spec.isolation, ...(tpl.spec.resources ? { resources: tpl.spec.resources } : {}) };
      }
      await admitRunSpec(ctx, { isolation: b.spec.isolation, image: b.spec.image, resources: b.spec.resources });
      if (!b.name && !b.spec.template && c.req.valid('query').pool === 'auto') {
        const admitted = performance.now();
        const claimed = claimFromPool(ctx, project, b);
        if (claimed) {
          traceArrival(c.req.raw, claimed.id, 'api.arrive');
          traceMark(claimed.id, 'api.enter', entered);
          traceMark(claimed.id, 'api.admitted', admitted);
          traceMark(claimed.id, 'api.claimed');
          return c.json(sandboxView(claimed) as never, 201);
        }
      }
      const name = b.name ?? `sbx-${randomBytes(5).toString('hex')}`;
      let s = ctx.store.create(SANDBOX, { project, name, labels: b.labels ?? {}, spec: b.spec, status: initialSandboxStatus() }) as SandboxResource;
      traceArrival(c.req.raw, s.id, 'api.arrive');
      traceMark(s.id, 'api.enter', entered);
      traceMark(s.id, 'api.created');
      ctx.store.addEvent(s.id, 'Created', `sandbox created (image ${b.spec.image}, isolation ${b.spec.isolation})`);
      ctx.kick(SANDBOX, s.id);
      if (c.req.valid('query').wait === 'true') {
        const deadline = Date.now() + 120_000;
        while (!['running', 'failed', 'stopped'].includes(s.status.phase) && Date.now() < deadline && !requestSignal(c).aborted) {
          s = (await waitForChange(ctx, s.id, s.resourceVersion, deadline - Date.now(), requestSignal(c))) as SandboxResource;
        }
      }
      traceMark(s.id, 'api.answer');
      return c.json(sandboxView(s) as never, 201);
    },
  );

  app.openapi(
    createRoute({ method: 'get', path: base, tags, request: { params: ProjectParams, query: ListQuery }, responses: { 200: json(listOf(Sandbox, 'SandboxList')), ...errorResponses } }),
    (c) => {
      const { project } = c.req.valid('param');
      useProject(ctx, c, project);
      const res = ctx.store.list<SandboxSpecT, SandboxStatusT>(SANDBOX, { project, ...c.req.valid('query') });
      return c.json({ items: res.items.map((s) => sandboxView(s as SandboxResource)), nextPageToken: res.nextPageToken } as never, 200);
    },
  );

  app.openapi(
    createRoute({ method: 'get', path: `${base}/{name}`, tags, request: { params: ProjectNameParams }, responses: { 200: json(Sandbox), ...errorResponses } }),
    (c) => {
      const { project, name } = c.req.valid('param');
      useProject(ctx, c, project);
      return c.json(sandboxView(ctx.store.get(SANDBOX, project, name) as SandboxResource) as never, 200);
    },
  );

  app.openapi(
    createRoute({ method: 'delete', path: `${base}/{name}`, tags, request: { params: ProjectNameParams }, responses: { 202: json(Sandbox, 'Kill started'), ...errorResponses } }),
    (c) => {
      const { project, name } = c.req.valid('param');
      useProject(ctx, c, project);
      const s = ctx.store.get(SANDBOX, project, name);
      const r = ctx.store.markForDeletion(s.id);
      ctx.kick(SANDBOX, s.id);
      return c.json(sandboxView(r as SandboxResource) as never, 202);
    },
  );

  /** The preview URL of a port: `<port>-<name>.<project>.<base-domain>` on the ingress's HTTPS (else HTTP) listener. */
  const preview = (s: SandboxResource, p: { port: number; public: boolean }) => {
    const st = ctx.ingress.status();
    if (!st.enabled) throw failedPrecondition('the ingress is off (berthd --ingress-http off --ingress-https off), so ports have no preview URL; start berthd with an ingress listener');
    const host = previewHost(ctx.ingress, s.project, s.name, p.port);
    if (host.split('.')[0]!.length > 63) throw new BerthError('invalid_argument', `"${p.port}-${s.name}" is longer than a DNS label (63); use a shorter sandbox name`);
    const [scheme, listen] = st.https ? ['https', st.https] : ['http', st.http!];
    const port = Number(listen.split(':').pop());
    const url = `${scheme}://${host}${(scheme === 'https' && port === 443) || (scheme === 'http' && port === 80) ? '' : `:${port}`}/`;
    return { port: p.port, public: p.public, url, ...(p.public ? {} : { token: s.status.accessToken }) };
  };
  const syncRoutes = () => void ctx.ingress.sync().catch(() => undefined); // errors are kept in its status and retried

  app.openapi(
    createRoute({ method: 'post', path: `${base}/{name}/ports`, tags, request: { params: ProjectNameParams, body: body(PortSpec) }, responses: { 200: json(PortView, 'Exposed (idempotent); the URL answers while the sandbox runs'), ...errorResponses } }),
    async (c) => {
      const { project, name } = c.req.valid('param');
      useProject(ctx, c, project);
      const s = getLive<SandboxSpecT, SandboxStatusT>(ctx, SANDBOX, project, name) as SandboxResource;
      const want = c.req.valid('json');
      const view = preview(s, want);
      const ports = [...(s.spec.ports ?? []).filter((p) => p.port !== want.port), want].sort((a, b) => a.port - b.port);
      if (ports.length > 16) throw new BerthError('invalid_argument', 'a sandbox exposes at most 16 ports; remove one with DELETE …/ports/{port}');
      ctx.store.updateSpec(s.id, { spec: { ...s.spec, ports } });
      await ctx.ingress.sync().catch(() => undefined);
      return c.json(view as never, 200);
    },
  );

  registerEventsRoute(app, ctx, { base, kind: SANDBOX, tags, description: 'What happened to the sandbox: created or claimed, warmed, started, paused, resumed, snapshotted, killed and why' });

  app.openapi(
    createRoute({ method: 'get', path: `${base}/{name}/ports`, tags, request: { params: ProjectNameParams }, responses: { 200: json(z.object({ items: z.array(PortView) })), ...errorResponses } }),
    (c) => {
      const { project, name } = c.req.valid('param');
      useProject(ctx, c, project);
      const s = ctx.store.get(SANDBOX, project, name) as SandboxResource;
      return c.json({ items: (s.spec.ports ?? []).map((p) => preview(s, p)) } as never, 200);
    },
  );

  app.openapi(
    createRoute({ method: 'delete', path: `${base}/{name}/ports/{port}`, tags, request: { params: PortParams }, responses: { 204: { description: 'No longer exposed' }, ...errorResponses } }),
    (c) => {
      const { project, name, port } = c.req.valid('param');
      useProject(ctx, c, project);
      const s = ctx.store.get(SANDBOX, project, name) as SandboxResource;
      if (!(s.spec.ports ?? []).some((p) => p.port === port)) throw new BerthError('not_found', `port ${port} of sandbox "${name}" is not exposed; GET …/ports lists the exposed ones`);
      ctx.store.updateSpec(s.id, { spec: { ...s.spec, ports: s.spec.ports!.filter((p) => p.port !== port) } });
      syncRoutes();
      return c.body(null, 204);
    },
  );

  app.openapi(
    createRoute({ method: 'post', path: `${base}/{name}/timeout`, tags, request: { params: ProjectNameParams, body: body(TimeoutBody) }, responses: { 200: json(Sandbox), ...errorResponses } }),
    (c) => {
      const { project, name } = c.req.valid('param');
      useProject(ctx, c, project);
      const s = getLive<SandboxSpecT, SandboxStatusT>(ctx, SANDBOX, project, name) as SandboxResource;
      if (s.status.phase !== 'running' || !s.status.startedAt) throw failedPrecondition(`sandbox "${name}" is ${s.status.phase}; only a running sandbox's timeout can change`);
      const timeoutMs = Date.now() - Date.parse(s.status.startedAt) - (s.status.pausedTotalMs ?? 0) + c.req.valid('json').timeoutMs;
      const r = ctx.store.updateSpec(s.id, { spec: { ...s.spec, timeoutMs } });
      ctx.kick(SANDBOX, s.id);
      return c.json(sandboxView(r as SandboxResource) as never, 200);
    },
  );

  for (const [op, want, from] of [
    ['pause', 'paused', 'running'],
    ['resume', 'running', 'paused'],
  ] as const) {
    app.openapi(
      createRoute({
        method: 'post',
        path: `${base}/{name}/${op}`,
        tags,
        request: { params: ProjectNameParams },
        responses: { 200: json(Sandbox, op === 'pause' ? 'Paused: processes frozen, memory kept, no CPU used, life time stopped' : 'Running again where it stopped'), ...errorResponses },
      }),
      async (c) => {
        const { project, name } = c.req.valid('param');
        useProject(ctx, c, project);
        let s = getLive<SandboxSpecT, SandboxStatusT>(ctx, SANDBOX, project, name) as SandboxResource;
        if (s.status.phase !== from && s.status.phase !== want) throw failedPrecondition(`sandbox "${name}" is ${s.status.phase}; only a ${from} sandbox can ${op}`);
        const driver = s.status.task ? ctx.drivers.byName(s.status.task.driver) : undefined;
        if (!driver?.pause) throw failedPrecondition(`isolation "${s.spec.isolation}" cannot pause sandboxes on this host`);
        if (op === 'resume') sandboxActivity.touch(s.id); // also wakes an auto-paused sandbox
        if (s.status.phase !== want || s.spec.state !== want || s.status.autoPaused) {
          s = ctx.store.updateSpec(s.id, { spec: { ...s.spec, state: want } }) as SandboxResource;
          ctx.kick(SANDBOX, s.id);
          const deadline = Date.now() + 60_000;
          while (s.status.phase !== want && ['running', 'paused'].includes(s.status.phase) && Date.now() < deadline && !requestSignal(c).aborted) {
            s = (await waitForChange(ctx, s.id, s.resourceVersion, deadline - Date.now(), requestSignal(c))) as SandboxResource;
          }
        }
        return c.json(sandboxView(s) as never, 200);
      },
    );
  }

  const TemplateBody = z.strictObject({ template: Name.openapi({ description: 'Name of the new template' }) }).openapi('SnapshotRequest');
  app.openapi(
    createRoute({
      method: 'post',
      path: `${base}/{name}/snapshot`,
      tags,
      request: { params: ProjectNameParams, body: body(TemplateBody) },
      responses: { 201: json(z.object({ name: z.string(), status: z.record(z.string(), z.unknown()) }).passthrough(), 'Template made; the sandbox keeps running'), ...errorResponses },
    }),
    async (c) => {
      const { project, name } = c.req.valid('param');
      useProject(ctx, c, project);
      const { template } = c.req.valid('json');
      const s = getLive<SandboxSpecT, SandboxStatusT>(ctx, SANDBOX, project, name) as SandboxResource;
      if (!['running', 'paused'].includes(s.status.phase) || !s.status.task) throw failedPrecondition(`sandbox "${name}" is ${s.status.phase}; only a running or paused sandbox can be snapshotted`);
      const driver = ctx.drivers.byName(s.status.task.driver);
      if (!driver?.snapshot) throw failedPrecondition(`snapshots are not available for isolation "${s.spec.isolation}" yet (they are for microvm and gvisor)`);
      if (ctx.store.find(SANDBOXTEMPLATE, project, template)) throw new BerthError('already_exists', `template "${template}" already exists in project "${project}"; delete it or pick another name`);
      const tpl = ctx.store.create<SandboxTemplateSpecT, SandboxTemplateStatusT>(SANDBOXTEMPLATE, {
        project,
        name: template,
        spec: { fromSandbox: name, image: s.spec.image, isolation: s.spec.isolation, ...(s.spec.resources ? { resources: s.spec.resources } : {}) },
        status: { phase: 'failed', message: 'snapshot in progress' },
      });
      const dir = join(ctx.templatesDir, tpl.id);
      try {
        const r = await driver.snapshot(s.status.task, dir);
        const done = ctx.store.updateStatus(tpl.id, { phase: 'ready', dir, snapshotMs: Math.round(r.ms), bytes: r.bytes });
        ctx.store.addEvent(s.id, 'Snapshot', `template ${template} made in ${r.ms.toFixed(0)} ms (${(r.bytes / 2 ** 20).toFixed(1)} MiB of memory)`);
        return c.json(view(done) as never, 201);
      } catch (e) {
        rmSync(dir, { recursive: true, force: true });
        ctx.store.remove(tpl.id);
        throw e instanceof BerthError ? e : new BerthError('internal', `snapshot failed: ${(e as Error).message}`);
      }
    },
  );

  app.openapi(
    createRoute({ method: 'get', path: '/v1/projects/{project}/sandbox-templates', tags, request: { params: ProjectParams }, responses: { 200: json(z.object({ items: z.array(z.record(z.string(), z.unknown())) })), ...errorResponses } }),
    (c) => {
      const { project } = c.req.valid('param');
      useProject(ctx, c, project);
      return c.json({ items: ctx.store.list(SANDBOXTEMPLATE, { project, limit: 1000 }).items.map((t) => view(t, ['dir'])) } as never, 200);
    },
  );

  app.openapi(
    createRoute({ method: 'delete', path: '/v1/projects/{project}/sandbox-templates/{name}', tags, request: { params: ProjectNameParams }, responses: { 204: { description: 'Deleted, with its snapshot files' }, ...errorResponses } }),
    (c) => {
      const { project, name } = c.req.valid('param');
      useProject(ctx, c, project);
      const t = ctx.store.get<SandboxTemplateSpecT, SandboxTemplateStatusT>(SANDBOXTEMPLATE, project, name);
      if (t.status.dir) rmSync(t.status.dir, { recursive: true, force: true });
      ctx.store.remove(t.id);
      return c.body(null, 204) as never;
    },
  );

  // --- commands and processes -----------------------------------------------------------------

  app.openapi(
    createRoute({
      method: 'post',
      path: `${base}/{name}/commands`,
      tags,
      request: { params: ProjectNameParams, body: body(CommandBody) },
      responses: { 200: { description: 'NDJSON events: started {id, pid}, stdout {data}, stderr {data} (or, with pty, pty {data: base64}), exit {exitCode, signal?, oomKilled?, timedOut?}; or, for background, one JSON object {id, pid}', content: { 'application/x-ndjson': { schema: z.string() } } }, ...errorResponses },
    }),
    async (c) => {
      const { project, name } = c.req.valid('param');
      useProject(ctx, c, project);
      const b = c.req.valid('json');
      if (b.pty && (b.background || b.stdin !== undefined)) throw new BerthError('invalid_argument', 'a pty command streams its output and takes input from POST …/processes/{id}/input: drop background and stdin');
      const { s, agent } = await agentOf(project, name, requestSignal(c));
      traceArrival(c.req.raw, s.id, 'cmd.arrive');
      traceMark(s.id, 'cmd.request');
      const args = typeof b.cmd === 'string' ? ['/bin/sh', '-c', b.cmd] : b.cmd;
      const [uid, gid] = b.user ? b.user.split(':').map(Number) : [undefined, undefined];
      const procId = `p-${randomBytes(6).toString('hex')}`;
      const runReq: Record<string, unknown> = {
        id: procId,
        type: 'run',
        args,
        env: { ...(b.pty ? { TERM: 'xterm-256color' } : {}), ...(s.spec.env ?? {}), ...(b.env ?? {}) },
        cwd: b.cwd ?? '/',
        stdin: b.stdin !== undefined,
        ...(b.pty ? { tty: true, cols: b.pty.cols, rows: b.pty.rows } : {}),
        ...(uid !== undefined ? { uid, gid: gid ?? uid } : {}),
      };
      const queue: string[] = [];
      let wake: (() => void) | undefined;
      let started: ((pid: number) => void) | undefined;
      const startedP = new Promise<number>((r) => (started = r));
      const decoders = { stdout: new StringDecoder('utf8'), stderr: new StringDecoder('utf8') };
      const push = (o: unknown) => {
        queue.push(JSON.stringify(o) + '\n');
        wake?.();
      };
      const onEvent = (f: AgentFrame) => {
        if (f.type === 'started') {
          traceMark(s.id, 'cmd.started');
          started?.(Number(f.pid));
          push({ type: 'started', id: procId, pid: f.pid });
        } else if (b.pty && f.type === 'stdout') {
          push({ type: 'pty', data: String(f.data ?? '') }); // raw terminal bytes, base64 as the agent sent them
        } else if (f.type === 'stdout' || f.type === 'stderr') {
          traceMark(s.id, `cmd.${f.type}`);
          push({ type: f.type, data: decoders[f.type].write(Buffer.from(String(f.data ?? ''), 'base64')) });
        }
      };
      const longTimeout = 86_400_000 + 60_000; // the command's own timeout is enforced below
      const done = agent.request(runReq, longTimeout, undefined, onEvent);
      const first = await Promise.race([startedP, done.then(() => -1, (e: unknown) => Promise.reject(agentError(e)))]);
      if (first < 0) throw new BerthError('internal', 'the command ended before it started');
      if (b.stdin !== undefined) {
        await call(agent, { type: 'stdin', proc: procId, data: Buffer.from(b.stdin).toString('base64'), eof: true }).catch(() => undefined);
      }
      let timedOut = false;
      const timer = b.timeoutMs
        ? setTimeout(() => {
            timedOut = true;
            void agent.request({ type: 'signal', proc: procId, sig: 'SIGKILL', group: true }, 5000).catch(() => undefined);
          }, b.timeoutMs)
        : undefined;
      const kill = () => void agent.request({ type: 'signal', proc: procId, sig: 'SIGKILL', group: true }, 5000).catch(() => undefined);
      if (b.background) {
        if (timer) timer.unref();
        done.catch(() => undefined).finally(() => clearTimeout(timer));
        return c.json({ id: procId, pid: first } as never, 200) as never;
      }
      let ended = false;
      const release = hold(s.id); // an open command or terminal keeps the sandbox from auto-pausing
      done.finally(release).catch(() => undefined);
      done.then(
        (f) => {
          clearTimeout(timer);
          for (const k of ['stdout', 'stderr'] as const) {
            const rest = decoders[k].end();
            if (rest) push({ type: k, data: rest });
          }
          push({ type: 'exit', exitCode: f.code, ...(f.signal ? { signal: f.signal } : {}), ...(f.oomKilled === true ? { oomKilled: true } : {}), ...(timedOut ? { timedOut: true } : {}) });
          ended = true;
          wake?.();
        },
        (e: unknown) => {
          clearTimeout(timer);
          push({ type: 'error', message: (e as Error).message });
          ended = true;
          wake?.();
        },
      );
      c.header('content-type', 'application/x-ndjson');
      return stream(c, async (out) => {
        out.onAbort(() => {
          if (!ended) kill(); // the caller went away: so does its command
          wake?.();
        });
        for (;;) {
          while (queue.length) await out.write(queue.shift()!);
          if (ended || out.aborted) break;
          await new Promise<void>((r) => (wake = r));
          wake = undefined;
        }
      }) as never;
    },
  );

  app.openapi(
    createRoute({ method: 'get', path: `${base}/{name}/processes`, tags, request: { params: ProjectNameParams }, responses: { 200: json(z.object({ items: z.array(z.object({ id: z.string(), pid: z.number(), args: z.array(z.string()), startedAt: z.string() })) })), ...errorResponses } }),
    async (c) => {
      const { project, name } = c.req.valid('param');
      useProject(ctx, c, project);
      const { agent } = await agentOf(project, name);
      const r = await call(agent, { type: 'list' });
      return c.json({ items: (r.processes as unknown[]) ?? [] } as never, 200);
    },
  );

  app.openapi(
    createRoute({ method: 'post', path: `${base}/{name}/processes/{proc}/signal`, tags, request: { params: ProcParams, body: body(SignalBody) }, responses: { 200: json(z.object({})), ...errorResponses } }),
    async (c) => {
      const { project, name, proc } = c.req.valid('param');
      useProject(ctx, c, project);
      const { agent } = await agentOf(project, name);
      await call(agent, { type: 'signal', proc, sig: c.req.valid('json').signal, group: true });
      return c.json({} as never, 200);
    },
  );

  app.openapi(
    createRoute({ method: 'post', path: `${base}/{name}/processes/{proc}/input`, tags, request: { params: ProcParams, body: body(InputBody) }, responses: { 200: json(z.object({})), ...errorResponses } }),
    async (c) => {
      const { project, name, proc } = c.req.valid('param');
      useProject(ctx, c, project);
      const { agent } = await agentOf(project, name);
      await call(agent, { type: 'stdin', proc, data: c.req.valid('json').data });
      return c.json({} as never, 200);
    },
  );

  app.openapi(
    createRoute({ method: 'post', path: `${base}/{name}/processes/{proc}/resize`, tags, request: { params: ProcParams, body: body(ResizeBody) }, responses: { 200: json(z.object({})), ...errorResponses } }),
    async (c) => {
      const { project, name, proc } = c.req.valid('param');
      useProject(ctx, c, project);
      const { agent } = await agentOf(project, name);
      await call(agent, { type: 'resize', proc, ...c.req.valid('json') });
      return c.json({} as never, 200);
    },
  );

  // --- files ------------------------------------------------------------------------------------

  app.openapi(
    createRoute({
      method: 'get',
      path: `${base}/{name}/files`,
      tags,
      request: { params: ProjectNameParams, query: PathQuery },
      responses: { 200: { description: 'The file’s bytes, streamed', content: { 'application/octet-stream': { schema: z.string() } } }, ...errorResponses },
    }),
    async (c) => {
      const { project, name } = c.req.valid('param');
      useProject(ctx, c, project);
      const { path } = c.req.valid('query');
      const { s, agent } = await agentOf(project, name);
      // The status line waits for the agent's first answer, so that a missing file, a directory or
      // a path outside the sandbox is a clean 4xx rather than a broken stream. Symlinks are
      // followed, confined to the sandbox's root (the agent resolves them with RESOLVE_IN_ROOT).
      const ac = new AbortController();
      const chunks: Buffer[] = [];
      let push: ((b: Buffer | null) => Promise<void>) | undefined;
      let firstFrame: () => void = () => undefined;
      const first = new Promise<void>((r) => (firstFrame = r));
      const reading = agent.request({ type: 'file.read', path }, 3_600_000, ac.signal, async (f) => {
        if (f.type !== 'data') return;
        const b = Buffer.from(String(f.data ?? ''), 'base64');
        if (push) await push(b);
        else chunks.push(b);
        firstFrame();
      });
      reading.finally(hold(s.id)).catch(() => undefined); // a long download keeps the sandbox from auto-pausing
      await Promise.race([first, reading.then(() => undefined, (e: unknown) => Promise.reject(agentError(e)))]);
      c.header('content-type', 'application/octet-stream');
      return stream(c, async (out) => {
        out.onAbort(() => ac.abort());
        // Each data frame is written before the next is read (backpressure down to the agent).
        for (const b of chunks.splice(0)) await out.write(b);
        push = async (b) => {
          if (b) await out.write(b);
        };
        await reading.catch(() => out.abort());
      }) as never;
    },
  );

  app.openapi(
    createRoute({
      method: 'put',
      path: `${base}/{name}/files`,
      tags,
      request: { params: ProjectNameParams, query: WriteQuery, body: { required: false, content: { 'application/octet-stream': { schema: z.string() } } } },
      responses: { 200: json(z.object({ path: z.string(), written: z.number() })), ...errorResponses },
    }),
    async (c) => {
      const { project, name } = c.req.valid('param');
      useProject(ctx, c, project);
      const { path, mode } = c.req.valid('query');
      const { s, agent } = await agentOf(project, name);
      const release = hold(s.id); // a long upload keeps the sandbox from auto-pausing
      try {
        return c.json((await upload(agent, path, mode, c.req.raw.body)) as never, 200);
      } finally {
        release();
      }
    },
  );

  /** Streams a request body into a file in chunks: the upload is never held in memory as a whole. */
  const upload = async (agent: AgentChannel, path: string, mode: string | undefined, body: ReadableStream<Uint8Array> | null) => {
    let written = 0;
    let first = true;
    const send = async (buf: Buffer) => {
      await call(agent, { type: 'file.write', path, data: buf.toString('base64'), append: !first, ...(first && mode ? { mode: parseInt(mode, 8) } : {}) });
      first = false;
      written += buf.length;
    };
    const reader = body?.getReader();
    let pending: Buffer[] = [];
    let pendingLen = 0;
    if (reader) {
      for (;;) {
        const { value, done } = await reader.read();
        if (value) {
          pending.push(Buffer.from(value));
          pendingLen += value.length;
          while (pendingLen >= WRITE_CHUNK) {
            const all = Buffer.concat(pending);
            await send(all.subarray(0, WRITE_CHUNK));
            pending = [all.subarray(WRITE_CHUNK)];
            pendingLen = all.length - WRITE_CHUNK;
          }
        }
        if (done) break;
      }
    }
    if (pendingLen > 0 || first) await send(Buffer.concat(pending));
    return { path, written };
  };

  app.openapi(
    createRoute({
      method: 'get',
      path: `${base}/{name}/files/watch`,
      tags,
      request: { params: ProjectNameParams, query: WatchQuery },
      responses: { 200: { description: 'NDJSON, until the caller disconnects: ready {}, then one line per change {type: create|write|chmod|remove|rename|overflow, path, to?, dir?}; end {reason} when the directory itself goes away', content: { 'application/x-ndjson': { schema: z.string() } } }, ...errorResponses },
    }),
    async (c) => {
      const { project, name } = c.req.valid('param');
      useProject(ctx, c, project);
      const q = c.req.valid('query');
      const { agent } = await agentOf(project, name);
      const id = `w-${randomBytes(6).toString('hex')}`;
      const queue: string[] = [];
      let wake: (() => void) | undefined;
      let ready: () => void = () => undefined;
      const readyP = new Promise<void>((r) => (ready = r));
      const watching = agent.request({ id, type: 'watch', path: q.path, recursive: q.recursive === 'true' }, 86_400_000, undefined, (f) => {
        if (f.type === 'ready') ready();
        else if (f.type === 'events') for (const e of (f.events as unknown[]) ?? []) queue.push(JSON.stringify(e) + '\n');
        wake?.();
      });
      await Promise.race([readyP, watching.then(() => undefined, (e: unknown) => Promise.reject(agentError(e)))]);
      let ended = false;
      watching.then(
        (f) => queue.push(JSON.stringify({ type: 'end', reason: String(f.reason ?? 'watch cancelled') }) + '\n'),
        (e: unknown) => queue.push(JSON.stringify({ type: 'error', message: (e as Error).message }) + '\n'),
      ).finally(() => {
        ended = true;
        wake?.();
      });
      c.header('content-type', 'application/x-ndjson');
      return stream(c, async (out) => {
        out.onAbort(() => {
          if (!ended) void agent.request({ type: 'cancel', target: id }, 5000).catch(() => undefined);
          wake?.();
        });
        await out.write(JSON.stringify({ type: 'ready' }) + '\n');
        for (;;) {
          while (queue.length) await out.write(queue.shift()!);
          if (ended || out.aborted) break;
          await new Promise<void>((r) => (wake = r));
          wake = undefined;
        }
      }) as never;
    },
  );

  app.openapi(
    createRoute({ method: 'get', path: `${base}/{name}/files/list`, tags, request: { params: ProjectNameParams, query: PathQuery }, responses: { 200: json(z.object({ items: z.array(z.record(z.string(), z.unknown())) })), ...errorResponses } }),
    async (c) => {
      const { project, name } = c.req.valid('param');
      useProject(ctx, c, project);
      const { agent } = await agentOf(project, name);
      const items: unknown[] = [];
      await call(agent, { type: 'file.list', path: c.req.valid('query').path }, undefined, (f) => {
        if (f.type === 'entries') items.push(...((f.entries as unknown[]) ?? []));
      });
      return c.json({ items } as never, 200);
    },
  );

  app.openapi(
    createRoute({ method: 'get', path: `${base}/{name}/files/stat`, tags, request: { params: ProjectNameParams, query: PathQuery }, responses: { 200: json(z.record(z.string(), z.unknown())), ...errorResponses } }),
    async (c) => {
      const { project, name } = c.req.valid('param');
      useProject(ctx, c, project);
      const { agent } = await agentOf(project, name);
      const r = await call(agent, { type: 'file.stat', path: c.req.valid('query').path });
      return c.json(r.stat as never, 200);
    },
  );

  for (const [op, schema] of [
    ['mkdir', MkdirBody],
    ['remove', RemoveBody],
    ['rename', RenameBody],
  ] as const) {
    app.openapi(
      createRoute({ method: 'post', path: `${base}/{name}/files/${op}`, tags, request: { params: ProjectNameParams, body: body(schema) }, responses: { 200: json(z.object({})), ...errorResponses } }),
      async (c) => {
        const { project, name } = c.req.valid('param');
        useProject(ctx, c, project);
        const { agent } = await agentOf(project, name);
        await call(agent, { type: `file.${op}`, ...(c.req.valid('json') as Record<string, unknown>) });
        return c.json({} as never, 200);
      },
    );
  }
}
