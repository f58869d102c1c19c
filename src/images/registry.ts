// OCI distribution client (https://github.com/opencontainers/distribution-spec): pull and push of
// single-platform images, with image-index platform selection, explicit Accept headers for the OCI
// and Docker v2 media types, verification of every manifest and blob against its digest, a 4 MiB
// cap on manifests, anonymous / basic / bearer-token auth driven by WWW-Authenticate challenges,
// retries with exponential back-off on 5xx, 429 and connection errors, cross-repository blob
// mounts on push, and a per-layer progress callback.
//
// Credentials are only ever put in Authorization headers: they appear in no error message and no
// log line (errors name the registry and the repository, never a header or a token).
import type { Readable, Writable } from 'node:stream';
import { BerthError, invalidArgument, notFound, permissionDenied, unauthenticated, unavailable } from '../core/errors.js';
import { DOCKER_HUB_API_HOST, DEFAULT_REGISTRY, formatRef, repoName, type ImageRef } from './ref.js';
import { MANIFEST_ACCEPT, MAX_MANIFEST_BYTES, hostPlatform, parseConfig, parseManifest, type Descriptor, type ImageConfigDoc, type Manifest } from './oci.js';
import { DigestMismatchError, type ImageStore } from './store.js';
import { createHash } from 'node:crypto';

export interface RegistryCredentials {
  username: string;
  password: string;
}

export interface LayerProgress {
  /** The image being pulled or pushed. */
  ref: string;
  digest: string;
  /** "config" or "layer". */
  kind: 'config' | 'layer';
  size: number;
  bytes: number;
  status: 'waiting' | 'downloading' | 'uploading' | 'exists' | 'mounted' | 'done';
}

export interface RegistryClientOptions {
  /** Credentials for a registry host[:port]; undefined = anonymous. */
  credentials?: (registry: string) => RegistryCredentials | undefined;
  /** Registries spoken to over plain HTTP. Default: loopback hosts (localhost, 127.x, [::1]). */
  insecure?: (registry: string) => boolean;
  /** Extra attempts after a failed one (5xx, 429, connection errors); default 4. */
  retries?: number;
  /** First back-off delay; doubles each attempt (with jitter); default 200 ms. */
  retryBaseMs?: number;
  /** Timeout of one request other than a blob transfer; default 30 s. */
  requestTimeoutMs?: number;
  /** Platform picked from image indexes; default linux and the host's architecture. */
  platform?: { os: string; architecture: string; variant?: string };
  /** Parallel layer transfers; default 3. */
  concurrency?: number;
}

export interface PullOptions {
  onProgress?: (p: LayerProgress) => void;
  signal?: AbortSignal;
  /** Lets the caller unpack the layers while they download (see LayerFeed in unpack.ts). */
  tee?: LayerTee;
}

export interface LayerTee {
  /** Called once the manifest and config are verified, before any layer is fetched. */
  start(manifestDigest: string, manifest: Manifest, config: ImageConfigDoc): void;
  /**
   * Called when a layer's download starts: a stream that gets its bytes as they arrive (besides
   * the store), or undefined. It ends when the download does, or is destroyed with an error when
   * the download fails; the bytes are verified by the store only after the end.
   */
  open(d: Descriptor): Writable | undefined;
}

export interface PullResult {
  /** Canonical reference as pulled ("registry/repo:tag" or "registry/repo@digest"). */
  ref: string;
  /** Digest of the platform manifest (what the tag now points to). */
  digest: string;
  mediaType: string;
  /** Digest of the image index the manifest was chosen from, when the reference named one. */
  indexDigest?: string;
  config: Descriptor;
  layers: Descriptor[];
}

export interface PushOptions {
  onProgress?: (p: LayerProgress) => void;
  signal?: AbortSignal;
  /** Repository (same registry) to mount blobs from instead of uploading them. */
  mountFrom?: string;
}

export interface PushResult {
  ref: string;
  digest: string;
  /** Blobs uploaded, mounted, and already present. */
  uploaded: string[];
  mounted: string[];
  existing: string[];
}

interface Challenge {
  scheme: 'basic' | 'bearer';
  params: Record<string, string>;
}

type Body = Buffer | (() => Readable);
/** fetch's init, loosely typed: Node's fetch takes Buffers and Node streams (with duplex) too. */
type FetchInit = { method?: string; headers?: Record<string, string>; body?: unknown; signal?: AbortSignal | undefined; redirect?: 'follow' | 'manual' };

