// The ingress's vocabulary: what a route is, what the ingress is configured with, and the checks
// that keep bad routes and bad flags out (validated here, at the edge, once).
import { readFileSync } from 'node:fs';
import { isIPv4 } from 'node:net';
import { invalidArgument } from '../core/errors.js';
import { BUSY_POLL_MODES, type BusyPollMode } from './busypoll.js';

export type IngressTls = 'local' | 'acme' | 'none';

export interface IngressBackend {
  /** IPv4 address (inside Berth's bridges, or loopback in tests). */
  address: string;
  port: number;
}

export interface IngressRoute {
  /** Owner key, e.g. 'service/<project>/<name>' or 'sandbox/<project>/<name>/<port>'. Unique. */
  id: string;
  /** Exact Host names, lower-case; no wildcards. A host belongs to one route only. */
  hosts: string[];
  /** Ready replicas; empty = the ingress answers 503. */
  backends: IngressBackend[];
  /** local = certificate from Berth's local CA (default); acme = from the configured ACME server; none = HTTP only. */
  tls: IngressTls;
  /** If set, requests need `x-berth-token: <token>`, or `?berth_token=<token>` (which then sets a cookie). */
  auth?: { token: string };
  /**
   * Backends found by the proxy itself from DNS A records of `name` (Berth's DNS answers a
   * service's ready replicas), asked every `refreshMs`: replicas come and go without a reload.
   * `backends` is then unused (it still says how many replicas are ready, for status).
   */
  dynamic?: { name: string; port: number; resolvers: string[]; refreshMs: number };
  /**
   * At most this many connections to one backend at a time; requests beyond it wait in the
   * ingress's queue instead of overflowing a replica's accept queue. Unset = unlimited.
   */
  maxConnsPerBackend?: number;
  /**
   * A TCP route instead of an HTTP one: the ingress listens on this host port (on the address of
   * its HTTP listener, else of its HTTPS one) and relays connections, as they are, to the backends.
   * Such a route has no hosts and tls "none".
   */
  tcpPort?: number;
}

export interface ListenAddr {
  host: string;
  port: number;
}

export interface AcmeOptions {
  /** ACME directory URL, e.g. https://acme-v02.api.letsencrypt.org/directory. */
  directory: string;
  email: string;
  /** PEM file with the root that signs the ACME server's own HTTPS certificate (private ACME servers). */
  caRoot?: string;
}

export interface IngressSettings {
  /** undefined = no HTTP listener. */
  http: ListenAddr | undefined;
  /** undefined = no HTTPS listener. */
  https: ListenAddr | undefined;
  /** Suffix of generated names, e.g. `<service>.<project>.<baseDomain>`. */
  baseDomain: string;
  acme: AcmeOptions | undefined;
  /** HAProxy's busy-polling: "auto" (default: under sustained load only, src/ingress/busypoll.ts), "on", "off". */
  busyPolling?: BusyPollMode;
}

export const DEFAULT_BASE_DOMAIN = 'berth.localhost';
export const TOKEN_HEADER = 'x-berth-token';
export const TOKEN_PARAM = 'berth_token';

const HOSTNAME = /^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$/;
/** Tokens end up in proxy matchers and cookies: a URL- and cookie-safe alphabet keeps them inert there. */
const TOKEN = /^[A-Za-z0-9_-]{16,256}$/;

/** The address the tcp routes' listeners bind: the HTTP listener's, else the HTTPS one's. */
export function tcpListenHost(s: IngressSettings): string {
  return (s.http ?? s.https)?.host ?? '0.0.0.0';
}

export function isHostname(h: string): boolean {
  return HOSTNAME.test(h);
}

