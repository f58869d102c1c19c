// The images available to workloads: the built-in "busybox" (made from Debian's busybox-static,
// no registry needed) and every image pulled into the OCI store (src/images/store.ts), resolved by
// tag or digest to a shared read-only rootfs (src/images/unpack.ts) and its process config.
import { createHash } from 'node:crypto';
import { lstatSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { BerthError, failedPrecondition, invalidArgument, notFound } from '../core/errors.js';
import { ensureBusyboxImage } from './busybox.js';
import { hostPlatform, parseManifest, type ImageConfigDoc } from './oci.js';
import { familiarRef, formatRef, parseRef, repoName, tagRef, type ImageRef } from './ref.js';
import { RegistryClient, type LayerProgress, type RegistryClientOptions, type RegistryCredentials } from './registry.js';
import { ImageStore } from './store.js';
import { readArchive, writeArchive, type ArchiveFormat } from './archive.js';
import type { Readable } from 'node:stream';
import { CredentialStore } from './credentials.js';
import { BaseImages } from './base.js';
import { Builder, type BuildRequest } from './build.js';
import type { PushResult } from './registry.js';
import { LayerFeed, RootfsCache } from './unpack.js';

export interface ImageConfig {
  env: Record<string, string>;
  entrypoint: string[];
  cmd: string[];
  workingDir: string;
  user: string;
}

export interface ResolvedImage {
  ref: string;
  digest: string;
  rootfs: string;
  config: ImageConfig;
}

export interface ImageCatalog {
  resolve(ref: string): Promise<ResolvedImage>;
  list(): Promise<ResolvedImage[]>;
}

const BUILTIN_REFS = new Set(['busybox', 'busybox:latest']);

export class BuiltinImages implements ImageCatalog {
  private busybox: Promise<ResolvedImage> | undefined;
  constructor(private readonly dir: string) {}

  private getBusybox(): Promise<ResolvedImage> {
    this.busybox ??= ensureBusyboxImage(this.dir).then((img) => ({
      ref: 'busybox:latest',
      digest: img.digest,
      rootfs: img.rootfs,
      config: {
        env: { PATH: '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' },
        entrypoint: [],
        cmd: ['sh'],
        workingDir: '/',
        user: '0:0',
      },
    }));
    this.busybox.catch(() => (this.busybox = undefined));
    return this.busybox;
  }

  async resolve(ref: string): Promise<ResolvedImage> {
    if (BUILTIN_REFS.has(ref)) return this.getBusybox();
    throw invalidArgument(`image "${ref}" is not available on this host; available images: busybox`);
  }

  async list(): Promise<ResolvedImage[]> {
    return [await this.getBusybox()];
  }
}

export interface ImageSummary {
  /** Canonical reference ("registry/repository:tag"); "busybox:latest" for the built-in image. */
  ref: string;
  digest: string;
  /** Bytes of the config and layers (compressed, as stored); 0 for the built-in image. */
  size: number;
  layers: number;
  builtin: boolean;
  created?: string;
}

export interface ImageDetail extends ImageSummary {
  mediaType: string;
  os?: string;
  architecture?: string;
  config: ImageConfig;
  layerDescriptors: { digest: string; size: number; mediaType: string }[];
  /** True when the rootfs is unpacked (a workload can start without unpacking). */
  unpacked: boolean;
  labels: Record<string, string>;
}

export interface PullRequest {
  ref: string;
  /** Used for this pull only: never stored, never logged. */
  credentials?: RegistryCredentials;
  onProgress?: (p: LayerProgress) => void;
  signal?: AbortSignal;
}

export interface RemoveResult {
  ref: string;
  digest: string;
  removedBlobs: string[];
  freedBytes: number;
}

/** The process config of an OCI image config document, with the OCI defaults filled in. */
export function processConfig(doc: ImageConfigDoc): ImageConfig {
  const c = doc.config ?? {};
  const env: Record<string, string> = {};
  for (const kv of c.Env ?? []) {
    const i = kv.indexOf('=');
    if (i > 0) env[kv.slice(0, i)] = kv.slice(i + 1);
  }
  return {
    env,
    entrypoint: c.Entrypoint ?? [],
    cmd: c.Cmd ?? [],
    workingDir: c.WorkingDir || '/',
    user: c.User || '0:0',
  };
}

/**
 * Built-in busybox plus the OCI store: what berthd serves to the API and the reconcilers.
 * `inUse()` names the image references still needed by workloads (they keep their blobs alive
 * through garbage collection and stop their tag from being removed).
 */
export class ImageService implements ImageCatalog {
  readonly store: ImageStore;
  readonly rootfs: RootfsCache;
  private readonly builtin: BuiltinImages;
  private readonly registryOpts: RegistryClientOptions;
  readonly credentials: CredentialStore;
  readonly base: BaseImages;
  readonly builder: Builder;

  constructor(
    readonly dir: string,
    opts: { registry?: RegistryClientOptions } = {},
  ) {
    this.builtin = new BuiltinImages(dir);
    this.store = new ImageStore(join(dir, 'store'));
    this.rootfs = new RootfsCache(join(dir, 'rootfs'), this.store);
    this.credentials = new CredentialStore(join(dir, 'credentials.json'));
    this.base = new BaseImages(dir, this.store);
    this.builder = new Builder(dir, { store: this.store, ensure: (ref, log) => this.ensureLocal(ref, log) });
    const given = opts.registry?.credentials;
    // Credentials given by the caller win; then those stored with `berth login`.
    this.registryOpts = { ...(opts.registry ?? {}), credentials: (r) => given?.(r) ?? this.credentials.get(r) };
  }

  /** A registry client; `creds` (for one request only) apply to `registry`. */
  private client(registry: string, creds?: RegistryCredentials): RegistryClient {
    const base = this.registryOpts.credentials!;
    return new RegistryClient({ ...this.registryOpts, credentials: (r) => (creds && r === registry ? creds : base(r)) });
  }

  /** Check credentials against the registry, then store them for its pulls and pushes. */
  async login(registry: string, creds: RegistryCredentials): Promise<void> {
    try {
      await new RegistryClient({ ...this.registryOpts, credentials: (r) => (r === registry ? creds : undefined) }).checkLogin(registry);
    } catch (e) {
      if (e instanceof BerthError && (e.code === 'unauthenticated' || e.code === 'permission_denied')) throw failedPrecondition(e.message);
      throw e;
    }
    this.credentials.set(registry, creds);
  }

  /**
   * Make a base image on this host (`berth image base`): Debian with mmdebstrap from the host's
   * mirror, or busybox; unpacked, then tagged `tag` (default localhost/debian:<suite>[-<hash>]
   * or localhost/busybox:latest).
   */
  async makeBase(req: { kind: 'debian' | 'busybox'; suite?: string; include?: string[]; tag?: string; log: (line: string) => void; signal?: AbortSignal }): Promise<ImageDetail & { cached: boolean }> {
    const suite = req.suite ?? 'bookworm';
    const include = [...new Set(req.include ?? [])].sort();
    let tag = req.tag !== undefined ? tagRef(parseRef(req.tag)) : undefined;
    if (req.tag !== undefined && !tag) throw invalidArgument(`tag "${req.tag}" pins a digest; give a name with a tag, e.g. "localhost/debian:slim"`);
    if (req.kind === 'busybox' && (req.suite !== undefined || include.length)) throw invalidArgument('suite and include apply to kind "debian" only');
    tag ??=
      req.kind === 'busybox'
        ? 'localhost/busybox:latest'
        : `localhost/debian:${suite}${include.length ? `-${createHash('sha256').update(include.join(',')).digest('hex').slice(0, 8)}` : ''}`;
    const res = req.kind === 'busybox' ? await this.base.busybox(req.log) : await this.base.debian({ suite, include, log: req.log, ...(req.signal ? { signal: req.signal } : {}) });
    const lease = this.store.lease([res.digest]);
    try {
      await this.rootfs.ensure(res.digest);
      const parsed = parseManifest(await this.store.readBlob(res.digest), undefined, `manifest ${res.digest}`);
      this.store.setTag(tag, res.digest, parsed.mediaType);
    } finally {
      lease.release();
    }
    return { ...(await this.inspect(tag)), cached: res.cached };
  }

  /**
   * The manifest digest of an image a build starts from: from the store, else "busybox" made on
   * this host (as docker.io/library/busybox:latest), else pulled from its registry.
   */
  private async ensureLocal(input: string, log: (line: string) => void): Promise<string> {
    const ref = parseRef(input);
    const have = await this.manifestFor(ref);
    if (have) return have;
    if (BUILTIN_REFS.has(input)) {
      log('making busybox from the host\'s busybox-static');
      return (await this.makeBase({ kind: 'busybox', tag: 'docker.io/library/busybox:latest', log })).digest;
    }
    log(`pulling ${formatRef(ref)}`);
    return (await this.pull({ ref: input })).digest;
  }

  /** Build a Dockerfile (buildah, see build.ts) and import the result as `tag`. */
  async build(req: BuildRequest & { tag: string }): Promise<ImageDetail> {
    const tag = tagRef(parseRef(req.tag));
    if (!tag) throw invalidArgument(`tag "${req.tag}" pins a digest; give a name with a tag, e.g. "app:v1"`);
    const cacheTag = `localhost/berth-build/${createHash('sha256').update(tag).digest('hex').slice(0, 16)}:latest`;
    const [img] = await this.builder.build(
      req,
      cacheTag,
      (archive) => this.importArchive(archive, { tag }),
      async (configDigest) => {
        const current = this.store.getTag(tag);
        if (!current) return undefined;
        try {
          const { manifest } = await this.rootfs.load(current.digest);
          return manifest.config.digest === configDigest ? [await this.inspect(tag)] : undefined;
        } catch {
          return undefined;
        }
      },
    );
    req.log(`tagged ${tag} (${img!.digest})`);
    return img!;
  }

  /** Point `target` at the image `source` names (both references; the target's tag is created or moved). */
  async tag(source: string, target: string): Promise<ImageDetail> {
    if (BUILTIN_REFS.has(source)) throw failedPrecondition('the built-in "busybox" is not an OCI image and cannot be tagged; build one with `berth image base busybox`');
    const digest = await this.manifestFor(parseRef(source));
    if (!digest) throw notFound(`image "${source}" is not on this host; see \`berth image ls\``);
    const key = tagRef(parseRef(target));
    if (!key) throw invalidArgument(`target "${target}" pins a digest; give a name with a tag, e.g. "127.0.0.1:5000/team/app:v2"`);
    const parsed = parseManifest(await this.store.readBlob(digest), undefined, `manifest ${digest}`);
    this.store.setTag(key, digest, parsed.mediaType);
    return this.inspect(key);
  }

  /**
   * Push a local image to the registry its reference names. Blobs the registry already has in
   * another repository of this host's images (same registry) are mounted instead of uploaded.
   */
  async push(req: PullRequest): Promise<PushResult> {
    if (BUILTIN_REFS.has(req.ref)) throw failedPrecondition('the built-in "busybox" cannot be pushed; build an OCI image with `berth image base busybox` and push that');
    const ref = parseRef(req.ref);
    const digest = await this.manifestFor(ref);
    if (!digest) throw notFound(`image "${req.ref}" is not on this host; tag a local image with that name first (\`berth image tag SRC ${req.ref}\`)`);
    const mountFrom = await this.mountSource(ref, digest);
    try {
      return await this.client(ref.registry, req.credentials).push(this.store, digest, ref, {
        ...(req.onProgress ? { onProgress: req.onProgress } : {}),
        ...(req.signal ? { signal: req.signal } : {}),
        ...(mountFrom ? { mountFrom } : {}),
      });
    } catch (e) {
      if (e instanceof BerthError && (e.code === 'unauthenticated' || e.code === 'permission_denied')) throw failedPrecondition(e.message);
      throw e;
    }
  }

  /** Another repository on the same registry that holds a tag of an image sharing a layer with `digest`. */
  private async mountSource(ref: ImageRef, digest: string): Promise<string | undefined> {
    const { manifest } = await this.rootfs.load(digest);
    const layers = new Set(manifest.layers.map((l) => l.digest));
    for (const t of this.store.listTags()) {
      const r = parseRef(t.ref);
      if (r.registry !== ref.registry || r.repository === ref.repository) continue;
      try {
        const other = await this.rootfs.load(t.digest);
        if (other.manifest.layers.some((l) => layers.has(l.digest))) return r.repository;
      } catch {
        /* not an image */
      }
    }
    return undefined;
  }

  close(): void {
    this.store.close();
  }

  /** The manifest digest a reference names in the store, or undefined. */
  private lookup(ref: ImageRef): string | undefined {
    if (ref.digest) return ref.digest;
    return this.store.getTag(`${repoName(ref)}:${ref.tag ?? 'latest'}`)?.digest;
  }

  /**
   * The image manifest a reference names in the store: the tagged or pinned manifest, or, for a
   * digest that names an image index, its entry for this host's platform (the one a pull fetched).
   */
  private async manifestFor(ref: ImageRef): Promise<string | undefined> {
    const digest = this.lookup(ref);
    if (!digest || !(await this.store.hasBlob(digest))) return undefined;
    const parsed = parseManifest(await this.store.readBlob(digest), undefined, `manifest ${digest}`);
    if (parsed.kind === 'manifest') return digest;
    const want = hostPlatform();
    for (const m of parsed.doc.manifests) {
      if (m.platform?.os === want.os && m.platform?.architecture === want.architecture && (await this.store.hasBlob(m.digest))) return m.digest;
    }
    return undefined;
  }

  async resolve(input: string): Promise<ResolvedImage> {
    if (BUILTIN_REFS.has(input)) return this.builtin.resolve(input);
    const ref = parseRef(input);
    const digest = await this.manifestFor(ref);
    if (!digest) {
      throw invalidArgument(`image "${input}" is not on this host; pull it first (\`berth image pull ${input}\` or POST /v1/images/pull), or use the built-in "busybox"`);
    }
    const img = await this.rootfs.ensure(digest);
    return { ref: formatRef(ref), digest, rootfs: img.rootfs, config: processConfig(img.config) };
  }

  /** Every image resolved (unpacking those not unpacked yet); the API lists with summaries(). */
  async list(): Promise<ResolvedImage[]> {
    const out = [await this.builtin.resolve('busybox')];
    for (const t of this.store.listTags()) out.push(await this.resolve(t.ref));
    return out;
  }

  async summaries(): Promise<ImageSummary[]> {
    const out: ImageSummary[] = [];
    try {
      const bb = await this.builtin.resolve('busybox');
      out.push({ ref: bb.ref, digest: bb.digest, size: 0, layers: 0, builtin: true });
    } catch {
      /* no busybox-static on this host: the store's images are still listed */
    }
    for (const t of this.store.listTags()) {
      try {
        const { manifest, config } = await this.rootfs.load(t.digest);
        out.push({
          ref: t.ref,
          digest: t.digest,
          size: manifest.config.size + manifest.layers.reduce((n, l) => n + l.size, 0),
          layers: manifest.layers.length,
          builtin: false,
          ...(config.created ? { created: config.created } : {}),
        });
      } catch {
        out.push({ ref: t.ref, digest: t.digest, size: 0, layers: 0, builtin: false });
      }
    }
    return out;
  }

  async inspect(input: string): Promise<ImageDetail> {
    if (BUILTIN_REFS.has(input)) {
      const bb = await this.builtin.resolve(input);
      return { ref: bb.ref, digest: bb.digest, size: 0, layers: 0, builtin: true, mediaType: 'berth/builtin', config: bb.config, layerDescriptors: [], unpacked: true, labels: {} };
    }
    const ref = parseRef(input);
    const digest = await this.manifestFor(ref);
    if (!digest) throw notFound(`image "${input}" is not on this host; pull it first with \`berth image pull ${input}\``);
    const { manifest, config } = await this.rootfs.load(digest);
    const bytes = await this.store.readBlob(digest);
    const mediaType = (JSON.parse(bytes.toString('utf8')) as { mediaType?: string }).mediaType ?? 'application/vnd.oci.image.manifest.v1+json';
    let unpacked = false;
    try {
      unpacked = lstatSync(this.rootfs.pathFor(digest)).isDirectory();
    } catch {
      /* not unpacked */
    }
    return {
      ref: formatRef(ref),
      digest,
      size: manifest.config.size + manifest.layers.reduce((n, l) => n + l.size, 0),
      layers: manifest.layers.length,
      builtin: false,
      ...(config.created ? { created: config.created } : {}),
      mediaType,
      ...(config.os ? { os: config.os } : {}),
      ...(config.architecture ? { architecture: config.architecture } : {}),
      config: processConfig(config),
      layerDescriptors: manifest.layers.map((l) => ({ digest: l.digest, size: l.size, mediaType: l.mediaType })),
      unpacked,
      labels: config.config?.Labels ?? {},
    };
  }

  /** Pull from the image's registry into the store, then unpack it so workloads start at once. */
  async pull(req: PullRequest): Promise<ImageDetail> {
    if (BUILTIN_REFS.has(req.ref)) return this.inspect(req.ref);
    const ref = parseRef(req.ref);
    const client = this.client(ref.registry, req.credentials);
    // The layers are unpacked while they download (into a temporary tree that is renamed into
    // place only after the pull verified and stored every blob); see LayerFeed.
    const feed = new LayerFeed(this.store);
    let unpacking: Promise<string> | undefined;
    let verify!: { resolve: () => void; reject: (e: unknown) => void };
    const verified = new Promise<void>((resolve, reject) => (verify = { resolve, reject }));
    verified.catch(() => undefined);
    let res;
    try {
      res = await client.pull(this.store, ref, {
        onProgress: (p) => {
          if (p.kind === 'layer' && (p.status === 'done' || p.status === 'exists')) feed.stored(p.digest);
          req.onProgress?.(p);
        },
        tee: {
          start: (digest, manifest, config) => {
            unpacking = this.rootfs.ensureWhilePulling(digest, manifest, config, feed, verified);
            unpacking.catch(() => undefined);
          },
          open: (d) => feed.open(d),
        },
        ...(req.signal ? { signal: req.signal } : {}),
      });
    } catch (e) {
      verify.reject(e);
      feed.fail(e);
      await unpacking?.catch(() => undefined);
      // The registry refused us: not the caller's Berth token, so not a 401/403 of Berth's API.
      if (e instanceof BerthError && (e.code === 'unauthenticated' || e.code === 'permission_denied')) throw failedPrecondition(e.message);
      throw e;
    }
    verify.resolve();
    // If the unpack alongside failed (a hostile layer, or a download that was retried), this
    // unpacks from the verified store and gives the authoritative error; otherwise it is done.
    await unpacking?.catch(() => undefined);
    await this.rootfs.ensure(res.digest);
    return this.inspect(formatRef(ref));
  }

  /**
   * Import a `docker save` archive, an OCI archive or an OCI layout (as a tar): blobs are stored
   * verified, every image is unpacked (refusing hostile layers), and only then tagged with the
   * names the archive gives, or `tag` (for an archive of one image).
   */
  async importArchive(input: Readable, opts: { tag?: string } = {}): Promise<ImageDetail[]> {
    const tag = opts.tag !== undefined ? tagRef(parseRef(opts.tag)) : undefined;
    if (opts.tag !== undefined && !tag) throw invalidArgument(`tag "${opts.tag}" pins a digest; give a name with a tag, e.g. "app:v1"`);
    const lease = this.store.lease();
    try {
      const images = await readArchive(this.store, input, lease);
      if (tag && images.length !== 1) throw invalidArgument(`the archive holds ${images.length} images; a tag can only be given for an archive of one image`);
      const named = images.map((img) => {
        const names = tag ? [tag] : img.names;
        if (!names.length) {
          throw invalidArgument(
            img.bareTags.length
              ? `image ${img.digest} of the archive is named only by the tag "${img.bareTags[0]}", without a repository; give the name to import it as (\`--tag app:${img.bareTags[0]}\`, ?tag=)`
              : `image ${img.digest} of the archive has no name; give one to import it as (\`--tag app:v1\`, ?tag=)`,
          );
        }
        return { ...img, names };
      });
      for (const img of named) await this.rootfs.ensure(img.digest);
      for (const img of named) for (const n of img.names) this.store.setTag(n, img.digest, img.mediaType);
      return Promise.all(named.map((img) => this.inspect(img.names[0]!)));
    } finally {
      lease.release();
    }
  }

  /** An image as an archive stream (OCI archive, or `docker save` format). */
  async exportArchive(input: string, format: ArchiveFormat): Promise<Readable> {
    if (BUILTIN_REFS.has(input)) throw failedPrecondition('the built-in "busybox" is not an OCI image and cannot be exported; build one with `berth image base busybox`');
    const ref = parseRef(input);
    const digest = await this.manifestFor(ref);
    if (!digest) throw notFound(`image "${input}" is not on this host; see \`berth image ls\``);
    const parsed = parseManifest(await this.store.readBlob(digest), undefined, `manifest ${digest}`);
    const name = tagRef(ref);
    return writeArchive(this.store, { digest, mediaType: parsed.mediaType, ...(name ? { name } : {}) }, format);
  }

  /**
   * Remove a tag, then garbage-collect: blobs and unpacked trees that no tag and no workload
   * still uses go away. A tag that workloads use is refused (delete the workloads first).
   */
  async remove(input: string, inUse: { refs: Map<string, string[]> }): Promise<RemoveResult> {
    if (BUILTIN_REFS.has(input)) throw failedPrecondition('"busybox" is built in and cannot be removed');
    const ref = parseRef(input);
    if (ref.digest !== undefined && ref.tag === undefined) {
      const tags = this.store.tagsFor(ref.digest);
      if (tags.length) throw failedPrecondition(`image ${ref.digest} is tagged ${tags.map((t) => t.ref).join(', ')}; remove those tags instead`);
    }
    const key = `${repoName(ref)}:${ref.tag ?? 'latest'}`;
    const tag = this.store.getTag(key);
    if (!tag) throw notFound(`image "${input}" is not on this host (no tag ${familiarRef(key)}); see \`berth image ls\``);
    const users = inUse.refs.get(key);
    if (users?.length) throw failedPrecondition(`image ${familiarRef(key)} is used by ${users.slice(0, 5).join(', ')}${users.length > 5 ? ` and ${users.length - 5} more` : ''}; delete those first`);
    this.store.deleteTag(key);
    const gc = await this.gc(inUse);
    return { ref: key, digest: tag.digest, removedBlobs: gc.removedBlobs, freedBytes: gc.freedBytes };
  }

  /** Remove blobs and unpacked trees that no tag and no reference in `inUse` needs. */
  async gc(inUse: { refs: Map<string, string[]> }): Promise<{ removedBlobs: string[]; freedBytes: number; removedRootfs: string[] }> {
    const digests: string[] = [];
    for (const r of inUse.refs.keys()) {
      try {
        const d = this.lookup(parseRef(r));
        if (d) digests.push(d);
      } catch {
        /* not a store reference */
      }
    }
    const res = await this.store.gc(digests);
    const removedRootfs = await this.rootfs.prune(res.liveManifests);
    return { removedBlobs: res.removedBlobs, freedBytes: res.freedBytes, removedRootfs };
  }

  /** The canonical store key of an image reference, or undefined for the built-in image / bad refs. */
  static key(input: string): string | undefined {
    if (BUILTIN_REFS.has(input)) return undefined;
    try {
      const r = parseRef(input);
      return r.digest !== undefined ? `${repoName(r)}@${r.digest}` : `${repoName(r)}:${r.tag ?? 'latest'}`;
    } catch {
      return undefined;
    }
  }
}

/**
 * Resolve "uid[:gid]" or "name[:group]" against the image's /etc/passwd and /etc/group.
 * The files are read only if they are regular files (never through a symlink that could point
 * out of the image).
 */
export function resolveUser(rootfs: string, user: string): { uid: number; gid: number } {
  const [u, g] = user.split(':') as [string, string | undefined];
  const readDb = (file: string): string[][] => {
    const p = join(rootfs, 'etc', file);
    try {
      if (!lstatSync(join(rootfs, 'etc')).isDirectory() || !lstatSync(p).isFile()) return [];
      return readFileSync(p, 'utf8')
        .split('\n')
        .filter((l) => l && !l.startsWith('#'))
        .map((l) => l.split(':'));
    } catch {
      return [];
    }
  };
  let uid: number;
  let gid: number | undefined;
  if (/^\d+$/.test(u)) {
    uid = Number(u);
    const row = readDb('passwd').find((r) => r[2] === u);
    if (row) gid = Number(row[3]);
  } else {
    const row = readDb('passwd').find((r) => r[0] === u);
    if (!row) throw invalidArgument(`user "${u}" does not exist in the image's /etc/passwd; use a numeric uid such as "1000:1000"`);
    uid = Number(row[2]);
    gid = Number(row[3]);
  }
  if (g !== undefined) {
    if (/^\d+$/.test(g)) gid = Number(g);
    else {
      const row = readDb('group').find((r) => r[0] === g);
      if (!row) throw invalidArgument(`group "${g}" does not exist in the image's /etc/group; use a numeric gid`);
      gid = Number(row[2]);
    }
  }
  if (uid > 4294967294 || (gid ?? 0) > 4294967294) throw invalidArgument('uid and gid must be below 4294967295');
  return { uid, gid: gid ?? uid };
}
