// End to end: an image built here (the host's static busybox plus an app layer that whites out a
// file of the base) is pushed to a real registry on 127.0.0.1 (Debian's docker-registry), pulled
// through berthd's API and the CLI, run as workloads, and removed with garbage collection; the
// same through htpasswd auth; bad input gets the API's usual errors.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { TestDaemon } from './harness.js';
import { ImageStore } from '../src/images/store.js';
import { RegistryClient } from '../src/images/registry.js';
import { parseRef } from '../src/images/ref.js';
import { busyboxLayer, gzipLayer, makeImage, makeTar, registrySkip, startRegistry, storeImage, type BuiltImage, type TestRegistry } from '../src/images/testing.js';

const CLI = fileURLToPath(new URL('../src/cli/main.js', import.meta.url));
const skip = process.getuid?.() !== 0 ? 'berthd must run as root' : !existsSync('/bin/busybox') ? 'busybox-static not installed' : registrySkip;
const W = '/v1/projects/default/workloads';

async function buildAppImage(): Promise<BuiltImage> {
  const base = await busyboxLayer();
  const app = gzipLayer(
    await makeTar([
      { name: 'app/', type: 'directory' },
      { name: 'app/hello.sh', content: '#!/bin/sh\necho "hello from $GREETING in $(pwd) as $(id -u)"\n[ -e /etc/group ] && echo "group still there" || echo "group whited out"\n', mode: 0o755 },
      { name: 'etc/.wh.group' },
    ]),
  );
  return makeImage([base, app], { Env: ['PATH=/bin', 'GREETING=berth-e2e'], Entrypoint: ['/app/hello.sh'], WorkingDir: '/app', User: '0:0' });
}

async function push(img: BuiltImage, ref: string, credentials?: { username: string; password: string }): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'berth-e2e-push-'));
  const store = new ImageStore(dir);
  try {
    await storeImage(store, img);
    await new RegistryClient(credentials ? { credentials: () => credentials } : {}).push(store, img.manifestDigest, parseRef(ref));
  } finally {
    store.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

function berth(d: TestDaemon, args: string[], stdin?: string): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const env: NodeJS.ProcessEnv = { ...process.env, BERTH_ADDR: d.addr, BERTH_TOKEN: d.token, BERTH_DATA_DIR: d.dataDir };
    const child = spawn(process.execPath, [CLI, ...args], { env, stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (s: string) => (stdout += s));
    child.stderr.setEncoding('utf8').on('data', (s: string) => (stderr += s));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, stdout, stderr }));
    child.stdin.end(stdin ?? '');
  });
}

async function runToExit(d: TestDaemon, name: string, spec: Record<string, unknown>): Promise<{ w: any; logs: string }> {
  const r = await d.api('POST', W, { name, spec });
  assert.equal(r.status, 201, JSON.stringify(r.body));
  const w = await d.waitWorkload('default', name, (x) => ['exited', 'failed'].includes(x.status.phase), 60_000);
  const logs = (await d.api('GET', `${W}/${name}/logs`)).body as string;
  return { w, logs };
}

