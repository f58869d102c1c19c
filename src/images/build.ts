// Dockerfile builds with buildah (Debian's buildah 1.28, `buildah bud --layers`): Docker's
// semantics for FROM/RUN/COPY/ADD/ENV/ARG/WORKDIR/USER/EXPOSE/LABEL/CMD/ENTRYPOINT, multi-stage
// builds, .dockerignore and a layer cache in which a changed input invalidates exactly the steps
// after it come from a well-kept builder instead of Berth's own code.
//
// Buildah is kept inside Berth's data dir (<imagesDir>/buildah): its storage (overlay graph root),
// containers.conf (runtime runc, cgroupfs, no events log), registries.conf (no search registry:
// nothing is pulled by buildah, --pull=never), a signature policy and an empty auth file, all
// passed through the environment. Every buildah command runs in a private mount namespace
// (unshare -m) in which a tmpfs is its run root and /var/lib/containers, /run/containers and
// /etc/cni are bind-mounted from the data dir, so buildah writes nothing outside the data dir
// (those three exist on the host only as empty mount points, which Berth creates when missing),
// and every overlay mount of a build vanishes with its namespace, also when berthd crashes.
//
// Base images come from Berth's store (pulled through Berth first when missing, with the stored
// credentials): they are handed to buildah as an OCI layout whose blobs are hard links to the
// store's, and tagged in buildah's storage with the name the Dockerfile uses. The result is pushed
// to that same layout (so base layers keep their digests: they are found there, not compressed
// again) and imported into Berth's store from it (ImageService.build).
import { spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import zlib from 'node:zlib';
import { createReadStream, createWriteStream, existsSync, mkdirSync, promises as fsp, writeFileSync } from 'node:fs';
import path from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import tar from 'tar-stream';
import { BerthError, failedPrecondition, invalidArgument } from '../core/errors.js';
import { pidAlive } from '../lib/exec.js';
import { MT, layerCompression, parseConfig, parseManifest, type Descriptor, type Manifest } from './oci.js';
import { formatRef, parseRef } from './ref.js';
import type { ImageStore } from './store.js';

export interface BuildRequest {
  /** The build context as a tar stream (the client's directory; buildah applies .dockerignore). */
  context: Readable;
  /** Path of the Dockerfile inside the context; default "Dockerfile". */
  dockerfile?: string;
  buildArgs?: Record<string, string>;
  /** RUN steps get the host's network (default: none). */
  network?: boolean;
  log: (line: string) => void;
  signal?: AbortSignal;
}

/** What the builder needs from the image service: base images in the store, by reference. */
export interface BaseResolver {
  /** The manifest digest of a reference in the store (pulling it first when missing). */
  ensure(ref: string, log: (line: string) => void): Promise<string>;
  store: ImageStore;
}

const MAX_CONTEXT_ENTRIES = 200_000;
const SHADOWED = ['/var/lib/containers', '/run/containers', '/etc/cni'];

/** FROM images of a Dockerfile that are neither `scratch` nor an earlier stage, and COPY --from images. */
export function externalImages(dockerfile: string, args: Record<string, string>): string[] {
  // Join continuation lines; drop comments.
  const lines = dockerfile
    .replace(/\\\r?\n/g, ' ')
    .split(/\r?\n/)
    .map((l) => l.trim())
    .filter((l) => l && !l.startsWith('#'));
  const vars: Record<string, string> = {};
  const expand = (s: string) => s.replace(/\$\{(\w+)(?::?-([^}]*))?\}|\$(\w+)/g, (_m, a: string, def: string | undefined, b: string) => args[a ?? b] ?? vars[a ?? b] ?? def ?? '');
  const stages = new Set<string>();
  const out: string[] = [];
  let seenFrom = false;
  for (const l of lines) {
    const [instr, ...rest] = l.split(/\s+/);
    const kw = instr!.toUpperCase();
    if (kw === 'ARG' && !seenFrom) {
      for (const a of rest) {
        const i = a.indexOf('=');
        if (i > 0) vars[a.slice(0, i)] = a.slice(i + 1).replace(/^"(.*)"$/, '$1');
      }
    } else if (kw === 'FROM') {
      seenFrom = true;
      const words = rest.filter((w) => !w.startsWith('--'));
      const image = expand(words[0] ?? '');
      if (words[1]?.toLowerCase() === 'as' && words[2]) stages.add(words[2].toLowerCase());
      if (!image) throw invalidArgument(`the Dockerfile has a FROM without an image ("${l.slice(0, 100)}")`);
      if (image !== 'scratch' && !stages.has(image.toLowerCase()) && !out.includes(image)) out.push(image);
    } else if (kw === 'COPY' || kw === 'ADD') {
      for (const w of rest) {
        const m = /^--from=(.+)$/.exec(w);
        if (!m) continue;
        const from = expand(m[1]!);
        if (!stages.has(from.toLowerCase()) && !/^\d+$/.test(from) && !out.includes(from)) out.push(from);
      }
    }
  }
  if (!seenFrom) throw invalidArgument('the Dockerfile has no FROM instruction');
  return out;
}

