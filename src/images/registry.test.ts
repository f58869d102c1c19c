// The registry client against a real registry (Debian's docker-registry on 127.0.0.1, started
// here with its own config), with and without htpasswd auth; bearer tokens, injected failures and
// tampered content come from a small proxy in front of it.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { BerthError } from '../core/errors.js';
import { ImageService } from './catalog.js';
import { MT } from './oci.js';
import { parseRef } from './ref.js';
import { RegistryClient, parseChallenge, type LayerProgress } from './registry.js';
import { DigestMismatchError, ImageStore } from './store.js';
import { gzipLayer, makeImage, makeTar, registrySkip, sha256, startProxy, startRegistry, storeImage, type BuiltImage, type TestRegistry } from './testing.js';

const skip = registrySkip;
const fast = { retries: 3, retryBaseMs: 10 };

async function tmpStore(): Promise<ImageStore & { cleanup(): Promise<void> }> {
  const dir = await mkdtemp(path.join(tmpdir(), 'berth-reg-store-'));
  const s = new ImageStore(dir) as ImageStore & { cleanup(): Promise<void> };
  s.cleanup = async () => {
    s.close();
    await rm(dir, { recursive: true, force: true });
  };
  return s;
}

async function sampleImage(tag: string, opts: { docker?: boolean; architecture?: string } = {}): Promise<BuiltImage> {
  const l1 = gzipLayer(await makeTar([{ name: 'etc/', type: 'directory' }, { name: 'etc/hello', content: `hello ${tag}\n` }]), opts.docker ? MT.dockerLayerGzip : MT.ociLayerGzip);
  const l2 = gzipLayer(await makeTar([{ name: 'bin/app', content: Buffer.from(`${tag} `.repeat(20_000)), mode: 0o755 }]), opts.docker ? MT.dockerLayerGzip : MT.ociLayerGzip);
  return makeImage([l1, l2], { Cmd: ['/bin/app'], Env: ['A=1'] }, opts);
}

/** Push `img` from a scratch store to host/repo:tag with a client; returns the result. */
async function pushImage(client: RegistryClient, img: BuiltImage, ref: string, mountFrom?: string) {
  const src = await tmpStore();
  try {
    await storeImage(src, img);
    return await client.push(src, img.manifestDigest, parseRef(ref), mountFrom ? { mountFrom } : {});
  } finally {
    await src.cleanup();
  }
}

test('parseChallenge reads Basic and Bearer challenges', () => {
  assert.deepEqual(parseChallenge('Basic realm="berth-test"'), { scheme: 'basic', params: { realm: 'berth-test' } });
  assert.deepEqual(parseChallenge('Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push"'), {
    scheme: 'bearer',
    params: { realm: 'https://auth.example/token', service: 'registry.example', scope: 'repository:a/b:pull,push' },
  });
  assert.equal(parseChallenge('Negotiate abc'), undefined);
  assert.equal(parseChallenge(null), undefined);
});

