// OCI image-spec and Docker v2 schema 2 documents: media types, and zod schemas for the fields
// Berth reads. Documents come from registries and archives, i.e. from outside: unknown fields are
// kept (the specs allow them) but every field Berth uses is checked before use.
import { z } from 'zod';
import { invalidArgument } from '../core/errors.js';

export const MT = {
  ociManifest: 'application/vnd.oci.image.manifest.v1+json',
  ociIndex: 'application/vnd.oci.image.index.v1+json',
  ociConfig: 'application/vnd.oci.image.config.v1+json',
  ociLayer: 'application/vnd.oci.image.layer.v1.tar',
  ociLayerGzip: 'application/vnd.oci.image.layer.v1.tar+gzip',
  ociLayerZstd: 'application/vnd.oci.image.layer.v1.tar+zstd',
  ociLayerNondistGzip: 'application/vnd.oci.image.layer.nondistributable.v1.tar+gzip',
  dockerManifest: 'application/vnd.docker.distribution.manifest.v2+json',
  dockerList: 'application/vnd.docker.distribution.manifest.list.v2+json',
  dockerConfig: 'application/vnd.docker.container.image.v1+json',
  dockerLayerGzip: 'application/vnd.docker.image.rootfs.diff.tar.gzip',
  dockerForeignGzip: 'application/vnd.docker.image.rootfs.foreign.diff.tar.gzip',
  dockerSchema1Signed: 'application/vnd.docker.distribution.manifest.v1+prettyjws',
  dockerSchema1: 'application/vnd.docker.distribution.manifest.v1+json',
} as const;

export const MANIFEST_TYPES: readonly string[] = [MT.ociManifest, MT.dockerManifest];
export const INDEX_TYPES: readonly string[] = [MT.ociIndex, MT.dockerList];
/** Accept header for manifest requests: every type Berth understands, listed explicitly. */
export const MANIFEST_ACCEPT = [MT.ociIndex, MT.ociManifest, MT.dockerList, MT.dockerManifest].join(', ');

/** Registries and archives may not make Berth read more than this for one manifest or config. */
export const MAX_MANIFEST_BYTES = 4 * 1024 * 1024;

const Digest = z.string().regex(/^sha256:[0-9a-f]{64}$/, { message: 'must be a sha256 digest' });

export const Descriptor = z.object({
  mediaType: z.string().max(255),
  digest: Digest,
  size: z.number().int().min(0).max(Number.MAX_SAFE_INTEGER),
  platform: z
    .object({ architecture: z.string(), os: z.string(), variant: z.string().optional() })
    .passthrough()
    .optional(),
  annotations: z.record(z.string(), z.string()).optional(),
});
export type Descriptor = z.infer<typeof Descriptor>;

export const Manifest = z.object({
  schemaVersion: z.literal(2),
  mediaType: z.string().optional(),
  config: Descriptor,
  layers: z.array(Descriptor).max(1000),
  annotations: z.record(z.string(), z.string()).optional(),
});
export type Manifest = z.infer<typeof Manifest>;

export const Index = z.object({
  schemaVersion: z.literal(2),
  mediaType: z.string().optional(),
  manifests: z.array(Descriptor).max(10_000),
});
export type Index = z.infer<typeof Index>;

const StrList = z.array(z.string()).nullish();
export const ImageConfigDoc = z.object({
  created: z.string().optional(),
  architecture: z.string().optional(),
  os: z.string().optional(),
  config: z
    .object({
      Env: StrList,
      Entrypoint: StrList,
      Cmd: StrList,
      WorkingDir: z.string().nullish(),
      User: z.string().nullish(),
      Labels: z.record(z.string(), z.string()).nullish(),
      ExposedPorts: z.record(z.string(), z.unknown()).nullish(),
    })
    .passthrough()
    .nullish(),
  rootfs: z.object({ type: z.literal('layers'), diff_ids: z.array(Digest) }),
});
export type ImageConfigDoc = z.infer<typeof ImageConfigDoc>;