export class Builder {
  readonly root: string;
  private readonly work: string;
  private queue: Promise<unknown> = Promise.resolve();

  constructor(
    imagesDir: string,
    private readonly bases: BaseResolver,
  ) {
    this.root = path.join(imagesDir, 'buildah');
    this.work = path.join(imagesDir, 'build');
  }

  static available(): boolean {
    return existsSync('/usr/bin/buildah') && existsSync('/usr/bin/unshare');
  }

  private setup(): NodeJS.ProcessEnv {
    const r = this.root;
    for (const d of ['storage', 'run', 'tmp', 'cni', 'shadow/var-lib-containers', 'shadow/run-containers/layout', 'shadow/etc-cni', 'layout/blobs/sha256']) mkdirSync(path.join(r, d), { recursive: true, mode: 0o700 });
    for (const d of SHADOWED) if (!existsSync(d)) mkdirSync(d, { recursive: true, mode: 0o700 });
    const files: Record<string, string> = {
      'storage.conf': `[storage]\ndriver = "overlay"\ngraphroot = "${r}/storage"\nrunroot = "${r}/run"\n`,
      'containers.conf': `[containers]\nnetns = "none"\n\n[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "none"\ntmp_dir = "${r}/tmp"\n\n[engine.runtimes]\nrunc = ["/usr/sbin/runc"]\n\n[network]\nnetwork_config_dir = "${r}/cni"\n`,
      'registries.conf': 'unqualified-search-registries = ["docker.io"]\nshort-name-mode = "permissive"\n',
      'policy.json': '{"default":[{"type":"insecureAcceptAnything"}]}\n',
      'auth.json': '{"auths":{}}\n',
    };
    for (const [n, c] of Object.entries(files)) {
      const p = path.join(r, n);
      writeFileSync(p, c, { mode: 0o600 });
    }
    return {
      PATH: process.env.PATH ?? '/usr/sbin:/usr/bin:/sbin:/bin',
      HOME: path.join(r, 'tmp'),
      LC_ALL: 'C.UTF-8',
      CONTAINERS_CONF: path.join(r, 'containers.conf'),
      CONTAINERS_STORAGE_CONF: path.join(r, 'storage.conf'),
      CONTAINERS_REGISTRIES_CONF: path.join(r, 'registries.conf'),
      REGISTRY_AUTH_FILE: path.join(r, 'auth.json'),
      BUILDAH_RUNTIME: '/usr/sbin/runc',
      BUILDAH_ISOLATION: 'oci',
      TMPDIR: path.join(r, 'tmp'),
      XDG_RUNTIME_DIR: path.join(r, 'run'),
    };
  }

