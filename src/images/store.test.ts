import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { DigestMismatchError, ImageStore } from './store.js';
import { gzipLayer, makeImage, makeTar, sha256, storeImage } from './testing.js';

async function withStore(fn: (s: ImageStore, dir: string) => Promise<void>): Promise<void> {
  const dir = await mkdtemp(path.join(tmpdir(), 'berth-store-'));
  const s = new ImageStore(dir);
  try {
    await fn(s, dir);
  } finally {
    s.close();
    await rm(dir, { recursive: true, force: true });
  }
}

const chunks = (b: Buffer, n = 7) => Array.from({ length: Math.ceil(b.length / n) }, (_, i) => b.subarray(i * n, (i + 1) * n));

test('ImageStore: blobs are verified on write and stored once by digest', async () => {
  await withStore(async (s, dir) => {
    const data = Buffer.from('layer bytes '.repeat(100));
    const d = sha256(data);
    assert.equal(await s.ingest(d, () => chunks(data), { size: data.length }), data.length);
    assert.ok(await s.hasBlob(d));
    assert.deepEqual(await s.readBlob(d), data);
    let opened = 0;
    await s.ingest(d, () => {
      opened++;
      return [data];
    });
    assert.equal(opened, 0, 'a stored blob is not fetched again');

    const other = Buffer.from('other');
    await assert.rejects(s.ingest(sha256(other), () => [Buffer.from('tampered')]), DigestMismatchError);
    await assert.rejects(s.ingest(sha256(other), () => [other], { size: 3 }), /more data than the 3 bytes/);
    await assert.rejects(s.ingest(sha256(other), () => [other], { size: 9 }), /got 5 bytes but its descriptor declares 9/);
    assert.equal(await s.hasBlob(sha256(other)), false);
    assert.deepEqual(await readdir(path.join(dir, 'ingest')), [], 'failed writes leave no temporary files');
    await assert.rejects(s.ingest('sha256:nothex', () => [other]), /not a sha256 digest/);
  });
});

test('ImageStore: concurrent ingests of the same blob fetch it once and agree', async () => {
  await withStore(async (s) => {
    const data = Buffer.alloc(256 * 1024, 7);
    const d = sha256(data);
    let opened = 0;
    const slow = async function* () {
      opened++;
      for (const c of chunks(data, 16 * 1024)) {
        await new Promise((r) => setImmediate(r));
        yield c;
      }
    };
    const sizes = await Promise.all(Array.from({ length: 5 }, () => s.ingest(d, () => slow(), { size: data.length })));
    assert.deepEqual(sizes, Array(5).fill(data.length));
    assert.equal(opened, 1);
    // A second store on the same directory (another process) racing the same blob: both renames land.
    const s2 = new ImageStore(s.root);
    try {
      const e = Buffer.from('raced');
      await Promise.all([s.ingest(sha256(e), () => [e]), s2.ingest(sha256(e), () => [e])]);
      assert.deepEqual(await s.readBlob(sha256(e)), e);
    } finally {
      s2.close();
    }
  });
});

test('ImageStore: tags map references to manifest digests', async () => {
  await withStore(async (s) => {
    const d = sha256(Buffer.from('m'));
    s.setTag('example.com/a:1', d, 'application/vnd.oci.image.manifest.v1+json');
    s.setTag('example.com/a:2', d, 'application/vnd.oci.image.manifest.v1+json');
    assert.equal(s.getTag('example.com/a:1')?.digest, d);
    assert.deepEqual(s.listTags().map((t) => t.ref), ['example.com/a:1', 'example.com/a:2']);
    assert.deepEqual(s.tagsFor(d).map((t) => t.ref), ['example.com/a:1', 'example.com/a:2']);
    assert.equal(s.deleteTag('example.com/a:1'), true);
    assert.equal(s.deleteTag('example.com/a:1'), false);
    assert.equal(s.getTag('example.com/a:1'), undefined);
  });
});

test('ImageStore.gc removes exactly the blobs no tag, in-use digest or lease references; shared layers stay', async () => {
  await withStore(async (s, dir) => {
    const shared = gzipLayer(await makeTar([{ name: 'shared', content: 'base' }]));
    const onlyA = gzipLayer(await makeTar([{ name: 'a', content: 'a' }]));
    const onlyB = gzipLayer(await makeTar([{ name: 'b', content: 'b' }]));
    const onlyC = gzipLayer(await makeTar([{ name: 'c', content: 'c' }]));
    const a = makeImage([shared, onlyA], { Cmd: ['a'] });
    const b = makeImage([shared, onlyB], { Cmd: ['b'] });
    const c = makeImage([onlyC], { Cmd: ['c'] });
    await storeImage(s, a, 'example.com/a:1');
    await storeImage(s, b, 'example.com/b:1');
    await storeImage(s, c); // untagged, used by a workload
    const stray = Buffer.from('unreferenced');
    await s.putBytes(stray);
    await writeFile(path.join(dir, 'ingest', 'crashed-partial'), 'x'); // recent: kept

    let r = await s.gc([c.manifestDigest]);
    assert.deepEqual(r.removedBlobs, [sha256(stray)]);
    assert.equal(r.freedBytes, stray.length);
    assert.deepEqual([...r.liveManifests].sort(), [a.manifestDigest, b.manifestDigest, c.manifestDigest].sort());

    s.deleteTag('example.com/a:1');
    r = await s.gc([c.manifestDigest]);
    assert.deepEqual(r.removedBlobs, [a.manifestDigest, a.configDigest, onlyA.digest].sort(), 'shared layer stays (b uses it)');
    assert.ok(await s.hasBlob(shared.digest));

    const lease = s.lease([c.manifestDigest, c.configDigest, onlyC.digest]);
    r = await s.gc([]);
    assert.deepEqual(r.removedBlobs, [], 'leased blobs (a pull in progress) are kept');
    lease.release();
    r = await s.gc([]);
    assert.deepEqual(r.removedBlobs, [c.manifestDigest, c.configDigest, onlyC.digest].sort());

    s.deleteTag('example.com/b:1');
    r = await s.gc([]);
    assert.deepEqual(r.removedBlobs, [b.manifestDigest, b.configDigest, onlyB.digest, shared.digest].sort());
    assert.deepEqual(await readdir(s.blobsDir), []);
  });
});
