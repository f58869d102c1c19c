// Request and response schemas, defined once: the same zod objects validate requests at the
// edge and generate the OpenAPI 3.1 document served at /v1/openapi.json. Every object schema is
// strict: unknown fields are refused.
import { z } from '@hono/zod-openapi';
import { Cron } from 'croner';
import { parseRef } from '../images/ref.js';
import { parseCidr } from '../network/cidr.js';

function validImageRef(ref: string): boolean {
  try {
    parseRef(ref);
    return true;
  } catch {
    return false;
  }
}

export const NAME_RE = /^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/;
const NAME_HINT = 'lowercase letters, digits and "-", starting and ending with a letter or digit, at most 63 characters';

export const Name = z
  .string()
  .regex(NAME_RE, { message: `must be ${NAME_HINT}` })
  .openapi({ example: 'web' });

const LABEL_KEY_RE = /^([a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?\/)?[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$/;
const LABEL_VALUE_RE = /^([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?$/;

export const Labels = z
  .record(
    z.string().regex(LABEL_KEY_RE, { message: 'label keys are [prefix/]name with letters, digits, ".", "_", "-" (name ≤ 63 characters)' }),
    z.string().regex(LABEL_VALUE_RE, { message: 'label values are ≤ 63 letters, digits, ".", "_", "-", starting and ending alphanumeric' }),
  )
  .refine((r) => Object.keys(r).length <= 64, { message: 'at most 64 labels' })
  .openapi({ example: { team: 'payments' } });

const EnvKey = z.string().regex(/^[A-Za-z_][A-Za-z0-9_]*$/, { message: 'environment variable names are letters, digits and "_", not starting with a digit' });
const EnvValue = z.string().max(131072).refine((v) => !v.includes('\0'), { message: 'environment values cannot contain NUL bytes' });
const AbsPath = z
  .string()
  .max(4096)
  .regex(/^\/[^\0]*$/, { message: 'must be an absolute path starting with "/"' });
const Arg = z
  .string()
  .max(131072)
  .refine((v) => !v.includes('\0'), { message: 'arguments cannot contain NUL bytes' });

export const Resources = z
  .strictObject({
    cpuMillis: z.number().int().min(10).max(1_024_000).optional().openapi({ description: 'CPU limit in millicores (1000 = one core)', example: 500 }),
    memoryMiB: z.number().int().min(6).max(4_194_304).optional().openapi({ description: 'Memory limit in MiB; the workload is OOM-killed above it', example: 256 }),
    pids: z.number().int().min(1).max(4_194_304).optional().openapi({ description: 'Maximum number of processes and threads', example: 512 }),
    diskMiB: z.number().int().min(16).max(1_048_576).optional().openapi({ description: 'Size limit of the writable layer in MiB (its own file system; writes beyond it fail with ENOSPC)', example: 1024 }),
  })
  .openapi('Resources');

export const Isolation = z.enum(['container', 'gvisor', 'microvm']).openapi({
  description: 'container = runc on the host kernel; gvisor = runsc user-space kernel; microvm = own guest kernel',
});

export const User = z
  .string()
  .regex(/^([0-9]{1,10}(:[0-9]{1,10})?|[a-z_][a-z0-9_-]{0,31}(:[a-z_][a-z0-9_-]{0,31})?)$/, {
    message: 'user must be "uid", "uid:gid", or a user name known to the image (e.g. "1000:1000" or "nobody")',
  });

const EgressRule = z
  .strictObject({
    cidr: z.string().max(18).refine((c) => parseCidr(c) !== undefined, { message: 'cidr must be an IPv4 address or block with no host bits set, e.g. "198.18.0.7" or "198.18.0.0/24"' }),
    ports: z.array(z.number().int().min(1).max(65535)).min(1).max(64).optional().openapi({ description: 'Destination ports; every port when absent' }),
    protocol: z.enum(['tcp', 'udp', 'any']).optional().openapi({ description: 'Default any' }),
  })
  .openapi('EgressRule');

export const EgressPolicy = z
  .discriminatedUnion('policy', [
    z.strictObject({ policy: z.literal('allow-all') }),
    z.strictObject({ policy: z.literal('deny-all') }),
    z.strictObject({ policy: z.literal('allowlist'), allow: z.array(EgressRule).min(1).max(256) }),
  ])
  .openapi('EgressPolicy', {
    description: 'allow-all: any destination outside the host; deny-all: none; allowlist: only these. The host itself (its API, other services) is never reachable unless allowlisted.',
  });

export const NetworkSpec = z
  .strictObject({
    mode: z.enum(['project', 'none']).default('project').openapi({ description: "project: own namespace and address on the project's network, name <name>.<project>.internal; none: loopback only" }),
    egress: EgressPolicy.optional().openapi({ description: 'Default allow-all for workloads and jobs, deny-all for sandboxes' }),
  })
  .openapi('NetworkSpec');
export type NetworkSpec = z.infer<typeof NetworkSpec>;

/** What to run: shared by workloads and job templates. */
const RunFields = {
  image: z.string().min(1).max(400).refine(validImageRef, {
    message: 'image must be a reference such as "busybox", "busybox:latest" or "127.0.0.1:5000/team/app:v1" ([registry[:port]/]repository[:tag][@sha256:<64 hex>])',
  }),
  command: z.array(Arg).max(4096).optional().openapi({ description: "Replaces the image's entrypoint" }),
  args: z.array(Arg).max(4096).optional().openapi({ description: "Replaces the image's default arguments" }),
  env: z.record(EnvKey, EnvValue).optional(),
  workingDir: AbsPath.optional(),
  user: User.optional(),
  resources: Resources.optional(),
  isolation: Isolation.default('container'),
  stopTimeoutMs: z.number().int().min(0).max(3_600_000).default(10_000).openapi({ description: 'Grace period between the stop signal and SIGKILL' }),
  stopSignal: z.string().regex(/^SIG[A-Z0-9]+$/, { message: 'stopSignal must be a signal name such as "SIGTERM" or "SIGINT"' }).default('SIGTERM'),
  network: NetworkSpec.optional().openapi({ description: "Default: on the project's network, egress allow-all" }),
};

export const WorkloadSpec = z
  .strictObject({
    ...RunFields,
    restartPolicy: z.enum(['never', 'on-failure', 'always']).default('never'),
    state: z.enum(['running', 'stopped']).default('running').openapi({ description: 'Desired state' }),
  })
  .openapi('WorkloadSpec');
export type WorkloadSpec = z.infer<typeof WorkloadSpec>;

export const JobTemplate = z.strictObject(RunFields).openapi('JobTemplate');
export type JobTemplate = z.infer<typeof JobTemplate>;

function validCron(expr: string): boolean {
  try {
    new Cron(expr, { paused: true });
    return expr.trim().split(/\s+/).length === 5;
  } catch {
    return false;
  }
}
function validTimeZone(tz: string): boolean {
  try {
    new Intl.DateTimeFormat('en-US', { timeZone: tz });
    return true;
  } catch {
    return false;
  }
}

export const JobSpec = z
  .strictObject({
    template: JobTemplate,
    schedule: z
      .string()
      .max(200)
      .refine(validCron, { message: 'schedule must be a 5-field cron expression such as "*/5 * * * *" (minute hour day-of-month month day-of-week)' })
      .optional(),
    timeZone: z.string().max(64).refine(validTimeZone, { message: 'timeZone must be an IANA time zone such as "UTC" or "Europe/Paris"' }).default('UTC'),
    concurrencyPolicy: z.enum(['allow', 'forbid', 'replace']).default('allow'),
    retries: z.number().int().min(0).max(100).default(0).openapi({ description: 'Extra attempts after a failed one' }),
    retryBackoffMs: z.number().int().min(0).max(3_600_000).default(1000).openapi({ description: 'First retry delay; doubles on each retry' }),
    activeDeadlineMs: z.number().int().min(1).max(7 * 86_400_000).optional().openapi({ description: 'A run still going after this long is stopped and failed' }),
    historyLimit: z.number().int().min(1).max(1000).default(10),
    suspend: z.boolean().default(false),
  })
  .openapi('JobSpec');
export type JobSpec = z.infer<typeof JobSpec>;

export const ProjectSpec = z.strictObject({ description: z.string().max(1024).default('') }).openapi('ProjectSpec');

// ---- request bodies ----
export const CreateProject = z.strictObject({ name: Name, labels: Labels.optional(), spec: ProjectSpec.optional() }).openapi('CreateProject');
export const CreateWorkload = z
  .strictObject({ name: Name.optional().openapi({ description: 'Generated when omitted' }), labels: Labels.optional(), spec: WorkloadSpec })
  .openapi('CreateWorkload');
export const UpdateWorkload = z
  .strictObject({ labels: Labels.optional(), spec: WorkloadSpec, resourceVersion: z.number().int().min(1).optional() })
  .openapi('UpdateWorkload');
export const CreateJob = z.strictObject({ name: Name, labels: Labels.optional(), spec: JobSpec }).openapi('CreateJob');
export const UpdateJob = z.strictObject({ labels: Labels.optional(), spec: JobSpec, resourceVersion: z.number().int().min(1).optional() }).openapi('UpdateJob');
export const StopRequest = z
  .strictObject({ timeoutMs: z.number().int().min(0).max(3_600_000).optional(), signal: z.string().regex(/^SIG[A-Z0-9]+$/).optional() })
  .openapi('StopRequest');
export const CreateToken = z
  .strictObject({ name: Name, project: Name.optional().openapi({ description: 'Restrict the token to one project' }) })
  .openapi('CreateToken');

// ---- responses ----
export const ErrorBody = z
  .object({ error: z.object({ code: z.string(), message: z.string(), details: z.record(z.string(), z.unknown()).optional() }) })
  .openapi('Error');

const Meta = {
  id: z.string(),
  name: z.string(),
  project: z.string(),
  labels: z.record(z.string(), z.string()),
  generation: z.number().int(),
  observedGeneration: z.number().int(),
  resourceVersion: z.number().int(),
  createdAt: z.string(),
  updatedAt: z.string(),
  deletionRequestedAt: z.string().nullable(),
};

export const ExitInfo = z.object({ exitCode: z.number().int(), signal: z.string().optional(), oomKilled: z.boolean(), finishedAt: z.string() });

export const TaskNetworkStatus = z
  .object({ ip: z.string(), dnsName: z.string().openapi({ example: 'web.default.internal' }) })
  .openapi('TaskNetworkStatus', { description: "Address on the project's network while the task runs" });
export type TaskNetworkStatusT = z.infer<typeof TaskNetworkStatus>;

export const WorkloadStatus = z
  .object({
    phase: z.enum(['pending', 'starting', 'running', 'stopping', 'backoff', 'exited', 'failed', 'stopped']),
    pid: z.number().int().optional(),
    monitorPid: z.number().int().optional(),
    startedAt: z.string().optional(),
    finishedAt: z.string().optional(),
    exitCode: z.number().int().optional(),
    signal: z.string().optional(),
    oomKilled: z.boolean().optional(),
    restartCount: z.number().int(),
    nextRestartAt: z.string().optional(),
    reason: z.string().optional(),
    message: z.string().optional(),
    network: TaskNetworkStatus.optional(),
  })
  .openapi('WorkloadStatus');
export type WorkloadStatusT = z.infer<typeof WorkloadStatus>;

export const Workload = z.object({ ...Meta, spec: WorkloadSpec, status: WorkloadStatus }).openapi('Workload');
export const Project = z.object({ ...Meta, spec: ProjectSpec, status: z.object({}).passthrough() }).openapi('Project');

export const Attempt = z.object({
  attempt: z.number().int(),
  workload: z.string(),
  exitCode: z.number().int().optional(),
  oomKilled: z.boolean().optional(),
  startedAt: z.string().optional(),
  finishedAt: z.string().optional(),
});
export const JobRunStatus = z
  .object({
    phase: z.enum(['pending', 'running', 'succeeded', 'failed', 'cancelled']),
    attempts: z.array(Attempt),
    startedAt: z.string().optional(),
    finishedAt: z.string().optional(),
    exitCode: z.number().int().optional(),
    nextAttemptAt: z.string().optional(),
    reason: z.string().optional(),
  })
  .openapi('JobRunStatus');
export type JobRunStatusT = z.infer<typeof JobRunStatus>;
export const JobRunSpec = z.object({
  job: z.string(),
  trigger: z.enum(['manual', 'schedule']),
  scheduledAt: z.string().optional(),
  template: JobTemplate,
  retries: z.number().int(),
  retryBackoffMs: z.number().int(),
  activeDeadlineMs: z.number().int().optional(),
  cancel: z.boolean().optional(),
});
export type JobRunSpecT = z.infer<typeof JobRunSpec>;
export const JobRun = z.object({ ...Meta, spec: JobRunSpec, status: JobRunStatus }).openapi('JobRun');
export const JobStatus = z
  .object({
    lastScheduleTime: z.string().optional(),
    nextScheduleTime: z.string().optional(),
    active: z.array(z.string()),
    lastRun: z.string().optional(),
    lastRunPhase: z.string().optional(),
  })
  .openapi('JobStatus');
export type JobStatusT = z.infer<typeof JobStatus>;
export const Job = z.object({ ...Meta, spec: JobSpec, status: JobStatus }).openapi('Job');

export const Event = z.object({ seq: z.number().int(), type: z.string(), reason: z.string(), message: z.string(), at: z.string() }).openapi('Event');

export const listOf = <T extends z.ZodTypeAny>(item: T, name: string) =>
  z.object({ items: z.array(item), nextPageToken: z.string().nullable() }).openapi(name);

export const ListQuery = z.strictObject({
  labelSelector: z.string().max(1024).optional().openapi({ description: 'e.g. "team=payments,tier!=dev"' }),
  limit: z.coerce.number().int().min(1).max(1000).optional(),
  pageToken: z.string().max(1024).optional(),
});

// ---- services ----
const Port = z.number().int().min(1).max(65535);
const HOST_RE = /^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)+$/;

export const HealthCheck = z
  .strictObject({
    http: z.strictObject({ path: z.string().max(2048).regex(/^\/[^\s]*$/, { message: 'path must start with "/" and contain no spaces' }).default('/'), port: Port }).optional(),
    tcp: z.strictObject({ port: Port }).optional(),
    exec: z.strictObject({ command: z.array(Arg).min(1).max(256) }).optional(),
    periodMs: z.number().int().min(100).max(3_600_000).default(5000),
    timeoutMs: z.number().int().min(50).max(600_000).default(1000),
    failureThreshold: z.number().int().min(1).max(100).default(3),
    successThreshold: z.number().int().min(1).max(100).default(1),
    initialDelayMs: z.number().int().min(0).max(3_600_000).default(0),
  })
  .refine((h) => [h.http, h.tcp, h.exec].filter(Boolean).length === 1, { message: 'a health check needs exactly one of "http", "tcp" or "exec"' })
  .openapi('HealthCheck', { description: 'http: 2xx/3xx from http://<replica ip>:<port><path>; tcp: a connection is accepted; exec: the command exits 0 inside the replica' });
export type HealthCheck = z.infer<typeof HealthCheck>;

export const ServicePort = z
  .strictObject({
    name: Name.optional(),
    port: Port.openapi({ description: 'Port the replicas listen on' }),
    protocol: z.enum(['http', 'tcp']).default('http'),
    public: z.boolean().default(false).openapi({
      description: 'Served by the ingress: an http port at <service>.<project>.<base domain> and spec.domains (one per service); a tcp port on hostPort',
    }),
    hostPort: Port.optional().openapi({
      description: "Public tcp ports only: the host port the ingress listens on (on its HTTP listener's address) and relays to the ready replicas; one service per host port",
    }),
  })
  .openapi('ServicePort');

export const DeployStrategy = z
  .strictObject({
    strategy: z.literal('rolling').default('rolling'),
    maxSurge: z.number().int().min(0).max(100).default(1).openapi({ description: 'Replicas above spec.replicas while a deploy runs' }),
    maxUnavailable: z.number().int().min(0).max(100).default(0).openapi({ description: 'Ready replicas below spec.replicas allowed while a deploy runs' }),
    progressDeadlineMs: z.number().int().min(1000).max(86_400_000).default(60_000).openapi({ description: 'A deploy that makes no progress (no new replica becomes ready) for this long is rolled back' }),
    drainMs: z.number().int().min(0).max(600_000).default(2000).openapi({ description: 'Time between taking a replica out of the routes and DNS and stopping it' }),
  })
  .refine((d) => d.maxSurge + d.maxUnavailable > 0, { message: 'maxSurge and maxUnavailable cannot both be 0 (a deploy could not replace any replica); set maxSurge to 1' })
  .openapi('DeployStrategy');

/** The replica template: a change to any of these fields is a new revision. */
export const ServiceTemplateFields = ['image', 'command', 'args', 'env', 'workingDir', 'user', 'resources', 'isolation', 'network', 'stopTimeoutMs', 'stopSignal', 'ports', 'healthChecks'] as const;

export const ServiceSpec = z
  .strictObject({
    ...RunFields,
    ports: z.array(ServicePort).max(32).default([]),
    replicas: z.number().int().min(0).max(100).default(1),
    healthChecks: z.strictObject({ startup: HealthCheck.optional(), readiness: HealthCheck.optional(), liveness: HealthCheck.optional() }).default({}).openapi({
      description: 'No readiness check: a replica is ready once it runs, or, when the service has ports, once its first port accepts TCP connections (checked every second)',
    }),
    deploy: DeployStrategy.default({ strategy: 'rolling', maxSurge: 1, maxUnavailable: 0, progressDeadlineMs: 60_000, drainMs: 2000 }),
    domains: z.array(z.string().max(253).regex(HOST_RE, { message: 'domains are lower-case host names such as "www.example.com"' })).max(32).optional(),
    maxConnectionsPerReplica: z.number().int().min(1).max(100_000).optional().openapi({
      description:
        'At most this many connections from the ingress to one replica at a time; requests beyond it wait in the ingress queue (up to 30 s) instead of overflowing a replica\'s accept queue. Default: unlimited',
    }),
  })
  .superRefine((s, ctx) => {
    const seen = new Set<number>();
    for (const [i, p] of s.ports.entries()) {
      if (seen.has(p.port)) ctx.addIssue({ code: 'custom', path: ['ports', i, 'port'], message: `port ${p.port} is listed twice; list each port once` });
      seen.add(p.port);
      // http is routed by Host name on the ingress's own ports; a public tcp port needs a host port of its own.
      if (p.public && p.protocol === 'tcp' && p.hostPort === undefined) {
        ctx.addIssue({
          code: 'custom',
          path: ['ports', i, 'hostPort'],
          message: `public tcp port ${p.port} needs a hostPort: the host port the ingress listens on for it (e.g. "hostPort": ${p.port > 1024 ? p.port : 10000 + p.port}); or drop public to reach it only from the project's workloads at <service>:${p.port}`,
        });
      }
      if (p.hostPort !== undefined && !(p.public && p.protocol === 'tcp')) {
        ctx.addIssue({ code: 'custom', path: ['ports', i, 'hostPort'], message: `hostPort is for public tcp ports only (http ports are served on the ingress's ports by host name); remove it from port ${p.port} or set protocol "tcp" and public: true` });
      }
    }
    const hostPorts = s.ports.flatMap((p) => (p.hostPort === undefined ? [] : [p.hostPort]));
    const twice = hostPorts.find((h, i) => hostPorts.indexOf(h) !== i);
    if (twice !== undefined) ctx.addIssue({ code: 'custom', path: ['ports'], message: `hostPort ${twice} is given to two ports; give each public tcp port its own hostPort` });
    const publicHttp = s.ports.filter((p) => p.public && p.protocol === 'http');
    if (publicHttp.length > 1) {
      ctx.addIssue({
        code: 'custom',
        path: ['ports'],
        message: `only one http port of a service can be public (the ingress sends <service>.<project>.<base domain> to one port); keep ${publicHttp[0]!.port} public and set public: false on ${publicHttp.slice(1).map((p) => p.port).join(', ')}`,
      });
    }
    if (s.network?.mode === 'none') ctx.addIssue({ code: 'custom', path: ['network', 'mode'], message: 'services need a network: remove network.mode or set it to "project"' });
  })
  .openapi('ServiceSpec');
export type ServiceSpec = z.infer<typeof ServiceSpec>;

/** Service names leave room for "-<revision>-<6 hex>" in replica names (≤ 63 characters). */
const ServiceName = Name.refine((n) => n.length <= 48, { message: 'service names are at most 48 characters (replica names add "-<revision>-<id>")' });
export const CreateService = z.strictObject({ name: ServiceName, labels: Labels.optional(), spec: ServiceSpec }).openapi('CreateService');
export const UpdateService = z.strictObject({ labels: Labels.optional(), spec: ServiceSpec, resourceVersion: z.number().int().min(1).optional() }).openapi('UpdateService');
export const ScaleService = z.strictObject({ replicas: z.number().int().min(0).max(100), resourceVersion: z.number().int().min(1).optional() }).openapi('ScaleService');
export const RollbackService = z
  .strictObject({ revision: z.number().int().min(1).optional().openapi({ description: 'Default: the revision before the current one' }) })
  .openapi('RollbackService');

export const ServiceRevision = z
  .object({
    number: z.number().int(),
    hash: z.string(),
    template: z.record(z.string(), z.unknown()),
    createdAt: z.string(),
    outcome: z.enum(['progressing', 'deployed', 'superseded', 'failed']),
    reason: z.string().optional(),
    finishedAt: z.string().optional(),
  })
  .openapi('ServiceRevision');
export type ServiceRevision = z.infer<typeof ServiceRevision>;

export const ServiceInstance = z
  .object({
    id: z.string(),
    name: z.string(),
    revision: z.number().int(),
    phase: z.string(),
    ip: z.string().optional(),
    ready: z.boolean(),
    startedAt: z.string().optional(),
    restartCount: z.number().int(),
    drainingSince: z.string().optional().openapi({ description: 'Out of the routes and DNS since then; stopped after deploy.drainMs' }),
  })
  .openapi('ServiceInstance');
export type ServiceInstance = z.infer<typeof ServiceInstance>;

export const Condition = z.object({ type: z.string(), status: z.enum(['True', 'False']), reason: z.string(), message: z.string(), lastTransitionAt: z.string() }).openapi('Condition');
export type Condition = z.infer<typeof Condition>;

export const ServiceStatus = z
  .object({
    replicas: z.number().int().openapi({ description: 'Replicas that exist and are not draining' }),
    readyReplicas: z.number().int(),
    updatedReplicas: z.number().int().openapi({ description: 'Replicas of the target revision' }),
    currentRevision: z.number().int().optional().openapi({ description: 'The last revision that deployed fully' }),
    targetRevision: z.number().int().optional().openapi({ description: 'The revision being deployed (= currentRevision when idle)' }),
    instances: z.array(ServiceInstance),
    conditions: z.array(Condition),
    revisions: z.array(ServiceRevision).openapi({ description: 'Deploy history, newest last (the last 20)' }),
    lastProgressAt: z.string().optional(),
  })
  .openapi('ServiceStatus');
export type ServiceStatusT = z.infer<typeof ServiceStatus>;
export const Service = z.object({ ...Meta, spec: ServiceSpec, status: ServiceStatus }).openapi('Service');
