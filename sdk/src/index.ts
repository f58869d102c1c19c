// @berth/sdk — run untrusted code in Berth sandboxes from TypeScript.
//
//   const sbx = await Sandbox.create({ isolation: 'gvisor', timeoutMs: 60_000, metadata: { user: 'u1' } });
//   const r = await sbx.commands.run('echo hello', { onStdout: (s) => process.stdout.write(s) });
//   await sbx.files.write('/tmp/x.txt', 'data');
//   await sbx.kill();
//
// Every call takes `requestTimeoutMs` and an AbortSignal (`signal`); durations end in `Ms`. Errors are
// typed (NotFoundError, InvalidArgumentError, TimeoutError, …) from the API's error codes.
// No dependencies: the global fetch of Node.js ≥ 20.
import { readFileSync } from 'node:fs';

export type Isolation = 'gvisor' | 'microvm' | 'container';

export interface ConnectionOptions {
  /** Berth API base URL; default $BERTH_API_URL or http://127.0.0.1:7878. */
  apiUrl?: string;
  /** API token; default $BERTH_API_KEY, else the admin token file of a local berthd (root only). */
  apiKey?: string;
  /** Project; default $BERTH_PROJECT or "default". */
  project?: string;
}

export interface CallOptions {
  /** Time limit of this call (default 60 s; 0 = none). */
  requestTimeoutMs?: number;
  signal?: AbortSignal;
}

export interface CreateOptions extends ConnectionOptions, CallOptions {
  /** Image (or template) to start from; default "busybox". */
  template?: string;
  isolation?: Isolation;
  /** Life time of the sandbox; it is killed when it passes (default 5 minutes). */
  timeoutMs?: number;
  metadata?: Record<string, string>;
  envs?: Record<string, string>;
  cpuMillis?: number;
  memoryMiB?: number;
  pids?: number;
  /** Size limit of the sandbox's writable file system. */
  diskMiB?: number;
  /** Start from a template made by sandbox.snapshot(): its memory, processes and files (a fork). */
  fromTemplate?: string;
  /** Name of the sandbox (its id); generated when absent. */
  name?: string;
  /**
   * Pause by itself after `idleMs` without a command, file or terminal call (an open command or
   * terminal counts as activity); the next such call resumes it transparently. Paused time does not
   * count toward `timeoutMs`.
   */
  autoPause?: { idleMs: number };
}

export interface SandboxInfo {
  sandboxId: string;
  isolation: Isolation;
  template: string;
  state: string;
  metadata: Record<string, string>;
  startedAt?: string;
  endAt?: string;
  reason?: string;
}

// --- errors ------------------------------------------------------------------------------------

export class SandboxError extends Error {
  constructor(
    message: string,
    readonly code: string = 'internal',
    readonly status?: number,
  ) {
    super(message);
    this.name = new.target.name;
  }
}
export class InvalidArgumentError extends SandboxError {}
export class UnauthenticatedError extends SandboxError {}
export class PermissionDeniedError extends SandboxError {}
export class NotFoundError extends SandboxError {}
export class ConflictError extends SandboxError {}
export class FailedPreconditionError extends SandboxError {}
export class UnavailableError extends SandboxError {}
export class TimeoutError extends SandboxError {}

const ERRORS: Record<string, new (m: string, c: string, s?: number) => SandboxError> = {
  invalid_argument: InvalidArgumentError,
  unauthenticated: UnauthenticatedError,
  permission_denied: PermissionDeniedError,
  not_found: NotFoundError,
  already_exists: ConflictError,
  conflict: ConflictError,
  failed_precondition: FailedPreconditionError,
  unavailable: UnavailableError,
};

function toError(status: number, body: string): SandboxError {
  try {
    const e = (JSON.parse(body) as { error?: { code?: string; message?: string } }).error;
    if (e?.code) return new (ERRORS[e.code] ?? SandboxError)(e.message ?? body, e.code, status);
  } catch {
    /* not JSON */
  }
  return new SandboxError(`HTTP ${status}: ${body.slice(0, 500)}`, 'internal', status);
}

