// Dockerfile builds through buildah into Berth's store: the image config (Env, Cmd, Entrypoint,
// User, WorkingDir, ExposedPorts, Labels) and files (COPY --chown ownership, multi-stage COPY
// --from, ADD of a directory, .dockerignore exclusions, build args, no network in RUN) are
// checked on the result, and the layer cache: an unchanged rebuild reuses every step, changing a
// COPY'd file rebuilds exactly the steps from that COPY on. Nothing is written outside the data dir.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { PassThrough } from 'node:stream';
import { existsSync, readFileSync, statSync } from 'node:fs';
import { mkdir, mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { Builder, externalImages } from './build.js';
import { ImageService } from './catalog.js';
import { parseConfig } from './oci.js';
import { mountPointsUnder } from '../lib/host.js';

const skip = process.getuid?.() !== 0 ? 'builds run as root' : !Builder.available() ? 'buildah not installed' : !existsSync('/bin/busybox') ? 'busybox-static not installed' : false;

test('externalImages: FROM images that are not stages or scratch, COPY --from images, ARG substitution', () => {
  const df = 'ARG BASE=busybox\n# comment\nFROM ${BASE} AS build\nRUN true\nFROM scratch\nCOPY --from=build /a /a\nCOPY --from=127.0.0.1:5000/x/y:1 \\\n  /b /b\nFROM build\n';
  assert.deepEqual(externalImages(df, {}), ['busybox', '127.0.0.1:5000/x/y:1']);
  assert.deepEqual(externalImages(df, { BASE: 'localhost/debian:bookworm' }), ['localhost/debian:bookworm', '127.0.0.1:5000/x/y:1']);
  assert.throws(() => externalImages('RUN true\n', {}), /no FROM/);
});

const DOCKERFILE = `ARG BASE=busybox
FROM \${BASE} AS builder
ARG GREETING=hello
RUN mkdir -p /out && echo "$GREETING from builder" > /out/msg && cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' ' > /out/netdevs
FROM busybox
ENV APP_MODE=prod PATH=/usr/local/bin:/usr/bin:/bin
WORKDIR /app
RUN echo prepared > /app/prepared
COPY --chown=1000:1000 app.sh /app/app.sh
RUN echo "after copy" > /app/after
COPY --from=builder /out/ /app/out/
ADD data/ /app/data/
LABEL org.example.team=berth
EXPOSE 8080/tcp 9090
USER 1000:1000
ENTRYPOINT ["/app/app.sh"]
CMD ["serve"]
`;

/** The context as a tar stream (read at once: a child's unread output is dropped when it exits). */
function tarOf(dir: string) {
  const out = new PassThrough({ highWaterMark: 64 << 20 });
  spawn('tar', ['-C', dir, '-cf', '-', '.'], { stdio: ['ignore', 'pipe', 'inherit'] }).stdout.pipe(out);
  return out;
}

/** STEP lines of a buildah log with whether each used the cache. */
function steps(log: string[]): { step: string; cached: boolean }[] {
  const out: { step: string; cached: boolean }[] = [];
  for (const l of log) {
    const m = /^(?:\[\d+\/\d+\] )?STEP \d+\/\d+: (.*)$/.exec(l);
    if (m) out.push({ step: m[1]!, cached: false });
    else if (/^--> Using cache/.test(l) && out.length) out[out.length - 1]!.cached = true;
  }
  return out;
}

test('build: config, files, multi-stage, .dockerignore, no network, and the layer cache', { skip, timeout: 600_000 }, async () => {
  const dir = await mkdtemp(path.join(tmpdir(), 'berth-build-'));
  const s = new ImageService(path.join(dir, 'images'));
  try {
    const ctx = path.join(dir, 'ctx');
    await mkdir(path.join(ctx, 'data'), { recursive: true });
    await writeFile(path.join(ctx, 'Dockerfile'), DOCKERFILE);
    await writeFile(path.join(ctx, 'app.sh'), '#!/bin/sh\necho "app $APP_MODE $1"\n', { mode: 0o755 });
    await writeFile(path.join(ctx, 'data', 'keep.txt'), 'kept\n');
    await writeFile(path.join(ctx, 'data', 'secret.env'), 'TOKEN=x\n');
    await writeFile(path.join(ctx, 'debug.log'), 'noise\n');
    await writeFile(path.join(ctx, '.dockerignore'), 'data/secret.env\n*.log\n');

    const build = async () => {
      const log: string[] = [];
      const img = await s.build({ tag: 'localhost/app:1', context: tarOf(ctx), buildArgs: { GREETING: 'hi' }, log: (l) => log.push(l) });
      return { img, log, steps: steps(log) };
    };
    const first = await build();
    assert.equal(first.img.ref, 'localhost/app:1');
    assert.deepEqual(first.img.config.entrypoint, ['/app/app.sh']);
    assert.deepEqual(first.img.config.cmd, ['serve']);
    assert.equal(first.img.config.user, '1000:1000');
    assert.equal(first.img.config.workingDir, '/app');
    assert.equal(first.img.config.env.APP_MODE, 'prod');
    assert.equal(first.img.config.env.PATH, '/usr/local/bin:/usr/bin:/bin');
    assert.equal(first.img.labels['org.example.team'], 'berth');
    const manifest = JSON.parse((await s.store.readBlob(first.img.digest)).toString());
    const cfg = parseConfig(await s.store.readBlob(manifest.config.digest), 'config');
    assert.deepEqual(Object.keys(cfg.config?.ExposedPorts ?? {}).sort(), ['8080/tcp', '9090/tcp']);
    const baseManifest = JSON.parse((await s.store.readBlob(s.store.getTag('docker.io/library/busybox:latest')!.digest)).toString());
    assert.deepEqual(manifest.layers[0], baseManifest.layers[0], 'the base layer is shared with the base image, not compressed again');

    const root = s.rootfs.pathFor(first.img.digest);
    const st = statSync(path.join(root, 'app/app.sh'));
    assert.deepEqual([st.uid, st.gid], [1000, 1000], 'COPY --chown');
    assert.equal(st.mode & 0o111, 0o111);
    assert.equal(readFileSync(path.join(root, 'app/out/msg'), 'utf8'), 'hi from builder\n', 'multi-stage COPY --from with a build arg');
    assert.equal(readFileSync(path.join(root, 'app/out/netdevs'), 'utf8').trim(), 'lo', 'RUN has no network but loopback');
    assert.equal(readFileSync(path.join(root, 'app/data/keep.txt'), 'utf8'), 'kept\n');
    assert.equal(existsSync(path.join(root, 'app/data/secret.env')), false, '.dockerignore');
    assert.equal(existsSync(path.join(root, 'app/debug.log')), false, '.dockerignore');
    assert.equal(statSync(path.join(root, 'app/prepared')).uid, 0);
    assert.ok(first.steps.length >= 15, first.log.join('\n'));

    const second = await build();
    assert.equal(second.img.digest, first.img.digest, 'an unchanged rebuild gives the same image');
    const notCached = second.steps.filter((x) => !x.cached && !/^FROM /.test(x.step));
    assert.deepEqual(notCached, [], 'every step came from the cache');

    await writeFile(path.join(ctx, 'app.sh'), '#!/bin/sh\necho "app v2 $APP_MODE $1"\n', { mode: 0o755 });
    const third = await build();
    assert.notEqual(third.img.digest, first.img.digest);
    const stage2 = third.steps.slice(third.steps.findIndex((x, i) => i > 0 && /^FROM busybox/.test(x.step)));
    const copyAt = stage2.findIndex((x) => /^COPY --chown=1000:1000 app\.sh/.test(x.step));
    assert.ok(copyAt > 0, third.log.join('\n'));
    assert.deepEqual(
      stage2.slice(1).map((x) => x.cached),
      stage2.slice(1).map((_x, i) => i + 1 < copyAt),
      `steps before the changed COPY are cached, it and every later one rebuilt: ${JSON.stringify(stage2)}`,
    );
    assert.ok(third.steps.slice(0, 3).slice(1).every((x) => x.cached), 'the first stage is untouched');
    assert.equal(readFileSync(path.join(s.rootfs.pathFor(third.img.digest), 'app/app.sh'), 'utf8'), '#!/bin/sh\necho "app v2 $APP_MODE $1"\n');

    // bad input
    await writeFile(path.join(ctx, 'Dockerfile.bad'), 'FROM busybox\nRUN exit 3\n');
    await assert.rejects(s.build({ tag: 'localhost/bad:1', context: tarOf(ctx), dockerfile: 'Dockerfile.bad', log: () => undefined }), /the build failed \(exit \d+\)/);
    await assert.rejects(s.build({ tag: 'localhost/bad:1', context: tarOf(ctx), dockerfile: 'Nope', log: () => undefined }), /no Dockerfile at "Nope"/);
    assert.equal(s.store.getTag('localhost/bad:1'), undefined);
    assert.deepEqual(mountPointsUnder(dir), [], 'no mounts left behind');
    assert.deepEqual((await readdir(path.join(dir, 'images', 'build'))).filter((n) => n.startsWith('.tmp-')), [], 'work directories removed');
  } finally {
    s.close();
    await rm(dir, { recursive: true, force: true });
  }
});
