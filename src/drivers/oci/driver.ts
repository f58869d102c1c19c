// Shared machinery for drivers whose tasks are OCI bundles run by an OCI runtime (runc, runsc)
// under Debian's `conmon`, a small C monitor that double-forks away from berthd, runs
// `<runtime> create`, becomes the container's sub-reaper, writes stdout/stderr with timestamps to
// the log file (k8s-file format), and writes the exit code (and an `oom` marker) to files when the
// container ends. Because of that the container keeps running, and its exit code stays known,
// while berthd is down; berthd keeps no process per task.
//
// On-disk layout under `stateDir` (all owned by the driver, removed by destroy()):
//   <runtime>/            the runtime's --root (its own state)
//   exits/<id>            exit code written by conmon
//   tasks/<id>/bundle/    config.json (and rootfs/ when the rootfs is mounted on the host)
//   tasks/<id>/upper|work overlay layers (kept across restarts of the same task id)
//   tasks/<id>/persist/   conmon persist dir (`oom`, `exit`)
//   tasks/<id>/ctr.pid, conmon.pid, ctr.log
//
// Subclasses choose the runtime, its flags, how the writable layer is provided and how a created
// container is started.
import { chmodSync, chownSync, existsSync, mkdirSync, readFileSync, readdirSync, readlinkSync, realpathSync, rmSync, rmdirSync, statSync, watch, writeFileSync, type FSWatcher } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { EventEmitter } from 'node:events';
import { spawn } from 'node:child_process';
import type { Socket } from 'node:net';
import { basename, join } from 'node:path';
import { constants as osConstants } from 'node:os';
import type {
  DriverCapabilities,
  ExitResult,
  Fingerprint,
  RuntimeDriver,
  StopOptions,
  TaskConfig,
  TaskExecResult,
  TaskHandle,
  TaskStatus,
} from '../../core/driver.js';
import { BerthError, invalidArgument } from '../../core/errors.js';
import { pidAlive, run, sleep } from '../../lib/exec.js';
import { cgroupHierarchies } from '../../lib/host.js';
import { makeWritableDisk, mountDisk, unmountDisk } from '../../lib/disk.js';
import { buildOciConfig, hostNofileLimit, type OciBuildOptions, type OciConfig, type OciMount } from './ocispec.js';
import { AgentConnection } from '../agent/client.js';
import { AgentPool } from '../agent/pool.js';
import { agentAtLeast, findAgent } from '../agent/binary.js';
import { loadDefaultSeccomp, type OciSeccomp } from './seccomp.js';
import { Launcher, monitorSpare } from './launcher.js';
import { traceMark } from '../../lib/trace.js';
import { migrationWarmer } from '../../lib/cgroupwarm.js';
import type { NetworkAttachment, NetworkManager } from '../../network/manager.js';

export interface OciDriverOptions {
  stateDir: string;
  /** Path of the OCI runtime binary. */
  runtimePath?: string;
  conmonPath?: string;
  /**
   * Who supervises each container: "berth" = the guest agent's conmon-compatible monitor mode (a
   * static binary: ~3 ms less per start than conmon's exec and dynamic linking; agent/monitor.go),
   * "conmon" = Debian's conmon. Default: $BERTH_MONITOR, else "berth" when the agent is installed.
   */
  monitor?: 'berth' | 'conmon';
  /** Parent cgroup (relative) under which every task's cgroup is created. */
  cgroupParent?: string;
  /** Max size of one task's log file before conmon truncates it. */
  logSizeMax?: number;
  /** Gives tasks with TaskConfig.network their namespace, address and rules; without it they are refused. */
  network?: NetworkManager;
  /** How long a started sandbox's agent has to listen (default 10 s); the first agent call fails after it. */
  agentStartTimeoutMs?: number;
}

/** What beginStart() set going; see there. */
export interface EarlyStart {
  /** Resolves true once the container was started early, false if it was not (cancelled, or nothing to do). */
  done: Promise<boolean>;
  cancel(): void;
}

const SIGNALS = osConstants.signals as Record<string, number>;
/** How long a started sandbox's agent has to listen and answer hello (OciDriverOptions.agentStartTimeoutMs). */
const AGENT_START_TIMEOUT_MS = 10_000;
const signalName = (n: number) => Object.keys(SIGNALS).find((k) => SIGNALS[k] === n);

/** The container config a snapshot keeps (gVisor snapshots copy config.json); undefined if there is none. */
export function snapshotConfig(snapshot: string): Partial<OciConfig> | undefined {
  try {
    return JSON.parse(readFileSync(join(snapshot, 'config.json'), 'utf8')) as Partial<OciConfig>;
  } catch {
    return undefined;
  }
}

/** The agent's command line in a snapshot's config; undefined if there is none. */
function checkpointedArgs(snapshot: string): string[] | undefined {
  const args: unknown = snapshotConfig(snapshot)?.process?.args;
  return Array.isArray(args) && args[0] === '/.berth/agent' && args.every((a) => typeof a === 'string') ? (args as string[]) : undefined;
}

/** How a runtime hands the container's init an inherited fd: runc `--preserve-fds 1`, runsc `--pass-fd 3:3`. */
export type AgentConnectionVia = 'preserve-fds' | 'pass-fd';

