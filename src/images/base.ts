// Base images made on this host, without any registry: a slim Debian (mmdebstrap, minbase, from
// the Debian mirror the host's APT is configured with, and no other host; docs, man pages and
// locales left out with dpkg path-excludes) optionally with extra packages, and a busybox micro
// image (the host's busybox-static, the tree of the built-in image). Both become ordinary OCI
// images in the store: one gzip layer made with GNU tar from the tree, an OCI config, a manifest.
//
// Debian builds are cached by (suite, packages, mirror lines): the same request returns the
// stored image. Work happens in <imagesDir>/base/.tmp-<pid>-*, which Berth owns: mounts under it
// (mmdebstrap mounts /proc and /sys in root mode) are unmounted before it is removed, and trees
// left by a crashed daemon are cleaned on the next build.
import { spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, promises as fsp, readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import zlib from 'node:zlib';
import { failedPrecondition, invalidArgument } from '../core/errors.js';
import { pidAlive, run } from '../lib/exec.js';
import { mountPointsUnder } from '../lib/host.js';
import { ensureBusyboxImage } from './busybox.js';
import { MT, hostPlatform } from './oci.js';
import type { ImageStore } from './store.js';

export interface MirrorLine {
  uri: string;
  suite: string;
  components: string[];
}

export interface ImageConfigInput {
  Env?: string[];
  Cmd?: string[];
  Entrypoint?: string[];
  WorkingDir?: string;
  User?: string;
  Labels?: Record<string, string>;
}

const PATH_ENV = 'PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';
const PKG_RE = /^[a-z0-9][a-z0-9+.-]{0,99}$/;
const SUITE_RE = /^[a-z][a-z0-9-]{1,30}$/;

/**
 * The deb sources of the host's APT for `suite` and its -updates/-security suites, from
 * /etc/apt/sources.list (one-line format) and sources.list.d (*.list and deb822 *.sources).
 */
export function hostMirrors(suite: string, aptDir = '/etc/apt'): MirrorLine[] {
  const out: MirrorLine[] = [];
  const wanted = (s: string) => s === suite || s === `${suite}-updates` || s === `${suite}-security`;
  const oneLine = (text: string) => {
    for (const raw of text.split('\n')) {
      const l = raw.replace(/#.*/, '').trim();
      const m = /^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s+(.+)$/.exec(l);
      if (m && wanted(m[2]!)) out.push({ uri: m[1]!, suite: m[2]!, components: m[3]!.split(/\s+/) });
    }
  };
  const deb822 = (text: string) => {
    for (const para of text.split(/\n\s*\n/)) {
      const f: Record<string, string> = {};
      let key = '';
      for (const raw of para.split('\n')) {
        if (raw.startsWith('#')) continue;
        if (/^\s/.test(raw) && key) f[key] += ` ${raw.trim()}`;
        else {
          const i = raw.indexOf(':');
          if (i > 0) f[(key = raw.slice(0, i).trim().toLowerCase())] = raw.slice(i + 1).trim();
        }
      }
      if (!f.types?.split(/\s+/).includes('deb') || f.enabled === 'no' || !f.uris || !f.suites) continue;
      for (const uri of f.uris.split(/\s+/)) for (const s of f.suites.split(/\s+/)) if (wanted(s)) out.push({ uri, suite: s, components: (f.components ?? 'main').split(/\s+/) });
    }
  };
  const read = (p: string) => {
    try {
      return readFileSync(p, 'utf8');
    } catch {
      return '';
    }
  };
  oneLine(read(path.join(aptDir, 'sources.list')));
  const d = path.join(aptDir, 'sources.list.d');
  const names = existsSync(d) ? readdirSync(d).sort() : [];
  for (const n of names) {
    if (n.endsWith('.list')) oneLine(read(path.join(d, n)));
    else if (n.endsWith('.sources')) deb822(read(path.join(d, n)));
  }
  return out;
}

/**
 * One gzip layer from a directory tree (GNU tar, numeric owners, xattrs, sorted names), an OCI
 * config and manifest, all put in the store. Returns the manifest digest.
 */
export async function imageFromTree(store: ImageStore, dir: string, cfg: ImageConfigInput, opts: { exclude?: string[]; createdBy: string; lease?: { add(d: string): void } }): Promise<string> {
  const tar = spawn('tar', ['--numeric-owner', '--sort=name', '--xattrs', '--xattrs-include=*', ...(opts.exclude ?? []).map((e) => `--exclude=${e}`), '-C', dir, '-cf', '-', '.'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  tar.stderr.setEncoding('utf8').on('data', (s: string) => (stderr = (stderr + s).slice(-2000)));
  const exited = new Promise<number | null>((resolve) => tar.on('close', resolve));
  const hash = createHash('sha256');
  const hasher = new Transform({
    transform(chunk: Buffer, _e, cb) {
      hash.update(chunk);
      cb(null, chunk);
    },
  });
  const gzip = zlib.createGzip({ level: 6 });
  const [layer] = await Promise.all([store.putStream(gzip as unknown as AsyncIterable<Uint8Array>, { what: `layer of ${dir}` }), pipeline(tar.stdout, hasher, gzip)]);
  const code = await exited;
  if (code !== 0) throw failedPrecondition(`tar of ${dir} failed (exit ${code}): ${stderr.trim()}`);
  opts.lease?.add(layer.digest);
  const created = new Date().toISOString();
  const config = Buffer.from(
    JSON.stringify({
      created,
      architecture: hostPlatform().architecture,
      os: 'linux',
      config: cfg,
      rootfs: { type: 'layers', diff_ids: [`sha256:${hash.digest('hex')}`] },
      history: [{ created, created_by: opts.createdBy }],
    }),
  );
  const configDigest = await store.putBytes(config);
  opts.lease?.add(configDigest);
  const manifest = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: MT.ociManifest, config: { mediaType: MT.ociConfig, digest: configDigest, size: config.length }, layers: [{ mediaType: MT.ociLayerGzip, digest: layer.digest, size: layer.size }] }));
  const digest = await store.putBytes(manifest);
  opts.lease?.add(digest);
  return digest;
}

export interface DebianRequest {
  suite: string;
  include: string[];
  log: (line: string) => void;
  signal?: AbortSignal;
}

export function validateDebian(suite: string, include: string[]): void {
  if (!SUITE_RE.test(suite)) throw invalidArgument(`suite "${suite.slice(0, 40)}" is not a Debian suite name such as "bookworm"`);
  for (const p of include) if (!PKG_RE.test(p)) throw invalidArgument(`"${p.slice(0, 100)}" is not a Debian package name (lowercase letters, digits, "+", "-", ".")`);
}

const DPKG_EXCLUDES = [
  'path-exclude=/usr/share/man/*',
  'path-exclude=/usr/share/info/*',
  'path-exclude=/usr/share/doc/*',
  'path-include=/usr/share/doc/*/copyright',
  'path-exclude=/usr/share/locale/*',
  'path-include=/usr/share/locale/locale.alias',
  'path-exclude=/usr/share/lintian/*',
];

export class BaseImages {
  private readonly dir: string;
  private readonly cacheFile: string;

  constructor(
    private readonly imagesDir: string,
    private readonly store: ImageStore,
  ) {
    this.dir = path.join(imagesDir, 'base');
    this.cacheFile = path.join(this.dir, 'cache.json');
  }

  /** The cached image when its manifest, config and layers are all still stored. */
  private async cached(key: string): Promise<string | undefined> {
    const hit = this.readCache()[key];
    if (!hit || !(await this.store.hasBlob(hit))) return undefined;
    for (const d of await this.store.references(hit)) if (!(await this.store.hasBlob(d))) return undefined;
    return hit;
  }

  private readCache(): Record<string, string> {
    try {
      return JSON.parse(readFileSync(this.cacheFile, 'utf8')) as Record<string, string>;
    } catch {
      return {};
    }
  }

  private async writeCache(key: string, digest: string): Promise<void> {
    const all = { ...this.readCache(), [key]: digest };
    const tmp = `${this.cacheFile}.tmp-${process.pid}`;
    await fsp.writeFile(tmp, JSON.stringify(all));
    await fsp.rename(tmp, this.cacheFile);
  }

  /** Remove work trees of builds whose process is gone (crashes), unmounting what they left. */
  async cleanStale(): Promise<void> {
    let names: string[];
    try {
      names = await fsp.readdir(this.dir);
    } catch {
      return;
    }
    for (const n of names) {
      const m = /^\.tmp-(\d+)-/.exec(n);
      if (m && (Number(m[1]) !== process.pid || !pidAlive(Number(m[1])))) {
        if (Number(m[1]) === process.pid) continue;
        await this.removeTree(path.join(this.dir, n));
      }
    }
  }

  private async removeTree(p: string): Promise<void> {
    for (const mp of mountPointsUnder(p)) await run('umount', ['-l', mp]).catch(() => undefined);
    if (mountPointsUnder(p).length) throw failedPrecondition(`cannot unmount everything under ${p}; not removing it (remove the mounts by hand)`);
    await fsp.rm(p, { recursive: true, force: true });
  }

  /** A slim Debian image: the manifest digest, and whether it came from the cache. */
  async debian(req: DebianRequest): Promise<{ digest: string; cached: boolean }> {
    validateDebian(req.suite, req.include);
    const mirrors = hostMirrors(req.suite);
    if (!mirrors.length) throw failedPrecondition(`the host's APT has no deb source for suite "${req.suite}" (in /etc/apt/sources.list or sources.list.d); Berth only fetches packages from the mirror configured on the host`);
    const lines = mirrors.map((m) => `deb ${m.uri} ${m.suite} ${m.components.join(' ')}`);
    const include = [...new Set(req.include)].sort();
    const key = createHash('sha256').update(JSON.stringify({ suite: req.suite, include, lines })).digest('hex');
    const hit = await this.cached(key);
    if (hit) {
      req.log(`cached: suite ${req.suite}, packages [${include.join(', ')}], ${lines.length} source(s) → ${hit}`);
      return { digest: hit, cached: true };
    }
    if (!existsSync('/usr/bin/mmdebstrap')) throw failedPrecondition('mmdebstrap is not installed; `apt-get install mmdebstrap`');
    await fsp.mkdir(this.dir, { recursive: true, mode: 0o700 });
    await this.cleanStale();
    const work = path.join(this.dir, `.tmp-${process.pid}-${randomBytes(6).toString('hex')}`);
    const root = path.join(work, 'rootfs');
    await fsp.mkdir(work, { mode: 0o700 });
    const lease = this.store.lease();
    try {
      const args = [
        '--variant=minbase',
        '--mode=root',
        '--format=directory',
        '--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr',
        ...(include.length ? [`--include=${include.join(',')}`] : []),
        ...DPKG_EXCLUDES.map((o) => `--dpkgopt=${o}`),
        '--aptopt=Acquire::Languages "none"',
        '--customize-hook=rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/cache/apt/archives/*.deb "$1"/var/log/apt "$1"/var/log/dpkg.log',
        req.suite,
        root,
        ...lines,
      ];
      req.log(`mmdebstrap ${args.map((a) => (/\s/.test(a) ? JSON.stringify(a) : a)).join(' ')}`);
      await new Promise<void>((resolve, reject) => {
        const child = spawn('mmdebstrap', args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, LC_ALL: 'C.UTF-8' } });
        let tail = '';
        const onData = (s: string) => {
          tail = (tail + s).slice(-4000);
          for (const l of s.split('\n')) if (l.trim()) req.log(l);
        };
        child.stdout.setEncoding('utf8').on('data', onData);
        child.stderr.setEncoding('utf8').on('data', onData);
        const abort = () => child.kill('SIGTERM');
        req.signal?.addEventListener('abort', abort, { once: true });
        child.on('error', reject);
        child.on('close', (code) => {
          req.signal?.removeEventListener('abort', abort);
          if (code === 0) resolve();
          else reject(failedPrecondition(`mmdebstrap failed (exit ${code}); its last output: ${tail.trim().split('\n').slice(-5).join(' | ')}`));
        });
      });
      req.log('packing the tree into a layer');
      const digest = await imageFromTree(this.store, root, { Env: [PATH_ENV], Cmd: ['bash'] , Labels: { 'org.berth.base': `debian:${req.suite}`, ...(include.length ? { 'org.berth.base.include': include.join(',') } : {}) } }, {
        exclude: ['./dev/*', './proc/*', './sys/*', './run/*', './tmp/*'],
        createdBy: `mmdebstrap --variant=minbase ${include.length ? `--include=${include.join(',')} ` : ''}${req.suite}`,
        lease,
      });
      await this.writeCache(key, digest);
      return { digest, cached: false };
    } finally {
      lease.release();
      await this.removeTree(work);
    }
  }

  /** The busybox micro image (the built-in image's tree as an OCI image). */
  async busybox(log: (line: string) => void): Promise<{ digest: string; cached: boolean }> {
    const bb = await ensureBusyboxImage(this.imagesDir);
    const key = `busybox ${bb.digest}`;
    const hit = await this.cached(key);
    if (hit) return { digest: hit, cached: true };
    await fsp.mkdir(this.dir, { recursive: true, mode: 0o700 });
    log(`packing ${bb.rootfs}`);
    const digest = await imageFromTree(this.store, bb.rootfs, { Env: [PATH_ENV], Cmd: ['sh'], Labels: { 'org.berth.base': 'busybox' } }, { createdBy: 'berth image base busybox (busybox-static)' });
    await this.writeCache(key, digest);
    return { digest, cached: false };
  }
}