// --- transport ---------------------------------------------------------------------------------

class Api {
  readonly url: string;
  readonly project: string;
  private readonly key: string;

  constructor(o: ConnectionOptions) {
    this.url = (o.apiUrl ?? process.env.BERTH_API_URL ?? 'http://127.0.0.1:7878').replace(/\/+$/, '');
    this.project = o.project ?? process.env.BERTH_PROJECT ?? 'default';
    let key = o.apiKey ?? process.env.BERTH_API_KEY;
    if (!key) {
      try {
        key = readFileSync('/var/lib/berth/admin.token', 'utf8').trim();
      } catch {
        throw new UnauthenticatedError('no API key: pass apiKey, set BERTH_API_KEY, or run as root beside a local berthd', 'unauthenticated');
      }
    }
    this.key = key;
  }

  /** fetch with the call's timeout and signal; rejects with typed errors. */
  async fetch(path: string, init: RequestInit & { json?: unknown }, o: CallOptions = {}): Promise<Response> {
    const timeoutMs = o.requestTimeoutMs ?? 60_000;
    const signals: AbortSignal[] = [];
    if (o.signal) signals.push(o.signal);
    let timer: AbortController | undefined;
    let t: NodeJS.Timeout | undefined;
    if (timeoutMs > 0) {
      timer = new AbortController();
      t = setTimeout(() => timer!.abort(new TimeoutError(`request timed out after ${timeoutMs} ms`, 'timeout')), timeoutMs);
      signals.push(timer.signal);
    }
    const signal = signals.length ? AbortSignal.any(signals) : undefined;
    const headers: Record<string, string> = { authorization: `Bearer ${this.key}`, ...((init.headers as Record<string, string>) ?? {}) };
    let reqBody = init.body;
    if (init.json !== undefined) {
      headers['content-type'] = 'application/json';
      reqBody = JSON.stringify(init.json);
    }
    try {
      const res = await fetch(`${this.url}/v1/projects/${encodeURIComponent(this.project)}${path}`, {
        ...init,
        headers,
        body: reqBody ?? null,
        ...(signal ? { signal } : {}),
        // A streamed body: Node's fetch (undici) keeps every chunk sent in memory while it may follow
        // a redirect (undici #4058: 1 GiB uploaded, 1.1 GiB resident); Berth's API never redirects.
        ...(reqBody && typeof (reqBody as ReadableStream).getReader === 'function' ? { duplex: 'half', redirect: 'error' } : {}),
      } as RequestInit);
      if (!res.ok) throw toError(res.status, await res.text());
      return res;
    } catch (e) {
      if (e instanceof SandboxError) throw e;
      if (timer?.signal.aborted) throw timer.signal.reason as TimeoutError;
      if (o.signal?.aborted) throw o.signal.reason instanceof Error ? o.signal.reason : new SandboxError('aborted', 'aborted');
      throw new UnavailableError(`cannot reach Berth at ${this.url}: ${(e as Error).message}`, 'unavailable');
    } finally {
      // The timer keeps running while a streamed body is read; callers that stream clear it themselves.
      if (t && (init as { keepTimer?: boolean }).keepTimer) t.unref();
      else if (t) clearTimeout(t);
    }
  }

  async json<T>(path: string, init: RequestInit & { json?: unknown }, o?: CallOptions): Promise<T> {
    return (await (await this.fetch(path, init, o)).json()) as T;
  }
}

interface SandboxResource {
  name: string;
  labels: Record<string, string>;
  spec: { image: string; isolation: Isolation; timeoutMs: number };
  status: { phase: string; startedAt?: string; expiresAt?: string; reason?: string; message?: string };
}

const infoOf = (r: SandboxResource): SandboxInfo => ({
  sandboxId: r.name,
  isolation: r.spec.isolation,
  template: r.spec.image,
  state: r.status.phase,
  metadata: r.labels,
  ...(r.status.startedAt ? { startedAt: r.status.startedAt } : {}),
  ...(r.status.expiresAt ? { endAt: r.status.expiresAt } : {}),
  ...(r.status.reason ? { reason: r.status.reason } : {}),
});

