// The host's channel to a microVM's agent (a virtio-serial port behind QEMU's unix socket) across
// host reconnections: the driver connects for a moment each time it signals or execs in a workload
// VM. Real QEMU, the real agent.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { connect } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { ensureBusyboxImage } from '../../images/busybox.js';
import { findAgent, findKernel } from './assets.js';
import { MicroVmDriver, QEMU } from './driver.js';

const skip = process.getuid?.() !== 0 ? 'needs root' : !existsSync(QEMU) || !findKernel() || !findAgent() ? 'needs QEMU, a guest kernel and the agent' : false;

describe('microVM agent channel', { skip }, () => {
  const id = 'chan';
  let base: string;
  let d: MicroVmDriver;

  before(async () => {
    base = mkdtempSync('/tmp/berth-chan-');
    d = new MicroVmDriver({ stateDir: join(base, 'state'), cgroupParent: `berth-chan-${randomBytes(4).toString('hex')}` });
    const img = await ensureBusyboxImage(join(base, 'images'));
    // A guest that is not idle, as in the conformance suite's stop() tests: the race was lost more often.
    const args = ['sh', '-c', 'while true; do sleep 0.1; done'];
    await d.start({ id, imageRootfs: img.rootfs, imageDigest: img.digest, args, env: {}, cwd: '/', user: { uid: 0, gid: 0 }, resources: {} });
  });
  after(async () => {
    if (!d) return;
    await d.destroy(id, { force: true }).catch(() => undefined);
    d.close();
    d.removeCgroupParent();
    rmSync(base, { recursive: true, force: true });
  });

  /** Connects, sends one request, disconnects; the time to the answer, or undefined when none came. */
  async function oneRequest(): Promise<number | undefined> {
    const t0 = performance.now();
    const conn = await d.agent(id, 2000);
    try {
      await conn.request({ type: 'list' }, 2000);
      return performance.now() - t0;
    } catch {
      return undefined;
    } finally {
      conn.close(); // as the driver does after a signal or an exec in a workload VM
    }
  }

  // An agent that closed and reopened its port at each disconnect lost ~1 request in 70 this way
  // (the guest kernel drops what is queued for a port when it is closed): a stop() then waited out
  // its timeout and escalated to SIGKILL.
  test('a host that reconnects at once loses no request (300 reconnections)', { timeout: 120_000 }, async () => {
    const lost: number[] = [];
    for (let i = 0; i < 300; i++) {
      if ((await oneRequest()) === undefined) lost.push(i);
      await sleep(2);
    }
    assert.deepEqual(lost, [], `requests with no answer, of 300: ${lost.join(', ')}`);
  });

  // While no host is connected the agent sleeps until the port's SIGIO, not in a polling loop (its
  // fallback is a 1 s timer): a host that comes back is answered at once.
  test('a host that comes back after a pause is answered without waiting for a poll', { timeout: 60_000 }, async () => {
    const times: number[] = [];
    for (let i = 0; i < 15; i++) {
      await sleep(100);
      const ms = await oneRequest();
      assert.ok(ms !== undefined, `request ${i} got no answer`);
      times.push(ms);
    }
    times.sort((a, b) => a - b);
    const p50 = times[times.length >> 1]!;
    assert.ok(p50 < 200, `median ${p50.toFixed(1)} ms from connecting to the answer (all: ${times.map((t) => t.toFixed(0)).join(', ')})`);
  });

  // A host that stops reading while the agent sends (a flood of output), then goes away: the agent's
  // blocked send must not finish into the host's next connection (the rest of a frame there would
  // break its framing), and the agent must serve that next connection.
  test('a host that leaves while the agent is blocked sending to it: the next connection starts clean', { timeout: 60_000 }, async () => {
    const raw = connect(join(base, 'state', 'tasks', id, 'agent.sock'));
    await new Promise<void>((resolve, reject) => raw.once('connect', resolve).once('error', reject));
    raw.pause(); // reads nothing: QEMU's socket fills, then the guest port, then the agent's send blocks
    const body = Buffer.from(JSON.stringify({ id: 'flood', type: 'run', args: ['sh', '-c', 'yes 0123456789abcdef0123456789abcdef0123456789abcdef'], env: {}, stdin: false }));
    const head = Buffer.alloc(4);
    head.writeUInt32BE(body.length);
    raw.write(Buffer.concat([head, body]));
    await sleep(1500);
    raw.destroy();
    await sleep(50);
    const conn = await d.agent(id, 5000);
    try {
      // Framing intact: answers arrive, also to a request sent after whatever the agent still had.
      for (let i = 0; i < 5; i++) await conn.request({ type: 'list' }, 5000);
      await conn.request({ type: 'signal', proc: 'flood', sig: 'SIGKILL', group: true }, 5000);
      await conn.request({ type: 'ping' }, 5000);
    } finally {
      conn.close();
    }
    assert.notEqual(await oneRequest(), undefined, 'answered after that');
  });
});
