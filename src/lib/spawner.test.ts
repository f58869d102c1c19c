// The spawner (src/lib/spawner.ts): tools run in its process give what run() in berthd gives; a
// long-lived process started there (QEMU) runs as one started here would, and its end is told; a
// spawner that dies fails the calls in flight with a clear error and is started again; closed,
// its process is gone.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { runHere, startDetachedHere, type StartOptions } from './exec.js';
import { Spawner } from './spawner.js';

const gone = async (pid: number) => {
  for (let i = 0; i < 100; i++) {
    try {
      process.kill(pid, 0);
    } catch {
      return true;
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  return false;
};

test('the spawner runs tools as run() does: output, input, exit code, env, cwd, a missing tool, a timeout', async () => {
  const s = new Spawner();
  try {
    const pid = s.pid()!;
    for (const [file, args, opts] of [
      ['sh', ['-c', 'echo out; echo err >&2; exit 3'], {}],
      ['cat', [], { input: 'from stdin\n' }],
      ['sh', ['-c', 'echo "$X $(pwd)"'], { env: { X: 'x-value', PATH: process.env.PATH }, cwd: '/tmp' }],
    ] as const) {
      const here = await runHere(file, [...args], opts);
      assert.deepEqual(await s.run(file, [...args], opts), here);
    }
    const r = await s.run('sh', ['-c', 'echo $PPID']);
    assert.equal(Number(r.stdout.trim()), pid, 'started by the spawner, not by this process');
    await assert.rejects(s.run('/nonexistent/tool', []), (e: NodeJS.ErrnoException) => e.code === 'ENOENT');
    const t0 = Date.now();
    assert.equal((await s.run('sleep', ['10'], { timeoutMs: 200 })).code, 137);
    assert.ok(Date.now() - t0 < 5000);
  } finally {
    s.close();
  }
});

test('a spawner that dies fails the calls in flight and is started again; closed, it is gone', async () => {
  const s = new Spawner();
  const first = s.pid()!;
  const inFlight = s.run('sleep', ['5']);
  await new Promise((r) => setTimeout(r, 200));
  process.kill(first, 'SIGKILL');
  await assert.rejects(inFlight, /spawner process exited \(SIGKILL\) before the tool's result came back/);
  assert.ok(await gone(first));
  assert.equal((await s.run('echo', ['again'])).stdout, 'again\n');
  const second = s.pid()!;
  assert.notEqual(second, first);
  s.close();
  assert.ok(await gone(second), 'closed: its process ended');
  await assert.rejects(s.run('true', []), /closed/);
});

test('startDetached, in the spawner and here: a session of its own, stderr to a file, files as descriptors 3…, its end told while watched', async () => {
  const dir = mkdtempSync('/tmp/berth-spawner-test-');
  const s = new Spawner();
  const alive = setInterval(() => undefined, 1000); // (a started process, watched or not, does not keep this one running: berthd's server does)
  try {
    writeFileSync(join(dir, 'stream'), 'the stream\n');
    for (const [where, start] of [
      ['spawner', (f: string, a: string[], o: StartOptions) => s.startDetached(f, a, o)],
      ['here', startDetachedHere],
    ] as const) {
      const stderrFile = join(dir, `${where}.stderr`);
      // Reads descriptor 3, says so on stderr, and tells its process group and session.
      const p = await start('sh', ['-c', 'cat <&3 >&2; cut -d" " -f5,6 /proc/$$/stat >&2; exit 7'], { cwd: dir, stderrFile, fdFiles: [join(dir, 'stream')] });
      assert.equal(await p.exited, 'exit 7', where);
      const [said, ids] = readFileSync(stderrFile, 'utf8').trim().split('\n');
      assert.equal(said, 'the stream', where);
      assert.deepEqual(ids!.trim().split(/\s+/).map(Number), [p.pid, p.pid], `${where}: its own session and group`);
      if (where === 'spawner') {
        const r = await s.run('sh', ['-c', 'echo $PPID']);
        assert.equal(Number(r.stdout.trim()), s.pid());
      }
      // Unwatched, a process that ends is not told (and is reaped all the same).
      const q = await start('sleep', ['0.2'], { stderrFile });
      q.unwatch();
      const told = await Promise.race([q.exited.then(() => true), new Promise((r) => setTimeout(() => r(false), 600))]);
      assert.equal(told, false, where);
      assert.ok(await gone(q.pid), `${where}: reaped`);
      await assert.rejects(start('/nonexistent/qemu', [], { stderrFile }), (e: NodeJS.ErrnoException) => e.code === 'ENOENT', where);
      // A process that ends at once: its end is told all the same (its report follows the reply closely).
      const quick = await Promise.all(Array.from({ length: 20 }, () => start('true', [], { stderrFile }).then((x) => Promise.race([x.exited, new Promise((r) => setTimeout(() => r('not told'), 3000))]))));
      assert.deepEqual(quick, Array(20).fill('exit 0'), where);
    }
  } finally {
    clearInterval(alive);
    s.close();
    rmSync(dir, { recursive: true, force: true });
  }
});
