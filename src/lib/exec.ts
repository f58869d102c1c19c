// Small helpers for running host tools. Every call has a timeout so a hung tool cannot hang
// a reconciler forever.
import { spawn } from 'node:child_process';

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

let spawner: { run: typeof runHere } | undefined;

/** berthd: its tools are started by the spawner process (src/lib/spawner.ts), not by berthd itself. */
export function useSpawner(s: { run: typeof runHere } | undefined): void {
  spawner = s;
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
