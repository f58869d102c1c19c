// `berth service …`: create, deploy, scale, roll back, list, inspect, follow the logs of and remove
// services (replicated workloads behind health checks; see src/reconcilers/services.ts).
import { readFileSync } from 'node:fs';
import { Option, type Command } from 'commander';
import { age, printJson, printTable } from './format.js';
import {
  CliError,
  UsageError,
  P,
  act,
  addCommon,
  addRunFlags,
  attach,
  buildRunSpec,
  collect,
  detachedNote,
  enc,
  imageCommand,
  parseIntFlag,
  parseKeyValues,
  pollUntil,
  qs,
  waitGone,
  type Ctx,
  type RunFlags,
} from './main.js';

interface Instance {
  name: string;
  revision: number;
  phase: string;
  ip?: string;
  ready: boolean;
  restartCount: number;
  drainingSince?: string;
}
interface Revision {
  number: number;
  hash: string;
  template: Record<string, unknown>;
  createdAt: string;
  outcome: string;
  reason?: string;
}
interface Service {
  name: string;
  createdAt: string;
  spec: Record<string, unknown> & { image: string; replicas: number; ports: { port: number; protocol: string; public: boolean; hostPort?: number }[]; domains?: string[] };
  status: {
    replicas: number;
    readyReplicas: number;
    updatedReplicas: number;
    currentRevision?: number;
    targetRevision?: number;
    instances: Instance[];
    conditions: { type: string; status: string; reason: string; message: string }[];
    revisions: Revision[];
  };
  deletionRequestedAt: string | null;
}

const SV = (ctx: Ctx, name: string) => `${P(ctx)}/services/${enc(name)}`;

/** "8080" (http), "8080/tcp", "443/http"; --public-port marks it public, and a public tcp port names its host port: "5432/tcp:15432". */
function parsePort(v: string): { port: number; protocol: string; hostPort?: number } {
  const m = /^(\d{1,5})(?:\/(http|tcp))?(?::(\d{1,5}))?$/.exec(v);
  const port = Number(m?.[1]);
  if (!m || port < 1 || port > 65535) throw new CliError('invalid_argument', `port "${v}" must be PORT or PORT/http or PORT/tcp (public tcp: PORT/tcp:HOSTPORT), e.g. 8080 or 5432/tcp:15432`);
  return { port, protocol: m[2] ?? 'http', ...(m[3] ? { hostPort: Number(m[3]) } : {}) };
}

/** "http:8080/healthz", "tcp:8080", "exec:cat /tmp/ready" */
function parseCheck(v: string, periodMs: number | undefined): Record<string, unknown> {
  const timing = periodMs !== undefined ? { periodMs } : {};
  let m = /^http:(\d{1,5})(\/\S*)?$/.exec(v);
  if (m) return { http: { port: Number(m[1]), path: m[2] ?? '/' }, ...timing };
  m = /^tcp:(\d{1,5})$/.exec(v);
  if (m) return { tcp: { port: Number(m[1]) }, ...timing };
  m = /^exec:(.+)$/.exec(v);
  if (m) return { exec: { command: ['sh', '-c', m[1]!] }, ...timing };
  throw new CliError('invalid_argument', `health check "${v}" must be http:PORT[/PATH], tcp:PORT or exec:COMMAND, e.g. http:8080/healthz`);
}

interface ServiceFlags extends RunFlags {
  file?: string;
  replicas?: number;
  port?: string[];
  publicPort?: string[];
  readiness?: string;
  liveness?: string;
  startup?: string;
  checkPeriod?: number;
  domain?: string[];
  maxSurge?: number;
  maxUnavailable?: number;
  progressDeadline?: number;
  wait?: boolean;
}

function addServiceFlags(cmd: Command): Command {
  return addRunFlags(cmd)
    .option('-f, --file <spec.json>', 'the whole service spec as JSON (- for stdin); flags override its fields')
    .addOption(new Option('-r, --replicas <n>', 'number of replicas').argParser(parseIntFlag(0, 100)))
    .option('--port <port>', 'port the replicas listen on: PORT (http) or PORT/tcp; repeatable', collect)
    .option('--public-port <port>', 'like --port, and served by the ingress (a tcp port on a host port of its own: PORT/tcp:HOSTPORT); repeatable', collect)
    .option('--readiness <check>', 'readiness check: http:PORT[/PATH], tcp:PORT or exec:COMMAND')
    .option('--liveness <check>', 'liveness check (a failing replica is replaced)')
    .option('--startup <check>', 'startup check (gates the other checks)')
    .addOption(new Option('--check-period <ms>', 'period of the checks given here').argParser(parseIntFlag(100, 3_600_000)))
    .option('--domain <host>', 'extra host name for the ingress; repeatable', collect)
    .addOption(new Option('--max-surge <n>', 'replicas above --replicas during a deploy').argParser(parseIntFlag(0, 100)))
    .addOption(new Option('--max-unavailable <n>', 'ready replicas below --replicas allowed during a deploy').argParser(parseIntFlag(0, 100)))
    .addOption(new Option('--progress-deadline <ms>', 'roll back a deploy that makes no progress for this long').argParser(parseIntFlag(1000, 86_400_000)))
    .option('--wait', 'wait until the deploy has finished (exit 1 if it was rolled back)');
}

