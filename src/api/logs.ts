// Reading workload logs. conmon writes the Kubernetes "k8s-file" format:
//   <RFC3339Nano timestamp> <stdout|stderr> <F|P> <content>
// where P marks a partial line (no newline yet) and F a full one.
import { closeSync, openSync, readSync, statSync, watch, type FSWatcher } from 'node:fs';
import { basename, dirname } from 'node:path';

export interface LogLine {
  time: string;
  stream: 'stdout' | 'stderr';
  /** Content without the trailing newline; `partial` lines had none. */
  text: string;
  partial: boolean;
}

export function parseLogLine(line: string): LogLine | undefined {
  const a = line.indexOf(' ');
  const b = line.indexOf(' ', a + 1);
  const c = line.indexOf(' ', b + 1);
  if (a < 0 || b < 0) return undefined;
  const stream = line.slice(a + 1, b);
  if (stream !== 'stdout' && stream !== 'stderr') return undefined;
  const tag = c < 0 ? line.slice(b + 1) : line.slice(b + 1, c);
  return { time: line.slice(0, a), stream, text: c < 0 ? '' : line.slice(c + 1), partial: tag === 'P' };
}

export interface FollowOptions {
  follow: boolean;
  /** Only the last N lines (before following). */
  tail?: number;
  /** Checked while following: true when no more output can come. */
  finished: () => boolean;
  signal: AbortSignal;
  /** Longest wait between two looks at the file; a change seen by inotify wakes the reader at once. */
  pollMs?: number;
}

/**
 * Watches `path` for changes for as long as it is open: a directory watch on its folder (it keeps
 * working while the file does not exist yet, and across conmon truncating it). Set up once, before
 * the first look at the file, so a write between a look and the next wait cannot be missed (with a
 * watch set up after each look, such a write waited for the poll timeout).
 */
class ChangeWatch {
  private changed = true;
  private wake: (() => void) | undefined;
  private readonly w: FSWatcher | undefined;

  constructor(path: string) {
    const name = basename(path);
    try {
      this.w = watch(dirname(path), (_ev, f) => {
        if (f === null || String(f) === name) this.fire();
      });
      this.w.on('error', () => this.fire());
    } catch {
      /* no folder yet: the caller's timeout covers it */
    }
  }

  private fire(): void {
    this.changed = true;
    this.wake?.();
  }

  get watching(): boolean {
    return this.w !== undefined;
  }

  /** Call right before looking at the file; changes after this wake the next wait. */
  reset(): void {
    this.changed = false;
  }

  /** Resolves at once if a change came since reset(), else on the next change, the timeout or abort. */
  wait(ms: number, signal: AbortSignal): Promise<void> {
    if (this.changed || signal.aborted) return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(t);
        this.wake = undefined;
        signal.removeEventListener('abort', done);
        resolve();
      };
      const t = setTimeout(done, ms);
      this.wake = done;
      signal.addEventListener('abort', done, { once: true });
    });
  }

  close(): void {
    this.w?.close();
  }
}

/** Bytes read from the file in one step (synchronously: a log read is a page-cache copy). */
const READ_CHUNK = 1024 * 1024;

/**
 * Yields parsed log lines from `path`. With follow, keeps reading as the file grows until
 * `finished()` says the writer is gone and the file is drained. A file that does not exist yet
 * (the task has not started) is waited for while following.
 *
 * The file is read with synchronous calls in chunks of at most READ_CHUNK: each async fs call is a
 * thread-pool round trip, and four of them per new line were most of the time between conmon
 * writing a line and a follower receiving it.
 */
export async function* readLog(path: string, opts: FollowOptions): AsyncGenerator<LogLine> {
  const pollMs = opts.pollMs ?? 100;
  let pos = 0;
  let carry = '';
  let first = true;
  const tailBuf: LogLine[] = [];
  const changes = opts.follow ? new ChangeWatch(path) : undefined;
  try {
    for (;;) {
      if (opts.signal.aborted) return;
      changes?.reset();
      const done = opts.finished();
      let size = -1;
      try {
        size = statSync(path).size;
      } catch {
        size = -1;
      }
      if (size >= 0 && size < pos) {
        pos = 0; // truncated by conmon's size limit
        carry = '';
      }
      let more = false;
      if (size > pos) {
        let chunk: Buffer | undefined;
        try {
          const fd = openSync(path, 'r');
          try {
            const len = Math.min(size - pos, READ_CHUNK);
            const buf = Buffer.allocUnsafe(len);
            const n = readSync(fd, buf, 0, len, pos);
            chunk = buf.subarray(0, n);
          } finally {
            closeSync(fd);
          }
        } catch {
          chunk = undefined; // removed between stat and open: look again
        }
        if (chunk && chunk.length > 0) {
          pos += chunk.length;
          more = pos < size;
          const text = carry + chunk.toString('utf8');
          const lines = text.split('\n');
          carry = lines.pop() ?? '';
          let parsed = lines.map(parseLogLine).filter((l): l is LogLine => l !== undefined);
          if (first && opts.tail !== undefined) {
            // Keep the last `tail` lines of everything before following, across chunks.
            tailBuf.push(...parsed);
            if (tailBuf.length > opts.tail) tailBuf.splice(0, tailBuf.length - opts.tail);
            parsed = [];
            if (more) continue;
            parsed = tailBuf.splice(0);
          }
          for (const l of parsed) yield l;
        }
      }
      if (more) continue;
      first = false;
      if (!opts.follow || (done && size === pos)) return;
      // The writer may finish without touching the file again: look at `finished` often enough.
      await changes!.wait(size < 0 || !changes!.watching ? 20 : pollMs, opts.signal);
    }
  } finally {
    changes?.close();
  }
}
