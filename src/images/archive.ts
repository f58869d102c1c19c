// Image archives, both directions: `docker save` tarballs (the classic layout with manifest.json
// and <id>/layer.tar, and Docker ≥ 25's, which is an OCI layout plus manifest.json), OCI archives
// (a tar of an OCI image layout) and OCI layout directories (the CLI sends those as a tar).
//
// Import reads the tar as a stream, once: files named blobs/sha256/<hex> go straight into the
// store, verified against their name and the size in their tar header; other large files (classic
// layer.tar) are stored under the digest of their bytes; small JSON documents are kept in memory
// (at most 4 MiB each). Only then are the documents read, and every descriptor is checked against
// what was stored (digest and size). Entries with absolute names, "..", NUL bytes, symlinks that
// leave the archive, hardlinks or device nodes are refused. The caller tags the images only after
// their layers unpacked cleanly (ImageService.importArchive), so a refused archive tags nothing.
import path from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import zlib from 'node:zlib';
import tar from 'tar-stream';
import { BerthError, invalidArgument } from '../core/errors.js';
import { MAX_MANIFEST_BYTES, MT, hostPlatform, parseConfig, parseManifest, type Descriptor } from './oci.js';
import { familiarRef, parseRef, repoName, tagRef, type ImageRef } from './ref.js';
import type { ImageStore } from './store.js';

export type ArchiveFormat = 'oci' | 'docker';

export interface ArchiveImage {
  /** Manifest digest (one platform's image). */
  digest: string;
  mediaType: string;
  /** Canonical "registry/repository:tag" names the archive gives it (may be empty). */
  names: string[];
  /** Bare tags (OCI ref.name without a repository): the caller supplies the repository. */
  bareTags: string[];
}

export class HostileArchiveError extends BerthError {
  constructor(entry: string, why: string) {
    super('invalid_argument', `the image archive is refused: entry "${entry.slice(0, 200)}" ${why}; nothing was tagged`, { entry: entry.slice(0, 200) });
    this.name = 'HostileArchiveError';
  }
}

const MAX_ENTRIES = 100_000;
const BLOB_RE = /^blobs\/sha256\/([0-9a-f]{64})$/;
const DOC_NAMES = new Set(['index.json', 'manifest.json', 'oci-layout', 'repositories']);

type Stored = { kind: 'blob'; digest: string; size: number } | { kind: 'doc'; bytes: Buffer } | { kind: 'link'; target: string };

/** Archive entry name → normalized relative path; refuses what could name something outside. */
function entryName(raw: string): string {
  if (raw.includes('\0')) throw new HostileArchiveError(raw, 'has a NUL byte in its name');
  if (raw.startsWith('/')) throw new HostileArchiveError(raw, 'has an absolute path');
  const parts = raw.split('/').filter((p) => p !== '' && p !== '.');
  if (parts.includes('..')) throw new HostileArchiveError(raw, 'has ".." in its path');
  return parts.join('/');
}

async function readDoc(stream: AsyncIterable<Uint8Array>, name: string): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let n = 0;
  for await (const c of stream) {
    n += c.length;
    if (n > MAX_MANIFEST_BYTES) throw new HostileArchiveError(name, 'is a document over the 4 MiB limit');
    chunks.push(Buffer.from(c));
  }
  return Buffer.concat(chunks);
}

/** A gzip stream is gunzipped first (`docker save | gzip`); anything else is taken as a tar. */
async function maybeGunzip(input: Readable): Promise<Readable> {
  const it = input.iterator({ destroyOnReturn: false });
  const first = await it.next();
  const head: Buffer = first.done ? Buffer.alloc(0) : Buffer.from(first.value as Uint8Array);
  const rest = Readable.from((async function* () {
    if (head.length) yield head;
    for (;;) {
      const r = await it.next();
      if (r.done) return;
      yield r.value as Buffer;
    }
  })());
  if (head[0] === 0x1f && head[1] === 0x8b) return rest.pipe(zlib.createGunzip());
  return rest;
}