interface RequestInit {
  method?: string;
  headers?: Record<string, string>;
  body?: Body;
  /** Bearer scopes this request needs, e.g. ["repository:team/app:pull"]. */
  scopes: string[];
  /** A blob transfer: no overall timeout (the caller's signal still applies). */
  long?: boolean;
  /** Retry on 5xx/429/connection errors (only for requests that can be repeated). */
  retry?: boolean;
  signal?: AbortSignal;
  redirect?: 'follow' | 'manual';
}

const RETRYABLE_CODES = new Set(['ECONNRESET', 'ECONNREFUSED', 'EPIPE', 'ETIMEDOUT', 'UND_ERR_SOCKET', 'UND_ERR_CONNECT_TIMEOUT', 'UND_ERR_HEADERS_TIMEOUT', 'EAI_AGAIN']);

/** The error code of a failed fetch (undici wraps the socket error in `cause`). */
function netCode(e: unknown): string | undefined {
  let cur: unknown = e;
  for (let i = 0; i < 4 && cur && typeof cur === 'object'; i++) {
    const code = (cur as { code?: unknown }).code;
    if (typeof code === 'string') return code;
    cur = (cur as { cause?: unknown }).cause;
  }
  return undefined;
}

function isRetryable(e: unknown): boolean {
  if (e instanceof RetryableStatus) return true;
  if (e instanceof BerthError) return false;
  if ((e as Error)?.name === 'AbortError' || (e as Error)?.name === 'TimeoutError') return false;
  const code = netCode(e);
  return code !== undefined ? RETRYABLE_CODES.has(code) : (e as Error)?.message === 'terminated' || e instanceof TypeError;
}

class RetryableStatus extends Error {
  attempts = 1;
  constructor(readonly status: number, readonly detail: string) {
    super(`HTTP ${status}${detail ? `: ${detail}` : ''}`);
  }
}

/** Parse a WWW-Authenticate header: `Bearer realm="…",service="…",scope="…"` or `Basic realm="…"`. */
export function parseChallenge(header: string | null): Challenge | undefined {
  if (!header) return undefined;
  const m = /^\s*(\w+)\s*(.*)$/s.exec(header);
  if (!m) return undefined;
  const scheme = m[1]!.toLowerCase();
  if (scheme !== 'basic' && scheme !== 'bearer') return undefined;
  const params: Record<string, string> = {};
  const re = /([A-Za-z_][\w-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?\s*/g;
  let p: RegExpExecArray | null;
  while ((p = re.exec(m[2]!))) params[p[1]!.toLowerCase()] = p[2] !== undefined ? p[2].replace(/\\(.)/g, '$1') : p[3]!;
  return { scheme, params };
}

function isLoopback(registry: string): boolean {
  const host = registry.replace(/:\d+$/, '').replace(/^\[(.*)\]$/, '$1');
  return host === 'localhost' || host === '::1' || /^127\.\d+\.\d+\.\d+$/.test(host);
}

const sleep = (ms: number, signal?: AbortSignal) =>
  new Promise<void>((resolve, reject) => {
    const t = setTimeout(resolve, ms);
    signal?.addEventListener('abort', () => {
      clearTimeout(t);
      reject(signal.reason);
    }, { once: true });
  });

/** Runs `fn` with each entry, `n` at a time; the first failure rejects (others finish first). */
async function mapLimit<T, R>(items: T[], n: number, fn: (t: T, i: number) => Promise<R>): Promise<R[]> {
  const out: R[] = new Array(items.length);
  let next = 0;
  let failed: unknown;
  const worker = async () => {
    while (next < items.length && failed === undefined) {
      const i = next++;
      try {
        out[i] = await fn(items[i]!, i);
      } catch (e) {
        failed ??= e;
      }
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, Math.min(n, items.length)) }, worker));
  if (failed !== undefined) throw failed;
  return out;
}

async function readCapped(res: Response, max: number, what: string): Promise<Buffer> {
  const len = Number(res.headers.get('content-length') ?? NaN);
  if (Number.isFinite(len) && len > max) {
    await res.body?.cancel().catch(() => undefined);
    throw invalidArgument(`${what} is ${len} bytes, over the ${max / 1024 / 1024} MiB limit for manifests; Berth refuses it`);
  }
  const chunks: Buffer[] = [];
  let n = 0;
  if (res.body) {
    for await (const c of res.body as unknown as AsyncIterable<Uint8Array>) {
      n += c.length;
      if (n > max) {
        await res.body.cancel().catch(() => undefined);
        throw invalidArgument(`${what} is over the ${max / 1024 / 1024} MiB limit for manifests; Berth refuses it`);
      }
      chunks.push(Buffer.from(c));
    }
  }
  return Buffer.concat(chunks);
}