  /**
   * Run buildah with `args` in a private mount namespace (see the header). Lines of its output go
   * to `log` (when given); resolves with stdout, rejects with the last lines of output.
   */
  private buildah(env: NodeJS.ProcessEnv, args: string[], opts: { log?: (l: string) => void; signal?: AbortSignal; what: string; code?: string } = { what: 'buildah' }): Promise<string> {
    const r = this.root;
    const script = [
      'set -e',
      `mount -t tmpfs -o mode=0700 tmpfs "${r}/run"`,
      `mount --bind "${r}/shadow/var-lib-containers" /var/lib/containers`,
      `mount --bind "${r}/shadow/run-containers" /run/containers`,
      `mount --bind "${r}/shadow/etc-cni" /etc/cni`,
      // The base-image layout at a fixed lowercase path (buildah names an oci: image after its path).
      `mount --bind "${r}/layout" /run/containers/layout`,
      'exec buildah "$@"',
    ].join('\n');
    return new Promise((resolve, reject) => {
      const child = spawn('unshare', ['-m', '--propagation', 'private', 'sh', '-c', script, 'sh', ...args], { env, stdio: ['ignore', 'pipe', 'pipe'] });
      let stdout = '';
      let tail = '';
      let partial = '';
      const onData = (s: string) => {
        tail = (tail + s).slice(-6000);
        if (!opts.log) return;
        partial += s;
        const parts = partial.split('\n');
        partial = parts.pop()!;
        for (const l of parts) if (l.trim()) opts.log(l);
      };
      child.stdout.setEncoding('utf8').on('data', (s: string) => {
        stdout += s;
        onData(s);
      });
      child.stderr.setEncoding('utf8').on('data', onData);
      const abort = () => child.kill('SIGTERM');
      opts.signal?.addEventListener('abort', abort, { once: true });
      child.on('error', reject);
      child.on('close', (code) => {
        opts.signal?.removeEventListener('abort', abort);
        if (partial.trim() && opts.log) opts.log(partial);
        if (code === 0) return resolve(stdout);
        const last = tail.trim().split('\n').slice(-6).join(' | ');
        reject(new BerthError(opts.code === 'failed_precondition' ? 'failed_precondition' : 'invalid_argument', `${opts.what} failed (exit ${code}): ${last}`));
      });
    });
  }

  /** Remove work directories of builds whose berthd is gone. */
  private async cleanStale(): Promise<void> {
    let names: string[];
    try {
      names = await fsp.readdir(this.work);
    } catch {
      return;
    }
    for (const n of names) {
      const m = /^\.tmp-(\d+)-/.exec(n);
      if (m && Number(m[1]) !== process.pid && !pidAlive(Number(m[1]))) await fsp.rm(path.join(this.work, n), { recursive: true, force: true });
    }
  }

  /** Receive the context tar into `dir`, refusing entries that could write elsewhere. */
  private async receiveContext(input: Readable, dir: string): Promise<void> {
    const tarFile = `${dir}.tar`;
    await pipeline(input, createWriteStream(tarFile, { mode: 0o600 }));
    const extract = tar.extract();
    const scan = pipeline(createReadStream(tarFile), extract as unknown as NodeJS.WritableStream);
    let n = 0;
    try {
      for await (const e of extract) {
        const h = e.header;
        const bad = (why: string) => invalidArgument(`the build context is refused: entry "${h.name.slice(0, 200)}" ${why}`);
        if (++n > MAX_CONTEXT_ENTRIES) throw bad(`is past the ${MAX_CONTEXT_ENTRIES}-entry limit`);
        if (h.name.startsWith('/') || h.name.split('/').includes('..') || h.name.includes('\0')) throw bad('has an absolute path or ".."');
        if (!['file', 'contiguous-file', 'directory', 'symlink', 'link'].includes(h.type ?? '')) throw bad(`is a ${h.type}; a build context holds files, directories and links`);
        if (h.type === 'link' && (h.linkname ?? '').split('/').includes('..')) throw bad('is a hard link out of the context');
        e.resume();
      }
      await scan;
    } catch (e) {
      extract.destroy();
      await scan.catch(() => undefined);
      if (e instanceof BerthError) throw e;
      throw invalidArgument(`the build context is not a valid tar archive (${(e as Error).message})`);
    }
    await fsp.mkdir(dir, { mode: 0o755 });
    // GNU tar: never extracts through symlinks it created (it delays them), no owners from the archive.
    await new Promise<void>((resolve, reject) => {
      const t = spawn('tar', ['-x', '--no-same-owner', '-C', dir, '-f', tarFile], { stdio: ['ignore', 'ignore', 'pipe'] });
      let err = '';
      t.stderr.setEncoding('utf8').on('data', (s: string) => (err += s));
      t.on('error', reject);
      t.on('close', (code) => (code === 0 ? resolve() : reject(invalidArgument(`the build context could not be unpacked: ${err.trim().slice(0, 300)}`))));
    });
    await fsp.rm(tarFile, { force: true });
  }

