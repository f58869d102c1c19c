import { test } from 'node:test';
import assert from 'node:assert/strict';
import { familiarRef, formatRef, parseRef } from './ref.js';

test('parseRef: normalizes like Docker', () => {
  assert.deepEqual(parseRef('busybox'), { registry: 'docker.io', repository: 'library/busybox', tag: 'latest' });
  assert.deepEqual(parseRef('user/app:1.2'), { registry: 'docker.io', repository: 'user/app', tag: '1.2' });
  assert.deepEqual(parseRef('127.0.0.1:5000/team/app:v1'), { registry: '127.0.0.1:5000', repository: 'team/app', tag: 'v1' });
  assert.deepEqual(parseRef('localhost/app'), { registry: 'localhost', repository: 'app', tag: 'latest' });
  const d = `sha256:${'a'.repeat(64)}`;
  assert.deepEqual(parseRef(`ghcr.io/o/r@${d}`), { registry: 'ghcr.io', repository: 'o/r', digest: d });
  assert.deepEqual(parseRef(`ghcr.io/o/r:t@${d}`), { registry: 'ghcr.io', repository: 'o/r', tag: 't', digest: d });
  assert.equal(formatRef(parseRef('busybox:1')), 'docker.io/library/busybox:1');
  assert.equal(familiarRef('docker.io/library/busybox:1'), 'busybox:1');
  assert.equal(familiarRef('docker.io/u/x:1'), 'u/x:1');
  assert.equal(familiarRef('127.0.0.1:5000/x:1'), '127.0.0.1:5000/x:1');
});

test('parseRef: invalid references are refused with what to fix', () => {
  const bad = ['', 'Upper', 'UPPER/Case', 'app:bad tag', 'app:-dash', 'app:.dot', `app:${'t'.repeat(129)}`, 'app@sha256:123', 'app@md5:abc', 'a//b', 'a/../b', 'app:ta/g', 'a b', 'x/$(rm)', 'app:t;ls'];
  for (const r of bad) {
    assert.throws(() => parseRef(r), (e: any) => e.code === 'invalid_argument' && /is invalid: .*; use \[registry/.test(e.message), r);
  }
});
