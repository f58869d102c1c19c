// Which /tmp the gVisor driver binds onto itself (driver.ts, tmpIsDirectory): the overlay's /tmp when it
// is a real directory — the upper layer's if it has one, else the image's — made (mode 1777) when
// neither has one; never a symbolic link (the bind would follow it on the host) or another file.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { tmpIsDirectory } from './driver.js';

test('/tmp is bound only when the overlay shows a real directory there', () => {
  const base = mkdtempSync('/tmp/berth-gvisor-tmp-');
  try {
    const layers = (name: string) => {
      const upper = join(base, name, 'upper');
      const lower = join(base, name, 'lower');
      mkdirSync(upper, { recursive: true });
      mkdirSync(lower, { recursive: true });
      return { upper, lower };
    };
    const plain = layers('plain');
    mkdirSync(join(plain.lower, 'tmp'));
    assert.equal(tmpIsDirectory(plain.upper, plain.lower), true, "the image's /tmp");

    const none = layers('none');
    assert.equal(tmpIsDirectory(none.upper, none.lower), true, 'made when neither layer has one');
    assert.equal(statSync(join(none.upper, 'tmp')).mode & 0o7777, 0o1777);

    const planted = layers('planted');
    mkdirSync(join(planted.lower, 'tmp'));
    symlinkSync('/etc', join(planted.upper, 'tmp')); // the workload replaced it in its layer
    assert.equal(tmpIsDirectory(planted.upper, planted.lower), false, 'a symbolic link in the upper layer wins, and is refused');

    const linked = layers('linked');
    symlinkSync('/var/tmp', join(linked.lower, 'tmp'));
    assert.equal(tmpIsDirectory(linked.upper, linked.lower), false, "an image whose /tmp is a link");

    const file = layers('file');
    writeFileSync(join(file.upper, 'tmp'), '');
    assert.equal(tmpIsDirectory(file.upper, file.lower), false, 'a plain file');
  } finally {
    rmSync(base, { recursive: true, force: true });
  }
});
