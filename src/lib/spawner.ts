// The spawner: a small helper process that starts berthd's host tools (CNI plugins, nft, ip, cp, …)
// for it, so that berthd itself does not.
//
// Why: Node starts a process by forking its own, and a fork copies the parent's page tables and
// write-protects its memory. berthd's event loop does nothing else meanwhile: ~5 ms per process
// at berthd's ~110 MiB, 1.3 ms from a process with an empty heap (BENCHMARKS.md, session 18). A
// microVM fork's start runs four or five tools beside QEMU's own start, and each stalled the QMP
// and agent traffic that the start waits for (session 19). Node offers no vfork/posix_spawn, and
// nothing on npm does this without a native addon, so this is a second Node process (small heap)
// that runs `run()` for berthd over its IPC channel. It exits with berthd (its channel closes);
// started again on the next call if it dies, the calls in flight failing with a clear error.
import { fork, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import type { ExecResult, RunOptions } from './exec.js';

export interface SpawnRequest {
  id: number;
  file: string;
  args: string[];
  opts: RunOptions;
}
export type SpawnReply = { id: number } & ({ result: ExecResult } | { error: string; code?: string });

const SERVER = fileURLToPath(new URL('./spawner-main.js', import.meta.url));

export class Spawner {
  private proc: ChildProcess | undefined;
  private nextId = 1;
  private closed = false;
  private readonly pending = new Map<ChildProcess, Map<number, { resolve: (r: ExecResult) => void; reject: (e: Error) => void }>>();

  run(file: string, args: string[], opts: RunOptions = {}): Promise<ExecResult> {
    if (this.closed) return Promise.reject(new Error('the spawner is closed'));
    const p = this.ensure();
    const id = this.nextId++;
    const calls = this.pending.get(p)!;
    return new Promise((resolve, reject) => {
      calls.set(id, { resolve, reject });
      if (calls.size === 1) hold(p, true); // (a call in flight keeps berthd running, see ensure())
      p.send({ id, file, args, opts } satisfies SpawnRequest, (e) => {
        if (!e) return;
        settled(p, calls, id);
        reject(new Error(`the spawner did not take ${file}: ${e.message}`));
      });
    });
  }

  /** The helper's pid (started if need be): for tests. */
  pid(): number | undefined {
    return this.ensure().pid;
  }

  close(): void {
    this.closed = true;
    this.proc?.kill('SIGTERM');
    this.proc = undefined;
  }

  private ensure(): ChildProcess {
    if (this.proc?.connected) return this.proc;
    // A small young generation: the helper holds little, and a smaller address space forks faster.
    const p = fork(SERVER, [], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'], execArgv: ['--max-semi-space-size=1', '--max-old-space-size=64'], serialization: 'json' });
    const calls = new Map<number, { resolve: (r: ExecResult) => void; reject: (e: Error) => void }>();
    this.pending.set(p, calls);
    p.on('message', (m: SpawnReply) => {
      const c = calls.get(m.id);
      if (!c) return;
      settled(p, calls, m.id);
      if ('result' in m) c.resolve(m.result);
      else c.reject(Object.assign(new Error(m.error), m.code ? { code: m.code } : {}));
    });
    const gone = (why: string) => {
      if (this.proc === p) this.proc = undefined;
      for (const c of calls.values()) c.reject(new Error(`the spawner process ${why} before the tool's result came back; the caller may retry`));
      calls.clear();
      this.pending.delete(p);
    };
    p.on('exit', (code, sig) => gone(`exited (${sig ?? code})`));
    p.on('error', (e) => gone(`failed (${e.message})`));
    // The helper keeps berthd running only while a call is in flight (berthd's own handles do it
    // otherwise): an idle helper must not keep a finished process alive.
    hold(p, false);
    this.proc = p;
    return p;
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

function settled(p: ChildProcess, calls: Map<number, unknown>, id: number): void {
  calls.delete(id);
  if (calls.size === 0) hold(p, false);
}