async function errorDetail(res: Response): Promise<string> {
  try {
    const text = (await res.text()).slice(0, 2000);
    try {
      const j = JSON.parse(text) as { errors?: { code?: string; message?: string }[] };
      if (Array.isArray(j.errors) && j.errors[0]) return [j.errors[0].code, j.errors[0].message].filter(Boolean).join(': ').slice(0, 300);
    } catch {
      /* not JSON */
    }
    return text.replace(/\s+/g, ' ').trim().slice(0, 200);
  } catch {
    return '';
  }
}

/**
 * The chunks of `body`, also written to `sink` (waiting while it is full). A sink that is
 * destroyed (its reader failed) gets no more; the download goes on into the store regardless.
 */
async function* teeTo(body: AsyncIterable<Uint8Array>, sink: Writable): AsyncGenerator<Uint8Array> {
  let complete = false;
  try {
    for await (const c of body) {
      if (!sink.destroyed && !sink.write(c)) {
        await new Promise<void>((resolve) => {
          const go = () => {
            sink.off('drain', go).off('close', go);
            resolve();
          };
          sink.on('drain', go).on('close', go);
        });
      }
      yield c;
    }
    complete = true;
  } finally {
    if (complete) sink.end();
    else sink.destroy(new Error('the download was interrupted'));
  }
}

const sha256 = (b: Buffer) => `sha256:${createHash('sha256').update(b).digest('hex')}`;

export class RegistryClient {
  private readonly opts: Required<Omit<RegistryClientOptions, 'credentials' | 'platform'>> & Pick<RegistryClientOptions, 'credentials'> & { platform: { os: string; architecture: string; variant?: string } };
  /** Per registry: the last challenge seen (so later requests authenticate up front). */
  private readonly challenges = new Map<string, Challenge>();
  /** Bearer tokens by registry + scopes. */
  private readonly tokens = new Map<string, { token: string; expiresAt: number }>();

  constructor(opts: RegistryClientOptions = {}) {
    this.opts = {
      insecure: opts.insecure ?? isLoopback,
      retries: opts.retries ?? 4,
      retryBaseMs: opts.retryBaseMs ?? 200,
      requestTimeoutMs: opts.requestTimeoutMs ?? 30_000,
      concurrency: opts.concurrency ?? 3,
      platform: opts.platform ?? hostPlatform(),
      ...(opts.credentials ? { credentials: opts.credentials } : {}),
    };
  }

  private base(registry: string): string {
    const host = registry === DEFAULT_REGISTRY ? DOCKER_HUB_API_HOST : registry;
    return `${this.opts.insecure(registry) ? 'http' : 'https'}://${host}`;
  }

  // ------------------------------------------------------------------------------------------
  // Transport: auth, retries