/** Layer media types Berth can unpack, with their compression. */
export function layerCompression(mediaType: string): 'gzip' | 'none' | 'zstd' | undefined {
  switch (mediaType) {
    case MT.ociLayerGzip:
    case MT.ociLayerNondistGzip:
    case MT.dockerLayerGzip:
    case MT.dockerForeignGzip:
      return 'gzip';
    case MT.ociLayer:
    case 'application/vnd.oci.image.layer.nondistributable.v1.tar':
      return 'none';
    case MT.ociLayerZstd:
      return 'zstd';
    default:
      return undefined;
  }
}

export type ParsedManifest = { kind: 'manifest'; mediaType: string; doc: Manifest } | { kind: 'index'; mediaType: string; doc: Index };

function issues(e: z.ZodError): string {
  return e.issues
    .slice(0, 5)
    .map((i) => `${i.path.join('.') || '(document)'}: ${i.message}`)
    .join('; ');
}

/**
 * Parse a manifest or index. `mediaType` is what the transport said (Content-Type); the
 * document's own mediaType field wins when present and must agree with it.
 */
export function parseManifest(bytes: Buffer, mediaType: string | undefined, what: string): ParsedManifest {
  if (bytes.length > MAX_MANIFEST_BYTES) throw invalidArgument(`${what} is ${bytes.length} bytes, over the 4 MiB limit for manifests; Berth refuses it`);
  let raw: unknown;
  try {
    raw = JSON.parse(bytes.toString('utf8'));
  } catch {
    throw invalidArgument(`${what} is not valid JSON`);
  }
  if (!raw || typeof raw !== 'object') throw invalidArgument(`${what} is not a JSON object`);
  const own = (raw as { mediaType?: unknown }).mediaType;
  const ct = (mediaType ?? '').split(';')[0]!.trim();
  let mt = typeof own === 'string' && own ? own : ct;
  if (!mt || mt === 'application/json' || mt === 'application/octet-stream') {
    // OCI allows documents without mediaType: tell them apart by shape.
    mt = Array.isArray((raw as { manifests?: unknown }).manifests) ? MT.ociIndex : MT.ociManifest;
  }
  if (mt === MT.dockerSchema1 || mt === MT.dockerSchema1Signed || (raw as { schemaVersion?: unknown }).schemaVersion === 1) {
    throw invalidArgument(`${what} is a Docker schema 1 manifest, which Berth does not support; push the image again with a current Docker or buildah (schema 2 / OCI)`);
  }
  if (MANIFEST_TYPES.includes(mt)) {
    const r = Manifest.safeParse(raw);
    if (!r.success) throw invalidArgument(`${what} is not a valid image manifest: ${issues(r.error)}`);
    return { kind: 'manifest', mediaType: mt, doc: r.data };
  }
  if (INDEX_TYPES.includes(mt)) {
    const r = Index.safeParse(raw);
    if (!r.success) throw invalidArgument(`${what} is not a valid image index: ${issues(r.error)}`);
    return { kind: 'index', mediaType: mt, doc: r.data };
  }
  throw invalidArgument(`${what} has media type "${mt.slice(0, 100)}", which is not an image manifest or index Berth understands (OCI or Docker v2)`);
}

export function parseConfig(bytes: Buffer, what: string): ImageConfigDoc {
  if (bytes.length > MAX_MANIFEST_BYTES) throw invalidArgument(`${what} is ${bytes.length} bytes, over the 4 MiB limit for image configs`);
  let raw: unknown;
  try {
    raw = JSON.parse(bytes.toString('utf8'));
  } catch {
    throw invalidArgument(`${what} is not valid JSON`);
  }
  const r = ImageConfigDoc.safeParse(raw);
  if (!r.success) throw invalidArgument(`${what} is not a valid image config: ${issues(r.error)}`);
  return r.data;
}

/** The platform Berth runs images for: linux and the host's architecture in OCI spelling. */
export function hostPlatform(): { os: string; architecture: string } {
  const arch: Record<string, string> = { x64: 'amd64', arm64: 'arm64', arm: 'arm', ia32: '386', ppc64: 'ppc64le', s390x: 's390x', riscv64: 'riscv64' };
  return { os: 'linux', architecture: arch[process.arch] ?? process.arch };
}
