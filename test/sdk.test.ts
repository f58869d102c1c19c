// The SDK test suite (sdk/): the same tests against every installed isolation tier, through the
// public TypeScript SDK only — what a user of @berth/sdk gets.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { Sandbox, type FilesystemEvent, FailedPreconditionError, InvalidArgumentError, NotFoundError, PermissionDeniedError, TimeoutError } from '../sdk/src/index.js';
import { GUEST_SECOND_TURN, TestDaemon, assertWallClock } from './harness.js';

let d: TestDaemon;
let tiers: string[] = [];
let conn: { apiUrl: string; apiKey: string };
before(async () => {
  d = await TestDaemon.start();
  conn = { apiUrl: d.addr, apiKey: d.token };
  tiers = (await d.api('GET', '/v1/info')).body.drivers.filter((x: any) => x.healthy).map((x: any) => x.isolation);
});
after(async () => {
  await d.deleteAllSandboxes().catch(() => undefined);
  await d.destroy();
});

/** A counter that a shell loop rewrites in `path` (truncate, then write): read until a number is there (0: none). */
async function readCounter(s: Sandbox, path: string): Promise<number> {
  for (let k = 0; k < 20; k++) {
    const v = Number((await s.files.read(path)).trim());
    if (v > 0) return v;
    await new Promise((r) => setTimeout(r, 20));
  }
  return 0;
}

