// The OCI content store: every blob (layer, config, manifest, index) lives once under
// <root>/blobs/sha256/<hex>, named by the sha256 of its bytes, so images share layers. A blob is
// written to <root>/ingest/<random> while its digest is computed, checked against the digest the
// caller expects (and the size, when known), fsynced and renamed into place: a blob file that
// exists is complete and verified. Two writers of the same blob (two pulls, or two processes)
// both finish with a rename of identical bytes; within one process the second one waits for the
// first instead of downloading again.
//
// Tags ("registry/repository:tag" → manifest digest) live in a small SQLite file of the store's
// own (<root>/index.db), apart from berthd's state.db, so the store can be used and tested alone.
//
// Garbage collection keeps what is reachable from the tags, from the digests the caller says are
// in use (e.g. the images of workloads that exist), and from leases held by pulls in progress.
import Database from 'better-sqlite3';
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream, mkdirSync, promises as fsp, type ReadStream } from 'node:fs';
import path from 'node:path';
import { BerthError, invalidArgument, notFound } from '../core/errors.js';
import { assertDigest } from './ref.js';
import { parseManifest, MAX_MANIFEST_BYTES } from './oci.js';

export interface TagRecord {
  ref: string;
  digest: string;
  mediaType: string;
  updatedAt: string;
}

export type BlobSource = AsyncIterable<Uint8Array> | Iterable<Uint8Array>;

export interface IngestOptions {
  /** Expected size in bytes; more or fewer bytes fail the write. */
  size?: number;
  /** Called with the number of bytes written so far. */
  onBytes?: (written: number) => void;
  /** What the blob is, for error messages ("layer 2 of registry/repo:tag"). */
  what?: string;
}

export interface GcResult {
  removedBlobs: string[];
  freedBytes: number;
  /** Manifest digests that are still reachable (the caller prunes its caches with it). */
  liveManifests: Set<string>;
}

export class DigestMismatchError extends BerthError {
  constructor(what: string, expected: string, actual: string, bytes: number) {
    super('invalid_argument', `${what}: content does not match its digest (expected ${expected}, got ${actual} over ${bytes} bytes); the registry or archive served corrupted or tampered data, nothing was stored`, { expected, actual });
    this.name = 'DigestMismatchError';
  }
}

const INGEST_STALE_MS = 60 * 60 * 1000;

export class ImageStore {
  readonly root: string;
  readonly blobsDir: string;
  private readonly ingestDir: string;
  private readonly db: Database.Database;
  private readonly inflight = new Map<string, Promise<number>>();
  private readonly leases = new Map<number, Set<string>>();
  private nextLease = 1;

  constructor(root: string) {
    this.root = path.resolve(root);
    this.blobsDir = path.join(this.root, 'blobs', 'sha256');
    this.ingestDir = path.join(this.root, 'ingest');
    // Synchronous on purpose: construction happens once at daemon start.
    for (const d of [this.root, this.blobsDir, this.ingestDir]) mkdirSync(d, { recursive: true, mode: 0o700 });
    this.db = new Database(path.join(this.root, 'index.db'));
    this.db.pragma('journal_mode = WAL');
    this.db.pragma('busy_timeout = 5000');
    this.db.exec(`CREATE TABLE IF NOT EXISTS tags (
      ref TEXT PRIMARY KEY,
      digest TEXT NOT NULL,
      media_type TEXT NOT NULL,
      updated_at TEXT NOT NULL
    )`);
  }

  close(): void {
    this.db.close();
  }

  blobPath(digest: string): string {
    assertDigest(digest);
    return path.join(this.blobsDir, digest.slice('sha256:'.length));
  }

  async hasBlob(digest: string): Promise<boolean> {
    try {
      return (await fsp.lstat(this.blobPath(digest))).isFile();
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return false;
      throw e;
    }
  }

  async blobSize(digest: string): Promise<number> {
    try {
      return (await fsp.stat(this.blobPath(digest))).size;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') throw notFound(`blob ${digest} is not in the image store; pull the image again`);
      throw e;
    }
  }