/** Problems with one route, as sentences that say the fix; empty = valid. */
export function routeProblems(r: IngressRoute, acme: boolean): string[] {
  const p: string[] = [];
  if (typeof r.id !== 'string' || !r.id) p.push('id must be a non-empty string');
  if (r.tcpPort !== undefined) {
    if (!Number.isInteger(r.tcpPort) || r.tcpPort < 1 || r.tcpPort > 65535) p.push(`tcpPort ${r.tcpPort} must be 1-65535`);
    if (r.hosts?.length || r.tls !== 'none' || r.auth) p.push('a tcp route (tcpPort) has no hosts, no auth and tls "none": the ingress relays its connections as they are');
  } else if (!Array.isArray(r.hosts) || r.hosts.length === 0) p.push('hosts must list at least one host name');
  for (const h of r.hosts ?? []) {
    if (typeof h !== 'string' || !isHostname(h)) p.push(`host "${h}" is not a lower-case DNS name (letters, digits, dashes, dots; no wildcards, no port)`);
  }
  for (const b of r.backends ?? []) {
    if (!isIPv4(b.address)) p.push(`backend address "${b.address}" must be an IPv4 address`);
    if (!Number.isInteger(b.port) || b.port < 1 || b.port > 65535) p.push(`backend port ${b.port} must be 1-65535`);
  }
  if (!Array.isArray(r.backends)) p.push('backends must be an array (empty = answer 503)');
  if (!['local', 'acme', 'none'].includes(r.tls)) p.push(`tls "${r.tls}" must be local, acme or none`);
  if (r.tls === 'acme' && !acme) p.push('tls "acme" needs berthd started with --acme-directory and --acme-email; use tls "local" otherwise');
  if (r.auth && (typeof r.auth.token !== 'string' || !TOKEN.test(r.auth.token))) p.push('auth.token must be 16-256 characters of A-Z a-z 0-9 _ -');
  if (r.maxConnsPerBackend !== undefined && !(Number.isInteger(r.maxConnsPerBackend) && r.maxConnsPerBackend >= 1 && r.maxConnsPerBackend <= 100_000)) p.push('maxConnsPerBackend must be an integer 1-100000');
  if (r.dynamic) {
    if (!isHostname(r.dynamic.name)) p.push(`dynamic.name "${r.dynamic.name}" must be a DNS name`);
    if (!Number.isInteger(r.dynamic.port) || r.dynamic.port < 1 || r.dynamic.port > 65535) p.push(`dynamic.port ${r.dynamic.port} must be 1-65535`);
    for (const a of r.dynamic.resolvers) if (!/^\d+\.\d+\.\d+\.\d+:\d+$/.test(a) || !isIPv4(a.split(':')[0]!)) p.push(`dynamic resolver "${a}" must be IPv4:port`);
    if (!(r.dynamic.refreshMs >= 100)) p.push('dynamic.refreshMs must be at least 100');
  }
  return p;
}

/** "host:port" or "off" → address or undefined. */
export function parseListenFlag(flag: string, value: string): ListenAddr | undefined {
  const v = value.trim();
  if (v === 'off') return undefined;
  const m = /^\[?([^\]]*)\]?:(\d{1,5})$/.exec(v);
  const port = m ? Number(m[2]) : NaN;
  if (!m || !m[1] || port < 1 || port > 65535) {
    throw invalidArgument(`${flag} "${value}" must be host:port with a port 1-65535 (e.g. 0.0.0.0:80) or "off"`);
  }
  return { host: m[1], port };
}

export interface IngressFlags {
  ingressHttp: string;
  ingressHttps: string;
  baseDomain: string;
  acmeDirectory?: string;
  acmeEmail?: string;
  acmeCaRoot?: string;
  ingressBusyPoll?: string;
}

/** Daemon flags → settings; throws a clear error for each bad flag. */
export function settingsFromFlags(f: IngressFlags): IngressSettings {
  const http = parseListenFlag('--ingress-http', f.ingressHttp);
  const https = parseListenFlag('--ingress-https', f.ingressHttps);
  if (http && https && http.port === https.port) throw invalidArgument(`--ingress-http and --ingress-https both use port ${http.port}; give them different ports`);
  const baseDomain = f.baseDomain.trim().toLowerCase();
  if (!isHostname(baseDomain)) throw invalidArgument(`--base-domain "${f.baseDomain}" must be a DNS name such as berth.localhost`);
  let acme: AcmeOptions | undefined;
  if (f.acmeDirectory || f.acmeEmail || f.acmeCaRoot) {
    if (!f.acmeDirectory || !f.acmeEmail) throw invalidArgument('ACME needs both --acme-directory URL and --acme-email ADDRESS');
    let u: URL;
    try {
      u = new URL(f.acmeDirectory);
    } catch {
      throw invalidArgument(`--acme-directory "${f.acmeDirectory}" is not a URL; use the server's directory URL, e.g. https://acme-v02.api.letsencrypt.org/directory`);
    }
    if (u.protocol !== 'https:') throw invalidArgument(`--acme-directory "${f.acmeDirectory}" must be an https:// URL (ACME requires HTTPS)`);
    if (!/^[^@\s]+@[^@\s]+\.[^@\s]+$/.test(f.acmeEmail)) throw invalidArgument(`--acme-email "${f.acmeEmail}" is not an e-mail address`);
    if (f.acmeCaRoot) {
      let pem = '';
      try {
        pem = readFileSync(f.acmeCaRoot, 'utf8');
      } catch (e) {
        throw invalidArgument(`--acme-ca-root "${f.acmeCaRoot}" cannot be read (${(e as NodeJS.ErrnoException).code}); give the path of a PEM certificate file`);
      }
      if (!pem.includes('BEGIN CERTIFICATE')) throw invalidArgument(`--acme-ca-root "${f.acmeCaRoot}" holds no PEM certificate`);
    }
    if (!http && !https) throw invalidArgument('ACME needs an ingress listener for its challenges; do not turn both --ingress-http and --ingress-https off');
    acme = { directory: f.acmeDirectory, email: f.acmeEmail, ...(f.acmeCaRoot ? { caRoot: f.acmeCaRoot } : {}) };
  }
  const busyPolling = (f.ingressBusyPoll ?? 'auto') as BusyPollMode;
  if (!BUSY_POLL_MODES.includes(busyPolling)) throw invalidArgument(`--ingress-busy-poll "${f.ingressBusyPoll}" must be auto, on or off`);
  return { http, https, baseDomain, acme, busyPolling };
}
