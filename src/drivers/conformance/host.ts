// Runs the driver conformance suite against a real driver on this host (real runtime + conmon, real
// cgroups), with a leak check of everything the driver may create. Skipped when the host lacks root
// or the required binaries.
import { test } from 'node:test';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, rmdirSync, readlinkSync } from 'node:fs';
import { join } from 'node:path';
import { spawnSync } from 'node:child_process';
import { ensureBusyboxImage } from '../../images/busybox.js';
import { runConformanceSuite } from './suite.js';
import { cgroupHierarchies, mountPointsUnder } from '../../lib/host.js';
import type { RuntimeDriver } from '../../core/driver.js';


function unusableReason(name: string, required: string[]): string | undefined {
  if (process.platform !== 'linux') return `${name} needs Linux`;
  if (process.getuid?.() !== 0) return `${name} conformance tests need root`;
  for (const f of [...required, '/usr/bin/conmon', '/bin/busybox']) if (!existsSync(f)) return `${f} is missing`;
  return undefined;
}

function cgroupParentDirs(parent: string): string[] {
  return cgroupHierarchies()
    .map((h) => join(h, parent))
    .filter((d) => existsSync(d));
}

function listDir(d: string): string[] {
  try {
    return readdirSync(d);
  } catch {
    return [];
  }
}

export type OpenableDriver = RuntimeDriver & { close(): void; listTasks(): Promise<string[]> };

/**
 * Registers the conformance suite for one driver. `open` makes a driver instance on the given
 * state dir (called again to simulate a daemon restart); `runtimeDir` is the runtime's --root
 * folder name inside the state dir.
 */
export function conformanceOnHost(name: string, required: string[], runtimeDir: string, open_: (stateDir: string, cgroupParent: string) => OpenableDriver): void {
  const reason = unusableReason(name, required);
  if (reason) {
    test(`${name} driver conformance`, { skip: reason }, () => undefined);
    return;
  }
  runConformanceSuite(name, async () => {
    const base = mkdtempSync('/tmp/berth-conf-');
    const stateDir = join(base, 'state');
    const cgroupParent = `berth-conf-${randomBytes(4).toString('hex')}`;
    let imageRootfs: string;
    try {
      imageRootfs = (await ensureBusyboxImage(join(base, 'images'))).rootfs;
    } catch (e) {
      rmSync(base, { recursive: true, force: true });
      throw e;
    }
    const opened: OpenableDriver[] = [];
    const open = () => {
      const d = open_(stateDir, cgroupParent);
      opened.push(d);
      return d;
    };
    const driver = open();

    const residue = (): string[] => {
      const left: string[] = [];
      for (const mp of mountPointsUnder(stateDir)) left.push(`mount ${mp}`);
      for (const sub of ['tasks', 'exits', runtimeDir]) for (const e of listDir(join(stateDir, sub))) left.push(`${sub}/${e}`);
      for (const p of listDir('/proc')) {
        if (!/^\d+$/.test(p) || Number(p) === process.pid) continue;
        let cmd = '';
        try {
          cmd = readFileSync(`/proc/${p}/cmdline`, 'utf8');
        } catch {
          continue;
        }
        // (A monitor started ahead of time, `monitor --spare`, has no paths in its arguments: its working directory is the task's.)
        let cwd = '';
        try {
          cwd = readlinkSync(`/proc/${p}/cwd`);
        } catch {
          /* gone, or a kernel thread */
        }
        if (cmd.includes(stateDir) || cwd.startsWith(stateDir)) left.push(`process ${p}: ${cmd.split('\0').join(' ').slice(0, 200)} (in ${cwd})`);
      }
      for (const d of cgroupParentDirs(cgroupParent)) {
        for (const e of readdirSync(d, { withFileTypes: true })) if (e.isDirectory()) left.push(`cgroup ${join(d, e.name)}`);
      }
      return left;
    };

    const cleanup = async (): Promise<void> => {
      try {
        for (const id of await driver.listTasks()) await driver.destroy(id, { force: true }).catch(() => undefined);
      } finally {
        for (const d of opened) d.close();
        for (const d of cgroupParentDirs(cgroupParent)) {
          for (const e of listDir(d)) {
            try {
              rmdirSync(join(d, e)); // only empty cgroups (no processes) can go; files fail harmlessly
            } catch {
              /* not a leftover task cgroup */
            }
          }
          try {
            rmdirSync(d);
          } catch {
            /* still busy: reported by residue() */
          }
        }
        for (const mp of mountPointsUnder(base)) spawnSync('umount', ['-l', mp], { timeout: 10_000 });
        if (mountPointsUnder(base).length === 0) rmSync(base, { recursive: true, force: true });
      }
    };

    return { driver, imageRootfs, cleanup, residue, reopen: open };
  });
}