  private async authHeader(registry: string, scopes: string[], signal?: AbortSignal): Promise<string | undefined> {
    const ch = this.challenges.get(registry);
    if (!ch) return undefined;
    const creds = this.opts.credentials?.(registry);
    if (ch.scheme === 'basic') {
      return creds ? `Basic ${Buffer.from(`${creds.username}:${creds.password}`).toString('base64')}` : undefined;
    }
    const key = `${registry} ${[...scopes].sort().join(' ')}`;
    const cached = this.tokens.get(key);
    if (cached && cached.expiresAt > Date.now() + 5_000) return `Bearer ${cached.token}`;
    const realm = ch.params.realm;
    if (!realm) throw unauthenticated(`registry ${registry} asked for a bearer token without naming a token service (no realm); Berth cannot authenticate to it`);
    let url: URL;
    try {
      url = new URL(realm);
    } catch {
      throw unauthenticated(`registry ${registry} named an invalid token service URL; Berth cannot authenticate to it`);
    }
    if (url.protocol !== 'https:' && !(url.protocol === 'http:' && isLoopback(url.host))) {
      throw unauthenticated(`registry ${registry} asks for credentials at a token service over plain HTTP (${url.host}); Berth only sends credentials over HTTPS or to loopback`);
    }
    if (ch.params.service) url.searchParams.set('service', ch.params.service);
    for (const s of scopes) url.searchParams.append('scope', s);
    const headers: Record<string, string> = { accept: 'application/json' };
    if (creds) headers.authorization = `Basic ${Buffer.from(`${creds.username}:${creds.password}`).toString('base64')}`;
    const res = await this.fetchRetry(url.toString(), { method: 'GET', headers, signal: this.timeoutSignal(signal) }, true, signal);
    if (res.status === 401 || res.status === 403) {
      await res.body?.cancel().catch(() => undefined);
      throw unauthenticated(
        creds
          ? `the token service of registry ${registry} refused the credentials configured for it (HTTP ${res.status}); check the user name and password`
          : `registry ${registry} needs credentials for ${scopes.join(', ')} (the token service answered HTTP ${res.status}); give a user name and password for it`,
      );
    }
    if (!res.ok) throw unavailable(`the token service of registry ${registry} answered HTTP ${res.status} (${await errorDetail(res)}); try again later`);
    let body: { token?: unknown; access_token?: unknown; expires_in?: unknown };
    try {
      body = JSON.parse((await readCapped(res, 1 << 20, 'token response')).toString('utf8'));
    } catch (e) {
      if (e instanceof BerthError) throw e;
      throw unavailable(`the token service of registry ${registry} answered with something that is not JSON`);
    }
    const token = typeof body.token === 'string' ? body.token : typeof body.access_token === 'string' ? body.access_token : undefined;
    if (!token) throw unavailable(`the token service of registry ${registry} answered without a token`);
    const ttl = typeof body.expires_in === 'number' && body.expires_in > 0 ? body.expires_in : 60;
    this.tokens.set(key, { token, expiresAt: Date.now() + ttl * 1000 });
    return `Bearer ${token}`;
  }

  private timeoutSignal(signal: AbortSignal | undefined, long = false): AbortSignal | undefined {
    if (long) return signal;
    const t = AbortSignal.timeout(this.opts.requestTimeoutMs);
    return signal ? AbortSignal.any([signal, t]) : t;
  }

  /** fetch with back-off on connection errors, 5xx and 429 (when `retry`). */
  private async fetchRetry(url: string, init: FetchInit, retry: boolean, signal?: AbortSignal, makeBody?: () => unknown): Promise<Response> {
    for (let attempt = 0; ; attempt++) {
      try {
        // A streamed upload is not redirected (redirect: 'error'): while fetch may follow a redirect it keeps
        // every chunk sent in memory (undici #4058), a whole layer of an image being pushed.
        const res = await fetch(url, (makeBody ? { ...init, body: makeBody(), duplex: 'half', redirect: 'error' } : init) as globalThis.RequestInit);
        if (retry && (res.status >= 500 || res.status === 429)) throw new RetryableStatus(res.status, await errorDetail(res));
        return res;
      } catch (e) {
        if (!retry || attempt >= this.opts.retries || !isRetryable(e) || signal?.aborted) {
          if (e instanceof RetryableStatus) e.attempts = attempt + 1;
          throw e;
        }
        const delay = this.opts.retryBaseMs * 2 ** attempt * (0.75 + Math.random() * 0.5);
        await sleep(delay, signal);
      }
    }
  }

