// A sandbox task's start answers once its runtime runs the agent; the agent is connected to in the
// background and the first agent call waits for it (driver.ts, start() and connectStarted()).
// Real runc, real agent, real cgroups; skipped without root, runc or the agent.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { chmodSync, existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { assertClean, busyboxFixture } from './testing.js';
import { agentAtLeast, findAgent } from '../agent/binary.js';
import { AgentConnection } from '../agent/client.js';
import { RuncDriver } from '../runc/driver.js';
import { GvisorDriver, findRunsc } from '../gvisor/driver.js';
import type { OciRuntimeDriver } from './driver.js';
import type { TaskConfig } from '../../core/driver.js';
import type { AgentFrame } from '../agent/client.js';

const skip =
  process.getuid?.() !== 0 ? 'needs root' : !existsSync('/usr/sbin/runc') ? 'needs runc' : !findAgent() ? 'needs the guest agent (scripts/setup.sh)' : !existsSync('/usr/bin/conmon') ? 'needs conmon' : undefined;

const cgroupParent = `berth-agentstart-${randomBytes(3).toString('hex')}`;
const fx = busyboxFixture('berth-agentstart', skip);

const task = (id: string): TaskConfig => ({ id, imageRootfs: fx.rootfs, args: [], env: {}, cwd: '/', user: { uid: 0, gid: 0 }, resources: { memoryMiB: 64 }, sandbox: true });

/** One sandbox task on its own driver (runc unless `make` says otherwise): `body` runs against it, then it must go without residue. */
async function withSandbox(
  name: string,
  body: (driver: OciRuntimeDriver, id: string, stateDir: string) => Promise<void>,
  make: (o: { stateDir: string; cgroupParent: string }) => OciRuntimeDriver = (o) => new RuncDriver(o),
): Promise<void> {
  const stateDir = join(fx.base, name);
  const driver = make({ stateDir, cgroupParent });
  const id = `as-${randomBytes(3).toString('hex')}`;
  try {
    await body(driver, id, stateDir);
    await driver.destroy(id, { force: true });
    assertClean(driver, stateDir, id);
  } finally {
    await driver.destroy(id, { force: true }).catch(() => undefined);
    driver.removeCgroupParent();
    driver.close();
  }
}

test('the first command after a start waits for the agent and runs through it', { skip }, () =>
  withSandbox('ok', async (driver, id) => {
    const h = await driver.start(task(id));
    assert.equal(h.state?.sandbox, true);
    // Right after the start (the agent may not listen yet): the call waits for it.
    const agent = await driver.agent(id, 5000);
    const events: AgentFrame[] = [];
    const exit = await agent.request({ id: 'first', type: 'run', args: ['echo', 'ready'], env: {}, cwd: '/', stdin: false }, 10_000, undefined, (f) => void events.push(f));
    assert.equal(exit.code, 0);
    assert.deepEqual(events.map((e) => e.type), ['started', 'stdout']);
    assert.equal(Buffer.from(String(events[1]!.data), 'base64').toString(), 'ready\n');
  }),
);

/** The agent of a sandbox started by `driver` serves the socket pair it was started with, which the commands it runs do not inherit. */
async function checkConnFd(driver: OciRuntimeDriver, id: string, stateDir: string): Promise<void> {
  await driver.start(task(id));
  let out = '';
  const agent = await driver.agent(id, 5000);
  // PID 1 is the agent, told to serve fd 3; fd 3 is a socket (the pair's other end is berthd's), shown
  // by gVisor as the host file it imported ("host:[N]").
  const script = 'tr "\\0" " " </proc/1/cmdline; echo; readlink /proc/1/fd/3; for f in /proc/$$/fd/*; do readlink $f; done; true';
  const exit = await agent.request({ id: 'fds', type: 'run', args: ['sh', '-c', script], env: {}, cwd: '/', stdin: false }, 10_000, undefined, (f) => {
    if (f.type === 'stdout') out += Buffer.from(String(f.data), 'base64').toString();
  });
  assert.equal(exit.code, 0);
  const [cmdline, fd3, ...own] = out.trim().split('\n');
  assert.match(cmdline!, /--conn-fd 3/);
  assert.match(fd3!, /^(socket|host):/);
  assert.ok(own.length >= 3 && own.every((l) => !/^(socket|host):/.test(l)), `the command's own fds hold no socket: ${own.join(', ')}`);
  // The agent still listens on its socket: a second connection (after a broken one, or a restart of berthd) works.
  const again = await AgentConnection.open(join(stateDir, 'tasks', id, 'run', 'agent.sock'), 5000);
  try {
    assert.equal((await again.request({ type: 'ping' }, 5000)).type, 'ok');
  } finally {
    again.close();
  }
}

