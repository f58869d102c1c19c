// Benchmark: images. In the same run, against a docker-registry on 127.0.0.1:
//   1. pull + unpack of three images made with `berth image base` (busybox; slim Debian bookworm;
//      Debian with postgresql), through Berth (ImageService.pull: registry → verified store, and
//      the layers unpacked as they download, the rootfs used only once every blob is verified;
//      in-process, a fresh data dir per run) vs `skopeo copy docker://… oci:…`
//      followed by `umoci unpack` (a fresh directory per run). Runs interleaved, medians, ratio.
//   2. rootfs preparation of a second workload of each image (resolve + writable layer + overlay
//      mount; no unpack), median.
//   3. a 5-step Dockerfile build on the slim Debian image: cold (empty builder storage) and cached.
// The Debian images take minutes to make (mmdebstrap from the host's mirror); they are kept in
// --cache-dir (default /var/tmp/berth-bench-images; delete it to rebuild).
// Usage: node dist/bench/images.js [--runs 5] [--cache-dir DIR] [--write BENCHMARKS.md]   (as root)
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, loadavg, release } from 'node:os';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import { parseArgs } from 'node:util';
import { spawn } from 'node:child_process';
import { ImageService } from '../src/images/catalog.js';
import { prepareRootfs, skopeo, startRegistry } from '../src/images/testing.js';
import { updateBenchmarks } from './report.js';
import { Interrupted, catchInterrupts } from './interrupt.js';

const { values } = parseArgs({ options: { runs: { type: 'string', default: '5' }, 'cache-dir': { type: 'string', default: '/var/tmp/berth-bench-images' }, write: { type: 'string' } } });
const RUNS = Number(values.runs);
if (!Number.isInteger(RUNS) || RUNS < 1) throw new Error('--runs must be a whole number ≥ 1');
for (const bin of ['/usr/bin/skopeo', '/usr/bin/umoci', '/usr/bin/docker-registry', '/usr/bin/mmdebstrap', '/usr/bin/buildah']) {
  if (!existsSync(bin)) throw new Error(`${bin} is missing: apt-get install skopeo umoci docker-registry mmdebstrap buildah`);
}

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};
const sec = (ms: number) => `${(ms / 1000).toFixed(2)} s`;
const log = (s: string) => console.error(`images bench: ${s}`);

function umociUnpack(layout: string, bundle: string): void {
  const r = spawnSync('umoci', ['unpack', '--image', layout, bundle], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`umoci unpack failed: ${r.stderr}`);
}

const timed = async (fn: () => unknown): Promise<number> => {
  const t0 = performance.now();
  await fn();
  return performance.now() - t0;
};

function tarOf(dir: string) {
  const out = new PassThrough({ highWaterMark: 16 << 20 });
  spawn('tar', ['-C', dir, '-cf', '-', '.'], { stdio: ['ignore', 'pipe', 'inherit'] }).stdout.pipe(out);
  return out;
}

const checkInterrupted = catchInterrupts('images bench');

