// A small client for the berthd REST API. It speaks plain HTTP over TCP or over the daemon's unix
// socket (node:http with `socketPath`), sends JSON bodies, and turns error responses of the form
// { "error": { "code", "message" } } into ApiError.
import http from 'node:http';
import https from 'node:https';
import type { Readable, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';

export class ApiError extends Error {
  readonly code: string;
  /** HTTP status; 0 when no response came back (connection problems, timeouts). */
  readonly status: number;
  constructor(code: string, message: string, status: number) {
    super(message);
    this.name = 'ApiError';
    this.code = code;
    this.status = status;
  }
}

/** The daemon could not be reached at all (refused, no socket, no permission on the socket). */
export class ConnectError extends ApiError {
  readonly addr: string;
  readonly errno: string;
  constructor(addr: string, errno: string, message: string) {
    super('unavailable', message, 0);
    this.name = 'ConnectError';
    this.addr = addr;
    this.errno = errno;
  }
}

export interface ClientOptions {
  /** "unix:/path/to/berthd.sock", "http://host:port", "https://host:port" or "host:port". */
  addr: string;
  token: string;
  /** Per-request timeout for non-streaming calls (default 30 s). */
  timeoutMs?: number;
}

type Target =
  | { kind: 'unix'; socketPath: string }
  | { kind: 'tcp'; protocol: 'http:' | 'https:'; host: string; port: number };

export function parseAddr(addr: string): Target {
  const a = addr.trim();
  if (a.startsWith('unix:')) {
    const p = a.slice('unix:'.length).replace(/^\/\/(?=\/)/, '');
    if (!p) throw new ApiError('invalid_argument', `address "${addr}" names no socket path; use unix:/path/to/berthd.sock`, 0);
    return { kind: 'unix', socketPath: p };
  }
  if (a.startsWith('/')) return { kind: 'unix', socketPath: a };
  const withScheme = /^[a-z][a-z0-9+.-]*:\/\//i.test(a) ? a : `http://${a}`;
  let u: URL;
  try {
    u = new URL(withScheme);
  } catch {
    throw new ApiError('invalid_argument', `address "${addr}" is not valid; use unix:/path/to/berthd.sock or http://127.0.0.1:7878`, 0);
  }
  if (u.protocol !== 'http:' && u.protocol !== 'https:') {
    throw new ApiError('invalid_argument', `address "${addr}" has unsupported scheme ${u.protocol}; use unix:/path or http://host:port`, 0);
  }
  const port = u.port ? Number(u.port) : u.protocol === 'https:' ? 443 : 80;
  return { kind: 'tcp', protocol: u.protocol, host: u.hostname.replace(/^\[(.*)\]$/, '$1'), port };
}

function errorFromBody(status: number, text: string): ApiError {
  try {
    const b = JSON.parse(text) as { error?: { code?: unknown; message?: unknown } };
    if (b && typeof b.error === 'object' && b.error && typeof b.error.message === 'string') {
      return new ApiError(typeof b.error.code === 'string' ? b.error.code : 'unknown', b.error.message, status);
    }
  } catch {
    // not JSON; fall through
  }
  const snippet = text.trim().replace(/\s+/g, ' ').slice(0, 200);
  return new ApiError(status >= 500 ? 'internal' : 'unknown', `berthd answered HTTP ${status}${snippet ? `: ${snippet}` : ''}`, status);
}

export class BerthClient {
  readonly addr: string;
  private readonly target: Target;
  private readonly token: string;
  private readonly timeoutMs: number;
  private readonly agent: http.Agent;

  constructor(opts: ClientOptions) {
    this.addr = opts.addr;
    this.target = parseAddr(opts.addr);
    this.token = opts.token;
    this.timeoutMs = opts.timeoutMs ?? 30_000;
    this.agent =
      this.target.kind === 'tcp' && this.target.protocol === 'https:' ? new https.Agent({ keepAlive: true }) : new http.Agent({ keepAlive: true });
  }

  private requestOptions(method: string, path: string, headers: Record<string, string | number>): http.RequestOptions {
    const base: http.RequestOptions = {
      method,
      path,
      agent: this.agent,
      headers: { Accept: 'application/json', ...(this.token ? { Authorization: `Bearer ${this.token}` } : {}), ...headers },
    };
    if (this.target.kind === 'unix') return { ...base, socketPath: this.target.socketPath, host: 'localhost' };
    return { ...base, host: this.target.host, port: this.target.port, protocol: this.target.protocol };
  }

  private send(opts: http.RequestOptions, cb: (res: http.IncomingMessage) => void): http.ClientRequest {
    const mod = this.target.kind === 'tcp' && this.target.protocol === 'https:' ? https : http;
    return mod.request(opts, cb);
  }

  /** Map a socket-level error to a ConnectError (daemon unreachable) or a generic ApiError. */
  private wrapError(e: unknown): ApiError {
    if (e instanceof ApiError) return e;
    const err = e as NodeJS.ErrnoException;
    const where = this.target.kind === 'unix' ? `unix:${this.target.socketPath}` : `${this.target.protocol}//${this.target.host}:${this.target.port}`;
    switch (err.code) {
      case 'ECONNREFUSED':
        return new ConnectError(where, err.code, `berthd isn't reachable at ${where} (connection refused)`);
      case 'ENOENT':
        return new ConnectError(where, err.code, `berthd isn't reachable at ${where} (no such socket)`);
      case 'EACCES':
      case 'EPERM':
        return new ConnectError(where, err.code, `permission denied connecting to ${where}; the socket is root-only: run as root, or use --addr http://HOST:PORT with --token`);
      case 'ENOTFOUND':
      case 'EAI_AGAIN':
        return new ConnectError(where, err.code, `berthd isn't reachable at ${where} (host name does not resolve)`);
      case 'ECONNRESET':
      case 'EPIPE':
        return new ApiError('unavailable', `the connection to berthd at ${where} was closed unexpectedly; check that berthd is still running`, 0);
      case 'ETIMEDOUT':
        return new ApiError('unavailable', `berthd at ${where} did not answer in time`, 0);
      default:
        return new ApiError('unavailable', `cannot talk to berthd at ${where}: ${err.message}`, 0);
    }
  }

  /** One JSON request. Resolves with the parsed body (undefined for empty bodies such as 204). */
  request<T>(method: string, path: string, body?: unknown, opts?: { signal?: AbortSignal }): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      const data = body === undefined ? undefined : Buffer.from(JSON.stringify(body), 'utf8');
      const headers: Record<string, string | number> = data ? { 'Content-Type': 'application/json', 'Content-Length': data.length } : {};
      let settled = false;
      const fail = (e: unknown) => {
        if (settled) return;
        settled = true;
        reject(this.wrapError(e));
      };
      const req = this.send(this.requestOptions(method.toUpperCase(), path, headers), (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('error', fail);
        res.on('end', () => {
          if (settled) return;
          const text = Buffer.concat(chunks).toString('utf8');
          const status = res.statusCode ?? 0;
          if (status < 200 || status >= 300) {
            settled = true;
            reject(errorFromBody(status, text));
            return;
          }
          if (text.trim() === '') {
            settled = true;
            resolve(undefined as T);
            return;
          }
          try {
            const parsed = JSON.parse(text) as T;
            settled = true;
            resolve(parsed);
          } catch {
            fail(new ApiError('internal', `berthd sent a response that is not JSON (HTTP ${status}) for ${method} ${path}`, status));
          }
        });
      });
      req.setTimeout(this.timeoutMs, () => {
        req.destroy(new ApiError('unavailable', `berthd at ${this.addr} did not answer ${method} ${path} within ${this.timeoutMs} ms`, 0));
      });
      req.on('error', (e) => {
        if (opts?.signal?.aborted) fail(new ApiError('cancelled', 'request cancelled', 0));
        else fail(e);
      });
      if (opts?.signal) {
        if (opts.signal.aborted) {
          req.destroy();
        } else {
          opts.signal.addEventListener('abort', () => req.destroy(), { once: true });
        }
      }
      req.end(data);
    });
  }

  /**
   * GET (or POST `opts.body` to) a streaming endpoint and call onLine for every line (without its
   * newline). Resolves when the server ends the stream, or when `signal` aborts (then quietly).
   */
  stream(path: string, onLine: (line: string) => void, signal?: AbortSignal, opts: { method?: string; body?: unknown; raw?: { stream: Readable; contentType: string } } = {}): Promise<void> {
    const data = opts.body === undefined ? undefined : Buffer.from(JSON.stringify(opts.body), 'utf8');
    return new Promise<void>((resolve, reject) => {
      let settled = false;
      const done = (e?: unknown) => {
        if (settled) return;
        settled = true;
        if (e === undefined || signal?.aborted) resolve();
        else reject(e instanceof ApiError ? e : this.wrapError(e));
      };
      const headers: Record<string, string | number> = {
        Accept: 'application/x-ndjson, text/plain, application/json',
        ...(data ? { 'Content-Type': 'application/json', 'Content-Length': data.length } : {}),
        ...(opts.raw ? { 'Content-Type': opts.raw.contentType } : {}),
      };
      const req = this.send(this.requestOptions(opts.method ?? 'GET', path, headers), (res) => {
        const status = res.statusCode ?? 0;
        if (status < 200 || status >= 300) {
          const chunks: Buffer[] = [];
          res.on('data', (c: Buffer) => chunks.push(c));
          res.on('end', () => done(errorFromBody(status, Buffer.concat(chunks).toString('utf8'))));
          res.on('error', (e) => done(e));
          return;
        }
        res.setEncoding('utf8');
        let buf = '';
        let ended = false;
        res.on('data', (chunk: string) => {
          if (settled) return;
          buf += chunk;
          let i: number;
          while ((i = buf.indexOf('\n')) >= 0) {
            const line = buf.slice(0, i);
            buf = buf.slice(i + 1);
            try {
              onLine(line);
            } catch (e) {
              req.destroy();
              done(e instanceof ApiError ? e : new ApiError('internal', (e as Error).message, 0));
              return;
            }
          }
        });
        res.on('end', () => {
          ended = true;
          if (buf && !settled) onLine(buf);
          done();
        });
        res.on('error', (e) => done(e));
        res.on('close', () => {
          if (!ended) done(new ApiError('unavailable', `the stream from berthd at ${this.addr} was cut off; check that berthd is still running`, 0));
        });
      });
      req.on('error', (e) => done(e));
      if (signal) {
        if (signal.aborted) {
          req.destroy();
          done();
        } else {
          signal.addEventListener(
            'abort',
            () => {
              req.destroy();
              done();
            },
            { once: true },
          );
        }
      }
      if (opts.raw) {
        opts.raw.stream.on('error', (e) => {
          req.destroy();
          done(new ApiError('invalid_argument', `cannot read what is being sent: ${e.message}`, 0));
        });
        opts.raw.stream.pipe(req);
      } else req.end(data);
    });
  }

  /** GET a binary body into `dest` (e.g. an image archive into a file). */
  download(path: string, dest: Writable): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const req = this.send(this.requestOptions('GET', path, { Accept: 'application/octet-stream, application/x-tar, application/json' }), (res) => {
        const status = res.statusCode ?? 0;
        if (status < 200 || status >= 300) {
          const chunks: Buffer[] = [];
          res.on('data', (c: Buffer) => chunks.push(c));
          res.on('end', () => reject(errorFromBody(status, Buffer.concat(chunks).toString('utf8'))));
          return;
        }
        pipeline(res, dest).then(resolve, (e: unknown) => reject(this.wrapError(e)));
      });
      req.on('error', (e) => reject(this.wrapError(e)));
      req.end();
    });
  }

  /** Let the process exit: drop idle keep-alive sockets. */
  close(): void {
    this.agent.destroy();
  }
}
