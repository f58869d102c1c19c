// destroy() must not forget a task whose runtime state it could not delete (a `runc delete` that
// failed or ran out of time on a loaded host): it throws, the task's state stays, and a later call —
// the reconcilers retry — removes everything. Real runc behind a wrapper that fails `delete` on demand.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { chmodSync, existsSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { assertClean, busyboxFixture } from './testing.js';
import { RuncDriver } from '../runc/driver.js';

const skip = process.getuid?.() !== 0 ? 'needs root' : !existsSync('/usr/sbin/runc') ? 'needs runc' : undefined;

const cgroupParent = `berth-destroy-${randomBytes(3).toString('hex')}`;
const fx = busyboxFixture('berth-destroy', skip);

test('a failed runtime delete is reported and retried, not forgotten', { skip }, async () => {
  const failFlag = join(fx.base, 'fail-delete');
  const wrapper = join(fx.base, 'runc-wrapper');
  writeFileSync(wrapper, `#!/bin/sh\nfor a in "$@"; do [ "$a" = delete ] && [ -e '${failFlag}' ] && { echo "injected failure" >&2; exit 1; }; done\nexec /usr/sbin/runc "$@"\n`);
  chmodSync(wrapper, 0o755);
  const stateDir = join(fx.base, 'state');
  const driver = new RuncDriver({ stateDir, cgroupParent, runtimePath: wrapper });
  const id = `del-${randomBytes(3).toString('hex')}`;
  try {
    await driver.start({ id, imageRootfs: fx.rootfs, args: ['sleep', '1000'], env: {}, cwd: '/', user: { uid: 0, gid: 0 }, resources: { memoryMiB: 64 } });
    writeFileSync(failFlag, '');
    await assert.rejects(driver.destroy(id, { force: true }), (e: Error & { code?: string }) => {
      assert.equal(e.code, 'unavailable');
      assert.match(e.message, new RegExp(`runc-wrapper delete ${id} failed \\(exit 1: injected failure\\); it is retried`));
      return true;
    });
    assert.ok(readdirSync(join(stateDir, 'runc')).includes(id), 'the runtime state is still there');
    assert.ok(existsSync(join(stateDir, 'tasks', id)), 'and so is the task folder, for the next call');
    rmSync(failFlag);
    await driver.destroy(id, { force: true });
    assertClean(driver, stateDir, id);
  } finally {
    rmSync(failFlag, { force: true });
    await driver.destroy(id, { force: true }).catch(() => undefined);
    driver.removeCgroupParent();
    driver.close();
  }
});