async function main(): Promise<void> {
  mkdirSync(values['cache-dir']!, { recursive: true, mode: 0o700 });
  const source = new ImageService(values['cache-dir']!);
  const work = mkdtempSync('/var/tmp/berth-bench-images-run-');
  const reg = await startRegistry();
  try {
    const images = [
      { label: 'busybox (busybox-static)', make: () => source.makeBase({ kind: 'busybox', tag: 'localhost/bench/busybox:1', log: () => undefined }) },
      { label: 'Debian bookworm slim (minbase)', make: () => source.makeBase({ kind: 'debian', tag: 'localhost/bench/debian:slim', log: (l) => /^I: (retrieving|extracting|installing)/.test(l) || log(l) }) },
      { label: 'Debian bookworm + postgresql', make: () => source.makeBase({ kind: 'debian', include: ['postgresql'], tag: 'localhost/bench/postgres:15', log: (l) => /^I: (retrieving|extracting|installing)/.test(l) || log(l) }) },
    ];
    const made = [];
    for (const i of images) {
      checkInterrupted();
      log(`making ${i.label} (cached in ${values['cache-dir']})`);
      const img = await i.make();
      const remote = `${reg.host}/${img.ref.replace(/^localhost\//, '')}`;
      await source.tag(img.ref, remote);
      await source.push({ ref: remote });
      made.push({ ...i, remote, size: img.size, digest: img.digest });
    }

    const rows: string[] = [];
    const rootfsRows: string[] = [];
    for (const m of made) {
      const berth: number[] = [];
      const base: number[] = [];
      let lastDir = '';
      for (let r = 0; r < RUNS; r++) {
        checkInterrupted();
        const dir = join(work, `berth-${r}`);
        const svc = new ImageService(dir);
        const bdir = join(work, `skopeo-${r}`);
        mkdirSync(bdir, { recursive: true });
        const runBerth = () => timed(() => svc.pull({ ref: m.remote }));
        const runBase = () =>
          timed(() => {
            skopeo(['copy', '--quiet', '--src-tls-verify=false', `docker://${m.remote}`, `oci:${bdir}/layout:img`]);
            umociUnpack(`${bdir}/layout:img`, `${bdir}/bundle`);
          });
        // Interleaved: even runs Berth first, odd runs the baseline first.
        let tb: number;
        let ts: number;
        if (r % 2 === 0) {
          tb = await runBerth();
          ts = await runBase();
        } else {
          ts = await runBase();
          tb = await runBerth();
        }
        berth.push(tb);
        base.push(ts);
        log(`${m.label} run ${r + 1}/${RUNS}: Berth ${sec(tb)}, skopeo+umoci ${sec(ts)}`);
        rmSync(bdir, { recursive: true, force: true });
        if (r < RUNS - 1) {
          svc.close();
          rmSync(dir, { recursive: true, force: true });
        } else {
          lastDir = dir;
          const prep: number[] = [];
          for (let i = 0; i < 20; i++) prep.push(await prepareRootfs(svc, m.remote, join(work, `prep-${i}`)));
          for (let i = 0; i < 20; i++) rmSync(join(work, `prep-${i}`), { recursive: true, force: true });
          rootfsRows.push(`| ${m.label} | ${median(prep).toFixed(1)} ms | ${Math.max(...prep).toFixed(1)} ms |`);
          svc.close();
          rmSync(lastDir, { recursive: true, force: true });
        }
      }
      const ratio = median(berth) / median(base);
      rows.push(`| ${m.label} | ${(m.size / 2 ** 20).toFixed(1)} MiB | ${sec(median(berth))} | ${sec(median(base))} | **${ratio.toFixed(2)}×** |`);
    }

    // Build: 5 steps on the slim Debian image, cold (fresh data dir: empty builder storage) and cached.
    const ctx = join(work, 'ctx');
    mkdirSync(join(ctx, 'app'), { recursive: true });
    writeFileSync(join(ctx, 'app', 'main.sh'), '#!/bin/sh\necho app\n', { mode: 0o755 });
    writeFileSync(
      join(ctx, 'Dockerfile'),
      `FROM ${made[1]!.remote}\nCOPY app/ /app/\nRUN sha256sum /usr/bin/* > /app/sums\nENV APP_MODE=bench\nRUN echo built > /app/built\nCMD ["/app/main.sh"]\n`,
    );
    const cold: number[] = [];
    const warm: number[] = [];
    for (let r = 0; r < RUNS; r++) {
      checkInterrupted();
      const dir = join(work, `build-${r}`);
      const svc = new ImageService(dir);
      await svc.pull({ ref: made[1]!.remote });
      cold.push(await timed(() => svc.build({ tag: 'localhost/bench/app:1', context: tarOf(ctx), log: () => undefined })));
      warm.push(await timed(() => svc.build({ tag: 'localhost/bench/app:1', context: tarOf(ctx), log: () => undefined })));
      log(`build run ${r + 1}/${RUNS}: cold ${sec(cold.at(-1)!)}, cached ${sec(warm.at(-1)!)}`);
      svc.close();
      rmSync(dir, { recursive: true, force: true });
    }

    const text = [
      `Host: ${cpus().length} × ${cpus()[0]?.model ?? 'cpu'}, Linux ${release()}, load average ${loadavg().map((x) => x.toFixed(1)).join(' ')} at the end (a shared machine: compare the ratios); ${RUNS} runs per row, medians; registry: Debian's docker-registry on 127.0.0.1 (page cache warm for both sides).`,
      '',
      '### Pull + unpack: Berth vs skopeo copy + umoci unpack',
      '',
      'Berth = `ImageService.pull` in-process (what POST /v1/images/pull runs): manifest and blobs verified into a fresh store; each layer is unpacked while it downloads (big layers: the files written by a worker thread while the main thread inflates and hashes), into a temporary tree that becomes the shared rootfs only once every blob is verified. Baseline = `skopeo copy docker://… oci:DIR:img` then `umoci unpack --image DIR:img BUNDLE` (skopeo runs in a private mount namespace so its blob-info cache stays off the host; that costs it ~2 ms). Images made with `berth image base`, one gzip layer each. Ratio = Berth / baseline (target ≤ 1.0×).',
      '',
      '| image | compressed | Berth | skopeo + umoci | ratio |',
      '|---|---|---|---|---|',
      ...rows,
      '',
      '### Rootfs of a second workload of the same image (acceptance 3: ≤ 50 ms, no unpack)',
      '',
      'Resolve the image (the unpacked tree exists: no unpack), make the writable layer, mount the overlay (20 times; `mount`/`umount` are processes spawned by the measurement). Also asserted by `node --test dist/src/images/rootfs.test.js`.',
      '',
      '| image | median | max |',
      '|---|---|---|',
      ...rootfsRows,
      '',
      '### Build of a 5-step Dockerfile (buildah through Berth)',
      '',
      '`FROM` the slim Debian image, then `COPY`, `RUN sha256sum /usr/bin/*`, `ENV`, `RUN`, `CMD`; the base image is already in the store. Cold = fresh data dir (empty builder storage: the base is loaded into buildah first), result exported, imported, unpacked and tagged; cached = the same build again: every step from the layer cache, and the result is the image the tag already names, so nothing is exported or imported.',
      '',
      '| build | median |',
      '|---|---|',
      `| cold | ${sec(median(cold))} |`,
      `| cached | ${sec(median(warm))} |`,
    ].join('\n');
    console.log(text);
    if (values.write) updateBenchmarks(values.write, 'images', 'Images: pull + unpack, second-workload rootfs, builds', `node dist/bench/images.js --runs ${RUNS} --write BENCHMARKS.md`, text);
  } finally {
    source.close();
    await reg.stop();
    rmSync(work, { recursive: true, force: true });
  }
}

await main().catch((e: unknown) => {
  console.error(e);
  process.exit(e instanceof Interrupted ? 130 : 1);
});