export abstract class OciRuntimeDriver implements RuntimeDriver {
  abstract readonly name: string;
  abstract readonly capabilities: DriverCapabilities;
  protected readonly runtime: string;
  protected readonly conmon: string;
  /** argv prefix of the per-container monitor (conmon, or the agent's monitor mode). */
  protected readonly monitorArgv: string[];
  /** The runtime's --root. */
  protected readonly root: string;
  private readonly exitsDir: string;
  private readonly tasksDir: string;
  protected readonly cgroupParent: string;
  private readonly exits = new EventEmitter();
  private readonly agents = new AgentPool();
  /** `<runtime> create` still finishing for tasks that start() answered for already (see finishCreate()). */
  private readonly creating = new Map<string, Promise<void>>();
  /** Sandboxes whose agent is not connected yet since their start (see connectStarted()). */
  private readonly starting = new Map<string, Promise<void>>();
  /** Ends connectStarted()'s wait for the agent's socket when the task is destroyed first. */
  private readonly stopConnecting = new Map<string, AbortController>();
  private watcher: FSWatcher | undefined;
  private swapSupported: boolean | undefined;
  private readonly nofile = hostNofileLimit();
  /** The default profile (loadDefaultSeccomp caches it too, but builds its cache key on every call). */
  private seccomp: OciSeccomp | undefined;
  /** Starts conmon (and `<runtime> start`) without forking berthd on the critical path; see launcher.ts. */
  protected readonly launcher: Launcher;
  /** Berth's monitor started ahead of time, waiting for its arguments (see prespawnsMonitor()). */
  private readonly monitors: Launcher | undefined;
  /** Sandboxes get their agent connection handed in at start instead of connecting to its socket (see start()). */
  private readonly agentConnFd: AgentConnectionVia | undefined;

  constructor(
    protected readonly opts: OciDriverOptions,
    runtimeName: string,
    defaultRuntimePath: string,
  ) {
    this.runtime = opts.runtimePath ?? defaultRuntimePath;
    const agent = findAgent();
    const env = process.env.BERTH_MONITOR;
    const monitor = opts.monitor ?? (env === 'conmon' || env === 'berth' ? env : agent ? 'berth' : 'conmon');
    this.monitorArgv = monitor === 'berth' && agent ? [agent, 'monitor'] : [opts.conmonPath ?? '/usr/bin/conmon'];
    // Need Berth's own monitor (--agent-fd, --spare) and agent (--conn-fd), new in agent 0.2.0.
    const agent020 = monitor === 'berth' && !!agent && agentAtLeast(agent, '0.2.0');
    const via = agent020 ? this.passesAgentConnection() : undefined;
    // Handing it over with runsc's --pass-fd needs the monitor's --agent-fd-pass (agent 0.3.0).
    this.agentConnFd = via === 'pass-fd' && !agentAtLeast(agent!, '0.3.0') ? undefined : via;
    this.monitors = agent020 && this.prespawnsMonitor() ? new Launcher(1, monitorSpare(agent)) : undefined;
    this.conmon = this.monitorArgv[0]!;
    this.root = join(opts.stateDir, runtimeName);
    this.exitsDir = join(opts.stateDir, 'exits');
    this.tasksDir = join(opts.stateDir, 'tasks');
    this.cgroupParent = opts.cgroupParent ?? 'berth';
    for (const d of [this.root, this.exitsDir, this.tasksDir]) mkdirSync(d, { recursive: true, mode: 0o700 });
    this.exits.setMaxListeners(0);
    // (With monitor spares, the bash ones are for the rest: none for runc, whose start is the exec fifo.)
    this.launcher = new Launcher(this.launchesPerStart() - (this.monitors ? 1 : 0));
    this.launcher.warm();
    this.monitors?.warm();
  }

  /** Subscribe to task exits (any task); returns an unsubscribe function. */
  onExit(listener: (id: string) => void): () => void {
    this.ensureWatcher();
    this.exits.on('exit', listener);
    return () => this.exits.off('exit', listener);
  }

  private ensureWatcher(): void {
    if (this.watcher) return;
    this.watcher = watch(this.exitsDir, (_ev, file) => {
      if (file && !file.startsWith('.')) this.exits.emit('exit', String(file));
    });
    this.watcher.unref();
  }

  close(): void {
    for (const ac of this.stopConnecting.values()) ac.abort();
    this.agents.closeAll();
    this.watcher?.close();
    this.watcher = undefined;
    this.launcher.close();
    this.monitors?.close();
  }

  /**
   * Global flags of every runtime invocation, each as one `--flag=value` word (conmon passes them
   * on one argv entry each). runsc, for one, wants the same ones on every call.
   */
  protected globalArgs(): string[] {
    return [`--root=${this.root}`];
  }

  /**
   * True when the monitor creates and starts the container with one runtime process
   * (`<runtime> run --detach`, Berth's own monitor only): no `<runtime> start` afterwards.
   */
  protected runsOnCreate(): boolean {
    return false;
  }

  /**
   * How the runtime hands an extra fd to the container's init, so that a sandbox's agent can be given
   * its host connection at start (see start()): runc's `--preserve-fds`, runsc's `--pass-fd`; none: the
   * agent is connected to on its socket once it listens.
   */
  protected passesAgentConnection(): AgentConnectionVia | undefined {
    return undefined;
  }

  /**
   * Whether Berth's monitor is kept started ahead of time (launcher.ts, monitorSpare()): for drivers
   * whose starts run no command before the monitor (prepareRootfs() returns none).
   */
  protected prespawnsMonitor(): boolean {
    return false;
  }

  /** Processes a start launches (conmon; plus `<runtime> start` unless the driver starts it itself). */
  protected launchesPerStart(): number {
    return 2;
  }

  /** Runs the runtime with its global flags. */
  protected async rt(args: string[], timeoutMs = 30_000) {
    if (!existsSync(this.runtime)) return { code: 127, stdout: '', stderr: `${this.runtime} is not installed` };
    return run(this.runtime, [...this.globalArgs(), ...args], { timeoutMs });
  }

  /** How the task's root file system and writable layer appear in the OCI config. */
  protected rootfsOptions(cfg: TaskConfig, dir: string): Pick<OciBuildOptions, 'rootfsPath' | 'rootOverlay' | 'seccomp'> {
    return {
      rootfsPath: cfg.imageRootfs,
      rootOverlay: { upperDir: join(this.layerDir(cfg, dir), 'upper'), workDir: join(this.layerDir(cfg, dir), 'work') },
      seccomp: (this.seccomp ??= loadDefaultSeccomp({ capabilities: DEFAULT_CAPS })),
    };
  }

  /** Where the writable layer's upper and work folders live: on the task's own disk when it has a disk limit. */
  protected layerDir(cfg: TaskConfig, dir: string): string {
    return cfg.resources.diskMiB !== undefined ? join(dir, 'disk') : dir;
  }

