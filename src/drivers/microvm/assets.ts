// What a Berth microVM boots from, all built on the host and cached by content:
// - the guest kernel: Debian's linux-image-cloud-amd64 (its virtio drivers are modules);
// - an initramfs holding only the Berth guest agent (as /init) and the modules it loads, in order;
// - a read-only ext4 image per image root file system (mkfs.ext4 -d copies the tree without
//   following symlinks, so an image's absolute links never reach the host's files).
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, renameSync, rmSync, statSync, copyFileSync, writeFileSync, lstatSync } from 'node:fs';
import { join } from 'node:path';
import { run, runOk } from '../../lib/exec.js';

export { BERTH_AGENT, findAgent } from '../agent/binary.js';

/** Modules the guest needs from the Debian cloud kernel, in load order (dependencies first). */
export const GUEST_MODULES = [
  'drivers/virtio/virtio_ring',
  'drivers/virtio/virtio',
  'drivers/virtio/virtio_mmio',
  'drivers/block/virtio_blk',
  'drivers/char/virtio_console',
  'net/core/failover',
  'drivers/net/net_failover',
  'drivers/net/virtio_net',
  'fs/overlayfs/overlay',
];

export interface GuestKernel {
  path: string;
  version: string;
  modulesDir: string;
}

/** The newest Debian cloud kernel in /boot (or BERTH_GUEST_KERNEL=/path/to/vmlinuz-<version>). */
export function findKernel(): GuestKernel | undefined {
  const explicit = process.env.BERTH_GUEST_KERNEL;
  const candidates = explicit
    ? [explicit]
    : readdirSafe('/boot')
        .filter((f) => /^vmlinuz-.*-cloud-amd64$/.test(f))
        .sort(compareVersions)
        .reverse()
        .map((f) => join('/boot', f));
  for (const path of candidates) {
    const version = /vmlinuz-(.+)$/.exec(path)?.[1];
    if (!version || !existsSync(path)) continue;
    const modulesDir = join('/lib/modules', version, 'kernel');
    if (GUEST_MODULES.every((m) => existsSync(join(modulesDir, `${m}.ko`)))) return { path, version, modulesDir };
  }
  return undefined;
}

function compareVersions(a: string, b: string): number {
  return a.localeCompare(b, 'en', { numeric: true });
}

function readdirSafe(d: string): string[] {
  try {
    return readdirSync(d);
  } catch {
    return [];
  }
}

function sha256File(path: string): string {
  return createHash('sha256').update(readFileSync(path)).digest('hex');
}

const building = new Map<string, Promise<string>>();

/** Builds `target` once (per process: one build at a time per file; across processes: temp + rename). */
function once(target: string, build: (tmp: string) => Promise<void>): Promise<string> {
  if (existsSync(target)) return Promise.resolve(target);
  let p = building.get(target);
  if (!p) {
    p = (async () => {
      const tmp = `${target}.tmp-${process.pid}-${Date.now()}`;
      try {
        await build(tmp);
        renameSync(tmp, target);
        return target;
      } finally {
        rmSync(tmp, { recursive: true, force: true });
        building.delete(target);
      }
    })();
    building.set(target, p);
  }
  return p;
}

/** initramfs (uncompressed newc cpio: nothing to decompress under TCG) with the agent and modules. */
export function ensureInitramfs(cacheDir: string, kernel: GuestKernel, agent: string): Promise<string> {
  mkdirSync(cacheDir, { recursive: true });
  const key = createHash('sha256').update(sha256File(agent)).update(kernel.version).update(GUEST_MODULES.join(',')).digest('hex').slice(0, 16);
  return once(join(cacheDir, `initramfs-${key}.cpio`), async (tmp) => {
    const tree = mkdtempSync(join(cacheDir, 'initramfs-tree-'));
    try {
      for (const d of ['dev', 'proc', 'sys', 'mnt', 'lib/modules']) mkdirSync(join(tree, d), { recursive: true });
      copyFileSync(agent, join(tree, 'init'));
      const order: string[] = [];
      for (const m of GUEST_MODULES) {
        const name = `${m.split('/').pop()}.ko`;
        copyFileSync(join(kernel.modulesDir, `${m}.ko`), join(tree, 'lib/modules', name));
        order.push(name);
      }
      writeFileSync(join(tree, 'lib/modules/order'), order.join('\n') + '\n');
      // The kernel opens /dev/console for init's stdio before anything is mounted.
      await runOk('mknod', ['-m', '600', join(tree, 'dev/console'), 'c', '5', '1']);
      const files = await runOk('find', ['.', '-mindepth', '1'], { cwd: tree });
      await runOk('sh', ['-c', `cpio -o -H newc -R 0:0 --quiet > '${tmp}'`], { cwd: tree, input: files.stdout });
    } finally {
      rmSync(tree, { recursive: true, force: true });
    }
  });
}

