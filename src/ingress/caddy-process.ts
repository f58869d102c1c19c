// The Caddy process Berth owns: one per data dir, found again by its pid file after a berthd crash.
// A stale process is adopted when it is ours (its command line names this data dir's boot config)
// and its admin API answers; otherwise it is killed, by pid only. Configuration goes through the
// admin API on a unix socket inside the data dir (mode 0600, in a 0700 directory).
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, openSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { pidAlive, sleep } from '../lib/exec.js';
import { unavailable } from '../core/errors.js';

export interface CaddyPathsFull {
  dir: string;
  pidFile: string;
  bootFile: string;
  adminSocket: string;
  logFile: string;
  storage: string;
  home: string;
}

export function caddyPaths(dir: string): CaddyPathsFull {
  return {
    dir,
    pidFile: join(dir, 'caddy.pid'),
    bootFile: join(dir, 'caddy-boot.json'),
    adminSocket: join(dir, 'admin.sock'),
    logFile: join(dir, 'caddy.log'),
    storage: join(dir, 'caddy'),
    home: join(dir, 'home'),
  };
}

/** Keep the log file from growing without bound across restarts. */
const MAX_LOG_BYTES = 4 * 1024 * 1024;

export class CaddyProcess {
  readonly paths: CaddyPathsFull;
  pid: number | undefined;
  /** True when this berthd found the process running from an earlier berthd (crash) and kept it. */
  adopted = false;
  private child: ChildProcess | undefined;
  private exitListeners: (() => void)[] = [];

  constructor(
    dir: string,
    private readonly bin: string,
    private readonly log: Logger,
  ) {
    this.paths = caddyPaths(dir);
  }

  /** Called when the process ends without stop() (crash, OOM kill, killed by hand). */
  onExit(f: () => void): void {
    this.exitListeners.push(f);
  }

  /** A process recorded in the pid file that is still our Caddy, or undefined. */
  private recordedPid(): number | undefined {
    let pid: number;
    try {
      pid = Number(readFileSync(this.paths.pidFile, 'utf8').trim());
    } catch {
      return undefined;
    }
    if (!Number.isInteger(pid) || pid <= 0 || !pidAlive(pid)) return undefined;
    return this.isOurs(pid) ? pid : undefined;
  }