/** Calls fn with each JSON line of an NDJSON body until it ends. */
async function readLines(body: ReadableStream<Uint8Array>, fn: (line: Record<string, unknown>) => void): Promise<void> {
  const reader = body.getReader();
  const dec = new TextDecoder();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (value) buf += dec.decode(value, { stream: true });
    let nl: number;
    while ((nl = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      if (line) fn(JSON.parse(line) as Record<string, unknown>);
    }
    if (done) return;
  }
}

/** One signal that fires when any of the given ones does, or after timeoutMs (> 0). */
function anySignal(signals: (AbortSignal | undefined)[], timeoutMs = 0): AbortSignal {
  const all = signals.filter((x): x is AbortSignal => !!x);
  if (timeoutMs > 0) all.push(AbortSignal.timeout(timeoutMs));
  return AbortSignal.any(all);
}

// --- commands ------------------------------------------------------------------------------------

export interface RunOptions extends CallOptions {
  envs?: Record<string, string>;
  cwd?: string;
  /** "uid" or "uid:gid". */
  user?: string;
  /** Text written to stdin, then closed. */
  stdin?: string;
  onStdout?: (data: string) => void;
  onStderr?: (data: string) => void;
  /** The command is killed (SIGKILL) after this long; default: no limit (but see requestTimeoutMs). */
  timeoutMs?: number;
}

export interface CommandResult {
  exitCode: number;
  stdout: string;
  stderr: string;
  signal?: string;
  /** The command was killed by its timeoutMs. */
  timedOut?: boolean;
  /** The command was killed by the out-of-memory killer (the sandbox's memory limit). */
  oomKilled?: boolean;
}

export interface ProcessInfo {
  id: string;
  pid: number;
  args: string[];
  startedAt: string;
}

export class Commands {
  constructor(
    private readonly api: Api,
    private readonly name: string,
  ) {}

  /** Runs a command (a shell line, or an argv array) and resolves with its exit; output is streamed to the callbacks. */
  async run(cmd: string | string[], o: RunOptions = {}): Promise<CommandResult> {
    const res = await this.api.fetch(
      `/sandboxes/${this.name}/commands`,
      { method: 'POST', json: this.body(cmd, o, false), keepTimer: true } as RequestInit & { json: unknown },
      { requestTimeoutMs: o.requestTimeoutMs ?? 0, ...(o.signal ? { signal: o.signal } : {}) },
    );
    const result: CommandResult = { exitCode: -1, stdout: '', stderr: '' };
    await readLines(res.body!, (line) => {
      const ev = line as { type: string; data?: string; exitCode?: number; signal?: string; timedOut?: boolean; oomKilled?: boolean; message?: string };
      if (ev.type === 'stdout') {
        result.stdout += ev.data ?? '';
        o.onStdout?.(ev.data ?? '');
      } else if (ev.type === 'stderr') {
        result.stderr += ev.data ?? '';
        o.onStderr?.(ev.data ?? '');
      } else if (ev.type === 'exit') {
        result.exitCode = ev.exitCode ?? -1;
        if (ev.signal) result.signal = ev.signal;
        if (ev.timedOut) result.timedOut = true;
        if (ev.oomKilled) result.oomKilled = true;
      } else if (ev.type === 'error') {
        throw new UnavailableError(ev.message ?? 'the command stream broke', 'unavailable');
      }
    });
    if (result.exitCode < 0) throw new UnavailableError('the command stream ended without an exit status', 'unavailable');
    return result;
  }

  /** Starts a command in the background; resolves with its process id (for kill) and pid. */
  async start(cmd: string | string[], o: Omit<RunOptions, 'onStdout' | 'onStderr'> = {}): Promise<{ id: string; pid: number }> {
    return this.api.json(`/sandboxes/${this.name}/commands`, { method: 'POST', json: this.body(cmd, o, true) }, o);
  }

