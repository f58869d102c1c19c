import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, readFileSync, statSync } from 'node:fs';
import { mkdir, mkdtemp, rm, rmdir, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import type { TaskConfig } from '../../core/driver.js';
import { BerthError } from '../../core/errors.js';
import { computeRootfsDigest, ensureBusyboxImage } from '../../images/busybox.js';
import {
  buildOciConfig,
  DEFAULT_CAPABILITIES,
  DEFAULT_MASKED_PATHS,
  DEFAULT_PATH,
  DEFAULT_READONLY_PATHS,
  hostNofileLimit,
  type OciBuildOptions,
} from './ocispec.js';
import {
  convertSeccompProfile,
  DEFAULT_SECCOMP_PROFILE,
  loadDefaultSeccomp,
  type OciSeccomp,
  type SeccompProfile,
} from './seccomp.js';

function baseCfg(over: Partial<TaskConfig> = {}): TaskConfig {
  return {
    id: 'web-1',
    imageRootfs: '/var/lib/berth/images/busybox/rootfs',
    args: ['sh', '-c', 'echo hi'],
    env: { FOO: 'bar' },
    cwd: '/',
    user: { uid: 1000, gid: 1000 },
    resources: {},
    ...over,
  };
}

const OPTS: OciBuildOptions = { rootfsPath: '/bundle/rootfs', cgroupsPath: 'berth/web-1' };

function isInvalid(e: unknown): boolean {
  return e instanceof BerthError && e.code === 'invalid_argument';
}

// ---------------------------------------------------------------------------------------------
// buildOciConfig

test('buildOciConfig: Docker-like defaults', () => {
  const c = buildOciConfig(baseCfg(), OPTS);
  assert.equal(c.ociVersion, '1.0.2');
  assert.equal(c.process.terminal, false);
  assert.deepEqual(c.process.args, ['sh', '-c', 'echo hi']);
  assert.deepEqual(c.process.env, [`PATH=${DEFAULT_PATH}`, 'HOSTNAME=web-1', 'FOO=bar']);
  assert.equal(c.process.cwd, '/');
  assert.deepEqual(c.process.user, { uid: 1000, gid: 1000 });
  assert.equal(c.process.noNewPrivileges, true);
  assert.deepEqual(c.process.rlimits, [{ type: 'RLIMIT_NOFILE', hard: 1048576, soft: 1048576 }]);

  const caps = c.process.capabilities;
  assert.equal(caps.bounding.length, 14);
  for (const cap of ['CAP_CHOWN', 'CAP_DAC_OVERRIDE', 'CAP_FSETID', 'CAP_FOWNER', 'CAP_MKNOD', 'CAP_NET_RAW', 'CAP_SETGID', 'CAP_SETUID',
    'CAP_SETFCAP', 'CAP_SETPCAP', 'CAP_NET_BIND_SERVICE', 'CAP_SYS_CHROOT', 'CAP_KILL', 'CAP_AUDIT_WRITE']) {
    assert.ok(caps.bounding.includes(cap), cap);
  }
  assert.deepEqual(caps.effective, caps.bounding);
  assert.deepEqual(caps.permitted, caps.bounding);
  assert.equal(caps.inheritable, undefined);
  assert.equal(caps.ambient, undefined);
  assert.ok(!caps.bounding.includes('CAP_SYS_ADMIN'));

  assert.deepEqual(c.root, { path: '/bundle/rootfs', readonly: false });
  assert.equal(c.hostname, 'web-1');

  const byDest = new Map(c.mounts.map((m) => [m.destination, m]));
  assert.deepEqual([...byDest.keys()], ['/proc', '/dev', '/dev/pts', '/dev/shm', '/dev/mqueue', '/sys', '/sys/fs/cgroup']);
  assert.equal(byDest.get('/proc')?.type, 'proc');
  assert.deepEqual(byDest.get('/dev')?.options, ['nosuid', 'strictatime', 'mode=755', 'size=65536k']);
  assert.ok(byDest.get('/dev/pts')?.options?.includes('newinstance'));
  assert.ok(byDest.get('/dev/pts')?.options?.includes('gid=5'));
  assert.deepEqual(byDest.get('/dev/shm')?.options, ['nosuid', 'noexec', 'nodev', 'mode=1777', 'size=65536k']);
  assert.equal(byDest.get('/dev/mqueue')?.type, 'mqueue');
  assert.ok(byDest.get('/sys')?.options?.includes('ro'));
  assert.equal(byDest.get('/sys/fs/cgroup')?.type, 'cgroup');
  assert.ok(byDest.get('/sys/fs/cgroup')?.options?.includes('ro'));

  assert.deepEqual(
    c.linux.namespaces.map((n) => n.type),
    ['pid', 'network', 'ipc', 'uts', 'mount'],
  );
  assert.ok(c.linux.namespaces.every((n) => n.path === undefined));
  assert.deepEqual(c.linux.maskedPaths, [
    '/proc/asound', '/proc/acpi', '/proc/kcore', '/proc/keys', '/proc/latency_stats', '/proc/timer_list',
    '/proc/timer_stats', '/proc/sched_debug', '/proc/scsi', '/sys/firmware', '/sys/devices/virtual/powercap',
  ]);
  assert.deepEqual(c.linux.readonlyPaths, ['/proc/bus', '/proc/fs', '/proc/irq', '/proc/sys', '/proc/sysrq-trigger']);
  assert.equal(c.linux.cgroupsPath, 'berth/web-1');

  const dev = c.linux.resources.devices;
  assert.deepEqual(dev[0], { allow: false, access: 'rwm' });
  const allowed = dev.slice(1).map((d) => `${d.type} ${d.major}:${d.minor ?? '*'} ${d.access}`);
  assert.deepEqual(allowed.sort(), ['c 1:3 rwm', 'c 1:5 rwm', 'c 1:7 rwm', 'c 1:8 rwm', 'c 1:9 rwm', 'c 136:* rwm', 'c 5:0 rwm', 'c 5:1 rwm', 'c 5:2 rwm'].sort());
  assert.ok(dev.slice(1).every((d) => d.allow));
  assert.equal(c.linux.resources.memory, undefined);
  assert.equal(c.linux.resources.cpu, undefined);
  assert.equal(c.linux.resources.pids, undefined);
  assert.equal(c.linux.seccomp, undefined);
});

test('buildOciConfig: explicit env, hostname, groups, readonly root, seccomp, nofile', () => {
  const seccomp = { defaultAction: 'SCMP_ACT_ERRNO', syscalls: [] };
  const c = buildOciConfig(
    baseCfg({ env: { PATH: '/bin', HOSTNAME: 'x', EMPTY: '' }, hostname: 'my-host', user: { uid: 0, gid: 0, additionalGids: [10, 20] } }),
    { ...OPTS, readonlyRootfs: true, seccomp, nofileLimit: 4096 },
  );
  assert.deepEqual(c.process.env, ['PATH=/bin', 'HOSTNAME=x', 'EMPTY=']);
  assert.equal(c.hostname, 'my-host');
  assert.deepEqual(c.process.user, { uid: 0, gid: 0, additionalGids: [10, 20] });
  assert.equal(c.root.readonly, true);
  assert.equal(c.linux.seccomp, seccomp);
  assert.deepEqual(c.process.rlimits, [{ type: 'RLIMIT_NOFILE', hard: 4096, soft: 4096 }]);
  assert.equal(buildOciConfig(baseCfg(), { ...OPTS, seccomp: null }).linux.seccomp, undefined);
  // The default hostname is the id; ids are at most 63 characters, so always a valid hostname.
  const long = 'a'.repeat(63);
  assert.equal(buildOciConfig(baseCfg({ id: long }), OPTS).hostname, long);
});

test('buildOciConfig: resource limit math', () => {
  const c = buildOciConfig(baseCfg({ resources: { cpuMillis: 500, memoryMiB: 64, pids: 100 } }), OPTS);
  assert.deepEqual(c.linux.resources.cpu, { shares: 512, quota: 50000, period: 100000 });
  assert.deepEqual(c.linux.resources.memory, { limit: 67108864 });
  assert.deepEqual(c.linux.resources.pids, { limit: 100 });

  const s = buildOciConfig(baseCfg({ resources: { memoryMiB: 64 } }), { ...OPTS, swapLimitSupported: true });
  assert.deepEqual(s.linux.resources.memory, { limit: 67108864, swap: 67108864 });

  const two = buildOciConfig(baseCfg({ resources: { cpuMillis: 2000 } }), OPTS);
  assert.deepEqual(two.linux.resources.cpu, { shares: 2048, quota: 200000, period: 100000 });
  const min = buildOciConfig(baseCfg({ resources: { cpuMillis: 10, memoryMiB: 6, pids: 1 } }), OPTS);
  assert.deepEqual(min.linux.resources.cpu, { shares: 10, quota: 1000, period: 100000 });
  assert.deepEqual(min.linux.resources.memory, { limit: 6 * 1024 * 1024 });
  assert.deepEqual(min.linux.resources.pids, { limit: 1 });
});

test('buildOciConfig: pure (input untouched, same output each call, JSON round-trips)', () => {
  const cfg = baseCfg({ resources: { cpuMillis: 250, memoryMiB: 128 }, user: { uid: 1, gid: 2, additionalGids: [3] } });
  const before = structuredClone(cfg);
  const a = buildOciConfig(cfg, OPTS);
  const b = buildOciConfig(cfg, OPTS);
  assert.deepEqual(cfg, before);
  assert.deepEqual(a, b);
  assert.notEqual(a.process.args, cfg.args);
  assert.notEqual(a.process.user.additionalGids, cfg.user.additionalGids);
  assert.deepEqual(JSON.parse(JSON.stringify(a)), a);
});

test('buildOciConfig: rejects each invalid input with invalid_argument', () => {
  const bad: [string, TaskConfig, Partial<OciBuildOptions>?][] = [
    ['uppercase id', baseCfg({ id: 'Web' })],
    ['id starting with -', baseCfg({ id: '-web' })],
    ['id with _', baseCfg({ id: 'web_1' })],
    ['empty id', baseCfg({ id: '' })],
    ['64-char id', baseCfg({ id: 'a'.repeat(64) })],
    ['empty args', baseCfg({ args: [] })],
    ['empty program', baseCfg({ args: [''] })],
    ['NUL in arg', baseCfg({ args: ['sh', 'a\0b'] })],
    ['relative cwd', baseCfg({ cwd: 'app' })],
    ['empty cwd', baseCfg({ cwd: '' })],
    ['env key with =', baseCfg({ env: { 'A=B': 'x' } })],
    ['env key starting with digit', baseCfg({ env: { '1A': 'x' } })],
    ['empty env key', baseCfg({ env: { '': 'x' } })],
    ['env key with NUL', baseCfg({ env: { 'A\0': 'x' } })],
    ['env key with -', baseCfg({ env: { 'A-B': 'x' } })],
    ['env value with NUL', baseCfg({ env: { A: 'x\0y' } })],
    ['cpuMillis below 10', baseCfg({ resources: { cpuMillis: 9 } })],
    ['cpuMillis zero', baseCfg({ resources: { cpuMillis: 0 } })],
    ['fractional cpuMillis', baseCfg({ resources: { cpuMillis: 10.5 } })],
    ['memoryMiB below 6', baseCfg({ resources: { memoryMiB: 5 } })],
    ['negative memoryMiB', baseCfg({ resources: { memoryMiB: -64 } })],
    ['NaN memoryMiB', baseCfg({ resources: { memoryMiB: Number.NaN } })],
    ['pids zero', baseCfg({ resources: { pids: 0 } })],
    ['negative uid', baseCfg({ user: { uid: -1, gid: 0 } })],
    ['fractional gid', baseCfg({ user: { uid: 0, gid: 1.5 } })],
    ['uid 2^32-1', baseCfg({ user: { uid: 4294967295, gid: 0 } })],
    ['bad additional gid', baseCfg({ user: { uid: 0, gid: 0, additionalGids: [-2] } })],
    ['hostname with space', baseCfg({ hostname: 'my host' })],
    ['hostname too long', baseCfg({ hostname: 'h'.repeat(64) })],
    ['empty rootfsPath', baseCfg(), { rootfsPath: '' }],
    ['empty cgroupsPath', baseCfg(), { cgroupsPath: '' }],
    ['nofileLimit zero', baseCfg(), { nofileLimit: 0 }],
  ];
  for (const [what, cfg, opts] of bad) {
    assert.throws(() => buildOciConfig(cfg, { ...OPTS, ...opts }), (e: unknown) => {
      assert.ok(isInvalid(e), `${what}: expected invalid_argument, got ${String(e)}`);
      assert.ok((e as Error).message.length > 20, `${what}: message should explain the fix`);
      return true;
    }, what);
  }
});

test('hostNofileLimit: full limit with CAP_SYS_RESOURCE, own hard limit without', async () => {
  const dir = await mkdtemp(path.join(tmpdir(), 'berth-nofile-'));
  try {
    await mkdir(path.join(dir, 'self'));
    await mkdir(path.join(dir, 'sys/fs'), { recursive: true });
    await writeFile(path.join(dir, 'sys/fs/nr_open'), '1048576\n');
    const limits = 'Limit                     Soft Limit           Hard Limit           Units     \nMax open files            1024                 20000                files     \n';
    await writeFile(path.join(dir, 'self/limits'), limits);
    await writeFile(path.join(dir, 'self/status'), 'Name:\tnode\nCapEff:\t000001ffffffffff\n');
    assert.equal(hostNofileLimit(dir), 1048576);
    await writeFile(path.join(dir, 'self/status'), 'Name:\tnode\nCapEff:\t000001fffeffffff\n'); // no bit 24
    assert.equal(hostNofileLimit(dir), 20000);
    await writeFile(path.join(dir, 'self/status'), 'CapEff:\t000001ffffffffff\n');
    await writeFile(path.join(dir, 'sys/fs/nr_open'), '65536\n');
    assert.equal(hostNofileLimit(dir), 65536);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
  const real = hostNofileLimit();
  assert.ok(Number.isSafeInteger(real) && real > 0 && real <= 1048576);
});

// ---------------------------------------------------------------------------------------------
// seccomp

/** Actions of the argument-less rules that name `name` (what decides a plain call). */
function actionsFor(sc: OciSeccomp, name: string): string[] {
  return sc.syscalls.filter((r) => r.names.includes(name) && !r.args).map((r) => r.action);
}
function allowed(sc: OciSeccomp, name: string): boolean {
  const a = actionsFor(sc, name);
  return a.length > 0 && a.every((x) => x === 'SCMP_ACT_ALLOW');
}

const haveProfile = existsSync(DEFAULT_SECCOMP_PROFILE);

test('seccomp: installed containers-common profile, default capabilities', { skip: !haveProfile && `${DEFAULT_SECCOMP_PROFILE} missing` }, () => {
  const sc = loadDefaultSeccomp({ capabilities: [...DEFAULT_CAPABILITIES], arch: 'amd64' });
  assert.equal(sc.defaultAction, 'SCMP_ACT_ERRNO');
  assert.equal(sc.defaultErrnoRet, 38);
  assert.deepEqual(sc.architectures, ['SCMP_ARCH_X86_64', 'SCMP_ARCH_X86', 'SCMP_ARCH_X32']);
  for (const n of ['read', 'write', 'execve', 'exit_group', 'arch_prctl']) assert.ok(allowed(sc, n), `${n} should be allowed`);
  // Need capabilities the default set lacks: CAP_SYS_ADMIN, CAP_SYS_MODULE, CAP_SYS_BOOT, CAP_DAC_READ_SEARCH, ...
  for (const n of ['bpf', 'perf_event_open', 'init_module', 'delete_module', 'kexec_load', 'open_by_handle_at', 'acct', 'iopl', 'settimeofday']) {
    assert.ok(!allowed(sc, n), `${n} must not be allowed with the default capabilities`);
  }
  // Not listed at all: falls through to defaultAction (ENOSYS).
  assert.deepEqual(actionsFor(sc, 'kexec_load'), ['SCMP_ACT_ERRNO']);
  assert.equal(actionsFor(sc, 'create_module').length, 0);
  // CAP_SYS_CHROOT is in the default set.
  assert.ok(allowed(sc, 'chroot'));
  // Rules for other architectures are dropped.
  assert.equal(actionsFor(sc, 'arm_fadvise64_64').length, 0);
  assert.equal(actionsFor(sc, 's390_runtime_instr').length, 0);
  // Argument rules are copied with index/value/valueTwo/op.
  const personality = sc.syscalls.filter((r) => r.names.includes('personality') && r.args);
  assert.ok(personality.length >= 1);
  for (const r of personality) for (const a of r.args!) assert.deepEqual(Object.keys(a).sort(), ['index', 'op', 'value', 'valueTwo']);
  // Errno rules keep their errno.
  assert.ok(sc.syscalls.some((r) => r.action === 'SCMP_ACT_ERRNO' && r.errnoRet === 1));
});

test('seccomp: CAP_SYS_ADMIN / CAP_SYS_MODULE add rules; caps with or without CAP_ prefix; cached and frozen', { skip: !haveProfile && `${DEFAULT_SECCOMP_PROFILE} missing` }, () => {
  const def = loadDefaultSeccomp({ capabilities: [...DEFAULT_CAPABILITIES], arch: 'amd64' });
  const admin = loadDefaultSeccomp({ capabilities: [...DEFAULT_CAPABILITIES, 'CAP_SYS_ADMIN', 'CAP_SYS_MODULE'], arch: 'amd64' });
  const count = (sc: OciSeccomp) => sc.syscalls.filter((r) => r.action === 'SCMP_ACT_ALLOW').reduce((n, r) => n + r.names.length, 0);
  assert.ok(count(admin) > count(def));
  for (const n of ['bpf', 'perf_event_open', 'sethostname', 'mount', 'umount2', 'init_module', 'finit_module']) {
    assert.ok(allowed(admin, n), `${n} should be allowed with CAP_SYS_ADMIN + CAP_SYS_MODULE`);
  }
  assert.ok(!allowed(def, 'bpf'));

  const noPrefix = loadDefaultSeccomp({ capabilities: [...DEFAULT_CAPABILITIES.map((c) => c.replace(/^CAP_/, '').toLowerCase()), 'sys_admin', 'SYS_MODULE'], arch: 'amd64' });
  assert.deepEqual(noPrefix, admin);
  // Cached per capability set, regardless of order/prefix; frozen so callers cannot corrupt the cache.
  assert.equal(loadDefaultSeccomp({ capabilities: [...DEFAULT_CAPABILITIES].reverse(), arch: 'amd64' }), def);
  assert.ok(Object.isFrozen(def) && Object.isFrozen(def.syscalls) && Object.isFrozen(def.syscalls[0]));

  const arm = loadDefaultSeccomp({ capabilities: [...DEFAULT_CAPABILITIES], arch: 'arm64' });
  assert.deepEqual(arm.architectures, ['SCMP_ARCH_AARCH64', 'SCMP_ARCH_ARM']);
  assert.ok(allowed(arm, 'arm_fadvise64_64'));
  assert.equal(actionsFor(arm, 'arch_prctl').length, 0);
});

test('seccomp: missing profile is failed_precondition with the apt-get hint', () => {
  assert.throws(
    () => loadDefaultSeccomp({ capabilities: [], profilePath: '/nonexistent/berth/seccomp.json' }),
    (e: unknown) => e instanceof BerthError && e.code === 'failed_precondition' && /apt-get install golang-github-containers-common/.test(e.message),
  );
});

test('convertSeccompProfile: includes/excludes on caps, arches and minKernel', () => {
  const profile: SeccompProfile = {
    defaultAction: 'SCMP_ACT_ERRNO',
    defaultErrnoRet: 38,
    archMap: [{ architecture: 'SCMP_ARCH_X86_64', subArchitectures: ['SCMP_ARCH_X86', 'SCMP_ARCH_X32'] }],
    syscalls: [
      { names: ['read', 'write'], action: 'SCMP_ACT_ALLOW', args: [], includes: {}, excludes: {} },
      { names: ['ptrace'], action: 'SCMP_ACT_ALLOW', includes: { minKernel: '4.8' } },
      { names: ['reboot'], action: 'SCMP_ACT_ALLOW', includes: { caps: ['CAP_SYS_BOOT'] } },
      { names: ['mount'], action: 'SCMP_ACT_ALLOW', includes: { caps: ['CAP_SYS_ADMIN', 'CAP_SYS_CHROOT'] } },
      { names: ['bpf'], action: 'SCMP_ACT_ERRNO', errnoRet: 1, excludes: { caps: ['CAP_SYS_ADMIN'] } },
      { names: ['arch_prctl'], action: 'SCMP_ACT_ALLOW', includes: { arches: ['amd64', 'x32'] } },
      { names: ['only_not_amd64'], action: 'SCMP_ACT_ALLOW', excludes: { arches: ['amd64'] } },
      { name: 'legacy', action: 'SCMP_ACT_ALLOW' },
      { names: [], action: 'SCMP_ACT_ALLOW' },
      { names: ['personality'], action: 'SCMP_ACT_ALLOW', args: [{ index: 0, value: 8, op: 'SCMP_CMP_EQ' }] },
      { names: ['socket'], action: 'SCMP_ACT_ERRNO', errno: 'EINVAL' },
    ],
  };
  const plain = convertSeccompProfile(profile, ['CHOWN'], 'amd64', '6.1.0-13-amd64');
  assert.equal(plain.defaultAction, 'SCMP_ACT_ERRNO');
  assert.equal(plain.defaultErrnoRet, 38);
  assert.deepEqual(plain.architectures, ['SCMP_ARCH_X86_64', 'SCMP_ARCH_X86', 'SCMP_ARCH_X32']);
  const names = plain.syscalls.flatMap((r) => r.names);
  assert.deepEqual(names, ['read', 'write', 'ptrace', 'bpf', 'arch_prctl', 'legacy', 'personality', 'socket']);
  assert.deepEqual(plain.syscalls[0], { names: ['read', 'write'], action: 'SCMP_ACT_ALLOW' });
  assert.deepEqual(plain.syscalls.find((r) => r.names[0] === 'bpf'), { names: ['bpf'], action: 'SCMP_ACT_ERRNO', errnoRet: 1 });
  assert.deepEqual(plain.syscalls.find((r) => r.names[0] === 'personality')?.args, [{ index: 0, value: 8, valueTwo: 0, op: 'SCMP_CMP_EQ' }]);
  assert.equal(plain.syscalls.find((r) => r.names[0] === 'socket')?.errnoRet, 22);

  // Old kernel: the minKernel rule is skipped.
  const old = convertSeccompProfile(profile, [], 'amd64', '4.4.0-210-generic');
  assert.ok(!old.syscalls.some((r) => r.names.includes('ptrace')));
  assert.ok(convertSeccompProfile(profile, [], 'amd64', '4.8').syscalls.some((r) => r.names.includes('ptrace')));
  // Capabilities: every included cap is needed, any excluded cap drops the rule.
  const admin = convertSeccompProfile(profile, ['CAP_SYS_ADMIN'], 'amd64', '6.1');
  assert.ok(!admin.syscalls.some((r) => r.names.includes('mount')), 'mount needs SYS_ADMIN and SYS_CHROOT');
  assert.ok(!admin.syscalls.some((r) => r.names.includes('bpf')));
  const both = convertSeccompProfile(profile, ['sys_admin', 'SYS_CHROOT', 'CAP_SYS_BOOT'], 'amd64', '6.1');
  assert.ok(both.syscalls.some((r) => r.names.includes('mount')));
  assert.ok(both.syscalls.some((r) => r.names.includes('reboot')));
  // Architectures.
  const arm = convertSeccompProfile(profile, [], 'arm64', '6.1');
  assert.deepEqual(arm.architectures, ['SCMP_ARCH_AARCH64']);
  assert.ok(!arm.syscalls.some((r) => r.names.includes('arch_prctl')));
  assert.ok(arm.syscalls.some((r) => r.names.includes('only_not_amd64')));

  assert.throws(() => convertSeccompProfile(profile, [], 'amd64', 'garbage'), isInvalid);
  assert.throws(() => convertSeccompProfile(profile, [], 'vax', '6.1'), isInvalid);
  assert.throws(() => convertSeccompProfile({} as SeccompProfile, [], 'amd64', '6.1'), isInvalid);
});

// ---------------------------------------------------------------------------------------------
// Real runc end to end

interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

function runCmd(cmd: string, args: string[], timeoutMs = 60_000): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
  });
}

