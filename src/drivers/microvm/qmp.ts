// A minimal QMP (QEMU Machine Protocol) client. QMP is JSON objects separated by newlines: a
// greeting, then qmp_capabilities, then commands, each answered by {"return": …} or {"error": …};
// asynchronous {"event": …} lines are skipped. `qmp()` is one short connection per command; a
// QmpSession keeps one connection for a sequence of commands (a restore's four or more: each new
// connection costs QEMU's main loop three round trips, ~2–3 ms on a busy host).
import { connect, type Socket } from 'node:net';

type Reply = { QMP?: unknown; return?: unknown; error?: { class?: string; desc?: string }; event?: string };

export class QmpSession {
  private buf = '';
  private waiter: ((msg: Reply | Error) => void) | undefined;
  private failed: Error | undefined;

  private constructor(private readonly sock: Socket) {
    sock.on('data', (d: Buffer) => {
      this.buf += d.toString('utf8');
      let nl: number;
      while ((nl = this.buf.indexOf('\n')) >= 0) {
        const line = this.buf.slice(0, nl).trim();
        this.buf = this.buf.slice(nl + 1);
        if (!line) continue;
        let msg: Reply;
        try {
          msg = JSON.parse(line) as Reply;
        } catch {
          continue;
        }
        if (msg.event) continue;
        const w = this.waiter;
        this.waiter = undefined;
        w?.(msg);
      }
    });
    const fail = (e: Error) => {
      this.failed ??= e;
      const w = this.waiter;
      this.waiter = undefined;
      w?.(e);
    };
    sock.on('error', fail);
    sock.on('close', () => fail(new Error('QMP connection closed')));
  }

  /** Connects, reads the greeting and enters command mode. */
  static async open(socketPath: string, timeoutMs = 10_000): Promise<QmpSession> {
    const s = new QmpSession(connect(socketPath));
    try {
      await s.next('greeting', timeoutMs, (m) => m.QMP !== undefined);
      await s.cmd('qmp_capabilities', undefined, timeoutMs);
      return s;
    } catch (e) {
      s.close();
      throw e;
    }
  }

  /** Runs one command; resolves with its `return` value. */
  async cmd(command: string, args?: Record<string, unknown>, timeoutMs = 10_000): Promise<unknown> {
    const reply = this.next(command, timeoutMs, (m) => 'return' in m || m.error !== undefined);
    this.sock.write(JSON.stringify({ execute: command, ...(args ? { arguments: args } : {}) }) + '\n');
    const m = await reply;
    if (m.error) throw new Error(`QMP ${command}: ${m.error.desc ?? m.error.class ?? 'error'}`);
    return m.return;
  }

  close(): void {
    this.sock.destroy();
  }

  private next(what: string, timeoutMs: number, accept: (m: Reply) => boolean): Promise<Reply> {
    if (this.failed) return Promise.reject(this.failed);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiter = undefined;
        reject(new Error(`QMP ${what} did not answer within ${timeoutMs} ms`));
      }, timeoutMs);
      const take = (m: Reply | Error) => {
        if (m instanceof Error) {
          clearTimeout(timer);
          return reject(m);
        }
        if (!accept(m)) {
          this.waiter = take; // (not the answer awaited: keep waiting)
          return;
        }
        clearTimeout(timer);
        resolve(m);
      };
      this.waiter = take;
    });
  }
}

/** One command on its own connection. */
export async function qmp(socketPath: string, command: string, args?: Record<string, unknown>, timeoutMs = 10_000): Promise<unknown> {
  const s = await QmpSession.open(socketPath, timeoutMs);
  try {
    return await s.cmd(command, args, timeoutMs);
  } finally {
    s.close();
  }
}
