// A reusable conformance suite for RuntimeDriver implementations.
//
// Every isolation tier (runc, gVisor, microVM) runs the SAME tests through this function, so the
// suite only talks to the RuntimeDriver interface (plus logPath). Checks that depend on what a
// tier can do are guarded on `driver.capabilities`; the optional `stats(id)` method some drivers
// have is duck-typed (`'stats' in driver`).
//
// Usage (from a *.test.ts file):
//   runConformanceSuite('runc', async () => ({ driver, imageRootfs, cleanup, residue, reopen }));
//
// The image must be a busybox-like root file system: sh, echo, id, pwd, sleep, cat, uname, tr,
// mkfifo and test, with /tmp writable by everyone and /etc/hosts present.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { release } from 'node:os';
import { join } from 'node:path';
import { parseLogLine } from '../../api/logs.js';
import type { ExitResult, RuntimeDriver, TaskConfig, TaskHandle } from '../../core/driver.js';

export interface ConformanceEnv {
  driver: RuntimeDriver;
  /** Read-only image root file system (busybox) to start tasks from. */
  imageRootfs: string;
  /** Destroy whatever is left, close the driver(s), remove everything the environment created. */
  cleanup: () => Promise<void>;
  /** Everything the driver left on the host (mounts, state entries, processes, cgroups); empty when clean. */
  residue: () => string[];
  /**
   * Optional: a NEW driver instance over the same host state (what berthd gets after a restart).
   * The recover tests are skipped without it. Instances are closed with their `close()` method, if
   * any, when the test is done with them; cleanup() should close any it still tracks.
   */
  reopen?: () => RuntimeDriver | Promise<RuntimeDriver>;
}

/** Optional driver extension (runc has it): resource usage of a task's cgroup. */
interface StatsCapable {
  stats(id: string): Promise<{ cpuUsageNs?: number; memoryBytes?: number; pids?: number }>;
}

function hasStats(d: RuntimeDriver): d is RuntimeDriver & StatsCapable {
  return 'stats' in d && typeof (d as { stats?: unknown }).stats === 'function';
}

function closeDriver(d: RuntimeDriver): void {
  const c = (d as { close?: unknown }).close;
  if (typeof c === 'function') (c as () => void).call(d);
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** A log record with partial (P) lines of the same stream joined to the full line they belong to. */
interface Line {
  time: string;
  stream: 'stdout' | 'stderr';
  text: string;
}

/** Reads and parses the task's k8s-file log; returns [] when there is none yet. */
export async function readTaskLog(driver: RuntimeDriver, id: string): Promise<Line[]> {
  let raw: string;
  try {
    raw = await readFile(driver.logPath(id), 'utf8');
  } catch {
    return [];
  }
  const out: Line[] = [];
  const pending: Partial<Record<'stdout' | 'stderr', Line>> = {};
  for (const l of raw.split('\n')) {
    const p = parseLogLine(l);
    if (!p) continue;
    const prev = pending[p.stream];
    const line: Line = prev ? { ...prev, text: prev.text + p.text } : { time: p.time, stream: p.stream, text: p.text };
    if (p.partial) pending[p.stream] = line;
    else {
      delete pending[p.stream];
      out.push(line);
    }
  }
  for (const l of Object.values(pending)) if (l) out.push(l); // output without a final newline
  return out;
}

/** Polls the log until `done(lines)` holds or the timeout passes; returns the last lines read. */
async function waitForLog(driver: RuntimeDriver, id: string, done: (lines: Line[]) => boolean, timeoutMs = 5000): Promise<Line[]> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const lines = await readTaskLog(driver, id);
    if (done(lines) || Date.now() > deadline) return lines;
    await sleep(50);
  }
}

const stdoutOf = (lines: Line[]) => lines.filter((l) => l.stream === 'stdout').map((l) => l.text);