  async list(o: CallOptions = {}): Promise<ProcessInfo[]> {
    return (await this.api.json<{ items: ProcessInfo[] }>(`/sandboxes/${this.name}/processes`, { method: 'GET' }, o)).items;
  }

  /** Sends a signal (default SIGKILL) to a process started by run/start, and to its process group. */
  async kill(id: string, o: CallOptions & { killSignal?: string } = {}): Promise<void> {
    await this.api.fetch(`/sandboxes/${this.name}/processes/${id}/signal`, { method: 'POST', json: { signal: o.killSignal ?? 'SIGKILL' } }, o);
  }

  private body(cmd: string | string[], o: RunOptions, background: boolean): Record<string, unknown> {
    return {
      cmd,
      background,
      ...(o.envs ? { env: o.envs } : {}),
      ...(o.cwd ? { cwd: o.cwd } : {}),
      ...(o.user ? { user: o.user } : {}),
      ...(o.stdin !== undefined ? { stdin: o.stdin } : {}),
      ...(o.timeoutMs !== undefined ? { timeoutMs: o.timeoutMs } : {}),
    };
  }
}

// --- files ---------------------------------------------------------------------------------------

export interface EntryInfo {
  name: string;
  type: 'file' | 'dir' | 'symlink' | 'fifo' | 'socket' | 'char' | 'block' | 'other';
  size: number;
  mode: number;
  uid: number;
  gid: number;
  mtime: string;
  target?: string;
}

export class Files {
  constructor(
    private readonly api: Api,
    private readonly name: string,
  ) {}

  private q(path: string): string {
    return `path=${encodeURIComponent(path)}`;
  }

  read(path: string, o?: CallOptions & { format?: 'text' }): Promise<string>;
  read(path: string, o: CallOptions & { format: 'bytes' }): Promise<Uint8Array>;
  read(path: string, o: CallOptions & { format: 'stream' }): Promise<ReadableStream<Uint8Array>>;
  async read(path: string, o: CallOptions & { format?: 'text' | 'bytes' | 'stream' } = {}): Promise<string | Uint8Array | ReadableStream<Uint8Array>> {
    const res = await this.api.fetch(`/sandboxes/${this.name}/files?${this.q(path)}`, { method: 'GET', ...(o.format === 'stream' ? { keepTimer: true } : {}) } as RequestInit, o);
    if (o.format === 'stream') return res.body!;
    if (o.format === 'bytes') return new Uint8Array(await res.arrayBuffer());
    return res.text();
  }

  /** Writes a file (created or truncated); a ReadableStream is streamed without being held in memory. */
  async write(path: string, data: string | Uint8Array | ReadableStream<Uint8Array>, o: CallOptions & { mode?: number } = {}): Promise<{ path: string; written: number }> {
    const mode = o.mode !== undefined ? `&mode=${o.mode.toString(8)}` : '';
    return this.api.json(
      `/sandboxes/${this.name}/files?${this.q(path)}${mode}`,
      { method: 'PUT', body: data as BodyInit, headers: { 'content-type': 'application/octet-stream' } },
      { requestTimeoutMs: o.requestTimeoutMs ?? 0, ...(o.signal ? { signal: o.signal } : {}) },
    );
  }

  async list(path: string, o: CallOptions = {}): Promise<EntryInfo[]> {
    return (await this.api.json<{ items: EntryInfo[] }>(`/sandboxes/${this.name}/files/list?${this.q(path)}`, { method: 'GET' }, o)).items;
  }

  async getInfo(path: string, o: CallOptions = {}): Promise<EntryInfo> {
    return this.api.json(`/sandboxes/${this.name}/files/stat?${this.q(path)}`, { method: 'GET' }, o);
  }

  async exists(path: string, o: CallOptions = {}): Promise<boolean> {
    try {
      await this.getInfo(path, o);
      return true;
    } catch (e) {
      if (e instanceof NotFoundError) return false;
      throw e;
    }
  }

