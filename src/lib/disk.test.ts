// Sparse copies from a data map (src/lib/disk.ts): filefrag's output read right, the copy equal to
// its source with the same holes, and nothing written where the copy cannot be right.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { closeSync, existsSync, mkdtempSync, openSync, readFileSync, rmSync, statSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { copyDataMap, dataMap, parseFilefrag } from './disk.js';

// (A microVM template's writable disk, as `filefrag -e` printed it.)
const SAMPLE = `Filesystem type is: ef53
File size of /t/rw.ext4 is 1073741824 (262144 blocks of 4096 bytes)
 ext:     logical_offset:        physical_offset: length:   expected: flags:
   0:        0..     131:   40919040..  40919171:    132:
   1:      132..     133:   40919173..  40919174:      2:   40919172:
   2:      136..     138:   40919176..  40919178:      3:
   3:   229376..  229377:   40939520..  40939521:      2:   41003008: last,unwritten
/t/rw.ext4: 3 extents found
`;

test('parseFilefrag: byte ranges from block extents, touching ones merged; anything else is no map', () => {
  assert.deepEqual(parseFilefrag(SAMPLE), {
    size: 1073741824,
    extents: [
      [0, 134 * 4096],
      [136 * 4096, 3 * 4096],
      [229376 * 4096, 2 * 4096],
    ],
  });
  // The last block of a file whose size is not a multiple of the block: only up to the size.
  assert.deepEqual(parseFilefrag('File size of f is 5000 (2 blocks of 4096 bytes)\n   0:        0..       1:      10..      11:      2:   last\n'), { size: 5000, extents: [[0, 5000]] });
  assert.deepEqual(parseFilefrag('File size of f is 0 (0 blocks of 4096 bytes)\nf: 0 extents found\n'), { size: 0, extents: [] });
  assert.equal(parseFilefrag('filefrag: Operation not supported\n'), undefined);
  // Out of order or overlapping: not filefrag's output, so no map (the caller copies with cp).
  assert.equal(parseFilefrag('File size of f is 81920 (20 blocks of 4096 bytes)\n   0:       10..      11:  1..  2:  2:\n   1:        0..       3:  5..  8:  4:\n'), undefined);
});

const sha = (p: string) => createHash('sha256').update(readFileSync(p)).digest('hex');

test('copyDataMap: the copy reads the same, keeps the holes, and never overwrites a file', async (t) => {
  const dir = mkdtempSync('/tmp/berth-disk-test-');
  try {
    const src = join(dir, 'src.img');
    const fd = openSync(src, 'w');
    writeSync(fd, Buffer.alloc(5000, 'a'), 0, 5000, 0);
    writeSync(fd, Buffer.alloc(10, 'b'), 0, 10, 2 ** 20 + 3);
    writeSync(fd, Buffer.alloc(5 * 2 ** 20 + 17, 'c'), 0, 5 * 2 ** 20 + 17, 40 * 2 ** 20); // (more than one 1 MiB buffer, and than one stretch between yields)
    closeSync(fd);
    truncateSync(src, 64 * 2 ** 20); // a hole at the end
    const map = await dataMap(src);
    if (!map) return t.skip('this file system has no extent map (FIEMAP)');
    assert.equal(map.size, 64 * 2 ** 20);
    const data = map.extents.reduce((a, [, len]) => a + len, 0);
    assert.ok(data >= 5000 + 10 + 5 * 2 ** 20 + 17 && data < 7 * 2 ** 20, `data ${data}`);

    const dst = join(dir, 'dst.img');
    await copyDataMap(src, dst, map);
    assert.equal(statSync(dst).size, statSync(src).size);
    assert.equal(sha(dst), sha(src));
    assert.ok(statSync(dst).blocks * 512 <= data + 64 * 1024, `the copy allocated ${statSync(dst).blocks * 512} bytes for ${data} of data`);
    assert.deepEqual(await dataMap(dst), map);

    // An existing destination is refused and left as it was.
    writeFileSync(join(dir, 'taken.img'), 'mine');
    await assert.rejects(copyDataMap(src, join(dir, 'taken.img'), map), /EEXIST/);
    assert.equal(readFileSync(join(dir, 'taken.img'), 'utf8'), 'mine');
    // A map that promises more data than the source has fails rather than copying zeros.
    await assert.rejects(copyDataMap(src, join(dir, 'short.img'), { size: 128 * 2 ** 20, extents: [[100 * 2 ** 20, 4096]] }), /shorter than its data map/);
    assert.equal(existsSync(join(dir, 'short.img')), false, 'a failed copy leaves no file');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