/** Read an archive into the store; returns the images it holds (untagged). */
export async function readArchive(store: ImageStore, input: Readable, lease: { add(d: string): void }): Promise<ArchiveImage[]> {
  const files = new Map<string, Stored>();
  const extract = tar.extract();
  const source = await maybeGunzip(input);
  const piped = pipeline(source, extract as unknown as NodeJS.WritableStream);
  let pipeError: unknown;
  piped.catch((e) => (pipeError ??= e));
  let count = 0;
  try {
    for await (const entry of extract) {
      const h = entry.header;
      if (++count > MAX_ENTRIES) throw new HostileArchiveError(h.name, `is past the ${MAX_ENTRIES}-entry limit`);
      const name = entryName(h.name);
      switch (h.type) {
        case 'directory':
          break;
        case 'symlink': {
          const target = path.posix.normalize(path.posix.join(path.posix.dirname(name), h.linkname ?? ''));
          if (!h.linkname || h.linkname.startsWith('/') || target.startsWith('..') || target === '.') throw new HostileArchiveError(h.name, `is a symlink to "${(h.linkname ?? '').slice(0, 100)}", outside the archive`);
          files.set(name, { kind: 'link', target });
          break;
        }
        case 'file':
        case 'contiguous-file': {
          const size = h.size ?? 0;
          const blob = BLOB_RE.exec(name);
          if (blob) {
            const digest = `sha256:${blob[1]}`;
            lease.add(digest);
            await store.ingest(digest, () => entry as unknown as AsyncIterable<Uint8Array>, { size, what: `archive entry ${name}` });
            files.set(name, { kind: 'blob', digest, size });
          } else if (DOC_NAMES.has(name) || name.endsWith('.json') || name.endsWith('/VERSION')) {
            files.set(name, { kind: 'doc', bytes: await readDoc(entry as unknown as AsyncIterable<Uint8Array>, name) });
          } else {
            const r = await store.putStream(entry as unknown as AsyncIterable<Uint8Array>, { size, what: `archive entry ${name}` });
            lease.add(r.digest);
            files.set(name, { kind: 'blob', digest: r.digest, size: r.size });
          }
          break;
        }
        default:
          throw new HostileArchiveError(h.name, `is a ${h.type}; image archives hold only files, directories and symlinks`);
      }
      entry.resume();
    }
    await piped;
  } catch (e) {
    extract.destroy();
    // Read the rest of the upload and drop it, so the client gets the answer, not a reset.
    input.resume();
    await piped.catch(() => undefined);
    if (e instanceof BerthError) throw e;
    throw invalidArgument(`the upload is not a valid tar archive (${((pipeError ?? e) as Error).message}); send a \`docker save\` tarball, an OCI archive, or an OCI layout directory as a tar`);
  }

  const get = (name: string, hops = 0): Stored | undefined => {
    const f = files.get(name);
    if (f?.kind === 'link') {
      if (hops > 8) throw new HostileArchiveError(name, 'is a symlink loop');
      return get(f.target, hops + 1);
    }
    return f;
  };
  const doc = (name: string): Buffer | undefined => {
    const f = get(name);
    return f?.kind === 'doc' ? f.bytes : undefined;
  };

  const index = doc('index.json');
  if (index) return fromOciIndex(store, index);
  const legacy = doc('manifest.json');
  if (legacy) return fromDockerManifest(store, legacy, get, lease);
  throw invalidArgument('the archive holds neither index.json (OCI layout) nor manifest.json (docker save); it is not an image archive');
}

/** The blob a descriptor names must be stored with the size the descriptor declares. */
async function checkBlob(store: ImageStore, d: Descriptor, what: string): Promise<void> {
  if (!(await store.hasBlob(d.digest))) throw invalidArgument(`the image archive is incomplete: ${what} ${d.digest} is not in it`);
  const size = await store.blobSize(d.digest);
  if (size !== d.size) throw invalidArgument(`the image archive is refused: ${what} ${d.digest} is ${size} bytes but its descriptor declares ${d.size}`);
}

async function checkImage(store: ImageStore, digest: string): Promise<void> {
  const m = parseManifest(await store.readBlob(digest), undefined, `manifest ${digest}`);
  if (m.kind !== 'manifest') throw invalidArgument(`manifest ${digest} of the archive is an index nested in an index; not supported`);
  await checkBlob(store, m.doc.config, 'config');
  for (const l of m.doc.layers) await checkBlob(store, l, 'layer');
  const cfg = parseConfig(await store.readBlob(m.doc.config.digest), `config ${m.doc.config.digest}`);
  if (cfg.rootfs.diff_ids.length !== m.doc.layers.length) throw invalidArgument(`image ${digest} of the archive is inconsistent: ${m.doc.layers.length} layers but ${cfg.rootfs.diff_ids.length} diff_ids`);
}

