// runsc pins an empty network namespace for its gofers at <root>/null-netns (a bind mount); starts at
// the same time may stack several there. The last sandbox's destroy() removes them all: none may be
// left mounted, and none may make the destroy fail (it did, EBUSY, when only the top one was unmounted).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { GvisorDriver, findRunsc } from './driver.js';
import { isMountPoint, mountPointsUnder } from '../../lib/host.js';

const skip = process.getuid?.() !== 0 ? 'needs root' : !findRunsc() ? 'needs runsc' : undefined;

test("the last sandbox's destroy removes runsc's null-netns pins, stacked ones included", { skip }, async () => {
  const stateDir = mkdtempSync('/tmp/berth-nullnetns-');
  const driver = new GvisorDriver({ stateDir, cgroupParent: 'berth-nullnetns-test' });
  const pin = join(stateDir, 'runsc', 'null-netns');
  try {
    mkdirSync(join(stateDir, 'runsc'), { recursive: true });
    writeFileSync(pin, '');
    for (let i = 0; i < 3; i++) assert.equal(spawnSync('mount', ['--bind', '/proc/self/ns/net', pin]).status, 0);
    assert.equal(mountPointsUnder(stateDir).length, 3, 'three pins stacked');
    await driver.destroy('no-such-task', { force: true });
    assert.deepEqual(mountPointsUnder(stateDir), []);
    assert.equal(existsSync(pin), false);
  } finally {
    driver.close();
    while (isMountPoint(pin)) spawnSync('umount', ['-l', pin]);
    rmSync(stateDir, { recursive: true, force: true });
  }
});