  /** One API request with authentication (challenge → credentials or token → one retry). */
  private async request(registry: string, pathOrUrl: string, init: RequestInit): Promise<Response> {
    const url = /^https?:\/\//.test(pathOrUrl) ? pathOrUrl : this.base(registry) + pathOrUrl;
    const what = `${init.method ?? 'GET'} ${new URL(url).pathname}`;
    for (let round = 0; ; round++) {
      const headers: Record<string, string> = { ...(init.headers ?? {}) };
      const auth = await this.authHeader(registry, init.scopes, init.signal);
      // Authorization only goes to the registry itself (fetch drops it on cross-origin redirects).
      if (auth) headers.authorization = auth;
      const body = init.body;
      let res: Response;
      try {
        res = await this.fetchRetry(
          url,
          { method: init.method ?? 'GET', headers, signal: this.timeoutSignal(init.signal, init.long), redirect: init.redirect ?? 'follow', ...(Buffer.isBuffer(body) ? { body } : {}) },
          init.retry ?? true,
          init.signal,
          typeof body === 'function' ? body : undefined,
        );
      } catch (e) {
        if (e instanceof BerthError) throw e;
        if ((e as Error)?.name === 'AbortError' && init.signal?.aborted) throw e;
        if ((e as Error)?.name === 'TimeoutError' || (e as Error)?.name === 'AbortError') {
          throw unavailable(`registry ${registry} did not answer ${what} within ${this.opts.requestTimeoutMs} ms; check that it is reachable`);
        }
        if (e instanceof RetryableStatus) throw unavailable(`registry ${registry} answered ${what} with ${e.message} after ${e.attempts} attempt(s); try again later`);
        throw unavailable(`cannot reach registry ${registry} (${netCode(e) ?? (e as Error).message}) after ${this.opts.retries + 1} attempts; check the address and that it is running`);
      }
      if (res.status === 401 && round === 0) {
        const ch = parseChallenge(res.headers.get('www-authenticate'));
        await res.body?.cancel().catch(() => undefined);
        if (!ch) throw unauthenticated(`registry ${registry} refused ${what} (HTTP 401) without saying how to authenticate`);
        this.challenges.set(registry, ch);
        if (ch.scheme === 'bearer') {
          // The challenge may carry the scope the registry wants; ask for ours and that one.
          const scope = ch.params.scope;
          if (scope && !init.scopes.includes(scope)) init = { ...init, scopes: [...init.scopes, scope] };
          this.tokens.delete(`${registry} ${[...init.scopes].sort().join(' ')}`);
        } else if (!this.opts.credentials?.(registry)) {
          throw unauthenticated(`registry ${registry} needs a user name and password (HTTP Basic, realm "${ch.params.realm ?? ''}"); give credentials for it`);
        } else if (auth) {
          // Credentials were sent (not merely a request made before the challenge was known).
          throw unauthenticated(`registry ${registry} refused the credentials configured for it; check the user name and password`);
        }
        continue;
      }
      if (res.status === 401) {
        await res.body?.cancel().catch(() => undefined);
        const creds = this.opts.credentials?.(registry);
        throw unauthenticated(creds ? `registry ${registry} refused the credentials configured for it for ${what}; check the user name and password` : `registry ${registry} needs credentials for ${what}; give a user name and password for it`);
      }
      return res;
    }
  }

  // ------------------------------------------------------------------------------------------
  // Pull

  /** Fetch a manifest (by tag or digest), verify it, and return its bytes and media type. */
  private async getManifest(ref: ImageRef, reference: string, signal?: AbortSignal): Promise<{ bytes: Buffer; digest: string; mediaType: string }> {
    const scopes = [`repository:${ref.repository}:pull`];
    const res = await this.request(ref.registry, `/v2/${ref.repository}/manifests/${reference}`, { headers: { accept: MANIFEST_ACCEPT }, scopes, ...(signal ? { signal } : {}) });
    const what = `manifest ${repoName(ref)}:${reference}`;
    if (res.status === 404) {
      const detail = await errorDetail(res);
      throw notFound(`image ${repoName(ref)}${reference.startsWith('sha256:') ? '@' : ':'}${reference} not found in registry ${ref.registry}${detail ? ` (${detail})` : ''}; check the repository name and tag`);
    }
    if (res.status === 403) throw permissionDenied(`registry ${ref.registry} denies pulling ${repoName(ref)} (${await errorDetail(res)}); check the credentials' permissions`);
    if (!res.ok) throw unavailable(`registry ${ref.registry} answered GET ${what} with HTTP ${res.status} (${await errorDetail(res)})`);
    const bytes = await readCapped(res, MAX_MANIFEST_BYTES, what);
    const digest = sha256(bytes);
    if (reference.startsWith('sha256:') && reference !== digest) throw new DigestMismatchError(what, reference, digest, bytes.length);
    const header = res.headers.get('docker-content-digest');
    if (header && header.startsWith('sha256:') && header !== digest) throw new DigestMismatchError(`${what} (Docker-Content-Digest header)`, header, digest, bytes.length);
    return { bytes, digest, mediaType: (res.headers.get('content-type') ?? '').split(';')[0]!.trim() };
  }