/** A name from an annotation: a full reference, or a bare tag (skopeo's `oci:DIR:TAG`). */
function addName(img: ArchiveImage, name: string | undefined): void {
  if (!name) return;
  if (!name.includes('/') && !name.includes(':')) {
    parseRef(`x:${name}`); // validates the tag
    if (!img.bareTags.includes(name)) img.bareTags.push(name);
    return;
  }
  const t = tagRef(parseRef(name));
  if (t && !img.names.includes(t)) img.names.push(t);
}

async function fromOciIndex(store: ImageStore, bytes: Buffer): Promise<ArchiveImage[]> {
  const parsed = parseManifest(bytes, MT.ociIndex, 'index.json of the archive');
  if (parsed.kind !== 'index') throw invalidArgument('index.json of the archive is not an image index');
  const out = new Map<string, ArchiveImage>();
  for (const d of parsed.doc.manifests) {
    await checkBlob(store, d, 'manifest');
    let chosen = d;
    const m = parseManifest(await store.readBlob(d.digest), d.mediaType, `manifest ${d.digest}`);
    if (m.kind === 'index') {
      const want = hostPlatform();
      const child = m.doc.manifests.find((c) => c.platform?.os === want.os && c.platform?.architecture === want.architecture);
      if (!child) throw invalidArgument(`image index ${d.digest} of the archive has no ${want.os}/${want.architecture} image`);
      await checkBlob(store, child, 'manifest');
      chosen = child;
    }
    await checkImage(store, chosen.digest);
    const img = out.get(chosen.digest) ?? { digest: chosen.digest, mediaType: chosen.mediaType, names: [], bareTags: [] };
    addName(img, d.annotations?.['io.containerd.image.name']);
    if (!d.annotations?.['io.containerd.image.name']) addName(img, d.annotations?.['org.opencontainers.image.ref.name']);
    out.set(chosen.digest, img);
  }
  return [...out.values()];
}

const LegacyEntry = (v: unknown): v is { Config: string; RepoTags?: string[] | null; Layers: string[] } => {
  const o = v as Record<string, unknown>;
  return !!o && typeof o.Config === 'string' && Array.isArray(o.Layers) && o.Layers.every((l) => typeof l === 'string') && (o.RepoTags == null || (Array.isArray(o.RepoTags) && o.RepoTags.every((t) => typeof t === 'string')));
};

/** Classic `docker save`: manifest.json names a config file and layer tars; Berth writes an OCI manifest for them. */
async function fromDockerManifest(store: ImageStore, bytes: Buffer, get: (n: string) => Stored | undefined, lease: { add(d: string): void }): Promise<ArchiveImage[]> {
  let list: unknown;
  try {
    list = JSON.parse(bytes.toString('utf8'));
  } catch {
    throw invalidArgument('manifest.json of the archive is not valid JSON');
  }
  if (!Array.isArray(list) || list.length > 1000 || !list.every(LegacyEntry)) throw invalidArgument('manifest.json of the archive is not a `docker save` manifest (a list of {Config, RepoTags, Layers})');
  const out: ArchiveImage[] = [];
  for (const e of list) {
    const cfgFile = get(entryName(e.Config));
    let cfgBytes: Buffer;
    if (cfgFile?.kind === 'doc') cfgBytes = cfgFile.bytes;
    else if (cfgFile?.kind === 'blob') cfgBytes = await store.readBlob(cfgFile.digest);
    else throw invalidArgument(`the image archive is incomplete: config ${e.Config.slice(0, 200)} is not in it`);
    const cfg = parseConfig(cfgBytes, `config ${e.Config.slice(0, 200)}`);
    if (cfg.rootfs.diff_ids.length !== e.Layers.length) throw invalidArgument(`image ${e.Config.slice(0, 200)} of the archive is inconsistent: ${e.Layers.length} layers but ${cfg.rootfs.diff_ids.length} diff_ids`);
    const cfgDigest = await store.putBytes(cfgBytes);
    lease.add(cfgDigest);
    const layers: Descriptor[] = [];
    for (const [i, name] of e.Layers.entries()) {
      const f = get(entryName(name));
      if (f?.kind !== 'blob') throw invalidArgument(`the image archive is incomplete: layer ${name.slice(0, 200)} is not in it`);
      const head = await readHead(store, f.digest);
      const gzip = head[0] === 0x1f && head[1] === 0x8b;
      if (!gzip && f.digest !== cfg.rootfs.diff_ids[i]) {
        throw invalidArgument(`the image archive is refused: layer ${name.slice(0, 200)} hashes to ${f.digest} but the config declares ${cfg.rootfs.diff_ids[i]}`);
      }
      layers.push({ mediaType: gzip ? MT.ociLayerGzip : MT.ociLayer, digest: f.digest, size: f.size });
    }
    const manifest = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: MT.ociManifest, config: { mediaType: MT.ociConfig, digest: cfgDigest, size: cfgBytes.length }, layers }));
    const digest = await store.putBytes(manifest);
    lease.add(digest);
    const img: ArchiveImage = { digest, mediaType: MT.ociManifest, names: [], bareTags: [] };
    for (const t of e.RepoTags ?? []) addName(img, t);
    out.push(img);
  }
  return out;
}

