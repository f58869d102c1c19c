// Import/export of image archives: round trips in both formats, a classic `docker save` tarball
// (config + <id>/layer.tar, a symlinked duplicate layer, RepoTags), OCI layouts written by skopeo
// and read by skopeo/umoci, and hostile archives (paths, digests, sizes, links, devices) refused
// with nothing tagged.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { buffer } from 'node:stream/consumers';
import { ImageService } from './catalog.js';
import { makeTar, gzipLayer, makeImage, sha256, skopeo, storeImage, type EntrySpec } from './testing.js';

async function withService(fn: (s: ImageService, dir: string) => Promise<void>): Promise<void> {
  const dir = await mkdtemp(path.join(tmpdir(), 'berth-archive-'));
  const s = new ImageService(path.join(dir, 'images'));
  try {
    await fn(s, dir);
  } finally {
    s.close();
    await rm(dir, { recursive: true, force: true });
  }
}

async function sampleImage() {
  const base = gzipLayer(await makeTar([{ name: 'etc/', type: 'directory' }, { name: 'etc/hello', content: 'hi\n' }, { name: 'etc/gone', content: 'x' }]));
  const app = gzipLayer(await makeTar([{ name: 'app/', type: 'directory' }, { name: 'app/run', content: '#!/bin/sh\n', mode: 0o755 }, { name: 'etc/.wh.gone' }]));
  return makeImage([base, app], { Env: ['A=1'], Cmd: ['/app/run'], WorkingDir: '/app' });
}

const fileIn = (s: ImageService, digest: string, rel: string) => readFileSync(path.join(s.rootfs.pathFor(digest), rel), 'utf8');

for (const format of ['oci', 'docker'] as const) {
  test(`export as ${format}, import into a fresh store: same digest, tag, files`, async () => {
    await withService(async (a) => {
      const img = await sampleImage();
      await storeImage(a.store, img, 'example.com/team/app:v1');
      const tarBytes = await buffer(await a.exportArchive('example.com/team/app:v1', format));
      const names = execFileSync('tar', ['-tf', '-'], { input: tarBytes }).toString().trim().split('\n').sort();
      assert.ok(names.includes('index.json') && names.includes('oci-layout'));
      assert.equal(names.includes('manifest.json'), format === 'docker');
      if (format === 'docker') {
        const legacy = JSON.parse(execFileSync('tar', ['-xOf', '-', 'manifest.json'], { input: tarBytes }).toString());
        assert.deepEqual(legacy[0].RepoTags, ['example.com/team/app:v1']);
      }
      await withService(async (b) => {
        const out = await b.importArchive(Readable.from([tarBytes]));
        assert.deepEqual(out.map((i) => [i.ref, i.digest]), [['example.com/team/app:v1', img.manifestDigest]]);
        assert.equal(fileIn(b, img.manifestDigest, 'etc/hello'), 'hi\n');
        assert.equal(existsSync(path.join(b.rootfs.pathFor(img.manifestDigest), 'etc/gone')), false);
        // --tag renames; gzip-compressed archives are read too
        const again = await b.importArchive(Readable.from([execFileSync('gzip', ['-c'], { input: tarBytes })]), { tag: 'other/name:2' });
        assert.equal(again[0]!.ref, 'docker.io/other/name:2');
        assert.equal(b.store.getTag('docker.io/other/name:2')?.digest, img.manifestDigest);
      });
    });
  });
}