  private selectPlatform(ref: ImageRef, manifests: Descriptor[]): Descriptor {
    const want = this.opts.platform;
    const candidates = manifests.filter((m) => m.platform?.os === want.os && m.platform?.architecture === want.architecture);
    const pick = (want.variant ? candidates.find((m) => m.platform?.variant === want.variant) : undefined) ?? candidates.find((m) => !m.platform?.variant) ?? candidates[0];
    if (!pick) {
      const have = manifests.map((m) => (m.platform ? `${m.platform.os}/${m.platform.architecture}${m.platform.variant ? `/${m.platform.variant}` : ''}` : '(no platform)')).join(', ');
      throw invalidArgument(`image ${formatRef(ref)} has no ${want.os}/${want.architecture} variant (it has: ${have || 'none'}); pull an image built for this host`);
    }
    return pick;
  }

  private async pullBlob(store: ImageStore, ref: ImageRef, d: Descriptor, kind: 'config' | 'layer', opts: PullOptions): Promise<void> {
    const refStr = formatRef(ref);
    const report = (bytes: number, status: LayerProgress['status']) => opts.onProgress?.({ ref: refStr, digest: d.digest, kind, size: d.size, bytes, status });
    if (await store.hasBlob(d.digest)) {
      report(d.size, 'exists');
      return;
    }
    const what = `${kind} ${d.digest} of ${refStr}`;
    for (let attempt = 0; ; attempt++) {
      try {
        await store.ingest(
          d.digest,
          async () => {
            const res = await this.request(ref.registry, `/v2/${ref.repository}/blobs/${d.digest}`, { scopes: [`repository:${ref.repository}:pull`], long: true, ...(opts.signal ? { signal: opts.signal } : {}) });
            if (res.status === 404) throw notFound(`${what} is missing from registry ${ref.registry} (blob unknown); the image is incomplete there`);
            if (!res.ok) {
              const detail = await errorDetail(res);
              if (res.status >= 500) throw new RetryableStatus(res.status, detail);
              throw unavailable(`registry ${ref.registry} answered GET ${what} with HTTP ${res.status} (${detail})`);
            }
            if (!res.body) throw unavailable(`registry ${ref.registry} sent no body for ${what}`);
            report(0, 'downloading');
            const body = res.body as unknown as AsyncIterable<Uint8Array>;
            const sink = kind === 'layer' ? opts.tee?.open(d) : undefined;
            return sink ? teeTo(body, sink) : body;
          },
          { size: d.size, what, onBytes: (n) => report(n, 'downloading') },
        );
        report(d.size, 'done');
        return;
      } catch (e) {
        if (attempt >= this.opts.retries || !isRetryable(e) || opts.signal?.aborted) {
          if (e instanceof RetryableStatus) throw unavailable(`registry ${ref.registry} answered GET ${what} with ${e.message} after ${attempt + 1} attempts; try again later`);
          if (!(e instanceof BerthError) && !opts.signal?.aborted) throw unavailable(`downloading ${what} failed (${netCode(e) ?? (e as Error).message}) after ${attempt + 1} attempts`);
          throw e;
        }
        await sleep(this.opts.retryBaseMs * 2 ** attempt * (0.75 + Math.random() * 0.5), opts.signal);
      }
    }
  }

