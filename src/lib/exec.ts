// Small helpers for running host tools. Every call has a timeout so a hung tool cannot hang
// a reconciler forever.
import { spawn } from 'node:child_process';
import { closeSync, openSync } from 'node:fs';

export interface ExecResult {
  code: number;
  stdout: string;
  stderr: string;
}

export class ExecError extends Error {
  constructor(
    readonly cmd: string,
    readonly result: ExecResult,
  ) {
    super(`${cmd} exited ${result.code}: ${(result.stderr || result.stdout).trim().slice(0, 500)}`);
    this.name = 'ExecError';
  }
}

export interface RunOptions {
  timeoutMs?: number;
  input?: string;
  env?: NodeJS.ProcessEnv;
  cwd?: string;
}

/** How startDetached() starts a long-lived process (one that outlives its starter, as QEMU does). */
export interface StartOptions {
  cwd?: string;
  /** Its stderr, appended to this file (created 0600 if need be); stdin and stdout are /dev/null. */
  stderrFile: string;
  /** Opened read-only and passed as descriptors 3, 4, … */
  fdFiles?: string[];
}

export interface Started {
  pid: number;
  /**
   * Resolves when the process ends, with its exit code or signal, while the caller watches (until
   * unwatch()); never rejects.
   */
  exited: Promise<string>;
  /** Stops watching (the process runs on; a process that ends later is reaped all the same). */
  unwatch(): void;
}

let spawner: { run: typeof runHere; startDetached: typeof startDetachedHere } | undefined;

/** berthd: its tools are started by the spawner process (src/lib/spawner.ts), not by berthd itself. */
export function useSpawner(s: { run: typeof runHere; startDetached: typeof startDetachedHere } | undefined): void {
  spawner = s;
}

/** Starts a process in a session of its own that outlives berthd (QEMU); resolves once it runs (exec'd). */
export function startDetached(file: string, args: string[], opts: StartOptions): Promise<Started> {
  return spawner ? spawner.startDetached(file, args, opts) : startDetachedHere(file, args, opts);
}

/** startDetached() in this process. */
export function startDetachedHere(file: string, args: string[], opts: StartOptions): Promise<Started> {
  return new Promise((resolve, reject) => {
    const fds: number[] = [];
    let child: ReturnType<typeof spawn>;
    try {
      fds.push(openSync(opts.stderrFile, 'a', 0o600));
      for (const f of opts.fdFiles ?? []) fds.push(openSync(f, 'r'));
      child = spawn(file, args, { stdio: ['ignore', 'ignore', ...fds], cwd: opts.cwd, detached: true });
    } catch (e) {
      return reject(e as Error);
    } finally {
      for (const fd of fds) closeSync(fd); // (the child has its own)
    }
    child.unref();
    let watching = true;
    let settle: (why: string) => void = () => undefined;
    const exited = new Promise<string>((r) => (settle = r));
    const ended = (why: string) => {
      if (watching) settle(why);
    };
    child.once('error', (e) => (child.pid ? ended(e.message) : reject(e)));
    child.once('exit', (code, sig) => ended(sig ? `killed by ${sig}` : `exit ${code}`));
    child.once('spawn', () =>
      resolve({
        pid: child.pid!,
        exited,
        unwatch: () => {
          watching = false;
        },
      }),
    );
  });
}

/** Runs a tool to its end (killed after timeoutMs, 30 s by default): its exit code and output. */
export function run(file: string, args: string[], opts: RunOptions = {}): Promise<ExecResult> {
  return spawner ? spawner.run(file, args, opts) : runHere(file, args, opts);
}

/** run() in this process. */
export function runHere(file: string, args: string[], opts: RunOptions = {}): Promise<ExecResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(file, args, { stdio: [opts.input !== undefined ? 'pipe' : 'ignore', 'pipe', 'pipe'], env: opts.env ?? process.env, cwd: opts.cwd });
    let stdout = '';
    let stderr = '';
    child.stdout!.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const timer = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs ?? 30_000);
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    child.on('close', (code, sig) => {
      clearTimeout(timer);
      resolve({ code: code ?? (sig ? 128 + 9 : -1), stdout, stderr });
    });
    if (child.stdin) {
      child.stdin.on('error', () => undefined); // the tool may exit without reading its input
      child.stdin.end(opts.input);
    }
  });
}

/** Like run() but rejects with ExecError on a non-zero exit. */
export async function runOk(file: string, args: string[], opts?: Parameters<typeof run>[2]): Promise<ExecResult> {
  const r = await run(file, args, opts);
  if (r.code !== 0) throw new ExecError(`${file} ${args.join(' ')}`, r);
  return r;
}

export function pidAlive(pid: number | undefined): boolean {
  if (!pid || pid <= 0) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

export const sleep = (ms: number, signal?: AbortSignal) =>
  new Promise<void>((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const t = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(t);
      reject(signal!.reason);
    };
    signal?.addEventListener('abort', onAbort, { once: true });
  });