test("a sandbox's agent gets its host connection at start, and the commands it runs do not inherit it", { skip: skip ?? (!agentAtLeast(findAgent() ?? '', '0.2.0') ? 'needs agent 0.2.0 (scripts/setup.sh)' : undefined) }, () =>
  withSandbox('connfd', checkConnFd),
);

test("gVisor: a sandbox's agent gets its host connection at start (runsc --pass-fd), and the commands it runs do not inherit it", { skip: skip ?? (!findRunsc() ? 'needs runsc' : !agentAtLeast(findAgent() ?? '', '0.3.0') ? 'needs agent 0.3.0 (scripts/setup.sh)' : undefined) }, () =>
  withSandbox('connfd-gvisor', checkConnFd, (o) => new GvisorDriver(o)),
);

test("a start answers with the container init's pid; stop and destroy right after it clean up", { skip }, async () => {
  const stateDir = join(fx.base, 'early');
  const driver = new RuncDriver({ stateDir, cgroupParent });
  try {
    for (let i = 0; i < 3; i++) {
      const id = `as-${randomBytes(3).toString('hex')}`;
      const h = await driver.start(task(id));
      // The pid is the container's init (PID 1 inside), known before `runc create` has written its pid file.
      const status = readFileSync(`/proc/${h.pid}/status`, 'utf8');
      assert.match(status, /^NSpid:\s+\d+\s+1$/m, `pid ${h.pid} is the container's init`);
      // At once: stop (runc kill) and destroy (runc delete) need the runtime's state, saved at the end of
      // create, which may still be finishing (they wait for it: afterCreate(); the window is too short
      // to hit on purpose here).
      const exit = await driver.stop(h, { timeoutMs: 2000, signal: 'SIGKILL' });
      assert.equal(exit.signal, 'SIGKILL');
      await driver.destroy(id, { force: true });
      assertClean(driver, stateDir, id);
    }
  } finally {
    driver.removeCgroupParent();
    driver.close();
  }
});

test('an agent that never listens fails the first agent call with a clear error, and is cleaned up', { skip }, async () => {
  const stateDir = join(fx.base, 'deaf');
  // The sandbox's agent is this script (bind-mounted at /.berth/agent, run by the image's sh): it
  // never listens. Debian's conmon supervises, so the real agent is not needed as the monitor.
  const deaf = join(fx.base, 'deaf-agent');
  writeFileSync(deaf, '#!/bin/sh\nexec sleep 600\n');
  chmodSync(deaf, 0o755);
  const saved = process.env.BERTH_AGENT;
  process.env.BERTH_AGENT = deaf;
  const driver = new RuncDriver({ stateDir, cgroupParent, monitor: 'conmon', agentStartTimeoutMs: 1500 });
  const id = `as-${randomBytes(3).toString('hex')}`;
  try {
    await driver.start(task(id)); // the runtime runs it: the start does not wait for the agent
    const t0 = Date.now();
    await assert.rejects(driver.agent(id, 5000), (e: Error & { code?: string }) => {
      assert.equal(e.code, 'unavailable');
      assert.match(e.message, /agent did not start/);
      return true;
    });
    assert.ok(Date.now() - t0 < 5000, 'fails after agentStartTimeoutMs');
    await driver.destroy(id, { force: true });
    assertClean(driver, stateDir, id);
  } finally {
    if (saved === undefined) delete process.env.BERTH_AGENT;
    else process.env.BERTH_AGENT = saved;
    await driver.destroy(id, { force: true }).catch(() => undefined);
    driver.removeCgroupParent();
    driver.close();
  }
});