  /**
   * Pull an image into the store: the manifest (from the index, the host's platform), its config
   * and its layers, each verified; then tag it (when the reference has a tag). Returns what the
   * tag now points to.
   */
  async pull(store: ImageStore, ref: ImageRef, opts: PullOptions = {}): Promise<PullResult> {
    const lease = store.lease();
    try {
      const reference = ref.digest ?? ref.tag ?? 'latest';
      let got = await this.getManifest(ref, reference, opts.signal);
      let parsed = parseManifest(got.bytes, got.mediaType, `manifest ${formatRef(ref)}`);
      let indexDigest: string | undefined;
      if (parsed.kind === 'index') {
        indexDigest = got.digest;
        lease.add(indexDigest);
        await store.putBytes(got.bytes, got.digest);
        const chosen = this.selectPlatform(ref, parsed.doc.manifests);
        got = await this.getManifest(ref, chosen.digest, opts.signal);
        parsed = parseManifest(got.bytes, got.mediaType || chosen.mediaType, `manifest ${repoName(ref)}@${chosen.digest}`);
        if (parsed.kind !== 'manifest') throw invalidArgument(`image index ${formatRef(ref)} points to another index for ${this.opts.platform.os}/${this.opts.platform.architecture}; nested indexes are not supported`);
      }
      const manifest: Manifest = parsed.doc;
      lease.add(got.digest);
      lease.add(manifest.config.digest);
      for (const l of manifest.layers) lease.add(l.digest);
      if (manifest.config.size > MAX_MANIFEST_BYTES) throw invalidArgument(`the config of ${formatRef(ref)} declares ${manifest.config.size} bytes, over the 4 MiB limit`);
      await this.pullBlob(store, ref, manifest.config, 'config', opts);
      const config = parseConfig(await store.readBlob(manifest.config.digest), `config of ${formatRef(ref)}`);
      if (config.rootfs.diff_ids.length !== manifest.layers.length) {
        throw invalidArgument(`image ${formatRef(ref)} is inconsistent: its manifest lists ${manifest.layers.length} layers but its config ${config.rootfs.diff_ids.length}`);
      }
      opts.tee?.start(got.digest, manifest, config);
      for (const l of manifest.layers) opts.onProgress?.({ ref: formatRef(ref), digest: l.digest, kind: 'layer', size: l.size, bytes: 0, status: 'waiting' });
      await mapLimit(manifest.layers, this.opts.concurrency, (l) => this.pullBlob(store, ref, l, 'layer', opts));
      await store.putBytes(got.bytes, got.digest);
      if (ref.tag !== undefined) store.setTag(`${repoName(ref)}:${ref.tag}`, got.digest, parsed.mediaType);
      return {
        ref: formatRef(ref),
        digest: got.digest,
        mediaType: parsed.mediaType,
        ...(indexDigest ? { indexDigest } : {}),
        config: manifest.config,
        layers: manifest.layers,
      };
    } finally {
      lease.release();
    }
  }

  /**
   * Check that the registry accepts the configured credentials (`berth login`): GET /v2/ with the
   * challenge's scheme (HTTP Basic, or a bearer token fetched with the credentials).
   */
  async checkLogin(registry: string, signal?: AbortSignal): Promise<void> {
    const res = await this.request(registry, '/v2/', { scopes: [], ...(signal ? { signal } : {}) });
    await res.body?.cancel().catch(() => undefined);
    if (res.status === 401) throw unauthenticated(`registry ${registry} refused the credentials; check the user name and password`);
    if (!res.ok) throw unavailable(`registry ${registry} answered GET /v2/ with HTTP ${res.status}; is it an OCI registry?`);
  }

  // ------------------------------------------------------------------------------------------
  // Push

  private async pushBlob(store: ImageStore, dest: ImageRef, d: Descriptor, kind: 'config' | 'layer', opts: PushOptions, out: PushResult): Promise<void> {
    const refStr = formatRef(dest);
    const report = (bytes: number, status: LayerProgress['status']) => opts.onProgress?.({ ref: refStr, digest: d.digest, kind, size: d.size, bytes, status });
    const scopes = [`repository:${dest.repository}:pull,push`, ...(opts.mountFrom ? [`repository:${opts.mountFrom}:pull`] : [])];
    const sig = opts.signal ? { signal: opts.signal } : {};
    const what = `${kind} ${d.digest} to ${refStr}`;
    const head = await this.request(dest.registry, `/v2/${dest.repository}/blobs/${d.digest}`, { method: 'HEAD', scopes, ...sig });
    await head.body?.cancel().catch(() => undefined);
    if (head.ok) {
      out.existing.push(d.digest);
      report(d.size, 'exists');
      return;
    }
    if (head.status !== 404) throw this.pushError(dest, head, what, '');
    const size = await store.blobSize(d.digest);
    for (let attempt = 0; ; attempt++) {
      try {
        const mountQuery = opts.mountFrom ? `?mount=${encodeURIComponent(d.digest)}&from=${encodeURIComponent(opts.mountFrom)}` : '';
        const start = await this.request(dest.registry, `/v2/${dest.repository}/blobs/uploads/${mountQuery}`, { method: 'POST', headers: { 'content-length': '0' }, body: Buffer.alloc(0), scopes, ...sig });
        if (start.status === 201 && opts.mountFrom) {
          await start.body?.cancel().catch(() => undefined);
          out.mounted.push(d.digest);
          report(d.size, 'mounted');
          return;
        }
        if (start.status !== 202) throw this.pushError(dest, start, `starting the upload of ${what}`, await errorDetail(start));
        await start.body?.cancel().catch(() => undefined);
        const location = start.headers.get('location');
        if (!location) throw unavailable(`registry ${dest.registry} started an upload for ${what} without a Location; it does not follow the distribution spec`);
        const url = new URL(location, this.base(dest.registry) + '/');
        if (url.origin !== new URL(this.base(dest.registry)).origin) {
          throw unavailable(`registry ${dest.registry} sent the upload of ${what} to another host (${url.host}); Berth does not send blobs or credentials elsewhere`);
        }
        url.searchParams.set('digest', d.digest);
        report(0, 'uploading');
        const put = await this.request(dest.registry, url.toString(), {
          method: 'PUT',
          headers: { 'content-type': 'application/octet-stream', 'content-length': String(size) },
          body: () => store.openBlob(d.digest),
          scopes,
          long: true,
          retry: false,
          ...sig,
        });
        if (put.status !== 201) {
          const detail = await errorDetail(put);
          if (put.status >= 500) throw new RetryableStatus(put.status, detail);
          throw this.pushError(dest, put, `uploading ${what}`, detail);
        }
        await put.body?.cancel().catch(() => undefined);
        const echoed = put.headers.get('docker-content-digest');
        if (echoed && echoed !== d.digest) throw new DigestMismatchError(`${what} (registry's Docker-Content-Digest)`, d.digest, echoed, size);
        out.uploaded.push(d.digest);
        report(d.size, 'done');
        return;
      } catch (e) {
        if (attempt >= this.opts.retries || !isRetryable(e) || opts.signal?.aborted) {
          if (e instanceof RetryableStatus) throw unavailable(`registry ${dest.registry} answered the upload of ${what} with ${e.message} after ${attempt + 1} attempts`);
          throw e;
        }
        await sleep(this.opts.retryBaseMs * 2 ** attempt * (0.75 + Math.random() * 0.5), opts.signal);
      }
    }
  }

