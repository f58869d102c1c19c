// Rootfs materialization: an image's layers are applied in order, once, into a directory named by
// the manifest digest (<dir>/<hex>), which workloads then share read-only (runc and gVisor mount a
// per-workload overlay over it). The tree is built in a temporary sibling and renamed into place,
// so a rootfs directory that exists is complete. A pull unpacks while it downloads (LayerFeed):
// the layer being applied is streamed from its download, and the tree is renamed into place only
// after the pull has verified every blob against its digest and stored it; a tree built from
// bytes that then fail verification is removed unused.
//
// Tar parsing is tar-stream's; applying entries is Berth's own code on purpose: layer semantics
// (OCI whiteouts ".wh.<name>" and opaque directories ".wh..wh..opq", replacing a directory by a
// file and back) and the safety rules below are not what a general-purpose extractor does, and
// past extractor bugs (symlink and hardlink escapes) are exactly what these rules prevent:
//
//  - entry names and hardlink targets are relative paths without ".." (refused otherwise);
//  - nothing is ever written through a symlink: every parent of an entry must be a real
//    directory in the tree being built (checked with lstat, component by component), and files
//    are created with O_EXCL | O_NOFOLLOW after removing what was there;
//  - symlinks whose relative target climbs above the rootfs are refused; absolute targets are
//    kept as they are (they are resolved inside the container's root, never on the host, since
//    the host never follows them);
//  - device nodes are refused;
//  - each layer's uncompressed bytes must hash to the diff_id the image config declares.
//
// Nobody else writes into the temporary tree while it is built, so the lstat checks cannot race.
// The file system calls of one entry are synchronous on purpose: a layer has thousands of small
// entries, and a round trip through libuv's thread pool per call made unpacking several times
// slower than umoci's; the event loop still gets a turn between entries and between chunks.
// For big layers those calls run in a worker thread (WorkerSink), in the order the entries
// come, while this thread inflates, hashes and parses the next ones: measured on the postgresql
// image, the two halves take about as long as each other (see BENCHMARKS.md, images).
import { execFile } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import fs, { constants as fsc, promises as fsp } from 'node:fs';
import path from 'node:path';
import { PassThrough, Transform, type Readable, type Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { Worker, type MessagePort } from 'node:worker_threads';
import { promisify } from 'node:util';
import zlib from 'node:zlib';
import tar from 'tar-stream';
import { BerthError, failedPrecondition, invalidArgument } from '../core/errors.js';
import { layerCompression, parseConfig, parseManifest, type Descriptor, type ImageConfigDoc, type Manifest } from './oci.js';
import type { ImageStore } from './store.js';

const execFileP = promisify(execFile);

export class HostileLayerError extends BerthError {
  constructor(
    readonly layer: string,
    readonly entry: string,
    readonly why: string,
  ) {
    super('invalid_argument', `layer ${layer} is refused: entry "${entry.slice(0, 200)}" ${why}; nothing outside the image store was written and the image was not unpacked`, { layer, entry: entry.slice(0, 200) });
    this.name = 'HostileLayerError';
  }
}

export interface LayerInput {
  /** Uncompressed or compressed layer bytes. */
  stream: Readable;
  compression: 'gzip' | 'none' | 'zstd';
  /** Expected sha256 of the uncompressed tar (the config's diff_id); checked when given. */
  diffId?: string;
  /** Name for messages (the layer's digest). */
  name: string;
  /**
   * Apply the entries in a worker thread while this thread inflates, hashes and parses (see
   * applyLayer); worth its start-up (~30 ms) for big layers only. Default: inline.
   */
  worker?: boolean;
}

export interface UnpackStats {
  entries: number;
  /** xattrs that could not be kept (filesystem without support, binary values, no setfattr). */
  xattrsSkipped: number;
}

/**
 * Inflate in 256 KiB pieces (one thread-pool round trip each; zlib's default 16 KiB made
 * inflating 2.5× slower) and let it run up to 8 MiB ahead of the entries being written, so
 * that inflating (in the thread pool) overlaps the file system calls (on the main thread).
 */
const INFLATE_OPTS: zlib.ZlibOptions & { highWaterMark: number } = { chunkSize: 256 << 10, highWaterMark: 8 << 20 };

const WH_PREFIX = '.wh.';
const WH_OPAQUE = '.wh..wh..opq';
const isRoot = process.getuid?.() === 0;
/** The process umask (read once; setting it to read it would race with the thread pool). */
const UMASK = process.umask();
/** Whether an entry owned by uid:gid needs a chown (files Berth creates as root are root's already). */
const EGID = process.getegid?.();
const needsChown = (h: tar.Header) => isRoot && ((h.uid ?? 0) !== 0 || (h.gid ?? 0) !== 0 || EGID !== 0);

/** Split a tar entry name into components; refuses absolute paths and "..". [] = the root itself. */
function components(name: string, layer: string, what = 'path'): string[] {
  if (name.includes('\0')) throw new HostileLayerError(layer, name, `has a NUL byte in its ${what}`);
  if (name.startsWith('/')) throw new HostileLayerError(layer, name, `has an absolute ${what}; layer entries must be relative to the image root`);
  const parts = name.split('/').filter((p) => p !== '' && p !== '.');
  if (parts.includes('..')) throw new HostileLayerError(layer, name, `has ".." in its ${what}, which could reach outside the image root`);
  return parts;
}

function zstdDecompress(layer: string): Transform {
  const make = (zlib as unknown as { createZstdDecompress?: () => Transform }).createZstdDecompress;
  if (!make) throw failedPrecondition(`layer ${layer} is zstd-compressed, which needs Node.js 22.15 or newer for berthd; re-push the image with gzip layers or upgrade Node.js`);
  return make();
}

interface OpenFile {
  fd: number;
  h: tar.Header;
  abs: string;
  mode: number;
  /** Created with its final mode (no fchmod needed). */
  direct: boolean;
}

class LayerApplier {
  /** Relative paths written by this layer, and their ancestors (kept by whiteouts and opaque dirs). */
  private readonly added = new Set<string>();
  /** Relative directories known to be real directories (cleared whenever something is removed). */
  private knownDirs = new Set<string>(['']);
  private readonly dirTimes: [string, Date][] = [];
  readonly stats: UnpackStats = { entries: 0, xattrsSkipped: 0 };

  constructor(
    private readonly root: string,
    private readonly layer: string,
  ) {}

  private abs(rel: string): string {
    return rel === '' ? this.root : path.join(this.root, rel);
  }

  private markAdded(rel: string): void {
    for (let r = rel; r !== '' && !this.added.has(r); r = path.posix.dirname(r) === '.' ? '' : path.posix.dirname(r)) this.added.add(r);
  }

  /**
   * Make sure every component of `parts` is a real directory (creating missing ones, 0755),
   * never going through a symlink. Returns the relative path, or undefined when `create` is
   * false and something is missing.
   */
  private async dirs(parts: string[], entry: string, create: boolean): Promise<string | undefined> {
    let rel = '';
    for (const p of parts) {
      rel = rel === '' ? p : `${rel}/${p}`;
      if (this.knownDirs.has(rel)) continue;
      let st;
      try {
        st = fs.lstatSync(this.abs(rel));
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
        if (!create) return undefined;
        fs.mkdirSync(this.abs(rel), 0o755);
        this.knownDirs.add(rel);
        continue;
      }
      if (st.isSymbolicLink()) throw new HostileLayerError(this.layer, entry, `goes through the symlink "${rel}"; Berth never writes through symlinks (it could write outside the image)`);
      if (!st.isDirectory()) throw new HostileLayerError(this.layer, entry, `needs "${rel}" to be a directory, but it is a file`);
      this.knownDirs.add(rel);
    }
    return rel;
  }

  /** Remove what lower layers put at `rel`, keeping what this layer added. */
  private async removeLower(rel: string): Promise<void> {
    this.knownDirs = new Set(['']);
    const abs = this.abs(rel);
    if (!this.added.has(rel)) {
      fs.rmSync(abs, { recursive: true, force: true }); // does not follow symlinks
      return;
    }
    let st;
    try {
      st = fs.lstatSync(abs);
    } catch {
      return;
    }
    if (!st.isDirectory()) return;
    for (const name of fs.readdirSync(abs)) await this.removeLower(rel === '' ? name : `${rel}/${name}`);
  }

  /** Remove whatever is at `rel` (a file, symlink or tree) so a new entry can take its place. */
  private async clear(rel: string, keepDir: boolean): Promise<void> {
    let st;
    try {
      st = fs.lstatSync(this.abs(rel));
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return;
      throw e;
    }
    if (st.isDirectory()) {
      if (keepDir) return;
      this.knownDirs = new Set(['']);
      fs.rmSync(this.abs(rel), { recursive: true, force: true });
    } else {
      fs.unlinkSync(this.abs(rel));
    }
  }

  private async owner(abs: string, h: tar.Header): Promise<void> {
    if (!isRoot) return; // only root can give files away; keep the caller's ownership otherwise
    fs.lchownSync(abs, h.uid ?? 0, h.gid ?? 0);
  }

  private async xattrs(abs: string, h: tar.Header): Promise<void> {
    const pax = (h as { pax?: Record<string, string> }).pax;
    if (!pax) return;
    for (const [k, v] of Object.entries(pax)) {
      if (!k.startsWith('SCHILY.xattr.')) continue;
      const name = k.slice('SCHILY.xattr.'.length);
      // tar-stream decodes PAX values as UTF-8: a binary value (e.g. security.capability) that
      // is not valid UTF-8 comes back with U+FFFD and cannot be restored exactly; skip it.
      if (v.includes('\uFFFD') || !/^(user|trusted|security)\.[\w.-]+$/.test(name)) {
        this.stats.xattrsSkipped++;
        continue;
      }
      try {
        await execFileP('setfattr', ['-h', '-n', name, '-v', `0x${Buffer.from(v, 'utf8').toString('hex')}`, '--', abs], { timeout: 10_000 });
      } catch {
        this.stats.xattrsSkipped++; // no setfattr, or a filesystem without xattr support
      }
    }
  }

  /** Apply one entry; a regular file is returned open, for write() and close() with its bytes. */
  async apply(h: tar.Header): Promise<OpenFile | undefined> {
    const name = h.name;
    this.stats.entries++;
    const parts = components(name, this.layer);
    const type = h.type ?? 'file';
    if (type === 'character-device' || type === 'block-device') {
      throw new HostileLayerError(this.layer, name, 'is a device node; images may not create devices (the runtime provides /dev)');
    }
    if (parts.length === 0) {
      // The root directory's own entry ("./"): its mode and owner.
      if (type !== 'directory') throw new HostileLayerError(this.layer, name, 'replaces the image root with something that is not a directory');
      fs.chmodSync(this.root, (h.mode ?? 0o755) & 0o7777);
      await this.owner(this.root, h);
      return undefined;
    }
    const base = parts[parts.length - 1]!;
    const parentParts = parts.slice(0, -1);
    if (base.startsWith(WH_PREFIX)) {
      const parent = await this.dirs(parentParts, name, base === WH_OPAQUE);
      if (parent === undefined) return undefined; // nothing below to hide
      if (base === WH_OPAQUE) {
        this.markAdded(parent);
        for (const child of fs.readdirSync(this.abs(parent))) await this.removeLower(parent === '' ? child : `${parent}/${child}`);
      } else {
        const hidden = base.slice(WH_PREFIX.length);
        if (hidden === '' || hidden === '.' || hidden === '..') throw new HostileLayerError(this.layer, name, 'is a whiteout that names no file');
        await this.removeLower(parent === '' ? hidden : `${parent}/${hidden}`);
      }
      return undefined;
    }
    const parent = (await this.dirs(parentParts, name, true))!;
    const rel = parent === '' ? base : `${parent}/${base}`;
    const abs = this.abs(rel);
    const mode = (h.mode ?? 0o644) & 0o7777;
    switch (type) {
      case 'directory': {
        const direct = (mode & 0o7000) === 0 && (mode & UMASK) === 0;
        let created = true;
        try {
          fs.mkdirSync(abs, direct ? mode : 0o755);
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
          created = false;
          await this.clear(rel, true); // keeps a directory, removes a file or symlink
          if (!fs.lstatSync(abs, { throwIfNoEntry: false })) fs.mkdirSync(abs, 0o755);
        }
        this.knownDirs.add(rel);
        if (needsChown(h) || !created) await this.owner(abs, h);
        if (!direct || !created || needsChown(h)) fs.chmodSync(abs, mode);
        await this.xattrs(abs, h);
        if (h.mtime) this.dirTimes.push([abs, h.mtime]);
        break;
      }
      case 'file':
      case 'contiguous-file': {
        // Created with its final permission bits when the umask keeps them (most files), so
        // that only special modes need an fchmod; owned by root already when root unpacks.
        const flags = fsc.O_WRONLY | fsc.O_CREAT | fsc.O_EXCL | fsc.O_NOFOLLOW;
        const direct = (mode & 0o7000) === 0 && (mode & UMASK) === 0;
        let fd: number;
        try {
          fd = fs.openSync(abs, flags, direct ? mode : 0o600);
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
          await this.clear(rel, false); // an entry of a lower layer (or an earlier one of this layer)
          fd = fs.openSync(abs, flags, direct ? mode : 0o600);
        }
        this.markAdded(rel);
        return { fd, h, abs, mode, direct };
      }
      case 'symlink': {
        const target = h.linkname ?? '';
        if (target === '' || target.includes('\0')) throw new HostileLayerError(this.layer, name, 'is a symlink with an empty or invalid target');
        if (!target.startsWith('/')) {
          let depth = parentParts.length;
          for (const c of target.split('/')) {
            if (c === '..') depth--;
            else if (c !== '' && c !== '.') depth++;
            if (depth < 0) throw new HostileLayerError(this.layer, name, `is a symlink to "${target.slice(0, 200)}", which points out of the image root`);
          }
        }
        try {
          fs.symlinkSync(target, abs);
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
          await this.clear(rel, false);
          fs.symlinkSync(target, abs);
        }
        if (needsChown(h)) await this.owner(abs, h);
        if (h.mtime) lutimesQuiet(abs, h.mtime);
        break;
      }
      case 'link': {
        const targetParts = components(h.linkname ?? '', this.layer, 'hardlink target');
        if (targetParts.length === 0) throw new HostileLayerError(this.layer, name, 'is a hardlink to the image root');
        const tParent = await this.dirs(targetParts.slice(0, -1), name, false);
        const tRel = tParent === undefined ? undefined : tParent === '' ? targetParts.at(-1)! : `${tParent}/${targetParts.at(-1)!}`;
        const tStat = tRel === undefined ? undefined : fs.lstatSync(this.abs(tRel), { throwIfNoEntry: false });
        if (!tStat) throw new HostileLayerError(this.layer, name, `is a hardlink to "${(h.linkname ?? '').slice(0, 200)}", which is not in the image (hardlinks must point to files inside it)`);
        if (tStat.isDirectory()) throw new HostileLayerError(this.layer, name, 'is a hardlink to a directory');
        if (tRel === rel) break;
        await this.clear(rel, false);
        fs.linkSync(this.abs(tRel!), abs); // link(2) does not follow a symlink target
        break;
      }
      case 'fifo': {
        await this.clear(rel, false);
        await execFileP('mkfifo', ['-m', (mode & 0o777).toString(8), '--', abs]);
        await this.owner(abs, h);
        break;
      }
      default:
        throw new HostileLayerError(this.layer, name, `has tar type "${type}", which an image layer may not contain`);
    }
    this.markAdded(rel);
    return undefined;
  }

  write(f: OpenFile, b: Uint8Array): void {
    for (let off = 0; off < b.length; ) off += fs.writeSync(f.fd, b, off);
  }

  /** Owner, mode and times of a file whose bytes are written, then its xattrs. */
  async close(f: OpenFile): Promise<void> {
    try {
      const chown = needsChown(f.h);
      if (chown) fs.fchownSync(f.fd, f.h.uid ?? 0, f.h.gid ?? 0);
      if (!f.direct || chown) fs.fchmodSync(f.fd, f.mode); // after chown, which clears set-id bits
      if (f.h.mtime) fs.futimesSync(f.fd, f.h.mtime, f.h.mtime);
    } finally {
      fs.closeSync(f.fd);
    }
    await this.xattrs(f.abs, f.h);
  }

  async finish(): Promise<void> {
    // Directory times last: creating entries inside a directory changes its mtime.
    for (const [abs, t] of this.dirTimes.reverse()) {
      try {
        fs.utimesSync(abs, t, t);
      } catch {
        /* removed by a later whiteout */
      }
    }
  }
}

function lutimesQuiet(abs: string, t: Date): void {
  try {
    fs.lutimesSync(abs, t, t);
  } catch {
    /* not supported for symlinks here */
  }
}

/**
 * Where parsed entries go: to a LayerApplier in this thread, or in a worker thread. entry()
 * starts an entry (ending the one before), data() carries a file's bytes, finish() ends the layer.
 */
interface EntrySink {
  entry(h: tar.Header): Promise<void>;
  data(b: Uint8Array): void | Promise<void>;
  finish(): Promise<UnpackStats>;
  /** After a failure: close what is open, stop the worker. */
  abort(): Promise<void>;
}

/** Applies the entries in this thread. */
class InlineSink implements EntrySink {
  private readonly applier: LayerApplier;
  private file: OpenFile | undefined;

  constructor(root: string, layer: string) {
    this.applier = new LayerApplier(root, layer);
  }

  private async endFile(): Promise<void> {
    const f = this.file;
    this.file = undefined;
    if (f) await this.applier.close(f);
  }

  async entry(h: tar.Header): Promise<void> {
    await this.endFile();
    this.file = await this.applier.apply(h);
  }

  data(b: Uint8Array): void {
    if (this.file) this.applier.write(this.file, b); // bytes of a directory or link entry are ignored
  }

  async finish(): Promise<UnpackStats> {
    await this.endFile();
    await this.applier.finish();
    return this.applier.stats;
  }

  async abort(): Promise<void> {
    if (this.file) fs.closeSync(this.file.fd);
    this.file = undefined;
  }
}

/** Batches travelling to the worker: entry headers and [offset, length] of file bytes in `buf`. */
interface Batch {
  ops: (tar.Header | [number, number])[];
  buf: Uint8Array;
}
type WireError = { hostile: [string, string, string] } | { berth: [BerthError['code'], string, Record<string, unknown> | undefined] } | { message: string; code?: string };
/** ack: a batch is applied; its buffer comes back for the next one. */
type FromWorker = { ack: Uint8Array } | { done: UnpackStats } | { error: WireError };

const BATCH_BYTES = 1 << 20;
/** Compressed layers from this size on are applied in a worker thread. */
const WORKER_MIN_BYTES = 4 << 20;
/** Batches sent but not yet applied (bounds the memory between the two threads). */
const MAX_INFLIGHT = 8;

function toWire(e: unknown): WireError {
  if (e instanceof HostileLayerError) return { hostile: [e.layer, e.entry, e.why] };
  if (e instanceof BerthError) return { berth: [e.code, e.message, e.details] };
  const code = (e as NodeJS.ErrnoException)?.code;
  return { message: (e as Error)?.message ?? String(e), ...(code ? { code } : {}) };
}

function fromWire(w: WireError): Error {
  if ('hostile' in w) return new HostileLayerError(...w.hostile);
  if ('berth' in w) return new BerthError(...w.berth);
  return Object.assign(new Error(w.message), w.code ? { code: w.code } : {});
}

/**
 * Applies the entries in a worker thread (unpack-worker.ts running serveLayerWorker), so that
 * the file system calls there overlap inflating, hashing and tar parsing here: on a big layer
 * the two take about as long as each other.
 */
class WorkerSink implements EntrySink {
  private readonly worker: Worker;
  private batch: Batch = { ops: [], buf: new Uint8Array(BATCH_BYTES) };
  private used = 0;
  private inflight = 0;
  /** Batch buffers the worker gave back (reused: fresh ones cost page faults). */
  private readonly free: Uint8Array[] = [];
  private failure: Error | undefined;
  private wake: (() => void) | undefined;
  private done: ((s: UnpackStats) => void) | undefined;

  constructor(root: string, layer: string) {
    this.worker = new Worker(new URL('./unpack-worker.js', import.meta.url), { workerData: { root, layer } });
    this.worker.on('message', (m: FromWorker) => {
      if ('ack' in m) {
        this.inflight--;
        this.free.push(m.ack);
      }
      else if ('error' in m) this.failure ??= fromWire(m.error);
      else this.done?.(m.done);
      this.wake?.();
    });
    this.worker.on('error', (e) => {
      this.failure ??= e;
      this.wake?.();
    });
    this.worker.on('exit', () => {
      this.failure ??= new Error('the unpack worker thread exited');
      this.wake?.();
    });
  }

  private async flush(): Promise<void> {
    if (!this.batch.ops.length) return;
    const { ops, buf } = this.batch;
    this.worker.postMessage({ ops, buf }, [buf.buffer as ArrayBuffer]);
    this.inflight++;
    this.batch = { ops: [], buf: this.free.pop() ?? new Uint8Array(BATCH_BYTES) };
    this.used = 0;
    while (this.inflight >= MAX_INFLIGHT && !this.failure) await new Promise<void>((r) => (this.wake = r));
    if (this.failure) throw this.failure;
  }

  async entry(h: tar.Header): Promise<void> {
    if (this.failure) throw this.failure;
    this.batch.ops.push(h);
    if (this.batch.ops.length >= 4096) await this.flush();
  }

  async data(b: Uint8Array): Promise<void> {
    for (let off = 0; off < b.length; ) {
      if (this.used === BATCH_BYTES) await this.flush();
      const n = Math.min(b.length - off, BATCH_BYTES - this.used);
      this.batch.buf.set(b.subarray(off, off + n), this.used);
      this.batch.ops.push([this.used, n]);
      this.used += n;
      off += n;
    }
  }

  async finish(): Promise<UnpackStats> {
    await this.flush();
    const done = new Promise<UnpackStats>((resolve) => (this.done = resolve));
    this.worker.postMessage('end');
    while (!this.failure) {
      const r = await Promise.race([done, new Promise<void>((w) => (this.wake = w))]);
      if (r) {
        await this.worker.terminate();
        return r;
      }
    }
    await this.worker.terminate();
    throw this.failure;
  }

  async abort(): Promise<void> {
    await this.worker.terminate();
  }
}

/** The worker thread's side of WorkerSink: applies batches in order, acknowledging each. */
export function serveLayerWorker(port: MessagePort, data: { root: string; layer: string }): void {
  const sink = new InlineSink(data.root, data.layer);
  let failed = false;
  let queue = Promise.resolve();
  const fail = async (e: unknown) => {
    failed = true;
    await sink.abort();
    port.postMessage({ error: toWire(e) } satisfies FromWorker);
  };
  port.on('message', (m: Batch | 'end') => {
    queue = queue.then(async () => {
      if (failed) return;
      try {
        if (m === 'end') {
          port.postMessage({ done: await sink.finish() } satisfies FromWorker);
          return;
        }
        for (const op of m.ops) {
          if (Array.isArray(op)) sink.data(m.buf.subarray(op[0], op[0] + op[1]));
          else await sink.entry(op);
        }
        port.postMessage({ ack: m.buf } satisfies FromWorker, [m.buf.buffer as ArrayBuffer]);
      } catch (e) {
        await fail(e);
      }
    });
  });
}

/**
 * Apply one layer on top of the tree at `root` (which Berth owns and nobody else writes): this
 * thread inflates (in the thread pool), hashes and parses the tar; the entries are applied here
 * or, for big layers, in a worker thread.
 */
export async function applyLayer(root: string, layer: LayerInput): Promise<UnpackStats> {
  const sink: EntrySink = layer.worker ? new WorkerSink(root, layer.name) : new InlineSink(root, layer.name);
  const hash = createHash('sha256');
  const hasher = new Transform({
    transform(chunk: Buffer, _enc, cb) {
      hash.update(chunk);
      cb(null, chunk);
    },
  });
  const extract = tar.extract();
  const stages: NodeJS.ReadWriteStream[] = [];
  if (layer.compression === 'gzip') stages.push(zlib.createGunzip(INFLATE_OPTS));
  else if (layer.compression === 'zstd') stages.push(zstdDecompress(layer.name));
  const piped = pipeline([layer.stream, ...stages, hasher, extract as unknown as NodeJS.WritableStream]);
  let pipeError: unknown;
  piped.catch((e) => (pipeError ??= e));
  let stats: UnpackStats;
  try {
    for await (const entry of extract) {
      await sink.entry(entry.header);
      for await (const chunk of entry) await sink.data(chunk as Buffer);
    }
    await piped;
    stats = await sink.finish();
  } catch (e) {
    await sink.abort();
    extract.destroy();
    layer.stream.destroy();
    await piped.catch(() => undefined);
    if (e instanceof BerthError) throw e;
    const cause = pipeError ?? e;
    throw invalidArgument(`layer ${layer.name} is not a valid ${layer.compression === 'none' ? '' : `${layer.compression}-compressed `}tar archive (${(cause as Error).message}); the image cannot be unpacked`);
  }
  const diffId = `sha256:${hash.digest('hex')}`;
  if (layer.diffId !== undefined && diffId !== layer.diffId) {
    throw invalidArgument(`layer ${layer.name}: its uncompressed content hashes to ${diffId} but the image config declares ${layer.diffId}; the image is corrupted or tampered with`);
  }
  return stats;
}

/**
 * The layers of a pull in progress, for the unpack that runs alongside it (ImageService.pull):
 * the layer that unpack waits for is streamed to it while it downloads (next to the store's
 * write, see LayerTee), and a layer whose download began earlier (or that was already stored)
 * is read from the store once it is stored. Layers are applied in order, so one is streamed at
 * a time.
 */
export class LayerFeed {
  private wanted: { digest: string; give: (s: Readable) => void } | undefined;
  private readonly given: PassThrough[] = [];
  private closed = false;
  private readonly storedWaits = new Map<string, { promise: Promise<void>; resolve: () => void; reject: (e: unknown) => void }>();
  private failure: unknown;

  constructor(private readonly store: ImageStore) {}

  private storedWait(digest: string) {
    let w = this.storedWaits.get(digest);
    if (!w) {
      let resolve!: () => void;
      let reject!: (e: unknown) => void;
      const promise = new Promise<void>((res, rej) => ((resolve = res), (reject = rej)));
      promise.catch(() => undefined);
      w = { promise, resolve, reject };
      if (this.failure !== undefined) reject(this.failure);
      this.storedWaits.set(digest, w);
    }
    return w;
  }

  /** The pull stored (verified) this layer blob, or found it stored. */
  stored(digest: string): void {
    this.storedWait(digest).resolve();
  }

  /** The pull failed: whatever waits fails with it. */
  fail(e: unknown): void {
    this.failure ??= e;
    for (const w of this.storedWaits.values()) w.reject(e);
  }

  /** LayerTee.open: a stream for the layer the unpack is waiting for, if this is it. */
  open(d: Descriptor): Writable | undefined {
    if (this.closed || this.wanted?.digest !== d.digest) return undefined;
    const s = new PassThrough({ highWaterMark: 4 << 20 });
    s.on('error', () => undefined); // the unpack reading it sees the error through its pipeline
    this.given.push(s);
    this.wanted.give(s);
    this.wanted = undefined;
    return s;
  }

  /**
   * The unpack is over (done or failed): no more streams, and those it did not read to the end
   * are destroyed, so that their downloads never wait on a reader that is gone.
   */
  close(): void {
    this.closed = true;
    this.wanted = undefined;
    for (const s of this.given) s.destroy();
  }

  /** Layer `d`'s compressed bytes: streamed from its download, or from the store. */
  async source(d: Descriptor): Promise<Readable> {
    const stored = this.storedWait(d.digest).promise;
    const streamed = new Promise<Readable>((give) => (this.wanted = { digest: d.digest, give }));
    const first = await Promise.race([streamed, stored.then(() => undefined)]);
    if (first) return first;
    if (this.wanted?.digest === d.digest) this.wanted = undefined;
    return this.store.openBlob(d.digest);
  }
}

export interface UnpackedImage {
  manifestDigest: string;
  rootfs: string;
  manifest: Manifest;
  config: ImageConfigDoc;
}

/**
 * The per-image rootfs cache: <dir>/<manifest hex>, unpacked once from the store's blobs,
 * shared by every workload of the image.
 */
export class RootfsCache {
  private readonly inflight = new Map<string, Promise<string>>();

  constructor(
    readonly dir: string,
    private readonly store: ImageStore,
  ) {}

  pathFor(manifestDigest: string): string {
    return path.join(this.dir, manifestDigest.slice('sha256:'.length));
  }

  async load(manifestDigest: string): Promise<{ manifest: Manifest; config: ImageConfigDoc }> {
    const parsed = parseManifest(await this.store.readBlob(manifestDigest), undefined, `manifest ${manifestDigest}`);
    if (parsed.kind !== 'manifest') throw invalidArgument(`${manifestDigest} is an image index, not an image; pull a reference to one platform`);
    const config = parseConfig(await this.store.readBlob(parsed.doc.config.digest), `config of ${manifestDigest}`);
    if (config.rootfs.diff_ids.length !== parsed.doc.layers.length) {
      throw invalidArgument(`image ${manifestDigest} is inconsistent: its manifest lists ${parsed.doc.layers.length} layers but its config ${config.rootfs.diff_ids.length}`);
    }
    return { manifest: parsed.doc, config };
  }

  /** The rootfs of the image, unpacking it first if needed (once, even with concurrent callers). */
  async ensure(manifestDigest: string): Promise<UnpackedImage> {
    const { manifest, config } = await this.load(manifestDigest);
    return { manifestDigest, rootfs: await this.once(manifestDigest, manifest, config), manifest, config };
  }

  /**
   * Unpack an image while it is being pulled: each layer's bytes come from `feed` (streamed as
   * they download, or read from the store), and the tree is renamed into place only once
   * `verified` resolves (every blob stored under its verified digest); before that nothing can
   * use it, and if `verified` rejects it is removed.
   */
  ensureWhilePulling(manifestDigest: string, manifest: Manifest, config: ImageConfigDoc, feed: LayerFeed, verified: Promise<unknown>): Promise<string> {
    return this.once(manifestDigest, manifest, config, { feed, verified });
  }

  private once(manifestDigest: string, manifest: Manifest, config: ImageConfigDoc, from?: { feed: LayerFeed; verified: Promise<unknown> }): Promise<string> {
    let p = this.inflight.get(manifestDigest);
    if (!p) {
      p = this.unpack(manifestDigest, manifest, config, this.pathFor(manifestDigest), from);
      this.inflight.set(manifestDigest, p);
      p.finally(() => this.inflight.delete(manifestDigest)).catch(() => undefined);
    }
    return p;
  }

  private async unpack(manifestDigest: string, manifest: Manifest, config: ImageConfigDoc, final: string, from?: { feed: LayerFeed; verified: Promise<unknown> }): Promise<string> {
    if (!from) return this.unpackOnce(manifestDigest, manifest, config, final);
    // Asked for before the first await, i.e. before the pull starts downloading it: streamed.
    const first = manifest.layers[0] ? from.feed.source(manifest.layers[0]) : undefined;
    first?.catch(() => undefined);
    try {
      return await this.unpackOnce(manifestDigest, manifest, config, final, { ...from, first });
    } finally {
      from.feed.close();
    }
  }

  private async unpackOnce(manifestDigest: string, manifest: Manifest, config: ImageConfigDoc, final: string, from?: { feed: LayerFeed; verified: Promise<unknown>; first: Promise<Readable> | undefined }): Promise<string> {
    try {
      if ((await fsp.lstat(final)).isDirectory()) return final;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
    }
    await fsp.mkdir(this.dir, { recursive: true, mode: 0o700 });
    const lease = this.store.lease([manifestDigest, manifest.config.digest, ...manifest.layers.map((l) => l.digest)]);
    const tmp = path.join(this.dir, `.tmp-${manifestDigest.slice(7, 19)}-${process.pid}-${randomBytes(6).toString('hex')}`);
    try {
      for (const l of from ? [] : manifest.layers) {
        if (!(await this.store.hasBlob(l.digest))) throw failedPrecondition(`layer ${l.digest} of image ${manifestDigest} is missing from the image store; pull the image again`);
      }
      await fsp.mkdir(tmp, 0o755);
      await fsp.chmod(tmp, 0o755);
      for (const [i, l] of manifest.layers.entries()) {
        const compression = layerCompression(l.mediaType);
        if (!compression) throw invalidArgument(`layer ${l.digest} of image ${manifestDigest} has media type "${l.mediaType.slice(0, 100)}", which is not a layer Berth can unpack (tar, tar+gzip, tar+zstd)`);
        const stream = !from ? this.store.openBlob(l.digest) : i === 0 && from.first ? await from.first : await from.feed.source(l);
        await applyLayer(tmp, { stream, compression, diffId: config.rootfs.diff_ids[i]!, name: l.digest, worker: l.size >= WORKER_MIN_BYTES });
      }
      if (from) await from.verified;
      try {
        await fsp.rename(tmp, final);
      } catch (e) {
        const code = (e as NodeJS.ErrnoException).code;
        if (code !== 'EEXIST' && code !== 'ENOTEMPTY') throw e;
        // another process unpacked it first: use theirs
      }
      return final;
    } finally {
      lease.release();
      await fsp.rm(tmp, { recursive: true, force: true });
    }
  }

  /** Remove unpacked trees whose manifest is not in `live`, and temporary trees left by crashes. */
  async prune(live: Set<string>): Promise<string[]> {
    const removed: string[] = [];
    let names: string[];
    try {
      names = await fsp.readdir(this.dir);
    } catch {
      return removed;
    }
    for (const n of names) {
      const p = path.join(this.dir, n);
      if (n.startsWith('.tmp-')) {
        const pid = Number(n.split('-')[2]);
        if (pid === process.pid) continue; // ours, in progress
        await fsp.rm(p, { recursive: true, force: true });
        continue;
      }
      const d = `sha256:${n}`;
      if (live.has(d) || this.inflight.has(d)) continue;
      await fsp.rm(p, { recursive: true, force: true });
      removed.push(d);
    }
    return removed;
  }
}
