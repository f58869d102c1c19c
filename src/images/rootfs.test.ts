// Acceptance 3: a second workload of an image prepares its rootfs without unpacking again. What a
// workload start does on the host for its rootfs is measured: resolve the image (ImageService,
// which unpacks only when the shared tree is missing), make the writable layer's upper and work
// folders, and mount the overlay (the runc driver lets runc mount the same overlay) — and unmount.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, statSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { ImageService } from './catalog.js';
import { prepareRootfs } from './testing.js';

const skip = process.getuid?.() !== 0 ? 'mounting an overlay needs root' : !existsSync('/bin/busybox') ? 'busybox-static not installed' : false;

test('a second workload of an image prepares its rootfs in ≤ 50 ms (median of 30), without unpacking', { skip }, async () => {
  const dir = await mkdtemp(path.join(tmpdir(), 'berth-rootfs-'));
  const s = new ImageService(path.join(dir, 'images'));
  try {
    const img = await s.makeBase({ kind: 'busybox', log: () => undefined });
    const tree = s.rootfs.pathFor(img.digest);
    const before = statSync(tree);
    const times: number[] = [];
    for (let i = 0; i < 30; i++) times.push(await prepareRootfs(s, img.ref, path.join(dir, `w${i}`)));
    times.sort((a, b) => a - b);
    const median = times[15]!;
    console.log(`rootfs preparation of a second workload: median ${median.toFixed(1)} ms, max ${times.at(-1)!.toFixed(1)} ms over 30`);
    assert.ok(median <= 50, `median ${median} ms`);
    const after = statSync(tree);
    assert.equal(after.ino, before.ino, 'the shared tree is the same directory (no re-unpack)');
    assert.equal(after.mtimeMs, before.mtimeMs);
  } finally {
    s.close();
    await rm(dir, { recursive: true, force: true });
  }
});
