// Pure conversion of a Berth TaskConfig into an OCI runtime config (the bundle's config.json).
//
// The result deliberately matches what Docker gives a default container: the same capability
// set, mounts, masked/read-only /proc and /sys paths, device allow-list, and fresh pid, network
// (loopback only), ipc, uts and mount namespaces, no user namespace. buildOciConfig is pure: the
// seccomp profile is loaded by the caller (see seccomp.ts) and passed in, and the only helper
// that reads the host (hostNofileLimit) is separate and called by the driver.

import { readFileSync } from 'node:fs';
import path from 'node:path';
import type { TaskConfig } from '../../core/driver.js';
import { invalidArgument } from '../../core/errors.js';

export const DEFAULT_PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';

/** Docker's default capability set (moby oci/caps/defaults.go). */
export const DEFAULT_CAPABILITIES: readonly string[] = Object.freeze([
  'CAP_CHOWN',
  'CAP_DAC_OVERRIDE',
  'CAP_FSETID',
  'CAP_FOWNER',
  'CAP_MKNOD',
  'CAP_NET_RAW',
  'CAP_SETGID',
  'CAP_SETUID',
  'CAP_SETFCAP',
  'CAP_SETPCAP',
  'CAP_NET_BIND_SERVICE',
  'CAP_SYS_CHROOT',
  'CAP_KILL',
  'CAP_AUDIT_WRITE',
]);

/** Docker's default masked paths (bind-mounted over with /dev/null or an empty read-only tmpfs). */
export const DEFAULT_MASKED_PATHS: readonly string[] = Object.freeze([
  '/proc/asound',
  '/proc/acpi',
  '/proc/kcore',
  '/proc/keys',
  '/proc/latency_stats',
  '/proc/timer_list',
  '/proc/timer_stats',
  '/proc/sched_debug',
  '/proc/scsi',
  '/sys/firmware',
  '/sys/devices/virtual/powercap',
]);

/** Docker's default read-only paths. */
export const DEFAULT_READONLY_PATHS: readonly string[] = Object.freeze([
  '/proc/bus',
  '/proc/fs',
  '/proc/irq',
  '/proc/sys',
  '/proc/sysrq-trigger',
]);

const MIB = 1024 * 1024;
const CPU_PERIOD_US = 100_000;
const MAX_ID = 4294967294; // (uint32)-1 is "no id" to the kernel
const ID_RE = /^[a-z0-9][a-z0-9-]{0,62}$/;
const ENV_KEY_RE = /^[A-Za-z_][A-Za-z0-9_]*$/;
const HOSTNAME_RE = /^[A-Za-z0-9]([A-Za-z0-9.-]{0,61}[A-Za-z0-9])?$/;

/** Docker's RLIMIT_NOFILE (soft = hard) for containers. */
export const DEFAULT_NOFILE_LIMIT = 1048576;

export const MIN_CPU_MILLIS = 10;
/** runc refuses memory limits much below this (the runtime itself needs a few MiB). */
export const MIN_MEMORY_MIB = 6;

export interface OciBuildOptions {
  /** Root file system directory of the container (absolute, or relative to the bundle). */
  rootfsPath: string;
  /** linux.cgroupsPath handed to runc (e.g. "berth/<id>"). */
  cgroupsPath: string;
  readonlyRootfs?: boolean;
  /** The OCI linux.seccomp object (see loadDefaultSeccomp); null/undefined: no seccomp filter. */
  seccomp?: object | null;
  /** Set when the host's memory cgroup accounts swap (memory.memsw.* on v1, memory.swap.max on v2). */
  swapLimitSupported?: boolean;
  /**
   * RLIMIT_NOFILE (soft and hard) of the task; default DEFAULT_NOFILE_LIMIT. runc cannot raise the
   * hard limit above its own without CAP_SYS_RESOURCE: pass hostNofileLimit() on such hosts.
   */
  nofileLimit?: number;
  /**
   * Writable layer as an overlay mounted by the runtime itself, inside the container's own mount
   * namespace: root.path is the read-only image and an overlay (lowerdir = image) is mounted over
   * "/" before every other mount. Nothing is mounted on the host, so nothing can leak there, and
   * no `mount` process is spawned per start.
   */
  rootOverlay?: { upperDir: string; workDir: string };
  /** Mounts after the default ones (e.g. a sandbox's agent binary and socket folder). */
  extraMounts?: OciMount[];
}

export interface OciUser {
  uid: number;
  gid: number;
  additionalGids?: number[];
}

export interface OciCapabilities {
  bounding: string[];
  effective: string[];
  permitted: string[];
  inheritable?: string[];
  ambient?: string[];
}

export interface OciRlimit {
  type: string;
  hard: number;
  soft: number;
}