/** Host directory of each cgroup named in a /proc/<pid>/cgroup listing. */
function hostCgroupDirs(procCgroup: string): string[] {
  const mounts: { point: string; root: string; fstype: string; opts: Set<string> }[] = [];
  for (const line of readFileSync('/proc/self/mountinfo', 'utf8').split('\n')) {
    const [left, right] = line.split(' - ');
    if (!left || !right) continue;
    const f = left.split(' ');
    const [fstype, , superOpts] = right.split(' ');
    if (fstype !== 'cgroup' && fstype !== 'cgroup2') continue;
    mounts.push({ point: f[4]!, root: f[3]!, fstype, opts: new Set((superOpts ?? '').split(',')) });
  }
  const dirs: string[] = [];
  for (const line of procCgroup.split('\n')) {
    const m = /^(\d+):([^:]*):(\/.*)$/.exec(line.trim());
    if (!m) continue;
    const [, hid, ctrls, cg] = m as unknown as [string, string, string, string];
    const mount =
      hid === '0' && ctrls === ''
        ? mounts.find((x) => x.fstype === 'cgroup2')
        : mounts.find((x) => x.fstype === 'cgroup' && ctrls.split(',').every((c) => x.opts.has(c)));
    if (!mount) continue;
    const rel = mount.root === '/' ? cg : cg.startsWith(`${mount.root}/`) ? cg.slice(mount.root.length) : undefined;
    if (rel !== undefined) dirs.push(path.join(mount.point, rel));
  }
  return dirs;
}