test('classic docker save archive: <id>/layer.tar, a symlinked duplicate layer, RepoTags', async () => {
  await withService(async (s) => {
    const l1 = await makeTar([{ name: 'bin/', type: 'directory' }, { name: 'bin/tool', content: 'tool', mode: 0o755 }]);
    const l2 = await makeTar([{ name: 'data', content: 'second' }]);
    const config = Buffer.from(JSON.stringify({ architecture: 'amd64', os: 'linux', config: { Cmd: ['/bin/tool'] }, rootfs: { type: 'layers', diff_ids: [sha256(l1), sha256(l2), sha256(l1)] } }));
    const cfgName = `${sha256(config).slice(7)}.json`;
    const archive = await makeTar([
      { name: 'aaa/', type: 'directory' },
      { name: 'aaa/VERSION', content: '1.0' },
      { name: 'aaa/layer.tar', content: l1 },
      { name: 'bbb/layer.tar', content: l2 },
      { name: 'ccc/layer.tar', type: 'symlink', linkname: '../aaa/layer.tar' },
      { name: cfgName, content: config },
      { name: 'manifest.json', content: JSON.stringify([{ Config: cfgName, RepoTags: ['busybox:legacy'], Layers: ['aaa/layer.tar', 'bbb/layer.tar', 'ccc/layer.tar'] }]) },
      { name: 'repositories', content: '{}' },
    ]);
    const [img] = await s.importArchive(Readable.from([archive]));
    assert.equal(img!.ref, 'docker.io/library/busybox:legacy');
    assert.equal(img!.layers, 3);
    assert.deepEqual(img!.config.cmd, ['/bin/tool']);
    assert.equal(fileIn(s, img!.digest, 'data'), 'second');
    assert.equal(fileIn(s, img!.digest, 'bin/tool'), 'tool');
  });
});

const noSkopeo = existsSync('/usr/bin/skopeo') && existsSync('/usr/bin/umoci') ? false : 'skopeo and umoci not installed';

test('interop: an OCI layout written by skopeo imports; Berth’s OCI archive is read by skopeo and unpacked by umoci', { skip: noSkopeo }, async () => {
  await withService(async (s, dir) => {
    const img = await sampleImage();
    await storeImage(s.store, img, 'example.com/team/app:v1');
    const archive = path.join(dir, 'app.tar');
    await writeFile(archive, await buffer(await s.exportArchive('example.com/team/app:v1', 'oci')));
    const inspected = JSON.parse(skopeo(['inspect', '--raw', `oci-archive:${archive}:v1`]));
    assert.equal(sha256(Buffer.from(JSON.stringify(inspected))).length, 71);
    assert.equal(inspected.layers.length, 2);
    // skopeo writes an OCI layout directory (ref.name = bare tag) from Berth's archive
    const layout = path.join(dir, 'layout');
    skopeo(['copy', '--quiet', `oci-archive:${archive}:v1`, `oci:${layout}:copied`]);
    execFileSync('umoci', ['unpack', '--rootless', '--image', `${layout}:copied`, path.join(dir, 'bundle')], { stdio: 'ignore' });
    assert.equal(readFileSync(path.join(dir, 'bundle/rootfs/etc/hello'), 'utf8'), 'hi\n');
    // a layout directory travels as a tar (what `berth image import DIR` sends)
    const dirTar = execFileSync('tar', ['-C', layout, '-cf', '-', '.'], { maxBuffer: 1 << 26 });
    await assert.rejects(s.importArchive(Readable.from([dirTar])), /named only by the tag "copied", without a repository/);
    const [imp] = await s.importArchive(Readable.from([dirTar]), { tag: '127.0.0.1:5000/copied:1' });
    assert.equal(imp!.ref, '127.0.0.1:5000/copied:1');
    assert.equal(fileIn(s, imp!.digest, 'etc/hello'), 'hi\n');
  });
});