export interface OciProcess {
  terminal: boolean;
  user: OciUser;
  args: string[];
  env: string[];
  cwd: string;
  capabilities: OciCapabilities;
  rlimits: OciRlimit[];
  noNewPrivileges: boolean;
}

export interface OciMount {
  destination: string;
  type: string;
  source: string;
  options?: string[];
}

export interface OciNamespace {
  type: 'pid' | 'network' | 'ipc' | 'uts' | 'mount' | 'user' | 'cgroup';
  path?: string;
}

export interface OciDeviceRule {
  allow: boolean;
  type?: 'a' | 'c' | 'b';
  major?: number;
  minor?: number;
  access?: string;
}

export interface OciResources {
  devices: OciDeviceRule[];
  memory?: { limit: number; swap?: number };
  cpu?: { shares?: number; quota?: number; period?: number };
  pids?: { limit: number };
}

export interface OciLinux {
  namespaces: OciNamespace[];
  maskedPaths: string[];
  readonlyPaths: string[];
  resources: OciResources;
  cgroupsPath: string;
  seccomp?: Record<string, unknown>;
}

export interface OciConfig {
  ociVersion: string;
  process: OciProcess;
  root: { path: string; readonly: boolean };
  hostname: string;
  mounts: OciMount[];
  linux: OciLinux;
  annotations?: Record<string, string>;
}

function hasNul(s: string): boolean {
  return s.includes('\0');
}

function checkId(field: string, v: unknown): number {
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 0 || v > MAX_ID) {
    throw invalidArgument(`${field} must be an integer between 0 and ${MAX_ID}, got ${String(v)}; use a numeric uid/gid`, {
      field,
    });
  }
  return v;
}

function checkPositiveInt(field: string, v: number, min: number, hint: string): void {
  if (!Number.isSafeInteger(v) || v < min) {
    throw invalidArgument(`${field} must be an integer ≥ ${min}, got ${String(v)}; ${hint}`, { field });
  }
}

function validate(cfg: TaskConfig, opts: OciBuildOptions): void {
  if (typeof cfg.id !== 'string' || !ID_RE.test(cfg.id)) {
    throw invalidArgument(
      `task id ${JSON.stringify(cfg.id)} is invalid: use 1-63 characters of lowercase letters, digits and '-', starting with a letter or digit`,
      { field: 'id' },
    );
  }
  if (!Array.isArray(cfg.args) || cfg.args.length === 0 || cfg.args[0] === '') {
    throw invalidArgument('args must be a non-empty list whose first element is the program to run (e.g. ["sh", "-c", "..."])', {
      field: 'args',
    });
  }
  cfg.args.forEach((a, i) => {
    if (typeof a !== 'string' || hasNul(a)) {
      throw invalidArgument(`args[${i}] must be a string without NUL bytes; remove the NUL character`, { field: `args[${i}]` });
    }
  });
  if (typeof cfg.cwd !== 'string' || !path.posix.isAbsolute(cfg.cwd) || hasNul(cfg.cwd)) {
    throw invalidArgument(`cwd ${JSON.stringify(cfg.cwd)} must be an absolute path inside the container (e.g. "/")`, {
      field: 'cwd',
    });
  }
  for (const [k, v] of Object.entries(cfg.env ?? {})) {
    if (!ENV_KEY_RE.test(k)) {
      throw invalidArgument(
        `environment variable name ${JSON.stringify(k)} is invalid: use letters, digits and '_', not starting with a digit (no '=' or NUL)`,
        { field: `env.${k}` },
      );
    }
    if (typeof v !== 'string' || hasNul(v)) {
      throw invalidArgument(`environment variable ${k} must have a string value without NUL bytes; remove the NUL character`, {
        field: `env.${k}`,
      });
    }
  }
  if (cfg.user === null || typeof cfg.user !== 'object') {
    throw invalidArgument('user must be an object { uid, gid } with numeric ids (e.g. { uid: 1000, gid: 1000 })', { field: 'user' });
  }
  checkId('user.uid', cfg.user.uid);
  checkId('user.gid', cfg.user.gid);
  (cfg.user.additionalGids ?? []).forEach((g, i) => checkId(`user.additionalGids[${i}]`, g));
  if (cfg.hostname !== undefined && (typeof cfg.hostname !== 'string' || !HOSTNAME_RE.test(cfg.hostname))) {
    throw invalidArgument(
      `hostname ${JSON.stringify(cfg.hostname)} is invalid: use 1-63 letters, digits, '-' or '.', starting and ending with a letter or digit`,
      { field: 'hostname' },
    );
  }
  const r = cfg.resources ?? {};
  if (r.cpuMillis !== undefined) {
    checkPositiveInt('resources.cpuMillis', r.cpuMillis, MIN_CPU_MILLIS, `use at least ${MIN_CPU_MILLIS} millicores (0.01 CPU) or leave it unset for no CPU limit`);
  }
  if (r.memoryMiB !== undefined) {
    checkPositiveInt('resources.memoryMiB', r.memoryMiB, MIN_MEMORY_MIB, `runc needs at least ${MIN_MEMORY_MIB} MiB; raise the limit or leave it unset for no memory limit`);
    if (!Number.isSafeInteger(r.memoryMiB * MIB)) {
      throw invalidArgument(`resources.memoryMiB ${r.memoryMiB} is too large; use a realistic limit in MiB`, { field: 'resources.memoryMiB' });
    }
  }
  if (r.pids !== undefined) {
    checkPositiveInt('resources.pids', r.pids, 1, 'allow at least one process or leave it unset for no pids limit');
  }
  if (opts.nofileLimit !== undefined) {
    checkPositiveInt('nofileLimit', opts.nofileLimit, 1, 'pass hostNofileLimit() or leave it unset');
  }
  if (typeof opts.rootfsPath !== 'string' || opts.rootfsPath === '' || hasNul(opts.rootfsPath)) {
    throw invalidArgument('rootfsPath must be a non-empty path to the container root file system', { field: 'rootfsPath' });
  }
  if (typeof opts.cgroupsPath !== 'string' || opts.cgroupsPath === '' || hasNul(opts.cgroupsPath)) {
    throw invalidArgument('cgroupsPath must be a non-empty cgroup path such as "berth/<task id>"', { field: 'cgroupsPath' });
  }
}