function treeBytes(dir: string): number {
  let total = 0;
  const walk = (d: string) => {
    for (const e of readdirSafe(d)) {
      const p = join(d, e);
      const st = lstatSync(p);
      total += st.isFile() ? st.size : 4096;
      if (st.isDirectory()) walk(p);
    }
  };
  walk(dir);
  return total;
}

/**
 * Read-only ext4 image of an image root file system, cached by `key` (the image digest when known).
 * Sized to the tree plus room for ext4's own metadata.
 */
export function ensureRootImage(cacheDir: string, rootfs: string, key?: string): Promise<string> {
  mkdirSync(cacheDir, { recursive: true });
  const k = (key ?? createHash('sha256').update(`${rootfs}\0${statSync(rootfs).mtimeMs}`).digest('hex')).replace(/^sha256:/, '').slice(0, 32);
  return once(join(cacheDir, `rootfs-${k}.ext4`), async (tmp) => {
    const mib = Math.ceil((treeBytes(rootfs) * 1.25) / 2 ** 20) + 16;
    await runOk('mkfs.ext4', ['-q', '-F', '-d', rootfs, '-L', 'berth-root', '-O', '^has_journal', '-m', '0', tmp, `${mib}M`], { timeoutMs: 300_000 });
  });
}

export { makeWritableDisk } from '../../lib/disk.js';

export type Accel = 'kvm' | 'tcg';

/**
 * Whether KVM can be used. A /dev/kvm alone is not enough: a PVM-style /dev/kvm (no vmx/svm in
 * /proc/cpuinfo) hangs stock kernels, so KVM is used only with vmx/svm present AND a probe boot
 * that reaches the guest agent (`probe` runs it).
 */
export async function detectAccel(probe: () => Promise<boolean>): Promise<{ accel: Accel; reason: string }> {
  const forced = process.env.BERTH_MICROVM_ACCEL;
  if (forced === 'tcg') return { accel: 'tcg', reason: 'TCG: forced by BERTH_MICROVM_ACCEL=tcg' };
  if (!existsSync('/dev/kvm')) return { accel: 'tcg', reason: 'TCG (software emulation): /dev/kvm does not exist' };
  let flags = '';
  try {
    flags = /^flags\s*:(.*)$/m.exec(readFileSync('/proc/cpuinfo', 'utf8'))?.[1] ?? '';
  } catch {
    /* unreadable: treated as no flags */
  }
  if (!/\b(vmx|svm)\b/.test(flags)) {
    return { accel: 'tcg', reason: 'TCG (software emulation): /dev/kvm exists but the CPU has no vmx/svm flag (a PVM-style /dev/kvm hangs stock guest kernels)' };
  }
  if (!(await probe())) return { accel: 'tcg', reason: 'TCG (software emulation): a probe boot under KVM did not reach the guest agent' };
  return { accel: 'kvm', reason: 'KVM: vmx/svm present and a probe boot reached the guest agent' };
}

/**
 * The host's TSC rate in kHz, for the guest's tsc_early_khz: without it about a third of TCG boots
 * hang calibrating the TSC. From sysfs when the kernel exports it, else from the boot log, else
 * from /proc/cpuinfo.
 */
export async function hostTscKhz(): Promise<number | undefined> {
  try {
    const v = Number(readFileSync('/sys/devices/system/cpu/cpu0/tsc_freq_khz', 'utf8').trim());
    if (v > 0) return v;
  } catch {
    /* not exported */
  }
  const dmesg = await run('dmesg', [], { timeoutMs: 5000 }).catch(() => undefined);
  const m = dmesg && /tsc: (?:Refined TSC clocksource calibration|Detected): ([\d.]+) MHz/.exec(dmesg.stdout);
  if (m) return Math.round(Number(m[1]) * 1000);
  try {
    const mhz = /^cpu MHz\s*:\s*([\d.]+)/m.exec(readFileSync('/proc/cpuinfo', 'utf8'))?.[1];
    if (mhz) return Math.round(Number(mhz) * 1000);
  } catch {
    /* no cpuinfo */
  }
  return undefined;
}

export async function qemuVersion(qemu: string): Promise<string | undefined> {
  const r = await run(qemu, ['--version'], { timeoutMs: 10_000 }).catch(() => undefined);
  return r && r.code === 0 ? /version (\S+)/.exec(r.stdout)?.[1] : undefined;
}