  /** The pid runs Caddy with this data dir's boot config (pids are reused: check before signalling). */
  private isOurs(pid: number): boolean {
    try {
      const args = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
      const state = /\) (\S)/.exec(readFileSync(`/proc/${pid}/stat`, 'utf8'))?.[1];
      return state !== 'Z' && args.includes('run') && args.includes(this.paths.bootFile);
    } catch {
      return false;
    }
  }

  running(): boolean {
    return this.pid !== undefined && pidAlive(this.pid) && this.isOurs(this.pid);
  }

  /** Adopt a live Caddy left by an earlier berthd, or start one. Returns how it got one. */
  async ensure(): Promise<'running' | 'adopted' | 'started'> {
    if (this.running()) return 'running';
    const stale = this.recordedPid();
    if (stale !== undefined) {
      this.pid = stale;
      if (await this.ping()) {
        this.adopted = true;
        this.log.info({ pid: stale }, 'ingress: adopted the Caddy left by an earlier berthd');
        return 'adopted';
      }
      this.log.warn({ pid: stale }, 'ingress: the Caddy left by an earlier berthd does not answer; killing it');
      await this.kill(stale);
    }
    await this.start();
    return 'started';
  }

  private async start(): Promise<void> {
    const p = this.paths;
    mkdirSync(p.dir, { recursive: true, mode: 0o700 });
    mkdirSync(p.home, { recursive: true, mode: 0o700 });
    rmSync(p.adminSocket, { force: true });
    // The boot config only opens the admin API; the ingress loads the full config right after.
    writeFileSync(p.bootFile, JSON.stringify({ admin: { listen: `unix/${p.adminSocket}`, config: { persist: false } } }), { mode: 0o600 });
    try {
      if (statSync(p.logFile).size > MAX_LOG_BYTES) rmSync(p.logFile);
    } catch {
      /* no log yet */
    }
    // Output goes to a file, not a pipe: Caddy must outlive a berthd crash without dying of EPIPE.
    const fd = openSync(p.logFile, 'a', 0o600);
    let child: ChildProcess;
    try {
      // Not detached: Caddy stays in berthd's session. It still outlives a SIGKILL of berthd (only
      // berthd's pid is signalled); a session of its own would put it in its own scheduler
      // autogroup, which on a busy host halved its throughput (BENCHMARKS.md "Ingress").
      child = spawn(this.bin, ['run', '--config', p.bootFile], {
        stdio: ['ignore', fd, fd],
        // Everything Caddy might write (autosave, instance id, certificates) stays in the data dir.
        env: { PATH: process.env.PATH ?? '/usr/sbin:/usr/bin:/sbin:/bin', HOME: p.home, XDG_DATA_HOME: p.home, XDG_CONFIG_HOME: p.home },
      });
    } finally {
      closeSync(fd);
    }
    const spawned = await new Promise<Error | undefined>((resolve) => {
      child.once('spawn', () => resolve(undefined));
      child.once('error', (e) => resolve(e));
    });
    if (spawned) {
      const code = (spawned as NodeJS.ErrnoException).code;
      throw unavailable(
        code === 'ENOENT'
          ? `the ingress needs Caddy but "${this.bin}" is not installed; install it (apt-get install caddy) or start berthd with --ingress-http off --ingress-https off`
          : `cannot start Caddy (${this.bin}): ${spawned.message}`,
      );
    }
    child.unref();
    this.child = child;
    this.pid = child.pid!;
    this.adopted = false;
    writeFileSync(p.pidFile, `${this.pid}\n`, { mode: 0o600 });
    child.once('exit', (code, sig) => {
      if (this.child !== child) return;
      this.child = undefined;
      this.log.warn({ pid: child.pid, code, signal: sig }, 'ingress: Caddy exited');
      for (const f of this.exitListeners) f();
    });
    const deadline = Date.now() + 15_000;
    while (!(await this.ping())) {
      if (child.exitCode !== null || child.signalCode !== null) throw unavailable(`Caddy exited at start (${child.exitCode ?? child.signalCode}): ${this.logTail()}`);
      if (Date.now() > deadline) {
        await this.kill(this.pid);
        throw unavailable(`Caddy did not open its admin API within 15 s: ${this.logTail()}`);
      }
      await sleep(20);
    }
    this.log.info({ pid: this.pid }, 'ingress: Caddy started');
  }

  logTail(): string {
    try {
      return readFileSync(this.paths.logFile, 'utf8').trim().split('\n').slice(-5).join('\n');
    } catch {
      return '(no log)';
    }
  }

  private async ping(): Promise<boolean> {
    try {
      const r = await this.admin('GET', '/config/', undefined, 2_000);
      return r.status === 200;
    } catch {
      return false;
    }
  }

  /** One admin API call over the unix socket. */
  admin(method: string, path: string, body?: string, timeoutMs = 30_000): Promise<{ status: number; body: string }> {
    return new Promise((resolve, reject) => {
      // Caddy's admin API on a unix socket accepts only an empty Host.
      const req = http.request(
        { socketPath: this.paths.adminSocket, method, path, agent: false, setHost: false, headers: { host: '', connection: 'close', ...(body !== undefined ? { 'content-type': 'application/json' } : {}) }, timeout: timeoutMs },
        (res) => {
          let text = '';
          res.setEncoding('utf8').on('data', (d: string) => (text += d));
          res.on('end', () => resolve({ status: res.statusCode ?? 0, body: text }));
          res.on('error', reject);
        },
      );
      req.on('timeout', () => req.destroy(new Error(`Caddy admin ${method} ${path} timed out after ${timeoutMs} ms`)));
      req.on('error', reject);
      req.end(body);
    });
  }

  /** Replace the whole config; Caddy swaps it in gracefully (listeners are kept, in-flight requests finish). */
  async load(config: unknown): Promise<void> {
    const r = await this.admin('POST', '/load', JSON.stringify(config));
    if (r.status !== 200) {
      let msg = r.body.trim();
      try {
        msg = (JSON.parse(r.body) as { error?: string }).error ?? msg;
      } catch {
        /* text */
      }
      throw unavailable(`Caddy rejected the ingress config (HTTP ${r.status}): ${msg}`);
    }
  }

  /** SIGTERM, then SIGKILL after a grace period; by pid, after checking it is still our Caddy. */
  private async kill(pid: number, graceMs = 5_000): Promise<void> {
    const signal = (s: NodeJS.Signals) => {
      if (!this.isOurs(pid)) return false;
      try {
        process.kill(pid, s);
        return true;
      } catch {
        return false;
      }
    };
    if (!signal('SIGTERM')) return;
    const deadline = Date.now() + graceMs;
    while (this.isOurs(pid) && Date.now() < deadline) await sleep(25);
    if (signal('SIGKILL')) while (this.isOurs(pid)) await sleep(10);
  }

  /** Stop Caddy and remove its runtime files (the CA and certificates stay: they belong to the data dir). */
  async stop(): Promise<void> {
    const pid = this.pid ?? this.recordedPid();
    this.child = undefined; // an exit from here on is expected
    if (pid !== undefined) await this.kill(pid);
    this.pid = undefined;
    for (const f of [this.paths.pidFile, this.paths.adminSocket, this.paths.bootFile]) rmSync(f, { force: true });
  }

  /** Whether the runtime files of a running proxy exist (for leak checks). */
  static residue(dir: string): string[] {
    const p = caddyPaths(dir);
    return [p.pidFile, p.adminSocket, p.bootFile].filter((f) => existsSync(f));
  }
}