  /** Read a small blob (manifest, index, config) into memory, refusing anything over `max` bytes. */
  async readBlob(digest: string, max = MAX_MANIFEST_BYTES): Promise<Buffer> {
    const size = await this.blobSize(digest);
    if (size > max) throw invalidArgument(`blob ${digest} is ${size} bytes, over the ${max}-byte limit for this kind of document`);
    return fsp.readFile(this.blobPath(digest));
  }

  openBlob(digest: string): ReadStream {
    return createReadStream(this.blobPath(digest), { highWaterMark: 1 << 20 });
  }

  /**
   * Store a blob whose digest is known in advance. `open` is called only if the blob is not
   * stored yet (and no other ingest of it is running in this process). Returns the blob's size.
   */
  async ingest(digest: string, open: () => Promise<BlobSource> | BlobSource, opts: IngestOptions = {}): Promise<number> {
    assertDigest(digest);
    for (;;) {
      const running = this.inflight.get(digest);
      if (!running) break;
      try {
        return await running;
      } catch {
        // That attempt failed (e.g. a connection reset); try ourselves.
      }
    }
    // Registered before the first await, so concurrent callers find it.
    const p = (async () => {
      if (await this.hasBlob(digest)) {
        const size = await this.blobSize(digest);
        opts.onBytes?.(size);
        return size;
      }
      return this.write(digest, open, opts);
    })();
    this.inflight.set(digest, p);
    try {
      return await p;
    } finally {
      if (this.inflight.get(digest) === p) this.inflight.delete(digest);
    }
  }

  /** Store bytes (a manifest or config Berth made or read), returning their digest. */
  async putBytes(bytes: Buffer, expected?: string): Promise<string> {
    const digest = `sha256:${createHash('sha256').update(bytes).digest('hex')}`;
    if (expected !== undefined && expected !== digest) throw new DigestMismatchError('document', expected, digest, bytes.length);
    await this.ingest(digest, () => [bytes], { size: bytes.length });
    return digest;
  }

  /**
   * Store a blob whose digest is not known in advance (a file of an archive that names blobs by
   * something else): written and hashed, then named by its digest. Returns digest and size.
   */
  async putStream(source: BlobSource, opts: IngestOptions = {}): Promise<{ digest: string; size: number }> {
    let digest = '';
    const size = await this.write(undefined, () => source, opts, (d) => (digest = d));
    return { digest, size };
  }

  private async write(expected: string | undefined, open: () => Promise<BlobSource> | BlobSource, opts: IngestOptions, named?: (digest: string) => void): Promise<number> {
    const what = opts.what ?? `blob ${expected ?? ''}`;
    const tmp = path.join(this.ingestDir, `${(expected ?? 'sha256:unknown-----').slice(7, 19)}-${process.pid}-${randomBytes(6).toString('hex')}`);
    const fh = await fsp.open(tmp, 'wx', 0o644);
    let closed = false;
    try {
      const hash = createHash('sha256');
      let n = 0;
      for await (const chunk of await open()) {
        n += chunk.length;
        if (opts.size !== undefined && n > opts.size) {
          throw invalidArgument(`${what}: more data than the ${opts.size} bytes its descriptor declares; the registry or archive is broken or hostile, nothing was stored`);
        }
        hash.update(chunk);
        await fh.write(chunk);
        opts.onBytes?.(n);
      }
      if (opts.size !== undefined && n !== opts.size) {
        throw invalidArgument(`${what}: got ${n} bytes but its descriptor declares ${opts.size}; the download was cut short or the registry is broken, nothing was stored`);
      }
      const actual = `sha256:${hash.digest('hex')}`;
      if (expected !== undefined && actual !== expected) throw new DigestMismatchError(what, expected, actual, n);
      await fh.sync();
      await fh.close();
      closed = true;
      await fsp.rename(tmp, this.blobPath(actual));
      named?.(actual);
      return n;
    } finally {
      if (!closed) await fh.close().catch(() => undefined);
      await fsp.rm(tmp, { force: true });
    }
  }

  // ---- tags ----