/** RFC 3339 timestamp with up to nanosecond precision → nanoseconds since the epoch. */
function timeNs(s: string): bigint {
  const m = /^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:?\d\d)$/.exec(s);
  assert.ok(m, `log timestamp ${JSON.stringify(s)} is not RFC 3339`);
  const ms = Date.parse(`${m[1]}${m[3]}`);
  assert.ok(Number.isFinite(ms), `log timestamp ${JSON.stringify(s)} does not parse`);
  return BigInt(ms) * 1_000_000n + BigInt((m[2] ?? '').padEnd(9, '0'));
}

/** Runs `fn` and rejects if it takes longer than `ms` (the promise itself keeps running). */
async function within<T>(ms: number, what: string, fn: () => Promise<T>): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      fn(),
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`${what} did not finish within ${ms} ms`)), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

export function runConformanceSuite(name: string, makeDriver: () => Promise<ConformanceEnv>): void {
  describe(`${name} driver conformance`, () => {
    let env: ConformanceEnv;
    let driver: RuntimeDriver;

    before(async () => {
      env = await makeDriver();
      driver = env.driver;
    });
    after(async () => {
      await env?.cleanup();
    });

    const newId = () => `conf-${randomBytes(5).toString('hex')}`;
    const cfg = (id: string, args: string[], over: Partial<TaskConfig> = {}): TaskConfig => ({
      id,
      imageRootfs: env.imageRootfs,
      args,
      env: {},
      cwd: '/',
      user: { uid: 0, gid: 0 },
      resources: {},
      ...over,
    });
    const sh = (script: string) => ['sh', '-c', script];
    /** Start a task, run `body`, always destroy the task afterwards. */
    async function withTask(config: TaskConfig, body: (h: TaskHandle) => Promise<void>): Promise<void> {
      try {
        const h = await driver.start(config);
        await body(h);
      } finally {
        await driver.destroy(config.id, { force: true });
      }
    }
    /** Wait for a line the workload prints once it is ready (e.g. after installing a trap). */
    async function waitReady(id: string, marker = 'ready'): Promise<void> {
      const lines = await waitForLog(driver, id, (ls) => stdoutOf(ls).includes(marker), 10_000);
      assert.ok(stdoutOf(lines).includes(marker), `task ${id} never printed ${marker}; log: ${JSON.stringify(lines)}`);
    }
    const assertSignal = (r: ExitResult, code: number, sig: string) => {
      assert.equal(r.exitCode, code, `exit result ${JSON.stringify(r)}`);
      assert.equal(r.signal, sig, `exit result ${JSON.stringify(r)}`);
    };

    test('1. lifecycle: start, wait, inspect, destroy (idempotent)', { timeout: 30_000 }, async () => {
      const id = newId();
      try {
        const h = await driver.start(cfg(id, sh('echo hello')));
        assert.equal(h.id, id);
        assert.equal(h.driver, driver.name);
        assert.ok(Number.isInteger(h.pid) && h.pid > 0, `pid ${h.pid}`);
        assert.ok(!Number.isNaN(Date.parse(h.startedAt)), `startedAt ${h.startedAt}`);
        assert.ok((await driver.listTasks()).includes(id), 'listTasks includes the started task');
        const r = await within(10_000, 'wait()', () => driver.wait(h));
        assert.equal(r.exitCode, 0, JSON.stringify(r));
        assert.equal(r.oomKilled, false);
        assert.equal(r.signal, undefined);
        assert.ok(!Number.isNaN(Date.parse(r.finishedAt)), `finishedAt ${r.finishedAt}`);
        // wait() again resolves at once with the same result.
        const again = await within(2000, 'second wait()', () => driver.wait(h));
        assert.equal(again.exitCode, 0);
        const st = await driver.inspect(h);
        assert.equal(st.state, 'exited');
        assert.equal(st.exit?.exitCode, 0);
        const lines = await waitForLog(driver, id, (ls) => stdoutOf(ls).includes('hello'));
        assert.deepEqual(stdoutOf(lines), ['hello']);
        await driver.destroy(id);
        await driver.destroy(id); // idempotent
        assert.equal((await driver.inspect(h)).state, 'missing');
        assert.ok(!(await driver.listTasks()).includes(id), 'listTasks no longer has the destroyed task');
      } finally {
        await driver.destroy(id, { force: true });
      }
    });

    test('1b. a task whose program does not exist fails cleanly', { timeout: 30_000 }, async () => {
      const id = newId();
      try {
        let h: TaskHandle | undefined;
        try {
          h = await driver.start(cfg(id, ['/no/such/program']));
        } catch (e) {
          // Refusing to start is fine (runc reports exec errors from `runc create`); the error must say why.
          assert.ok(e instanceof Error);
          assert.match(e.message, /no\/such\/program|no such file|not found/i);
        }
        if (h) {
          // Or the task starts and fails at once, like a shell would (exit 126/127).
          const r = await within(10_000, 'wait()', () => driver.wait(h!));
          assert.notEqual(r.exitCode, 0, JSON.stringify(r));
        }
      } finally {
        await driver.destroy(id, { force: true });
      }
      assert.ok(!(await driver.listTasks()).includes(id), 'destroy() after a failed start removes the task');
    });

    test('2a. stdout/stderr are kept apart, in order, with timestamps; exit code 42', { timeout: 30_000 }, async () => {
      const id = newId();
      // The short sleeps separate the writes in time: stdout and stderr are two pipes, and a monitor
      // that finds both readable at once may legitimately read either first.
      await withTask(cfg(id, sh('echo a; sleep 0.05; echo b >&2; sleep 0.05; echo c; exit 42')), async (h) => {
        const r = await within(10_000, 'wait()', () => driver.wait(h));
        assert.equal(r.exitCode, 42, JSON.stringify(r));
        assert.equal(r.signal, undefined, 'a normal exit has no signal');
        assert.equal(r.oomKilled, false);
        const lines = await waitForLog(driver, id, (ls) => ls.length >= 3);
        assert.deepEqual(
          lines.map((l) => `${l.stream}:${l.text}`),
          ['stdout:a', 'stderr:b', 'stdout:c'],
        );
        for (let i = 1; i < lines.length; i++) {
          assert.ok(timeNs(lines[i]!.time) >= timeNs(lines[i - 1]!.time), `timestamps go back: ${lines[i - 1]!.time} → ${lines[i]!.time}`);
        }
      });
    });

    test('2b. death by SIGTERM is reported as 143/SIGTERM', { timeout: 30_000 }, async () => {
      const id = newId();
      // PID 1 of a PID namespace cannot die from SIGTERM (the kernel drops signals without a
      // handler for it), so a child kills itself and the main process passes its status on.
      await withTask(cfg(id, sh('sh -c "kill -TERM \\$\\$"; exit $?')), async (h) => {
        const r = await within(10_000, 'wait()', () => driver.wait(h));
        assertSignal(r, 143, 'SIGTERM');
        assert.equal(r.oomKilled, false);
      });
    });

    test('2c. stop() of a process that ignores SIGTERM ends it with SIGKILL', { timeout: 30_000 }, async () => {
      const id = newId();
      await withTask(cfg(id, ['sleep', '100']), async (h) => {
        const t0 = Date.now();
        const r = await within(15_000, 'stop()', () => driver.stop(h, { timeoutMs: 1000 }));
        const took = Date.now() - t0;
        // `sleep` as PID 1 of a PID namespace ignores SIGTERM (no handler): SIGKILL after the grace
        // period. A tier that does not run the task as PID 1 may see it die from SIGTERM at once.
        if (r.exitCode === 143) assertSignal(r, 143, 'SIGTERM');
        else {
          assertSignal(r, 137, 'SIGKILL');
          assert.ok(took >= 900, `SIGKILL came after ${took} ms, before the 1000 ms grace period`);
        }
        assert.equal((await driver.inspect(h)).state, 'exited');
      });
    });

    test('3. env, cwd and user are applied', { timeout: 30_000 }, async () => {
      const id = newId();
      await withTask(
        cfg(id, sh('echo $FOO; pwd; id -u; id -g'), { env: { FOO: 'bar' }, cwd: '/tmp', user: { uid: 1000, gid: 1000 } }),
        async (h) => {
          const r = await within(10_000, 'wait()', () => driver.wait(h));
          assert.equal(r.exitCode, 0, JSON.stringify(r));
          const lines = await waitForLog(driver, id, (ls) => stdoutOf(ls).length >= 4);
          assert.deepEqual(stdoutOf(lines), ['bar', '/tmp', '1000', '1000'], JSON.stringify(lines));
        },
      );
    });

    test('4a. stop(): grace period, then SIGKILL for a process that ignores SIGTERM', { timeout: 30_000 }, async (t) => {
      const id = newId();
      await withTask(cfg(id, sh('trap "" TERM; echo ready; while true; do sleep 0.1; done')), async (h) => {
        await waitReady(id);
        // Self-check of the environment's leak detector: a running task must show up in it.
        const seen = env.residue();
        assert.ok(seen.length > 0, 'residue() sees nothing of a running task, so the leak check (test 10) would be blind');
        t.diagnostic(`residue of one running task: ${seen.length} entries`);
        const t0 = Date.now();
        const r = await within(15_000, 'stop()', () => driver.stop(h, { timeoutMs: 500 }));
        const took = Date.now() - t0;
        assertSignal(r, 137, 'SIGKILL');
        assert.ok(took >= 450 && took <= 5000, `stop took ${took} ms; expected 0.5–5 s`);
        assert.equal((await driver.inspect(h)).state, 'exited');
      });
    });

    test('4b. stop(): a process that exits on SIGTERM ends quickly with its own exit code', { timeout: 30_000 }, async () => {
      const id = newId();
      await withTask(cfg(id, sh('trap "exit 0" TERM; echo ready; while true; do sleep 0.1; done')), async (h) => {
        await waitReady(id);
        const t0 = Date.now();
        const r = await within(15_000, 'stop()', () => driver.stop(h, { timeoutMs: 10_000 }));
        const took = Date.now() - t0;
        assert.equal(r.exitCode, 0, JSON.stringify(r));
        assert.equal(r.signal, undefined);
        assert.ok(took < 3000, `stop took ${took} ms although the task exits on SIGTERM`);
        // stop() on an exited task returns its result again.
        const again = await within(5000, 'second stop()', () => driver.stop(h, { timeoutMs: 1000 }));
        assert.equal(again.exitCode, 0);
      });
    });

    test('4c. stop() with a custom signal', { timeout: 30_000 }, async () => {
      const id = newId();
      await withTask(cfg(id, sh('trap "exit 3" INT; trap "" TERM; echo ready; while true; do sleep 0.1; done')), async (h) => {
        await waitReady(id);
        const r = await within(15_000, 'stop()', () => driver.stop(h, { timeoutMs: 10_000, signal: 'SIGINT' }));
        assert.equal(r.exitCode, 3, JSON.stringify(r));
      });
    });

    test('5. memory limit: the task is OOM-killed and that is reported', { timeout: 60_000 }, async (t) => {
      if (!driver.capabilities.limits.memory) return t.skip('driver does not enforce memory limits');
      const id = newId();
      await withTask(
        cfg(id, sh('x=aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa; while true; do x=$x$x; done'), { resources: { memoryMiB: 32 } }),
        async (h) => {
          const r = await within(30_000, 'wait()', () => driver.wait(h));
          assertSignal(r, 137, 'SIGKILL');
          if (driver.capabilities.oomDetection) assert.equal(r.oomKilled, true, JSON.stringify(r));
          else t.diagnostic('driver does not report OOM kills; checked exit 137 only');
          const st = await driver.inspect(h);
          assert.equal(st.state, 'exited');
          if (driver.capabilities.oomDetection) assert.equal(st.exit?.oomKilled, true);
        },
      );
    });

    test('6. pids limit contains a fork bomb; the driver can still stop it', { timeout: 60_000 }, async (t) => {
      if (!driver.capabilities.limits.pids) return t.skip('driver does not enforce a pids limit');
      const id = newId();
      const limit = 32;
      // Every bomb process forks two more and then sleeps, so the task sits at its limit for a few
      // seconds instead of collapsing at once. PID 1 only starts it and then waits on a FIFO
      // nobody writes (in a loop: SIGCHLD interrupts the open), forking nothing, so a failed fork
      // cannot end the task: it runs until it is stopped.
      const script =
        'mkfifo /tmp/hold; bomb() { bomb | bomb & sleep 5; }; bomb & echo started; while :; do read x 2>/dev/null < /tmp/hold; done';
      await withTask(cfg(id, sh(script), { resources: { pids: limit } }), async (h) => {
        await waitReady(id, 'started');
        let maxPids = 0;
        const t0 = Date.now();
        while (Date.now() - t0 < 2500) {
          if (hasStats(driver)) {
            const s = await driver.stats(id);
            if (s.pids !== undefined) {
              maxPids = Math.max(maxPids, s.pids);
              assert.ok(s.pids <= limit, `task has ${s.pids} processes, above its limit of ${limit}`);
            }
          }
          await sleep(100);
        }
        if (hasStats(driver)) t.diagnostic(`most processes seen in the task: ${maxPids} (limit ${limit})`);
        // The host can still create processes.
        const probe = spawnSync('true', [], { timeout: 5000 });
        assert.equal(probe.status, 0, `host cannot fork while the bomb runs: ${probe.error?.message ?? probe.status}`);
        assert.equal((await driver.inspect(h)).state, 'running', 'PID 1 of the fork bomb task should still be running');
        // The bomb did run into the limit: forks failed inside the task.
        const lines = await readTaskLog(driver, id);
        assert.ok(
          lines.some((l) => l.stream === 'stderr' && /fork|Resource temporarily unavailable/.test(l.text)),
          `no failed fork in the task's log: ${JSON.stringify(lines.slice(0, 10))}`,
        );
        const r = await within(15_000, 'stop()', () => driver.stop(h, { timeoutMs: 1000 }));
        assert.ok(r.exitCode === 137 || r.exitCode === 143, `exit ${JSON.stringify(r)}`);
        await within(15_000, 'destroy()', () => driver.destroy(id, { force: true }));
      });
    });

    test('7. CPU limit throttles a busy loop to the requested share', { timeout: 60_000 }, async (t) => {
      if (!driver.capabilities.limits.cpu) return t.skip('driver does not enforce CPU limits');
      const id = newId();
      const cpuMillis = 500;
      const windowMs = 2500;
      const sd = hasStats(driver) ? driver : undefined;
      if (sd) {
        await withTask(cfg(id, sh('while :; do :; done'), { resources: { cpuMillis } }), async () => {
          await sleep(500); // let it settle into the quota
          const a = await sd.stats(id);
          const ta = process.hrtime.bigint();
          await sleep(windowMs);
          const b = await sd.stats(id);
          const tb = process.hrtime.bigint();
          assert.ok(a.cpuUsageNs !== undefined && b.cpuUsageNs !== undefined, `stats without cpuUsageNs: ${JSON.stringify(b)}`);
          const cores = (b.cpuUsageNs - a.cpuUsageNs) / Number(tb - ta);
          t.diagnostic(`busy loop used ${cores.toFixed(3)} cores with a limit of ${cpuMillis / 1000}`);
          assert.ok(Math.abs(cores - cpuMillis / 1000) <= 0.2 * (cpuMillis / 1000), `used ${cores.toFixed(3)} cores, expected ${cpuMillis / 1000} ± 20 %`);
        });
      } else {
        // Without host-side stats, the workload measures itself: CPU ticks (utime+stime, USER_HZ
        // = 100) of a background busy loop over a sleep of known length.
        const stat = (v: string) => `${v}=$(tr -s " " < /proc/$p/stat | cut -d" " -f14-15 | tr " " "+")`;
        const script = `while :; do :; done & p=$!; sleep 0.5; ${stat('a')}; sleep 2.5; ${stat('b')}; echo $(( ($b) - ($a) )); kill -9 $p`;
        await withTask(cfg(id, sh(script), { resources: { cpuMillis } }), async (h) => {
          await within(20_000, 'wait()', () => driver.wait(h));
          const lines = await waitForLog(driver, id, (ls) => stdoutOf(ls).length >= 1);
          const ticks = Number(stdoutOf(lines)[0]);
          const cores = ticks / 100 / 2.5;
          t.diagnostic(`busy loop used ${cores.toFixed(3)} cores with a limit of ${cpuMillis / 1000} (measured inside)`);
          assert.ok(Math.abs(cores - cpuMillis / 1000) <= 0.2 * (cpuMillis / 1000), `used ${cores.toFixed(3)} cores, expected ${cpuMillis / 1000} ± 20 %`);
        });
      }
    });

    test('8. the image is read-only underneath a per-task writable layer', { timeout: 30_000 }, async () => {
      const hostsFile = join(env.imageRootfs, 'etc', 'hosts');
      const hostsBefore = readFileSync(hostsFile, 'utf8');
      const marker = `marker-${randomBytes(4).toString('hex')}`;
      const first = newId();
      await withTask(cfg(first, sh(`echo ${marker} > /etc/newfile && echo "10.9.8.7 ${marker}" >> /etc/hosts && cat /etc/newfile && grep -c ${marker} /etc/hosts`)), async (h) => {
        const r = await within(10_000, 'wait()', () => driver.wait(h));
        assert.equal(r.exitCode, 0, `writing inside the task failed: ${JSON.stringify(await readTaskLog(driver, first))}`);
        const lines = await waitForLog(driver, first, (ls) => stdoutOf(ls).length >= 2);
        assert.deepEqual(stdoutOf(lines), [marker, '1']);
        assert.equal(existsSync(join(env.imageRootfs, 'etc', 'newfile')), false, 'the task wrote into the image');
        assert.equal(readFileSync(hostsFile, 'utf8'), hostsBefore, 'the task modified the image /etc/hosts');

        // A second task from the same image, while the first one's layer still exists.
        const second = newId();
        await withTask(cfg(second, sh(`if test -e /etc/newfile; then echo present; else echo absent; fi; grep -c ${marker} /etc/hosts; true`)), async (h2) => {
          const r2 = await within(10_000, 'wait()', () => driver.wait(h2));
          assert.equal(r2.exitCode, 0);
          const l2 = await waitForLog(driver, second, (ls) => stdoutOf(ls).length >= 2);
          assert.deepEqual(stdoutOf(l2), ['absent', '0'], 'the second task sees the first task’s writes');
        });
      });
      assert.equal(existsSync(join(env.imageRootfs, 'etc', 'newfile')), false);
      assert.equal(readFileSync(hostsFile, 'utf8'), hostsBefore);
    });

    test('9a. recover(): a new driver instance adopts a running task and can stop it', { timeout: 60_000 }, async (t) => {
      if (!driver.capabilities.survivesDaemonRestart) return t.skip('tasks do not survive a daemon restart on this tier');
      if (!env.reopen) return t.skip('the environment cannot open a second driver instance');
      const id = newId();
      let d2: RuntimeDriver | undefined;
      try {
        const marker = `recover${randomBytes(4).toString('hex')}`;
        const started = await driver.start(cfg(id, sh(`trap "exit 7" TERM; echo ready; while true; do sleep 0.1; done; : ${marker}`)));
        await waitReady(id);
        const h: TaskHandle = JSON.parse(JSON.stringify(started)); // as persisted in the store
        d2 = await env.reopen();
        const st = await d2.recover(h);
        assert.equal(st.state, 'running', JSON.stringify(st));
        assert.equal(st.pid, started.pid, 'recover() reports the task under the same pid');
        if (driver.capabilities.sharesHostKernel) {
          // The pid is the task's process on the host, not just the number from the handle.
          const cmd = readFileSync(`/proc/${started.pid}/cmdline`, 'utf8');
          assert.ok(cmd.includes(marker), `pid ${started.pid} is not the task: ${cmd.split('\0').join(' ')}`);
        }
        assert.equal((await d2.inspect(h)).state, 'running');
        const waiting = d2.wait(h);
        const r = await within(15_000, 'stop() via the new instance', () => d2!.stop(h, { timeoutMs: 10_000 }));
        assert.equal(r.exitCode, 7, JSON.stringify(r));
        const w = await within(5000, 'wait() via the new instance', () => waiting);
        assert.equal(w.exitCode, 7);
        const st2 = await d2.inspect(h);
        assert.equal(st2.state, 'exited');
        assert.equal(st2.exit?.exitCode, 7);
      } finally {
        await (d2 ?? driver).destroy(id, { force: true });
        if (d2) closeDriver(d2);
      }
    });

    test('9b. recover(): a task that exited while no driver was running reports its exit', { timeout: 60_000 }, async (t) => {
      if (!driver.capabilities.survivesDaemonRestart) return t.skip('tasks do not survive a daemon restart on this tier');
      if (!env.reopen) return t.skip('the environment cannot open a second driver instance');
      const id = newId();
      let dA: RuntimeDriver | undefined;
      let dB: RuntimeDriver | undefined;
      try {
        dA = await env.reopen();
        const started = await dA.start(cfg(id, sh('sleep 1; exit 3')));
        const h: TaskHandle = JSON.parse(JSON.stringify(started));
        closeDriver(dA); // the "daemon" goes away
        dA = undefined;
        await sleep(2000);
        dB = await env.reopen();
        const st = await dB.recover(h);
        assert.equal(st.state, 'exited', JSON.stringify(st));
        assert.equal(st.exit?.exitCode, 3);
        const r = await within(2000, 'wait() after recover', () => dB!.wait(h));
        assert.equal(r.exitCode, 3);
      } finally {
        if (dA) closeDriver(dA);
        await (dB ?? driver).destroy(id, { force: true });
        if (dB) closeDriver(dB);
      }
    });

    test('11a. kernel: uname -r matches the host exactly when the tier shares its kernel', { timeout: 30_000 }, async (t) => {
      const id = newId();
      await withTask(cfg(id, ['uname', '-r']), async (h) => {
        const r = await within(10_000, 'wait()', () => driver.wait(h));
        assert.equal(r.exitCode, 0);
        const lines = await waitForLog(driver, id, (ls) => stdoutOf(ls).length >= 1);
        const inside = stdoutOf(lines)[0];
        t.diagnostic(`kernel inside: ${inside}; host: ${release()}`);
        if (driver.capabilities.sharesHostKernel) assert.equal(inside, release());
        else assert.notEqual(inside, release());
      });
    });

    test('11b. PID namespace: the task is PID 1 and sees only its own processes', { timeout: 30_000 }, async (t) => {
      const id = newId();
      const marker = `pidns${randomBytes(4).toString('hex')}`;
      await withTask(cfg(id, sh(`echo $$; tr "\\000" " " < /proc/1/cmdline; echo; true ${marker}`)), async (h) => {
        const r = await within(10_000, 'wait()', () => driver.wait(h));
        assert.equal(r.exitCode, 0);
        const lines = await waitForLog(driver, id, (ls) => stdoutOf(ls).length >= 2);
        const [pid, cmdline] = stdoutOf(lines);
        t.diagnostic(`inside: $$=${pid}, /proc/1/cmdline=${cmdline}`);
        if (driver.capabilities.isolation === 'microvm') return; // PID 1 is the guest's init: informative only
        assert.equal(pid, '1');
        assert.ok(cmdline?.includes(marker), `/proc/1/cmdline is not the task: ${cmdline}`);
      });
    });

    test('11c. memory size: a tier with its own kernel has its own memory size', { timeout: 30_000 }, async (t) => {
      const id = newId();
      const hostKb = Number(/^MemTotal:\s+(\d+)/m.exec(readFileSync('/proc/meminfo', 'utf8'))?.[1]);
      await withTask(cfg(id, sh('head -1 /proc/meminfo'), { resources: { memoryMiB: 64 } }), async (h) => {
        const r = await within(10_000, 'wait()', () => driver.wait(h));
        assert.equal(r.exitCode, 0);
        const lines = await waitForLog(driver, id, (ls) => stdoutOf(ls).length >= 1);
        const insideKb = Number(/MemTotal:\s+(\d+)/.exec(stdoutOf(lines)[0] ?? '')?.[1]);
        t.diagnostic(`MemTotal inside: ${insideKb} kB; host: ${hostKb} kB; limit 64 MiB`);
        assert.ok(insideKb > 0, `no MemTotal in ${JSON.stringify(lines)}`);
        // A container reads the host kernel's /proc/meminfo; gVisor reports its limit; a microVM its RAM
        // (limit + the guest's own overhead).
        if (driver.capabilities.sharesHostKernel) assert.equal(insideKb, hostKb);
        else assert.ok(insideKb <= 512 * 1024 && insideKb < hostKb, `MemTotal ${insideKb} kB is not the tier's own size`);
      });
    });

    test('12. disk limit: the writable layer fills up at its size, the image and host stay untouched', { timeout: 60_000 }, async (t) => {
      const id = newId();
      await withTask(cfg(id, sh('dd if=/dev/zero of=/big bs=1M count=100 2>&1; echo rc=$?'), { resources: { diskMiB: 32 } }), async (h) => {
        const r = await within(30_000, 'wait()', () => driver.wait(h));
        assert.equal(r.exitCode, 0);
        const lines = await waitForLog(driver, id, (ls) => stdoutOf(ls).some((l) => l.startsWith('rc=')));
        const out = stdoutOf(lines).join('\n');
        t.diagnostic(out.split('\n').slice(-3).join(' | '));
        assert.match(out, /No space left/);
        assert.match(out, /rc=[1-9]/);
        assert.equal(existsSync(join(env.imageRootfs, 'big')), false);
      });
    });

    test('13. exec(): a command inside the running task reports its exit code, output and time limit', { timeout: 60_000 }, async (t) => {
      if (!driver.exec) return t.skip('this driver has no exec');
      const id = newId();
      await withTask(cfg(id, sh('echo inside > /tmp/marker; echo ready; sleep 1000')), async (h) => {
        await waitReady(id);
        const ok = await within(20_000, 'exec()', () => driver.exec!(h, ['cat', '/tmp/marker'], 15_000));
        assert.equal(ok.exitCode, 0, JSON.stringify(ok));
        assert.match(ok.output, /inside/);
        const bad = await within(20_000, 'exec()', () => driver.exec!(h, ['sh', '-c', 'exit 3'], 15_000));
        assert.equal(bad.exitCode, 3, JSON.stringify(bad));
        const t0 = Date.now();
        const slow = await within(20_000, 'exec()', () => driver.exec!(h, ['sleep', '30'], 1000));
        assert.notEqual(slow.exitCode, 0, JSON.stringify(slow));
        assert.ok(Date.now() - t0 < 10_000, `a timed-out exec took ${Date.now() - t0} ms`);
        assert.equal((await driver.inspect(h)).state, 'running', 'the task keeps running');
      });
    });

    test('10. nothing is left on the host after every task is destroyed', { timeout: 30_000 }, async () => {
      for (const id of await driver.listTasks()) if (id.startsWith('conf-')) await driver.destroy(id, { force: true });
      // Give monitors a moment to leave after destroy.
      let left = env.residue();
      for (let i = 0; i < 20 && left.length > 0; i++) {
        await sleep(100);
        left = env.residue();
      }
      assert.deepEqual(left, []);
    });
  });
}