  /**
   * Host-side preparation of the rootfs before create (nothing by default), once the writable layer
   * exists; it may add mounts to the container's config that depend on the layer's contents. May
   * return a command (argv) that the launcher runs right before conmon, in the same pre-spawned
   * process, instead of berthd spawning it: a failure of that command fails the start with its stderr.
   */
  protected async prepareRootfs(_cfg: TaskConfig, _dir: string, _config: OciConfig): Promise<string[] | void> {}

  /**
   * Called right after conmon is launched, before the runtime has created the container; lets a
   * driver get ready to start it as early as possible (runc: open the exec fifo as soon as it exists).
   * The returned value is passed to startCreated(); `cancel` is called if the create fails.
   */
  protected beginStart(_id: string): EarlyStart | undefined {
    return undefined;
  }

  /** Undo prepareRootfs (idempotent). */
  protected async releaseRootfs(_dir: string): Promise<void> {}

  /** The checkpoint image to restore a task from (start with TaskConfig.restoreFrom); drivers that can restore override it. */
  protected restoreImage(_from: string): string {
    throw invalidArgument(`the ${this.name} driver cannot start a task from a snapshot`);
  }

  /** Start a created container (`<runtime> start`), launched without a fork of berthd (launcher.ts). */
  protected async startCreated(id: string, _pid: number, _early?: EarlyStart): Promise<void> {
    const r = await this.rtLaunched(['start', id]);
    if (r.code !== 0) throw new Error(cleanRuncError(r.stderr) || `${this.runtime} start failed`);
  }

  /** Like rt(), through the launcher; stdout is not kept (commands that only report errors). */
  protected rtLaunched(args: string[], timeoutMs = 30_000): Promise<{ code: number; stderr: string }> {
    if (!existsSync(this.runtime)) return Promise.resolve({ code: 127, stderr: `${this.runtime} is not installed` });
    const { child, stderr, fd3 } = this.launcher.launch(this.root, [this.runtime, ...this.globalArgs(), ...args]);
    fd3.destroy();
    return new Promise((resolve) => {
      let err = '';
      stderr.setEncoding('utf8').on('data', (d: string) => (err += d));
      const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
      child.on('close', (code, sig) => {
        clearTimeout(timer);
        resolve({ code: code ?? (sig ? 128 + 9 : -1), stderr: err });
      });
    });
  }

  protected taskDir(id: string) {
    return join(this.tasksDir, id);
  }
  logPath(id: string): string {
    return join(this.taskDir(id), 'ctr.log');
  }

  abstract fingerprint(): Promise<Fingerprint>;

  private hasSwapAccounting(): boolean {
    if (this.swapSupported === undefined) {
      this.swapSupported = existsSync('/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes') || existsSync('/sys/fs/cgroup/cgroup.controllers');
    }
    return this.swapSupported;
  }