describe('registry client against docker-registry (anonymous)', { skip }, () => {
  let reg: TestRegistry;
  before(async () => {
    reg = await startRegistry();
  });
  after(async () => {
    await reg?.stop();
  });

  test('push (POST then PUT), then pull into a clean store: same digests, verified, tagged, progress per layer', async () => {
    const client = new RegistryClient(fast);
    const img = await sampleImage('v1');
    const pushed = await pushImage(client, img, `${reg.host}/team/app:v1`);
    assert.deepEqual(pushed.uploaded.sort(), [img.configDigest, ...img.layers.map((l) => l.digest)].sort());

    const store = await tmpStore();
    try {
      const events: LayerProgress[] = [];
      const res = await client.pull(store, parseRef(`${reg.host}/team/app:v1`), { onProgress: (p) => events.push(p) });
      assert.equal(res.digest, img.manifestDigest);
      assert.equal(res.mediaType, MT.ociManifest);
      assert.equal(store.getTag(`${reg.host}/team/app:v1`)?.digest, img.manifestDigest);
      for (const d of [img.manifestDigest, img.configDigest, ...img.layers.map((l) => l.digest)]) assert.ok(await store.hasBlob(d), d);
      for (const l of img.layers) {
        const mine = events.filter((e) => e.digest === l.digest);
        assert.equal(mine[0]?.status, 'waiting');
        assert.equal(mine.at(-1)?.status, 'done');
        assert.equal(mine.at(-1)?.bytes, l.blob.length);
      }
      // Pulling again finds every blob present.
      events.length = 0;
      await client.pull(store, parseRef(`${reg.host}/team/app:v1`), { onProgress: (p) => events.push(p) });
      assert.ok(events.filter((e) => e.kind === 'layer' && e.status !== 'waiting').every((e) => e.status === 'exists'));
      // By digest.
      const byDigest = await client.pull(store, parseRef(`${reg.host}/team/app@${img.manifestDigest}`));
      assert.equal(byDigest.digest, img.manifestDigest);
    } finally {
      await store.cleanup();
    }
  });

  test('Docker v2 media types round-trip', async () => {
    const client = new RegistryClient(fast);
    const img = await sampleImage('docker', { docker: true });
    await pushImage(client, img, `${reg.host}/team/docker:1`);
    const store = await tmpStore();
    try {
      const res = await client.pull(store, parseRef(`${reg.host}/team/docker:1`));
      assert.equal(res.mediaType, MT.dockerManifest);
      assert.equal(res.digest, img.manifestDigest);
    } finally {
      await store.cleanup();
    }
  });

  for (const kind of ['oci', 'docker'] as const) {
    test(`image index (${kind}): linux/amd64 is selected; a missing platform is refused`, async () => {
      const client = new RegistryClient({ ...fast, platform: { os: 'linux', architecture: 'amd64' } });
      const amd = await sampleImage(`amd64-${kind}`, { architecture: 'amd64', docker: kind === 'docker' });
      const arm = await sampleImage(`arm64-${kind}`, { architecture: 'arm64', docker: kind === 'docker' });
      await pushImage(client, amd, `${reg.host}/multi/${kind}@${amd.manifestDigest}`);
      await pushImage(client, arm, `${reg.host}/multi/${kind}@${arm.manifestDigest}`);
      const indexType = kind === 'oci' ? MT.ociIndex : MT.dockerList;
      const index = Buffer.from(
        JSON.stringify({
          schemaVersion: 2,
          mediaType: indexType,
          manifests: [
            { mediaType: arm.mediaType, digest: arm.manifestDigest, size: arm.manifest.length, platform: { os: 'linux', architecture: 'arm64' } },
            { mediaType: amd.mediaType, digest: amd.manifestDigest, size: amd.manifest.length, platform: { os: 'linux', architecture: 'amd64' } },
          ],
        }),
      );
      const put = await fetch(`http://${reg.host}/v2/multi/${kind}/manifests/latest`, { method: 'PUT', headers: { 'content-type': indexType }, body: index });
      assert.equal(put.status, 201, await put.text());
      const store = await tmpStore();
      try {
        const res = await client.pull(store, parseRef(`${reg.host}/multi/${kind}`));
        assert.equal(res.indexDigest, sha256(index));
        assert.equal(res.digest, amd.manifestDigest);
        assert.equal(store.getTag(`${reg.host}/multi/${kind}:latest`)?.digest, amd.manifestDigest);
        assert.equal(await store.hasBlob(arm.layers[1]!.digest), false, 'other platforms are not downloaded');
        const riscv = new RegistryClient({ ...fast, platform: { os: 'linux', architecture: 'riscv64' } });
        await assert.rejects(riscv.pull(store, parseRef(`${reg.host}/multi/${kind}`)), /has no linux\/riscv64 variant \(it has: linux\/arm64, linux\/amd64\)/);
      } finally {
        await store.cleanup();
      }
    });
  }

  test('push mounts blobs from another repository instead of uploading them', async () => {
    const client = new RegistryClient(fast);
    const img = await sampleImage('mount');
    await pushImage(client, img, `${reg.host}/src/app:1`);
    const res = await pushImage(client, img, `${reg.host}/dst/app:1`, 'src/app');
    assert.deepEqual(res.mounted.sort(), [img.configDigest, ...img.layers.map((l) => l.digest)].sort());
    assert.deepEqual(res.uploaded, []);
    const again = await pushImage(client, img, `${reg.host}/dst/app:2`);
    assert.equal(again.existing.length, 3, 'blobs already there are not uploaded again');
  });

  test('a blob cut off mid-transfer is downloaded again; a mount the source cannot serve falls back to an upload', async () => {
    const img = await sampleImage('cutoff');
    const client = new RegistryClient(fast);
    const pushed = await pushImage(client, img, `${reg.host}/cut/app:1`, 'no/such-repo');
    assert.deepEqual(pushed.mounted, []);
    assert.equal(pushed.uploaded.length, 3, 'mount refused (202) → POST/PUT upload');
    const big = img.layers[1]!;
    let cuts = 0;
    const proxy = await startProxy(reg.host, (req, res) => {
      if (req.url?.includes(`/blobs/${big.digest}`) && cuts < 1) {
        cuts++;
        res.writeHead(200, { 'content-length': String(big.blob.length) });
        res.write(big.blob.subarray(0, Math.floor(big.blob.length / 2)));
        setTimeout(() => res.socket?.destroy(), 20);
        return true;
      }
      if (req.url?.includes('/manifests/') && req.headers['x-big'] === undefined && cuts === 1 && proxyMode.big) {
        res.writeHead(200, { 'content-type': MT.ociManifest, 'content-length': String(5 * 1024 * 1024) });
        res.end();
        return true;
      }
      return false;
    });
    const proxyMode = { big: false };
    const store = await tmpStore();
    try {
      const res = await client.pull(store, parseRef(`${proxy.host}/cut/app:1`));
      assert.equal(res.digest, img.manifestDigest);
      assert.equal(cuts, 1);
      assert.ok(await store.hasBlob(big.digest));
      proxyMode.big = true;
      await assert.rejects(client.pull(store, parseRef(`${proxy.host}/cut/app:1`)), /is 5242880 bytes, over the 4 MiB limit/);
    } finally {
      await store.cleanup();
      await proxy.stop();
    }
  });

  test('missing images: not_found naming the image', async () => {
    const client = new RegistryClient(fast);
    const store = await tmpStore();
    try {
      await assert.rejects(client.pull(store, parseRef(`${reg.host}/nope/nothing:1`)), (e: any) => e.code === 'not_found' && /nope\/nothing:1 not found/.test(e.message));
    } finally {
      await store.cleanup();
    }
  });

  test('retries with back-off on 5xx and connection resets', async () => {
    const img = await sampleImage('retry');
    await pushImage(new RegistryClient(fast), img, `${reg.host}/retry/app:1`);
    let manifestResets = 0;
    let blob503 = 0;
    const proxy = await startProxy(reg.host, (req, res) => {
      if (req.url?.includes('/manifests/') && manifestResets < 1) {
        manifestResets++;
        return 'reset';
      }
      if (req.url?.includes('/blobs/') && blob503 < 2) {
        blob503++;
        res.writeHead(503).end('busy');
        return true;
      }
      return false;
    });
    const store = await tmpStore();
    try {
      const res = await new RegistryClient(fast).pull(store, parseRef(`${proxy.host}/retry/app:1`));
      assert.equal(res.digest, img.manifestDigest);
      assert.equal(manifestResets, 1);
      assert.equal(blob503, 2);
    } finally {
      await store.cleanup();
      await proxy.stop();
    }
  });

  test('a registry that keeps failing gives up with unavailable after the retries', async () => {
    const proxy = await startProxy(reg.host, (_req, res) => {
      res.writeHead(500).end('{"errors":[{"code":"UNKNOWN","message":"storage broken"}]}');
      return true;
    });
    const store = await tmpStore();
    try {
      await assert.rejects(new RegistryClient({ retries: 2, retryBaseMs: 5 }).pull(store, parseRef(`${proxy.host}/x/y:1`)), (e: any) => e.code === 'unavailable' && /HTTP 500.*storage broken.*after 3 attempt/.test(e.message));
      assert.equal(proxy.seen.length, 3);
    } finally {
      await store.cleanup();
      await proxy.stop();
    }
  });

  test('hostile registry: tampered blob, tampered manifest, oversized manifest are refused and nothing is stored', async () => {
    const img = await sampleImage('hostile');
    await pushImage(new RegistryClient(fast), img, `${reg.host}/hostile/app:1`);
    const tamperedManifest = Buffer.from(img.manifest.toString().replace('"schemaVersion":2', '"schemaVersion":2 '));
    let mode: 'blob' | 'manifest' | 'header' | 'big' = 'blob';
    const proxy = await startProxy(reg.host, (req, res) => {
      if (mode === 'blob' && req.url?.includes(`/blobs/${img.layers[1]!.digest}`)) {
        const evil = Buffer.from(img.layers[1]!.blob);
        evil[evil.length - 10] = evil[evil.length - 10]! ^ 0xff;
        res.writeHead(200, { 'content-length': String(evil.length) }).end(evil);
        return true;
      }
      if (mode === 'manifest' && req.url?.includes('/manifests/')) {
        res.writeHead(200, { 'content-type': MT.ociManifest }).end(tamperedManifest);
        return true;
      }
      if (mode === 'header' && req.url?.includes('/manifests/')) {
        res.writeHead(200, { 'content-type': MT.ociManifest, 'docker-content-digest': sha256(Buffer.from('other')) }).end(img.manifest);
        return true;
      }
      if (mode === 'big' && req.url?.includes('/manifests/')) {
        res.writeHead(200, { 'content-type': MT.ociManifest }); // chunked: no Content-Length to trust
        const chunk = Buffer.alloc(1024 * 1024, 0x20);
        for (let i = 0; i < 5; i++) res.write(chunk);
        res.end('{}');
        return true;
      }
      return false;
    });
    const store = await tmpStore();
    try {
      const client = new RegistryClient(fast);
      await assert.rejects(client.pull(store, parseRef(`${proxy.host}/hostile/app:1`)), (e: unknown) => e instanceof DigestMismatchError && /does not match its digest/.test(e.message));
      assert.equal(await store.hasBlob(img.layers[1]!.digest), false);
      assert.equal(store.getTag(`${proxy.host}/hostile/app:1`), undefined, 'no tag for a refused image');
      mode = 'manifest';
      await assert.rejects(client.pull(store, parseRef(`${proxy.host}/hostile/app@${img.manifestDigest}`)), DigestMismatchError);
      mode = 'header';
      await assert.rejects(client.pull(store, parseRef(`${proxy.host}/hostile/app:1`)), /Docker-Content-Digest/);
      mode = 'big';
      await assert.rejects(client.pull(store, parseRef(`${proxy.host}/hostile/app:1`)), /over the 4 MiB limit/);
      assert.equal(store.listTags().length, 0);
      await store.gc();
      assert.deepEqual(await readdir(store.blobsDir), [], 'nothing verified-but-unreferenced left after GC');
    } finally {
      await store.cleanup();
      await proxy.stop();
    }
  });

  test('ImageService.pull unpacks while downloading, but a layer that fails verification leaves no rootfs (even when it unpacks fine)', async () => {
    const img = await sampleImage('streamed');
    await pushImage(new RegistryClient(fast), img, `${reg.host}/streamed/app:1`);
    // The first layer (the one streamed into the unpack) with a gzip header MTIME byte changed:
    // the same tar inside (so the unpack and the diff_id check succeed), but not the blob whose
    // digest the manifest names.
    let tamper = true;
    const proxy = await startProxy(reg.host, (req, res) => {
      if (!tamper || !req.url?.includes(`/blobs/${img.layers[0]!.digest}`)) return false;
      const evil = Buffer.from(img.layers[0]!.blob);
      evil[5] = evil[5]! ^ 0xff;
      res.writeHead(200, { 'content-length': String(evil.length) }).end(evil);
      return true;
    });
    const dir = await mkdtemp(path.join(tmpdir(), 'berth-reg-svc-'));
    const svc = new ImageService(dir);
    try {
      const ref = `${proxy.host}/streamed/app:1`;
      await assert.rejects(svc.pull({ ref }), (e: unknown) => e instanceof DigestMismatchError);
      assert.deepEqual(await readdir(path.join(dir, 'rootfs')).catch(() => []), [], 'no rootfs tree, not even a temporary one');
      assert.equal(await svc.store.hasBlob(img.layers[0]!.digest), false);
      assert.equal(svc.store.getTag(ref), undefined);
      tamper = false;
      const pulled = await svc.pull({ ref });
      assert.equal(pulled.digest, img.manifestDigest);
      assert.equal(pulled.unpacked, true);
      const { rootfs } = await svc.resolve(ref);
      assert.equal(await readFile(path.join(rootfs, 'etc/hello'), 'utf8'), 'hello streamed\n');
      assert.equal((await readFile(path.join(rootfs, 'bin/app'), 'utf8')).length, 'streamed '.length * 20_000);
      assert.deepEqual(await readdir(path.join(dir, 'rootfs')), [img.manifestDigest.slice(7)]);
    } finally {
      svc.close();
      await rm(dir, { recursive: true, force: true });
      await proxy.stop();
    }
  });

  test('bearer-token auth: WWW-Authenticate challenge, token from the realm with basic credentials, scoped', async () => {
    const img = await sampleImage('bearer');
    await pushImage(new RegistryClient(fast), img, `${reg.host}/private/app:1`);
    const tokenRequests: URL[] = [];
    const proxy = await startProxy(reg.host, (req, res, self) => {
      if (req.url?.startsWith('/token')) {
        const u = new URL(req.url, `http://${self}`);
        tokenRequests.push(u);
        if (req.headers.authorization !== `Basic ${Buffer.from('alice:s3cret-pw').toString('base64')}`) {
          res.writeHead(401).end();
          return true;
        }
        res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ token: 'tok-123', expires_in: 300 }));
        return true;
      }
      if (req.headers.authorization !== 'Bearer tok-123') {
        res.writeHead(401, { 'www-authenticate': `Bearer realm="http://${self}/token",service="berth-test",scope="repository:private/app:pull"` }).end();
        return true;
      }
      return false;
    });
    const store = await tmpStore();
    try {
      const anon = new RegistryClient(fast);
      await assert.rejects(anon.pull(store, parseRef(`${proxy.host}/private/app:1`)), (e: any) => e.code === 'unauthenticated' && /needs credentials/.test(e.message));
      const wrong = new RegistryClient({ ...fast, credentials: () => ({ username: 'alice', password: 'wrong-pw' }) });
      await assert.rejects(wrong.pull(store, parseRef(`${proxy.host}/private/app:1`)), (e: any) => e.code === 'unauthenticated' && !e.message.includes('wrong-pw') && /refused the credentials/.test(e.message));
      tokenRequests.length = 0;
      const ok = new RegistryClient({ ...fast, credentials: (r) => (r === proxy.host ? { username: 'alice', password: 's3cret-pw' } : undefined) });
      const res = await ok.pull(store, parseRef(`${proxy.host}/private/app:1`));
      assert.equal(res.digest, img.manifestDigest);
      assert.equal(tokenRequests.length, 1, 'one token, cached for the later requests');
      assert.equal(tokenRequests[0]!.searchParams.get('service'), 'berth-test');
      assert.deepEqual(tokenRequests[0]!.searchParams.getAll('scope'), ['repository:private/app:pull']);
    } finally {
      await store.cleanup();
      await proxy.stop();
    }
  });
});

