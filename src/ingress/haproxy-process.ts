// The HAProxy Berth owns: one master (master-worker mode, -W) per data dir, found again by its pid
// file after a berthd crash. A stale process is adopted when it is ours (its command line names
// this data dir's config) and its master CLI answers; otherwise it is killed, by pid only.
// Configuration is a file in the data dir; changes are applied by a seamless reload through the
// master CLI (a unix socket, mode 0600, in a 0700 directory): the new worker takes the listening
// sockets, the old one finishes what it relays.
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, existsSync, mkdirSync, openSync, readdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { createConnection } from 'node:net';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { pidAlive, run, sleep } from '../lib/exec.js';
import { unavailable } from '../core/errors.js';

export interface HaproxyPathsFull {
  dir: string;
  pidFile: string;
  config: string;
  masterSocket: string;
  workerSocket: string;
  hostsMap: string;
  tlsHostsMap: string;
  crtList: string;
  acmeSocket: string;
  logFile: string;
  serverState: string;
}

export function haproxyPaths(dir: string): HaproxyPathsFull {
  return {
    dir,
    pidFile: join(dir, 'haproxy.pid'),
    config: join(dir, 'haproxy.cfg'),
    masterSocket: join(dir, 'master.sock'),
    workerSocket: join(dir, 'worker.sock'),
    hostsMap: join(dir, 'hosts.map'),
    tlsHostsMap: join(dir, 'hosts-tls.map'),
    crtList: join(dir, 'crt-list'),
    acmeSocket: join(dir, 'acme.sock'),
    logFile: join(dir, 'haproxy.log'),
    serverState: join(dir, 'server-state'),
  };
}

/** The files a running proxy needs; removed at stop (the CA and certificates stay). */
function runtimeFiles(p: HaproxyPathsFull): string[] {
  return [p.pidFile, p.masterSocket, p.workerSocket, p.config, p.hostsMap, p.tlsHostsMap, p.crtList, p.acmeSocket, p.serverState, `${p.serverState}.tmp`];
}

/** A server-state file of format version 1 with no servers. */
const EMPTY_SERVER_STATE = '1\n';

/** Keep the log file from growing without bound across restarts. */
const MAX_LOG_BYTES = 4 * 1024 * 1024;

interface ProcList {
  reloads: number;
  workers: number[];
}

export class HaproxyProcess {
  readonly paths: HaproxyPathsFull;
  pid: number | undefined;
  /** True when this berthd found the process running from an earlier berthd (crash) and kept it. */
  adopted = false;
  private child: ChildProcess | undefined;
  private logStart = 0;
  private exitListeners: (() => void)[] = [];

  constructor(
    dir: string,
    private readonly bin: string,
    private readonly log: Logger,
  ) {
    this.paths = haproxyPaths(dir);
  }

  /** Called when the process ends without stop() (crash, OOM kill, killed by hand). */
  onExit(f: () => void): void {
    this.exitListeners.push(f);
  }

  /** A process recorded in the pid file that is still our HAProxy master, or undefined. */
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