test('hostile archives are refused and nothing is tagged', async () => {
  await withService(async (s) => {
    const img = await sampleImage();
    const good = (extra: EntrySpec[] = [], swap?: (e: EntrySpec[]) => EntrySpec[]) => {
      const index = { schemaVersion: 2, manifests: [{ mediaType: img.mediaType, digest: img.manifestDigest, size: img.manifest.length, annotations: { 'io.containerd.image.name': 'example.com/evil:1' } }] };
      let entries: EntrySpec[] = [
        { name: 'oci-layout', content: '{"imageLayoutVersion":"1.0.0"}' },
        ...img.layers.map((l) => ({ name: `blobs/sha256/${l.digest.slice(7)}`, content: l.blob })),
        { name: `blobs/sha256/${img.configDigest.slice(7)}`, content: img.config },
        { name: `blobs/sha256/${img.manifestDigest.slice(7)}`, content: img.manifest },
        { name: 'index.json', content: JSON.stringify(index) },
        ...extra,
      ];
      if (swap) entries = swap(entries);
      return makeTar(entries);
    };
    const refuse = async (archive: Buffer, re: RegExp) => {
      // Blobs of a refused archive stay untagged: GC takes them (a stored, verified copy would
      // otherwise make the store skip re-reading the archive's copy).
      await s.gc({ refs: new Map() });
      await assert.rejects(s.importArchive(Readable.from([archive])), (e: Error & { code?: string }) => {
        assert.equal(e.code, 'invalid_argument');
        assert.match(e.message, re);
        return true;
      });
      assert.deepEqual(s.store.listTags(), []);
    };
    await refuse(await good([{ name: '../escape', content: 'x' }]), /"\.\.\/escape" has "\.\." in its path/);
    await refuse(await good([{ name: '/etc/evil', content: 'x' }]), /absolute path/);
    await refuse(await good([{ name: 'evil-link', type: 'symlink', linkname: '../../etc/passwd' }]), /symlink .* outside the archive/);
    await refuse(await good([{ name: 'hard', type: 'link', linkname: 'index.json' }]), /is a link; image archives hold only/);
    await refuse(await good([{ name: 'dev', type: 'character-device' }]), /is a character-device/);
    // a blob whose bytes do not match its name
    const l0 = img.layers[0]!;
    await refuse(await good([], (e) => e.map((x) => (x.name === `blobs/sha256/${l0.digest.slice(7)}` ? { ...x, content: Buffer.concat([l0.blob.subarray(0, -1), Buffer.from([l0.blob.at(-1)! ^ 0xff])]) } : x))), /does not match its digest/);
    // a descriptor that lies about a size
    const liar = { ...JSON.parse(img.manifest.toString()) };
    liar.layers[1].size += 10;
    const liarBytes = Buffer.from(JSON.stringify(liar));
    await refuse(
      await good([], (e) =>
        e.map((x) =>
          x.name === `blobs/sha256/${img.manifestDigest.slice(7)}`
            ? { ...x, name: `blobs/sha256/${sha256(liarBytes).slice(7)}`, content: liarBytes }
            : x.name === 'index.json'
              ? { ...x, content: JSON.stringify({ schemaVersion: 2, manifests: [{ mediaType: img.mediaType, digest: sha256(liarBytes), size: liarBytes.length, annotations: { 'io.containerd.image.name': 'e.com/x:1' } }] }) }
              : x,
        ),
      ),
      /is \d+ bytes but its descriptor declares/,
    );
    // a manifest over 4 MiB
    await refuse(await good([{ name: 'index.json', content: Buffer.alloc(5 << 20, 0x20) }]), /over the 4 MiB limit/);
    // a layer that climbs out of the rootfs: refused at unpack, before tagging
    const evil = gzipLayer(await makeTar([{ name: 'x', type: 'symlink', linkname: '../../../../../etc' }]));
    const bad = makeImage([evil]);
    const badArchive = await makeTar([
      ...[evil].map((l) => ({ name: `blobs/sha256/${l.digest.slice(7)}`, content: l.blob })),
      { name: `blobs/sha256/${bad.configDigest.slice(7)}`, content: bad.config },
      { name: `blobs/sha256/${bad.manifestDigest.slice(7)}`, content: bad.manifest },
      { name: 'index.json', content: JSON.stringify({ schemaVersion: 2, manifests: [{ mediaType: bad.mediaType, digest: bad.manifestDigest, size: bad.manifest.length, annotations: { 'io.containerd.image.name': 'e.com/evil:1' } }] }) },
    ]);
    await refuse(badArchive, /climbs|outside|refused/);
    await refuse(Buffer.from('not a tar at all, just text'.repeat(40)), /not a valid tar archive|neither index.json/);
  });
});
