// The runtime-driver contract: one interface for every isolation tier (runc, gVisor, microVM).
// Modelled on Nomad's task drivers: start, wait, stop(timeout, signal), destroy, inspect,
// recover after a daemon restart, fingerprint, and a capabilities object.
//
// A driver never keeps a Node.js process (or any in-daemon state that matters) per task:
// everything needed to adopt a task after `kill -9` of the daemon lives in the TaskHandle
// (persisted by the caller in the store) and in the task's state directory on disk.

export type Isolation = 'container' | 'gvisor' | 'microvm';

export interface DriverCapabilities {
  /** Tier this driver provides. */
  isolation: Isolation;
  /** Resource limits the driver enforces. */
  limits: { cpu: boolean; memory: boolean; pids: boolean };
  /** Reports OOM kills as such (not just exit 137). */
  oomDetection: boolean;
  /** Tasks survive a daemon restart and are adopted by recover(). */
  survivesDaemonRestart: boolean;
  /** Signals can be delivered to the task's main process. */
  signals: boolean;
  /** Whether the task runs on the host kernel. */
  sharesHostKernel: boolean;
  /** Smallest memory limit the tier can run in (its own kernel or sandbox lives inside it). */
  minMemoryMiB?: number;
}

export interface Fingerprint {
  driver: string;
  isolation: Isolation;
  /** Installed and usable on this host. */
  healthy: boolean;
  /** Human-readable reason when not healthy, or details of the choice made (e.g. platform). */
  reason: string;
  version?: string;
  attributes: Record<string, string>;
}

export interface TaskUser {
  uid: number;
  gid: number;
  additionalGids?: number[];
}

export interface TaskResources {
  /** CPU limit in millicores (1000 = one core). */
  cpuMillis?: number;
  memoryMiB?: number;
  pids?: number;
  /** Size limit of the writable layer in MiB (its own file system: a full disk fails writes with ENOSPC). */
  diskMiB?: number;
}

/** Where a task may open connections to (enforced on the host, outside the task). */
export type EgressPolicy =
  | { policy: 'allow-all' }
  | { policy: 'deny-all' }
  | { policy: 'allowlist'; allow: EgressRule[] };

export interface EgressRule {
  /** Destination block, e.g. "198.18.0.0/24" or "198.18.0.7". */
  cidr: string;
  /** Destination ports; every port when absent. */
  ports?: number[];
  /** Default "any": tcp and udp when ports are given, every protocol otherwise. */
  protocol?: 'tcp' | 'udp' | 'any';
}

/** A task on its project's network (src/network): own namespace, address, DNS name, egress policy. */
export interface TaskNetwork {
  project: string;
  egress: EgressPolicy;
  /** Names under `<project>.internal` that resolve to the task while it runs. */
  dnsNames: string[];
}

/** Everything a driver needs to start a task. Produced from a workload spec by the reconciler. */
export interface TaskConfig {
  /** Unique id of the task on this host; becomes the runtime's container id. [a-z0-9-], ≤ 64 chars. */
  id: string;
  /** Read-only root filesystem of the image (a directory). */
  imageRootfs: string;
  /** Content digest of the image, when known: drivers may cache per-image artefacts by it. */
  imageDigest?: string;
  args: string[];
  env: Record<string, string>;
  cwd: string;
  user: TaskUser;
  resources: TaskResources;
  hostname?: string;
  labels?: Record<string, string>;
  /**
   * A sandbox: instead of `args`, the task runs Berth's guest agent, which the host drives through
   * RuntimeDriver.agent() (commands, files); it runs until stopped.
   */
  sandbox?: boolean;
  /** Start from a snapshot taken by the same driver's snapshot() (a folder), instead of booting. */
  restoreFrom?: string;
  /**
   * Start with the lowest CPU priority (a warm-pool member): it boots on CPU time that nothing else
   * wants, until setBackground(id, false). Drivers without setBackground ignore it.
   */
  background?: boolean;
  /** On its project's network; absent: loopback only. */
  network?: TaskNetwork;
}

/** Persisted by the caller; enough to find and adopt the task after a daemon restart. */
export interface TaskHandle {
  driver: string;
  id: string;
  /** PID of the task's main process on the host. */
  pid: number;
  /** PID of the per-task monitor (conmon for runc), if any. */
  monitorPid?: number;
  startedAt: string;
  /** The task's address on its project network (TaskConfig.network). */
  network?: { ip: string };
  /** Driver-private data. */
  state?: Record<string, unknown>;
}

export interface ExitResult {
  exitCode: number;
  /** Signal name when the process died from a signal (exitCode is then 128+n). */
  signal?: string;
  oomKilled: boolean;
  finishedAt: string;
}

export type TaskState = 'running' | 'exited' | 'missing';

export interface TaskStatus {
  state: TaskState;
  pid?: number;
  monitorPid?: number;
  exit?: ExitResult;
}