function buildEnv(cfg: TaskConfig, hostname: string): string[] {
  const env = cfg.env ?? {};
  const out: string[] = [];
  if (!Object.hasOwn(env, 'PATH')) out.push(`PATH=${DEFAULT_PATH}`);
  if (!Object.hasOwn(env, 'HOSTNAME')) out.push(`HOSTNAME=${hostname}`);
  for (const [k, v] of Object.entries(env)) out.push(`${k}=${v}`);
  return out;
}

/** The /dev device cgroup rules runc's `runc spec` / Docker use: deny everything, allow the standard char devices. */
function defaultDeviceRules(): OciDeviceRule[] {
  const allowChar = (major: number, minor?: number): OciDeviceRule =>
    minor === undefined ? { allow: true, type: 'c', major, access: 'rwm' } : { allow: true, type: 'c', major, minor, access: 'rwm' };
  return [
    { allow: false, access: 'rwm' },
    allowChar(1, 3), // /dev/null
    allowChar(1, 5), // /dev/zero
    allowChar(1, 7), // /dev/full
    allowChar(5, 0), // /dev/tty
    allowChar(1, 9), // /dev/urandom
    allowChar(1, 8), // /dev/random
    allowChar(136), // /dev/pts/*
    allowChar(5, 2), // /dev/ptmx
    allowChar(5, 1), // /dev/console
  ];
}

function defaultMounts(): OciMount[] {
  return [
    { destination: '/proc', type: 'proc', source: 'proc', options: ['nosuid', 'noexec', 'nodev'] },
    { destination: '/dev', type: 'tmpfs', source: 'tmpfs', options: ['nosuid', 'strictatime', 'mode=755', 'size=65536k'] },
    {
      destination: '/dev/pts',
      type: 'devpts',
      source: 'devpts',
      options: ['nosuid', 'noexec', 'newinstance', 'ptmxmode=0666', 'mode=0620', 'gid=5'],
    },
    { destination: '/dev/shm', type: 'tmpfs', source: 'shm', options: ['nosuid', 'noexec', 'nodev', 'mode=1777', 'size=65536k'] },
    { destination: '/dev/mqueue', type: 'mqueue', source: 'mqueue', options: ['nosuid', 'noexec', 'nodev'] },
    { destination: '/sys', type: 'sysfs', source: 'sysfs', options: ['nosuid', 'noexec', 'nodev', 'ro'] },
    { destination: '/sys/fs/cgroup', type: 'cgroup', source: 'cgroup', options: ['nosuid', 'noexec', 'nodev', 'relatime', 'ro'] },
  ];
}

function buildResources(cfg: TaskConfig, opts: OciBuildOptions): OciResources {
  const r = cfg.resources ?? {};
  const res: OciResources = { devices: defaultDeviceRules() };
  if (r.memoryMiB !== undefined) {
    const limit = r.memoryMiB * MIB;
    // On cgroup v1 "swap" is the memory+swap limit: equal to the memory limit means no swap.
    res.memory = opts.swapLimitSupported ? { limit, swap: limit } : { limit };
  }
  if (r.cpuMillis !== undefined) {
    res.cpu = {
      shares: Math.max(2, Math.floor((r.cpuMillis * 1024) / 1000)),
      quota: r.cpuMillis * (CPU_PERIOD_US / 1000),
      period: CPU_PERIOD_US,
    };
  }
  if (r.pids !== undefined) res.pids = { limit: r.pids };
  return res;
}