  /** The pid runs HAProxy with this data dir's config (pids are reused: check before signalling). */
  private isOurs(pid: number): boolean {
    try {
      const args = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
      const state = /\) (\S)/.exec(readFileSync(`/proc/${pid}/stat`, 'utf8'))?.[1];
      return state !== 'Z' && /(^|\/)haproxy$/.test(args[0] ?? '') && args.includes(this.paths.config);
    } catch {
      return false;
    }
  }

  /** Every live process (master and workers, old ones included) running this data dir's config. */
  private ours(): number[] {
    return readdirSync('/proc')
      .filter((p) => /^\d+$/.test(p))
      .map(Number)
      .filter((pid) => this.isOurs(pid));
  }

  running(): boolean {
    return this.pid !== undefined && pidAlive(this.pid) && this.isOurs(this.pid);
  }

  /** Adopt a live HAProxy left by an earlier berthd, or start one with the config already written. */
  async ensure(): Promise<'running' | 'adopted' | 'started'> {
    if (this.running()) return 'running';
    await this.stopLegacyCaddy();
    const stale = this.recordedPid();
    if (stale !== undefined) {
      this.pid = stale;
      if ((await this.procs().catch(() => undefined))?.workers.length) {
        this.adopted = true;
        this.log.info({ pid: stale }, 'ingress: adopted the HAProxy left by an earlier berthd');
        return 'adopted';
      }
      this.log.warn({ pid: stale }, 'ingress: the HAProxy left by an earlier berthd does not answer; killing it');
      await this.kill(stale);
    }
    await this.start();
    return 'started';
  }

  /** Check a config (`haproxy -c`) before it is loaded: a bad one is reported and the running one kept. */
  async check(): Promise<void> {
    const r = await run(this.bin, ['-c', '-f', this.paths.config], { cwd: this.paths.dir });
    if (r.code !== 0) {
      const alerts = `${r.stdout}\n${r.stderr}`.split('\n').filter((l) => l.includes('[ALERT]'));
      throw unavailable(`HAProxy rejected the ingress config: ${alerts.slice(0, 5).join(' ') || r.stderr.trim()}`);
    }
  }

  private async start(): Promise<void> {
    const p = this.paths;
    // Workers of a master that was killed end on their own once they see it gone; wait for them
    // (they hold the ports), then end any that linger — they are ours by their command line.
    const deadline = Date.now() + 3_000;
    while (this.ours().length && Date.now() < deadline) await sleep(25);
    for (const pid of this.ours()) await this.kill(pid, 1_000);
    mkdirSync(p.dir, { recursive: true, mode: 0o700 });
    rmSync(p.masterSocket, { force: true });
    rmSync(p.workerSocket, { force: true });
    writeFileSync(p.serverState, EMPTY_SERVER_STATE); // a fresh proxy: nothing to carry over (and no warning)
    try {
      if (statSync(p.logFile).size > MAX_LOG_BYTES) rmSync(p.logFile);
    } catch {
      /* no log yet */
    }
    // Output goes to a file, not a pipe: HAProxy must outlive a berthd crash without dying of EPIPE.
    const fd = openSync(p.logFile, 'a', 0o600);
    this.logStart = statSync(p.logFile).size;
    let child: ChildProcess;
    try {
      // Not detached: HAProxy stays in berthd's session. It still outlives a SIGKILL of berthd
      // (only berthd's pid is signalled); a session of its own would put it in its own scheduler
      // autogroup, which on a busy host cut a proxy's throughput (BENCHMARKS.md "Ingress").
      child = spawn(this.bin, ['-W', '-S', `${p.masterSocket},mode,600`, '-f', p.config], { stdio: ['ignore', fd, fd], cwd: p.dir });
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
          ? `the ingress needs HAProxy but "${this.bin}" is not installed; install it (apt-get install haproxy) or start berthd with --ingress-http off --ingress-https off`
          : `cannot start HAProxy (${this.bin}): ${spawned.message}`,
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
      this.log.warn({ pid: child.pid, code, signal: sig }, 'ingress: HAProxy exited');
      for (const f of this.exitListeners) f();
    });
    const until = Date.now() + 15_000;
    while (!(await this.procs().catch(() => undefined))?.workers.length) {
      if (child.exitCode !== null || child.signalCode !== null) {
        this.child = undefined;
        rmSync(p.pidFile, { force: true });
        throw unavailable(`HAProxy exited at start (${child.exitCode ?? child.signalCode}): ${this.startError()}`);
      }
      if (Date.now() > until) {
        await this.kill(this.pid);
        throw unavailable(`HAProxy did not start within 15 s: ${this.logTail()}`);
      }
      await sleep(20);
    }
    this.log.info({ pid: this.pid }, 'ingress: HAProxy started');
  }

  /** The reason a start failed, in Berth's words where HAProxy's are cryptic. */
  private startError(): string {
    const tail = this.logTail();
    const bind = /cannot bind socket \(([^)]*)\)(?: for)? \[([^\]]*)\]/.exec(tail);
    if (bind) return `cannot listen on ${bind[2]}: ${bind[1]!.toLowerCase()} (free the port or pick another with --ingress-http/--ingress-https)`;
    return tail;
  }

  /** The last lines HAProxy wrote since this berthd started it. */
  logTail(): string {
    try {
      return readFileSync(this.paths.logFile, 'utf8').slice(this.logStart).trim().split('\n').slice(-5).join('\n');
    } catch {
      return '(no log)';
    }
  }

  /** The current worker's count of HTTP requests since it started (`show info` CumReq); undefined if unreadable. */
  async requestCount(): Promise<number | undefined> {
    const text = await this.cli('show info', 1_000, this.paths.workerSocket).catch(() => '');
    const m = /^CumReq: (\d+)$/m.exec(text);
    return m ? Number(m[1]) : undefined;
  }

  /** One command on the master CLI (or a worker's socket); the answer ends when HAProxy closes the connection. */
  private cli(command: string, timeoutMs = 5_000, socket = this.paths.masterSocket): Promise<string> {
    return new Promise((resolve, reject) => {
      const sock = createConnection(socket);
      let out = '';
      const timer = setTimeout(() => sock.destroy(new Error(`HAProxy CLI "${command}" (${socket}) timed out after ${timeoutMs} ms`)), timeoutMs);
      sock.setEncoding('utf8');
      sock.on('data', (d: string) => (out += d));
      sock.on('error', (e) => {
        clearTimeout(timer);
        reject(e);
      });
      sock.on('close', () => {
        clearTimeout(timer);
        resolve(out);
      });
      // Half-close after the command: the master answers, then closes (non-interactive mode).
      sock.end(`${command}\n`);
    });
  }

  /** `show proc`: the master's reload count and its current workers (not the old ones still finishing). */
  private async procs(): Promise<ProcList> {
    const text = await this.cli('show proc', 2_000);
    const master = /^\d+\s+master\s+(\d+)/m.exec(text);
    if (!master) throw new Error(`unexpected answer to show proc: ${text.slice(0, 200)}`);
    const workers = [...text.matchAll(/^(\d+)\s+worker\s+0\s/gm)].map((m) => Number(m[1]));
    return { reloads: Number(master[1]), workers };
  }

  /** Seamless reload of the config file; resolves once a new worker serves it. */
  async reload(): Promise<void> {
    const before = await this.procs();
    await this.saveServerState();
    await this.cli('reload').catch(() => undefined); // the master re-executes itself: the answer may be cut
    const deadline = Date.now() + 15_000;
    for (;;) {
      const now = await this.procs().catch(() => undefined);
      if (now && now.reloads > before.reloads && now.workers.some((w) => !before.workers.includes(w))) return;
      if (!pidAlive(this.pid)) throw unavailable(`HAProxy exited during a reload: ${this.logTail()}`);
      if (Date.now() > deadline) throw unavailable(`HAProxy did not load the new config within 15 s: ${this.logTail()}`);
      await sleep(20);
    }
  }

  /**
   * The running worker's servers (their addresses, resolved from Berth's DNS, and states) into the
   * file the next worker loads (`server-state-file`): without it, DNS-discovered replicas start
   * unresolved and the new worker answers 503 until its first DNS answer. Unreadable: an empty state.
   */
  private async saveServerState(): Promise<void> {
    const state = await this.cli('show servers state', 2_000, this.paths.workerSocket).catch(() => '');
    const tmp = `${this.paths.serverState}.tmp`;
    writeFileSync(tmp, state.startsWith(EMPTY_SERVER_STATE) ? state : EMPTY_SERVER_STATE);
    renameSync(tmp, this.paths.serverState);
  }

  /** SIGTERM, then SIGKILL after a grace period; by pid, after checking it is still our HAProxy. */
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

  /**
   * A Caddy left running by a Berth from before the switch to HAProxy (same data dir) would hold
   * the ingress ports: end it (by its pid file, after checking its command line names this data
   * dir's boot config) and remove its runtime files. Its certificate storage (ingress/caddy) stays.
   */
  async stopLegacyCaddy(): Promise<void> {
    const dir = this.paths.dir;
    const [pidFile, boot] = [join(dir, 'caddy.pid'), join(dir, 'caddy-boot.json')];
    if (!existsSync(pidFile)) return;
    const pid = Number(readFileSync(pidFile, 'utf8').trim());
    const isCaddy = () => {
      try {
        return readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').includes(boot);
      } catch {
        return false;
      }
    };
    if (Number.isInteger(pid) && pid > 0 && isCaddy()) {
      this.log.warn({ pid }, 'ingress: stopping the Caddy an earlier Berth ran (the ingress is HAProxy now)');
      process.kill(pid, 'SIGTERM');
      for (let i = 0; i < 200 && isCaddy(); i++) await sleep(25);
      if (isCaddy()) process.kill(pid, 'SIGKILL');
    }
    for (const f of [pidFile, boot, join(dir, 'admin.sock')]) rmSync(f, { force: true });
  }

  /** Stop HAProxy (master and workers) and remove its runtime files. */
  async stop(): Promise<void> {
    const pid = this.pid ?? this.recordedPid();
    this.child = undefined; // an exit from here on is expected
    if (pid !== undefined) await this.kill(pid);
    // The master ends its workers; any left (a master killed earlier) are ours by their command line.
    const deadline = Date.now() + 3_000;
    while (this.ours().length && Date.now() < deadline) await sleep(25);
    for (const w of this.ours()) await this.kill(w, 1_000);
    this.pid = undefined;
    for (const f of runtimeFiles(this.paths)) rmSync(f, { force: true });
  }

  /** The runtime files of a running proxy that exist (for leak checks). */
  static residue(dir: string): string[] {
    return runtimeFiles(haproxyPaths(dir)).filter((f) => existsSync(f));
  }
}