  async makeDir(path: string, o: CallOptions = {}): Promise<void> {
    await this.api.fetch(`/sandboxes/${this.name}/files/mkdir`, { method: 'POST', json: { path, parents: true } }, o);
  }

  async remove(path: string, o: CallOptions = {}): Promise<void> {
    await this.api.fetch(`/sandboxes/${this.name}/files/remove`, { method: 'POST', json: { path, recursive: true } }, o);
  }

  async rename(oldPath: string, newPath: string, o: CallOptions = {}): Promise<void> {
    await this.api.fetch(`/sandboxes/${this.name}/files/rename`, { method: 'POST', json: { path: oldPath, to: newPath } }, o);
  }

  /**
   * Watches a directory: onEvent gets every change below it (with `recursive`, in sub-directories
   * too) until stop(), `timeoutMs` (the watch's life time; default: none) or `signal`. Resolves once
   * the watch is in place, so changes made after it resolves are never missed.
   */
  async watch(path: string, onEvent: (e: FilesystemEvent) => void, o: WatchOptions = {}): Promise<WatchHandle> {
    const stop = new AbortController();
    const signal = anySignal([stop.signal, o.signal], o.timeoutMs);
    // requestTimeoutMs bounds the setup only; the stream itself lasts as long as the watch.
    const setup = setTimeout(() => stop.abort(new TimeoutError(`watch was not in place within ${o.requestTimeoutMs ?? 60_000} ms`, 'timeout')), o.requestTimeoutMs ?? 60_000);
    let ready!: () => void;
    const readyP = new Promise<void>((r) => (ready = r));
    try {
      const res = await this.api.fetch(`/sandboxes/${this.name}/files/watch?${this.q(path)}&recursive=${o.recursive ? 'true' : 'false'}`, { method: 'GET' }, { requestTimeoutMs: 0, signal });
      const done = readLines(res.body!, (ev) => {
        if (ev.type === 'ready') ready();
        else if (ev.type === 'end') o.onExit?.();
        else if (ev.type === 'error') o.onExit?.(new UnavailableError(String(ev.message), 'unavailable'));
        else onEvent(ev as unknown as FilesystemEvent);
      }).catch((e: unknown) => {
        if (signal.aborted) o.onExit?.(); // stopped, timed out or aborted by the caller
        else o.onExit?.(e as Error);
      });
      await Promise.race([readyP, done]);
      if (stop.signal.aborted) throw stop.signal.reason;
    } finally {
      clearTimeout(setup);
    }
    return { stop: () => stop.abort(new SandboxError('watch stopped', 'aborted')) };
  }
}

export interface FilesystemEvent {
  type: 'create' | 'write' | 'chmod' | 'remove' | 'rename' | 'overflow';
  /** Path inside the sandbox (for a rename: the old one). */
  path: string;
  /** rename: the new path. */
  to?: string;
  /** The entry is a directory. */
  dir?: boolean;
}

export interface WatchOptions extends CallOptions {
  /** Watch sub-directories too (also those created later). */
  recursive?: boolean;
  /** Life time of the watch; default: until stop() or signal. */
  timeoutMs?: number;
  /** Called when the watch ends by itself (the directory was removed) or breaks (error). */
  onExit?: (err?: Error) => void;
}

export interface WatchHandle {
  stop(): void;
}

// --- pseudo-terminals ----------------------------------------------------------------------------

export interface PtyCreateOptions extends CallOptions {
  cols?: number;
  rows?: number;
  /** Terminal output (stdout and stderr as a terminal mixes them), raw bytes. */
  onData: (data: Uint8Array) => void;
  /** Program to run; default a login shell, ["/bin/sh", "-l"]. */
  cmd?: string[];
  envs?: Record<string, string>;
  cwd?: string;
  user?: string;
  /** The terminal's process is killed after this long; default: no limit. */
  timeoutMs?: number;
}

export interface PtyResult {
  exitCode: number;
  signal?: string;
  timedOut?: boolean;
}

