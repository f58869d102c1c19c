// The default seccomp filter for runc tasks.
//
// We convert the profile installed at /usr/share/containers/seccomp.json instead of vendoring a
// copy: that file is the default profile of the containers project (Podman, CRI-O, Buildah),
// which keeps it in step with new kernels and syscalls, and Debian ships and updates it in the
// golang-github-containers-common package. Converting it at run time means Berth gets those
// updates (and security fixes) with the host's ordinary package upgrades.
//
// The installed file is in the Docker/containers "profile" format: rules carry includes/excludes
// conditions (capabilities, architectures, minimum kernel) that have to be resolved for the
// task's capability set and the host before runc can use them as the OCI `linux.seccomp` object.

import { readFileSync } from 'node:fs';
import os from 'node:os';
import { BerthError, invalidArgument } from '../../core/errors.js';

export const DEFAULT_SECCOMP_PROFILE = '/usr/share/containers/seccomp.json';

export interface ProfileArg {
  index: number;
  value: number;
  valueTwo?: number;
  op: string;
}

export interface ProfileFilter {
  caps?: string[] | null;
  arches?: string[] | null;
  minKernel?: string | null;
}

export interface ProfileSyscall {
  names?: string[] | null;
  /** Old single-name form. */
  name?: string;
  action: string;
  args?: ProfileArg[] | null;
  errnoRet?: number;
  errno?: string;
  comment?: string;
  includes?: ProfileFilter | null;
  excludes?: ProfileFilter | null;
}

export interface SeccompProfile {
  defaultAction: string;
  defaultErrnoRet?: number;
  defaultErrno?: string;
  archMap?: { architecture: string; subArchitectures?: string[] | null }[] | null;
  architectures?: string[] | null;
  syscalls?: ProfileSyscall[] | null;
}

export interface OciSeccompSyscall {
  names: string[];
  action: string;
  errnoRet?: number;
  args?: { index: number; value: number; valueTwo: number; op: string }[];
}

export interface OciSeccomp {
  defaultAction: string;
  defaultErrnoRet?: number;
  architectures: string[];
  syscalls: OciSeccompSyscall[];
}

/** Go GOARCH name -> libseccomp architecture (what the profile's archMap is keyed by). */
const GOARCH_TO_SCMP: Record<string, string> = {
  amd64: 'SCMP_ARCH_X86_64',
  '386': 'SCMP_ARCH_X86',
  x86: 'SCMP_ARCH_X86',
  x32: 'SCMP_ARCH_X32',
  arm64: 'SCMP_ARCH_AARCH64',
  arm: 'SCMP_ARCH_ARM',
  ppc64le: 'SCMP_ARCH_PPC64LE',
  ppc64: 'SCMP_ARCH_PPC64',
  s390x: 'SCMP_ARCH_S390X',
  s390: 'SCMP_ARCH_S390',
  riscv64: 'SCMP_ARCH_RISCV64',
  mips64: 'SCMP_ARCH_MIPS64',
  mips64le: 'SCMP_ARCH_MIPSEL64',
  mips: 'SCMP_ARCH_MIPS',
  mipsle: 'SCMP_ARCH_MIPSEL',
};

/** Node's process.arch -> Go's GOARCH (the names the profile's includes.arches use). */
const NODE_TO_GOARCH: Record<string, string> = {
  x64: 'amd64',
  ia32: '386',
  arm64: 'arm64',
  arm: 'arm',
  ppc64: 'ppc64le',
  s390x: 's390x',
  riscv64: 'riscv64',
  mips: 'mips',
  mipsel: 'mipsle',
};

const ERRNO_BY_NAME: Record<string, number> = { EPERM: 1, ENOENT: 2, EACCES: 13, EINVAL: 22, ENOSYS: 38 };

export function hostGoArch(): string {
  return NODE_TO_GOARCH[process.arch] ?? 'amd64';
}

function normaliseCap(c: string): string {
  const up = c.trim().toUpperCase();
  return up.startsWith('CAP_') ? up : `CAP_${up}`;
}

/** Parse "6.1.0-13-amd64" / "4.8" into [major, minor, patch]; undefined when it has no version. */
export function parseKernelVersion(s: string): [number, number, number] | undefined {
  const m = /^(\d+)\.(\d+)(?:\.(\d+))?/.exec(s.trim());
  if (!m) return undefined;
  return [Number(m[1]), Number(m[2]), Number(m[3] ?? 0)];
}

function kernelAtLeast(running: [number, number, number], min: [number, number, number]): boolean {
  for (let i = 0; i < 3; i++) {
    if (running[i]! !== min[i]!) return running[i]! > min[i]!;
  }
  return true;
}

function errnoOf(rule: { errnoRet?: number; errno?: string }): number | undefined {
  if (typeof rule.errnoRet === 'number') return rule.errnoRet;
  if (typeof rule.errno === 'string') return ERRNO_BY_NAME[rule.errno];
  return undefined;
}

/**
 * Resolve a Docker/containers seccomp profile into the OCI `linux.seccomp` object for a process
 * with capabilities `caps` (with or without the CAP_ prefix) on architecture `arch` (GOARCH name,
 * e.g. "amd64") and kernel `kernelRelease` (as os.release() reports it). Pure.
 */