for (const isolation of ['gvisor', 'microvm', 'container'] as const) {
  describe(`SDK on ${isolation}`, () => {
    let sbx: Sandbox;
    let skip: string | undefined;
    const tag = randomBytes(3).toString('hex');
    before(async () => {
      if (!tiers.includes(isolation)) {
        skip = `${isolation} is not installed on this host`;
        return;
      }
      sbx = await Sandbox.create({ ...conn, isolation, timeoutMs: 600_000, memoryMiB: 256, metadata: { suite: 'sdk', run: tag } });
    });
    after(async () => {
      if (skip) return;
      await sbx.kill();
      await d.deleteAllSandboxes();
      assert.deepEqual(d.hostResidue(), []);
    });

    test('create, info, list by metadata, connect', async (t) => {
      if (skip) return t.skip(skip);
      const info = await sbx.getInfo();
      assert.equal(info.state, 'running');
      assert.equal(info.isolation, isolation);
      assert.ok(info.endAt && Date.parse(info.endAt) > Date.now());
      const listed = await Sandbox.list({ ...conn, metadata: { run: tag } });
      assert.deepEqual(listed.map((s) => s.sandboxId), [sbx.sandboxId]);
      const again = await Sandbox.connect(sbx.sandboxId, conn);
      assert.equal((await again.commands.run('echo connected')).stdout, 'connected\n');
    });

    test('commands.run streams output to callbacks; exit code, env, cwd, user', async (t) => {
      if (skip) return t.skip(skip);
      const seen: string[] = [];
      const r = await sbx.commands.run('for i in 1 2 3; do echo line$i; sleep 0.05; done; echo oops >&2; exit 7', {
        onStdout: (s) => seen.push(`out:${s}`),
        onStderr: (s) => seen.push(`err:${s}`),
      });
      assert.equal(r.exitCode, 7);
      assert.equal(r.stdout, 'line1\nline2\nline3\n');
      assert.equal(r.stderr, 'oops\n');
      assert.equal(seen.filter((s) => s.startsWith('out:')).join('').replace(/out:/g, ''), r.stdout);
      const e = await sbx.commands.run(['sh', '-c', 'echo $GREETING $(pwd) $(id -u)'], { envs: { GREETING: 'hi' }, cwd: '/tmp', user: '1000' });
      assert.equal(e.stdout, 'hi /tmp 1000\n');
    });

    test('background commands: list and kill; command timeouts', async (t) => {
      if (skip) return t.skip(skip);
      const p = await sbx.commands.start('sleep 600');
      assert.ok((await sbx.commands.list()).some((x) => x.id === p.id));
      await sbx.commands.kill(p.id);
      const deadline = Date.now() + 5000;
      while ((await sbx.commands.list()).some((x) => x.id === p.id)) {
        assert.ok(Date.now() < deadline, 'killed process still listed');
        await new Promise((r) => setTimeout(r, 100));
      }
      const r = await sbx.commands.run('sleep 60', { timeoutMs: 300 });
      assert.equal(r.timedOut, true);
      assert.equal(r.exitCode, 137);
    });

    test('files: text, bytes, a 20 MiB stream both ways, list, exists, mkdir, rename, remove', { timeout: 120_000 }, async (t) => {
      if (skip) return t.skip(skip);
      await sbx.files.write('/tmp/hello.txt', 'hello files');
      assert.equal(await sbx.files.read('/tmp/hello.txt'), 'hello files');
      const bytes = randomBytes(70_000);
      await sbx.files.write('/tmp/b.bin', bytes, { mode: 0o600 });
      assert.deepEqual(Buffer.from(await sbx.files.read('/tmp/b.bin', { format: 'bytes' })), bytes);
      assert.equal((await sbx.files.getInfo('/tmp/b.bin')).mode, 0o600);
      // 20 MiB generated on the fly: neither side holds it whole.
      const total = 20 * 1024 * 1024;
      const h = createHash('sha256');
      let sent = 0;
      const src = new ReadableStream<Uint8Array>({
        pull(ctl) {
          if (sent >= total) return ctl.close();
          const chunk = randomBytes(Math.min(256 * 1024, total - sent));
          h.update(chunk);
          sent += chunk.length;
          ctl.enqueue(chunk);
        },
      });
      const w = await sbx.files.write('/tmp/big', src);
      assert.equal(w.written, total);
      const want = h.digest('hex');
      const back = createHash('sha256');
      let got = 0;
      const stream = await sbx.files.read('/tmp/big', { format: 'stream' });
      for await (const chunk of stream as unknown as AsyncIterable<Uint8Array>) {
        back.update(chunk);
        got += chunk.length;
      }
      assert.equal(got, total);
      assert.equal(back.digest('hex'), want);
      await sbx.files.makeDir('/data/x/y');
      await sbx.files.write('/data/hello.txt', 'hi');
      await sbx.files.rename('/data/hello.txt', '/data/x/y/h.txt');
      assert.equal(await sbx.files.exists('/data/hello.txt'), false);
      assert.deepEqual((await sbx.files.list('/data/x/y')).map((e) => e.name), ['h.txt']);
      await sbx.files.remove('/data');
      assert.equal(await sbx.files.exists('/data'), false);
    });

    test('pty: an interactive shell on a terminal (tty is /dev/pts/N), resize, input, kill', { timeout: 60_000 }, async (t) => {
      if (skip) return t.skip(skip);
      let out = '';
      const waitFor = async (re: RegExp) => {
        const deadline = Date.now() + 10_000;
        while (!re.test(out)) {
          assert.ok(Date.now() < deadline, `no ${re} in the terminal output ${JSON.stringify(out)}`);
          await new Promise((r) => setTimeout(r, 20));
        }
      };
      const term = await sbx.pty.create({ cols: 80, rows: 24, cmd: ['/bin/sh'], envs: { PS1: '$ ' }, onData: (d) => (out += Buffer.from(d).toString()) });
      assert.ok(term.pid > 0);
      await term.sendInput('tty; stty size; echo "TERM=$TERM"\n');
      await waitFor(/\/dev\/pts\/\d+\r?\n/);
      await waitFor(/\r?\n24 80\r?\n/);
      await waitFor(/TERM=xterm-256color/);
      await term.resize({ cols: 132, rows: 43 });
      await term.sendInput('stty size\n');
      await waitFor(/\r?\n43 132\r?\n/);
      assert.ok((await sbx.commands.list()).some((p) => p.id === term.id), 'the terminal is a listed process');
      await term.sendInput('exit 3\n');
      assert.equal((await term.wait()).exitCode, 3);
      const other = await sbx.pty.create({ cmd: ['/bin/sh'], onData: () => undefined });
      await other.kill();
      assert.equal((await other.wait()).exitCode, 137);
      const bg = await sbx.commands.start('sleep 30');
      await assert.rejects(sbx.pty.resize(bg.id, { cols: 10, rows: 10 }), FailedPreconditionError);
      await sbx.commands.kill(bg.id);
      await assert.rejects(sbx.pty.sendInput('p-000000000000', 'x'), NotFoundError);
      await assert.rejects(sbx.pty.resize(term.id, { cols: 0, rows: 10 }), InvalidArgumentError);
    });

    test('files.watch: create, write, rename, remove with sandbox paths, recursive; stop ends it', { timeout: 60_000 }, async (t) => {
      if (skip) return t.skip(skip);
      await sbx.files.makeDir('/w/sub');
      const evs: FilesystemEvent[] = [];
      const shown = () => evs.map((e) => `${e.type} ${e.path}${e.to ? `>${e.to}` : ''}${e.dir ? '/' : ''}`);
      const h = await sbx.files.watch('/w', (e) => evs.push(e), { recursive: true });
      await sbx.files.write('/w/a.txt', 'x');
      await sbx.commands.run('echo y > /w/sub/b; mv /w/a.txt /w/c.txt; rm /w/c.txt; mkdir /w/n; sleep 0.2; echo z > /w/n/d');
      const want = ['create /w/a.txt', 'write /w/a.txt', 'create /w/sub/b', 'write /w/sub/b', 'rename /w/a.txt>/w/c.txt', 'remove /w/c.txt', 'create /w/n/', 'create /w/n/d'];
      const deadline = Date.now() + 10_000;
      while (!want.every((w) => shown().includes(w))) {
        assert.ok(Date.now() < deadline, `events ${JSON.stringify(shown())}, want ${JSON.stringify(want)}`);
        await new Promise((r) => setTimeout(r, 20));
      }
      assert.ok(shown().indexOf('create /w/a.txt') < shown().indexOf('rename /w/a.txt>/w/c.txt'), 'in order');
      h.stop();
      const n = evs.length;
      await sbx.files.write('/w/after', 'z');
      await new Promise((r) => setTimeout(r, 300));
      assert.equal(evs.length, n, 'no events after stop()');
      const flat: FilesystemEvent[] = [];
      const h2 = await sbx.files.watch('/w', (e) => flat.push(e));
      await sbx.files.write('/w/sub/deep', 'q');
      await sbx.files.write('/w/top', 'q');
      for (let i = 0; i < 250 && !flat.some((e) => e.path === '/w/top'); i++) await new Promise((r) => setTimeout(r, 20));
      h2.stop();
      assert.ok(flat.some((e) => e.path === '/w/top'));
      assert.ok(!flat.some((e) => e.path === '/w/sub/deep'), 'not recursive: no events from sub-directories');
      await assert.rejects(sbx.files.watch('/no/such/dir', () => undefined), NotFoundError);
      await assert.rejects(sbx.files.watch('/../etc', () => undefined), PermissionDeniedError);
      await sbx.files.remove('/w');
    });

    test('typed errors; every call takes a timeout and an AbortSignal', async (t) => {
      if (skip) return t.skip(skip);
      await assert.rejects(sbx.files.read('/no/such/file'), NotFoundError);
      await assert.rejects(sbx.files.read('/../../etc/passwd'), PermissionDeniedError);
      await assert.rejects(Sandbox.create({ ...conn, isolation, timeoutMs: 5 }), InvalidArgumentError);
      await assert.rejects(sbx.commands.run('sleep 5', { requestTimeoutMs: 200 }), TimeoutError);
      const ac = new AbortController();
      setTimeout(() => ac.abort(new Error('stop')), 100);
      await assert.rejects(sbx.commands.run('sleep 5', { signal: ac.signal }), /stop/);
      await assert.rejects(Sandbox.connect('no-such-sandbox', conn), NotFoundError);
    });

    test('isolation: no route to the daemon API, host loopback services or other sandboxes', { timeout: 60_000 }, async (t) => {
      if (skip) return t.skip(skip);
      const port = new URL(d.addr).port;
      const r = await sbx.commands.run(`wget -q -T 2 -O - http://127.0.0.1:${port}/v1/info; echo rc=$?; ip -o addr 2>/dev/null | grep -v ' lo ' | wc -l`, { timeoutMs: 20_000 });
      assert.match(r.stdout, /rc=[1-9]/, `reached the daemon: ${r.stdout} ${r.stderr}`);
      assert.doesNotMatch(r.stdout, /"drivers"/);
    });

    test('pause then resume: processes freeze and continue where they stopped (timed)', { timeout: 60_000 }, async (t) => {
      if (skip) return t.skip(skip);
      await sbx.commands.start('i=0; while :; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.1; done');
      const read = () => readCounter(sbx, '/tmp/counter');
      await new Promise((r) => setTimeout(r, 700));
      const c1 = await read();
      assert.ok(c1 > 0, 'the counter runs');
      let t0 = performance.now();
      await sbx.pause();
      const pauseMs = performance.now() - t0;
      assert.equal((await sbx.getInfo()).state, 'paused');
      await assert.rejects(sbx.commands.run('true'), FailedPreconditionError);
      await new Promise((r) => setTimeout(r, 2500));
      t0 = performance.now();
      const again = await Sandbox.resume(sbx.sandboxId, conn);
      const resumeMs = performance.now() - t0;
      assert.equal(again.sandboxId, sbx.sandboxId);
      const c2 = await read();
      // Frozen for 2.5 s: a running counter would have gone up by ~25.
      assert.ok(c2 >= c1 && c2 - c1 < 10, `counter ${c1} → ${c2} across the pause`);
      await new Promise((r) => setTimeout(r, 700));
      const c3 = await read();
      assert.ok(c3 > c2, `the counter continues after resume (${c2} → ${c3})`);
      // The wall clock is the host's again (within 700 ms): a microVM's stood still
      // while its vCPUs were stopped, 2.5 s behind, until resume stepped it forward.
      assertWallClock(Number((await sbx.commands.run(GUEST_SECOND_TURN)).stdout.trim()), Date.now());
      t.diagnostic(`${isolation}: pause ${pauseMs.toFixed(1)} ms, resume ${resumeMs.toFixed(1)} ms (API round trip included); counter ${c1} → ${c2} → ${c3}`);
    });

    test('autoPause: idle → paused (processes frozen, clock stopped); the next call resumes it transparently', { timeout: 90_000 }, async (t) => {
      if (skip) return t.skip(skip);
      const s = await Sandbox.create({ ...conn, isolation, timeoutMs: 120_000, autoPause: { idleMs: 1500 } });
      try {
        const counter = () => readCounter(s, '/tmp/c');
        // An open command stream is activity: a command longer than idleMs completes (a paused
        // sandbox would never finish it, as nothing would wake it).
        assert.equal((await s.commands.run('sleep 2.5; echo awake')).stdout, 'awake\n');
        await s.commands.start('i=0; while :; do i=$((i+1)); echo $i > /tmp/c; sleep 0.1; done');
        await new Promise((r) => setTimeout(r, 300));
        const c0 = await counter();
        const t0 = performance.now();
        const end0 = Date.parse((await s.getInfo()).endAt!);
        let info = await s.getInfo(); // reading the sandbox's info is not activity
        while (info.state !== 'paused') {
          assert.ok(performance.now() - t0 < 15_000, `not auto-paused: ${JSON.stringify(info)}`);
          await new Promise((r) => setTimeout(r, 100));
          info = await s.getInfo();
        }
        const pausedAfter = performance.now() - t0;
        await new Promise((r) => setTimeout(r, 2000));
        const w0 = performance.now();
        const c1 = await counter(); // this call wakes it
        const wakeMs = performance.now() - w0;
        const elapsed = (performance.now() - t0) / 1000;
        info = await s.getInfo();
        assert.equal(info.state, 'running');
        assert.ok(c1 - c0 < elapsed * 10 - 10, `the counter was frozen while paused (${c0} → ${c1} in ${elapsed.toFixed(1)} s)`);
        assert.ok(Date.parse(info.endAt!) - end0 >= 1500, `the paused time was added to the life time (${end0} → ${info.endAt})`);
        await new Promise((r) => setTimeout(r, 500));
        assert.ok((await counter()) > c1, 'the counter continues');
        t.diagnostic(`${isolation}: auto-paused ${pausedAfter.toFixed(0)} ms after the last call (idleMs 1500); first call after it answered in ${wakeMs.toFixed(0)} ms; counter ${c0} → ${c1}`);
        // An explicit pause is not undone by calls.
        await s.pause();
        await assert.rejects(s.commands.run('true'), FailedPreconditionError);
        await Sandbox.resume(s.sandboxId, conn);
      } finally {
        await s.kill();
      }
    });

    test('limits: a fork bomb, a memory hog and a disk filler stay inside the sandbox, which reports why', { timeout: 180_000 }, async (t) => {
      if (skip) return t.skip(skip);
      const { spawnSync } = await import('node:child_process');
      const limitedSandbox = () => Sandbox.create({ ...conn, isolation, timeoutMs: 120_000, memoryMiB: 96, diskMiB: 64, ...(isolation === 'gvisor' ? {} : { pids: 64 }) });
      const alive = async (s: Sandbox) => (await s.commands.run('echo alive', { requestTimeoutMs: 30_000 })).stdout === 'alive\n';
      /** Runs a hazard; afterwards the sandbox either still answers or is gone with a reason. */
      const hazard = async (what: string, cmd: string, check: (r: { exitCode: number; stdout: string; stderr: string; oomKilled?: boolean }) => void) => {
        const s = await limitedSandbox();
        try {
          const r = await s.commands.run(cmd, { timeoutMs: 60_000 }).catch((e: Error) => ({ exitCode: -1, stdout: '', stderr: e.message, oomKilled: false }));
          assert.equal(spawnSync('true').status, 0, `the host can still fork after the ${what}`);
          let info = await s.getInfo();
          // A sandbox whose agent died is being cleaned up: wait for its final state and reason.
          for (let i = 0; i < 100 && (r.exitCode < 0 || info.state !== 'running') && !['stopped', 'failed'].includes(info.state); i++) {
            await new Promise((res) => setTimeout(res, 100));
            info = await s.getInfo();
          }
          t.diagnostic(`${what}: exit ${r.exitCode}${r.oomKilled ? ' (OOM-killed)' : ''}; sandbox ${info.state}${info.reason ? ` (${info.reason})` : ''}`);
          if (info.state === 'running') {
            check(r);
            assert.ok(await alive(s), `the sandbox answers after the ${what}`);
          } else {
            assert.ok(info.reason, `a sandbox that died says why: ${JSON.stringify(info)}`);
          }
        } finally {
          await s.kill();
        }
      };
      await hazard('memory hog', 'x=aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa; while :; do x=$x$x; done', (r) => {
        assert.equal(r.exitCode, 137);
        // Inside gVisor the Sentry's own OOM handling kills the task; it keeps no OOM counter the agent can read.
        if (isolation !== 'gvisor') assert.equal(r.oomKilled, true, 'the command result says the OOM killer ended it');
      });
      await hazard('disk filler', 'mkdir -p /data && dd if=/dev/zero of=/data/fill bs=1M count=200; echo rc=$?', (r) => {
        assert.match(r.stderr, /No space left|ENOSPC/i);
        assert.match(r.stdout, /rc=[1-9]/);
      });
      await hazard('fork bomb', 'b() { b | b & }; b; sleep 3; kill -9 -1 2>/dev/null; true', () => undefined);
      // /tmp is on the writable layer on every tier, under the disk limit: filling it is ENOSPC, and the
      // sandbox lives on (runsc's own tmpfs /tmp would hold the file in the sandbox's memory instead).
      const s = await limitedSandbox();
      try {
        const r = await s.commands.run('dd if=/dev/zero of=/tmp/fill bs=1M count=200; echo rc=$?', { timeoutMs: 60_000 });
        assert.match(r.stderr, /No space left/i, `filling /tmp: ${JSON.stringify(r)}`);
        assert.match(r.stdout, /rc=[1-9]/);
        assert.ok(await alive(s), 'the sandbox answers after /tmp filled up');
      } finally {
        await s.kill();
      }
    });

    test('snapshot → template → forks that continue its processes and files (microVM, gVisor)', { timeout: 120_000 }, async (t) => {
      if (skip) return t.skip(skip);
      const tpl = `tpl-${isolation.slice(0, 2)}-${tag}`;
      if (isolation === 'container') {
        await assert.rejects(sbx.snapshot(tpl), FailedPreconditionError);
        return;
      }
      await sbx.files.write('/tmp/origin', 'from the parent');
      await sbx.commands.start('i=0; while :; do i=$((i+1)); echo $i > /tmp/fc; sleep 0.1; done');
      await new Promise((r) => setTimeout(r, 500));
      const snap = await sbx.snapshot(tpl);
      t.diagnostic(`snapshot: ${snap.snapshotMs} ms, ${(snap.bytes / 2 ** 20).toFixed(1)} MiB`);
      assert.equal((await sbx.commands.run('echo still here')).stdout, 'still here\n', 'the parent keeps running');
      const counter = (s: Sandbox) => readCounter(s, '/tmp/fc');
      const p1 = await counter(sbx);
      await new Promise((r) => setTimeout(r, 400));
      const p2 = await counter(sbx);
      assert.ok(p1 > 0 && p2 > p1, `the parent's counter keeps counting (${p1} → ${p2})`);
      const forks: Sandbox[] = [];
      try {
        for (let i = 0; i < 2; i++) {
          const t0 = performance.now();
          const f = await Sandbox.create({ ...conn, fromTemplate: tpl, timeoutMs: 60_000 });
          t.diagnostic(`fork ${i}: created in ${(performance.now() - t0).toFixed(0)} ms`);
          forks.push(f);
          assert.equal(await f.files.read('/tmp/origin'), 'from the parent');
          const c1 = await counter(f);
          // A restored TCG guest retranslates its code first: on a loaded host that takes a while.
          let c2 = c1;
          for (let k = 0; k < 50 && c2 <= c1; k++) {
            await new Promise((r) => setTimeout(r, 200));
            c2 = await counter(f);
          }
          assert.ok(c1 > 0 && c2 > c1, `the parent's process runs on in the fork (${c1} → ${c2})`);
          await f.files.write('/tmp/mine', `fork ${i}`);
        }
        assert.equal(await forks[0]!.files.read('/tmp/mine'), 'fork 0', 'forks do not share their writes');
        assert.equal(await sbx.files.exists('/tmp/mine'), false, 'nor with the parent');
        // A paused sandbox can be snapshotted too, and stays paused.
        await sbx.pause();
        await sbx.snapshot(`${tpl}-p`);
        assert.equal((await sbx.getInfo()).state, 'paused');
        await Sandbox.resume(sbx.sandboxId, conn);
        assert.equal((await sbx.commands.run('echo resumed')).stdout, 'resumed\n');
        const fp = await Sandbox.create({ ...conn, fromTemplate: `${tpl}-p`, timeoutMs: 60_000 });
        forks.push(fp);
        assert.equal(await fp.files.read('/tmp/origin'), 'from the parent');
      } finally {
        for (const f of forks) await f.kill();
        for (const x of [tpl, `${tpl}-p`]) await fetch(`${d.addr}/v1/projects/default/sandbox-templates/${x}`, { method: 'DELETE', headers: { authorization: `Bearer ${d.token}` } });
      }
    });

    test('setTimeout extends the life time; a killed sandbox refuses calls', async (t) => {
      if (skip) return t.skip(skip);
      const before = Date.parse((await sbx.getInfo()).endAt!);
      await sbx.setTimeout(900_000);
      const afterSet = Date.parse((await sbx.getInfo()).endAt!);
      assert.ok(afterSet > before, `endAt moved from ${before} to ${afterSet}`);
      const other = await Sandbox.create({ ...conn, isolation, timeoutMs: 60_000 });
      await other.kill();
      await assert.rejects(other.commands.run('true'), (e: unknown) => e instanceof NotFoundError || e instanceof FailedPreconditionError);
    });
  });
}