describe('images end to end: registry → API pull → workload', { skip }, () => {
  let reg: TestRegistry;
  let d: TestDaemon;
  let img: BuiltImage;
  let ref: string;
  before(async () => {
    reg = await startRegistry();
    d = await TestDaemon.start();
    img = await buildAppImage();
    ref = `${reg.host}/e2e/app:v1`;
    await push(img, ref);
  });
  after(async () => {
    await d?.deleteAllWorkloads().catch(() => undefined);
    await d?.destroy();
    await reg?.stop();
  });

  test('pull through the API, run it as a workload with the image config, twice without re-unpacking', async () => {
    const pulled = await d.api('POST', '/v1/images/pull', { ref });
    assert.equal(pulled.status, 200, JSON.stringify(pulled.body));
    assert.equal(pulled.body.digest, img.manifestDigest);
    assert.equal(pulled.body.unpacked, true);
    assert.deepEqual(pulled.body.config, { env: { PATH: '/bin', GREETING: 'berth-e2e' }, entrypoint: ['/app/hello.sh'], cmd: [], workingDir: '/app', user: '0:0' });

    const list = await d.api('GET', '/v1/images');
    assert.deepEqual(list.body.items.map((i: any) => i.ref).sort(), [ref, 'busybox:latest'].sort());
    const inspect = await d.api('GET', `/v1/images/inspect?ref=${encodeURIComponent(ref)}`);
    assert.equal(inspect.status, 200);
    assert.equal(inspect.body.layers, 2);

    const first = await runToExit(d, 'from-registry', { image: ref });
    assert.equal(first.w.status.exitCode, 0, first.logs);
    assert.match(first.logs, /hello from berth-e2e in \/app as 0/);
    assert.match(first.logs, /group whited out/);

    const rootfsDir = join(d.dataDir, 'images', 'rootfs');
    const before = readdirSync(rootfsDir);
    const second = await runToExit(d, 'again', { image: `${reg.host}/e2e/app@${img.manifestDigest}`, command: ['sh', '-c', 'cat /app/hello.sh | wc -l; touch /app/scratch && echo wrote'] });
    assert.equal(second.w.status.exitCode, 0, second.logs);
    assert.match(second.logs, /^3$/m);
    assert.match(second.logs, /wrote/);
    assert.deepEqual(readdirSync(rootfsDir), before, 'the shared rootfs was reused');
    assert.equal(existsSync(join(rootfsDir, img.manifestDigest.slice(7), 'app/scratch')), false, 'workload writes do not reach the shared rootfs');
  });

  test('pull with progress streams NDJSON per layer, then the image', async () => {
    const res = await fetch(`${d.addr}/v1/images/pull`, { method: 'POST', headers: { authorization: `Bearer ${d.token}`, 'content-type': 'application/json' }, body: JSON.stringify({ ref, progress: true }) });
    assert.equal(res.status, 200);
    assert.match(res.headers.get('content-type') ?? '', /ndjson/);
    const lines = (await res.text()).trim().split('\n').map((l) => JSON.parse(l));
    assert.equal(lines.at(-1).image.digest, img.manifestDigest);
    const layerEvents = lines.filter((l) => l.progress?.kind === 'layer');
    assert.ok(layerEvents.length >= 2, JSON.stringify(lines));
    assert.ok(layerEvents.every((l) => ['waiting', 'exists'].includes(l.progress.status)), 'second pull: every layer already present');
  });

  test('bad input: invalid reference, unknown image, image not pulled, unknown fields', async () => {
    const bad = await d.api('POST', '/v1/images/pull', { ref: 'Bad Ref!' });
    assert.equal(bad.status, 400);
    assert.equal(bad.body.error.code, 'invalid_argument');
    assert.match(bad.body.error.message, /not a valid image reference/);
    const extra = await d.api('POST', '/v1/images/pull', { ref, force: true });
    assert.equal(extra.status, 400);
    assert.match(extra.body.error.message, /unknown field/);
    const badTag = await d.api('POST', '/v1/images/pull', { ref: `${reg.host}/e2e/app:bad$tag` });
    assert.equal(badTag.status, 400);
    const missing = await d.api('POST', '/v1/images/pull', { ref: `${reg.host}/e2e/nothing:1` });
    assert.equal(missing.status, 404, JSON.stringify(missing.body));
    assert.match(missing.body.error.message, /not found in registry/);
    const notPulled = await d.api('POST', W, { name: 'nope', spec: { image: `${reg.host}/e2e/other:1` } });
    assert.equal(notPulled.status, 400);
    assert.match(notPulled.body.error.message, /pull it first/);
    const inspect = await d.api('GET', `/v1/images/inspect?ref=${encodeURIComponent(`${reg.host}/e2e/other:1`)}`);
    assert.equal(inspect.status, 404);
    const badWorkloadRef = await d.api('POST', W, { name: 'bad-ref', spec: { image: 'UPPER:CASE:x' } });
    assert.equal(badWorkloadRef.status, 400);
  });

  test('CLI: image ls, pull (progress on stderr), inspect, rm', async () => {
    const other = makeImage([img.layers[0]!], { Cmd: ['sh'] });
    await push(other, `${reg.host}/e2e/base:1`);
    const pull = await berth(d, ['image', 'pull', `${reg.host}/e2e/base:1`]);
    assert.equal(pull.code, 0, pull.stderr);
    assert.equal(pull.stdout, `${reg.host}/e2e/base:1\n${other.manifestDigest}\n`);
    assert.match(pull.stderr, /already present/, 'the shared busybox layer is not downloaded again');
    const ls = await berth(d, ['image', 'ls']);
    assert.equal(ls.code, 0, ls.stderr);
    assert.match(ls.stdout, /^REF\s+DIGEST\s+SIZE\s+LAYERS\s+CREATED$/m);
    assert.match(ls.stdout, new RegExp(`^${reg.host}/e2e/base:1\\s+sha256:`, 'm'));
    const insp = await berth(d, ['image', 'inspect', `${reg.host}/e2e/base:1`]);
    assert.equal(JSON.parse(insp.stdout).digest, other.manifestDigest);
    const rm = await berth(d, ['image', 'rm', `${reg.host}/e2e/base:1`]);
    assert.equal(rm.code, 0, rm.stderr);
    assert.match(rm.stdout, /freed .*, 2 blobs/, 'manifest and config go; the busybox layer stays (the app image uses it)');
    const again = await berth(d, ['image', 'rm', `${reg.host}/e2e/base:1`]);
    assert.equal(again.code, 1);
    assert.match(again.stderr, /not on this host.*\(not_found\)/);
    const usage = await berth(d, ['image', 'pull', '-u', 'x', `${reg.host}/e2e/base:1`]);
    assert.equal(usage.code, 2);
    assert.match(usage.stderr, /--password-stdin/);
  });

  test('delete: refused while a workload uses the image, then removes its blobs and rootfs', async () => {
    const inUse = await d.api('DELETE', `/v1/images?ref=${encodeURIComponent(ref)}`);
    assert.equal(inUse.status, 412, JSON.stringify(inUse.body));
    assert.match(inUse.body.error.message, /used by workload default\/from-registry/);
    await d.deleteAllWorkloads();
    const del = await d.api('DELETE', `/v1/images?ref=${encodeURIComponent(ref)}`);
    assert.equal(del.status, 200, JSON.stringify(del.body));
    assert.deepEqual(del.body.removedBlobs.sort(), [img.manifestDigest, img.configDigest, ...img.layers.map((l) => l.digest)].sort());
    assert.deepEqual(readdirSync(join(d.dataDir, 'images', 'store', 'blobs', 'sha256')), []);
    assert.deepEqual(readdirSync(join(d.dataDir, 'images', 'rootfs')), []);
    const list = await d.api('GET', '/v1/images');
    assert.deepEqual(list.body.items.map((i: any) => i.ref), ['busybox:latest']);
    const busybox = await d.api('DELETE', '/v1/images?ref=busybox');
    assert.equal(busybox.status, 412);
    assert.deepEqual(d.hostResidue(), []);
  });
});

