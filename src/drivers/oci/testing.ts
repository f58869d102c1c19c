// Test helpers for the OCI drivers' own tests (agentstart, destroy): a busybox rootfs in a temporary
// folder for the file's tests, and the check that a driver left nothing of a task behind.
import { after, before } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { ensureBusyboxImage } from '../../images/busybox.js';
import type { OciRuntimeDriver } from './driver.js';

/** A folder under /tmp with the busybox image unpacked in it, made before the file's tests (unless skipped) and removed after. */
export function busyboxFixture(prefix: string, skip: string | undefined): { base: string; rootfs: string } {
  const f = { base: '', rootfs: '' };
  before(async () => {
    if (skip) return;
    f.base = mkdtempSync(`/tmp/${prefix}-`);
    f.rootfs = (await ensureBusyboxImage(join(f.base, 'images'))).rootfs;
  });
  after(() => {
    if (f.base) rmSync(f.base, { recursive: true, force: true });
  });
  return f;
}

/** Nothing of the driver's is left: task folders, exit files, runtime state, the task's cgroups. */
export function assertClean(driver: OciRuntimeDriver, stateDir: string, id: string): void {
  for (const sub of ['tasks', 'exits', driver.name === 'gvisor' ? 'runsc' : 'runc']) {
    assert.deepEqual(readdirSync(join(stateDir, sub)), [], `${sub} is empty`);
  }
  for (const d of driver.cgroupDirs(id)) assert.equal(existsSync(d), false, `${d} is removed`);
}