function readSpecFile(path: string): Record<string, unknown> {
  try {
    return JSON.parse(readFileSync(path === '-' ? 0 : path, 'utf8')) as Record<string, unknown>;
  } catch (e) {
    throw new CliError('invalid_argument', `cannot read the spec from ${path}: ${(e as Error).message}`);
  }
}

/** Applies the flags given on top of `base` (a spec from --file or the service's current one). */
function applyFlags(base: Record<string, unknown>, image: string | undefined, command: string[], o: ServiceFlags): Record<string, unknown> {
  const run = buildRunSpec(image ?? String(base.image ?? ''), command, o);
  const spec: Record<string, unknown> = { ...base, ...run };
  if (o.env) spec.env = { ...((base.env as Record<string, string>) ?? {}), ...(run.env as Record<string, string>) };
  if (o.replicas !== undefined) spec.replicas = o.replicas;
  if (o.port || o.publicPort) {
    spec.ports = [...(o.port ?? []).map((p) => ({ ...parsePort(p), public: false })), ...(o.publicPort ?? []).map((p) => ({ ...parsePort(p), public: true }))];
  }
  const checks = { ...((base.healthChecks as Record<string, unknown>) ?? {}) };
  for (const k of ['readiness', 'liveness', 'startup'] as const) if (o[k]) checks[k] = parseCheck(o[k]!, o.checkPeriod);
  if (Object.keys(checks).length) spec.healthChecks = checks;
  if (o.domain) spec.domains = o.domain;
  const deploy: Record<string, unknown> = { ...((base.deploy as Record<string, unknown>) ?? {}) };
  if (o.maxSurge !== undefined) deploy.maxSurge = o.maxSurge;
  if (o.maxUnavailable !== undefined) deploy.maxUnavailable = o.maxUnavailable;
  if (o.progressDeadline !== undefined) deploy.progressDeadlineMs = o.progressDeadline;
  if (Object.keys(deploy).length) spec.deploy = deploy;
  return spec;
}

/** Waits until the target revision is deployed (0) or failed and rolled back (1). */
async function waitDeploy(ctx: Ctx, name: string, afterRevision: number | undefined): Promise<number> {
  const { value, ok } = await pollUntil(
    () => ctx.client.request<Service>('GET', SV(ctx, name)),
    (s) => {
      const newest = s.status.revisions.at(-1);
      if (!newest || (afterRevision !== undefined && newest.number <= afterRevision)) return false;
      return newest.outcome === 'deployed' || newest.outcome === 'failed';
    },
    30 * 60_000,
    250,
  );
  const newest = value.status.revisions.at(-1);
  if (!ok || !newest) return 1;
  if (newest.outcome === 'failed') {
    process.stderr.write(`berth: revision ${newest.number} failed: ${newest.reason ?? 'unknown'}\n`);
    return 1;
  }
  if (!ctx.json) process.stdout.write(`${name}: revision ${newest.number} deployed (${value.status.readyReplicas}/${value.spec.replicas} ready)\n`);
  return 0;
}

const readyCol = (s: Service) => `${s.status.readyReplicas}/${s.spec.replicas}`;
const portsCol = (s: Service) => s.spec.ports.map((p) => `${p.port}/${p.protocol}${p.public ? (p.hostPort ? ` (public on :${p.hostPort})` : ' (public)') : ''}`).join(', ');

