// Host side of the guest agent protocol (agent/PROTOCOL.md): 4-byte big-endian length + one JSON
// object per frame, requests matched to replies by id, many requests in flight on one connection
// (QEMU's socket chardev serves one client at a time, so a task has one shared connection).
// Non-terminal frames (started, stdout, stderr, data, entries) go to the request's onEvent; when
// onEvent returns a promise, reading pauses until it settles (backpressure for streamed files).
import { connect, type Socket } from 'node:net';

export const MAX_FRAME = 1 << 20;

export interface AgentFrame {
  id: string;
  type: string;
  [k: string]: unknown;
}

export class AgentError extends Error {
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
    this.name = 'AgentError';
  }
}

export class AgentConnection {
  private buf: Buffer = Buffer.alloc(0);
  private seq = 0;
  private readonly waiters = new Map<string, { resolve: (f: AgentFrame) => void; reject: (e: Error) => void; onEvent?: (f: AgentFrame) => void | Promise<void> }>();
  private paused: Promise<void> | undefined;
  private closedError: Error | undefined;

  private constructor(private readonly sock: Socket) {
    sock.on('data', (d: Buffer) => this.onData(d));
    sock.on('error', (e) => this.fail(e));
    sock.on('close', () => this.fail(new Error('agent connection closed')));
  }

  private fail(e: Error): void {
    this.closedError ??= e;
    for (const w of this.waiters.values()) w.reject(this.closedError);
    this.waiters.clear();
  }

  get closed(): boolean {
    return this.closedError !== undefined;
  }

  onClose(fn: () => void): void {
    this.sock.once('close', fn);
  }

  /** A connection over a socket that is already connected to the agent (see OciRuntimeDriver: the socket pair handed to a container's agent). */
  static over(sock: Socket): AgentConnection {
    return new AgentConnection(sock);
  }

  /** Connects to a unix socket, retrying while it does not exist yet or refuses, until timeoutMs. */
  static async open(path: string, timeoutMs: number, signal?: AbortSignal): Promise<AgentConnection> {
    const started = Date.now();
    const deadline = started + timeoutMs;
    for (;;) {
      try {
        const sock = await new Promise<Socket>((resolve, reject) => {
          const s = connect(path);
          s.once('connect', () => {
            s.removeListener('error', reject);
            resolve(s);
          });
          s.once('error', reject);
        });
        return new AgentConnection(sock);
      } catch (e) {
        const code = (e as NodeJS.ErrnoException).code;
        if ((code !== 'ENOENT' && code !== 'ECONNREFUSED' && code !== 'EAGAIN') || Date.now() > deadline || signal?.aborted) throw e;
        // The agent creates its socket within milliseconds of starting (inside gVisor ~20 ms); a
        // failed connect is one cheap system call, so look often at first, then less often.
        await new Promise((r) => setTimeout(r, Date.now() - started < 200 ? 1 : 10));
      }
    }
  }

  private onData(d: Buffer): void {
    this.buf = this.buf.length ? Buffer.concat([this.buf, d]) : d;
    if (!this.paused) this.process();
  }

  private process(): void {
    while (this.buf.length >= 4) {
      const n = this.buf.readUInt32BE(0);
      if (n > MAX_FRAME) {
        this.sock.destroy(new Error(`agent sent a frame of ${n} bytes (limit ${MAX_FRAME})`));
        return;
      }
      if (this.buf.length < 4 + n) return;
      const payload = this.buf.subarray(4, 4 + n);
      this.buf = this.buf.subarray(4 + n);
      let f: AgentFrame;
      try {
        f = JSON.parse(payload.toString('utf8')) as AgentFrame;
      } catch {
        continue;
      }
      const w = this.waiters.get(f.id);
      if (!w) continue; // an event of a request this connection does not wait for
      if (f.type !== 'error' && f.type !== 'ok' && f.type !== 'exit' && f.type !== 'eof') {
        let r: void | Promise<void> = undefined;
        try {
          r = w.onEvent?.(f);
        } catch {
          /* a throwing listener must not break the connection */
        }
        if (r && typeof (r as Promise<void>).then === 'function') {
          // Backpressure: stop reading (and parsing what is buffered) until the consumer took it.
          this.sock.pause();
          const p: Promise<void> = (r as Promise<void>).catch(() => undefined).then(() => {
            this.paused = undefined;
            this.process();
            if (!this.paused) this.sock.resume();
          });
          this.paused = p;
          return;
        }
        continue;
      }
      if (f.type === 'error') {
        this.waiters.delete(f.id);
        w.reject(new AgentError(String(f.code ?? 'internal'), String(f.message ?? 'agent error')));
      } else {
        this.waiters.delete(f.id);
        w.resolve(f);
      }
    }
  }

  /** Sends one request and resolves with its terminal frame; rejects on error frames and timeouts. */
  request(req: Record<string, unknown>, timeoutMs: number, signal?: AbortSignal, onEvent?: (f: AgentFrame) => void | Promise<void>): Promise<AgentFrame> {
    if (this.closedError) return Promise.reject(this.closedError);
    const id = typeof req.id === 'string' && req.id ? req.id : `h${++this.seq}`;
    const body = Buffer.from(JSON.stringify({ ...req, id }), 'utf8');
    if (body.length > MAX_FRAME) return Promise.reject(new AgentError('invalid_argument', `request of ${body.length} bytes exceeds the 1 MiB frame limit`));
    const head = Buffer.alloc(4);
    head.writeUInt32BE(body.length);
    return new Promise<AgentFrame>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiters.delete(id);
        reject(new Error(`agent did not answer ${String(req.type)} within ${timeoutMs} ms`));
      }, timeoutMs);
      const onAbort = () => {
        clearTimeout(timer);
        this.waiters.delete(id);
        reject(signal!.reason instanceof Error ? signal!.reason : new Error('aborted'));
      };
      signal?.addEventListener('abort', onAbort, { once: true });
      this.waiters.set(id, {
        ...(onEvent ? { onEvent } : {}),
        resolve: (f) => {
          clearTimeout(timer);
          signal?.removeEventListener('abort', onAbort);
          resolve(f);
        },
        reject: (e) => {
          clearTimeout(timer);
          signal?.removeEventListener('abort', onAbort);
          reject(e);
        },
      });
      this.sock.write(Buffer.concat([head, body]));
    });
  }

  /** Closes the connection: `closed` at once (a pool must not hand it out again before the socket's 'close'); pending requests fail. */
  close(): void {
    this.fail(new Error('agent connection closed'));
    this.sock.destroy();
  }
}