const isRoot = process.getuid?.() === 0;
const haveRunc = spawnSync('runc', ['--version'], { stdio: 'ignore' }).status === 0;
const haveBusybox = existsSync('/bin/busybox');
const e2eSkip = !isRoot
  ? 'needs root'
  : !haveRunc
    ? 'runc not installed (apt-get install runc)'
    : !haveProfile
      ? `${DEFAULT_SECCOMP_PROFILE} missing`
      : !haveBusybox
        ? 'busybox-static not installed'
        : false;

test('runc end to end: busybox rootfs with the generated config.json and real seccomp profile', { skip: e2eSkip, timeout: 180_000 }, async (t) => {
  const tmp = await mkdtemp(path.join(tmpdir(), 'berth-ocispec-'));
  const runcRoot = path.join(tmp, 'runcroot');
  const ids: string[] = [];
  const cgroupDirs = new Set<string>();
  try {
    const img = await ensureBusyboxImage(path.join(tmp, 'images'));
    const seccomp = loadDefaultSeccomp({ capabilities: [...DEFAULT_CAPABILITIES] });
    const nofileLimit = hostNofileLimit();
    const swapLimitSupported = existsSync('/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes') || existsSync('/sys/fs/cgroup/memory.swap.max');

    const runContainer = async (script: string, user: { uid: number; gid: number }, resources: TaskConfig['resources'] = {}) => {
      const id = `bt-${process.pid}-${randomBytes(4).toString('hex')}`;
      ids.push(id);
      const bundle = path.join(tmp, 'bundles', id);
      await mkdir(bundle, { recursive: true });
      const config = buildOciConfig(
        { id, imageRootfs: img.rootfs, args: ['sh', '-c', script], env: {}, cwd: '/', user, resources },
        { rootfsPath: img.rootfs, readonlyRootfs: true, cgroupsPath: `berth-test/${id}`, seccomp, nofileLimit, swapLimitSupported },
      );
      await writeFile(path.join(bundle, 'config.json'), JSON.stringify(config, null, 2));
      const res = await runCmd('runc', ['--root', runcRoot, 'run', '--bundle', bundle, id]);
      // `runc run` in the foreground destroys the container when it exits; make sure.
      await runCmd('runc', ['--root', runcRoot, 'delete', '--force', id]);
      for (const d of hostCgroupDirs(res.stdout)) if (d.endsWith(`/berth-test/${id}`)) cgroupDirs.add(d);
      return { id, ...res };
    };

    await t.test('non-root task: no capabilities, no_new_privs, seccomp filter, limits applied', async () => {
      const r = await runContainer(
        [
          'cat /proc/self/status | grep -E "^(CapEff|NoNewPrivs|Seccomp):"',
          'id -u',
          'cat /proc/self/cgroup',
          'if [ -f /sys/fs/cgroup/cgroup.controllers ]; then',
          '  echo "MEM=$(cat /sys/fs/cgroup/memory.max)"; echo "CPU=$(cat /sys/fs/cgroup/cpu.max)"; echo "PIDS=$(cat /sys/fs/cgroup/pids.max)"',
          'else',
          '  echo "MEM=$(cat /sys/fs/cgroup/memory/memory.limit_in_bytes)"',
          '  echo "CPU=$(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us) $(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us)"',
          '  echo "PIDS=$(cat /sys/fs/cgroup/pids/pids.max)"',
          'fi',
          'echo ok',
        ].join('\n'),
        { uid: 1000, gid: 1000 },
        { cpuMillis: 500, memoryMiB: 64, pids: 64 },
      );
      assert.equal(r.code, 0, `runc exited ${r.code} ${r.signal ?? ''}: ${r.stderr}`);
      assert.match(r.stdout, /^NoNewPrivs:\s+1$/m);
      assert.match(r.stdout, /^Seccomp:\s+2$/m);
      // uid 1000 without ambient capabilities loses them all on exec, as with Docker.
      assert.match(r.stdout, /^CapEff:\s+0000000000000000$/m);
      assert.match(r.stdout, /^1000$/m);
      assert.match(r.stdout, /^MEM=67108864$/m);
      assert.match(r.stdout, /^CPU=50000 100000$/m);
      assert.match(r.stdout, /^PIDS=64$/m);
      assert.match(r.stdout, /^ok$/m);
      // Where runc put the cgroup: relative cgroupsPath lands under runc's own cgroup in each hierarchy.
      assert.ok([...cgroupDirs].some((d) => d.endsWith(`/berth-test/${r.id}`)), `no berth-test cgroup in ${r.stdout}`);
      const memDir = [...cgroupDirs].find((d) => d.includes('/memory/') && d.endsWith(r.id)) ?? [...cgroupDirs].find((d) => d.endsWith(r.id));
      assert.ok(memDir, 'memory cgroup directory found');
      assert.ok(!existsSync(memDir), `${memDir} must be gone after runc delete`);
    });

    await t.test('root task: Docker capability set, masked and read-only paths, loopback-only network', async () => {
      const maskedOnHost = DEFAULT_MASKED_PATHS.filter((p) => p !== '/proc/kcore' && existsSync(p));
      const script = [
        'grep -E "^CapEff:" /proc/self/status',
        'id -u',
        'hostname',
        'if [ -e /proc/kcore ]; then echo "KCORE $(cat /proc/kcore 2>/dev/null | head -c 16 | wc -c)"; else echo "KCORE absent"; fi',
        ...maskedOnHost.map((p) =>
          statSync(p).isDirectory() ? `echo "MASKED ${p} $(ls -A ${p} 2>/dev/null | wc -l)"` : `echo "MASKED ${p} $(cat ${p} 2>/dev/null | wc -c)"`,
        ),
        'touch /rootfs-write-test 2>/dev/null && echo ROOT=rw || echo ROOT=ro',
        'echo "IFACES=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d " " | tr "\\n" " ")"',
        'cat /proc/self/cgroup',
        'echo MOUNTINFO; cat /proc/self/mountinfo',
      ].join('\n');
      const r = await runContainer(script, { uid: 0, gid: 0 });
      assert.equal(r.code, 0, `runc exited ${r.code} ${r.signal ?? ''}: ${r.stderr}`);
      assert.match(r.stdout, /^CapEff:\s+00000000a80425fb$/m, 'Docker default capability mask');
      assert.match(r.stdout, /^0$/m);
      assert.match(r.stdout, new RegExp(`^${r.id}$`, 'm'));
      // /proc/kcore is masked with /dev/null; on kernels without it there is nothing to mask.
      assert.match(r.stdout, existsSync('/proc/kcore') ? /^KCORE 0$/m : /^KCORE absent$/m);
      assert.ok(maskedOnHost.length > 0);
      for (const p of maskedOnHost) assert.match(r.stdout, new RegExp(`^MASKED ${p} 0$`, 'm'), `${p} should be masked`);
      assert.match(r.stdout, /^ROOT=ro$/m);
      assert.match(r.stdout, /^IFACES=lo $/m);
      const mountinfo = r.stdout.slice(r.stdout.indexOf('MOUNTINFO'));
      for (const p of DEFAULT_READONLY_PATHS) {
        if (!existsSync(p)) continue;
        const line = mountinfo.split('\n').find((l) => l.split(' ')[4] === p);
        assert.ok(line, `${p} should be a mount point`);
        assert.match(line.split(' ')[5] ?? '', /(^|,)ro(,|$)/, `${p} should be read-only: ${line}`);
      }
      const rootLine = mountinfo.split('\n').find((l) => l.split(' ')[4] === '/');
      assert.match(rootLine?.split(' ')[5] ?? '', /(^|,)ro(,|$)/, 'rootfs should be read-only');
    });

    await t.test('the image rootfs is untouched by running containers from it', async () => {
      assert.equal(await computeRootfsDigest(img.rootfs), img.digest);
    });

    // Nothing left behind: no runc state, no container cgroups.
    for (const id of ids) await runCmd('runc', ['--root', runcRoot, 'delete', '--force', id]);
    const list = await runCmd('runc', ['--root', runcRoot, 'list', '-q']);
    assert.equal(list.code, 0, list.stderr);
    assert.equal(list.stdout.trim(), '');
    for (const d of cgroupDirs) assert.ok(!existsSync(d), `cgroup ${d} left behind`);
  } finally {
    for (const id of ids) await runCmd('runc', ['--root', runcRoot, 'delete', '--force', id]).catch(() => undefined);
    // runc removes the container's cgroups but not the shared "berth-test" parents it created.
    // runc (our child) shares our cgroups, so its relative cgroupsPath is below ours in each hierarchy.
    for (const own of hostCgroupDirs(readFileSync('/proc/self/cgroup', 'utf8'))) {
      for (const id of ids) cgroupDirs.add(path.join(own, 'berth-test', id));
    }
    const parents = new Set([...cgroupDirs].map((d) => path.dirname(d)));
    for (const d of cgroupDirs) await rmdir(d).catch(() => undefined);
    for (const p of parents) if (path.basename(p) === 'berth-test') await rmdir(p).catch(() => undefined);
    await rm(tmp, { recursive: true, force: true });
  }
});
