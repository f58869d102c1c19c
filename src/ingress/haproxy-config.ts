// Routes + settings → the HAProxy configuration files (https://docs.haproxy.org/2.6/configuration.html).
// Pure: the same input gives the same bytes, so an unchanged desired set is recognised and not
// reloaded. HAProxy does the data-plane work itself: Host → backend through a map (one lookup per
// request, whatever the number of routes), round-robin over the replicas, a refused connection
// retried on another replica (retries + redispatch), WebSockets (tunnel), HTTP/2 over TLS (ALPN),
// TLS with the certificates Berth keeps (crt-list: one line per host); tcp routes (a service's public
// tcp port) get a listener of their own on their host port, relayed as is (mode tcp).
// Service replicas come from Berth's DNS (resolvers + server-template): replicas coming and going
// need no reload. Route changes are applied by a seamless reload (master CLI `reload`): the old
// worker finishes its in-flight requests and relayed WebSockets, the new one takes the listeners.
import { createHash } from 'node:crypto';
import { TOKEN_HEADER, TOKEN_PARAM, tcpListenHost, type IngressRoute, type IngressSettings } from './types.js';

/**
 * A route's backend name: the same for the same route id whatever other routes come and go, so that
 * the servers' state saved before a reload (their DNS-resolved addresses) is loaded into the same
 * backend by the next worker (`server-state-file`, matched by backend and server name).
 */
export function backendName(routeId: string): string {
  return `r${createHash('sha256').update(routeId).digest('hex').slice(0, 12)}`;
}

export interface HaproxyPaths {
  /** The worker's runtime API (also hands the listening sockets to the next worker on reload). */
  workerSocket: string;
  /**
   * Servers' state (`show servers state`) saved just before a reload and loaded by the new worker:
   * DNS-discovered replicas keep their addresses across the reload instead of starting unresolved
   * (which answered 503 until the first DNS answer).
   */
  serverState?: string;
  /** Host → backend maps for the HTTP and the HTTPS frontend. */
  hostsMap: string;
  tlsHostsMap: string;
  /** One line per host with a certificate; the default certificate answers unknown SNI names. */
  crtList: string;
  defaultCert: string;
  /** Unix socket where berthd answers ACME http-01 challenges. */
  acmeSocket: string;
}

export interface HaproxyTuning {
  /** Worker threads (measured best: 1 on a 2-core host shared with the replicas; BENCHMARKS.md). */
  threads: number;
  /** `busy-polling`: the poller never sleeps (src/ingress/busypoll.ts decides when). */
  busyPolling?: boolean;
}

export interface HaproxyFiles {
  config: string;
  hostsMap: string;
  tlsHostsMap: string;
  crtList: string;
}

/** A refused connection is retried this many times, each on another replica (redispatch). */
export const RETRIES = 3;
/** Server slots per DNS-discovered service (the most replicas one service can have behind the ingress). */
export const DNS_SLOTS = 128; // spec.replicas ≤ 100, plus a deploy's surge
/** How long a request may wait for a replica slot (maxConnectionsPerReplica) before a 503. */
export const QUEUE_TIMEOUT = '30s';
const TEXT = 'content-type "text/plain; charset=utf-8"';
/** Idle limit of a tcp route's connections. */
const TCP_IDLE = '1h';
/** The Host without its port, lower-case (HTTP/2's :authority arrives here as Host too). */
const HOST = 'req.hdr(host),field(1,:),lower';

/**
 * A string for HAProxy's double quotes and log-format: quotes and backslashes escaped, `%` doubled,
 * control characters dropped (route ids are free text).
 */
export function quoteLf(s: string): string {
  return s.replace(/[\x00-\x1f\x7f]/g, '').replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/%/g, '%%');
}

function hostPort(host: string, port: number): string {
  return host.includes(':') ? `[${host}]:${port}` : `${host}:${port}`;
}

