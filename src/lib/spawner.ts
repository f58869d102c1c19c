// The spawner: a small helper process that starts berthd's host tools (CNI plugins, nft, ip, cp, …)
// and its microVMs' QEMU for it, so that berthd itself does not.
//
// Why: Node starts a process by forking its own, and a fork copies the parent's page tables and
// write-protects its memory. berthd's event loop does nothing else meanwhile: ~5 ms per process
// at berthd's ~110 MiB, 1.3 ms from a process with an empty heap (BENCHMARKS.md, session 18). A
// microVM fork's start runs four or five tools beside QEMU's own start, and each stalled the QMP
// and agent traffic that the start waits for (session 19). Node offers no vfork/posix_spawn, and
// nothing on npm does this without a native addon, so this is a second Node process (small heap)
// that runs `run()` and `startDetached()` for berthd over its IPC channel (QEMU's own start stalled
// berthd 6.6 ms; session 20). It exits with berthd (its channel closes; what it started runs on);
// started again on the next call if it dies, the calls in flight failing with a clear error.
import { fork, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import type { ExecResult, RunOptions, StartOptions, Started } from './exec.js';

type SpawnCall = { file: string; args: string[] } & ({ opts: RunOptions } | { start: StartOptions });
export type SpawnRequest = { id: number } & SpawnCall;
/** A call's answer (a tool's result, a started process's pid, or an error), or the end of a process it started. */
export type SpawnReply = ({ id: number } & ({ result: ExecResult } | { pid: number } | { error: string; code?: string })) | { exited: number; why: string };

const SERVER = fileURLToPath(new URL('./spawner-main.js', import.meta.url));

type Call = { resolve: (r: ExecResult | number) => void; reject: (e: Error) => void };

/** One helper process, the calls it has in flight, and who waits for the end of a process it started (by pid). */
interface Helper {
  proc: ChildProcess;
  calls: Map<number, Call>;
  watchers: Map<number, (why: string) => void>;
}

export class Spawner {
  private helper: Helper | undefined;
  private nextId = 1;
  private closed = false;

  run(file: string, args: string[], opts: RunOptions = {}): Promise<ExecResult> {
    return this.call({ file, args, opts }).then((r) => r.result as ExecResult);
  }

  /**
   * exec.ts startDetached() from the helper: the process is the helper's child, and outlives berthd
   * as it would have as berthd's. Its end is reported while watched, unless the helper dies first.
   */
  async startDetached(file: string, args: string[], start: StartOptions): Promise<Started> {
    let exited: Promise<string> | undefined;
    // The watcher is set as the reply is handled, not after an await: a process that ends at once
    // has its end reported right behind the reply, and IPC messages are emitted back to back.
    const { h, result } = await this.call({ file, args, start }, (h, pid) => (exited = new Promise((resolve) => h.watchers.set(pid as number, resolve))));
    const pid = result as number;
    return { pid, exited: exited!, unwatch: () => h.watchers.delete(pid) };
  }

  private call(req: SpawnCall, onReply?: (h: Helper, result: ExecResult | number) => void): Promise<{ h: Helper; result: ExecResult | number }> {
    if (this.closed) return Promise.reject(new Error('the spawner is closed'));
    const h = this.ensure();
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const done = (result: ExecResult | number) => {
        onReply?.(h, result);
        resolve({ h, result });
      };
      h.calls.set(id, { resolve: done, reject });
      if (h.calls.size === 1) hold(h.proc, true); // (a call in flight keeps berthd running, see ensure())
      h.proc.send({ id, ...req } satisfies SpawnRequest, (e) => {
        if (!e) return;
        settled(h, id);
        reject(new Error(`the spawner did not take ${req.file}: ${e.message}`));
      });
    });
  }

  /** The helper's pid (started if need be): for tests. */
  pid(): number | undefined {
    return this.ensure().proc.pid;
  }

  close(): void {
    this.closed = true;
    this.helper?.proc.kill('SIGTERM');
    this.helper = undefined;
  }

  private ensure(): Helper {
    if (this.helper?.proc.connected) return this.helper;
    // A small young generation: the helper holds little, and a smaller address space forks faster.
    const proc = fork(SERVER, [], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'], execArgv: ['--max-semi-space-size=1', '--max-old-space-size=64'], serialization: 'json' });
    const h: Helper = { proc, calls: new Map(), watchers: new Map() };
    proc.on('message', (m: SpawnReply) => {
      if ('exited' in m) {
        h.watchers.get(m.exited)?.(m.why);
        h.watchers.delete(m.exited);
        return;
      }
      const c = h.calls.get(m.id);
      if (!c) return;
      settled(h, m.id);
      if ('result' in m) c.resolve(m.result);
      else if ('pid' in m) c.resolve(m.pid);
      else c.reject(Object.assign(new Error(m.error), m.code ? { code: m.code } : {}));
    });
    const gone = (why: string) => {
      if (this.helper === h) this.helper = undefined;
      for (const c of h.calls.values()) c.reject(new Error(`the spawner process ${why} before the tool's result came back; the caller may retry`));
      h.calls.clear();
      h.watchers.clear(); // (their processes run on, reparented; their end can no longer be told)
    };
    proc.on('exit', (code, sig) => gone(`exited (${sig ?? code})`));
    proc.on('error', (e) => gone(`failed (${e.message})`));
    // The helper keeps berthd running only while a call is in flight (berthd's own handles do it
    // otherwise): an idle helper must not keep a finished process alive.
    hold(proc, false);
    this.helper = h;
    return h;
  }
}

function hold(p: ChildProcess, on: boolean): void {
  const channel = p.channel as { ref?: () => void; unref?: () => void } | null | undefined;
  if (on) {
    p.ref();
    channel?.ref?.();
  } else {
    p.unref();
    channel?.unref?.();
  }
}

function settled(h: Helper, id: number): void {
  h.calls.delete(id);
  if (h.calls.size === 0) hold(h.proc, false);
}
