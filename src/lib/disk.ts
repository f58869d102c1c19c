// Size-limited writable file systems: a sparse ext4 image (only written blocks use host disk),
// mounted through a loop device where the host must see it (the container tiers' writable layer)
// or handed to a microVM as a block device.
import { closeSync, ftruncateSync, openSync, readSync, rmSync, writeSync } from 'node:fs';
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

/** Where a sparse file holds data: its size and the byte ranges [offset, length] of its data (the rest reads as zeros). */
export interface DataMap {
  size: number;
  extents: [number, number][];
}

/**
 * The data ranges of a file from its extent map (`filefrag -e`: FIEMAP), or undefined where the
 * file system cannot tell (tmpfs, for one) or the answer does not add up. Extents are merged where
 * they touch.
 */
export async function dataMap(path: string): Promise<DataMap | undefined> {
  const r = await run('filefrag', ['-e', path], { timeoutMs: 30_000 });
  return r.code === 0 ? parseFilefrag(r.stdout) : undefined;
}

/** `filefrag -e` output → DataMap (pure; exported for tests). */
export function parseFilefrag(out: string): DataMap | undefined {
  const head = /is (\d+) \(\d+ blocks? of (\d+) bytes\)/.exec(out);
  if (!head) return undefined;
  const size = Number(head[1]);
  const block = Number(head[2]);
  if (!Number.isSafeInteger(size) || !(block > 0)) return undefined;
  const extents: [number, number][] = [];
  for (const m of out.matchAll(/^\s*\d+:\s*(\d+)\.\.\s*(\d+):/gm)) {
    const start = Number(m[1]) * block;
    const end = Math.min((Number(m[2]) + 1) * block, size);
    if (!(end > start)) continue; // (a block past the end: preallocated, reads as nothing)
    const last = extents[extents.length - 1];
    if (last && last[0] + last[1] > start) return undefined; // out of order: not what filefrag prints
    if (last && last[0] + last[1] === start) last[1] += end - start;
    else extents.push([start, end - start]);
  }
  return { size, extents };
}

/**
 * Copies a sparse file whose DataMap is known: the copy has the same size and holes, and only the
 * data is read and written. In-process because a `cp --sparse` is a process to start, which on a
 * microVM fork's path cost more than the copy (a template's writable disk holds ~1 MiB of data).
 * With blocking reads and writes, yielding to the event loop every YIELD_EVERY_BYTES: a template's
 * disk (~0.7 MiB in 12 extents) took 4.3–7.0 ms as awaited reads and writes, each a round trip
 * through libuv's thread pool, against 1.9–2.8 ms blocking.
 */
export async function copyDataMap(src: string, dst: string, map: DataMap): Promise<void> {
  const from = openSync(src, 'r');
  try {
    const to = openSync(dst, 'wx', 0o600);
    let ok = false;
    try {
      ftruncateSync(to, map.size);
      const buf = Buffer.allocUnsafe(Math.min(2 ** 20, map.extents.reduce((a, [, len]) => Math.max(a, len), 0)));
      let sinceYield = 0;
      for (const [offset, length] of map.extents) {
        for (let done = 0; done < length; ) {
          const n = Math.min(buf.length, length - done);
          const bytesRead = readSync(from, buf, 0, n, offset + done);
          if (bytesRead !== n) throw new Error(`${src} is shorter than its data map says (${offset + done + bytesRead} bytes)`);
          if (writeSync(to, buf, 0, n, offset + done) !== n) throw new Error(`short write to ${dst} at ${offset + done}`);
          done += n;
          sinceYield += n;
          if (sinceYield >= YIELD_EVERY_BYTES) {
            sinceYield = 0;
            await new Promise((r) => setImmediate(r));
          }
        }
      }
      ok = true;
    } finally {
      closeSync(to);
      if (!ok) rmSync(dst, { force: true }); // (no half copy left behind)
    }
  } finally {
    closeSync(from);
  }
}

/** copyDataMap() blocks the event loop for at most this much data at a time (~2 ms). */
const YIELD_EVERY_BYTES = 4 * 2 ** 20;