/** A running process on a pseudo-terminal. */
export class PtyHandle {
  constructor(
    private readonly pty: Pty,
    /** Process id (for pty.sendInput, pty.resize, pty.kill and commands.kill). */
    readonly id: string,
    readonly pid: number,
    private readonly done: Promise<PtyResult>,
  ) {}

  sendInput(data: string | Uint8Array, o?: CallOptions): Promise<void> {
    return this.pty.sendInput(this.id, data, o);
  }

  resize(size: { cols: number; rows: number }, o?: CallOptions): Promise<void> {
    return this.pty.resize(this.id, size, o);
  }

  kill(o?: CallOptions): Promise<void> {
    return this.pty.kill(this.id, o);
  }

  /** Resolves when the process exits. */
  wait(): Promise<PtyResult> {
    return this.done;
  }
}

export class Pty {
  constructor(
    private readonly api: Api,
    private readonly name: string,
  ) {}

  /** Starts a program (a shell by default) on a new pseudo-terminal; resolves once it runs. */
  async create(o: PtyCreateOptions): Promise<PtyHandle> {
    const body = {
      cmd: o.cmd ?? ['/bin/sh', '-l'],
      pty: { cols: o.cols ?? 80, rows: o.rows ?? 24 },
      ...(o.envs ? { env: o.envs } : {}),
      ...(o.cwd ? { cwd: o.cwd } : {}),
      ...(o.user ? { user: o.user } : {}),
      ...(o.timeoutMs !== undefined ? { timeoutMs: o.timeoutMs } : {}),
    };
    const res = await this.api.fetch(`/sandboxes/${this.name}/commands`, { method: 'POST', json: body, keepTimer: true } as RequestInit & { json: unknown }, { requestTimeoutMs: o.requestTimeoutMs ?? 0, ...(o.signal ? { signal: o.signal } : {}) });
    let started!: (p: { id: string; pid: number }) => void;
    const startedP = new Promise<{ id: string; pid: number }>((r) => (started = r));
    const result: PtyResult = { exitCode: -1 };
    const done = readLines(res.body!, (ev) => {
      if (ev.type === 'started') started({ id: String(ev.id), pid: Number(ev.pid) });
      else if (ev.type === 'pty') o.onData(Buffer.from(String(ev.data ?? ''), 'base64'));
      else if (ev.type === 'exit') {
        result.exitCode = Number(ev.exitCode);
        if (ev.signal) result.signal = String(ev.signal);
        if (ev.timedOut) result.timedOut = true;
      } else if (ev.type === 'error') throw new UnavailableError(String(ev.message ?? 'the terminal stream broke'), 'unavailable');
    }).then(() => {
      if (result.exitCode < 0) throw new UnavailableError('the terminal stream ended without an exit status', 'unavailable');
      return result;
    });
    const p = await Promise.race([startedP, done.then(() => Promise.reject(new UnavailableError('the terminal ended before it started', 'unavailable')))]);
    done.catch(() => undefined); // the caller sees failures through wait()
    return new PtyHandle(this, p.id, p.pid, done);
  }

  /** Types into the terminal of process `id` (text is sent as UTF-8). */
  async sendInput(id: string, data: string | Uint8Array, o: CallOptions = {}): Promise<void> {
    const bytes = Buffer.from(data);
    for (let off = 0; off < bytes.length || off === 0; off += 384 * 1024) {
      await this.api.fetch(`/sandboxes/${this.name}/processes/${id}/input`, { method: 'POST', json: { data: bytes.subarray(off, off + 384 * 1024).toString('base64') } }, o);
    }
  }

  /** Changes the terminal's size (the program gets SIGWINCH). */
  async resize(id: string, size: { cols: number; rows: number }, o: CallOptions = {}): Promise<void> {
    await this.api.fetch(`/sandboxes/${this.name}/processes/${id}/resize`, { method: 'POST', json: { cols: size.cols, rows: size.rows } }, o);
  }

