// Reading workload logs. conmon writes the Kubernetes "k8s-file" format:
//   <RFC3339Nano timestamp> <stdout|stderr> <F|P> <content>
// where P marks a partial line (no newline yet) and F a full one.
import { watch, type FSWatcher } from 'node:fs';
import { open, stat } from 'node:fs/promises';
import { dirname } from 'node:path';

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

/** Resolves on the next change of `path` (or its folder, while the file does not exist yet) or after `ms`. */
function changeOrTimeout(path: string, ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    let w: FSWatcher | undefined;
    const done = () => {
      clearTimeout(t);
      w?.close();
      signal.removeEventListener('abort', done);
      resolve();
    };
    const t = setTimeout(done, ms);
    signal.addEventListener('abort', done, { once: true });
    try {
      w = watch(path, done);
    } catch {
      try {
        w = watch(dirname(path), done);
      } catch {
        /* neither exists yet: the timeout covers it */
      }
    }
    w?.on('error', done);
  });
}

/**
 * Yields parsed log lines from `path`. With follow, keeps reading as the file grows until
 * `finished()` says the writer is gone and the file is drained. A file that does not exist yet
 * (the task has not started) is waited for while following.
 */
export async function* readLog(path: string, opts: FollowOptions): AsyncGenerator<LogLine> {
  const pollMs = opts.pollMs ?? 100;
  let pos = 0;
  let carry = '';
  let first = true;
  for (;;) {
    if (opts.signal.aborted) return;
    const done = opts.finished();
    let size = -1;
    try {
      size = (await stat(path)).size;
    } catch {
      size = -1;
    }
    if (size >= 0 && size < pos) {
      pos = 0; // truncated by conmon's size limit
      carry = '';
    }
    if (size > pos) {
      const fh = await open(path, 'r');
      try {
        const len = size - pos;
        const buf = Buffer.alloc(len);
        await fh.read(buf, 0, len, pos);
        pos = size;
        const text = carry + buf.toString('utf8');
        const lines = text.split('\n');
        carry = lines.pop() ?? '';
        let parsed = lines.map(parseLogLine).filter((l): l is LogLine => l !== undefined);
        if (first && opts.tail !== undefined) parsed = parsed.slice(Math.max(0, parsed.length - opts.tail));
        for (const l of parsed) yield l;
      } finally {
        await fh.close();
      }
    }
    first = false;
    if (!opts.follow || (done && size === pos)) return;
    // The writer may finish without touching the file again: look at `finished` often enough.
    await changeOrTimeout(path, size < 0 ? 20 : pollMs, opts.signal);
  }
}