describe('registry client against docker-registry with htpasswd auth', { skip }, () => {
  let reg: TestRegistry;
  const creds = { username: 'berth', password: 'pa55-word-x' };
  before(async () => {
    reg = await startRegistry({ auth: creds });
  });
  after(async () => {
    await reg?.stop();
  });

  test('basic auth: push and pull with credentials; none or wrong ones are refused without leaking them', async () => {
    const img = await sampleImage('basic');
    const anon = new RegistryClient(fast);
    const wrong = new RegistryClient({ ...fast, credentials: () => ({ username: 'berth', password: 'not-the-pw' }) });
    const ok = new RegistryClient({ ...fast, credentials: (r) => (r === reg.host ? creds : undefined) });
    await assert.rejects(pushImage(anon, img, `${reg.host}/auth/app:1`), (e: any) => e.code === 'unauthenticated' && /needs a user name and password/.test(e.message));
    await assert.rejects(pushImage(wrong, img, `${reg.host}/auth/app:1`), (e: unknown) => e instanceof BerthError && e.code === 'unauthenticated' && !e.message.includes('not-the-pw'));
    await pushImage(ok, img, `${reg.host}/auth/app:1`);
    const store = await tmpStore();
    try {
      await assert.rejects(anon.pull(store, parseRef(`${reg.host}/auth/app:1`)), (e: any) => e.code === 'unauthenticated');
      const res = await ok.pull(store, parseRef(`${reg.host}/auth/app:1`));
      assert.equal(res.digest, img.manifestDigest);
    } finally {
      await store.cleanup();
    }
  });
});