export function convertSeccompProfile(profile: SeccompProfile, caps: readonly string[], arch: string, kernelRelease: string): OciSeccomp {
  if (profile === null || typeof profile !== 'object' || typeof profile.defaultAction !== 'string') {
    throw invalidArgument('seccomp profile has no defaultAction; pass a Docker/containers seccomp.json profile');
  }
  const capSet = new Set(caps.map(normaliseCap));
  const kernel = parseKernelVersion(kernelRelease);
  if (!kernel) {
    throw invalidArgument(`cannot parse kernel release ${JSON.stringify(kernelRelease)}; pass a version like "6.1.0-13-amd64"`);
  }

  // Architectures: the native one plus its sub-architectures (amd64 -> X86_64, X86, X32).
  const native = GOARCH_TO_SCMP[arch];
  if (!native) throw invalidArgument(`unsupported architecture ${JSON.stringify(arch)} for seccomp; use a Go arch name such as "amd64"`);
  let architectures: string[];
  const entry = (profile.archMap ?? []).find((a) => a.architecture === native);
  if (entry) architectures = [entry.architecture, ...(entry.subArchitectures ?? [])];
  else if (profile.architectures && profile.architectures.length > 0) architectures = [...profile.architectures];
  else architectures = [native];

  const syscalls: OciSeccompSyscall[] = [];
  for (const rule of profile.syscalls ?? []) {
    const names = rule.names && rule.names.length > 0 ? rule.names : rule.name ? [rule.name] : [];
    if (names.length === 0) continue;
    const inc = rule.includes ?? {};
    const exc = rule.excludes ?? {};
    if (inc.caps && inc.caps.length > 0 && !inc.caps.every((c) => capSet.has(normaliseCap(c)))) continue;
    if (inc.arches && inc.arches.length > 0 && !inc.arches.includes(arch)) continue;
    if (inc.minKernel) {
      const min = parseKernelVersion(inc.minKernel);
      if (!min) throw invalidArgument(`seccomp profile rule for ${names.join(',')} has an invalid minKernel ${JSON.stringify(inc.minKernel)}; fix the profile`);
      if (!kernelAtLeast(kernel, min)) continue;
    }
    if (exc.caps && exc.caps.some((c) => capSet.has(normaliseCap(c)))) continue;
    if (exc.arches && exc.arches.includes(arch)) continue;

    const out: OciSeccompSyscall = { names: [...names], action: rule.action };
    const errno = errnoOf(rule);
    if (errno !== undefined) out.errnoRet = errno;
    if (rule.args && rule.args.length > 0) {
      out.args = rule.args.map((a) => ({ index: a.index, value: a.value, valueTwo: a.valueTwo ?? 0, op: a.op }));
    }
    syscalls.push(out);
  }

  const result: OciSeccomp = { defaultAction: profile.defaultAction, architectures, syscalls };
  const defErrno = typeof profile.defaultErrnoRet === 'number' ? profile.defaultErrnoRet : profile.defaultErrno ? ERRNO_BY_NAME[profile.defaultErrno] : undefined;
  if (defErrno !== undefined) result.defaultErrnoRet = defErrno;
  return result;
}

function deepFreeze<T>(o: T): T {
  if (o !== null && typeof o === 'object' && !Object.isFrozen(o)) {
    Object.freeze(o);
    for (const v of Object.values(o as Record<string, unknown>)) deepFreeze(v);
  }
  return o;
}

const cache = new Map<string, OciSeccomp>();

/** Forget cached conversions (e.g. after the profile package was upgraded). */
export function clearSeccompCache(): void {
  cache.clear();
}

/**
 * Load the installed containers-common default profile and convert it for `capabilities`.
 * Cached per (profile path, arch, capability set); the returned object is deeply frozen, so
 * copy it before changing it.
 */
export function loadDefaultSeccomp(opts: { capabilities: readonly string[]; arch?: string; profilePath?: string }): OciSeccomp {
  const profilePath = opts.profilePath ?? DEFAULT_SECCOMP_PROFILE;
  const arch = opts.arch ?? hostGoArch();
  const capsKey = [...new Set(opts.capabilities.map(normaliseCap))].sort().join(',');
  const key = `${profilePath}\0${arch}\0${capsKey}`;
  const hit = cache.get(key);
  if (hit) return hit;

  let text: string;
  try {
    text = readFileSync(profilePath, 'utf8');
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') {
      throw new BerthError(
        'failed_precondition',
        `the seccomp profile ${profilePath} is missing; install the default one with \`apt-get install golang-github-containers-common\``,
      );
    }
    throw new BerthError('failed_precondition', `cannot read seccomp profile ${profilePath} (${code ?? String(e)}); check that the file exists and is readable`);
  }
  let profile: SeccompProfile;
  try {
    profile = JSON.parse(text) as SeccompProfile;
  } catch (e) {
    throw new BerthError(
      'failed_precondition',
      `seccomp profile ${profilePath} is not valid JSON (${(e as Error).message}); reinstall it with \`apt-get install --reinstall golang-github-containers-common\``,
    );
  }
  let converted: OciSeccomp;
  try {
    converted = convertSeccompProfile(profile, opts.capabilities, arch, os.release());
  } catch (e) {
    if (e instanceof BerthError) {
      throw new BerthError('failed_precondition', `cannot use seccomp profile ${profilePath}: ${e.message}`);
    }
    throw e;
  }
  const result = deepFreeze(converted);
  cache.set(key, result);
  return result;
}