  setTag(ref: string, digest: string, mediaType: string): void {
    assertDigest(digest);
    this.db
      .prepare('INSERT INTO tags (ref, digest, media_type, updated_at) VALUES (?, ?, ?, ?) ON CONFLICT(ref) DO UPDATE SET digest = excluded.digest, media_type = excluded.media_type, updated_at = excluded.updated_at')
      .run(ref, digest, mediaType, new Date().toISOString());
  }

  getTag(ref: string): TagRecord | undefined {
    const row = this.db.prepare('SELECT ref, digest, media_type, updated_at FROM tags WHERE ref = ?').get(ref) as Row | undefined;
    return row && toTag(row);
  }

  listTags(): TagRecord[] {
    return (this.db.prepare('SELECT ref, digest, media_type, updated_at FROM tags ORDER BY ref').all() as Row[]).map(toTag);
  }

  tagsFor(digest: string): TagRecord[] {
    return (this.db.prepare('SELECT ref, digest, media_type, updated_at FROM tags WHERE digest = ? ORDER BY ref').all(digest) as Row[]).map(toTag);
  }

  deleteTag(ref: string): boolean {
    return this.db.prepare('DELETE FROM tags WHERE ref = ?').run(ref).changes > 0;
  }

  // ---- leases and garbage collection ----

  /** Protect digests from GC while a pull or unpack is in progress; call the result to release. */
  lease(digests: Iterable<string> = []): { add(d: string): void; release(): void } {
    const id = this.nextLease++;
    const set = new Set(digests);
    this.leases.set(id, set);
    return { add: (d) => void set.add(d), release: () => void this.leases.delete(id) };
  }

  /** The digests a manifest or index references (children, config, layers); [] for other blobs. */
  async references(digest: string): Promise<string[]> {
    let bytes: Buffer;
    try {
      bytes = await this.readBlob(digest);
    } catch {
      return [];
    }
    try {
      const m = parseManifest(bytes, undefined, `blob ${digest}`);
      return m.kind === 'index' ? m.doc.manifests.map((d) => d.digest) : [m.doc.config.digest, ...m.doc.layers.map((l) => l.digest)];
    } catch {
      return [];
    }
  }

  /**
   * Remove every blob not reachable from a tag, from `inUse` (manifest or blob digests the
   * caller still needs, e.g. images of existing workloads) or from a lease.
   */
  async gc(inUse: Iterable<string> = []): Promise<GcResult> {
    const live = new Set<string>();
    const liveManifests = new Set<string>();
    const roots = [...this.listTags().map((t) => t.digest), ...inUse, ...[...this.leases.values()].flatMap((s) => [...s])];
    const queue = [...roots];
    while (queue.length) {
      const d = queue.pop()!;
      if (live.has(d)) continue;
      live.add(d);
      const refs = await this.references(d);
      if (refs.length) liveManifests.add(d);
      queue.push(...refs);
    }
    const removedBlobs: string[] = [];
    let freedBytes = 0;
    for (const name of await fsp.readdir(this.blobsDir)) {
      const d = `sha256:${name}`;
      if (live.has(d) || this.inflight.has(d)) continue;
      // Re-check leases: a pull may have started while we were marking.
      if ([...this.leases.values()].some((s) => s.has(d))) continue;
      const p = path.join(this.blobsDir, name);
      try {
        const st = await fsp.lstat(p);
        await fsp.rm(p, { force: true });
        freedBytes += st.size;
        removedBlobs.push(d);
      } catch {
        /* removed by someone else */
      }
    }
    await this.removeStaleIngests();
    return { removedBlobs: removedBlobs.sort(), freedBytes, liveManifests };
  }

  private async removeStaleIngests(): Promise<void> {
    for (const name of await fsp.readdir(this.ingestDir)) {
      const p = path.join(this.ingestDir, name);
      try {
        if (Date.now() - (await fsp.lstat(p)).mtimeMs > INGEST_STALE_MS) await fsp.rm(p, { force: true });
      } catch {
        /* raced */
      }
    }
  }
}

interface Row {
  ref: string;
  digest: string;
  media_type: string;
  updated_at: string;
}
const toTag = (r: Row): TagRecord => ({ ref: r.ref, digest: r.digest, mediaType: r.media_type, updatedAt: r.updated_at });
