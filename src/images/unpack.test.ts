import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { lstat, mkdir, mkdtemp, readdir, readFile, readlink, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { applyLayer, HostileLayerError, RootfsCache } from './unpack.js';
import { ImageStore } from './store.js';
import { gzipLayer, makeImage, makeTar, sha256, storeImage, type EntrySpec } from './testing.js';

const isRoot = process.getuid?.() === 0;

async function withTmp(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await mkdtemp(path.join(tmpdir(), 'berth-unpack-'));
  try {
    await fn(dir);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

async function apply(root: string, entries: EntrySpec[], diffId?: string, worker = false) {
  const bytes = await makeTar(entries);
  return applyLayer(root, { stream: Readable.from([bytes]), compression: 'none', name: 'sha256:test', worker, ...(diffId ? { diffId } : {}) });
}

/** Sorted listing "path type" of a tree, without following symlinks. */
async function tree(root: string): Promise<string[]> {
  const out: string[] = [];
  const walk = async (rel: string) => {
    for (const e of await readdir(path.join(root, rel), { withFileTypes: true })) {
      const r = rel ? `${rel}/${e.name}` : e.name;
      out.push(`${r} ${e.isDirectory() ? 'd' : e.isSymbolicLink() ? 'l' : 'f'}`);
      if (e.isDirectory()) await walk(r);
    }
  };
  await walk('');
  return out.sort();
}

for (const worker of [false, true]) test(`applyLayer${worker ? ' (worker thread)' : ''}: files, directories, modes, owners, symlinks, hardlinks, fifos`, async () => {
  await withTmp(async (dir) => {
    const root = path.join(dir, 'root');
    await mkdir(root);
    // Bigger than the worker's 1 MiB batches: its bytes travel in several.
    const big = randomBytes(2.5 * 2 ** 20 + 7);
    const stats = await apply(root, [
      { name: './', type: 'directory', mode: 0o755 },
      { name: 'etc/', type: 'directory', mode: 0o755 },
      { name: 'etc/motd', content: 'hello\n', mode: 0o640, uid: 1000, gid: 1001 },
      { name: 'bin/', type: 'directory' },
      { name: 'bin/tool', content: '#!/bin/sh\n', mode: 0o4755 },
      { name: 'bin/alias', type: 'symlink', linkname: 'tool' },
      { name: 'bin/abs', type: 'symlink', linkname: '/bin/tool' },
      { name: 'bin/hard', type: 'link', linkname: 'bin/tool' },
      { name: 'tmp/', type: 'directory', mode: 0o1777 },
      { name: 'run/pipe', type: 'fifo', mode: 0o600 },
      { name: 'deep/a/b/c', content: 'implicit parents' },
      { name: 'big', content: big },
      { name: 'after-big', content: 'next' },
    ], undefined, worker);
    assert.equal(stats.entries, 13);
    assert.ok((await readFile(path.join(root, 'big'))).equals(big));
    assert.equal(await readFile(path.join(root, 'after-big'), 'utf8'), 'next');
    assert.equal(await readFile(path.join(root, 'etc/motd'), 'utf8'), 'hello\n');
    const motd = await stat(path.join(root, 'etc/motd'));
    assert.equal(motd.mode & 0o7777, 0o640);
    if (isRoot) assert.deepEqual([motd.uid, motd.gid], [1000, 1001]);
    assert.equal(motd.mtimeMs, 1_700_000_000_000);
    assert.equal((await stat(path.join(root, 'bin/tool'))).mode & 0o7777, 0o4755);
    assert.equal(await readlink(path.join(root, 'bin/alias')), 'tool');
    assert.equal(await readlink(path.join(root, 'bin/abs')), '/bin/tool');
    assert.equal((await stat(path.join(root, 'bin/hard'))).ino, (await stat(path.join(root, 'bin/tool'))).ino);
    assert.equal((await stat(path.join(root, 'tmp'))).mode & 0o7777, 0o1777);
    assert.ok((await lstat(path.join(root, 'run/pipe'))).isFIFO());
    assert.equal(await readFile(path.join(root, 'deep/a/b/c'), 'utf8'), 'implicit parents');
  });
});

test('applyLayer: whiteouts and opaque directories hide lower layers only', async () => {
  await withTmp(async (root) => {
    await apply(root, [
      { name: 'a/x', content: 'x' },
      { name: 'a/y', content: 'y' },
      { name: 'b', content: 'b' },
      { name: 'd/old', content: 'old' },
      { name: 'd/sub/old2', content: 'old2' },
      { name: 'e/old', content: 'old' },
      { name: 'f/', type: 'directory' },
      { name: 'f/tree/deep', content: 'gone' },
    ]);
    await apply(root, [
      { name: 'a/.wh.x' },
      { name: '.wh.b' },
      // opaque marker after this layer's own entries in the directory: they stay
      { name: 'd/', type: 'directory' },
      { name: 'd/new', content: 'new' },
      { name: 'd/sub/new2', content: 'new2' },
      { name: 'd/.wh..wh..opq' },
      // opaque marker first
      { name: 'e/.wh..wh..opq' },
      { name: 'e/new', content: 'new' },
      { name: '.wh.f' },
      { name: '.wh.missing' },
    ]);
    assert.deepEqual(await tree(root), ['a d', 'a/y f', 'd d', 'd/new f', 'd/sub d', 'd/sub/new2 f', 'e d', 'e/new f']);
  });
});

test('applyLayer: a file replaces a directory and a directory replaces a file or symlink', async () => {
  await withTmp(async (root) => {
    await apply(root, [{ name: 'x/inner', content: '1' }, { name: 'y', content: 'file' }, { name: 'z', type: 'symlink', linkname: 'y' }]);
    await apply(root, [{ name: 'x', content: 'now a file' }, { name: 'y/', type: 'directory' }, { name: 'y/in', content: '2' }, { name: 'z/', type: 'directory' }]);
    assert.deepEqual(await tree(root), ['x f', 'y d', 'y/in f', 'z d']);
  });
});

test('applyLayer: xattrs are kept where the filesystem allows', async (t) => {
  await withTmp(async (root) => {
    const stats = await apply(root, [{ name: 'f', content: 'x', pax: { 'SCHILY.xattr.user.berth': 'yes' } }]);
    let got: string | undefined;
    try {
      got = execFileSync('getfattr', ['--only-values', '-n', 'user.berth', path.join(root, 'f')], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
    } catch {
      /* no getfattr or no user xattrs on this filesystem */
    }
    if (got === undefined) {
      assert.equal(stats.xattrsSkipped, 1);
      t.diagnostic('user xattrs not supported here; counted as skipped');
    } else {
      assert.equal(got, 'yes');
      assert.equal(stats.xattrsSkipped, 0);
    }
  });
});

// ---- hostile layers: refused with a clear error, nothing written outside the target ----

interface Hostile {
  name: string;
  entries: (outside: string) => EntrySpec[];
  message: RegExp;
}

const HOSTILE: Hostile[] = [
  { name: '../ path', entries: () => [{ name: '../evil', content: 'x' }], message: /"\.\." in its path/ },
  { name: 'nested ../ path', entries: () => [{ name: 'a/../../evil', content: 'x' }], message: /"\.\." in its path/ },
  { name: 'absolute path', entries: (o) => [{ name: `${o}/evil`, content: 'x' }], message: /absolute path/ },
  { name: 'write through an absolute symlink', entries: (o) => [{ name: 'etc', type: 'symlink', linkname: o }, { name: 'etc/victim', content: 'pwned' }], message: /through the symlink "etc"/ },
  { name: 'write through a relative symlink', entries: () => [{ name: 'dir/', type: 'directory' }, { name: 'l', type: 'symlink', linkname: 'dir' }, { name: 'l/file', content: 'x' }], message: /through the symlink "l"/ },
  { name: 'symlink climbing out of the root', entries: () => [{ name: 'a/esc', type: 'symlink', linkname: '../../../../etc' }], message: /points out of the image root/ },
  { name: 'whiteout through a symlink', entries: (o) => [{ name: 'l', type: 'symlink', linkname: o }, { name: 'l/.wh.victim' }], message: /through the symlink "l"/ },
  { name: 'opaque dir through a symlink', entries: (o) => [{ name: 'l', type: 'symlink', linkname: o }, { name: 'l/.wh..wh..opq' }], message: /through the symlink "l"/ },
  { name: 'hardlink to an absolute path', entries: (o) => [{ name: 'h', type: 'link', linkname: `${o}/victim` }], message: /absolute hardlink target/ },
  { name: 'hardlink with ../', entries: () => [{ name: 'h', type: 'link', linkname: '../outside/victim' }], message: /"\.\." in its hardlink target/ },
  { name: 'hardlink through a symlink', entries: (o) => [{ name: 'l', type: 'symlink', linkname: o }, { name: 'h', type: 'link', linkname: 'l/victim' }], message: /through the symlink "l"/ },
  { name: 'hardlink to a missing file', entries: () => [{ name: 'h', type: 'link', linkname: 'nope' }], message: /not in the image/ },
  { name: 'character device', entries: () => [{ name: 'dev/mem', type: 'character-device' }], message: /device node/ },
  { name: 'block device', entries: () => [{ name: 'dev/sda', type: 'block-device' }], message: /device node/ },
];

// Inline, and in the worker thread that big layers are applied in.
for (const [h, worker] of HOSTILE.flatMap((h) => [[h, false], [h, true]] as const)) {
  test(`applyLayer refuses a hostile layer${worker ? ' (worker thread)' : ''}: ${h.name}`, async () => {
    await withTmp(async (dir) => {
      const outside = path.join(dir, 'outside');
      const root = path.join(dir, 'root');
      await mkdir(outside);
      await mkdir(root);
      await writeFile(path.join(outside, 'victim'), 'original');
      const before = await tree(dir);
      await assert.rejects(apply(root, h.entries(outside), undefined, worker), (e: unknown) => {
        assert.ok(e instanceof HostileLayerError, `expected HostileLayerError, got ${String(e)}`);
        assert.equal(e.code, 'invalid_argument');
        assert.match(e.message, h.message);
        assert.match(e.message, /refused/);
        return true;
      });
      assert.equal(await readFile(path.join(outside, 'victim'), 'utf8'), 'original');
      assert.deepEqual((await tree(dir)).filter((p) => !p.startsWith('root/')), before.filter((p) => !p.startsWith('root/')), 'nothing outside the root changed');
      assert.deepEqual(await readdir(outside), ['victim']);
    });
  });
}

test('applyLayer replaces an existing symlink instead of writing through it', async () => {
  await withTmp(async (dir) => {
    const outside = path.join(dir, 'outside');
    const root = path.join(dir, 'root');
    await mkdir(outside);
    await mkdir(root);
    await writeFile(path.join(outside, 'victim'), 'original');
    await apply(root, [{ name: 'x', type: 'symlink', linkname: path.join(outside, 'victim') }]);
    await apply(root, [{ name: 'x', content: 'new content' }]);
    assert.equal(await readFile(path.join(outside, 'victim'), 'utf8'), 'original');
    assert.ok((await lstat(path.join(root, 'x'))).isFile());
    assert.equal(await readFile(path.join(root, 'x'), 'utf8'), 'new content');
  });
});

test('applyLayer refuses a layer whose content does not match its diff_id', async () => {
  await withTmp(async (root) => {
    await assert.rejects(apply(root, [{ name: 'f', content: 'x' }], sha256(Buffer.from('something else'))), /hashes to sha256:[0-9a-f]{64} but the image config declares/);
  });
});

test('applyLayer refuses garbage that is not a tar archive', async () => {
  await withTmp(async (root) => {
    await assert.rejects(
      applyLayer(root, { stream: Readable.from([Buffer.from('not a gzip stream at all')]), compression: 'gzip', name: 'sha256:bad' }),
      /not a valid gzip-compressed tar archive/,
    );
  });
});

test('RootfsCache: unpacks once into a shared tree, concurrent callers agree, second resolve is fast, prune removes unused', async () => {
  await withTmp(async (dir) => {
    const store = new ImageStore(path.join(dir, 'store'));
    try {
      const base = gzipLayer(await makeTar([{ name: 'etc/os', content: 'base' }, { name: 'etc/gone', content: 'x' }]));
      const top = gzipLayer(await makeTar([{ name: 'etc/app', content: 'app' }, { name: 'etc/.wh.gone' }]));
      const img = makeImage([base, top], { Cmd: ['sh'] });
      await storeImage(store, img, 'example.com/app:1');
      const cache = new RootfsCache(path.join(dir, 'rootfs'), store);
      const results = await Promise.all([1, 2, 3].map(() => cache.ensure(img.manifestDigest)));
      for (const r of results) assert.equal(r.rootfs, results[0]!.rootfs);
      const rootfs = results[0]!.rootfs;
      assert.deepEqual(await tree(rootfs), ['etc d', 'etc/app f', 'etc/os f']);
      assert.deepEqual((await readdir(path.join(dir, 'rootfs'))).filter((n) => n.startsWith('.tmp-')), [], 'no temporary trees left');
      const ino = (await stat(rootfs)).ino;
      const t0 = performance.now();
      const again = await cache.ensure(img.manifestDigest);
      const ms = performance.now() - t0;
      assert.equal((await stat(again.rootfs)).ino, ino, 'not unpacked again');
      assert.ok(ms <= 50, `second resolve took ${ms.toFixed(1)} ms (must be ≤ 50 ms)`);
      assert.deepEqual(await cache.prune(new Set([img.manifestDigest])), []);
      assert.deepEqual(await cache.prune(new Set()), [img.manifestDigest]);
      assert.deepEqual(await readdir(path.join(dir, 'rootfs')), []);
    } finally {
      store.close();
    }
  });
});

test('RootfsCache: a hostile layer leaves no tree behind', async () => {
  await withTmp(async (dir) => {
    const store = new ImageStore(path.join(dir, 'store'));
    try {
      const evil = gzipLayer(await makeTar([{ name: 'l', type: 'symlink', linkname: '/etc' }, { name: 'l/berth-should-not-exist', content: 'x' }]));
      const img = makeImage([evil]);
      await storeImage(store, img);
      const cache = new RootfsCache(path.join(dir, 'rootfs'), store);
      await assert.rejects(cache.ensure(img.manifestDigest), HostileLayerError);
      assert.deepEqual(await readdir(path.join(dir, 'rootfs')), []);
      await assert.rejects(stat('/etc/berth-should-not-exist'));
    } finally {
      store.close();
    }
  });
});