describe('images end to end: registry with htpasswd auth', { skip }, () => {
  let reg: TestRegistry;
  let d: TestDaemon;
  const creds = { username: 'e2e', password: 'e2e-secret-pw' };
  before(async () => {
    reg = await startRegistry({ auth: creds });
    d = await TestDaemon.start();
  });
  after(async () => {
    await d?.deleteAllWorkloads().catch(() => undefined);
    await d?.destroy();
    await reg?.stop();
  });

  test('pull needs the credentials, which are neither stored nor logged', async () => {
    const img = await buildAppImage();
    const ref = `${reg.host}/private/app:1`;
    await push(img, ref, creds);
    const anon = await d.api('POST', '/v1/images/pull', { ref });
    assert.equal(anon.status, 412, JSON.stringify(anon.body));
    assert.match(anon.body.error.message, /needs a user name and password/);
    const wrong = await d.api('POST', '/v1/images/pull', { ref, auth: { username: 'e2e', password: 'wrong-pw-123' } });
    assert.equal(wrong.status, 412);
    assert.doesNotMatch(JSON.stringify(wrong.body), /wrong-pw-123/);
    const cli = await berth(d, ['image', 'pull', '-u', 'e2e', '--password-stdin', ref], `${creds.password}\n`);
    assert.equal(cli.code, 0, cli.stderr);
    const run = await runToExit(d, 'private', { image: ref });
    assert.match(run.logs, /hello from berth-e2e/);
    assert.doesNotMatch(d.recentLogs(), /e2e-secret-pw|wrong-pw-123/);
    const { execFileSync } = await import('node:child_process');
    const grep = (() => {
      try {
        return execFileSync('grep', ['-rl', creds.password, d.dataDir], { encoding: 'utf8' });
      } catch {
        return '';
      }
    })();
    assert.equal(grep, '', 'the password is stored nowhere under the data dir');
  });
});