  async start(cfg: TaskConfig): Promise<TaskHandle> {
    if (!existsSync(join(cfg.imageRootfs, 'bin')) && !existsSync(cfg.imageRootfs)) {
      throw invalidArgument(`image rootfs ${cfg.imageRootfs} does not exist`);
    }
    traceMark(cfg.id, 'driver.start');
    const dir = this.taskDir(cfg.id);
    const bundle = join(dir, 'bundle');
    // A sandbox's agent gets its host connection at start: one end of a socket pair that the launcher
    // made (fd 4 of the launched monitor, which has the runtime hand it to the agent as fd 3). It
    // is connected before the agent runs: hello and the first command are written at once and wait
    // in the socket until the agent reads them, instead of berthd retrying connect() on the agent's
    // socket until it listens (measured: the connection came 3–4 ms after the agent listened, and
    // the first command waited for it). The agent listens on its socket too, for later connections
    // (after a broken one, or a restart of berthd).
    const connFd = !!cfg.sandbox && !!this.agentConnFd && !cfg.restoreFrom;
    const sandbox = cfg.sandbox ? this.sandboxTask(cfg, dir, connFd) : undefined;
    // Pure conversion + validation first; nothing on the host is touched if the spec is bad.
    const config = buildOciConfig(sandbox?.cfg ?? cfg, {
      ...this.rootfsOptions(cfg, dir),
      ...(sandbox ? { extraMounts: sandbox.mounts } : {}),
      // Absolute: a relative path would be placed under berthd's own cgroup.
      cgroupsPath: `/${this.cgroupParent}/${cfg.id}`,
      swapLimitSupported: this.hasSwapAccounting(),
      nofileLimit: this.nofile,
    });
    if (existsSync(join(this.exitsDir, cfg.id)) || this.hasRuntimeState(cfg.id)) {
      throw new BerthError('already_exists', `task ${cfg.id} still has runtime state; destroy it before starting it again`);
    }
    if (cfg.network && !this.opts.network) throw invalidArgument(`the ${this.name} driver has no network manager: run the task with network mode "none"`);
    // The runtime moves processes into the task's cgroups (runsc: itself, in and back out; runc:
    // the container's init): kept from waiting for an RCU grace period each (src/lib/cgroupwarm.ts).
    const unwarm = migrationWarmer.hold();
    try {
      const net = cfg.network ? await this.opts.network!.attach(cfg.id, this.name, { ...cfg.network, hostname: config.hostname }) : undefined;
      if (net) joinNetwork(config, net);
      for (const d of ['persist', ...(sandbox ? ['run'] : [])]) mkdirSync(join(dir, d), { recursive: true, mode: 0o700 });
      const layer = this.layerDir(cfg, dir);
      if (cfg.resources.diskMiB !== undefined) {
        // The writable layer on its own size-limited file system: a full disk stays the task's problem.
        if (!existsSync(join(dir, 'disk.ext4'))) await makeWritableDisk(join(dir, 'disk.ext4'), cfg.resources.diskMiB);
        mkdirSync(layer, { recursive: true, mode: 0o700 });
        await mountDisk(join(dir, 'disk.ext4'), layer);
      }
      for (const d of ['upper', 'work']) mkdirSync(join(layer, d), { recursive: true, mode: 0o700 });
      // From a checkpoint: the files as they were when it was taken (the memory image refers to them).
      if (cfg.restoreFrom) await run('cp', ['-a', '--reflink=auto', `${join(cfg.restoreFrom, 'upper')}/.`, join(layer, 'upper')], { timeoutMs: 300_000 }).then((r) => {
        if (r.code !== 0) throw new Error(`copying the snapshot's files: ${r.stderr.trim()}`);
      });
      // The overlay's root directory takes the upper layer's owner and mode: give it the image's
      // (a 0700 root would keep non-root processes from reaching anything).
      const rootSt = statSync(cfg.imageRootfs);
      chmodSync(join(layer, 'upper'), rootSt.mode & 0o7777);
      chownSync(join(layer, 'upper'), rootSt.uid, rootSt.gid);
      mkdirSync(bundle, { recursive: true, mode: 0o700 });
      // A restored agent was suspended for the checkpoint: this file tells it to listen again (agent/suspend.go).
      if (cfg.restoreFrom && sandbox) writeFileSync(join(dir, 'run', 'agent.resume'), '');
      const pre = (await this.prepareRootfs(cfg, dir, config)) ?? [];
      writeFileSync(join(bundle, 'config.json'), JSON.stringify(config));
      const restore = cfg.restoreFrom ? this.restoreImage(cfg.restoreFrom) : undefined;
      const early = restore ? undefined : this.beginStart(cfg.id);
      traceMark(cfg.id, 'driver.launch');
      const created = this.spawnConmon(cfg.id, bundle, dir, pre, restore, connFd ? (sock) => this.adoptAgent(cfg.id, sock) : undefined);
      let pid: number | undefined;
      try {
        pid = early ? await this.startedEarly(cfg.id, early, created) : undefined;
      } catch (e) {
        early?.cancel();
        throw e;
      }
      if (pid !== undefined) {
        this.finishCreate(cfg.id, created);
      } else {
        try {
          pid = await created;
        } catch (e) {
          early?.cancel();
          throw e;
        }
        traceMark(cfg.id, 'driver.created');
        if (!restore && !this.runsOnCreate()) await this.startCreated(cfg.id, pid, early); // a restore (or run) runs it already
      }
      traceMark(cfg.id, 'driver.running');
      const monitorPid = Number(readFileSync(join(dir, 'conmon.pid'), 'utf8').trim());
      this.ensureWatcher();
      // The agent (the container's init) runs: it is connected to here but not awaited; whoever
      // first needs it waits (agent()). It starts meanwhile — inside gVisor a Go program takes
      // ~20 ms to listen — while berthd records the sandbox as running and answers the create, and
      // the caller sends its first command: those ~2 (container) to ~6 ms (gVisor) are no longer
      // spent one after the other. An agent that never listens fails that first call (and its
      // exit, seen by the monitor, ends the sandbox as before).
      if (sandbox && !connFd) this.connectStarted(cfg.id);
      return {
        driver: this.name,
        id: cfg.id,
        pid,
        monitorPid,
        startedAt: new Date().toISOString(),
        ...(net ? { network: { ip: net.ip } } : {}),
        ...(sandbox ? { state: { sandbox: true } } : {}),
      };
    } catch (e) {
      await this.destroy(cfg.id, { keepData: true }).catch(() => undefined);
      if (e instanceof BerthError) throw e;
      throw new BerthError('failed_precondition', `could not start the container: ${(e as Error).message}`);
    } finally {
      unwarm();
      this.launcher.refillSoon();
      this.monitors?.refillSoon();
    }
  }

  /**
   * A sandbox container runs the guest agent as PID 1 (read-only bind mount of the static binary),
   * listening on a unix socket in a folder bind-mounted from the task's state folder; berthd drives
   * it from there (commands, files). Root inside, so that commands can run as any user.
   */
  private sandboxTask(cfg: TaskConfig, dir: string, connFd: boolean): { cfg: TaskConfig; mounts: OciMount[] } {
    const agent = findAgent();
    if (!agent) throw invalidArgument('sandboxes need the guest agent binary: run scripts/setup.sh (it builds agent/ with Go)');
    let args = ['/.berth/agent', '--listen', 'unix:/.berth/run/agent.sock', ...(connFd ? ['--conn-fd', '3'] : [])];
    if (cfg.restoreFrom) {
      // A restore must name the command line the checkpointed agent was started with (runsc checks),
      // e.g. with --conn-fd 3: the snapshot keeps its config.json. The restored agent does not run
      // main() again, so an fd named there is not looked for.
      const saved = checkpointedArgs(cfg.restoreFrom);
      if (saved) args = saved;
    }
    return {
      cfg: { ...cfg, args, user: { uid: 0, gid: 0 }, cwd: '/' },
      mounts: [
        { destination: '/.berth/agent', type: 'bind', source: agent, options: ['bind', 'ro', 'nosuid', 'nodev'] },
        { destination: '/.berth/run', type: 'bind', source: join(dir, 'run'), options: ['bind', 'rw', 'nosuid', 'nodev', 'noexec'] },
      ],
    };
  }

  /** A sandbox task's guest agent (shared connection). */
  async agent(id: string, timeoutMs = 5000): Promise<AgentConnection> {
    const starting = this.starting.get(id);
    if (starting) await starting;
    return this.agents.get(id, join(this.taskDir(id), 'run', 'agent.sock'), timeoutMs);
  }

  /**
   * Connects to a just-started sandbox's agent in the background (see start()) and sends it hello.
   * Requests that come meanwhile wait for the connection, not for the hello's answer: they go out
   * right behind it on the same connection (the agent serves them concurrently), which inside gVisor
   * saves another ~2 ms. Should the hello fail, the connection is closed and they fail with it.
   */
  private connectStarted(id: string): void {
    const ac = new AbortController();
    this.stopConnecting.set(id, ac);
    const starting = this.agents
      .get(id, join(this.taskDir(id), 'run', 'agent.sock'), this.opts.agentStartTimeoutMs ?? AGENT_START_TIMEOUT_MS, ac.signal)
      .then(
        (c) => {
          traceMark(id, 'agent.connected');
          c.request({ type: 'hello' }, this.opts.agentStartTimeoutMs ?? AGENT_START_TIMEOUT_MS).then(
            () => traceMark(id, 'agent.hello'),
            () => c.close(),
          );
        },
        (e: unknown) => {
          throw new BerthError('unavailable', `the sandbox's agent did not start: ${(e as Error).message}`);
        },
      )
      .finally(() => {
        if (this.starting.get(id) === starting) this.starting.delete(id);
        if (this.stopConnecting.get(id) === ac) this.stopConnecting.delete(id);
      });
    starting.catch(() => undefined); // its waiters get the error; nobody waiting is no crash
    this.starting.set(id, starting);
  }