/**
 * Build the OCI runtime config for a task. Pure: validates `cfg` (throws invalid_argument with a
 * hint on how to fix it) and returns a fresh object; touches no files.
 */
export function buildOciConfig(cfg: TaskConfig, opts: OciBuildOptions): OciConfig {
  validate(cfg, opts);
  const hostname = (cfg.hostname ?? cfg.id).slice(0, 63);
  const user: OciUser = { uid: cfg.user.uid, gid: cfg.user.gid };
  if (cfg.user.additionalGids && cfg.user.additionalGids.length > 0) user.additionalGids = [...cfg.user.additionalGids];
  const caps = [...DEFAULT_CAPABILITIES];
  const config: OciConfig = {
    ociVersion: '1.0.2',
    process: {
      terminal: false,
      user,
      args: [...cfg.args],
      env: buildEnv(cfg, hostname),
      cwd: cfg.cwd,
      // Like Docker (since 20.10.14, CVE-2022-24769): no inheritable or ambient capabilities, so a
      // non-root process loses them on exec and only file capabilities can grant any.
      capabilities: { bounding: [...caps], effective: [...caps], permitted: [...caps] },
      rlimits: [{ type: 'RLIMIT_NOFILE', hard: opts.nofileLimit ?? DEFAULT_NOFILE_LIMIT, soft: opts.nofileLimit ?? DEFAULT_NOFILE_LIMIT }],
      noNewPrivileges: true,
    },
    root: { path: opts.rootfsPath, readonly: opts.readonlyRootfs ?? false },
    hostname,
    mounts: opts.rootOverlay
      ? [
          {
            destination: '/',
            type: 'overlay',
            source: 'overlay',
            options: [`lowerdir=${opts.rootfsPath}`, `upperdir=${opts.rootOverlay.upperDir}`, `workdir=${opts.rootOverlay.workDir}`],
          },
          ...defaultMounts(),
          ...(opts.extraMounts ?? []),
        ]
      : [...defaultMounts(), ...(opts.extraMounts ?? [])],
    linux: {
      // A network namespace without a path: runc creates it and brings up only loopback.
      namespaces: [{ type: 'pid' }, { type: 'network' }, { type: 'ipc' }, { type: 'uts' }, { type: 'mount' }],
      maskedPaths: [...DEFAULT_MASKED_PATHS],
      readonlyPaths: [...DEFAULT_READONLY_PATHS],
      resources: buildResources(cfg, opts),
      cgroupsPath: opts.cgroupsPath,
    },
  };
  if (opts.seccomp !== undefined && opts.seccomp !== null) {
    config.linux.seccomp = opts.seccomp as Record<string, unknown>;
  }
  return config;
}

/**
 * The RLIMIT_NOFILE runc can actually give a task from this process: DEFAULT_NOFILE_LIMIT when we
 * hold CAP_SYS_RESOURCE (capped by fs.nr_open), else no more than our own hard limit, because
 * raising a hard limit needs that capability (runc would fail with "error setting rlimit type 7:
 * operation not permitted"). Unlike buildOciConfig this reads /proc; call it once at start-up.
 */
export function hostNofileLimit(procRoot = '/proc'): number {
  const CAP_SYS_RESOURCE = 24n;
  let limit = DEFAULT_NOFILE_LIMIT;
  try {
    const nrOpen = Number(readFileSync(`${procRoot}/sys/fs/nr_open`, 'utf8').trim());
    if (Number.isSafeInteger(nrOpen) && nrOpen > 0) limit = Math.min(limit, nrOpen);
  } catch {
    /* keep the default */
  }
  try {
    const capEff = /^CapEff:\s*([0-9a-fA-F]+)/m.exec(readFileSync(`${procRoot}/self/status`, 'utf8'))?.[1];
    if (capEff !== undefined && ((BigInt(`0x${capEff}`) >> CAP_SYS_RESOURCE) & 1n) === 1n) return limit;
    const hard = /^Max open files\s+\S+\s+(\S+)/m.exec(readFileSync(`${procRoot}/self/limits`, 'utf8'))?.[1];
    if (hard !== undefined && hard !== 'unlimited' && Number.isSafeInteger(Number(hard))) limit = Math.min(limit, Number(hard));
  } catch {
    /* keep the default */
  }
  return limit;
}
