// The microVM boot limit counts the CPU time QEMU spent, not wall time (a boot starved by twenty
// others on two cores is slow, not hung): over the limit the start fails with the reason and leaves
// nothing behind. Real QEMU, real cgroups.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { ensureBusyboxImage } from '../../images/busybox.js';
import { cgroupHierarchies } from '../../lib/host.js';
import type { TaskConfig } from '../../core/driver.js';
import { findAgent, findKernel } from './assets.js';
import { MicroVmDriver, QEMU } from './driver.js';

const skip = process.getuid?.() !== 0 ? 'needs root' : !existsSync(QEMU) || !findKernel() || !findAgent() ? 'needs QEMU, a guest kernel and the agent' : false;

test('a boot over its CPU-time limit fails with the reason and leaves no task, process or cgroup', { skip, timeout: 120_000 }, async () => {
  const base = mkdtempSync('/tmp/berth-boot-');
  const cgroupParent = `berth-boot-${randomBytes(4).toString('hex')}`;
  const d = new MicroVmDriver({ stateDir: join(base, 'state'), cgroupParent, bootTimeoutMs: 200 });
  try {
    const img = await ensureBusyboxImage(join(base, 'images'));
    const cfg: TaskConfig = { id: 'boot-cpu', imageRootfs: img.rootfs, imageDigest: img.digest, args: ['sleep', '30'], env: {}, cwd: '/', user: { uid: 0, gid: 0 }, resources: { memoryMiB: 128 } };
    // A boot under TCG takes ~2 s of CPU before the agent answers: 200 ms is not enough.
    await assert.rejects(d.start(cfg), /agent did not answer although the VM used \d+\.\d s of CPU booting \(limit: 200 ms of CPU time\)/);
    assert.deepEqual(await d.listTasks(), []);
    for (const h of cgroupHierarchies()) assert.deepEqual(existsSync(join(h, cgroupParent)) ? readdirSync(join(h, cgroupParent), { withFileTypes: true }).filter((e) => e.isDirectory()).map((e) => e.name) : [], [], `no task cgroup left in ${h}`);
  } finally {
    d.close();
    d.removeCgroupParent();
    rmSync(base, { recursive: true, force: true });
  }
});
