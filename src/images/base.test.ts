// Base images: the host's APT sources are read (one-line and deb822 formats) and nothing else;
// the busybox micro image is a normal, cached OCI image; the Debian image (mmdebstrap from the
// host's mirror: set BERTH_TEST_MIRROR=1 to run it, it downloads ~30 MB) is slim and cached.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, lstatSync, readFileSync, readdirSync } from 'node:fs';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { hostMirrors, validateDebian } from './base.js';
import { ImageService } from './catalog.js';

test('hostMirrors: deb lines of the suite and its -updates/-security, from sources.list and sources.list.d', async () => {
  const dir = await mkdtemp(path.join(tmpdir(), 'berth-apt-'));
  try {
    await mkdir(path.join(dir, 'sources.list.d'));
    await writeFile(path.join(dir, 'sources.list'), '# comment\ndeb http://mirror.example/debian bookworm main contrib\ndeb-src http://mirror.example/debian bookworm main\ndeb [arch=amd64] http://other.example/debian trixie main\n');
    await writeFile(
      path.join(dir, 'sources.list.d', 'debian.sources'),
      'Types: deb\nURIs: http://deb.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\nTypes: deb\nURIs: http://sec.example/debian-security\nSuites: bookworm-security\nComponents: main\nEnabled: no\n\nTypes: deb-src\nURIs: http://src.example/\nSuites: bookworm\n',
    );
    await writeFile(path.join(dir, 'sources.list.d', 'x.list.disabled'), 'deb http://nope.example/ bookworm main\n');
    assert.deepEqual(hostMirrors('bookworm', dir), [
      { uri: 'http://mirror.example/debian', suite: 'bookworm', components: ['main', 'contrib'] },
      { uri: 'http://deb.example/debian', suite: 'bookworm', components: ['main'] },
      { uri: 'http://deb.example/debian', suite: 'bookworm-updates', components: ['main'] },
    ]);
    assert.deepEqual(hostMirrors('bullseye', dir), []);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('validateDebian refuses bad suites and package names', () => {
  assert.throws(() => validateDebian('Bookworm; rm -rf /', []), /not a Debian suite/);
  assert.throws(() => validateDebian('bookworm', ['ok', '--option']), /not a Debian package name/);
  validateDebian('bookworm', ['postgresql-15', 'libstdc++6']);
});

async function withService(fn: (s: ImageService) => Promise<void>): Promise<void> {
  const dir = await mkdtemp(path.join(tmpdir(), 'berth-base-'));
  const s = new ImageService(dir);
  try {
    await fn(s);
  } finally {
    s.close();
    await rm(dir, { recursive: true, force: true });
  }
}

test('base busybox: a tagged OCI image with the busybox tree, cached the second time', { skip: existsSync('/bin/busybox') ? false : 'busybox-static not installed' }, async () => {
  await withService(async (s) => {
    const first = await s.makeBase({ kind: 'busybox', log: () => undefined });
    assert.equal(first.ref, 'localhost/busybox:latest');
    assert.equal(first.cached, false);
    assert.equal(first.layers, 1);
    assert.equal(first.unpacked, true);
    assert.deepEqual(first.config.cmd, ['sh']);
    assert.equal(first.labels['org.berth.base'], 'busybox');
    const root = s.rootfs.pathFor(first.digest);
    assert.equal(lstatSync(path.join(root, 'bin/sh')).isSymbolicLink(), true);
    assert.equal(lstatSync(path.join(root, 'tmp')).mode & 0o7777, 0o1777);
    const again = await s.makeBase({ kind: 'busybox', tag: 'localhost/bb:2', log: () => undefined });
    assert.equal(again.cached, true);
    assert.equal(again.digest, first.digest);
    assert.equal(again.ref, 'localhost/bb:2');
    await assert.rejects(s.makeBase({ kind: 'busybox', include: ['x'], log: () => undefined }), /kind "debian" only/);
  });
});

test('base debian: minbase from the host mirror, docs/man/locales left out, cached', { skip: process.env.BERTH_TEST_MIRROR === '1' && existsSync('/usr/bin/mmdebstrap') ? false : 'set BERTH_TEST_MIRROR=1 (needs mmdebstrap and the host’s Debian mirror)' }, async () => {
  await withService(async (s) => {
    const logs: string[] = [];
    const img = await s.makeBase({ kind: 'debian', tag: 'localhost/debian:slim', log: (l) => logs.push(l) });
    assert.equal(img.cached, false);
    assert.ok(logs.some((l) => /^mmdebstrap --variant=minbase/.test(l)));
    const mirrors = hostMirrors('bookworm').map((m) => m.uri);
    const sources = readFileSync(path.join(s.rootfs.pathFor(img.digest), 'etc/apt/sources.list'), 'utf8');
    for (const uri of sources.match(/https?:\/\/\S+/g) ?? []) assert.ok(mirrors.includes(uri), `${uri} comes from the host's APT sources`);
    const root = s.rootfs.pathFor(img.digest);
    assert.equal(existsSync(path.join(root, 'usr/share/man/man1')), false);
    assert.deepEqual(readdirSync(path.join(root, 'usr/share/doc/bash')), ['copyright']);
    assert.equal(existsSync(path.join(root, 'usr/bin/apt-get')), true);
    assert.equal(lstatSync(path.join(root, 'bin')).isSymbolicLink(), true, 'merged /usr');
    assert.deepEqual(readdirSync(path.join(root, 'dev')), []);
    const again = await s.makeBase({ kind: 'debian', log: () => undefined });
    assert.equal(again.cached, true);
    assert.equal(again.digest, img.digest);
    assert.equal(again.ref, 'localhost/debian:bookworm');
    assert.deepEqual(readdirSync(path.join(s.dir, 'base')).filter((n) => n.startsWith('.tmp-')), [], 'work trees removed');
  });
});
