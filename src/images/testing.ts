// Test helpers for the image layer (used by src/images/*.test.ts and test/): a real registry
// (Debian's docker-registry, distribution 2.8) on 127.0.0.1 with its own config and storage in a
// temporary directory, optionally behind htpasswd auth; a small programmable HTTP proxy in front
// of it (bearer-token auth, injected failures); and builders for layers and images.
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import net, { type AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import zlib from 'node:zlib';
import tar from 'tar-stream';
import { MT } from './oci.js';
import type { ImageStore } from './store.js';

export const REGISTRY_BIN = '/usr/bin/docker-registry';
export const HTPASSWD_BIN = '/usr/bin/htpasswd';
export const registrySkip = !existsSync(REGISTRY_BIN)
  ? 'docker-registry not installed (apt-get install docker-registry; scripts/setup.sh does it)'
  : !existsSync(HTPASSWD_BIN)
    ? 'htpasswd not installed (apt-get install apache2-utils)'
    : false;

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

export interface TestRegistry {
  /** "127.0.0.1:PORT" */
  host: string;
  dir: string;
  stop(): Promise<void>;
}

/** Start docker-registry on 127.0.0.1:<free port>, storage in a temp dir; with htpasswd when `auth`. */
export async function startRegistry(opts: { auth?: { username: string; password: string } } = {}): Promise<TestRegistry> {
  const dir = mkdtempSync(path.join(tmpdir(), 'berth-registry-'));
  for (let attempt = 0; ; attempt++) {
    const port = await freePort();
    const lines = [
      'version: 0.1',
      'log:',
      '  level: error',
      '  accesslog:',
      '    disabled: true',
      'storage:',
      '  filesystem:',
      `    rootdirectory: ${dir}/data`,
      '  delete:',
      '    enabled: true',
      'http:',
      `  addr: 127.0.0.1:${port}`,
    ];
    if (opts.auth) {
      const line = execFileSync(HTPASSWD_BIN, ['-Bbn', opts.auth.username, opts.auth.password], { encoding: 'utf8' }).trim();
      writeFileSync(path.join(dir, 'htpasswd'), `${line}\n`);
      lines.push('auth:', '  htpasswd:', '    realm: berth-test', `    path: ${dir}/htpasswd`);
    }
    writeFileSync(path.join(dir, 'config.yml'), `${lines.join('\n')}\n`);
    const proc: ChildProcess = spawn(REGISTRY_BIN, ['serve', path.join(dir, 'config.yml')], { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    proc.stderr!.on('data', (d: Buffer) => (stderr = (stderr + d.toString()).slice(-4000)));
    const stop = async () => {
      if (proc.exitCode === null && proc.signalCode === null) {
        const exited = new Promise((r) => proc.once('exit', r));
        proc.kill('SIGTERM'); // our own child, by its pid
        await exited;
      }
      rmSync(dir, { recursive: true, force: true });
    };
    const deadline = Date.now() + 15_000;
    for (;;) {
      if (proc.exitCode !== null) break;
      try {
        const res = await fetch(`http://127.0.0.1:${port}/v2/`);
        await res.body?.cancel();
        if (res.status === 200 || res.status === 401) return { host: `127.0.0.1:${port}`, dir, stop };
      } catch {
        /* not listening yet */
      }
      if (Date.now() > deadline) {
        await stop();
        throw new Error(`docker-registry did not start: ${stderr}`);
      }
      await new Promise((r) => setTimeout(r, 50));
    }
    if (attempt >= 3 || !/address already in use/.test(stderr)) {
      await stop();
      throw new Error(`docker-registry exited ${proc.exitCode}: ${stderr}`);
    }
  }
}

export interface TestProxy {
  host: string;
  /** Requests seen (method and path), for assertions. */
  seen: { method: string; path: string; authorization?: string }[];
  stop(): Promise<void>;
}

/**
 * An HTTP proxy on 127.0.0.1 in front of `upstream`. `intercept` may answer a request itself
 * (return true) or let it through (false); "reset" destroys the connection (ECONNRESET).
 */
export async function startProxy(upstream: string, intercept: (req: http.IncomingMessage, res: http.ServerResponse, proxyHost: string) => boolean | 'reset' | Promise<boolean | 'reset'>): Promise<TestProxy> {
  const seen: TestProxy['seen'] = [];
  let host = '';
  const server = http.createServer(async (req, res) => {
    seen.push({ method: req.method ?? '', path: req.url ?? '', ...(req.headers.authorization ? { authorization: req.headers.authorization } : {}) });
    const r = await intercept(req, res, host);
    if (r === 'reset') {
      req.socket.destroy();
      return;
    }
    if (r) return;
    const headers = { ...req.headers, host: upstream };
    delete headers.authorization;
    const up = http.request({ host: upstream.split(':')[0], port: Number(upstream.split(':')[1]), method: req.method, path: req.url, headers }, (ur) => {
      const h = { ...ur.headers };
      // Upload locations point at the upstream: rewrite them to the proxy.
      if (typeof h.location === 'string') h.location = h.location.replace(`//${upstream}`, `//${host}`);
      res.writeHead(ur.statusCode ?? 502, h);
      ur.pipe(res);
    });
    up.on('error', () => res.destroy());
    req.pipe(up);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  host = `127.0.0.1:${(server.address() as AddressInfo).port}`;
  return {
    host,
    seen,
    stop: () =>
      new Promise<void>((r) => {
        server.close(() => r());
        server.closeAllConnections();
      }),
  };
}

// ---- layers and images ----

export interface EntrySpec {
  name: string;
  type?: 'file' | 'directory' | 'symlink' | 'link' | 'character-device' | 'block-device' | 'fifo';
  content?: string | Buffer;
  linkname?: string;
  mode?: number;
  uid?: number;
  gid?: number;
  pax?: Record<string, string>;
}

/** An uncompressed tar from entry specs (in order). */
export async function makeTar(entries: EntrySpec[]): Promise<Buffer> {
  const pack = tar.pack();
  const chunks: Buffer[] = [];
  const done = new Promise<void>((resolve, reject) => {
    pack.on('data', (c) => void chunks.push(c as Buffer));
    pack.on('end', () => resolve());
    pack.on('error', reject);
  });
  for (const e of entries) {
    const type = e.type ?? 'file';
    const body = type === 'file' ? Buffer.from(e.content ?? '') : undefined;
    const header = {
      name: e.name,
      type,
      mode: e.mode ?? (type === 'directory' ? 0o755 : 0o644),
      uid: e.uid ?? 0,
      gid: e.gid ?? 0,
      mtime: new Date(1_700_000_000_000),
      ...(e.linkname !== undefined ? { linkname: e.linkname } : {}),
      ...(e.pax ? { pax: e.pax } : {}),
      ...(body ? { size: body.length } : {}),
    };
    await new Promise<void>((resolve, reject) => {
      const cb = (err?: Error | null) => (err ? reject(err) : resolve());
      if (body) pack.entry(header, body, cb);
      else pack.entry(header, cb);
    });
  }
  pack.finalize();
  await done;
  return Buffer.concat(chunks);
}

export const sha256 = (b: Buffer) => `sha256:${createHash('sha256').update(b).digest('hex')}`;

export interface BuiltLayer {
  blob: Buffer;
  digest: string;
  diffId: string;
  mediaType: string;
}

export function gzipLayer(tarBytes: Buffer, mediaType: string = MT.ociLayerGzip): BuiltLayer {
  const blob = zlib.gzipSync(tarBytes);
  return { blob, digest: sha256(blob), diffId: sha256(tarBytes), mediaType };
}

export interface BuiltImage {
  manifest: Buffer;
  manifestDigest: string;
  config: Buffer;
  configDigest: string;
  layers: BuiltLayer[];
  mediaType: string;
}

export function makeImage(layers: BuiltLayer[], cfg: { Env?: string[]; Cmd?: string[]; Entrypoint?: string[]; WorkingDir?: string; User?: string; Labels?: Record<string, string> } = {}, opts: { docker?: boolean; architecture?: string } = {}): BuiltImage {
  const config = Buffer.from(
    JSON.stringify({
      created: '2026-01-01T00:00:00Z',
      architecture: opts.architecture ?? 'amd64',
      os: 'linux',
      config: cfg,
      rootfs: { type: 'layers', diff_ids: layers.map((l) => l.diffId) },
      // One entry per layer, as every real builder writes (buildah refuses bases without it).
      history: layers.map((_l, i) => ({ created: '2026-01-01T00:00:00Z', created_by: `berth test layer ${i}` })),
    }),
  );
  const mediaType = opts.docker ? MT.dockerManifest : MT.ociManifest;
  const manifest = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType,
      config: { mediaType: opts.docker ? MT.dockerConfig : MT.ociConfig, digest: sha256(config), size: config.length },
      layers: layers.map((l) => ({ mediaType: l.mediaType, digest: l.digest, size: l.blob.length })),
    }),
  );
  return { manifest, manifestDigest: sha256(manifest), config, configDigest: sha256(config), layers, mediaType };
}

/** Put a built image into a store (blobs and manifest), optionally tagged. */
export async function storeImage(store: ImageStore, img: BuiltImage, tag?: string): Promise<void> {
  for (const l of img.layers) await store.putBytes(l.blob, l.digest);
  await store.putBytes(img.config, img.configDigest);
  await store.putBytes(img.manifest, img.manifestDigest);
  if (tag) store.setTag(tag, img.manifestDigest, img.mediaType);
}

/** A layer with the host's static busybox as /bin/busybox and applet links (like the built-in image). */
export async function busyboxLayer(): Promise<BuiltLayer> {
  const { readFileSync } = await import('node:fs');
  const applets = execFileSync('/bin/busybox', ['--list'], { encoding: 'utf8' })
    .split('\n')
    .filter((a) => /^[a-z0-9_.-]+$/.test(a) && a !== 'busybox');
  const entries: EntrySpec[] = [
    { name: 'bin/', type: 'directory' },
    { name: 'bin/busybox', content: readFileSync('/bin/busybox'), mode: 0o755 },
    ...applets.map((a) => ({ name: `bin/${a}`, type: 'symlink' as const, linkname: 'busybox' })),
    { name: 'etc/', type: 'directory' },
    { name: 'etc/passwd', content: 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' },
    { name: 'etc/group', content: 'root:x:0:\nnogroup:x:65534:\n' },
    { name: 'tmp/', type: 'directory', mode: 0o1777 },
    { name: 'proc/', type: 'directory' },
    { name: 'sys/', type: 'directory' },
    { name: 'dev/', type: 'directory' },
  ];
  return gzipLayer(await makeTar(entries));
}

/**
 * What a workload start does on the host for its rootfs, timed in ms: resolve the image (which
 * unpacks only when the shared tree is missing), make the writable layer's folders, mount the
 * overlay (runc mounts the same one for the runc driver); then unmount (not timed).
 */
export async function prepareRootfs(s: { resolve(ref: string): Promise<{ rootfs: string }> }, ref: string, dir: string): Promise<number> {
  const t0 = performance.now();
  const img = await s.resolve(ref);
  for (const d of ['upper', 'work', 'merged']) mkdirSync(path.join(dir, d), { recursive: true, mode: 0o700 });
  execFileSync('mount', ['-t', 'overlay', 'overlay', '-o', `lowerdir=${img.rootfs},upperdir=${dir}/upper,workdir=${dir}/work`, `${dir}/merged`]);
  const ms = performance.now() - t0;
  execFileSync('umount', [`${dir}/merged`]);
  return ms;
}

/**
 * Run skopeo with `args`, keeping its blob-info cache (root's is /var/lib/containers/cache) off the
 * host: it runs in a private mount namespace with a throw-away directory mounted there.
 */
export function skopeo(args: string[]): string {
  if (!existsSync('/var/lib/containers')) mkdirSync('/var/lib/containers', { mode: 0o700 });
  const shadow = mkdtempSync(path.join(tmpdir(), 'berth-skopeo-'));
  try {
    return execFileSync('unshare', ['-m', '--propagation', 'private', 'sh', '-c', `mount --bind "${shadow}" /var/lib/containers && exec skopeo "$@"`, 'sh', ...args], { encoding: 'utf8', maxBuffer: 1 << 26 });
  } finally {
    rmSync(shadow, { recursive: true, force: true });
  }
}
