// Size-limited writable file systems: a sparse ext4 image (only written blocks use host disk),
// mounted through a loop device where the host must see it (the container tiers' writable layer)
// or handed to a microVM as a block device.
import { run, runOk } from './exec.js';
import { isMountPoint } from './host.js';

/** Creates a sparse, empty ext4 file system image of `sizeMiB` (≈ 10 ms: lazy inode tables). */
export async function makeWritableDisk(path: string, sizeMiB: number): Promise<void> {
  await runOk('mkfs.ext4', ['-q', '-F', '-L', 'berth-rw', '-m', '0', '-E', 'lazy_itable_init=1,lazy_journal_init=1,nodiscard', path, `${sizeMiB}M`], { timeoutMs: 60_000 });
}

/** Mounts an image on `dir` through a loop device (detached automatically on unmount). */
export async function mountDisk(image: string, dir: string): Promise<void> {
  if (isMountPoint(dir)) return;
  await runOk('mount', ['-o', 'loop,nosuid,nodev', image, dir], { timeoutMs: 30_000 });
}

/** Unmounts `dir` if it is a mount point (retrying while busy; lazily as a last resort). */
export async function unmountDisk(dir: string): Promise<void> {
  for (let i = 0; i < 20 && isMountPoint(dir); i++) {
    const r = await run('umount', [dir], { timeoutMs: 10_000 });
    if (r.code !== 0 && i === 19) await run('umount', ['-l', dir], { timeoutMs: 10_000 });
    else if (r.code !== 0) await new Promise((res) => setTimeout(res, 50));
  }
}
