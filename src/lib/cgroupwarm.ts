// Keeps cgroup migrations cheap while workloads start.
//
// Every write to a cgroup.procs file (moving a process into a cgroup) takes the kernel's one global
// cgroup_threadgroup_rwsem for writing. Unless the host mounts its cgroups with favordynmods, that
// semaphore is a per-CPU one whose write side waits for an RCU grace period when nobody took it
// within the last one: measured on the benchmark host (cgroup v1, nested VM), the first such write
// after a pause took 7.6 ms, the ones right after it 0.1 ms. A start pays it more than once, in
// the runtime, where Berth cannot batch the writes: `runsc run` on cgroup v1 moves itself into the
// task's cgroups and back (2 of them); `runc create` moves the container's init in; the microVM
// driver moves QEMU in. A bare `runsc run` of an `echo` took 122 ms, 96 ms with another process
// re-joining its own cgroup every 3 ms meanwhile (15 runs each; BENCHMARKS.md, session 10 notes).
//
// So while a start is in flight, berthd re-joins its own cgroup every few milliseconds: a migration
// to where it already is, which changes nothing but keeps the semaphore's RCU sync entered, so that
// the runtime's migrations do not wait for a grace period. One loop per process, however many
// starts hold it; each write holds the semaphore for ~0.1 ms. It stops when the last start is done.
// Nothing to keep warm where the write fails (no cgroup file system, a cgroup v2 parent with
// controllers enabled below it): then the warmer turns itself off.
import { closeSync, existsSync, openSync, readFileSync, write } from 'node:fs';
import { join } from 'node:path';

const CGROUP_ROOT = '/sys/fs/cgroup';
/** Well inside a grace period (several ms), so that the sync never goes idle between two writes. */
export const WARM_INTERVAL_MS = 3;

/** This process's own cgroup.procs file in one hierarchy (any: the semaphore is global), or undefined. */
export function ownCgroupProcs(selfCgroup = readFileSync('/proc/self/cgroup', 'utf8'), root = CGROUP_ROOT): string | undefined {
  for (const line of selfCgroup.split('\n')) {
    const m = /^\d+:([^:]*):(\/.*)$/.exec(line);
    if (!m) continue;
    const [, ctrls, path] = m as unknown as [string, string, string];
    // v2 ("0::/path") lives at the root; a v1 hierarchy under its controllers' (or name=) directory.
    const hier = ctrls === '' ? root : join(root, ctrls.startsWith('name=') ? ctrls.slice(5) : ctrls);
    if (ctrls === '' && !existsSync(join(root, 'cgroup.controllers'))) continue; // a hybrid host's unified tree is elsewhere
    const procs = join(hier, path, 'cgroup.procs');
    if (existsSync(procs)) return procs;
  }
  return undefined;
}

export class MigrationWarmer {
  private holders = 0;
  private fd: number | undefined;
  private running = false;
  private disabled = false;
  /** Writes done (for tests). */
  writes = 0;

  constructor(
    private readonly procsPath: () => string | undefined = () => ownCgroupProcs(),
    private readonly intervalMs = WARM_INTERVAL_MS,
  ) {}

  /** Keeps migrations warm until the returned function is called (idempotent). */
  hold(): () => void {
    if (this.disabled) return () => undefined;
    this.holders++;
    if (!this.running) this.begin();
    let released = false;
    return () => {
      if (released) return;
      released = true;
      this.holders--;
    };
  }

  /** `fn` with migrations kept warm meanwhile. */
  async during<T>(fn: () => Promise<T>): Promise<T> {
    const release = this.hold();
    try {
      return await fn();
    } finally {
      release();
    }
  }

  get active(): boolean {
    return this.running;
  }

  private begin(): void {
    // Looked up each time it starts: whoever manages berthd may have moved it meanwhile, and a
    // write to a stale path would move it back.
    let path: string | undefined;
    try {
      path = this.procsPath();
      if (path) this.fd = openSync(path, 'w');
    } catch {
      path = undefined;
    }
    if (!path || this.fd === undefined) {
      this.disabled = true;
      return;
    }
    this.running = true;
    this.tick();
  }

  private tick(): void {
    // (A hold that comes while a write is in flight is seen when it completes.)
    if (this.holders === 0 || this.fd === undefined) return this.end();
    // "0": move the writing process (berthd) to this cgroup, where it already is. In the thread
    // pool: the first write after a pause waits for the grace period.
    write(this.fd, '0', (err) => {
      if (err) {
        this.disabled = true;
        return this.end();
      }
      this.writes++;
      if (this.holders === 0) return this.end();
      setTimeout(() => this.tick(), this.intervalMs).unref();
    });
  }

  private end(): void {
    this.running = false;
    if (this.fd !== undefined) {
      try {
        closeSync(this.fd);
      } catch {
        /* closed */
      }
      this.fd = undefined;
    }
  }
}

/** berthd's one warmer (the semaphore is global: one loop is enough for all drivers). */
export const migrationWarmer = new MigrationWarmer();