  /**
   * The container's pid once its init has taken the start signal (`early`, see beginStart()) while
   * `<runtime> create` is still finishing: saving its state, writing the pid file and exiting, and
   * the monitor reporting that. From the start signal on the container runs its process — the moment
   * `<runtime> run` (and the bare-runtime benchmark) counts as started — and the rest took ~3 ms
   * (median; bench/sandboxes.ts, traced), which start() no longer waits for: finishCreate() sees to
   * it. Undefined (wait for create as before) when create ended first, or the init's pid cannot be
   * told (it is PID 1 of its pid namespace; found in the container's cgroup). Rejects when create fails first.
   */
  private async startedEarly(id: string, early: EarlyStart, created: Promise<number>): Promise<number | undefined> {
    const started = await Promise.race([early.done, created.then(() => false)]);
    if (!started) return undefined;
    // The start's answer names the monitor too (written when it started, long before).
    if (!existsSync(join(this.taskDir(id), 'conmon.pid'))) return undefined;
    return this.initPid(id);
  }

  /**
   * `<runtime> create` of a task that start() already answered for (startedEarly()). Runtime calls
   * for the task wait for it (afterCreate()): its state is saved last. Should it still fail, the
   * runtime has torn the container down, or the monitor gave up on it: it is killed for sure and
   * its owner woken, which finds the task gone (its monitor ended without an exit record).
   */
  private finishCreate(id: string, created: Promise<number>): void {
    const done: Promise<void> = created.then(
      () => traceMark(id, 'driver.created'),
      async () => {
        await this.rt(['kill', id, 'SIGKILL'], 10_000).catch(() => undefined);
        try {
          this.exits.emit('exit', id);
        } catch {
          /* a listener's failure is not this create's */
        }
      },
    );
    this.creating.set(id, done);
    void done.finally(() => {
      if (this.creating.get(id) === done) this.creating.delete(id);
    });
  }

  /** Waits until a `<runtime> create` that start() did not wait for is over (see finishCreate()). */
  private async afterCreate(id: string): Promise<void> {
    await this.creating.get(id);
  }

  /**
   * The host pid of a running container's init: the process in the task's cgroup that is PID 1 of its
   * own pid namespace (NSpid in /proc/<pid>/status). Undefined when none is found.
   */
  private initPid(id: string): number | undefined {
    for (const cg of this.cgroupDirs(id)) {
      let procs: string;
      try {
        procs = readFileSync(join(cg, 'cgroup.procs'), 'utf8');
      } catch {
        continue; // not in this hierarchy
      }
      for (const p of procs.split('\n')) {
        if (!p) continue;
        try {
          const ns = /^NSpid:\s+(.+)$/m.exec(readFileSync(`/proc/${p}/status`, 'utf8'))?.[1]?.trim().split(/\s+/);
          if (ns && ns.length > 1 && ns[ns.length - 1] === '1') return Number(p);
        } catch {
          /* gone meanwhile */
        }
      }
      return undefined;
    }
    return undefined;
  }

  /**
   * The agent connection handed to a sandbox at start (see start()): the task's shared connection
   * from now on, with hello sent ahead of whatever comes next. An agent that never reads it fails
   * hello after agentStartTimeoutMs, which closes the connection and fails the calls waiting on it.
   */
  private adoptAgent(id: string, sock: Socket): void {
    sock.ref();
    const c = AgentConnection.over(sock);
    this.agents.adopt(id, c);
    traceMark(id, 'agent.connected');
    c.request({ type: 'hello' }, this.opts.agentStartTimeoutMs ?? AGENT_START_TIMEOUT_MS).then(
      () => traceMark(id, 'agent.hello'),
      () => c.close(),
    );
  }

