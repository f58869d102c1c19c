// End-to-end test of the berth CLI: a real berthd (temp data dir, random TCP port) and the real CLI
// binary, spawned as a child process exactly as a user would run it.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, openSync, closeSync, readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const CLI = fileURLToPath(new URL('../src/cli/main.js', import.meta.url));
const DAEMON = fileURLToPath(new URL('../src/daemon/main.js', import.meta.url));

const skip = process.getuid?.() !== 0 ? 'berthd must run as root' : false;

let dir = '';
let daemon: ChildProcess | undefined;
let addr = '';

interface Result {
  code: number | null;
  stdout: string;
  stderr: string;
}

function cleanEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env, BERTH_DATA_DIR: dir, ...extra };
  for (const k of ['BERTH_ADDR', 'BERTH_TOKEN', 'BERTH_PROJECT']) if (!(k in extra)) delete env[k];
  return env;
}

/** Run the CLI binary; resolves with its exit code and output. */
function berth(args: string[], opts: { env?: Record<string, string>; timeoutMs?: number } = {}): Promise<Result> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [CLI, ...args], { env: cleanEnv(opts.env), stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const timer = setTimeout(() => {
      if (child.pid) process.kill(child.pid, 'SIGKILL');
      reject(new Error(`berth ${args.join(' ')} did not finish within ${opts.timeoutMs ?? 60_000} ms\nstdout: ${stdout}\nstderr: ${stderr}`));
    }, opts.timeoutMs ?? 60_000);
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

const describe = (r: Result) => `exit ${r.code}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`;

async function ok(args: string[], opts?: { env?: Record<string, string> }): Promise<Result> {
  const r = await berth(args, opts);
  assert.equal(r.code, 0, `berth ${args.join(' ')} failed: ${describe(r)}`);
  return r;
}

function assertOneLineError(r: Result, what: string): void {
  assert.notEqual(r.code, 0, `${what}: expected failure: ${describe(r)}`);
  const lines = r.stderr.split('\n').filter((l) => l.length > 0);
  assert.equal(lines.length, 1, `${what}: expected exactly one stderr line, got: ${JSON.stringify(r.stderr)}`);
  assert.match(lines[0]!, /^berth: .+ \([a-zA-Z_]+\)$/, `${what}: unexpected error format: ${lines[0]}`);
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function inspect(name: string): Promise<{ status: { phase: string; exitCode?: number }; spec: Record<string, unknown>; labels: Record<string, string> }> {
  const r = await ok(['inspect', name]);
  return JSON.parse(r.stdout) as never;
}

async function waitPhase(name: string, phases: string[], timeoutMs = 20_000): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  let phase = '';
  while (Date.now() < deadline) {
    phase = (await inspect(name)).status.phase;
    if (phases.includes(phase)) return phase;
    await sleep(200);
  }
  assert.fail(`workload ${name} did not reach ${phases.join('|')} within ${timeoutMs} ms (last phase ${phase})`);
}

function daemonLog(): string {
  try {
    return readFileSync(join(dir, 'berthd.test.log'), 'utf8').split('\n').slice(-30).join('\n');
  } catch {
    return '(no log)';
  }
}

before(async () => {
  if (skip) return;
  dir = await mkdtemp('/tmp/berth-cli-test-');
  const logFd = openSync(join(dir, 'berthd.test.log'), 'a');
  daemon = spawn(process.execPath, [DAEMON, '--data-dir', dir, '--listen', '127.0.0.1:0', '--log-level', 'warn'], {
    stdio: ['ignore', logFd, logFd],
    env: cleanEnv(),
  });
  closeSync(logFd);
  let exited: number | null | undefined;
  daemon.on('exit', (code) => (exited = code));
  const deadline = Date.now() + 30_000;
  while (!existsSync(join(dir, 'berthd.addr')) || !existsSync(join(dir, 'berthd.sock'))) {
    if (exited !== undefined) throw new Error(`berthd exited early (code ${exited}):\n${daemonLog()}`);
    if (Date.now() > deadline) throw new Error(`berthd did not start within 30 s:\n${daemonLog()}`);
    await sleep(100);
  }
  addr = readFileSync(join(dir, 'berthd.addr'), 'utf8').trim();
});

after(async () => {
  if (skip || !dir) return;
  try {
    if (daemon && daemon.exitCode === null) {
      // Remove everything the tests created while the daemon still runs.
      const jobs = await berth(['job', 'ls', '-o', 'json']);
      if (jobs.code === 0) {
        for (const j of (JSON.parse(jobs.stdout) as { items: { name: string }[] }).items) await berth(['job', 'rm', j.name]);
      }
      for (const project of ['default', 'cli-test']) {
        const ps = await berth(['ps', '-a', '-o', 'json', '-p', project]);
        if (ps.code !== 0) continue;
        const names = (JSON.parse(ps.stdout) as { items: { name: string }[] }).items.map((w) => w.name);
        if (names.length) await berth(['rm', '-f', '-p', project, ...names]);
      }
      await berth(['project', 'rm', 'cli-test']);
    }
  } finally {
    if (daemon?.pid && daemon.exitCode === null) {
      const exitedP = new Promise<void>((r) => daemon!.once('exit', () => r()));
      process.kill(daemon.pid, 'SIGTERM');
      let timer: NodeJS.Timeout | undefined;
      const timedOut = new Promise<boolean>((r) => (timer = setTimeout(() => r(true), 20_000)));
      const late = await Promise.race([exitedP.then(() => false), timedOut]);
      clearTimeout(timer);
      if (late && daemon.exitCode === null) process.kill(daemon.pid, 'SIGKILL');
    }
    await rm(dir, { recursive: true, force: true });
  }
});

test('info over the unix socket and over TCP; -o json parses', { skip }, async () => {
  const t = await ok(['info']);
  assert.match(t.stdout, /ISOLATION\s+DRIVER\s+HEALTHY/);
  assert.match(t.stdout, /container/);
  const j = JSON.parse((await ok(['info', '-o', 'json'])).stdout) as { version: string; drivers: unknown[] };
  assert.equal(typeof j.version, 'string');
  assert.ok(j.drivers.length >= 1);
  const tcp = await ok(['info', '-o', 'json'], { env: { BERTH_ADDR: `http://${addr}` } });
  assert.deepEqual((JSON.parse(tcp.stdout) as { version: string }).version, j.version);
  const viaFlag = await ok(['--addr', `http://${addr}`, 'info']);
  assert.match(viaFlag.stdout, /container/);
});

test('run attached: stdout and stderr are split, exit code is the workload\'s', { skip }, async () => {
  const r = await berth(['run', 'busybox', '--', 'sh', '-c', 'echo out; echo err >&2; exit 7']);
  assert.equal(r.stdout, 'out\n', describe(r));
  assert.equal(r.stderr, 'err\n', describe(r));
  assert.equal(r.code, 7, describe(r));
});

test('run -e, --memory, --cpus, --pids and -l reach the spec', { skip }, async () => {
  const r = await ok(
    ['run', '-d', '--name', 'limits', '-e', 'GREETING=hi=there', '-e', 'FROM_SHELL', '--memory', '64m', '--cpus', '0.5', '--pids', '50', '-l', 'team=cli', '-w', '/tmp', 'busybox', '--', 'sh', '-c', 'echo "$GREETING $FROM_SHELL $(pwd)"'],
    { env: { FROM_SHELL: 'copied' } },
  );
  assert.equal(r.stdout, 'limits\n');
  const w = await inspect('limits');
  assert.deepEqual(w.spec.resources, { cpuMillis: 500, memoryMiB: 64, pids: 50 });
  assert.deepEqual(w.spec.env, { GREETING: 'hi=there', FROM_SHELL: 'copied' });
  assert.equal(w.spec.workingDir, '/tmp');
  assert.deepEqual(w.labels, { team: 'cli' });
  await waitPhase('limits', ['exited', 'failed']);
  const logs = await ok(['logs', 'limits']);
  assert.equal(logs.stdout, 'hi=there copied /tmp\n');
  const sel = JSON.parse((await ok(['ps', '-a', '-l', 'team=cli', '-o', 'json'])).stdout) as { items: { name: string }[] };
  assert.deepEqual(sel.items.map((i) => i.name), ['limits']);
  await ok(['rm', 'limits']);
});

test('run -d, ps, logs, stop, rm', { skip }, async () => {
  const r = await ok(['run', '-d', '--name', 'sleeper', 'busybox', '--', 'sh', '-c', 'echo started; echo warn >&2; exec sleep 300']);
  assert.equal(r.stdout, 'sleeper\n');
  assert.equal(r.stderr, '');
  await waitPhase('sleeper', ['running']);

  const ps = JSON.parse((await ok(['ps', '-o', 'json'])).stdout) as { items: { name: string; status: { phase: string } }[] };
  const s = ps.items.find((i) => i.name === 'sleeper');
  assert.ok(s, 'ps -o json lists sleeper');
  assert.equal(s.status.phase, 'running');
  const table = await ok(['ps']);
  assert.match(table.stdout, /^NAME\s+PHASE\s+EXIT\s+IMAGE\s+ISOLATION\s+ADDRESS\s+PID\s+AGE$/m);
  // With its address on the project network.
  assert.match(table.stdout, /^sleeper\s+running\s+-\s+busybox\s+container\s+\d+\.\d+\.\d+\.\d+\s+\d+\s+\d+[smhd]$/m);

  // The output may take a moment to reach the log file.
  let logs: Result = { code: null, stdout: '', stderr: '' };
  for (let i = 0; i < 50; i++) {
    logs = await ok(['logs', 'sleeper']);
    if (logs.stdout.includes('started') && logs.stderr.includes('warn')) break;
    await sleep(100);
  }
  assert.equal(logs.stdout, 'started\n');
  assert.equal(logs.stderr, 'warn\n');
  const ts = await ok(['logs', '-t', '--tail', '1', 'sleeper']);
  assert.match(ts.stdout + ts.stderr, /^\d{4}-\d\d-\d\dT\S+ (started|warn)\n$/);

  const refused = await berth(['rm', 'sleeper']);
  assertOneLineError(refused, 'rm of a running workload');
  assert.match(refused.stderr, /stop it first|rm -f/);

  const stop = await ok(['stop', '-t', '1', 'sleeper']);
  assert.equal(stop.stdout, 'sleeper\n');
  assert.equal((await inspect('sleeper')).status.phase, 'stopped');
  assert.doesNotMatch((await ok(['ps'])).stdout, /sleeper/);
  assert.match((await ok(['ps', '-a'])).stdout, /sleeper\s+stopped/);
  const events = await ok(['events', 'sleeper']);
  assert.match(events.stdout, /^TIME\s+TYPE\s+REASON\s+MESSAGE$/m);

  const rmr = await ok(['rm', 'sleeper']);
  assert.equal(rmr.stdout, 'sleeper\n');
  const gone = await berth(['inspect', 'sleeper']);
  assertOneLineError(gone, 'inspect after rm');
  assert.match(gone.stderr, /not_found/);
});

test('rm -f removes a running workload', { skip }, async () => {
  await ok(['run', '-d', '--name', 'forced', 'busybox', '--', 'sh', '-c', 'trap "exit 0" TERM; sleep 300 & wait']);
  await waitPhase('forced', ['running']);
  assert.equal((await ok(['rm', '-f', 'forced'])).stdout, 'forced\n');
  assert.equal((await berth(['inspect', 'forced'])).code, 1);
});

test('Ctrl-C while attached detaches without stopping the workload', { skip }, async () => {
  const child = spawn(process.execPath, [CLI, 'run', '--name', 'attached', 'busybox', '--', 'sh', '-c', 'trap "exit 0" TERM; echo ready; sleep 300 & wait'], {
    env: cleanEnv(),
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  child.stdout!.setEncoding('utf8').on('data', (d: string) => (stdout += d));
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  const closed = new Promise<number | null>((r) => child.on('close', (code) => r(code)));
  const deadline = Date.now() + 20_000;
  while (!stdout.includes('ready') && Date.now() < deadline) await sleep(50);
  assert.equal(stdout, 'ready\n', `never saw the workload's output; stderr: ${stderr}`);
  process.kill(child.pid!, 'SIGINT');
  const code = await closed;
  assert.equal(code, 130);
  assert.equal(stderr.trim().split('\n').length, 1, stderr);
  assert.match(stderr, /berth logs -f attached/);
  assert.equal((await inspect('attached')).status.phase, 'running');
  await ok(['rm', '-f', 'attached']);
});

test('run: a failed start exits 125, an OOM kill exits 137 with a one-line note', { skip }, async () => {
  const oom = await berth(['run', '--memory', '8m', 'busybox', '--', 'sh', '-c', 'x=a; while true; do x="$x$x"; done']);
  assert.equal(oom.code, 137, describe(oom));
  assert.equal(oom.stderr, 'berth: workload was OOM-killed (memory limit 8 MiB)\n');
  const missing = await berth(['run', 'busybox', '--', '/no/such/binary']);
  assert.notEqual(missing.code, 0, describe(missing));
  assert.equal(missing.stderr.trim().split('\n').length, 1, describe(missing));
});

test('usage errors: bad flag values exit non-zero with one stderr line', { skip }, async () => {
  const r = await berth(['run', '--restart', 'sometimes', 'busybox']);
  assertOneLineError(r, '--restart sometimes');
  assert.equal(r.code, 2);
  assert.match(r.stderr, /sometimes/);
  const m = await berth(['run', '--memory', 'lots', 'busybox']);
  assertOneLineError(m, '--memory lots');
  const unknown = await berth(['ps', '--bogus']);
  assertOneLineError(unknown, 'unknown flag');
  assert.equal(unknown.code, 2);
});

test('API errors: unknown project, bad token, unreachable daemon', { skip }, async () => {
  const r = await berth(['-p', 'no-such-project', 'ps']);
  assertOneLineError(r, 'unknown project');
  assert.equal(r.code, 1);
  assert.match(r.stderr, /not found/);
  assert.match(r.stderr, /\(not_found\)$/m);
  const r2 = await berth(['ps', '-p', 'no-such-project'], { env: { BERTH_PROJECT: 'default' } });
  assert.match(r2.stderr, /not found/);

  const bad = await berth(['ps', '--token', 'nope']);
  assertOneLineError(bad, 'bad token');
  assert.match(bad.stderr, /unauthenticated/);

  const down = await berth(['info', '--addr', 'http://127.0.0.1:1']);
  assertOneLineError(down, 'unreachable daemon');
  assert.match(down.stderr, /isn't reachable at .*127\.0\.0\.1:1.*berthd --data-dir/);

  const invalid = await berth(['run', '-d', '--name', 'Bad_Name', 'busybox']);
  assertOneLineError(invalid, 'invalid name');
  assert.match(invalid.stderr, /invalid_argument/);
});

test('projects: create, ls, inspect, run in a project, rm', { skip }, async () => {
  assert.equal((await ok(['project', 'create', 'cli-test', '--description', 'from the CLI test', '-l', 'env=test'])).stdout, 'cli-test\n');
  assert.match((await ok(['project', 'ls'])).stdout, /cli-test\s+from the CLI test\s+env=test/);
  const p = JSON.parse((await ok(['project', 'inspect', 'cli-test'])).stdout) as { name: string; labels: Record<string, string> };
  assert.equal(p.name, 'cli-test');
  assert.deepEqual(p.labels, { env: 'test' });
  const run = await berth(['run', '-p', 'cli-test', 'busybox', '--', 'echo', 'in-project'], { env: {} });
  assert.equal(run.stdout, 'in-project\n', describe(run));
  assert.equal(run.code, 0);
  const ps = JSON.parse((await ok(['ps', '-a', '-o', 'json'], { env: { BERTH_PROJECT: 'cli-test' } })).stdout) as { items: { name: string }[] };
  assert.equal(ps.items.length, 1);
  const notEmpty = await berth(['project', 'rm', 'cli-test']);
  assertOneLineError(notEmpty, 'rm of a non-empty project');
  await ok(['rm', '-p', 'cli-test', ps.items[0]!.name]);
  assert.equal((await ok(['project', 'rm', 'cli-test'])).stdout, 'cli-test\n');
});

test('jobs: create, run (exit code), runs, logs, ls, inspect, rm', { skip }, async () => {
  assert.equal((await ok(['job', 'create', 'j1', '--retries', '0', '--history', '5', 'busybox', '--', 'sh', '-c', 'echo job-out; echo job-err >&2; exit 3'])).stdout, 'j1\n');
  const run = await berth(['job', 'run', 'j1']);
  assert.equal(run.code, 3, describe(run));
  assert.equal(run.stdout, 'job-out\n');
  assert.equal(run.stderr, 'job-err\n');

  const runs = JSON.parse((await ok(['job', 'runs', 'j1', '-o', 'json'])).stdout) as { items: { name: string; status: { phase: string; exitCode?: number } }[] };
  assert.equal(runs.items.length, 1);
  assert.equal(runs.items[0]!.status.phase, 'failed');
  assert.equal(runs.items[0]!.status.exitCode, 3);
  const runName = runs.items[0]!.name;
  assert.match((await ok(['job', 'runs', 'j1'])).stdout, /^RUN\s+PHASE\s+TRIGGER\s+ATTEMPTS\s+EXIT\s+STARTED\s+FINISHED$/m);
  const logs = await ok(['job', 'logs', 'j1', runName]);
  assert.equal(logs.stdout, 'job-out\n');

  await ok(['job', 'create', 'j2', '--schedule', '0 3 * * *', '--tz', 'Europe/Paris', '--concurrency', 'forbid', 'busybox', '--', 'true']);
  const detached = await ok(['job', 'run', '-d', 'j2']);
  assert.match(detached.stdout, /^\S+\n$/);
  const list = JSON.parse((await ok(['job', 'ls', '-o', 'json'])).stdout) as { items: { name: string }[] };
  assert.deepEqual(list.items.map((j) => j.name).sort(), ['j1', 'j2']);
  assert.match((await ok(['job', 'ls'])).stdout, /j2\s+0 3 \* \* \*\s+Europe\/Paris\s+forbid/);
  const j2 = JSON.parse((await ok(['job', 'inspect', 'j2'])).stdout) as { spec: { schedule: string; timeZone: string } };
  assert.equal(j2.spec.timeZone, 'Europe/Paris');

  const zero = await berth(['job', 'create', 'j3', '--schedule', 'sometimes', 'busybox']);
  assertOneLineError(zero, 'bad schedule');

  assert.equal((await ok(['job', 'rm', 'j1'])).stdout, 'j1\n');
  await ok(['job', 'rm', 'j2']);
  assert.equal((await berth(['job', 'inspect', 'j1'])).code, 1);
});

test('tokens: create, use, ls, rm', { skip }, async () => {
  const secret = (await ok(['token', 'create', 'ci'])).stdout.trim();
  assert.ok(secret.length > 10);
  await ok(['ps'], { env: { BERTH_TOKEN: secret } });
  assert.match((await ok(['token', 'ls'])).stdout, /^ci\s+\(all\)/m);
  const ls = JSON.parse((await ok(['token', 'ls', '-o', 'json'])).stdout) as { items: { name: string }[] };
  assert.ok(ls.items.some((t) => t.name === 'ci'));
  assert.equal((await ok(['token', 'rm', 'ci'])).stdout, 'ci\n');
  const revoked = await berth(['ps'], { env: { BERTH_TOKEN: secret } });
  assertOneLineError(revoked, 'revoked token');
});
