// Routes + settings → one complete Caddy JSON config (https://caddyserver.com/docs/json/).
// Pure: the same input gives the same bytes, so an unchanged desired set is recognised and not
// reloaded. Caddy does the data-plane work itself: round-robin load balancing with retries on
// refused connections (try_duration) and passive health checks, WebSockets, HTTP/2, TLS from its
// internal CA ("local") or from an ACME server.
// Known limit of Caddy 2.6 (Debian's): every config load closes the WebSocket (upgraded)
// connections it relays — in-flight HTTP requests finish, WebSockets must reconnect — and races
// idle keep-alive client connections. Caddy ≥ 2.7 has reverse_proxy `stream_close_delay`. So
// services use dynamic upstreams (DNS A records from Berth's DNS, refreshed every second): replicas
// coming and going change no config, only adding or removing a route does.
import { TOKEN_HEADER, TOKEN_PARAM, type IngressRoute, type IngressSettings } from './types.js';

export interface CaddyPaths {
  /** Unix socket of Caddy's admin API. */
  adminSocket: string;
  /** Caddy's storage: the local CA (pki/authorities/local) and the certificates. */
  storage: string;
}

/** How long one request may keep trying other backends when a dial fails (a replica that just died). */
export const TRY_DURATION = '5s';
/** A backend that refused a connection gets no traffic for this long (passive health check). */
export const FAIL_DURATION = '10s';

type Json = Record<string, unknown>;

function proxy(r: IngressRoute): Json {
  if (r.backends.length === 0 && !r.dynamic) {
    return {
      handler: 'static_response',
      status_code: 503,
      headers: { 'Content-Type': ['text/plain; charset=utf-8'], 'Retry-After': ['2'] },
      body: `503: no ready backend for {http.request.host} (route ${r.id}); it answers once a replica passes its readiness check\n`,
    };
  }
  return {
    handler: 'reverse_proxy',
    ...(r.dynamic
      ? {
          dynamic_upstreams: {
            source: 'a',
            name: r.dynamic.name,
            port: String(r.dynamic.port),
            refresh: `${r.dynamic.refreshMs}ms`,
            resolver: { addresses: r.dynamic.resolvers },
          },
        }
      : { upstreams: r.backends.map((b) => ({ dial: `${b.address}:${b.port}` })) }),
    load_balancing: { selection_policy: { policy: 'round_robin' }, try_duration: TRY_DURATION, try_interval: '50ms' },
    health_checks: { passive: { fail_duration: FAIL_DURATION, max_fails: 1 } },
    // Caddy keeps 32 idle upstream connections per host by default: more concurrent clients than
    // that would open a fresh backend connection per request.
    transport: { protocol: 'http', keep_alive: { max_idle_conns_per_host: 1024 } },
    headers: { request: { delete: [TOKEN_HEADER] } },
  };
}

/** Token check in front of the proxy: header, cookie, or query parameter (which sets the cookie). */
function guarded(r: IngressRoute): Json[] {
  if (!r.auth) return [proxy(r)];
  const token = r.auth.token; // [A-Za-z0-9_-] only (validated): inert in matchers, regexps and cookies
  const cookie = `${TOKEN_PARAM}=${token}; Path=/; HttpOnly; SameSite=Lax`;
  return [
    {
      handler: 'subroute',
      routes: [
        { match: [{ header: { [TOKEN_HEADER]: [token] } }], handle: [proxy(r)], terminal: true },
        { match: [{ header_regexp: { Cookie: { pattern: `(^|;\\s*)${TOKEN_PARAM}=${token}(;|$)` } } }], handle: [proxy(r)], terminal: true },
        {
          match: [{ query: { [TOKEN_PARAM]: [token] } }],
          handle: [{ handler: 'headers', response: { set: { 'Set-Cookie': [cookie] } } }, { handler: 'rewrite', uri_substring: [{ find: `${TOKEN_PARAM}=${token}`, replace: '' }] }, proxy(r)],
          terminal: true,
        },
        {
          handle: [
            {
              handler: 'static_response',
              status_code: 401,
              headers: { 'Content-Type': ['text/plain; charset=utf-8'] },
              body: `401: {http.request.host} needs its access token: send the header "${TOKEN_HEADER}: <token>" or open the URL once with ?${TOKEN_PARAM}=<token> (a cookie keeps it)\n`,
            },
          ],
        },
      ],
    },
  ];
}

function serverRoutes(routes: IngressRoute[]): Json[] {
  return [
    ...routes.map((r) => ({ match: [{ host: r.hosts }], handle: guarded(r), terminal: true })),
    {
      handle: [
        {
          handler: 'static_response',
          status_code: 404,
          headers: { 'Content-Type': ['text/plain; charset=utf-8'] },
          body: '404: no Berth ingress route for host {http.request.host}\n',
        },
      ],
    },
  ];
}

export function buildCaddyConfig(routes: IngressRoute[], s: IngressSettings, paths: CaddyPaths): Json {
  const sorted = [...routes].sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
  const servers: Json = {};
  // The HTTP listener serves every route (and ACME HTTP-01 challenges); redirects to HTTPS are off
  // because plain HTTP is a supported way in (tls: none, and tests).
  if (s.http) {
    servers.http = { listen: [`${hostPort(s.http.host, s.http.port)}`], routes: serverRoutes(sorted), automatic_https: { disable_redirects: true }, protocols: ['h1', 'h2c'] };
  }
  const tlsRoutes = sorted.filter((r) => r.tls !== 'none');
  if (s.https) {
    servers.https = { listen: [`${hostPort(s.https.host, s.https.port)}`], routes: serverRoutes(tlsRoutes), automatic_https: { disable_redirects: true }, protocols: ['h1', 'h2'] };
  }
  const hostsOf = (tls: string) => tlsRoutes.filter((r) => r.tls === tls).flatMap((r) => r.hosts).sort();
  const internal = { module: 'internal', ca: 'local' };
  const policies: Json[] = [];
  const localHosts = hostsOf('local');
  if (localHosts.length) policies.push({ subjects: localHosts, issuers: [internal] });
  const acmeHosts = hostsOf('acme');
  if (acmeHosts.length && s.acme) {
    policies.push({
      subjects: acmeHosts,
      issuers: [
        {
          module: 'acme',
          ca: s.acme.directory,
          email: s.acme.email,
          ...(s.acme.caRoot ? { trusted_roots_pem_files: [s.acme.caRoot] } : {}),
          challenges: { http: { disabled: !s.http }, 'tls-alpn': { disabled: !s.https } },
        },
      ],
    });
  }
  // Catch-all: nothing ever falls through to Caddy's default public ACME issuers.
  policies.push({ issuers: [internal] });
  return {
    admin: { listen: `unix/${paths.adminSocket}`, config: { persist: false } },
    storage: { module: 'file_system', root: paths.storage },
    logging: { logs: { default: { level: 'INFO' } } },
    apps: {
      pki: { certificate_authorities: { local: { name: 'Berth Local CA', install_trust: false } } },
      tls: { automation: { policies } },
      http: {
        ...(s.http ? { http_port: s.http.port } : {}),
        ...(s.https ? { https_port: s.https.port } : {}),
        servers,
      },
    },
  };
}

function hostPort(host: string, port: number): string {
  return host.includes(':') ? `[${host}]:${port}` : `${host}:${port}`;
}
