import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { ImageService, processConfig } from './catalog.js';
import { MT } from './oci.js';
import { gzipLayer, makeImage, makeTar, sha256, storeImage } from './testing.js';

async function withService(fn: (s: ImageService, dir: string) => Promise<void>): Promise<void> {
  const dir = await mkdtemp(path.join(tmpdir(), 'berth-catalog-'));
  const s = new ImageService(dir);
  try {
    await fn(s, dir);
  } finally {
    s.close();
    await rm(dir, { recursive: true, force: true });
  }
}

test('processConfig: OCI defaults and Env parsing', () => {
  assert.deepEqual(processConfig({ rootfs: { type: 'layers', diff_ids: [] } }), { env: {}, entrypoint: [], cmd: [], workingDir: '/', user: '0:0' });
  assert.deepEqual(
    processConfig({ rootfs: { type: 'layers', diff_ids: [] }, config: { Env: ['A=1', 'B=x=y', 'bad'], Entrypoint: ['/e'], Cmd: null, WorkingDir: '/w', User: 'nobody' } }),
    { env: { A: '1', B: 'x=y' }, entrypoint: ['/e'], cmd: [], workingDir: '/w', user: 'nobody' },
  );
});

test('ImageService: resolves tags, digests and index digests to a shared rootfs with the image config', async () => {
  await withService(async (s) => {
    const layer = gzipLayer(await makeTar([{ name: 'etc/hello', content: 'hi' }]));
    const img = makeImage([layer], { Env: ['PATH=/bin'], Cmd: ['cat', '/etc/hello'], WorkingDir: '/etc' });
    await storeImage(s.store, img, 'example.com/team/app:1');
    const byTag = await s.resolve('example.com/team/app:1');
    assert.equal(byTag.ref, 'example.com/team/app:1');
    assert.equal(byTag.digest, img.manifestDigest);
    assert.deepEqual(byTag.config, { env: { PATH: '/bin' }, entrypoint: [], cmd: ['cat', '/etc/hello'], workingDir: '/etc', user: '0:0' });
    const byDigest = await s.resolve(`example.com/team/app@${img.manifestDigest}`);
    assert.equal(byDigest.rootfs, byTag.rootfs);

    const index = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: MT.ociIndex, manifests: [{ mediaType: MT.ociManifest, digest: img.manifestDigest, size: img.manifest.length, platform: { os: 'linux', architecture: 'amd64' } }] }));
    await s.store.putBytes(index);
    if (process.arch === 'x64') assert.equal((await s.resolve(`example.com/team/app@${sha256(index)}`)).digest, img.manifestDigest);

    await assert.rejects(s.resolve('example.com/team/other:1'), (e: any) => e.code === 'invalid_argument' && /not on this host; pull it first/.test(e.message));
    await assert.rejects(s.resolve('Bad:Ref:x'), (e: any) => e.code === 'invalid_argument');
    const list = await s.summaries();
    assert.deepEqual(list.map((i) => i.ref), ['busybox:latest', 'example.com/team/app:1'].filter((r) => r !== 'busybox:latest' || existsSync('/bin/busybox')));
  });
});

test('ImageService.remove: refused while used, then GC keeps exactly what other tags and in-use refs need', async () => {
  await withService(async (s, dir) => {
    const shared = gzipLayer(await makeTar([{ name: 'base', content: 'b' }]));
    const a = makeImage([shared, gzipLayer(await makeTar([{ name: 'a', content: 'a' }]))]);
    const b = makeImage([shared, gzipLayer(await makeTar([{ name: 'b', content: 'b' }]))]);
    await storeImage(s.store, a, 'example.com/a:1');
    await storeImage(s.store, b, 'example.com/b:1');
    await s.resolve('example.com/a:1');
    await s.resolve('example.com/b:1');
    const used = { refs: new Map([['example.com/a:1', ['workload default/web']]]) };
    await assert.rejects(s.remove('example.com/a:1', used), (e: any) => e.code === 'failed_precondition' && /used by workload default\/web/.test(e.message));
    // a workload pinned by digest keeps the blobs alive after its tag goes
    const pinned = { refs: new Map([[`example.com/b@${b.manifestDigest}`, ['workload default/pinned']]]) };
    const rb = await s.remove('example.com/b:1', pinned);
    assert.deepEqual(rb.removedBlobs, []);
    const ra = await s.remove('example.com/a:1', pinned);
    assert.deepEqual(ra.removedBlobs, [a.manifestDigest, a.configDigest, a.layers[1]!.digest].sort());
    assert.deepEqual(await readdir(path.join(dir, 'rootfs')), [b.manifestDigest.slice(7)]);
    const gc = await s.gc({ refs: new Map() });
    assert.deepEqual(gc.removedBlobs, [b.manifestDigest, b.configDigest, shared.digest, b.layers[1]!.digest].sort());
    assert.deepEqual(gc.removedRootfs, [b.manifestDigest]);
    await assert.rejects(s.remove('example.com/a:1', { refs: new Map() }), (e: any) => e.code === 'not_found');
    await assert.rejects(s.remove('busybox', { refs: new Map() }), (e: any) => e.code === 'failed_precondition');
  });
});