describe('images end to end: login, tag, push with cross-repository mount, export and import through the CLI', { skip }, () => {
  let reg: TestRegistry;
  let d: TestDaemon;
  let work: string;
  const creds = { username: 'pusher', password: 'push-secret-pw' };
  before(async () => {
    reg = await startRegistry({ auth: creds });
    d = await TestDaemon.start();
    work = mkdtempSync(join(tmpdir(), 'berth-e2e-archive-'));
  });
  after(async () => {
    await d?.deleteAllWorkloads().catch(() => undefined);
    await d?.destroy();
    await reg?.stop();
    rmSync(work, { recursive: true, force: true });
  });

  test('login (checked, stored 0600, never returned or logged), pull and push with it, logout', async () => {
    const img = await buildAppImage();
    const src = `${reg.host}/team/app:1`;
    await push(img, src, creds);
    const wrong = await berth(d, ['login', reg.host, '-u', 'pusher', '--password-stdin'], 'not-the-pw\n');
    assert.equal(wrong.code, 1);
    assert.match(wrong.stderr, /refused the credentials.*\(failed_precondition\)/);
    assert.equal(existsSync(join(d.dataDir, 'images', 'credentials.json')), false, 'refused credentials are not stored');
    const ok = await berth(d, ['login', reg.host, '-u', 'pusher', '--password-stdin'], `${creds.password}\n`);
    assert.equal(ok.code, 0, ok.stderr);
    const { statSync } = await import('node:fs');
    assert.equal(statSync(join(d.dataDir, 'images', 'credentials.json')).mode & 0o777, 0o600);
    const listed = await d.api('GET', '/v1/registries');
    assert.deepEqual(listed.body.items, [{ registry: reg.host, username: 'pusher' }]);

    const pull = await berth(d, ['image', 'pull', src]);
    assert.equal(pull.code, 0, pull.stderr);
    const tag = await berth(d, ['image', 'tag', src, `${reg.host}/other/app:2`]);
    assert.equal(tag.code, 0, tag.stderr);
    assert.equal(tag.stdout, `${reg.host}/other/app:2\n`);
    const pushed = await berth(d, ['image', 'push', '-o', 'json', `${reg.host}/other/app:2`]);
    assert.equal(pushed.code, 0, pushed.stderr);
    const res = JSON.parse(pushed.stdout);
    assert.deepEqual(res.mounted.sort(), [img.configDigest, ...img.layers.map((l) => l.digest)].sort(), 'blobs are mounted from team/app, not uploaded');
    assert.deepEqual(res.uploaded, []);
    // what was pushed pulls back under the new name, byte for byte
    const back = await d.api('POST', '/v1/images/pull', { ref: `${reg.host}/other/app:2` });
    assert.equal(back.body.digest, img.manifestDigest);

    assert.doesNotMatch(d.recentLogs(), /push-secret-pw/);
    assert.doesNotMatch(JSON.stringify(listed.body), /push-secret-pw/);
    const out = await berth(d, ['logout', reg.host]);
    assert.equal(out.code, 0, out.stderr);
    const anon = await d.api('POST', '/v1/images/push', { ref: `${reg.host}/other/app:2` });
    assert.equal(anon.status, 412, JSON.stringify(anon.body));
    const badReg = await d.api('POST', '/v1/registries/login', { registry: 'not a host', username: 'a', password: 'b' });
    assert.equal(badReg.status, 400);
  });

  test('export (oci and docker formats) and import (file, directory) round trip', async () => {
    const ref = `${reg.host}/other/app:2`;
    const digest = (await d.api('GET', `/v1/images/inspect?ref=${encodeURIComponent(ref)}`)).body.digest;
    for (const format of ['oci', 'docker']) {
      const file = join(work, `app-${format}.tar`);
      const exp = await berth(d, ['image', 'export', ref, '-o', file, '--format', format]);
      assert.equal(exp.code, 0, exp.stderr);
      const rm = await d.api('DELETE', `/v1/images?ref=${encodeURIComponent(`${reg.host}/team/app:1`)}`);
      assert.ok([200, 404].includes(rm.status));
      const imp = await berth(d, ['image', 'import', file, '--tag', `${reg.host}/team/app:1`]);
      assert.equal(imp.code, 0, imp.stderr);
      assert.equal(imp.stdout, `${reg.host}/team/app:1\n${digest}\n`);
    }
    // an OCI layout directory
    const dir = join(work, 'layout');
    const { execFileSync } = await import('node:child_process');
    execFileSync('mkdir', ['-p', dir]);
    execFileSync('tar', ['-C', dir, '-xf', join(work, 'app-oci.tar')]);
    const imp = await berth(d, ['image', 'import', dir]);
    assert.equal(imp.code, 0, imp.stderr);
    assert.equal(imp.stdout, `${ref}\n${digest}\n`);
    const run = await runToExit(d, 'imported', { image: ref });
    assert.match(run.logs, /hello from berth-e2e/);
    const bad = await berth(d, ['image', 'import', join(work, 'nope.tar')]);
    assert.equal(bad.code, 2);
    const notArchive = join(work, 'junk');
    execFileSync('sh', ['-c', `head -c 4096 /dev/urandom > ${notArchive}`]);
    const junk = await berth(d, ['image', 'import', notArchive]);
    assert.equal(junk.code, 1);
    assert.match(junk.stderr, /invalid_argument/);
  });
});

