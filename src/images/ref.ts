// Image references ("registry/repo:tag@sha256:..."), parsed and normalized the way Docker does:
// a first path component with a "." or ":" (or "localhost") names the registry, otherwise the
// image lives on docker.io and one-component names get the "library/" prefix. The grammar is the
// one of distribution's reference package (path components lowercase, tags ≤ 128 characters).
import { invalidArgument } from '../core/errors.js';

export const DEFAULT_REGISTRY = 'docker.io';
/** The registry host docker.io's API is actually served from. */
export const DOCKER_HUB_API_HOST = 'registry-1.docker.io';

const COMPONENT_RE = /^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$/;
const TAG_RE = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$/;
const DIGEST_RE = /^sha256:[0-9a-f]{64}$/;
const HOST_RE = /^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$/;
const MAX_NAME = 255;

export interface ImageRef {
  /** Registry host[:port], e.g. "docker.io" or "127.0.0.1:5000". */
  registry: string;
  /** Repository path inside the registry, e.g. "library/busybox". */
  repository: string;
  /** Tag; "latest" when neither a tag nor a digest was given. */
  tag?: string;
  /** "sha256:<hex>" when the reference pins a manifest. */
  digest?: string;
}

export function isDigest(s: string): boolean {
  return DIGEST_RE.test(s);
}

export function assertDigest(s: string, what = 'digest'): string {
  if (!DIGEST_RE.test(s)) throw invalidArgument(`${what} "${s.slice(0, 100)}" is not a sha256 digest; use "sha256:" followed by 64 lowercase hex digits`);
  return s;
}

export const REF_HINT = 'use [registry[:port]/]repository[:tag][@sha256:<64 hex>] with lowercase path components, e.g. "busybox:1.36" or "127.0.0.1:5000/team/app:v1"';

/** Parse and normalize an image reference; throws invalid_argument with what to fix. */
export function parseRef(input: string): ImageRef {
  const bad = (why: string) => invalidArgument(`image reference "${input.slice(0, 300)}" is invalid: ${why}; ${REF_HINT}`);
  if (input.length === 0) throw bad('it is empty');
  if (input.length > MAX_NAME + 80) throw bad(`it is longer than ${MAX_NAME + 80} characters`);
  let rest = input;
  let digest: string | undefined;
  const at = rest.indexOf('@');
  if (at >= 0) {
    digest = rest.slice(at + 1);
    rest = rest.slice(0, at);
    if (!DIGEST_RE.test(digest)) throw bad(`"@${digest.slice(0, 80)}" is not a sha256 digest`);
  }
  let tag: string | undefined;
  const lastSlash = rest.lastIndexOf('/');
  const colon = rest.lastIndexOf(':');
  if (colon > lastSlash) {
    tag = rest.slice(colon + 1);
    rest = rest.slice(0, colon);
    if (!TAG_RE.test(tag)) throw bad(`tag "${tag.slice(0, 140)}" must be 1–128 letters, digits, "_", "." or "-", not starting with "." or "-"`);
  }
  const parts = rest.split('/');
  let registry = DEFAULT_REGISTRY;
  if (parts.length > 1 && (parts[0]!.includes('.') || parts[0]!.includes(':') || parts[0] === 'localhost' || parts[0] !== parts[0]!.toLowerCase())) {
    registry = parts.shift()!;
    if (!HOST_RE.test(registry)) throw bad(`"${registry}" is not a valid registry host[:port]`);
  }
  for (const c of parts) {
    if (!COMPONENT_RE.test(c)) throw bad(`path component "${c.slice(0, 100)}" must be lowercase letters and digits, separated by ".", "_", "__" or "-"`);
  }
  if (registry === DEFAULT_REGISTRY && parts.length === 1) parts.unshift('library');
  const repository = parts.join('/');
  if (repository.length > MAX_NAME) throw bad(`the repository name is longer than ${MAX_NAME} characters`);
  if (tag === undefined && digest === undefined) tag = 'latest';
  return { registry, repository, ...(tag !== undefined ? { tag } : {}), ...(digest !== undefined ? { digest } : {}) };
}

/** "registry/repository" */
export function repoName(r: ImageRef): string {
  return `${r.registry}/${r.repository}`;
}

/** Canonical string: "registry/repository:tag", "registry/repository@digest" or both. */
export function formatRef(r: ImageRef): string {
  return `${repoName(r)}${r.tag !== undefined ? `:${r.tag}` : ''}${r.digest !== undefined ? `@${r.digest}` : ''}`;
}

/** The "registry/repository:tag" a pull records (tag "latest" for digest-only refs is not invented). */
export function tagRef(r: ImageRef): string | undefined {
  return r.tag !== undefined ? `${repoName(r)}:${r.tag}` : undefined;
}

/** Short form for display: "docker.io/library/x:t" → "x:t", "docker.io/u/x:t" → "u/x:t". */
export function familiarRef(canonical: string): string {
  if (canonical.startsWith(`${DEFAULT_REGISTRY}/library/`)) return canonical.slice(`${DEFAULT_REGISTRY}/library/`.length);
  if (canonical.startsWith(`${DEFAULT_REGISTRY}/`)) return canonical.slice(`${DEFAULT_REGISTRY}/`.length);
  return canonical;
}