export interface StopOptions {
  /** Grace period before SIGKILL. */
  timeoutMs: number;
  /** First signal to send; default SIGTERM. */
  signal?: string;
}

/** A frame of the guest agent protocol (agent/PROTOCOL.md). */
export interface AgentFrame {
  id: string;
  type: string;
  [k: string]: unknown;
}

/** A connection to a task's guest agent: requests with ids, streamed events, one terminal frame each. */
export interface AgentChannel {
  readonly closed: boolean;
  request(req: Record<string, unknown>, timeoutMs: number, signal?: AbortSignal, onEvent?: (f: AgentFrame) => void | Promise<void>): Promise<AgentFrame>;
}

/** What a command run inside a task (RuntimeDriver.exec) ended with. */
export interface TaskExecResult {
  /** Exit code; -1 when it did not finish within the time limit (or could not be run). */
  exitCode: number;
  /** The first 4 KiB of its stdout and stderr. */
  output: string;
}

export interface RuntimeDriver {
  readonly name: string;
  readonly capabilities: DriverCapabilities;
  fingerprint(): Promise<Fingerprint>;
  /** Prepare and start the task; resolves once the task's process runs. Cleans up after itself on failure. */
  start(config: TaskConfig): Promise<TaskHandle>;
  /** Resolves when the task exits (immediately if it already has). */
  wait(handle: TaskHandle, signal?: AbortSignal): Promise<ExitResult>;
  /** Send `signal`, wait up to timeoutMs, then SIGKILL. Resolves once the task has exited. */
  stop(handle: TaskHandle, opts: StopOptions): Promise<ExitResult>;
  /**
   * Remove the task's host resources (runtime state, mounts, cgroups, monitor). Idempotent.
   * keepData keeps the writable layer and the log so the same id can be started again (a restart);
   * without it everything the task owned on the host is removed.
   */
  destroy(id: string, opts?: { force?: boolean; keepData?: boolean }): Promise<void>;
  inspect(handle: TaskHandle): Promise<TaskStatus>;
  /** After a daemon restart: re-attach to a task started by a previous daemon. */
  recover(handle: TaskHandle): Promise<TaskStatus>;
  /** Path of the task's log file (k8s-file format lines). */
  logPath(id: string): string;
  /** Ids of tasks this driver has state for on the host (for garbage collection after a crash). */
  listTasks(): Promise<string[]>;
  /** Calls `listener(id)` when a task started or recovered by this instance exits; returns an unsubscribe. */
  onExit(listener: (id: string) => void): () => void;
  /** Stops watching (tasks keep running). */
  close(): void;
  /** Removes the driver's (empty) parent cgroups; called when berthd stops. */
  removeCgroupParent(): void;
  /**
   * Sandbox tasks (TaskConfig.sandbox): the shared connection to the task's guest agent, which
   * runs commands and serves files inside it. Undefined for drivers that cannot run sandboxes.
   */
  agent?(id: string, timeoutMs?: number): Promise<AgentChannel>;
  /**
   * Freeze every process of the task, keeping its memory: it uses no CPU until resume(), which
   * continues exactly where it stopped. Undefined for drivers that cannot.
   */
  pause?(handle: TaskHandle): Promise<void>;
  /** Lowest CPU priority on or off (cgroup cpu.weight 1 / cpu.shares 2, or the default); synchronous and cheap. */
  setBackground?(id: string, background: boolean): void;
  resume?(handle: TaskHandle): Promise<void>;
  /**
   * Runs a command inside a running task, as the task's user namespace sees it (service health
   * checks of type exec). Undefined for drivers that cannot.
   */
  exec?(handle: TaskHandle, args: string[], timeoutMs: number): Promise<TaskExecResult>;
  /** Snapshot of a running task into a folder (memory, devices, writable layer); the task continues. */
  snapshot?(handle: TaskHandle, dest: string): Promise<{ ms: number; bytes: number }>;
}

export class DriverRegistry {
  private readonly drivers = new Map<Isolation, RuntimeDriver>();
  private readonly fingerprints = new Map<Isolation, Fingerprint>();
  register(d: RuntimeDriver): void {
    this.drivers.set(d.capabilities.isolation, d);
  }
  /** Fingerprint every driver (at daemon start); unhealthy drivers refuse new tasks. */
  async fingerprintAll(): Promise<Fingerprint[]> {
    const out: Fingerprint[] = [];
    for (const [iso, d] of this.drivers) {
      const fp = await d.fingerprint();
      this.fingerprints.set(iso, fp);
      out.push(fp);
    }
    return out;
  }
  fingerprintOf(isolation: Isolation): Fingerprint | undefined {
    return this.fingerprints.get(isolation);
  }
  get(isolation: Isolation): RuntimeDriver | undefined {
    return this.drivers.get(isolation);
  }
  byName(name: string): RuntimeDriver | undefined {
    for (const d of this.drivers.values()) if (d.name === name) return d;
    return undefined;
  }
  all(): RuntimeDriver[] {
    return [...this.drivers.values()];
  }
}