async function readHead(store: ImageStore, digest: string): Promise<Buffer> {
  for await (const c of store.openBlob(digest).iterator({ destroyOnReturn: true })) return Buffer.from(c as Buffer).subarray(0, 2);
  return Buffer.alloc(0);
}

// ---- export ----

export interface ExportImage {
  digest: string;
  mediaType: string;
  /** Canonical name ("registry/repository:tag"), written into the archive's annotations / RepoTags. */
  name?: string;
}

/** Write one image as an OCI archive (format "oci") or a `docker save` archive (format "docker", also an OCI layout, as Docker ≥ 25 writes). */
export function writeArchive(store: ImageStore, img: ExportImage, format: ArchiveFormat): Readable {
  const pack = tar.pack();
  const add = (name: string, body: Buffer) =>
    new Promise<void>((resolve, reject) => pack.entry({ name, size: body.length, mode: 0o644, mtime: new Date(0) }, body, (e) => (e ? reject(e) : resolve())));
  const addBlob = async (digest: string) => {
    const size = await store.blobSize(digest);
    const sink = pack.entry({ name: `blobs/sha256/${digest.slice(7)}`, size, mode: 0o644, mtime: new Date(0) });
    await pipeline(store.openBlob(digest), sink);
  };
  (async () => {
    const bytes = await store.readBlob(img.digest);
    const m = parseManifest(bytes, img.mediaType, `manifest ${img.digest}`);
    if (m.kind !== 'manifest') throw invalidArgument(`${img.digest} is an image index; export one platform's image`);
    await add('oci-layout', Buffer.from('{"imageLayoutVersion":"1.0.0"}'));
    for (const l of m.doc.layers) await addBlob(l.digest);
    await addBlob(m.doc.config.digest);
    await addBlob(img.digest);
    const ref: ImageRef | undefined = img.name ? parseRef(img.name) : undefined;
    const annotations = ref ? { 'io.containerd.image.name': img.name!, 'org.opencontainers.image.ref.name': ref.tag ?? 'latest' } : undefined;
    const desc = { mediaType: m.mediaType, digest: img.digest, size: bytes.length, ...(annotations ? { annotations } : {}) };
    await add('index.json', Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: MT.ociIndex, manifests: [desc] })));
    if (format === 'docker') {
      const repoTags = ref ? [familiarRef(`${repoName(ref)}:${ref.tag ?? 'latest'}`)] : null;
      const legacy = [{ Config: `blobs/sha256/${m.doc.config.digest.slice(7)}`, RepoTags: repoTags, Layers: m.doc.layers.map((l) => `blobs/sha256/${l.digest.slice(7)}`) }];
      await add('manifest.json', Buffer.from(JSON.stringify(legacy)));
    }
    pack.finalize();
  })().catch((e: unknown) => pack.destroy(e as Error));
  return Readable.from(pack as unknown as AsyncIterable<Buffer>, { objectMode: false });
}