  /**
   * An image of Berth's store made visible in buildah's storage under `name`. Its blobs are always
   * linked into the shared layout (the export of the result finds the base layers there and keeps
   * their digests instead of compressing them again); buildah loads it only when it lacks it.
   */
  private async provide(env: NodeJS.ProcessEnv, name: string, digest: string, log: (l: string) => void): Promise<void> {
    const store = this.bases.store;
    const refs = await store.references(digest);
    const layout = path.join(this.root, 'layout');
    for (const d of [digest, ...refs]) {
      const dest = path.join(layout, 'blobs', 'sha256', d.slice(7));
      if (existsSync(dest)) continue;
      try {
        await fsp.link(store.blobPath(d), dest);
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'EXDEV') throw e;
        await fsp.copyFile(store.blobPath(d), dest);
      }
    }
    const manifest = JSON.parse((await store.readBlob(digest)).toString('utf8')) as { config: { digest: string } };
    const configHex = manifest.config.digest.slice(7);
    const current = await this.buildah(env, ['inspect', '--type', 'image', '--format', '{{.FromImageID}}', name], { what: 'buildah inspect' }).catch(() => '');
    if (current.trim() === configHex) return;
    const size = (await fsp.stat(store.blobPath(digest))).size;
    await fsp.writeFile(path.join(layout, 'index.json'), JSON.stringify({ schemaVersion: 2, manifests: [{ mediaType: MT.ociManifest, digest, size, annotations: { 'org.opencontainers.image.ref.name': 'base' } }] }));
    log(`providing ${name} (${digest}) to the builder`);
    await this.buildah(env, ['pull', '--quiet', '--signature-policy', path.join(this.root, 'policy.json'), 'oci:/run/containers/layout:base'], { what: `loading ${name} into the builder`, code: 'failed_precondition' });
    await this.buildah(env, ['tag', configHex, name], { what: `naming ${name} in the builder`, code: 'failed_precondition' });
  }

  /**
   * The image tagged `tag` in the shared layout, as an OCI archive stream
   * of just that image. A layer whose content is a base image's layer (same diff_id) keeps the
   * base's compressed blob, so images share layers with their bases in the store and registries
   * mount them (buildah would compress them again, to other bytes); uncompressed layers are
   * gzipped here. The config is buildah's, unchanged (diff_ids do not depend on compression).
   */
  private async layoutImage(tag: string, reuse: Map<string, Descriptor>): Promise<Readable> {
    const layout = path.join(this.root, 'layout');
    const index = JSON.parse(await fsp.readFile(path.join(layout, 'index.json'), 'utf8')) as { manifests: { digest: string; annotations?: Record<string, string> }[] };
    const entry = index.manifests.find((m) => m.annotations?.['org.opencontainers.image.ref.name'] === tag);
    if (!entry) throw failedPrecondition(`the builder's export has no image "${tag}"`);
    const blob = (d: string) => path.join(layout, 'blobs', 'sha256', d.slice(7));
    const manifest = JSON.parse(await fsp.readFile(blob(entry.digest), 'utf8')) as Manifest & { mediaType?: string };
    const layers: Descriptor[] = [];
    const diffIds = parseConfig(await fsp.readFile(blob(manifest.config.digest)), 'config of the built image').rootfs.diff_ids;
    for (const [i, l] of manifest.layers.entries()) {
      const base = reuse.get(diffIds[i] ?? '');
      if (base) {
        layers.push(base);
        continue;
      }
      if (l.mediaType !== MT.ociLayer) {
        layers.push(l);
        continue;
      }
      const tmp = path.join(layout, `gzip-${l.digest.slice(7, 19)}`);
      const hash = createHash('sha256');
      let size = 0;
      await pipeline(createReadStream(blob(l.digest)), zlib.createGzip({ level: 6 }), async function* (src: AsyncIterable<Buffer>) {
        for await (const c of src) {
          hash.update(c);
          size += c.length;
          yield c;
        }
      }, createWriteStream(tmp));
      const digest = `sha256:${hash.digest('hex')}`;
      await fsp.rename(tmp, blob(digest));
      layers.push({ mediaType: MT.ociLayerGzip, digest, size });
    }
    const out = Buffer.from(JSON.stringify({ ...manifest, mediaType: MT.ociManifest, layers }));
    const outDigest = `sha256:${createHash('sha256').update(out).digest('hex')}`;
    const pack = tar.pack();
    const add = (name: string, body: Buffer) => new Promise<void>((res, rej) => pack.entry({ name, size: body.length }, body, (e) => (e ? rej(e) : res())));
    (async () => {
      await add('oci-layout', Buffer.from('{"imageLayoutVersion":"1.0.0"}'));
      for (const d of [...layers.map((l) => l.digest), manifest.config.digest]) {
        const p = existsSync(blob(d)) ? blob(d) : this.bases.store.blobPath(d);
        await pipeline(createReadStream(p), pack.entry({ name: `blobs/sha256/${d.slice(7)}`, size: (await fsp.stat(p)).size }));
      }
      await add(`blobs/sha256/${outDigest.slice(7)}`, out);
      await add('index.json', Buffer.from(JSON.stringify({ schemaVersion: 2, manifests: [{ mediaType: MT.ociManifest, digest: outDigest, size: out.length }] })));
      pack.finalize();
    })().catch((e: unknown) => pack.destroy(e as Error));
    return Readable.from(pack as unknown as AsyncIterable<Buffer>);
  }

  /** Layers of the base images by diff_id (what a build's layers are matched against). */
  private async baseLayers(digests: string[]): Promise<Map<string, Descriptor>> {
    const out = new Map<string, Descriptor>();
    for (const d of digests) {
      const m = parseManifest(await this.bases.store.readBlob(d), undefined, `manifest ${d}`);
      if (m.kind !== 'manifest') continue;
      const cfg = parseConfig(await this.bases.store.readBlob(m.doc.config.digest), `config of ${d}`);
      m.doc.layers.forEach((l, i) => {
        const diff = cfg.rootfs.diff_ids[i];
        if (diff && layerCompression(l.mediaType) && !out.has(diff)) out.set(diff, { mediaType: l.mediaType, digest: l.digest, size: l.size });
      });
    }
    return out;
  }

  /**
   * Build, then hand the result (an OCI archive stream) to `take` (which imports it); builds run
   * one at a time (they share the layout the results are exported to).
   */
  build<T>(req: BuildRequest, cacheTag: string, take: (archive: Readable) => Promise<T>, reuse: (configDigest: string) => Promise<T | undefined> = async () => undefined): Promise<T> {
    const p = this.queue.then(() => this.buildNow(req, cacheTag, take, reuse));
    this.queue = p.catch(() => undefined);
    return p;
  }

  private async buildNow<T>(req: BuildRequest, cacheTag: string, take: (archive: Readable) => Promise<T>, reuse: (configDigest: string) => Promise<T | undefined>): Promise<T> {
    if (!Builder.available()) throw failedPrecondition('builds need buildah and unshare; `apt-get install buildah`');
    const env = this.setup();
    await fsp.mkdir(this.work, { recursive: true, mode: 0o700 });
    await this.cleanStale();
    const work = path.join(this.work, `.tmp-${process.pid}-${randomBytes(6).toString('hex')}`);
    await fsp.mkdir(work, { mode: 0o700 });
    const layoutDir = path.join(this.root, 'layout');
    // The layout only ever holds links to the store's blobs and this build's export.
    const resetLayout = async () => {
      await fsp.rm(layoutDir, { recursive: true, force: true });
      await fsp.mkdir(path.join(layoutDir, 'blobs', 'sha256'), { recursive: true, mode: 0o700 });
      await fsp.writeFile(path.join(layoutDir, 'oci-layout'), '{"imageLayoutVersion":"1.0.0"}');
    };
    await resetLayout();
    // Working containers a killed build left in the builder's storage (builds run one at a time).
    await this.buildah(env, ['rm', '--all'], { what: 'buildah rm' }).catch(() => undefined);
    try {
      const ctx = path.join(work, 'context');
      await this.receiveContext(req.context, ctx);
      const dfRel = req.dockerfile ?? 'Dockerfile';
      if (dfRel.startsWith('/') || dfRel.split('/').includes('..')) throw invalidArgument(`dockerfile "${dfRel.slice(0, 200)}" must be a path inside the build context`);
      const dfPath = path.join(ctx, dfRel);
      let text: string;
      try {
        const st = await fsp.lstat(dfPath);
        if (!st.isFile()) throw new Error('not a file');
        text = await fsp.readFile(dfPath, 'utf8');
      } catch {
        throw invalidArgument(`the build context has no Dockerfile at "${dfRel.slice(0, 200)}"; give its path inside the context with -f`);
      }
      const args = req.buildArgs ?? {};
      const baseDigests: string[] = [];
      for (const image of externalImages(text, args)) {
        let canonical: string;
        try {
          canonical = formatRef(parseRef(image));
        } catch (e) {
          throw invalidArgument(`the Dockerfile names the image "${image.slice(0, 200)}", which is not a valid reference (${(e as Error).message})`);
        }
        const digest = await this.bases.ensure(image, req.log);
        baseDigests.push(digest);
        await this.provide(env, canonical, digest, req.log);
      }
      const bud = [
        'bud',
        '--layers',
        '--pull=never',
        `--network=${req.network ? 'host' : 'none'}`,
        '--signature-policy',
        path.join(this.root, 'policy.json'),
        '-f',
        dfPath,
        '-t',
        cacheTag,
        '--iidfile',
        path.join(work, 'iid'),
        ...Object.entries(args).flatMap(([k, v]) => ['--build-arg', `${k}=${v}`]),
        ctx,
      ];
      await this.buildah(env, bud, { log: req.log, ...(req.signal ? { signal: req.signal } : {}), what: 'the build' });
      const iid = (await fsp.readFile(path.join(work, 'iid'), 'utf8')).trim().replace(/^sha256:/, '');
      // The image ID is the config's digest: when the store already has this very image under
      // the tag (a fully cached rebuild), there is nothing to export or import.
      const same = await reuse(`sha256:${iid}`);
      if (same !== undefined) {
        req.log('the result is the image the tag already names (every step came from the cache)');
        return same;
      }
      await this.buildah(env, ['push', '--quiet', '--signature-policy', path.join(this.root, 'policy.json'), iid, 'oci:/run/containers/layout:result'], { what: 'exporting the built image', code: 'failed_precondition' });
      return await take(await this.layoutImage('result', await this.baseLayers(baseDigests)));
    } finally {
      await fsp.rm(work, { recursive: true, force: true });
      await resetLayout();
    }
  }
}
