// The gVisor driver (isolation "gvisor"): the same OCI bundle as runc, run by runsc, whose
// user-space kernel (the Sentry) answers the workload's system calls, so the workload never talks
// to the host kernel directly. Supervision, logs, exit codes and recovery: see ../oci/driver.ts.
//
// Differences from runc, all measured on Debian 12 / kernel 6.x (see the issue notes):
// - runsc ignores an overlay mount on "/" in the OCI config, so the writable layer is a host
//   overlay mount on bundle/rootfs (lower = image, upper = the task's layer) with runsc's own
//   overlay turned off (--overlay2=none). The mount is the task's; destroy() removes it.
// - There is no exec.fifo: a created sandbox is started with `runsc start` (an RPC).
// - The platform is systrap for a current runsc and ptrace for Debian's 2022 runsc (which has no
//   systrap); never KVM unless a probe proves it works (the PVM-only /dev/kvm hangs it).
// - runsc mounts its own tmpfs on an empty /tmp unless the spec mounts /tmp: /tmp is bound onto itself
//   so that it stays on the writable layer (under the disk limit, not in the sandbox's memory), as with
//   runc (prepareRootfs). Measured cost: ~4–5 ms of a cold start (one more gofer mount).
// - A pids limit in the host cgroup counts the Sentry's own threads and kills the whole sandbox
//   when reached, so pids is not offered as a limit; memory needs ≥ 32 MiB for the Sentry itself.
import { chmodSync, copyFileSync, existsSync, lstatSync, mkdirSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { DriverCapabilities, Fingerprint, TaskConfig, TaskHandle, TaskStatus } from '../../core/driver.js';
import { BerthError, invalidArgument } from '../../core/errors.js';
import { run, sleep } from '../../lib/exec.js';
import { isMountPoint } from '../../lib/host.js';
import { OciRuntimeDriver, snapshotConfig, type AgentConnectionVia, type OciDriverOptions } from '../oci/driver.js';
import type { OciBuildOptions, OciConfig } from '../oci/ocispec.js';

/** Where scripts/setup.sh installs the pinned, current runsc it builds with Go. */
export const BERTH_RUNSC = '/usr/local/lib/berth/runsc';
export const DEBIAN_RUNSC = '/usr/bin/runsc';
export const GVISOR_MIN_MEMORY_MIB = 32;

export function findRunsc(): string | undefined {
  return [process.env.BERTH_RUNSC, BERTH_RUNSC, DEBIAN_RUNSC].find((p): p is string => !!p && existsSync(p));
}

/**
 * Whether /tmp of the overlay (`upper` over `lower`) will be a real directory, making it in `upper`
 * (mode 1777) when neither layer has one. A symbolic link, an overlay whiteout or any other file: no.
 */
export function tmpIsDirectory(upper: string, lower: string): boolean {
  for (const layer of [upper, lower]) {
    let st;
    try {
      st = lstatSync(join(layer, 'tmp'));
    } catch {
      continue; // not in this layer: the one below decides
    }
    return st.isDirectory();
  }
  mkdirSync(join(upper, 'tmp'), { mode: 0o1777 });
  chmodSync(join(upper, 'tmp'), 0o1777); // (past the umask)
  return true;
}

/** A snapshot taken before /tmp was bound must be restored without that mount (runsc compares the mounts). */
function checkpointHasTmpMount(snapshot: string): boolean {
  const mounts = snapshotConfig(snapshot)?.mounts;
  return !mounts || mounts.some((m) => m.destination === '/tmp');
}

export interface GvisorDriverOptions extends OciDriverOptions {
  /** systrap | ptrace; default: systrap for a current runsc, ptrace for Debian's. */
  platform?: string;
}

export class GvisorDriver extends OciRuntimeDriver {
  readonly name = 'gvisor';
  readonly capabilities: DriverCapabilities = {
    isolation: 'gvisor',
    limits: { cpu: true, memory: true, pids: false },
    oomDetection: true,
    survivesDaemonRestart: true,
    signals: true,
    sharesHostKernel: false,
    minMemoryMiB: GVISOR_MIN_MEMORY_MIB,
  };
  readonly platform: string;
  /** Sandboxes being snapshotted by this process. */
  private readonly snapshotting = new Set<string>();

  constructor(opts: GvisorDriverOptions) {
    const path = opts.runtimePath ?? findRunsc() ?? BERTH_RUNSC;
    super({ ...opts, runtimePath: path }, 'runsc', path);
    this.platform = opts.platform ?? (path === DEBIAN_RUNSC ? 'ptrace' : 'systrap');
  }

  /**
   * With Berth's monitor, `runsc run --detach` instead of `runsc create` + `runsc start`: one runsc
   * process less per start (each is a Go program that loads the container's state: ~30–50 ms here).
   */
  protected override runsOnCreate(): boolean {
    return this.monitorArgv[1] === 'monitor';
  }

  /**
   * A sandbox's agent gets its host connection at start (see OciRuntimeDriver.start()) with runsc's
   * --pass-fd, which only `run` has (not `create`): so only with Berth's monitor. Measured on the
   * gVisor cold start (create → first output of `echo`): traced, the agent answered ~7 ms sooner than
   * when berthd connected to the socket it creates through the gofer; untraced, 8 interleaved pairs of
   * 30 starts, median 158.2 → 154.9 ms (BENCHMARKS.md).
   */
  protected override passesAgentConnection(): AgentConnectionVia | undefined {
    return this.runsOnCreate() ? 'pass-fd' : undefined;
  }

  protected override launchesPerStart(): number {
    return this.runsOnCreate() ? 1 : 2;
  }

  protected override globalArgs(): string[] {
    // --host-uds=create: a sandbox's agent listens on a unix socket in a bind-mounted host folder
    // (task/run), which the host must be able to connect to.
    // --network=sandbox: gVisor's own network stack (netstack) takes over the interfaces of the
    // task's namespace (src/network); a task without one gets an empty namespace. Debian's 2022
    // runsc cannot (gVisor #10704): it gets none, and networked tasks are refused (rootfsOptions).
    return [`--root=${this.root}`, `--platform=${this.platform}`, `--network=${this.runtime === DEBIAN_RUNSC ? 'none' : 'sandbox'}`, '--overlay2=none', '--host-uds=create'];
  }

  protected override rootfsOptions(cfg: TaskConfig, dir: string): Pick<OciBuildOptions, 'rootfsPath' | 'rootOverlay' | 'seccomp'> {
    if (cfg.resources.pids !== undefined) {
      throw invalidArgument('isolation "gvisor" does not support a pids limit (the sandbox counts its own threads); remove resources.pids');
    }
    if (cfg.network && this.runtime === DEBIAN_RUNSC) {
      throw invalidArgument(`Debian's runsc cannot network a sandbox on this kernel (gVisor #10704): run scripts/setup.sh to build a current runsc, or use network mode "none"`);
    }
    if (cfg.resources.memoryMiB !== undefined && cfg.resources.memoryMiB < GVISOR_MIN_MEMORY_MIB) {
      throw invalidArgument(`isolation "gvisor" needs resources.memoryMiB ≥ ${GVISOR_MIN_MEMORY_MIB} (its kernel runs inside the limit)`);
    }
    // The Sentry filters the workload's system calls itself; a seccomp profile in the spec is ignored by runsc.
    return { rootfsPath: join(dir, 'bundle', 'rootfs'), seccomp: null };
  }

  /**
   * The host overlay on bundle/rootfs. The mount command is returned, not run: the launcher runs it
   * right before conmon in the same pre-spawned process, which saves a fork of berthd (launcher.ts).
   */
  protected override async prepareRootfs(cfg: TaskConfig, dir: string, config: OciConfig): Promise<string[] | void> {
    const rootfs = join(dir, 'bundle', 'rootfs');
    const layer = this.layerDir(cfg, dir);
    mkdirSync(rootfs, { recursive: true, mode: 0o755 });
    // /tmp on the writable layer, as with runc and in a microVM. Without a /tmp mount in the spec, runsc
    // mounts its own tmpfs on an empty /tmp: files written there live in the sandbox's memory (a 300 MiB
    // file killed a 128 MiB sandbox, measured) and escape the disk limit. So /tmp is bound onto itself
    // (4 interleaved pairs of 30 cold starts: +4.7 ms at the median).
    // Only when it is a real directory: a symbolic link (say, planted by the workload in its layer
    // before a restart) would be followed on the host.
    const restoringWithout = cfg.restoreFrom !== undefined && !checkpointHasTmpMount(cfg.restoreFrom);
    if (!config.mounts.some((m) => m.destination === '/tmp') && !restoringWithout && tmpIsDirectory(join(layer, 'upper'), cfg.imageRootfs)) {
      // Before any mount below /tmp (a volume at /tmp/x), which it would hide if mounted after it.
      const at = config.mounts.findIndex((m) => m.destination.startsWith('/tmp/'));
      config.mounts.splice(at < 0 ? config.mounts.length : at, 0, { destination: '/tmp', type: 'bind', source: join(rootfs, 'tmp'), options: ['rbind', 'rw'] });
    }
    if (isMountPoint(rootfs)) return;
    return ['mount', '-t', 'overlay', 'overlay', '-o', `lowerdir=${cfg.imageRootfs},upperdir=${join(layer, 'upper')},workdir=${join(layer, 'work')}`, rootfs];
  }

  protected override async releaseRootfs(dir: string): Promise<void> {
    const rootfs = join(dir, 'bundle', 'rootfs');
    for (let i = 0; i < 20 && isMountPoint(rootfs); i++) {
      const r = await run('umount', [rootfs], { timeoutMs: 10_000 });
      if (r.code !== 0) await run('umount', i === 19 ? ['-l', rootfs] : [rootfs], { timeoutMs: 10_000 });
    }
  }

  /**
   * Snapshot of a running sandbox into `dest` (`runsc checkpoint --leave-running`): its memory and
   * processes (image/), its writable layer as it was at that instant (upper/). The sandbox is
   * paused meanwhile and continues afterwards (a fork, not a move). gVisor cannot save a socket
   * bound to a host path, so the guest agent first closes its socket and connections and listens
   * again once told to (agent "suspend"; a restored copy is told by its own start).
   */
  async snapshot(handle: TaskHandle, dest: string): Promise<{ ms: number; bytes: number }> {
    if (handle.state?.sandbox !== true) throw new BerthError('failed_precondition', 'only sandboxes can be snapshotted');
    if (this.monitorArgv.length === 1) throw new BerthError('failed_precondition', 'gVisor snapshots need the Berth monitor (unset BERTH_MONITOR=conmon)');
    const dir = this.taskDir(handle.id);
    const t0 = performance.now();
    mkdirSync(dest, { recursive: true, mode: 0o700 });
    const sock = join(dir, 'run', 'agent.sock');
    // A paused sandbox's agent cannot answer "suspend": let it run for that moment.
    const wasPaused = (await this.runtimeState(handle.id))?.status === 'paused';
    // If berthd dies half-way, inspect() finds this marker and undoes what the snapshot changed.
    const marker = join(dir, 'snapshotting');
    writeFileSync(marker, wasPaused ? 'paused' : 'running');
    this.snapshotting.add(handle.id);
    if (wasPaused) await this.resume(handle);
    try {
      await (await this.agent(handle.id, 2000)).request({ type: 'suspend', timeoutMs: 120_000 }, 5000);
      for (let i = 0; existsSync(sock); i++) {
        if (i > 2500) throw new Error('the agent did not close its socket for the checkpoint');
        await sleep(2);
      }
      // Frozen while the files are copied, so that they match the memory image.
      await this.pause(handle);
      const layer = existsSync(join(dir, 'disk', 'upper')) ? join(dir, 'disk') : dir;
      const cp = await run('cp', ['-a', '--reflink=auto', join(layer, 'upper'), join(dest, 'upper')], { timeoutMs: 300_000 });
      if (cp.code !== 0) throw new Error(`copying the writable layer: ${cp.stderr.trim()}`);
      copyFileSync(join(dir, 'bundle', 'config.json'), join(dest, 'config.json'));
      const r = await this.rt(['checkpoint', '--leave-running', `--image-path=${join(dest, 'image')}`, handle.id], 300_000);
      if (r.code !== 0) throw new Error(`runsc checkpoint: ${(r.stderr || r.stdout).trim().split('\n')[0]}`);
    } finally {
      await this.endSnapshot(handle, wasPaused);
      this.snapshotting.delete(handle.id);
    }
    let bytes = 0;
    for (const f of readdirSync(join(dest, 'image'))) bytes += statSync(join(dest, 'image', f)).size;
    return { ms: performance.now() - t0, bytes };
  }

  /** Lets the agent listen again and the sandbox run (or stay paused) after a snapshot; removes its marker. */
  private async endSnapshot(handle: TaskHandle, wasPaused: boolean): Promise<void> {
    const dir = this.taskDir(handle.id);
    writeFileSync(join(dir, 'run', 'agent.resume'), '');
    if (wasPaused) await this.pause(handle).catch(() => undefined);
    else await this.resume(handle).catch(() => undefined);
    rmSync(join(dir, 'snapshotting'), { force: true });
  }

  /** A snapshot cut short by a crash of berthd left the sandbox frozen and its agent deaf: undo that first. */
  override async inspect(h: TaskHandle): Promise<TaskStatus> {
    const marker = join(this.taskDir(h.id), 'snapshotting');
    if (!this.snapshotting.has(h.id) && existsSync(marker)) await this.endSnapshot(h, readFileSync(marker, 'utf8') === 'paused');
    return super.inspect(h);
  }

  protected override restoreImage(from: string): string {
    const image = join(from, 'image');
    if (!existsSync(join(image, 'checkpoint.img'))) throw invalidArgument(`${from} is not a gVisor snapshot (no image/checkpoint.img)`);
    return image;
  }

  override async destroy(id: string, opts: { force?: boolean; keepData?: boolean } = {}): Promise<void> {
    await super.destroy(id, opts);
    // A current runsc keeps a per-root bind mount (null-netns: an empty network namespace that its
    // gofers join); drop it with the last sandbox. Starts at the same time may pin one again, even
    // stacked on another (runsc refers to it through its own fd, so unmounting races no start): all
    // are unmounted; if one is pinned again before the file is removed, it stays for the next
    // sandbox and goes with the last one after it.
    const nullNetns = join(this.root, 'null-netns');
    let busy = false;
    try {
      busy = readdirSync(this.root).some((f) => f !== 'null-netns');
    } catch {
      /* no root */
    }
    if (!busy && existsSync(nullNetns)) {
      for (let i = 0; i < 10 && isMountPoint(nullNetns); i++) await run('umount', [nullNetns], { timeoutMs: 10_000 });
      try {
        rmSync(nullNetns, { force: true });
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'EBUSY') throw e;
      }
    }
  }

  async fingerprint(): Promise<Fingerprint> {
    const attributes: Record<string, string> = { runsc: this.runtime, platform: this.platform };
    if (!existsSync(this.runtime)) {
      return {
        driver: this.name,
        isolation: 'gvisor',
        healthy: false,
        reason: `runsc not found (looked for ${BERTH_RUNSC} and ${DEBIAN_RUNSC}); scripts/setup.sh builds a current one, or apt-get install runsc`,
        attributes,
      };
    }
    const r = await run(this.runtime, ['--version'], { timeoutMs: 10_000 });
    const version = /runsc version (\S+)/.exec(r.stdout)?.[1];
    if (r.code !== 0 || !version) {
      return { driver: this.name, isolation: 'gvisor', healthy: false, reason: `${this.runtime} --version failed: ${(r.stderr || r.stdout).trim().slice(0, 200)}`, attributes };
    }
    const debian = this.runtime === DEBIAN_RUNSC;
    attributes.source = debian ? 'debian' : 'berth-built';
    return {
      driver: this.name,
      isolation: 'gvisor',
      healthy: true,
      reason: `runsc ${version}, platform ${this.platform} (KVM not used: it needs vmx/svm and a passing probe)${
        debian ? "; Debian's 2022 runsc: network sandboxing is unavailable on kernels ≥ 6.11 (gVisor #10704)" : ''
      }`,
      version,
      attributes,
    };
  }
}