describe('acceptance 1: pull → run → build a derived image → push → pull on a clean data dir → run', { skip: skip || (!existsSync('/usr/bin/buildah') ? 'buildah not installed' : false) }, () => {
  let reg: TestRegistry;
  let d: TestDaemon;
  let fresh: TestDaemon | undefined;
  let work: string;
  before(async () => {
    reg = await startRegistry();
    d = await TestDaemon.start();
    work = mkdtempSync(join(tmpdir(), 'berth-e2e-acc1-'));
  });
  after(async () => {
    for (const x of [d, fresh]) {
      await x?.deleteAllWorkloads().catch(() => undefined);
      await x?.destroy();
    }
    await reg?.stop();
    rmSync(work, { recursive: true, force: true });
  });

  test('outputs as expected at every step', { timeout: 300_000 }, async () => {
    const img = await buildAppImage();
    const base = `${reg.host}/acc/app:v1`;
    await push(img, base);
    const pulled = await berth(d, ['image', 'pull', base]);
    assert.equal(pulled.code, 0, pulled.stderr);
    const run1 = await runToExit(d, 'base-run', { image: base });
    assert.equal(run1.w.status.exitCode, 0, run1.logs);
    assert.match(run1.logs, /hello from berth-e2e in \/app as 0/);

    const { writeFileSync, mkdirSync } = await import('node:fs');
    const ctx = join(work, 'ctx');
    mkdirSync(ctx);
    writeFileSync(join(ctx, 'extra.txt'), 'extra file from the build context\n');
    writeFileSync(
      join(ctx, 'Dockerfile'),
      `FROM ${base}\nCOPY extra.txt /app/extra.txt\nRUN echo "made by RUN" > /app/built\nENV GREETING=derived\nENTRYPOINT ["/bin/sh", "-c", "/app/hello.sh; cat /app/extra.txt /app/built"]\n`,
    );
    const derived = `${reg.host}/acc/derived:v2`;
    const built = await berth(d, ['build', '-t', derived, ctx]);
    assert.equal(built.code, 0, built.stderr);
    assert.match(built.stderr, /STEP 3\/5: RUN echo "made by RUN"/);
    const [ref, digest] = built.stdout.trim().split('\n');
    assert.equal(ref, derived);
    const run2 = await runToExit(d, 'derived-run', { image: derived });
    assert.equal(run2.w.status.exitCode, 0, run2.logs);
    assert.match(run2.logs, /hello from derived in \/app as 0\n[\s\S]*extra file from the build context\nmade by RUN/);

    const pushed = await berth(d, ['image', 'push', '-o', 'json', derived]);
    assert.equal(pushed.code, 0, pushed.stderr);
    const pr = JSON.parse(pushed.stdout);
    assert.equal(pr.digest, digest);
    assert.ok(pr.mounted.length >= 1, `the base layers are mounted from acc/app: ${pushed.stdout}`);

    // a base image made on the host, through the CLI (NDJSON log on stderr), runs as a workload
    const bb = await berth(d, ['image', 'base', 'busybox', '-t', 'localhost/acc/busybox:1']);
    assert.equal(bb.code, 0, bb.stderr);
    assert.match(bb.stdout, /^localhost\/acc\/busybox:1\nsha256:[0-9a-f]{64}\n$/);
    const run4 = await runToExit(d, 'base-busybox', { image: 'localhost/acc/busybox:1', command: ['sh', '-c', 'echo from-base; ls /bin/busybox'] });
    assert.equal(run4.w.status.exitCode, 0, run4.logs);
    assert.match(run4.logs, /from-base\n\/bin\/busybox/);
    const badBase = await d.api('POST', '/v1/images/base', { kind: 'debian', include: ['--evil'] });
    assert.equal(badBase.status, 400);

    fresh = await TestDaemon.start();
    assert.notEqual(fresh.dataDir, d.dataDir);
    const again = await berth(fresh, ['image', 'pull', derived]);
    assert.equal(again.code, 0, again.stderr);
    assert.equal(again.stdout, `${derived}\n${digest}\n`);
    const run3 = await runToExit(fresh, 'derived-fresh', { image: derived });
    assert.equal(run3.w.status.exitCode, 0, run3.logs);
    assert.equal(run3.logs, run2.logs);
    await fresh.deleteAllWorkloads();
    assert.deepEqual(fresh.hostResidue(), []);
  });
});

