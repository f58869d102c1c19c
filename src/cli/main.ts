#!/usr/bin/env node
// berth: the command-line client of berthd. It talks only to the REST API (over the daemon's unix
// socket or TCP); every command maps to one or a few API calls. Errors print one line on stderr,
// "berth: <message> (<code>)", and exit 1; usage errors exit 2.
import { Command, CommanderError, InvalidArgumentError, Option } from 'commander';
import type { ImageSummary } from '../images/catalog.js';
import { spawn } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { constants as osConstants } from 'node:os';
import { ApiError, BerthClient, ConnectError } from './client.js';
import { registerIngress } from './ingress.js';
import { registerServices } from './services.js';
import { registerImageCommands } from './images.js';
import { age, formatLabels, printJson, printTable, relative, shortTime, type OutputFormat } from './format.js';

// ---------------------------------------------------------------------------------------------
// API shapes (only the fields the CLI reads)

interface Meta {
  id: string;
  name: string;
  project: string;
  labels: Record<string, string>;
  createdAt: string;
  updatedAt: string;
  deletionRequestedAt: string | null;
}
interface Resources {
  cpuMillis?: number;
  memoryMiB?: number;
  pids?: number;
}
interface RunSpec {
  image: string;
  command?: string[];
  isolation: string;
  resources?: Resources;
}
interface Workload extends Meta {
  spec: RunSpec & { restartPolicy: string; state: string; stopTimeoutMs: number };
  status: {
    phase: string;
    pid?: number;
    exitCode?: number;
    signal?: string;
    oomKilled?: boolean;
    restartCount: number;
    network?: { ip: string; dnsName: string };
    reason?: string;
    message?: string;
  };
}
interface Project extends Meta {
  spec: { description: string };
}
interface Attempt {
  attempt: number;
  workload: string;
  exitCode?: number;
  oomKilled?: boolean;
}
interface JobRun extends Meta {
  spec: { job: string; trigger: string; template: RunSpec };
  status: { phase: string; attempts: Attempt[]; startedAt?: string; finishedAt?: string; exitCode?: number; reason?: string };
}
interface Job extends Meta {
  spec: { template: RunSpec; schedule?: string; timeZone: string; concurrencyPolicy: string; suspend: boolean };
  status: { active: string[]; lastRun?: string; lastRunPhase?: string; nextScheduleTime?: string };
}
interface List<T> {
  items: T[];
  nextPageToken: string | null;
}
interface Event {
  seq: number;
  type: string;
  reason: string;
  message: string;
  at: string;
}
interface Token {
  id: string;
  name: string;
  project: string | null;
  createdAt: string;
  token?: string;
}
interface DriverInfo {
  driver: string;
  isolation: string;
  healthy: boolean;
  reason: string;
  version?: string;
}
interface Info {
  version: string;
  drivers: DriverInfo[];
  isolations: string[];
}
interface LogLine {
  time: string;
  stream: 'stdout' | 'stderr';
  text: string;
  partial: boolean;
}

const ACTIVE_PHASES = new Set(['pending', 'starting', 'running', 'stopping', 'backoff']);
const TERMINAL_PHASES = new Set(['exited', 'failed', 'stopped']);
const TERMINAL_RUN_PHASES = new Set(['succeeded', 'failed', 'cancelled']);

// ---------------------------------------------------------------------------------------------
// Errors and exit

export class UsageError extends Error {}
/** An error raised by the CLI itself, printed like an API error. */
export class CliError extends ApiError {
  constructor(code: string, message: string) {
    super(code, message, 0);
  }
}

const oneLine = (s: string) => s.replace(/\s*\n\s*/g, ' ').trim();
function errLine(message: string, code?: string): void {
  process.stderr.write(`berth: ${oneLine(message)}${code ? ` (${code})` : ''}\n`);
}

function flush(stream: NodeJS.WriteStream): Promise<void> {
  return new Promise((resolve) => {
    if (stream.writableEnded || stream.destroyed) return resolve();
    stream.write('', () => resolve());
  });
}

// ---------------------------------------------------------------------------------------------
// Connection context

interface CommonOpts {
  addr?: string;
  token?: string;
  project?: string;
  output?: OutputFormat;
}

export interface Ctx {
  client: BerthClient;
  addr: string;
  project: string;
  output: OutputFormat;
  json: boolean;
  /** Why no token could be found, when none was sent. */
  tokenProblem?: string;
  /** "-p NAME " for hints when the project is not the default one. */
  pflag: string;
}

const dataDir = () => process.env.BERTH_DATA_DIR || '/var/lib/berth';

let currentCtx: Ctx | undefined;

function resolveCtx(cmd: Command): Ctx {
  const chain: Command[] = [];
  for (let c: Command | null = cmd; c; c = c.parent) chain.unshift(c);
  const o: CommonOpts = {};
  for (const c of chain) {
    const v = c.opts<CommonOpts>();
    for (const k of ['addr', 'token', 'project', 'output'] as const) {
      if (v[k] !== undefined) (o as Record<string, unknown>)[k] = v[k];
    }
  }
  const dir = dataDir();
  let addr = o.addr || process.env.BERTH_ADDR || '';
  if (!addr) {
    const sock = join(dir, 'berthd.sock');
    addr = existsSync(sock) ? `unix:${sock}` : 'http://127.0.0.1:7878';
  }
  let token = o.token || process.env.BERTH_TOKEN || '';
  let tokenProblem: string | undefined;
  if (!token) {
    const p = join(dir, 'admin.token');
    try {
      token = readFileSync(p, 'utf8').trim();
      if (!token) tokenProblem = `${p} is empty`;
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      tokenProblem =
        code === 'EACCES' || code === 'EPERM'
          ? `cannot read ${p} (permission denied); run as root or pass --token / BERTH_TOKEN`
          : `no --token, no BERTH_TOKEN and no ${p}; pass a token with --token or BERTH_TOKEN`;
    }
  }
  const project = o.project || process.env.BERTH_PROJECT || 'default';
  const output: OutputFormat = o.output ?? 'table';
  const client = new BerthClient({ addr, token });
  const ctx: Ctx = { client, addr, project, output, json: output === 'json', pflag: project === 'default' ? '' : `-p ${project} ` };
  if (tokenProblem) ctx.tokenProblem = tokenProblem;
  currentCtx = ctx;
  return ctx;
}

export const enc = encodeURIComponent;
export const P = (ctx: Ctx) => `/v1/projects/${enc(ctx.project)}`;
const W = (ctx: Ctx, name: string) => `${P(ctx)}/workloads/${enc(name)}`;
const J = (ctx: Ctx, name: string) => `${P(ctx)}/jobs/${enc(name)}`;
export const qs = (params: Record<string, string | number | boolean | undefined>) => {
  const e = Object.entries(params).filter(([, v]) => v !== undefined && v !== '');
  return e.length ? '?' + e.map(([k, v]) => `${enc(k)}=${enc(String(v))}`).join('&') : '';
};

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Poll `get` every intervalMs until `done` holds or timeoutMs passes; returns the last value. */
export async function pollUntil<T>(get: () => Promise<T>, done: (v: T) => boolean, timeoutMs: number, intervalMs = 100): Promise<{ value: T; ok: boolean }> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await get();
    if (done(value)) return { value, ok: true };
    if (Date.now() >= deadline) return { value, ok: false };
    await sleep(intervalMs);
  }
}

