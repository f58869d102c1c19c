import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { lstat, mkdtemp, readdir, readFile, readlink, rm, stat, unlink } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { computeRootfsDigest, ensureBusyboxImage, imageConfig } from './busybox.js';

const execFileP = promisify(execFile);
const skip = !existsSync('/bin/busybox') && 'busybox-static not installed (apt-get install busybox-static)';

async function withTmp(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await mkdtemp(path.join(tmpdir(), 'berth-busybox-'));
  try {
    await fn(dir);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

async function allSymlinks(root: string): Promise<[string, string][]> {
  const out: [string, string][] = [];
  const walk = async (rel: string) => {
    for (const e of await readdir(path.join(root, rel), { withFileTypes: true })) {
      const r = path.join(rel, e.name);
      if (e.isSymbolicLink()) out.push([r, await readlink(path.join(root, r))]);
      else if (e.isDirectory()) await walk(r);
    }
  };
  await walk('');
  return out;
}

test('imageConfig: default process config', () => {
  assert.deepEqual(imageConfig(), {
    env: { PATH: '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' },
    cmd: ['sh'],
    workingDir: '/',
  });
});

test('ensureBusyboxImage: builds once, idempotent, deterministic digest', { skip }, async () => {
  await withTmp(async (dir) => {
    const t0 = performance.now();
    const a = await ensureBusyboxImage(dir);
    const firstMs = performance.now() - t0;
    assert.equal(a.name, 'busybox');
    assert.equal(a.rootfs, path.join(dir, 'busybox', 'rootfs'));
    assert.match(a.digest, /^sha256:[0-9a-f]{64}$/);
    assert.equal((await readFile(path.join(dir, 'busybox', 'digest'), 'utf8')).trim(), a.digest);
    const ino = (await stat(a.rootfs)).ino;

    const t1 = performance.now();
    const b = await ensureBusyboxImage(dir);
    const secondMs = performance.now() - t1;
    assert.deepEqual(b, a);
    assert.equal((await stat(a.rootfs)).ino, ino, 'second call must not rebuild');
    assert.ok(secondMs < firstMs, `second call (${secondMs.toFixed(1)} ms) should be faster than the build (${firstMs.toFixed(1)} ms)`);
    assert.deepEqual((await readdir(path.join(dir, 'busybox'))).sort(), ['digest', 'rootfs']);

    // Same inputs, fresh directory: same digest; and the digest matches the tree.
    await withTmp(async (dir2) => {
      assert.equal((await ensureBusyboxImage(dir2)).digest, a.digest);
    });
    assert.equal(await computeRootfsDigest(a.rootfs), a.digest);

    // A rootfs whose digest file went missing gets it recomputed.
    await unlink(path.join(dir, 'busybox', 'digest'));
    assert.equal((await ensureBusyboxImage(dir)).digest, a.digest);
  });
});

test('ensureBusyboxImage: rootfs layout', { skip }, async () => {
  await withTmp(async (dir) => {
    const { rootfs } = await ensureBusyboxImage(dir);
    const sh = await lstat(path.join(rootfs, 'bin/sh'));
    assert.ok(sh.isSymbolicLink());
    assert.equal(await readlink(path.join(rootfs, 'bin/sh')), 'busybox');
    const bb = await lstat(path.join(rootfs, 'bin/busybox'));
    assert.ok(bb.isFile());
    assert.equal(bb.mode & 0o777, 0o755);

    const links = await allSymlinks(rootfs);
    assert.ok(links.length > 50, `only ${links.length} applet links`);
    for (const [p, target] of links) {
      assert.ok(!path.isAbsolute(target), `${p} -> ${target} must be relative`);
      assert.equal(target, 'busybox', `${p} -> ${target}`);
      assert.equal(path.dirname(p), 'bin');
    }
    for (const applet of ['ls', 'cat', 'id', 'grep', 'wc', 'hostname', '[']) {
      assert.ok(links.some(([p]) => p === `bin/${applet}`), `missing applet ${applet}`);
    }

    const passwd = await readFile(path.join(rootfs, 'etc/passwd'), 'utf8');
    assert.match(passwd, /^root:x:0:0:root:\/root:\/bin\/sh$/m);
    assert.match(passwd, /^nobody:x:65534:65534:nobody:\/nonexistent:\/bin\/false$/m);
    assert.match(passwd, /^berth:x:1000:1000:/m);
    assert.match(await readFile(path.join(rootfs, 'etc/group'), 'utf8'), /^root:x:0:$/m);
    assert.match(await readFile(path.join(rootfs, 'etc/hosts'), 'utf8'), /^127\.0\.0\.1\s+localhost$/m);
    assert.equal(await readFile(path.join(rootfs, 'etc/resolv.conf'), 'utf8'), '');

    assert.equal((await stat(path.join(rootfs, 'tmp'))).mode & 0o7777, 0o1777);
    assert.equal((await stat(path.join(rootfs, 'root'))).mode & 0o7777, 0o700);
    for (const d of ['proc', 'sys', 'dev']) assert.deepEqual(await readdir(path.join(rootfs, d)), [], `${d} must be empty`);
    for (const d of ['sbin', 'usr/bin', 'usr/sbin', 'home', 'etc']) assert.ok((await stat(path.join(rootfs, d))).isDirectory(), d);

    // The applet links work: run the image's sh (through its relative symlink) on the host.
    const { stdout } = await execFileP(path.join(rootfs, 'bin/sh'), ['-c', 'echo hello from $0']);
    assert.match(stdout, /^hello from /);
  });
});

test('ensureBusyboxImage: concurrent callers agree and leave no temporary directories', { skip }, async () => {
  await withTmp(async (dir) => {
    const results = await Promise.all([1, 2, 3, 4].map(() => ensureBusyboxImage(dir)));
    for (const r of results) assert.deepEqual(r, results[0]);
    assert.deepEqual((await readdir(path.join(dir, 'busybox'))).sort(), ['digest', 'rootfs']);
    assert.equal(await computeRootfsDigest(results[0]!.rootfs), results[0]!.digest);
  });
});