function backend(name: string, r: IngressRoute, resolvers: string | undefined, stateFile: boolean): string[] {
  const tcp = r.tcpPort !== undefined;
  const out = [`backend ${name}`, `  # route ${quoteLf(r.id)}`];
  // A tcp route's connections (a database, a message broker) may idle for long: an hour, not 5 minutes.
  if (tcp) out.push('  mode tcp', `  timeout server ${TCP_IDLE}`);
  if (r.auth) {
    const t = r.auth.token; // [A-Za-z0-9_-] only (validated): inert in ACLs, regexps and cookies
    out.push(
      `  acl tok_hdr req.hdr(${TOKEN_HEADER}) -m str ${t}`,
      `  acl tok_cookie req.cook(${TOKEN_PARAM}) -m str ${t}`,
      `  acl tok_query urlp(${TOKEN_PARAM}) -m str ${t}`,
      `  http-request return status 401 ${TEXT} lf-string "401: %[${HOST}] needs its access token: send the header \\"${TOKEN_HEADER}: <token>\\" or open the URL once with ?${TOKEN_PARAM}=<token> (a cookie keeps it)\\n" unless tok_hdr || tok_cookie || tok_query`,
      `  http-request set-var(txn.berth_cookie) bool(true) if tok_query !tok_hdr !tok_cookie`,
      `  http-request set-query %[query,regsub(${TOKEN_PARAM}=${t}&?,)] if tok_query`,
      `  http-response add-header Set-Cookie "${TOKEN_PARAM}=${t}; Path=/; HttpOnly; SameSite=Lax" if { var(txn.berth_cookie) -m bool }`,
    );
  }
  if (!tcp) out.push(`  http-request del-header ${TOKEN_HEADER}`);
  const maxconn = r.maxConnsPerBackend ? ` maxconn ${r.maxConnsPerBackend}` : '';
  // Passive health: a refused connection takes the server out at once (the request is redispatched);
  // a TCP connect check (every 2 s; every 250 ms while down) brings it back.
  const health = ' check inter 2s downinter 250ms fall 1 rise 1 observe layer4 error-limit 1 on-error mark-down';
  if (r.dynamic && resolvers) {
    out.push('  balance roundrobin', ...(stateFile ? ['  load-server-state-from-file global'] : []), `  server-template s 1-${DNS_SLOTS} ${r.dynamic.name}:${r.dynamic.port} resolvers ${resolvers} resolve-prefer ipv4 init-addr ${stateFile ? 'last,none' : 'none'}${maxconn}${health}`);
  } else if (r.backends.length) {
    out.push('  balance roundrobin', ...r.backends.map((b, i) => `  server s${i} ${b.address}:${b.port}${maxconn}${health}`));
  } else if (!tcp) {
    out.push(`  http-request return status 503 ${TEXT} hdr Retry-After 2 lf-string "503: no ready backend for %[${HOST}] (route ${quoteLf(r.id)}); it answers once a replica passes its readiness check\\n"`);
  }
  return out;
}

/** The host ports of the tcp routes' listeners in a configuration rendered below (what a running proxy holds). */
export function tcpPortsIn(config: string): number[] {
  return [...config.matchAll(/^frontend t[0-9a-f]+\n {2}mode tcp\n {2}bind \S+:(\d+)$/gm)].map((m) => Number(m[1]));
}