/** Poll until GET answers 404 (the object is gone). */
export async function waitGone(ctx: Ctx, path: string, what: string, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      await ctx.client.request('GET', path);
    } catch (e) {
      if (e instanceof ApiError && e.status === 404) return;
      throw e;
    }
    if (Date.now() >= deadline) throw new CliError('unavailable', `${what} was not deleted within ${Math.round(timeoutMs / 1000)} s; check the berthd log`);
    await sleep(200);
  }
}

// ---------------------------------------------------------------------------------------------
// Flag parsers

export function collect(v: string, prev: string[] | undefined): string[] {
  return [...(prev ?? []), v];
}

export function parseIntFlag(min: number, max = Number.MAX_SAFE_INTEGER) {
  return (v: string): number => {
    if (!/^\d+$/.test(v.trim())) throw new InvalidArgumentError(`must be a whole number between ${min} and ${max}`);
    const n = Number(v.trim());
    if (n < min || n > max) throw new InvalidArgumentError(`must be between ${min} and ${max}`);
    return n;
  };
}

/** "--memory 256" (MiB), "64m", "1g", "524288k", "1.5g", "64MiB". Rounds up to whole MiB. */
export function parseMemory(v: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*(?:([kmgt])(?:i?b)?)?$/i.exec(v.trim());
  if (!m) throw new InvalidArgumentError('use a number of MiB or a size with a k/m/g suffix, e.g. 256, 64m, 1g');
  const n = Number(m[1]);
  const unit = (m[2] ?? 'm').toLowerCase();
  const mib = unit === 'k' ? n / 1024 : unit === 'g' ? n * 1024 : unit === 't' ? n * 1024 * 1024 : n;
  const r = Math.ceil(mib);
  if (r < 1) throw new InvalidArgumentError('must be at least 1 MiB');
  return r;
}

/** "--cpus 0.5" → 500 millicores. */
export function parseCpus(v: string): number {
  if (!/^\d+(\.\d+)?$/.test(v.trim())) throw new InvalidArgumentError('use a number of CPUs such as 0.5 or 2');
  const millis = Math.round(Number(v) * 1000);
  if (millis < 1) throw new InvalidArgumentError('must be more than 0');
  return millis;
}

/** "TERM", "sigterm", "SIGTERM" or "15" → "SIGTERM". */
export function parseSignal(v: string): string {
  const s = v.trim().toUpperCase();
  const table = osConstants.signals as Record<string, number>;
  if (/^\d+$/.test(s)) {
    const name = Object.keys(table).find((k) => table[k] === Number(s));
    if (!name) throw new InvalidArgumentError(`unknown signal number ${s}`);
    return name;
  }
  const name = s.startsWith('SIG') ? s : `SIG${s}`;
  if (!(name in table)) throw new InvalidArgumentError(`unknown signal "${v}"; use a name such as TERM, INT, KILL or HUP`);
  return name;
}

function parseSeconds(v: string): number {
  if (!/^\d+(\.\d+)?$/.test(v.trim())) throw new InvalidArgumentError('use a number of seconds, e.g. 10');
  return Math.round(Number(v) * 1000);
}

export function parseKeyValues(items: string[] | undefined, flag: string): Record<string, string> | undefined {
  if (!items || items.length === 0) return undefined;
  const out: Record<string, string> = {};
  for (const it of items) {
    const i = it.indexOf('=');
    if (i <= 0) throw new UsageError(`${flag} "${it}" must be key=value`);
    out[it.slice(0, i)] = it.slice(i + 1);
  }
  return out;
}

