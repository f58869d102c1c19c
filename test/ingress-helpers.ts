// Test helpers for the ingress: small loopback backends (HTTP + a WebSocket echo), requests by
// Host name through the ingress over HTTP, HTTPS and HTTP/2, and a pebble ACME server.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import http2 from 'node:http2';
import https from 'node:https';
import tls from 'node:tls';
import { createServer, type AddressInfo, type Socket } from 'node:net';
import { join } from 'node:path';
import { TestDaemon } from './harness.js';

export async function freePort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', () => r()));
  const port = (s.address() as AddressInfo).port;
  await new Promise((r) => s.close(r));
  return port;
}

/** A backend that answers "<name> <url>" and echoes WebSocket bytes; counts its requests. */
export class Backend {
  hits = 0;
  lastHeaders: http.IncomingHttpHeaders = {};
  readonly server: http.Server;
  private sockets = new Set<Socket>();
  constructor(readonly name: string) {
    this.server = http.createServer((req, res) => {
      this.hits++;
      this.lastHeaders = req.headers;
      res.end(`${this.name} ${req.url}`);
    });
    this.server.on('connection', (s) => {
      this.sockets.add(s);
      s.on('close', () => this.sockets.delete(s));
    });
    // WebSocket handshake (RFC 6455 §4.2.2), then the raw byte stream is echoed back: enough to
    // show the proxy upgraded the connection and relays both directions.
    this.server.on('upgrade', (req, socket: Socket) => {
      const accept = createHash('sha1').update(`${req.headers['sec-websocket-key']}258EAFA5-E914-47DA-95CA-C5AB0DC85B11`).digest('base64');
      socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${accept}\r\n\r\n`);
      socket.pipe(socket);
    });
  }
  async listen(): Promise<this> {
    await new Promise<void>((r) => this.server.listen(0, '127.0.0.1', () => r()));
    return this;
  }
  get port(): number {
    return (this.server.address() as AddressInfo).port;
  }
  /** Dies like a crashed replica: the port refuses connections from now on. */
  async kill(): Promise<void> {
    const closed = new Promise((r) => this.server.close(r));
    for (const s of this.sockets) s.destroy();
    await closed;
  }
}

export interface Res {
  status: number;
  body: string;
  headers: http.IncomingHttpHeaders;
}

export function get(port: number, host: string, path = '/', headers: Record<string, string> = {}): Promise<Res> {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port, path, headers: { host, ...headers }, agent: false }, (res) => {
      let body = '';
      res.setEncoding('utf8').on('data', (d: string) => (body += d));
      res.on('end', () => resolve({ status: res.statusCode!, body, headers: res.headers }));
    });
    // A backend that accepted the connection but never answers (e.g. a paused sandbox) must not hang a test.
    req.setTimeout(10_000, () => req.destroy(new Error('no response within 10 s')));
    req.on('error', reject);
    req.end();
  });
}

export function getTls(port: number, host: string, ca: string, path = '/'): Promise<Res & { issuer: string; alpn: string | false | null }> {
  return new Promise((resolve, reject) => {
    const req = https.request({ host: '127.0.0.1', port, path, servername: host, ca, headers: { host }, agent: false }, (res) => {
      let body = '';
      const sock = res.socket as import('node:tls').TLSSocket;
      const issuer = String(sock.getPeerCertificate().issuer?.CN ?? '');
      res.setEncoding('utf8').on('data', (d: string) => (body += d));
      res.on('end', () => resolve({ status: res.statusCode!, body, headers: res.headers, issuer, alpn: sock.alpnProtocol }));
    });
    req.on('error', reject);
    req.end();
  });
}

/** One HTTP/2 request over TLS (ALPN h2 only): fails unless the ingress speaks h2. */
export async function getH2(port: number, host: string, ca: string): Promise<{ status: number; body: string; alpn: string | undefined }> {
  // Connect to loopback but present `host` (SNI and :authority), as a browser resolving it would.
  const session = http2.connect(`https://${host}:${port}`, { ca, servername: host, createConnection: () => tls.connect({ host: '127.0.0.1', port, servername: host, ca, ALPNProtocols: ['h2'] }) });
  try {
    await new Promise<void>((resolve, reject) => {
      session.once('connect', () => resolve());
      session.once('error', reject);
    });
    const alpn = (session.socket as import('node:tls').TLSSocket).alpnProtocol || undefined;
    const req = session.request({ ':path': '/h2', ':authority': host });
    const status = await new Promise<number>((resolve, reject) => {
      req.once('response', (h) => resolve(Number(h[':status'])));
      req.once('error', reject);
    });
    let body = '';
    req.setEncoding('utf8');
    for await (const d of req) body += d;
    return { status, body, alpn };
  } finally {
    session.close();
  }
}

/** Upgrade to a WebSocket through the ingress, send bytes, read them back. */
export function wsEcho(port: number, host: string, payload: string): Promise<{ status: number; echoed: string }> {
  return new Promise((resolve, reject) => {
    const req = http.request({
      host: '127.0.0.1',
      port,
      path: '/ws',
      agent: false,
      headers: { host, connection: 'Upgrade', upgrade: 'websocket', 'sec-websocket-version': '13', 'sec-websocket-key': Buffer.from('0123456789abcdef').toString('base64') },
    });
    req.on('upgrade', (res, socket) => {
      let got = '';
      socket.setEncoding('utf8').on('data', (d: string) => {
        got += d;
        if (got.length >= payload.length) {
          socket.destroy();
          resolve({ status: res.statusCode!, echoed: got });
        }
      });
      socket.write(payload);
    });
    req.on('response', (res) => resolve({ status: res.statusCode!, echoed: '' }));
    req.on('error', reject);
    req.end();
  });
}

/** Retry until the check passes (certificates are issued a moment after a route appears). */
export async function eventually<T>(f: () => Promise<T>, ok: (x: T) => boolean, timeoutMs = 20_000, explain?: () => Promise<unknown>): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const x = await f();
      if (ok(x)) return x;
      last = x;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) {
      // What else to know when it failed (e.g. the ingress's own status: its last error, rejected routes).
      const why = explain ? `; ${JSON.stringify(await explain().catch((e: Error) => `(explain failed: ${e.message})`))}` : '';
      throw new Error(`timed out; last: ${last instanceof Error ? last.message : JSON.stringify(last)}${why}`);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** HAProxy masters serving this data dir (its workers, children of the master, are not counted). */
export function proxyPids(dataDir: string): number[] {
  const all = spawnSync('pgrep', ['-x', 'haproxy'], { encoding: 'utf8' }).stdout.split('\n').filter(Boolean).map(Number);
  const ours = all.filter((pid) => {
    try {
      return readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes(join(dataDir, 'ingress'));
    } catch {
      return false;
    }
  });
  const ppid = (pid: number) => Number(/^PPid:\s+(\d+)/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1]);
  return ours.filter((pid) => {
    try {
      return !ours.includes(ppid(pid));
    } catch {
      return false;
    }
  });
}

/**
 * Pebble (Let's Encrypt's ACME test server, Debian `pebble`) on loopback, with
 * pebble-challtestsrv as its DNS server answering 127.0.0.1 for every name, and its validation
 * ports pointed at the ingress's HTTP and HTTPS ports: challenges are really validated.
 */
export class Pebble {
  private procs: ChildProcess[] = [];
  readonly dir = mkdtempSync('/tmp/berth-pebble-');
  directory = '';
  /** The root that signs pebble's own HTTPS certificate (for --acme-ca-root). */
  caFile = join(this.dir, 'ca.pem');
  mgmtPort = 0;

  async start(ingressHttp: number, ingressHttps: number): Promise<void> {
    const sh = (args: string[]) => {
      const r = spawnSync('openssl', args, { cwd: this.dir, encoding: 'utf8' });
      if (r.status !== 0) throw new Error(`openssl ${args.join(' ')}: ${r.stderr}`);
    };
    sh(['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', 'ca.key', '-out', 'ca.pem', '-days', '2', '-subj', '/CN=berth test pebble CA']);
    sh(['req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', 'key.pem', '-out', 'srv.csr', '-subj', '/CN=localhost']);
    writeFileSync(join(this.dir, 'ext.cnf'), 'subjectAltName=IP:127.0.0.1,DNS:localhost\n');
    sh(['x509', '-req', '-in', 'srv.csr', '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial', '-out', 'cert.pem', '-days', '2', '-extfile', 'ext.cnf']);
    const port = await freePort();
    this.mgmtPort = await freePort();
    const dns = await freePort();
    writeFileSync(
      join(this.dir, 'pebble.json'),
      JSON.stringify({
        pebble: {
          listenAddress: `127.0.0.1:${port}`,
          managementListenAddress: `127.0.0.1:${this.mgmtPort}`,
          certificate: join(this.dir, 'cert.pem'),
          privateKey: join(this.dir, 'key.pem'),
          httpPort: ingressHttp,
          tlsPort: ingressHttps,
          ocspResponderURL: '',
          externalAccountBindingRequired: false,
        },
      }),
    );
    const mgmt = await freePort();
    this.procs.push(
      spawn('pebble-challtestsrv', ['-defaultIPv4', '127.0.0.1', '-defaultIPv6', '', '-dns01', `127.0.0.1:${dns}`, '-http01', '', '-https01', '', '-tlsalpn01', '', '-management', `127.0.0.1:${mgmt}`], { stdio: 'ignore' }),
    );
    const pebble = spawn('pebble', ['-config', join(this.dir, 'pebble.json'), '-dnsserver', `127.0.0.1:${dns}`], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, PEBBLE_VA_NOSLEEP: '1', PEBBLE_WFE_NONCEREJECT: '0' },
    });
    pebble.stdout!.resume();
    pebble.stderr!.resume();
    this.procs.push(pebble);
    this.directory = `https://127.0.0.1:${port}/dir`;
    const ca = readFileSync(this.caFile, 'utf8');
    await eventually(() => getTls(port, 'localhost', ca, '/dir'), (r) => r.status === 200, 15_000);
  }

  /** The root pebble signs issued certificates with (generated at its start). */
  async issuingRoot(): Promise<string> {
    const ca = readFileSync(this.caFile, 'utf8');
    return (await getTls(this.mgmtPort, 'localhost', ca, '/roots/0')).body;
  }

  async stop(): Promise<void> {
    for (const p of this.procs) {
      if (p.exitCode !== null || p.signalCode !== null) continue;
      const exited = new Promise((r) => p.once('exit', r));
      p.kill('SIGKILL');
      await exited;
    }
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** A test daemon with the ingress on two free loopback ports. */
export async function startWithIngress(): Promise<{ d: TestDaemon; httpPort: number; httpsPort: number }> {
  const httpPort = await freePort();
  const httpsPort = await freePort();
  const d = new TestDaemon(mkdtempSync('/tmp/berth-test-'));
  d.args = ['--ingress-http', `127.0.0.1:${httpPort}`, '--ingress-https', `127.0.0.1:${httpsPort}`];
  await d.start();
  return { d, httpPort, httpsPort };
}