  /**
   * Starts conmon, which runs `<runtime> create`; resolves with the container's PID from conmon's sync pipe.
   * With `onAgentSocket`, the monitor hands the launch's socket pair (fd 4) to the container as fd 3, and
   * berthd's end goes to `onAgentSocket`.
   */
  private spawnConmon(id: string, bundle: string, dir: string, pre: string[], restore?: string, onAgentSocket?: (sock: Socket) => void): Promise<number> {
    const args = [
      '--api-version', '1',
      '-c', id, '-u', id, '-n', id,
      '-r', this.runtime,
      '-b', bundle,
      '-p', join(dir, 'ctr.pid'),
      '-P', join(dir, 'conmon.pid'),
      '-l', `k8s-file:${this.logPath(id)}`,
      '--log-size-max', String(this.opts.logSizeMax ?? 64 * 1024 * 1024),
      '--exit-dir', this.exitsDir,
      '--persist-dir', join(dir, 'persist'),
      '--socket-dir-path', dir,
      ...this.globalArgs().flatMap((a) => ['--runtime-arg', a]),
      '--log-level', 'error',
      '--syslog',
      ...(restore ? ['--restore', restore] : this.runsOnCreate() ? ['--run'] : []),
      ...(onAgentSocket ? ['--agent-fd', '4', ...(this.agentConnFd === 'pass-fd' ? ['--agent-fd-pass'] : [])] : []),
    ];
    return new Promise((resolve, reject) => {
      // conmon writes some marker files (e.g. `oom`) relative to its working directory. Its
      // environment is PATH and _OCI_SYNCPIPE=3, stdin/stdout /dev/null, its own session (launcher.ts).
      const launcher = this.monitors && pre.length === 0 ? this.monitors : this.launcher;
      const { child, fd3, fd4 } = launcher.launch(dir, [...this.monitorArgv, ...args], pre, !!onAgentSocket);
      if (fd4) onAgentSocket?.(fd4);
      let out = '';
      let err = '';
      const sync = fd3 as NodeJS.ReadableStream;
      const timer = setTimeout(() => finish(new Error('conmon did not report the container within 30 s')), 30_000);
      let done = false;
      const finish = (e: Error | null, pid?: number) => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        child.unref();
        (sync as unknown as { destroy(): void }).destroy();
        child.stderr?.destroy();
        if (e) reject(e);
        else resolve(pid!);
      };
      child.stderr!.setEncoding('utf8').on('data', (d: string) => (err += d));
      sync.setEncoding('utf8');
      sync.on('data', (d: string) => {
        out += d;
        const nl = out.indexOf('\n');
        const line = nl >= 0 ? out.slice(0, nl) : out;
        let msg: { data?: number; message?: string } | undefined;
        try {
          msg = JSON.parse(line);
        } catch {
          return; // partial line
        }
        if (msg && typeof msg.data === 'number' && msg.data > 0) finish(null, msg.data);
        else finish(new Error(cleanRuncError(msg?.message ?? err) || `${this.name} create failed`));
      });
      sync.on('end', () => finish(new Error(cleanRuncError(err) || 'conmon exited before the container was created')));
      child.on('error', (e) => finish(e));
    });
  }

  /** Whether the runtime still keeps state for this id (runc and runsc: a directory or files named by it under --root). */
  protected hasRuntimeState(id: string): boolean {
    try {
      return readdirSync(this.root).some((f) => f === id || f.startsWith(`${id}_`) || f.includes(`:${id}.`));
    } catch {
      return false;
    }
  }

  protected async runtimeState(id: string): Promise<{ status: string; pid: number } | undefined> {
    const r = await this.rt(['state', id], 10_000);
    if (r.code !== 0) return undefined;
    try {
      return JSON.parse(r.stdout);
    } catch {
      return undefined;
    }
  }

  private readExit(id: string): ExitResult | undefined {
    const f = join(this.exitsDir, id);
    // Mostly there is none (every inspect of a running task asks): a failed read costs an exception
    // with its stack, ~10× an existsSync; measured ~0.4 ms of berthd's CPU right after a sandbox
    // start's answer (the reconciler's next pass), before the answer left.
    if (!existsSync(f)) return undefined;
    let text: string;
    try {
      text = readFileSync(f, 'utf8').trim();
    } catch {
      return undefined;
    }
    if (text === '') return undefined; // being written
    const code = Number(text);
    const oomKilled = existsSync(join(this.taskDir(id), 'persist', 'oom'));
    const res: ExitResult = { exitCode: Number.isFinite(code) ? code : -1, oomKilled, finishedAt: statSync(f).mtime.toISOString() };
    if (code > 128) {
      const s = signalName(code - 128);
      if (s) res.signal = s;
    }
    return res;
  }

  private monitorAlive(h: TaskHandle): boolean {
    // Guard against PID reuse: the process must be the monitor of this task.
    return pidAlive(h.monitorPid) && this.isMonitorFor(h.monitorPid!, h.id);
  }

  /**
   * Whether `pid` is the monitor (conmon, or Berth's) of task `id`: named by its arguments, or, for
   * a monitor started ahead of time (`monitor --spare`, which got its arguments on stdin), by its
   * working directory, the task's folder.
   */
  private isMonitorFor(pid: number, id: string): boolean {
    try {
      const cmd = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
      if (!isMonitorCmdline(cmd)) return false;
      return cmd.includes(`\0${id}\0`) || readlinkSync(`/proc/${pid}/cwd`) === realpathSync(this.taskDir(id));
    } catch {
      return false;
    }
  }

  /**
   * `<runtime> exec`: a command in the running container. Answers when the runtime process exits,
   * not when its output pipes close: runsc hands the pipes to the sandbox, which keeps them open
   * while a timed-out command still runs. (A command past its time limit is left to finish in
   * the container; killing `<runtime> exec` does not end it.) The runtime moves the new process into
   * the container's cgroups: while it runs, cgroup migrations are kept warm (src/lib/cgroupwarm.ts;
   * `runc exec true` 59.3 → 48.8 ms, medians of 25 interleaved, each after 150 ms idle).
   */
  async exec(h: TaskHandle, args: string[], timeoutMs: number): Promise<TaskExecResult> {
    if (!existsSync(this.runtime)) return { exitCode: -1, output: `${this.runtime} is not installed` };
    await this.afterCreate(h.id);
    return migrationWarmer.during(() => this.runExec(h, args, timeoutMs));
  }

  private runExec(h: TaskHandle, args: string[], timeoutMs: number): Promise<TaskExecResult> {
    return new Promise((resolve) => {
      const child = spawn(this.runtime, [...this.globalArgs(), 'exec', h.id, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
      let output = '';
      const add = (b: Buffer) => {
        if (output.length < 4096) output += b.toString('utf8');
      };
      child.stdout.on('data', add);
      child.stderr.on('data', add);
      let timedOut = false;
      const timer = setTimeout(() => {
        timedOut = true;
        child.kill('SIGKILL');
      }, timeoutMs);
      const finish = (exitCode: number) => {
        clearTimeout(timer);
        // Output already written is still in the pipes: give it a moment, then stop reading.
        const drained = setTimeout(() => {
          child.stdout.destroy();
          child.stderr.destroy();
          resolve({ exitCode, output: output.slice(0, 4096) });
        }, 50);
        child.once('close', () => {
          clearTimeout(drained);
          resolve({ exitCode, output: output.slice(0, 4096) });
        });
      };
      child.once('error', (e) => {
        add(Buffer.from(e.message));
        finish(-1);
      });
      child.once('exit', (code) => finish(timedOut || code === null ? -1 : code));
    });
  }

  /** Freezes the container (the runtime's cgroup freezer; runsc stops the sandbox's tasks). */
  async pause(h: TaskHandle): Promise<void> {
    await this.afterCreate(h.id);
    const r = await this.rt(['pause', h.id]);
    if (r.code !== 0) throw new BerthError('failed_precondition', `could not pause ${h.id}: ${cleanRuncError(r.stderr || r.stdout)}`);
  }

  async resume(h: TaskHandle): Promise<void> {
    await this.afterCreate(h.id);
    const r = await this.rt(['resume', h.id]);
    if (r.code !== 0) throw new BerthError('failed_precondition', `could not resume ${h.id}: ${cleanRuncError(r.stderr || r.stdout)}`);
  }

  async inspect(h: TaskHandle): Promise<TaskStatus> {
    const exit = this.readExit(h.id);
    if (exit) return { state: 'exited', exit };
    if (this.monitorAlive(h)) return { state: 'running', pid: h.pid, monitorPid: h.monitorPid! };
    // The monitor is gone without writing an exit file (host reboot, someone killed conmon).
    const st = await this.runtimeState(h.id);
    if (st && (st.status === 'running' || st.status === 'paused') && pidAlive(st.pid)) return { state: 'running', pid: st.pid };
    // conmon may have written the exit file between our two checks.
    const late = this.readExit(h.id);
    if (late) return { state: 'exited', exit: late };
    return { state: 'missing' };
  }

  async recover(h: TaskHandle): Promise<TaskStatus> {
    // Recover a handle that may be partial (crash between start and persisting the handle).
    let handle = h;
    if (!h.monitorPid || !h.pid) {
      const dir = this.taskDir(h.id);
      const readPid = (f: string) => {
        try {
          return Number(readFileSync(join(dir, f), 'utf8').trim()) || undefined;
        } catch {
          return undefined;
        }
      };
      handle = { ...h, pid: readPid('ctr.pid') ?? 0, monitorPid: readPid('conmon.pid') ?? 0 };
    }
    this.ensureWatcher();
    const st = await this.inspect(handle);
    if (st.state === 'running') {
      // A container that was created but never started (crash between create and start) is not running.
      const rs = await this.runtimeState(h.id);
      if (rs && rs.status === 'created') return { state: 'missing' };
    }
    return st;
  }

  async wait(h: TaskHandle, signal?: AbortSignal): Promise<ExitResult> {
    this.ensureWatcher();
    for (;;) {
      const st = await this.inspect(h);
      if (st.state === 'exited') return st.exit!;
      if (st.state === 'missing') return { exitCode: -1, oomKilled: false, finishedAt: new Date().toISOString() };
      await new Promise<void>((resolve, reject) => {
        const off = () => {
          clearTimeout(t);
          this.exits.off('exit', onExit);
          signal?.removeEventListener('abort', onAbort);
        };
        const onExit = (id: string) => {
          if (id === h.id) {
            off();
            resolve();
          }
        };
        const onAbort = () => {
          off();
          reject(signal!.reason ?? new Error('aborted'));
        };
        // The watcher is the fast path; the timer covers a missed inotify event.
        const t = setTimeout(() => {
          off();
          resolve();
        }, 1000);
        this.exits.on('exit', onExit);
        signal?.addEventListener('abort', onAbort, { once: true });
        if (signal?.aborted) onAbort();
      });
    }
  }

  async stop(h: TaskHandle, opts: StopOptions): Promise<ExitResult> {
    const sig = opts.signal ?? 'SIGTERM';
    if (!(sig in SIGNALS)) throw invalidArgument(`unknown signal ${sig}; use a name such as SIGTERM or SIGINT`);
    await this.afterCreate(h.id);
    const st = await this.inspect(h);
    if (st.state === 'exited') return st.exit!;
    if (st.state === 'missing') return { exitCode: -1, oomKilled: false, finishedAt: new Date().toISOString() };
    await this.rt(['kill', h.id, sig], 10_000);
    const ac = new AbortController();
    const timer = setTimeout(() => ac.abort(new Error('grace period over')), Math.max(0, opts.timeoutMs));
    try {
      return await this.wait(h, ac.signal);
    } catch {
      // Grace period over: SIGKILL. The task's init is PID 1 of its PID namespace, so killing it ends every process in it.
      await this.rt(['kill', h.id, 'SIGKILL'], 10_000);
      const ac2 = new AbortController();
      const t2 = setTimeout(() => ac2.abort(new Error('container did not die after SIGKILL')), 15_000);
      try {
        return await this.wait(h, ac2.signal);
      } finally {
        clearTimeout(t2);
      }
    } finally {
      clearTimeout(timer);
    }
  }

  async destroy(id: string, opts: { force?: boolean; keepData?: boolean } = {}): Promise<void> {
    this.stopConnecting.get(id)?.abort();
    this.starting.delete(id);
    this.agents.drop(id);
    await this.afterCreate(id);
    const dir = this.taskDir(id);
    // Nothing of this task on this driver: done, without running the runtime at all.
    if (!existsSync(dir) && !existsSync(join(this.exitsDir, id)) && !this.hasRuntimeState(id)) return this.opts.network?.detach(id, this.name);
    const conmonPid = (() => {
      try {
        return Number(readFileSync(join(dir, 'conmon.pid'), 'utf8').trim()) || undefined;
      } catch {
        return undefined;
      }
    })();
    // Kill whatever still runs, then let conmon record the exit and leave. Each runtime call is a
    // fork of berthd plus a Go process start that blocks the event loop (and, right after a quick
    // workload exits, delays its first output on the way to a follower), so `state` is skipped
    // when it cannot tell anything: no runtime state at all, or an exit that conmon recorded
    // (init is gone, so nothing of the task runs; `delete --force` removes what is left).
    const st = !this.hasRuntimeState(id)
      ? undefined
      : existsSync(join(this.exitsDir, id))
        ? { status: 'stopped', pid: 0 }
        : await this.runtimeState(id);
    if (st) {
      if (st.status === 'running' || st.status === 'created' || st.status === 'paused') {
        await this.rt(['kill', id, 'SIGKILL'], 10_000);
      }
      // Not deleted (the runtime failed or ran out of time on a loaded host): the task is not gone,
      // so its owner must keep it and call again (the reconcilers retry), not forget it.
      const del = await this.rt(['delete', '--force', id]);
      if (del.code !== 0 && this.hasRuntimeState(id)) {
        throw new BerthError('unavailable', `${basename(this.runtime)} delete ${id} failed (exit ${del.code}${del.stderr.trim() ? `: ${del.stderr.trim().slice(-300)}` : ''}); it is retried`);
      }
    }
    if (conmonPid && pidAlive(conmonPid)) {
      for (let i = 0; i < 100 && pidAlive(conmonPid) && this.isMonitorFor(conmonPid, id); i++) await sleep(20);
      if (pidAlive(conmonPid) && this.isMonitorFor(conmonPid, id)) process.kill(conmonPid, 'SIGKILL');
    }
    await this.releaseRootfs(dir);
    await unmountDisk(join(dir, 'disk'));
    // A create that failed half-way can leave the task's cgroups without runtime state to find them by.
    for (const cg of this.cgroupDirs(id)) {
      try {
        rmdirSync(cg);
      } catch {
        /* absent */
      }
    }
    rmSync(join(this.exitsDir, id), { force: true });
    // A task's network lives as long as one run of it (gVisor takes the address off eth0 for its own stack).
    await this.opts.network?.detach(id, this.name);
    if (opts.keepData) {
      for (const f of ['bundle', 'persist', 'ctr.pid', 'conmon.pid', 'attach', 'ctl', 'winsz']) rmSync(join(dir, f), { recursive: true, force: true });
      // conmon leaves its attach socket and control fifos in the socket dir, named by the container uuid.
      rmSync(join(dir, id), { recursive: true, force: true });
    } else {
      rmSync(dir, { recursive: true, force: true });
    }
  }

  async listTasks(): Promise<string[]> {
    const ids = new Set<string>();
    try {
      for (const d of readdirSync(this.tasksDir)) ids.add(d);
    } catch {
      /* none */
    }
    const r = await this.rt(['list', '-q'], 10_000);
    if (r.code === 0) for (const l of r.stdout.split('\n')) if (l.trim()) ids.add(l.trim());
    for (const id of this.opts.network?.tasksOf(this.name) ?? []) ids.add(id);
    return [...ids];
  }

  /** CPU/memory usage from the task's cgroup (cgroup v1 or v2). */
  async stats(id: string): Promise<{ cpuUsageNs?: number; memoryBytes?: number; pids?: number }> {
    const rel = `${this.cgroupParent}/${id}`;
    const read = async (p: string) => {
      try {
        return Number((await readFile(p, 'utf8')).trim().split('\n')[0]!.split(' ').pop());
      } catch {
        return undefined;
      }
    };
    if (existsSync('/sys/fs/cgroup/cgroup.controllers')) {
      const usage = await readFile(`/sys/fs/cgroup/${rel}/cpu.stat`, 'utf8').catch(() => '');
      const u = /usage_usec (\d+)/.exec(usage)?.[1];
      const out: { cpuUsageNs?: number; memoryBytes?: number; pids?: number } = {};
      if (u) out.cpuUsageNs = Number(u) * 1000;
      const m = await read(`/sys/fs/cgroup/${rel}/memory.current`);
      if (m !== undefined) out.memoryBytes = m;
      const p = await read(`/sys/fs/cgroup/${rel}/pids.current`);
      if (p !== undefined) out.pids = p;
      return out;
    }
    const out: { cpuUsageNs?: number; memoryBytes?: number; pids?: number } = {};
    const c = await read(`/sys/fs/cgroup/cpuacct/${rel}/cpuacct.usage`);
    if (c !== undefined) out.cpuUsageNs = c;
    const m = await read(`/sys/fs/cgroup/memory/${rel}/memory.usage_in_bytes`);
    if (m !== undefined) out.memoryBytes = m;
    const p = await read(`/sys/fs/cgroup/pids/${rel}/pids.current`);
    if (p !== undefined) out.pids = p;
    return out;
  }

  /** Absolute cgroup directories of a task in every hierarchy (v1 controllers, hybrid "unified", or v2). */
  cgroupDirs(id: string): string[] {
    return cgroupHierarchies().map((h) => join(h, this.cgroupParent, id));
  }

  /** Remove the (empty) parent cgroups; called when berthd stops. Non-empty ones stay. */
  removeCgroupParent(): void {
    for (const h of cgroupHierarchies()) {
      try {
        rmdirSync(join(h, this.cgroupParent));
      } catch {
        /* absent, or tasks still run in it */
      }
    }
  }
}

/** Puts the container into its prepared network namespace, with Berth's resolv.conf and hosts. */
function joinNetwork(config: OciConfig, net: NetworkAttachment): void {
  config.linux.namespaces = config.linux.namespaces.map((n) => (n.type === 'network' ? { type: 'network', path: net.netns } : n));
  for (const [dest, src] of [['/etc/resolv.conf', net.resolvConf], ['/etc/hosts', net.hosts]] as const) {
    config.mounts.push({ destination: dest, type: 'bind', source: src, options: ['bind', 'ro', 'nosuid', 'nodev', 'noexec'] });
  }
}

/** Docker's default capability set. */
export const DEFAULT_CAPS = [
  'CAP_CHOWN', 'CAP_DAC_OVERRIDE', 'CAP_FSETID', 'CAP_FOWNER', 'CAP_MKNOD', 'CAP_NET_RAW', 'CAP_SETGID',
  'CAP_SETUID', 'CAP_SETFCAP', 'CAP_SETPCAP', 'CAP_NET_BIND_SERVICE', 'CAP_SYS_CHROOT', 'CAP_KILL', 'CAP_AUDIT_WRITE',
];

/** conmon, or the guest agent in monitor mode. */
function isMonitorCmdline(cmd: string): boolean {
  return cmd.includes('conmon') || cmd.includes('\0monitor\0');
}

export function cleanRuncError(s: string): string {
  // runc prints logfmt-ish lines: time="..." level=error msg="..."
  const m = /msg="((?:[^"\\]|\\.)*)"/.exec(s);
  return (m ? m[1]!.replace(/\\"/g, '"') : s).trim().slice(0, 500);
}