export function parseEnv(items: string[] | undefined): Record<string, string> | undefined {
  if (!items || items.length === 0) return undefined;
  const out: Record<string, string> = {};
  for (const it of items) {
    const i = it.indexOf('=');
    if (i === 0) throw new UsageError(`-e "${it}" has no variable name; use -e NAME=value or -e NAME`);
    if (i < 0) {
      const v = process.env[it];
      if (v !== undefined) out[it] = v; // like docker: an unset variable is left out
    } else {
      out[it.slice(0, i)] = it.slice(i + 1);
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Shared options

export function addCommon(cmd: Command, opts: { project?: boolean } = {}): Command {
  cmd
    .option('--addr <addr>', 'berthd address: unix:/path/to/berthd.sock or http://HOST:PORT (env BERTH_ADDR)')
    .option('--token <token>', 'API token (env BERTH_TOKEN; default: $BERTH_DATA_DIR/admin.token)');
  if (opts.project !== false) cmd.option('-p, --project <name>', 'project (env BERTH_PROJECT; default "default")');
  cmd.addOption(new Option('-o, --output <format>', 'output format (default: table)').choices(['table', 'json']));
  return cmd;
}

export interface RunFlags {
  env?: string[];
  workdir?: string;
  user?: string;
  cpus?: number;
  cpuMillis?: number;
  memory?: number;
  pids?: number;
  isolation?: string;
  label?: string[];
  network?: string;
  egress?: string;
  allow?: string[];
}

export function addRunFlags(cmd: Command): Command {
  return cmd
    .option('-e, --env <KEY=VALUE>', 'set an environment variable (-e KEY takes it from this shell); repeatable', collect)
    .option('-w, --workdir <dir>', 'working directory inside the workload (absolute path)')
    .option('-u, --user <user>', 'user to run as: uid, uid:gid or a user name known to the image')
    .addOption(new Option('--cpus <n>', 'CPU limit in CPUs, e.g. 0.5').argParser(parseCpus).conflicts('cpuMillis'))
    .addOption(new Option('--cpu-millis <n>', 'CPU limit in millicores, e.g. 500').argParser(parseIntFlag(1)))
    .addOption(new Option('-m, --memory <size>', 'memory limit: MiB, or with a k/m/g suffix (64m, 1g)').argParser(parseMemory))
    .addOption(new Option('--pids <n>', 'maximum number of processes and threads').argParser(parseIntFlag(1)))
    .addOption(new Option('--isolation <tier>', 'isolation tier').choices(['container', 'gvisor', 'microvm']))
    .addOption(new Option('--network <mode>', "project: own address on the project's network (default); none: loopback only").choices(['project', 'none']))
    .addOption(new Option('--egress <policy>', 'where it may connect: allow-all (default), deny-all, allowlist (with --allow)').choices(['allow-all', 'deny-all', 'allowlist']))
    .option('--allow <cidr[:ports][/proto]>', 'allowlisted destination, e.g. 198.18.0.0/24:80,443/tcp; implies --egress allowlist; repeatable', collect)
    .option('-l, --label <key=value>', 'label; repeatable', collect);
}

/** "198.18.0.0/24:80,443/tcp" → an egress rule (the API validates the parts). */
export function parseAllow(s: string): { cidr: string; ports?: number[]; protocol?: string } {
  const m = /^([0-9./]+?)(?::([0-9,]+))?(?:\/(tcp|udp|any))?$/.exec(s);
  if (!m) throw new UsageError(`--allow ${s}: expected CIDR[:PORT,PORT][/tcp|udp|any], e.g. 198.18.0.0/24:80,443/tcp`);
  return { cidr: m[1]!, ...(m[2] ? { ports: m[2].split(',').map(Number) } : {}), ...(m[3] ? { protocol: m[3] } : {}) };
}

export function buildRunSpec(image: string, command: string[], o: RunFlags): Record<string, unknown> {
  const spec: Record<string, unknown> = { image };
  if (command.length > 0) spec.command = command;
  const env = parseEnv(o.env);
  if (env && Object.keys(env).length > 0) spec.env = env;
  if (o.workdir !== undefined) spec.workingDir = o.workdir;
  if (o.user !== undefined) spec.user = o.user;
  const resources: Resources = {};
  const cpu = o.cpus ?? o.cpuMillis;
  if (cpu !== undefined) resources.cpuMillis = cpu;
  if (o.memory !== undefined) resources.memoryMiB = o.memory;
  if (o.pids !== undefined) resources.pids = o.pids;
  if (Object.keys(resources).length > 0) spec.resources = resources;
  if (o.isolation !== undefined) spec.isolation = o.isolation;
  if (o.network !== undefined || o.egress !== undefined || o.allow !== undefined) {
    const policy = o.allow ? 'allowlist' : o.egress;
    if (o.egress !== undefined && o.allow && o.egress !== 'allowlist') throw new UsageError(`--allow needs --egress allowlist, not ${o.egress}`);
    if (policy === 'allowlist' && !o.allow) throw new UsageError('--egress allowlist needs at least one --allow CIDR[:PORTS]');
    spec.network = {
      ...(o.network ? { mode: o.network } : {}),
      ...(policy ? { egress: policy === 'allowlist' ? { policy, allow: o.allow!.map(parseAllow) } : { policy } } : {}),
    };
  }
  return spec;
}

/**
 * A command whose arguments end with "IMAGE [CMD ARGS...]": options may come anywhere before the
 * image, and everything after the image belongs to the workload's command (as with docker run),
 * so `berth run busybox ls -l` runs `ls -l`. It works by inserting "--" right after the image
 * before commander parses the options; an explicit "--" is honoured as is.
 */
class ImageCommand extends Command {
  /** How many operands precede the command: 1 for IMAGE, 2 for NAME IMAGE. */
  operandsBeforeCommand = 1;

  override parseOptions(argv: string[]): ReturnType<Command['parseOptions']> {
    return super.parseOptions(insertDashDash(this, argv, this.operandsBeforeCommand));
  }
}

function insertDashDash(cmd: Command, argv: string[], operandsNeeded: number): string[] {
  const find = (flag: string) => cmd.options.find((o) => o.long === flag || o.short === flag);
  let operands = 0;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '--') return argv;
    if (a.startsWith('--')) {
      if (a.includes('=')) continue;
      const o = find(a);
      if (!o) return argv; // unknown: let commander report it
      if (o.required || o.optional) i++;
      continue;
    }
    if (a.startsWith('-') && a.length > 1) {
      // one or more short flags, the last possibly with a value: -d, -dq, -eK=V, -e K=V
      for (let j = 1; j < a.length; j++) {
        const o = find(`-${a[j]}`);
        if (!o) return argv;
        if (o.required || o.optional) {
          if (j === a.length - 1) i++;
          break;
        }
      }
      continue;
    }
    operands++;
    if (operands === operandsNeeded) {
      return argv[i + 1] === '--' ? argv : [...argv.slice(0, i + 1), '--', ...argv.slice(i + 1)];
    }
  }
  return argv;
}

export function imageCommand(parent: Command, name: string, operandsBeforeCommand: number): ImageCommand {
  const cmd = new ImageCommand(name);
  cmd.operandsBeforeCommand = operandsBeforeCommand;
  cmd.copyInheritedSettings(parent);
  parent.addCommand(cmd);
  return cmd;
}

// ---------------------------------------------------------------------------------------------
// Logs

function logWriter(opts: { timestamps?: boolean; json?: boolean }): (line: string) => void {
  const atStart = { stdout: true, stderr: true };
  return (line: string) => {
    if (!line) return;
    if (opts.json) {
      process.stdout.write(line + '\n');
      return;
    }
    let l: LogLine;
    try {
      l = JSON.parse(line) as LogLine;
    } catch {
      process.stdout.write(line + '\n');
      return;
    }
    const s = l.stream === 'stderr' ? 'stderr' : 'stdout';
    const prefix = opts.timestamps && atStart[s] ? `${l.time} ` : '';
    process[s].write(prefix + l.text + (l.partial ? '' : '\n'));
    atStart[s] = !l.partial;
  };
}

/** Stream until the server ends it; Ctrl-C detaches (returns true) without touching the workload. */
export async function attach(ctx: Ctx, path: string, onLine: (line: string) => void): Promise<boolean> {
  const ac = new AbortController();
  let detached = false;
  const onSigint = () => {
    detached = true;
    ac.abort();
  };
  process.on('SIGINT', onSigint);
  try {
    await ctx.client.stream(path, onLine, ac.signal);
  } finally {
    process.removeListener('SIGINT', onSigint);
  }
  return detached;
}

export function detachedNote(msg: string): void {
  if (process.stderr.isTTY) process.stderr.write('\n');
  errLine(msg);
}

// ---------------------------------------------------------------------------------------------
// Exit codes

function signalNumber(sig: string | undefined): number | undefined {
  if (!sig) return undefined;
  return (osConstants.signals as Record<string, number>)[sig];
}

/** docker-like exit status for a finished workload; prints the reason for abnormal ends. */
function workloadExitCode(w: Workload): number {
  const st = w.status;
  if (st.phase === 'failed' && (st.reason === 'FailedStart' || st.reason === 'IsolationUnavailable')) {
    errLine(st.message ?? 'the workload failed to start', st.reason);
    return 125;
  }
  if (st.oomKilled) {
    const lim = w.spec.resources?.memoryMiB;
    process.stderr.write(
      lim !== undefined ? `berth: workload was OOM-killed (memory limit ${lim} MiB)\n` : 'berth: workload was OOM-killed (no memory limit was set; the host ran out of memory)\n',
    );
    return 137;
  }
  if (!TERMINAL_PHASES.has(st.phase)) {
    errLine(
      `workload ${w.name} is still ${st.phase}${st.reason ? ` (${st.reason}${st.message ? `: ${st.message}` : ''})` : ''}; follow it with \`berth logs -f ${w.name}\``,
      'unavailable',
    );
    return 1;
  }
  if (typeof st.exitCode === 'number' && st.exitCode >= 0) return st.exitCode > 255 ? 255 : st.exitCode;
  const sn = signalNumber(st.signal);
  if (sn !== undefined) return 128 + sn;
  if (st.phase === 'stopped' || st.phase === 'exited') return st.phase === 'exited' ? 0 : 143;
  errLine(`workload ${w.name} ended without an exit status${st.reason ? ` (${st.reason}${st.message ? `: ${st.message}` : ''})` : ''}`, 'unknown');
  return 1;
}

// ---------------------------------------------------------------------------------------------
// Commands

type Action = (ctx: Ctx, args: string[], opts: Record<string, unknown>, cmd: Command) => Promise<number | void>;

let exitStatus = 0;

/** Wrap an action: resolve connection settings, run, record the exit status. */
export function act(fn: Action) {
  return async (...all: unknown[]) => {
    const cmd = all[all.length - 1] as Command;
    const opts = all[all.length - 2] as Record<string, unknown>;
    const args = all.slice(0, -2).flatMap((a) => (Array.isArray(a) ? (a as string[]) : a === undefined ? [] : [a as string]));
    const ctx = resolveCtx(cmd);
    const code = await fn(ctx, args, opts, cmd);
    exitStatus = code ?? 0;
  };
}

function registerInfo(program: Command): void {
  addCommon(program.command('info').description('show the berthd version and its isolation drivers'), { project: false }).action(
    act(async (ctx) => {
      const info = await ctx.client.request<Info>('GET', '/v1/info');
      if (ctx.json) return printJson(info);
      process.stdout.write(`berthd ${info.version}\n`);
      const rows: unknown[][] = info.drivers.map((d) => [d.isolation, d.driver, d.healthy, d.version, d.reason]);
      for (const iso of info.isolations) {
        if (!info.drivers.some((d) => d.isolation === iso)) rows.push([iso, '-', false, '-', 'no driver for this isolation tier on this host']);
      }
      printTable(['ISOLATION', 'DRIVER', 'HEALTHY', 'VERSION', 'REASON'], rows);
    }),
  );
}

function registerProjects(program: Command): void {
  const project = program.command('project').description('manage projects');
  addCommon(project.command('create').description('create a project').argument('<name>'), { project: false })
    .option('--description <text>', 'description')
    .option('-l, --label <key=value>', 'label; repeatable', collect)
    .action(
      act(async (ctx, [name], o) => {
        const labels = parseKeyValues(o.label as string[] | undefined, '-l');
        const body: Record<string, unknown> = { name };
        if (labels) body.labels = labels;
        if (o.description !== undefined) body.spec = { description: o.description };
        const p = await ctx.client.request<Project>('POST', '/v1/projects', body);
        if (ctx.json) printJson(p);
        else process.stdout.write(`${p.name}\n`);
      }),
    );
  addCommon(project.command('ls').alias('list').description('list projects'), { project: false }).action(
    act(async (ctx) => {
      const items: Project[] = [];
      let token: string | null = null;
      do {
        const page: List<Project> = await ctx.client.request<List<Project>>('GET', `/v1/projects${qs({ pageToken: token ?? undefined })}`);
        items.push(...page.items);
        token = page.nextPageToken;
      } while (token);
      if (ctx.json) return printJson({ items, nextPageToken: null });
      printTable(
        ['NAME', 'DESCRIPTION', 'LABELS', 'AGE'],
        items.map((p) => [p.name, p.spec.description, formatLabels(p.labels), age(p.createdAt)]),
      );
    }),
  );
  addCommon(project.command('rm').alias('remove').description('delete an empty project').argument('<name>'), { project: false }).action(
    act(async (ctx, [name]) => {
      const p = await ctx.client.request<Project>('DELETE', `/v1/projects/${enc(name!)}`);
      if (ctx.json) printJson(p);
      else process.stdout.write(`${name}\n`);
    }),
  );
  addCommon(project.command('inspect').description('show a project as JSON').argument('<name>'), { project: false }).action(
    act(async (ctx, [name]) => {
      printJson(await ctx.client.request<Project>('GET', `/v1/projects/${enc(name!)}`));
    }),
  );
}

function registerWorkloads(program: Command): void {
  // ---- run
  const run = addCommon(
    addRunFlags(
      imageCommand(program, 'run', 1)
        .description('create a workload and attach to its output (exit with its exit code); -d to detach')
        .usage('[options] IMAGE [-- CMD ARGS...]')
        .argument('<image>', 'image, e.g. busybox')
        .argument('[command...]', 'command and arguments; everything after IMAGE (or after --)')
        .option('-d, --detach', 'do not attach; print the workload name')
        .option('--name <name>', 'workload name (generated when omitted)')
        .addOption(new Option('--restart <policy>', 'restart policy').choices(['never', 'on-failure', 'always'])),
    ),
  );
  run.action(
    act(async (ctx, args, o) => {
      const [image, ...rest] = args;
      const flags = o as RunFlags & { detach?: boolean; name?: string; restart?: string };
      const spec = buildRunSpec(image!, rest, flags);
      if (flags.restart !== undefined) spec.restartPolicy = flags.restart;
      const body: Record<string, unknown> = {};
      if (flags.name !== undefined) body.name = flags.name;
      const labels = parseKeyValues(flags.label, '-l');
      if (labels) body.labels = labels;
      body.spec = spec;
      const w = await ctx.client.request<Workload>('POST', `${P(ctx)}/workloads`, body);
      if (flags.detach) {
        if (ctx.json) printJson(w);
        else process.stdout.write(`${w.name}\n`);
        return 0;
      }
      const detached = await attach(ctx, `${W(ctx, w.name)}/logs${qs({ follow: 'true', format: 'ndjson' })}`, logWriter({ json: ctx.json }));
      if (detached) {
        detachedNote(`detached from ${w.name}; it keeps running. Reattach with \`berth ${ctx.pflag}logs -f ${w.name}\`, stop it with \`berth ${ctx.pflag}stop ${w.name}\``);
        return 130;
      }
      const { value } = await pollUntil(
        () => ctx.client.request<Workload>('GET', W(ctx, w.name)),
        (x) => TERMINAL_PHASES.has(x.status.phase),
        5000,
        100,
      );
      return workloadExitCode(value);
    }),
  );

  // ---- ps
  addCommon(
    program
      .command('ps')
      .description('list workloads (running ones; -a for all)')
      .option('-a, --all', 'show all workloads, including finished ones')
      .option('-l, --selector <selector>', 'label selector, e.g. team=web,tier!=dev; repeatable', collect),
  ).action(
    act(async (ctx, _args, o) => {
      const selector = (o.selector as string[] | undefined)?.join(',');
      const items: Workload[] = [];
      let token: string | null = null;
      do {
        const page: List<Workload> = await ctx.client.request<List<Workload>>(
          'GET',
          `${P(ctx)}/workloads${qs({ labelSelector: selector, pageToken: token ?? undefined })}`,
        );
        items.push(...page.items);
        token = page.nextPageToken;
      } while (token);
      const shown = o.all ? items : items.filter((w) => ACTIVE_PHASES.has(w.status.phase));
      if (ctx.json) return printJson({ items: shown, nextPageToken: null });
      printTable(
        ['NAME', 'PHASE', 'EXIT', 'IMAGE', 'ISOLATION', 'ADDRESS', 'PID', 'AGE'],
        shown.map((w) => [
          w.name,
          w.status.phase + (w.deletionRequestedAt ? ' (deleting)' : ''),
          w.status.oomKilled ? `${w.status.exitCode ?? ''} (OOM)` : w.status.exitCode,
          w.spec.image,
          w.spec.isolation,
          w.status.network?.ip,
          w.status.pid,
          age(w.createdAt),
        ]),
      );
    }),
  );

  // ---- logs
  addCommon(
    program
      .command('logs')
      .description("print a workload's output")
      .argument('<name>')
      .option('-f, --follow', 'keep streaming until the workload ends')
      .addOption(new Option('--tail <n>', 'only the last N lines').argParser(parseIntFlag(0, 1_000_000)))
      .option('-t, --timestamps', 'prefix each line with its time'),
  ).action(
    act(async (ctx, [name], o) => {
      const path = `${W(ctx, name!)}/logs${qs({
        follow: o.follow ? 'true' : undefined,
        tail: o.tail as number | undefined,
        timestamps: o.timestamps ? 'true' : undefined,
        format: 'ndjson',
      })}`;
      const detached = await attach(ctx, path, logWriter({ json: ctx.json, timestamps: !!o.timestamps }));
      return detached ? 130 : 0;
    }),
  );

  // ---- stop
  addCommon(
    program
      .command('stop')
      .description('stop workloads and wait until they have stopped')
      .argument('<names...>')
      .addOption(new Option('-t, --time <seconds>', 'grace period before SIGKILL').argParser(parseSeconds))
      .addOption(new Option('-s, --signal <signal>', 'stop signal, e.g. TERM, INT').argParser(parseSignal)),
  ).action(
    act(async (ctx, names, o) => {
      const body: Record<string, unknown> = {};
      if (o.time !== undefined) body.timeoutMs = o.time;
      if (o.signal !== undefined) body.signal = o.signal;
      const results = await Promise.allSettled(
        names.map(async (name) => {
          const w = await ctx.client.request<Workload>('POST', `${W(ctx, name)}/stop`, body);
          const grace = (o.time as number | undefined) ?? w.spec.stopTimeoutMs ?? 10_000;
          const { value, ok } = await pollUntil(
            () => ctx.client.request<Workload>('GET', W(ctx, name)),
            (x) => TERMINAL_PHASES.has(x.status.phase),
            grace + 15_000,
            100,
          );
          if (!ok) throw new CliError('unavailable', `workload ${name} did not stop within ${Math.round((grace + 15_000) / 1000)} s (phase ${value.status.phase}); see \`berth events ${name}\``);
          return value;
        }),
      );
      return report(ctx, names, results);
    }),
  );

  // ---- start
  addCommon(program.command('start').description('start stopped workloads').argument('<names...>')).action(
    act(async (ctx, names) => {
      const results = await Promise.allSettled(names.map((name) => ctx.client.request<Workload>('POST', `${W(ctx, name)}/start`)));
      return report(ctx, names, results);
    }),
  );

  // ---- rm
  addCommon(
    program
      .command('rm')
      .alias('remove')
      .description('delete workloads (-f also stops running ones) and wait until they are gone')
      .argument('<names...>')
      .option('-f, --force', 'delete even if running (the workload is stopped first)'),
  ).action(
    act(async (ctx, names, o) => {
      const results = await Promise.allSettled(
        names.map(async (name) => {
          if (!o.force) {
            const w = await ctx.client.request<Workload>('GET', W(ctx, name));
            if (!TERMINAL_PHASES.has(w.status.phase)) {
              throw new CliError(
                'failed_precondition',
                `workload ${name} is ${w.status.phase}; stop it first with \`berth ${ctx.pflag}stop ${name}\` or remove it anyway with \`berth ${ctx.pflag}rm -f ${name}\``,
              );
            }
          }
          const r = await ctx.client.request<Workload>('DELETE', W(ctx, name));
          await waitGone(ctx, W(ctx, name), `workload ${name}`, 60_000);
          return r;
        }),
      );
      return report(ctx, names, results);
    }),
  );

  // ---- inspect / events
  addCommon(program.command('inspect').description('show a workload as JSON').argument('<name>')).action(
    act(async (ctx, [name]) => {
      printJson(await ctx.client.request<Workload>('GET', W(ctx, name!)));
    }),
  );
  addCommon(program.command('events').description("show a workload's events").argument('<name>')).action(
    act(async (ctx, [name]) => {
      const res = await ctx.client.request<{ items: Event[] }>('GET', `${W(ctx, name!)}/events`);
      if (ctx.json) return printJson(res);
      printTable(
        ['TIME', 'TYPE', 'REASON', 'MESSAGE'],
        res.items.map((e) => [shortTime(e.at), e.type, e.reason, e.message]),
      );
    }),
  );
}

/** Print one name per success (or the JSON of each), one error line per failure. */
function report<T>(ctx: Ctx, names: string[], results: PromiseSettledResult<T>[]): number {
  let code = 0;
  const ok: T[] = [];
  results.forEach((r, i) => {
    if (r.status === 'fulfilled') {
      ok.push(r.value);
      if (!ctx.json) process.stdout.write(`${names[i]}\n`);
    } else {
      code = 1;
      printError(r.reason);
    }
  });
  if (ctx.json) printJson({ items: ok });
  return code;
}

function registerJobs(program: Command): void {
  const job = program.command('job').description('manage jobs (run-to-completion workloads, optionally on a schedule)');

  addCommon(
    addRunFlags(
      imageCommand(job, 'create', 2)
        .description('create a job')
        .usage('[options] NAME IMAGE [-- CMD ARGS...]')
        .argument('<name>')
        .argument('<image>')
        .argument('[command...]', 'command and arguments; everything after IMAGE (or after --)')
        .option('--schedule <cron>', '5-field cron schedule, e.g. "*/5 * * * *"')
        .option('--tz <zone>', 'time zone of the schedule, e.g. Europe/Paris (default UTC)')
        .addOption(new Option('--concurrency <policy>', 'what to do when a run is still active').choices(['allow', 'forbid', 'replace']))
        .addOption(new Option('--retries <n>', 'extra attempts after a failed one').argParser(parseIntFlag(0, 100)))
        .addOption(new Option('--backoff-ms <n>', 'first retry delay in ms (doubles each retry)').argParser(parseIntFlag(0, 3_600_000)))
        .addOption(new Option('--deadline-ms <n>', 'fail a run still going after this many ms').argParser(parseIntFlag(1)))
        .addOption(new Option('--history <n>', 'finished runs to keep').argParser(parseIntFlag(1, 1000))),
    ),
  ).action(
    act(async (ctx, args, o) => {
      const [name, image, ...rest] = args;
      const flags = o as RunFlags & {
        schedule?: string;
        tz?: string;
        concurrency?: string;
        retries?: number;
        backoffMs?: number;
        deadlineMs?: number;
        history?: number;
      };
      const spec: Record<string, unknown> = { template: buildRunSpec(image!, rest, flags) };
      if (flags.schedule !== undefined) spec.schedule = flags.schedule;
      if (flags.tz !== undefined) spec.timeZone = flags.tz;
      if (flags.concurrency !== undefined) spec.concurrencyPolicy = flags.concurrency;
      if (flags.retries !== undefined) spec.retries = flags.retries;
      if (flags.backoffMs !== undefined) spec.retryBackoffMs = flags.backoffMs;
      if (flags.deadlineMs !== undefined) spec.activeDeadlineMs = flags.deadlineMs;
      if (flags.history !== undefined) spec.historyLimit = flags.history;
      const body: Record<string, unknown> = { name };
      const labels = parseKeyValues(flags.label, '-l');
      if (labels) body.labels = labels;
      body.spec = spec;
      const j = await ctx.client.request<Job>('POST', `${P(ctx)}/jobs`, body);
      if (ctx.json) printJson(j);
      else process.stdout.write(`${j.name}\n`);
    }),
  );

  addCommon(job.command('ls').alias('list').description('list jobs')).action(
    act(async (ctx) => {
      const items: Job[] = [];
      let token: string | null = null;
      do {
        const page: List<Job> = await ctx.client.request<List<Job>>('GET', `${P(ctx)}/jobs${qs({ pageToken: token ?? undefined })}`);
        items.push(...page.items);
        token = page.nextPageToken;
      } while (token);
      if (ctx.json) return printJson({ items, nextPageToken: null });
      printTable(
        ['NAME', 'SCHEDULE', 'TZ', 'POLICY', 'ACTIVE', 'LAST-RUN', 'LAST-PHASE', 'NEXT'],
        items.map((j) => [
          j.name,
          j.spec.schedule ? j.spec.schedule + (j.spec.suspend ? ' (suspended)' : '') : '-',
          j.spec.timeZone,
          j.spec.concurrencyPolicy,
          j.status.active.length,
          j.status.lastRun,
          j.status.lastRunPhase,
          relative(j.status.nextScheduleTime),
        ]),
      );
    }),
  );

  addCommon(
    job
      .command('run')
      .description('start a run of a job now and follow its output (exit with its exit code); -d to detach')
      .argument('<name>')
      .option('-d, --detach', 'do not follow; print the run name'),
  ).action(
    act(async (ctx, [name], o) => {
      const run = await ctx.client.request<JobRun>('POST', `${J(ctx, name!)}/runs`);
      if (o.detach) {
        if (ctx.json) printJson(run);
        else process.stdout.write(`${run.name}\n`);
        return 0;
      }
      const runPath = `${J(ctx, name!)}/runs/${enc(run.name)}`;
      const detached = await attach(ctx, `${runPath}/logs${qs({ follow: 'true', format: 'ndjson' })}`, logWriter({ json: ctx.json }));
      if (detached) {
        detachedNote(`detached from run ${run.name}; it keeps running. Reattach with \`berth ${ctx.pflag}job logs -f ${name} ${run.name}\``);
        return 130;
      }
      const { value } = await pollUntil(
        () => ctx.client.request<JobRun>('GET', runPath),
        (r) => TERMINAL_RUN_PHASES.has(r.status.phase),
        10_000,
        100,
      );
      return await runExitCode(ctx, name!, value);
    }),
  );

  addCommon(job.command('runs').description('list the runs of a job').argument('<name>')).action(
    act(async (ctx, [name]) => {
      const res = await ctx.client.request<List<JobRun>>('GET', `${J(ctx, name!)}/runs`);
      if (ctx.json) return printJson(res);
      printTable(
        ['RUN', 'PHASE', 'TRIGGER', 'ATTEMPTS', 'EXIT', 'STARTED', 'FINISHED'],
        res.items.map((r) => [
          r.name,
          r.status.phase,
          r.spec.trigger,
          r.status.attempts.length,
          r.status.exitCode,
          relative(r.status.startedAt),
          relative(r.status.finishedAt),
        ]),
      );
    }),
  );

  addCommon(
    job
      .command('logs')
      .description('print the output of a job run (every attempt, in order)')
      .argument('<name>')
      .argument('<run>')
      .option('-f, --follow', 'keep streaming until the run ends')
      .option('-t, --timestamps', 'prefix each line with its time'),
  ).action(
    act(async (ctx, [name, run], o) => {
      const path = `${J(ctx, name!)}/runs/${enc(run!)}/logs${qs({
        follow: o.follow ? 'true' : undefined,
        timestamps: o.timestamps ? 'true' : undefined,
        format: 'ndjson',
      })}`;
      const detached = await attach(ctx, path, logWriter({ json: ctx.json, timestamps: !!o.timestamps }));
      return detached ? 130 : 0;
    }),
  );

  addCommon(job.command('cancel').description('cancel a job run').argument('<name>').argument('<run>')).action(
    act(async (ctx, [name, run]) => {
      const r = await ctx.client.request<JobRun>('POST', `${J(ctx, name!)}/runs/${enc(run!)}/cancel`);
      if (ctx.json) printJson(r);
      else process.stdout.write(`${r.name}\n`);
    }),
  );

  addCommon(job.command('rm').alias('remove').description('delete a job and its runs, and wait until it is gone').argument('<name>')).action(
    act(async (ctx, [name]) => {
      const j = await ctx.client.request<Job>('DELETE', J(ctx, name!));
      await waitGone(ctx, J(ctx, name!), `job ${name}`, 60_000);
      if (ctx.json) printJson(j);
      else process.stdout.write(`${name}\n`);
    }),
  );

  addCommon(job.command('inspect').description('show a job as JSON').argument('<name>')).action(
    act(async (ctx, [name]) => {
      printJson(await ctx.client.request<Job>('GET', J(ctx, name!)));
    }),
  );
}

/** Exit status of a finished job run; explains failed starts, OOM kills and cancellations. */
async function runExitCode(ctx: Ctx, job: string, r: JobRun): Promise<number> {
  const st = r.status;
  if (!TERMINAL_RUN_PHASES.has(st.phase)) {
    errLine(`run ${r.name} is still ${st.phase}; follow it with \`berth ${ctx.pflag}job logs -f ${job} ${r.name}\``, 'unavailable');
    return 1;
  }
  if (st.phase === 'succeeded') return 0;
  const last = st.attempts[st.attempts.length - 1];
  if (last && (last.exitCode === undefined || last.exitCode < 0)) {
    // The attempt did not produce an exit status; its workload says why (e.g. FailedStart).
    try {
      const w = await ctx.client.request<Workload>('GET', W(ctx, last.workload));
      if (w.status.phase === 'failed' && w.status.reason === 'FailedStart') {
        errLine(w.status.message ?? 'the job failed to start', 'FailedStart');
        return 125;
      }
    } catch {
      // the attempt workload may already be gone; fall through
    }
  }
  if (last?.oomKilled) {
    const lim = r.spec.template.resources?.memoryMiB;
    process.stderr.write(
      lim !== undefined ? `berth: workload was OOM-killed (memory limit ${lim} MiB)\n` : 'berth: workload was OOM-killed (no memory limit was set; the host ran out of memory)\n',
    );
    return 137;
  }
  if (st.phase === 'cancelled') {
    errLine(`run ${r.name} was cancelled${st.reason ? `: ${st.reason}` : ''}`, 'cancelled');
    return 1;
  }
  if (typeof st.exitCode === 'number' && st.exitCode > 0) return st.exitCode > 255 ? 255 : st.exitCode;
  errLine(`run ${r.name} failed${st.reason ? `: ${st.reason}` : ''}`, 'failed');
  return 1;
}

function registerTokens(program: Command): void {
  const token = program.command('token').description('manage API tokens');
  addCommon(
    token.command('create').description('create an API token and print its secret (shown only once)').argument('<name>').option('-p, --project <project>', 'limit the token to one project'),
    { project: false },
  ).action(
    act(async (ctx, [name], o) => {
      const body: Record<string, unknown> = { name };
      if (o.project !== undefined) body.project = o.project;
      const t = await ctx.client.request<Token>('POST', '/v1/tokens', body);
      if (ctx.json) return printJson(t);
      process.stdout.write(`${t.token ?? ''}\n`);
      if (process.stderr.isTTY) process.stderr.write('store this token now; berthd does not show it again\n');
    }),
  );
  addCommon(token.command('ls').alias('list').description('list API tokens'), { project: false }).action(
    act(async (ctx) => {
      const res = await ctx.client.request<{ items: Token[] }>('GET', '/v1/tokens');
      if (ctx.json) return printJson(res);
      printTable(
        ['NAME', 'PROJECT', 'CREATED'],
        res.items.map((t) => [t.name, t.project ?? '(all)', relative(t.createdAt)]),
      );
    }),
  );
  addCommon(token.command('rm').alias('remove').description('revoke an API token').argument('<name>'), { project: false }).action(
    act(async (ctx, [name]) => {
      await ctx.client.request('DELETE', `/v1/tokens/${enc(name!)}`);
      if (ctx.json) printJson({ name });
      else process.stdout.write(`${name}\n`);
    }),
  );
}

export interface LayerProgress {
  digest: string;
  kind: 'config' | 'layer';
  size: number;
  bytes: number;
  status: string;
}

function humanBytes(n: number): string {
  if (n < 1024) return `${n} B`;
  const units = ['kB', 'MB', 'GB', 'TB'];
  let v = n / 1024;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v.toFixed(v < 10 ? 1 : 0)} ${units[i]}`;
}

async function readStdin(): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const c of process.stdin) chunks.push(c as Buffer);
  return Buffer.concat(chunks).toString('utf8').replace(/\r?\n$/, '');
}

/** Per-layer progress on stderr: redrawn bars on a terminal, one line per state change otherwise. */
function progressPrinter(): { update(p: LayerProgress): void; finish(): void } {
  const tty = process.stderr.isTTY;
  const layers = new Map<string, LayerProgress>();
  let drawn = 0;
  const line = (p: LayerProgress) => {
    const id = p.digest.slice(7, 19);
    const pct = p.size > 0 ? Math.min(100, Math.floor((p.bytes / p.size) * 100)) : 100;
    const width = 24;
    const filled = Math.round((pct / 100) * width);
    const bar = p.status === 'downloading' ? ` [${'='.repeat(filled)}${' '.repeat(width - filled)}] ${humanBytes(p.bytes)}/${humanBytes(p.size)}` : '';
    const label = p.status === 'exists' ? 'already present' : p.status;
    return `${id} ${p.kind === 'config' ? '(config) ' : ''}${label}${bar}`;
  };
  return {
    update(p) {
      const prev = layers.get(p.digest);
      layers.set(p.digest, p);
      if (!tty) {
        if (prev?.status !== p.status && p.status !== 'downloading') process.stderr.write(`${line(p)}\n`);
        return;
      }
      if (drawn) process.stderr.write(`\x1b[${drawn}A`);
      for (const l of layers.values()) process.stderr.write(`\x1b[2K${line(l)}\n`);
      drawn = layers.size;
    },
    finish() {
      drawn = 0;
    },
  };
}

function registerImages(program: Command): void {
  const image = program.command('image').description('manage images (pulled from OCI registries, plus the built-in busybox)');
  addCommon(image.command('ls').alias('list').description('list images on this host'), { project: false }).action(
    act(async (ctx) => {
      const res = await ctx.client.request<{ items: ImageSummary[] }>('GET', '/v1/images');
      if (ctx.json) return printJson(res);
      printTable(
        ['REF', 'DIGEST', 'SIZE', 'LAYERS', 'CREATED'],
        res.items.map((i) => [i.ref, i.digest.slice(0, 19), i.builtin ? '(built-in)' : humanBytes(i.size), i.layers, i.created ? relative(i.created) : '-']),
      );
    }),
  );
  addCommon(
    image
      .command('pull')
      .description('pull an image from its registry (plain HTTP for loopback registries) and unpack it')
      .argument('<ref>', 'e.g. 127.0.0.1:5000/team/app:v1 or registry.example.com/app@sha256:…')
      .option('-u, --username <name>', 'registry user name (the password is read from stdin with --password-stdin)')
      .option('--password-stdin', 'read the registry password from standard input'),
    { project: false },
  ).action(
    act(async (ctx, [ref], o) => {
      const body: Record<string, unknown> = { ref, progress: true };
      if (o.passwordStdin && !o.username) throw new UsageError('--password-stdin needs --username');
      if (o.username) {
        if (!o.passwordStdin) throw new UsageError('give the registry password on standard input with --password-stdin (never on the command line)');
        body.auth = { username: o.username, password: await readStdin() };
      }
      const bar = ctx.json ? undefined : progressPrinter();
      let result: unknown;
      let failure: ApiError | undefined;
      await ctx.client.stream(
        '/v1/images/pull',
        (l) => {
          if (!l.trim()) return;
          const m = JSON.parse(l) as { progress?: LayerProgress; image?: ImageSummary; error?: { code: string; message: string } };
          if (m.progress) bar?.update(m.progress);
          else if (m.image) result = m.image;
          else if (m.error) failure = new ApiError(m.error.code, m.error.message, 0);
        },
        undefined,
        { method: 'POST', body },
      );
      bar?.finish();
      if (failure) throw failure;
      if (!result) throw new CliError('unavailable', 'berthd ended the pull without a result; check the berthd log');
      if (ctx.json) return printJson(result);
      const img = result as ImageSummary;
      process.stdout.write(`${img.ref}\n${img.digest}\n`);
    }),
  );
  addCommon(image.command('inspect').description('show an image as JSON (config, layers, whether it is unpacked)').argument('<ref>'), { project: false }).action(
    act(async (ctx, [ref]) => {
      printJson(await ctx.client.request('GET', `/v1/images/inspect${qs({ ref })}`));
    }),
  );
  addCommon(
    image.command('rm').alias('remove').description('remove an image tag, then its blobs and unpacked tree if nothing else uses them').argument('<refs...>'),
    { project: false },
  ).action(
    act(async (ctx, refs) => {
      const results = await Promise.allSettled(refs.map((r) => ctx.client.request<{ ref: string; removedBlobs: string[]; freedBytes: number }>('DELETE', `/v1/images${qs({ ref: r })}`)));
      if (ctx.json) {
        printJson(results.map((r, i) => (r.status === 'fulfilled' ? r.value : { ref: refs[i], error: { code: (r.reason as ApiError).code, message: (r.reason as ApiError).message } })));
      }
      let failed = 0;
      for (const [i, r] of results.entries()) {
        if (r.status === 'fulfilled') {
          if (!ctx.json) process.stdout.write(`${r.value.ref} (freed ${humanBytes(r.value.freedBytes)}, ${r.value.removedBlobs.length} blobs)\n`);
        } else {
          failed++;
          const e = r.reason as ApiError;
          errLine(`${refs[i]}: ${e.message}`, e.code);
        }
      }
      return failed ? 1 : 0;
    }),
  );
  registerImageCommands(program, image, { addCommon, act, qs, readStdin, progressPrinter, usage: (m) => new UsageError(m), failure: (c, m) => new CliError(c, m) });
}

function registerBench(program: Command): void {
  const bench = program.command('bench').description('run a benchmark on this host (as root; starts its own throw-away berthd)');
  bench
    .command('isolation')
    .description('measure every available isolation tier beside its bare runtime: cold start, memory overhead, density')
    .option('--runs <n>', 'cold-start runs per tier (default 30)', parseIntFlag(1))
    .option('--density-max <n>', 'most idle workloads per tier in the density run (default 50 for container, 20 for gvisor)', parseIntFlag(1))
    .option('--write <file>', 'also write the result into this file (e.g. BENCHMARKS.md)')
    .action(async (o: { runs?: number; densityMax?: number; write?: string }) => {
      // dist/src/cli/main.js → dist/bench/isolation.js
      const script = fileURLToPath(new URL('../../bench/isolation.js', import.meta.url));
      if (!existsSync(script)) throw new UsageError(`${script} not found; build the tree first (npx tsc -p tsconfig.json)`);
      const args = [script];
      if (o.runs !== undefined) args.push('--runs', String(o.runs));
      if (o.densityMax !== undefined) args.push('--density-max', String(o.densityMax));
      if (o.write !== undefined) args.push('--write', o.write);
      const child = spawn(process.execPath, args, { stdio: 'inherit' });
      // The benchmark cleans up on a signal: let it, and pass on a TERM sent to this process alone.
      const ignore = () => undefined;
      const forward = (s: NodeJS.Signals) => () => child.kill(s);
      const onTerm = forward('SIGTERM');
      process.on('SIGINT', ignore);
      process.on('SIGTERM', onTerm);
      try {
        exitStatus = await new Promise<number>((resolve, reject) => {
          child.on('error', reject);
          child.on('exit', (code, signal) => resolve(code ?? 128 + (signal ? (osConstants.signals as Record<string, number>)[signal] ?? 0 : 0)));
        });
      } finally {
        process.off('SIGINT', ignore);
        process.off('SIGTERM', onTerm);
      }
    });
}

function version(): string {
  try {
    const pkg = JSON.parse(readFileSync(new URL('../../../package.json', import.meta.url), 'utf8')) as { version?: string };
    return pkg.version ?? '0.0.0';
  } catch {
    return '0.0.0';
  }
}

export function buildProgram(): Command {
  const program = new Command()
    .name('berth')
    .description('Command-line client for berthd: run workloads and jobs with per-workload isolation')
    .version(version(), '-V, --version')
    .enablePositionalOptions()
    .allowExcessArguments(false)
    .exitOverride()
    .configureOutput({
      outputError: (str, write) => write(`berth: ${oneLine(str.replace(/^error:\s*/, ''))} (usage)\n`),
    });
  addCommon(program);
  registerInfo(program);
  registerProjects(program);
  registerWorkloads(program);
  registerJobs(program);
  registerServices(program);
  registerTokens(program);
  registerImages(program);
  registerBench(program);
  registerIngress(program, addCommon, act as never);
  return program;
}

function printError(e: unknown): void {
  if (e instanceof ConnectError) {
    if (e.errno === 'ECONNREFUSED' || e.errno === 'ENOENT') {
      errLine(
        `${e.message}; start it (as root) with \`berthd --data-dir ${dataDir()}\`, or point --addr / BERTH_ADDR at a running berthd`,
        e.code,
      );
    } else {
      errLine(e.message, e.code);
    }
    return;
  }
  if (e instanceof ApiError) {
    let msg = e.message;
    if (e.code === 'unauthenticated' && currentCtx?.tokenProblem) msg += `; ${currentCtx.tokenProblem}`;
    errLine(msg, e.code);
    return;
  }
  if (e instanceof UsageError) {
    errLine(e.message, 'usage');
    return;
  }
  errLine(e instanceof Error ? e.message : String(e), 'internal');
}

async function main(): Promise<void> {
  process.stdout.on('error', (e: NodeJS.ErrnoException) => {
    if (e.code === 'EPIPE') process.exit(exitStatus);
  });
  let code: number;
  try {
    await buildProgram().parseAsync(process.argv);
    code = exitStatus;
  } catch (e) {
    if (e instanceof CommanderError) {
      code = e.exitCode === 0 ? 0 : 2;
    } else {
      printError(e);
      code = e instanceof UsageError ? 2 : 1;
    }
  }
  currentCtx?.client.close();
  await Promise.all([flush(process.stdout), flush(process.stderr)]);
  process.exit(code);
}

void main();
