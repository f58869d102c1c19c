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
import { DEFAULT_CAPS, OciRuntimeDriver, type OciDriverOptions } from '../oci/driver.js';

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
      const c = await runOk(this.conmon, ['--version'], { timeoutMs: 5000 });
      attributes.conmon = /conmon version (\S+)/.exec(c.stdout)?.[1] ?? 'unknown';
      attributes.cgroups = existsSync('/sys/fs/cgroup/cgroup.controllers') ? 'v2' : 'v1';
      attributes.seccompProfile = existsSync('/usr/share/containers/seccomp.json') ? 'containers-common' : 'missing';
      const healthy = attributes.seccompProfile !== 'missing';
      return {
        driver: this.name,
        isolation: 'container',
        healthy,
        reason: healthy ? `runc ${version} supervised by conmon ${attributes.conmon}` : 'seccomp profile missing: apt-get install golang-github-containers-common',
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

  /** Only conmon: the start is the exec fifo, released from berthd. */
  protected override launchesPerStart(): number {
    return 1;
  }

  /**
   * The equivalent of `runc start`: a created container's init blocks writing to
   * <root>/<id>/exec.fifo; opening it for reading and reading releases init, which then execs the
   * workload, and runc removes the fifo (an absent fifo is how runc knows the container runs).
   * Doing that here instead of spawning `runc start` saves a Go process start, about 7 ms or a
   * tenth of the whole start path (bench/start-latency). Falls back to `runc start` if the fifo is
   * not where runc 1.x puts it.
   */
  protected override async startCreated(id: string, pid: number): Promise<void> {
    const fifo = join(this.root, id, 'exec.fifo');
    try {
      if (!statSync(fifo).isFIFO()) throw new Error('not a fifo');
    } catch {
      await super.startCreated(id, pid);
      return;
    }
    const deadline = Date.now() + 3000;
    for (;;) {
      // EOF means init has not opened its end yet (it does so right after `create` returns).
      if ((await readFifoByte(fifo)) === 'data') break;
      if (!pidAlive(pid)) throw new Error('container init exited before it was started');
      if (Date.now() > deadline) throw new Error('container init did not take the start signal within 3 s');
      await sleep(1);
    }
    rmSync(fifo, { force: true });
  }


}

/**
 * Opens the fifo non-blocking and waits, event-driven (epoll through a libuv pipe), for one byte
 * or for EOF (no writer). Never parks a thread-pool thread.
 */
function readFifoByte(path: string): Promise<'data' | 'eof'> {
  return new Promise((resolve, reject) => {
    let fd: number;
    try {
      fd = openSync(path, fsConstants.O_RDONLY | fsConstants.O_NONBLOCK);
    } catch (e) {
      reject(e);
      return;
    }
    const sock = new Socket({ fd, readable: true, writable: false });
    let settled = false;
    const settle = (r: 'data' | 'eof') => {
      if (settled) return;
      settled = true;
      sock.destroy();
      resolve(r);
    };
    sock.once('data', () => settle('data'));
    sock.once('end', () => settle('eof'));
    sock.once('close', () => settle('eof'));
    sock.once('error', (e) => {
      if (!settled) {
        settled = true;
        sock.destroy();
        reject(e);
      }
    });
  });
}