export function buildHaproxyConfig(routes: IngressRoute[], s: IngressSettings, paths: HaproxyPaths, tuning: HaproxyTuning, certs: ReadonlyMap<string, string>): HaproxyFiles {
  const sorted = [...routes].sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
  // One resolvers section per distinct DNS server list (one per project network).
  const resolverSets = [...new Set(sorted.filter((r) => r.dynamic).map((r) => r.dynamic!.resolvers.join(' ')))].sort();
  const resolverName = (r: IngressRoute) => (r.dynamic ? `dns${resolverSets.indexOf(r.dynamic.resolvers.join(' '))}` : undefined);
  const lines = [
    '# Rendered by berthd (src/ingress/haproxy-config.ts); changes here are overwritten.',
    'global',
    `  nbthread ${tuning.threads}`,
    '  maxconn 4096',
    ...(tuning.busyPolling ? ['  busy-polling'] : []),
    ...(paths.serverState ? [`  server-state-file ${paths.serverState}`] : []),
    `  stats socket ${paths.workerSocket} mode 600 level admin expose-fd listeners`,
    // Old workers finish in-flight requests and WebSockets after a reload, for at most this long.
    '  hard-stop-after 10m',
    '  ssl-default-bind-options ssl-min-ver TLSv1.2',
    '',
    'defaults',
    '  mode http',
    '  timeout connect 5s',
    // Idle limits, generous for slow responses and event streams; a slow request header is cut at 30 s.
    '  timeout client 5m',
    '  timeout server 5m',
    '  timeout tunnel 1h',
    '  timeout http-request 30s',
    '  timeout http-keep-alive 60s',
    `  timeout queue ${QUEUE_TIMEOUT}`,
    '  timeout client-fin 5s',
    // After a reload the old worker answers the next request on an idle keep-alive connection (with
    // `Connection: close`) instead of closing it under a client that may be sending one right then:
    // 2 read errors in 131,610 requests under wrk across a busy-polling reload (zero-downtime test).
    '  option idle-close-on-response',
    `  retries ${RETRIES}`,
    '  option redispatch 1',
    // Only a failed connection is retried (HAProxy's default): no request reached a replica, so a
    // retry is safe for any method. Also retrying on an empty response (L7 retries) would replay
    // requests a replica may have acted on (a POST), and makes HAProxy copy every request into a
    // spare buffer: measured ~3 µs of proxy CPU per request (of ~90) behind a busybox replica.
    // Replicas leave the routes before they stop (services reconciler: draining), so deploys need
    // no such retry (test/zero-downtime.test.ts).
    '  retry-on conn-failure',
  ];
  for (const [i, set] of resolverSets.entries()) {
    lines.push('', `resolvers dns${i}`, ...set.split(' ').map((a, j) => `  nameserver ns${j} ${a}`));
    const ms = Math.min(...sorted.filter((r) => r.dynamic?.resolvers.join(' ') === set).map((r) => r.dynamic!.refreshMs));
    // Ask every refreshMs; a replica that left the answer leaves the backend at once (hold obsolete 0).
    lines.push('  accepted_payload_size 8192', `  timeout resolve ${ms}ms`, '  timeout retry 200ms', '  resolve_retries 3', '  hold valid 10s', '  hold obsolete 0s', '  hold nx 0s', '  hold other 2s', '  hold refused 2s', '  hold timeout 2s');
  }
  const names = new Map(sorted.map((r) => [r.id, backendName(r.id)]));
  const front = (name: string, addr: string, bind: string, map: string) => {
    lines.push('', `frontend ${name}`, `  bind ${addr}${bind}`, '  option forwardfor');
    if (s.acme) lines.push('  use_backend acme_challenge if { path_beg /.well-known/acme-challenge/ }');
    lines.push(`  use_backend %[${HOST},map_str(${map},no_route)]`);
  };
  if (s.http) front('http', hostPort(s.http.host, s.http.port), '', paths.hostsMap);
  if (s.https) front('https', hostPort(s.https.host, s.https.port), ` ssl crt ${paths.defaultCert} crt-list ${paths.crtList} alpn h2,http/1.1`, paths.tlsHostsMap);
  // tcp routes: a listener each; with no ready backend a connection is accepted and closed.
  const tcpHost = tcpListenHost(s);
  for (const r of sorted.filter((x) => x.tcpPort !== undefined)) {
    const name = names.get(r.id)!;
    lines.push('', `frontend t${name.slice(1)}`, '  mode tcp', `  bind ${hostPort(tcpHost, r.tcpPort!)}`, `  timeout client ${TCP_IDLE}`, `  default_backend ${name}`);
  }
  lines.push('', 'backend no_route', `  http-request return status 404 ${TEXT} lf-string "404: no Berth ingress route for host %[${HOST}]\\n"`);
  if (s.acme) lines.push('', 'backend acme_challenge', `  server berthd unix@${paths.acmeSocket}`);
  for (const r of sorted) lines.push('', ...backend(names.get(r.id)!, r, resolverName(r), Boolean(paths.serverState)));
  const map = (rs: IngressRoute[]) =>
    rs
      .flatMap((r) => r.hosts.map((h) => `${h} ${names.get(r.id)}`))
      .sort()
      .map((l) => `${l}\n`)
      .join('');
  const tlsRoutes = sorted.filter((r) => r.tls !== 'none');
  const crtList = tlsRoutes
    .flatMap((r) => r.hosts)
    .filter((h) => certs.has(h))
    .sort()
    .map((h) => `${certs.get(h)} ${h}\n`)
    .join('');
  return { config: `${lines.join('\n')}\n`, hostsMap: map(sorted), tlsHostsMap: map(tlsRoutes), crtList };
}