  private pushError(dest: ImageRef, res: Response, what: string, detail: string): BerthError {
    if (res.status === 403) return permissionDenied(`registry ${dest.registry} denies ${what} (${detail || 'HTTP 403'}); the credentials need push permission on ${dest.repository}`);
    if (res.status === 404) return notFound(`registry ${dest.registry} answered ${what} with 404 (${detail}); check the repository name`);
    if (res.status >= 400 && res.status < 500) return invalidArgument(`registry ${dest.registry} refused ${what} with HTTP ${res.status} (${detail})`);
    return unavailable(`registry ${dest.registry} answered ${what} with HTTP ${res.status} (${detail})`);
  }

  /**
   * Push the image whose manifest `digest` is in the store to `dest` (a tag or a digest
   * reference): blobs first (skipped when present, mounted from `mountFrom` when possible),
   * then the manifest.
   */
  async push(store: ImageStore, digest: string, dest: ImageRef, opts: PushOptions = {}): Promise<PushResult> {
    const bytes = await store.readBlob(digest);
    const parsed = parseManifest(bytes, undefined, `manifest ${digest}`);
    if (parsed.kind !== 'manifest') throw invalidArgument(`${digest} is an image index; pushing indexes is not supported yet, push one platform's manifest`);
    const out: PushResult = { ref: formatRef(dest), digest, uploaded: [], mounted: [], existing: [] };
    const m = parsed.doc;
    await mapLimit(m.layers, this.opts.concurrency, (l) => this.pushBlob(store, dest, l, 'layer', opts, out));
    await this.pushBlob(store, dest, m.config, 'config', opts, out);
    const reference = dest.tag ?? dest.digest ?? digest;
    if (dest.digest && dest.digest !== digest) throw invalidArgument(`cannot push ${digest} to ${formatRef(dest)}: the reference pins another digest`);
    const res = await this.request(dest.registry, `/v2/${dest.repository}/manifests/${reference}`, {
      method: 'PUT',
      headers: { 'content-type': parsed.mediaType },
      body: bytes,
      scopes: [`repository:${dest.repository}:pull,push`],
      ...(opts.signal ? { signal: opts.signal } : {}),
    });
    if (res.status !== 201 && res.status !== 200) throw this.pushError(dest, res, `storing the manifest of ${formatRef(dest)}`, await errorDetail(res));
    await res.body?.cancel().catch(() => undefined);
    const echoed = res.headers.get('docker-content-digest');
    if (echoed && echoed !== digest) throw new DigestMismatchError(`manifest pushed to ${formatRef(dest)} (registry's Docker-Content-Digest)`, digest, echoed, bytes.length);
    return out;
  }
}