  /** Kills the terminal's process group (SIGKILL). */
  async kill(id: string, o: CallOptions = {}): Promise<void> {
    await this.api.fetch(`/sandboxes/${this.name}/processes/${id}/signal`, { method: 'POST', json: { signal: 'SIGKILL' } }, o);
  }
}

/** A port of the sandbox served through Berth's ingress. */
export interface PortPreview {
  port: number;
  public: boolean;
  /** https://<port>-<sandbox>.<project>.<base-domain>/ */
  url: string;
  /** For a private port: send it as the `x-berth-token` header, or open `url?berth_token=<token>` once. */
  token?: string;
}

export class Ports {
  constructor(
    private readonly api: Api,
    private readonly name: string,
  ) {}

  /** Serves `port` at a preview URL (idempotent; `public: true` drops the token requirement). */
  expose(port: number, o: CallOptions & { public?: boolean } = {}): Promise<PortPreview> {
    return this.api.json<PortPreview>(`/sandboxes/${this.name}/ports`, { method: 'POST', json: { port, public: o.public ?? false } }, o);
  }

  async list(o: CallOptions = {}): Promise<PortPreview[]> {
    return (await this.api.json<{ items: PortPreview[] }>(`/sandboxes/${this.name}/ports`, { method: 'GET' }, o)).items;
  }

  async remove(port: number, o: CallOptions = {}): Promise<void> {
    await this.api.fetch(`/sandboxes/${this.name}/ports/${port}`, { method: 'DELETE' }, o);
  }
}

// --- the sandbox ---------------------------------------------------------------------------------

export class Sandbox {
  readonly commands: Commands;
  readonly files: Files;
  readonly pty: Pty;
  /** Preview URLs of the sandbox's ports (through Berth's ingress). */
  readonly ports: Ports;

  private constructor(
    private readonly api: Api,
    readonly sandboxId: string,
    readonly isolation: Isolation,
  ) {
    this.commands = new Commands(api, sandboxId);
    this.files = new Files(api, sandboxId);
    this.pty = new Pty(api, sandboxId);
    this.ports = new Ports(api, sandboxId);
  }

  /** Creates a sandbox and resolves once it runs. */
  static async create(o: CreateOptions = {}): Promise<Sandbox> {
    const api = new Api(o);
    const spec: Record<string, unknown> = {
      ...(o.template ? { image: o.template } : {}),
      ...(o.isolation ? { isolation: o.isolation } : {}),
      ...(o.timeoutMs !== undefined ? { timeoutMs: o.timeoutMs } : {}),
      ...(o.envs ? { env: o.envs } : {}),
      ...(o.fromTemplate ? { template: o.fromTemplate } : {}),
      ...(o.autoPause ? { autoPause: { idleMs: o.autoPause.idleMs } } : {}),
    };
    const resources = { ...(o.cpuMillis ? { cpuMillis: o.cpuMillis } : {}), ...(o.memoryMiB ? { memoryMiB: o.memoryMiB } : {}), ...(o.pids ? { pids: o.pids } : {}), ...(o.diskMiB ? { diskMiB: o.diskMiB } : {}) };
    if (Object.keys(resources).length) spec.resources = resources;
    const r = await api.json<SandboxResource>('/sandboxes', { method: 'POST', json: { ...(o.name ? { name: o.name } : {}), ...(o.metadata ? { labels: o.metadata } : {}), spec } }, { requestTimeoutMs: o.requestTimeoutMs ?? 180_000, ...(o.signal ? { signal: o.signal } : {}) });
    if (r.status.phase !== 'running') throw new FailedPreconditionError(`sandbox ${r.name} did not start: ${r.status.reason ?? r.status.phase} ${r.status.message ?? ''}`.trim(), 'failed_precondition');
    return new Sandbox(api, r.name, r.spec.isolation);
  }

  /** Connects to an existing, running sandbox. */
  static async connect(sandboxId: string, o: ConnectionOptions & CallOptions = {}): Promise<Sandbox> {
    const api = new Api(o);
    const r = await api.json<SandboxResource>(`/sandboxes/${encodeURIComponent(sandboxId)}`, { method: 'GET' }, o);
    if (r.status.phase !== 'running') throw new FailedPreconditionError(`sandbox ${sandboxId} is ${r.status.phase}`, 'failed_precondition');
    return new Sandbox(api, r.name, r.spec.isolation);
  }

