// The runc driver: plain containers on the host kernel (isolation "container").
//
// The task's root is the read-only image rootfs with an overlay (a per-task writable upper layer)
// that runc mounts over "/" inside the container's own mount namespace, so no mount exists on the
// host and none can leak. Supervision, logs, exit codes and recovery: see ../oci/driver.ts.
import { constants as fsConstants, existsSync, openSync, rmSync, statSync } from 'node:fs';
import { Socket } from 'node:net';
import { join } from 'node:path';
import type { DriverCapabilities, Fingerprint } from '../../core/driver.js';
import { pidAlive, runOk, sleep } from '../../lib/exec.js';
import { DEFAULT_CAPS, OciRuntimeDriver, type AgentConnectionVia, type EarlyStart, type OciDriverOptions } from '../oci/driver.js';

export { DEFAULT_CAPS };

export class RuncDriver extends OciRuntimeDriver {
  readonly name = 'runc';
  readonly capabilities: DriverCapabilities = {
    isolation: 'container',
    limits: { cpu: true, memory: true, pids: true },
    oomDetection: true,
    survivesDaemonRestart: true,
    signals: true,
    sharesHostKernel: true,
  };

  constructor(opts: OciDriverOptions) {
    super(opts, 'runc', '/usr/sbin/runc');
  }

  async fingerprint(): Promise<Fingerprint> {
    const attributes: Record<string, string> = {};
    try {
      const r = await runOk(this.runtime, ['--version'], { timeoutMs: 5000 });
      const version = /runc version (\S+)/.exec(r.stdout)?.[1] ?? 'unknown';
      // The monitor: Berth's own (the agent's monitor mode: "berth-agent/0.3.0") or Debian's conmon.
      const c = await runOk(this.conmon, ['--version'], { timeoutMs: 5000 });
      const conmon = /conmon version (\S+)/.exec(c.stdout)?.[1];
      const agent = /^berth-agent\/(\S+)/m.exec(c.stdout)?.[1];
      attributes.monitor = conmon ? `conmon ${conmon}` : agent ? `berth-agent monitor ${agent}` : 'unknown';
      attributes.cgroups = existsSync('/sys/fs/cgroup/cgroup.controllers') ? 'v2' : 'v1';
      attributes.seccompProfile = existsSync('/usr/share/containers/seccomp.json') ? 'containers-common' : 'missing';
      const healthy = attributes.seccompProfile !== 'missing';
      return {
        driver: this.name,
        isolation: 'container',
        healthy,
        reason: healthy ? `runc ${version} supervised by ${attributes.monitor}` : 'seccomp profile missing: apt-get install golang-github-containers-common',
        version,
        attributes,
      };
    } catch (e) {
      return {
        driver: this.name,
        isolation: 'container',
        healthy: false,
        reason: `runc or conmon not usable (${(e as Error).message}); install them with: apt-get install runc conmon`,
        attributes,
      };
    }
  }

  /** runc keeps a task's state in <root>/<id>: one stat instead of listing the root on every start. */
  protected override hasRuntimeState(id: string): boolean {
    return existsSync(join(this.root, id));
  }

  /** runc passes extra fds to the container's init (`--preserve-fds`): a sandbox's agent gets its connection at start. */
  protected override passesAgentConnection(): AgentConnectionVia {
    return 'preserve-fds';
  }

  /** No command before the monitor: it can be started ahead of time. */
  protected override prespawnsMonitor(): boolean {
    return true;
  }

  /** Only conmon: the start is the exec fifo, released from berthd. */
  protected override launchesPerStart(): number {
    return 1;
  }

  /**
   * The equivalent of `runc start`, begun as soon as conmon is launched: a created container's init
   * blocks opening <root>/<id>/exec.fifo for writing until there is a reader, then writes one byte
   * and execs the workload; runc removes the fifo on start (an absent fifo is how runc knows the
   * container runs). Doing it here instead of spawning `runc start` saves a Go process start.
   *
   * The fifo is opened as soon as it exists (runc creates it before init starts), so init goes on
   * the moment it is ready instead of after `runc create` has exited and conmon has reported —
   * the same point at which `runc run` releases it. It is opened O_RDWR: that never blocks, and
   * since we are a writer too we never read EOF and close early, which could make init's write
   * fail with EPIPE. Waiting for the byte is event-driven (epoll, no thread-pool thread).
   */
  protected override beginStart(id: string): EarlyStart {
    const fifo = join(this.root, id, 'exec.fifo');
    const ac = new AbortController();
    const done = (async () => {
      // Until the fifo exists: a cheap stat every 5 ms, from 10 ms on (runc creates the fifo early
      // but init is ready to take the start signal only tens of ms after the launch, so the coarse
      // poll costs no latency, and little CPU while runc works).
      for (let wait = 10; !ac.signal.aborted; wait = 5) {
        await new Promise((r) => setTimeout(r, wait));
        if (ac.signal.aborted) break;
        let isFifo = false;
        try {
          isFifo = statSync(fifo).isFIFO();
        } catch {
          /* not yet */
        }
        if (isFifo) {
          await readFifoByte(fifo, ac.signal);
          rmSync(fifo, { force: true });
          return true;
        }
      }
      return false;
    })().catch(() => false);
    return { done, cancel: () => ac.abort() };
  }

  protected override async startCreated(id: string, pid: number, early?: EarlyStart): Promise<void> {
    const fifo = join(this.root, id, 'exec.fifo');
    // runc create has returned. No fifo and no early start under way: not runc 1.x's layout.
    if (!early || (!existsSync(fifo) && !(await Promise.race([early.done, sleep(0).then(() => false)])))) {
      early?.cancel();
      await super.startCreated(id, pid);
      return;
    }
    const deadline = Date.now() + 3000;
    let started = false;
    const watchdog = (async () => {
      while (!started) {
        await sleep(20);
        if (started) return;
        if (!pidAlive(pid)) throw new Error('container init exited before it was started');
        if (Date.now() > deadline) throw new Error('container init did not take the start signal within 3 s');
      }
    })();
    try {
      const ok = await Promise.race([early.done, watchdog]);
      if (!ok) throw new Error('container was not started');
    } catch (e) {
      early.cancel();
      throw e;
    } finally {
      started = true;
    }
  }
}

/**
 * Opens the fifo O_RDWR (never blocks, never reads EOF: see beginStart) and waits, event-driven
 * (epoll through a libuv pipe), for one byte. Never parks a thread-pool thread.
 */
function readFifoByte(path: string, signal: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    let fd: number;
    try {
      fd = openSync(path, fsConstants.O_RDWR | fsConstants.O_NONBLOCK);
    } catch (e) {
      reject(e);
      return;
    }
    const sock = new Socket({ fd, readable: true, writable: false });
    let settled = false;
    const settle = (e?: unknown) => {
      if (settled) return;
      settled = true;
      signal.removeEventListener('abort', onAbort);
      sock.destroy();
      if (e) reject(e);
      else resolve();
    };
    const onAbort = () => settle(new Error('aborted'));
    signal.addEventListener('abort', onAbort, { once: true });
    if (signal.aborted) onAbort();
    sock.once('data', () => settle());
    sock.once('end', () => settle(new Error('exec fifo closed')));
    sock.once('close', () => settle(new Error('exec fifo closed')));
    sock.once('error', (e) => settle(e));
  });
}