describe('acceptance 5: periodic GC removes exactly the blobs no tag or existing workload references', { skip }, () => {
  let reg: TestRegistry;
  let d: TestDaemon;
  before(async () => {
    reg = await startRegistry();
    process.env.BERTH_IMAGE_GC_MS = '300';
    try {
      d = await TestDaemon.start();
    } finally {
      delete process.env.BERTH_IMAGE_GC_MS;
    }
  });
  after(async () => {
    await d?.deleteAllWorkloads().catch(() => undefined);
    await d?.destroy();
    await reg?.stop();
  });

  test('tags and a running workload pinned by digest keep their blobs; strays and released images go', { timeout: 120_000 }, async () => {
    const a = await buildAppImage();
    const b = makeImage([a.layers[0]!, gzipLayer(await makeTar([{ name: 'only-b', content: 'b' }]))], { Entrypoint: ['/bin/sleep'], Cmd: ['60'] });
    await push(a, `${reg.host}/gc/a:1`);
    await push(b, `${reg.host}/gc/b:1`);
    for (const ref of [`${reg.host}/gc/a:1`, `${reg.host}/gc/b:1`]) assert.equal((await d.api('POST', '/v1/images/pull', { ref })).status, 200);
    const r = await d.api('POST', W, { name: 'pinned', spec: { image: `${reg.host}/gc/b@${b.manifestDigest}` } });
    assert.equal(r.status, 201, JSON.stringify(r.body));
    await d.waitWorkload('default', 'pinned', (x) => x.status.phase === 'running', 60_000);
    const untag = await d.api('DELETE', `/v1/images?ref=${encodeURIComponent(`${reg.host}/gc/b:1`)}`);
    assert.equal(untag.status, 200, JSON.stringify(untag.body));
    assert.deepEqual(untag.body.removedBlobs, [], 'the running workload keeps b');

    const blobs = join(d.dataDir, 'images', 'store', 'blobs', 'sha256');
    const { writeFileSync } = await import('node:fs');
    const { createHash } = await import('node:crypto');
    const stray = Buffer.from('a blob nothing references');
    writeFileSync(join(blobs, createHash('sha256').update(stray).digest('hex')), stray);
    const names = (img: BuiltImage) => [img.manifestDigest, img.configDigest, ...img.layers.map((l) => l.digest)].map((x) => x.slice(7));
    const expect = async (want: string[], what: string) => {
      const deadline = Date.now() + 30_000;
      for (;;) {
        const have = readdirSync(blobs).sort();
        if (JSON.stringify(have) === JSON.stringify([...new Set(want)].sort())) return;
        if (Date.now() > deadline) assert.deepEqual(have, [...new Set(want)].sort(), what);
        await new Promise((res) => setTimeout(res, 100));
      }
    };
    await expect([...names(a), ...names(b)], 'the stray blob is collected; tagged a and running b stay');
    await d.deleteAllWorkloads();
    await expect(names(a), 'once the workload is gone, b goes except the layer a shares');
    // the unpacked tree of b goes in the same collection, right after the blobs
    const deadline = Date.now() + 30_000;
    while (readdirSync(join(d.dataDir, 'images', 'rootfs')).length > 1 && Date.now() < deadline) await new Promise((res) => setTimeout(res, 100));
    assert.deepEqual(readdirSync(join(d.dataDir, 'images', 'rootfs')), [a.manifestDigest.slice(7)]);
  });
});