  /** Sandboxes of the project, optionally only those whose metadata has all the given pairs. */
  static async list(o: ConnectionOptions & CallOptions & { metadata?: Record<string, string> } = {}): Promise<SandboxInfo[]> {
    const api = new Api(o);
    const sel = o.metadata ? `?labelSelector=${encodeURIComponent(Object.entries(o.metadata).map(([k, v]) => `${k}=${v}`).join(','))}` : '';
    return (await api.json<{ items: SandboxResource[] }>(`/sandboxes${sel}`, { method: 'GET' }, o)).items.map(infoOf);
  }

  /** Kills a sandbox by id; resolves false if there was none. */
  static async kill(sandboxId: string, o: ConnectionOptions & CallOptions = {}): Promise<boolean> {
    try {
      await new Api(o).fetch(`/sandboxes/${encodeURIComponent(sandboxId)}`, { method: 'DELETE' }, o);
      return true;
    } catch (e) {
      if (e instanceof NotFoundError) return false;
      throw e;
    }
  }

  async getInfo(o: CallOptions = {}): Promise<SandboxInfo> {
    return infoOf(await this.api.json<SandboxResource>(`/sandboxes/${this.sandboxId}`, { method: 'GET' }, o));
  }

  /** A new life time, counted from now. */
  async setTimeout(timeoutMs: number, o: CallOptions = {}): Promise<void> {
    await this.api.fetch(`/sandboxes/${this.sandboxId}/timeout`, { method: 'POST', json: { timeoutMs } }, o);
  }

  async kill(o: CallOptions = {}): Promise<void> {
    await Sandbox.kill(this.sandboxId, { ...o, ...this.connection() });
  }

  /** Freezes every process (memory kept, no CPU used, life time stopped); resolves with the sandbox id. */
  async pause(o: CallOptions = {}): Promise<string> {
    const r = await this.api.json<SandboxResource>(`/sandboxes/${this.sandboxId}/pause`, { method: 'POST' }, o);
    if (r.status.phase !== 'paused') throw new FailedPreconditionError(`sandbox ${this.sandboxId} did not pause: ${r.status.phase} ${r.status.message ?? ''}`.trim(), 'failed_precondition');
    return this.sandboxId;
  }

  /**
   * Snapshot of the sandbox (memory, running processes, files) as a template for new sandboxes
   * (Sandbox.create({ fromTemplate })); the sandbox keeps running. microVM and gVisor sandboxes.
   */
  async snapshot(template: string, o: CallOptions = {}): Promise<{ template: string; snapshotMs: number; bytes: number }> {
    const r = await this.api.json<{ name: string; status: { snapshotMs: number; bytes: number } }>(`/sandboxes/${this.sandboxId}/snapshot`, { method: 'POST', json: { template } }, { requestTimeoutMs: o.requestTimeoutMs ?? 300_000, ...(o.signal ? { signal: o.signal } : {}) });
    return { template: r.name, snapshotMs: r.status.snapshotMs, bytes: r.status.bytes };
  }

  /** Continues a paused sandbox where it stopped. */
  static async resume(sandboxId: string, o: ConnectionOptions & CallOptions = {}): Promise<Sandbox> {
    const api = new Api(o);
    const r = await api.json<SandboxResource>(`/sandboxes/${encodeURIComponent(sandboxId)}/resume`, { method: 'POST' }, o);
    if (r.status.phase !== 'running') throw new FailedPreconditionError(`sandbox ${sandboxId} did not resume: ${r.status.phase}`, 'failed_precondition');
    return new Sandbox(api, r.name, r.spec.isolation);
  }

  private connection(): ConnectionOptions {
    return { apiUrl: this.api.url, project: this.api.project, apiKey: (this.api as unknown as { key: string }).key };
  }
}