export function registerServices(program: Command): void {
  const svc = program.command('service').alias('svc').description('replicated services: health checks, rolling deploys, rollback');

  const create = addCommon(
    addServiceFlags(
      imageCommand(svc, 'create', 2)
        .description('create a service')
        .usage('[options] NAME IMAGE [-- CMD ARGS...]')
        .argument('<name>')
        .argument('<image>')
        .argument('[command...]'),
    ),
  );
  create.action(
    act(async (ctx, [name, image, ...command], o) => {
      const f = o as ServiceFlags;
      const spec = applyFlags(f.file ? readSpecFile(f.file) : {}, image, command, f);
      const body: Record<string, unknown> = { name, spec };
      const labels = parseKeyValues(f.label, '-l');
      if (labels) body.labels = labels;
      const s = await ctx.client.request<Service>('POST', `${P(ctx)}/services`, body);
      if (f.wait) return waitDeploy(ctx, s.name, undefined);
      if (ctx.json) printJson(s);
      else process.stdout.write(`${s.name}\n`);
    }),
  );

  const deploy = addCommon(
    addServiceFlags(
      imageCommand(svc, 'deploy', 2)
        .description("deploy a change (new image, command, env, …): a new revision rolls out; the other fields are kept")
        .usage('[options] NAME [IMAGE [-- CMD ARGS...]]')
        .argument('<name>')
        .argument('[image]')
        .argument('[command...]'),
    ),
  );
  deploy.action(
    act(async (ctx, [name, image, ...command], o) => {
      const f = o as ServiceFlags;
      const cur = await ctx.client.request<Service & { resourceVersion: number; labels: Record<string, string> }>('GET', SV(ctx, name!));
      const spec = applyFlags(f.file ? readSpecFile(f.file) : cur.spec, image, command, f);
      const labels = parseKeyValues(f.label, '-l');
      const s = await ctx.client.request<Service>('PUT', SV(ctx, name!), { spec, resourceVersion: cur.resourceVersion, ...(labels ? { labels } : {}) });
      if (f.wait) return waitDeploy(ctx, name!, cur.status.revisions.at(-1)?.number);
      if (ctx.json) printJson(s);
      else process.stdout.write(`${name}: deploying\n`);
    }),
  );

  // ---- berth domain: a service's extra host names (spec.domains; no new revision)
  const domain = program.command('domain').description("custom host names of services, served by the ingress (ACME certificates when berthd has --acme-*)");
  const setDomains = async (ctx: Ctx, name: string, f: (d: string[]) => string[]) => {
    const cur = await ctx.client.request<Service & { resourceVersion: number }>('GET', SV(ctx, name));
    const domains = f(cur.spec.domains ?? []);
    return ctx.client.request<Service>('PUT', SV(ctx, name), { spec: { ...cur.spec, domains }, resourceVersion: cur.resourceVersion });
  };
  addCommon(domain.command('add').description('serve a service at a host name too').argument('<service>').argument('<host>')).action(
    act(async (ctx, [name, host]) => {
      const s = await setDomains(ctx, name!, (d) => [...new Set([...d, host!.toLowerCase()])]);
      if (ctx.json) printJson(s);
      else process.stdout.write(`${host} → ${name}\n`);
    }),
  );
  addCommon(domain.command('rm').description('stop serving a service at a host name').argument('<service>').argument('<host>')).action(
    act(async (ctx, [name, host]) => {
      const cur = await ctx.client.request<Service>('GET', SV(ctx, name!));
      if (!(cur.spec.domains ?? []).includes(host!.toLowerCase())) throw new UsageError(`${name} has no domain ${host}; berth domain ls shows them`);
      const s = await setDomains(ctx, name!, (d) => d.filter((x) => x !== host!.toLowerCase()));
      if (ctx.json) printJson(s);
      else process.stdout.write(`${host} removed from ${name}\n`);
    }),
  );
  addCommon(domain.command('ls').description("every service's host names")).action(
    act(async (ctx) => {
      const list = await ctx.client.request<{ items: Service[] }>('GET', `${P(ctx)}/services`);
      const rows = list.items.flatMap((s) => (s.spec.domains ?? []).map((d) => [d, s.name])) as unknown[][];
      if (ctx.json) return printJson({ items: rows.map(([host, service]) => ({ host, service })) });
      printTable(['HOST', 'SERVICE'], rows);
    }),
  );

  addCommon(svc.command('scale').description('set the number of replicas').argument('<name>').argument('<replicas>')).action(
    act(async (ctx, [name, n]) => {
      const replicas = parseIntFlag(0, 100)(n!);
      const s = await ctx.client.request<Service>('PATCH', SV(ctx, name!), { replicas });
      if (ctx.json) printJson(s);
      else process.stdout.write(`${name}: ${replicas} replica(s)\n`);
    }),
  );

  addCommon(
    svc
      .command('rollback')
      .description("re-deploy an earlier revision's template as a new revision (default: the previous good one)")
      .argument('<name>')
      .addOption(new Option('--to-revision <n>', 'revision to roll back to').argParser(parseIntFlag(1)))
      .option('--wait', 'wait until the rollback has deployed'),
  ).action(
    act(async (ctx, [name], o) => {
      const before = await ctx.client.request<Service>('GET', SV(ctx, name!));
      const s = await ctx.client.request<Service>('POST', `${SV(ctx, name!)}/rollback`, o.toRevision !== undefined ? { revision: o.toRevision } : {});
      if (o.wait) return waitDeploy(ctx, name!, before.status.revisions.at(-1)?.number);
      if (ctx.json) printJson(s);
      else process.stdout.write(`${name}: rolling back\n`);
    }),
  );

  addCommon(svc.command('ls').alias('list').description('list services')).action(
    act(async (ctx) => {
      const items: Service[] = [];
      let token: string | null = null;
      do {
        const page: { items: Service[]; nextPageToken: string | null } = await ctx.client.request('GET', `${P(ctx)}/services${qs({ pageToken: token ?? undefined })}`);
        items.push(...page.items);
        token = page.nextPageToken;
      } while (token);
      if (ctx.json) return printJson({ items, nextPageToken: null });
      printTable(
        ['NAME', 'READY', 'UP-TO-DATE', 'REVISION', 'IMAGE', 'PORTS', 'AGE'],
        items.map((s) => [
          s.name + (s.deletionRequestedAt ? ' (deleting)' : ''),
          readyCol(s),
          s.status.updatedReplicas,
          s.status.targetRevision !== s.status.currentRevision ? `${s.status.currentRevision ?? '-'} → ${s.status.targetRevision}` : s.status.currentRevision,
          s.spec.image,
          portsCol(s),
          age(s.createdAt),
        ]),
      );
    }),
  );

  addCommon(svc.command('inspect').description('show a service: replicas, conditions, revisions').argument('<name>')).action(
    act(async (ctx, [name]) => {
      const s = await ctx.client.request<Service>('GET', SV(ctx, name!));
      if (ctx.json) return printJson(s);
      const st = s.status;
      process.stdout.write(
        `Name:      ${s.name}\nImage:     ${s.spec.image}\nReplicas:  ${st.readyReplicas} ready / ${s.spec.replicas} desired / ${st.updatedReplicas} up to date\n` +
          `Revision:  ${st.currentRevision ?? '-'}${st.targetRevision !== st.currentRevision ? ` (deploying ${st.targetRevision})` : ''}\nPorts:     ${portsCol(s) || '-'}\n` +
          (s.spec.domains?.length ? `Domains:   ${s.spec.domains.join(', ')}\n` : '') +
          st.conditions.map((c) => `${c.type}: ${c.status} (${c.reason}) ${c.message}\n`).join('') +
          '\n',
      );
      printTable(
        ['REPLICA', 'REVISION', 'PHASE', 'READY', 'IP', 'RESTARTS'],
        st.instances.map((i) => [i.name, i.revision, i.drainingSince ? 'draining' : i.phase, i.ready ? 'yes' : 'no', i.ip, i.restartCount]),
      );
    }),
  );

  addCommon(svc.command('revisions').description('deploy history of a service').argument('<name>')).action(
    act(async (ctx, [name]) => {
      const r = await ctx.client.request<{ items: Revision[]; currentRevision?: number }>('GET', `${SV(ctx, name!)}/revisions`);
      if (ctx.json) return printJson(r);
      printTable(
        ['REVISION', 'OUTCOME', 'IMAGE', 'CREATED', 'REASON'],
        r.items.map((x) => [`${x.number}${x.number === r.currentRevision ? ' *' : ''}`, x.outcome, x.template.image, age(x.createdAt), x.reason]),
      );
    }),
  );

  addCommon(
    svc
      .command('logs')
      .description("the replicas' output merged, each line prefixed with the replica's name")
      .argument('<name>')
      .option('-f, --follow', 'keep streaming (new replicas join)')
      .addOption(new Option('--tail <n>', 'only the last N lines of each replica').argParser(parseIntFlag(0, 1_000_000))),
  ).action(
    act(async (ctx, [name], o) => {
      const path = `${SV(ctx, name!)}/logs${qs({ follow: o.follow ? 'true' : undefined, tail: o.tail as number | undefined })}`;
      const detached = await attach(ctx, path, (line) => process.stdout.write(line + '\n'));
      if (detached) detachedNote(`stopped following ${name}`);
      return detached ? 130 : 0;
    }),
  );

  addCommon(svc.command('rm').description('delete services and all their replicas; waits until they are gone').argument('<names...>')).action(
    act(async (ctx, names) => {
      for (const n of names) await ctx.client.request('DELETE', SV(ctx, n));
      for (const n of names) await waitGone(ctx, SV(ctx, n), `service ${n}`, 120_000);
      if (!ctx.json) for (const n of names) process.stdout.write(`${n}\n`);
    }),
  );
}
