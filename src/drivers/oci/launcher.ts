// Starting a process from berthd is not free: Node's child_process forks the whole daemon (libuv
// uses fork(), whose cost grows with the daemon's memory) and blocks the event loop until the child
// has exec'd — 2 to 3 ms on the project's 2-core hosts, and it sits on the critical path of every
// workload start (conmon, and for gVisor `runsc start`).
//
// A Launcher keeps a few small `bash` processes ready ("spares"), spawned ahead of time while berthd
// is idle. When a command is needed, berthd writes its working directory and argv to a spare's stdin
// and closes it; bash, already running, just execs it. The command therefore starts without a fork
// of the daemon on the critical path. The driver asks for new spares (refillSoon) once a start is
// over: not while it runs, where forking berthd would take CPU from the runtime creating the container
// (2 cores; measured, it cost more than it saved), and a little after, so the start's answer and the
// workload's first output leave berthd first. When none is ready (a burst of starts) a fresh one is
// spawned for the command: a direct spawn plus the start of bash (about a millisecond).
//
// A spare can also be the program itself, started ahead of time and waiting for its arguments:
// Berth's own monitor (`berth-agent monitor --spare`, agent/monitor.go; see monitorSpare()), so that
// a container start does not wait for the monitor's exec and Go runtime start either (~2 ms).
//
// Each launched process gets: stdin /dev/null, stdout /dev/null, stderr a pipe, fd 3 a pipe (what
// conmon's _OCI_SYNCPIPE=3 names; other commands leave it alone), fd 4 one end of a connected unix
// socket pair (a sandbox's agent connection, handed on by the monitor; see driver.ts), environment
// PATH and _OCI_SYNCPIPE=3 only. A spare left unused exits when its stdin closes (berthd closing or dying).
import { spawn, type ChildProcess } from 'node:child_process';
import type { Socket } from 'node:net';
import type { Readable, Writable } from 'node:stream';

// Reads NUL-separated words until EOF: cwd, whether to keep fd 4 ("1"; else it is closed), the count
// N of words of an optional command to run first (its failure ends the launch with its exit code;
// its stderr goes to the stderr pipe), those N words, then the argv to exec. No words at all (stdin
// closed unused): exit quietly.
const SCRIPT = [
  "mapfile -d '' -t a",
  '[ "${#a[@]}" -ge 4 ] || exit 0',
  'cd -- "${a[0]}" || exit 127',
  '[ "${a[1]}" = 1 ] || exec 4>&-',
  'n=${a[2]}',
  'if [ "$n" -gt 0 ]; then "${a[@]:3:n}" 4>&- </dev/null || exit $?; fi',
  'exec "${a[@]:3+n}" </dev/null',
].join('\n');

/** What a spare process is and what a launch writes to it. */
export interface SpareProgram {
  /** argv of a spare process; it reads NUL-separated words from stdin until EOF. */
  argv: string[];
  /** The words that make it run `argv` in `cwd` (after `pre`), with fd 4 kept when `withSocket`. */
  words(cwd: string, argv: string[], pre: string[], withSocket: boolean): string[];
}

/** bash running any command (SCRIPT). */
export function bashSpare(bash = '/bin/bash'): SpareProgram {
  return {
    argv: [bash, '--noprofile', '--norc', '-c', SCRIPT],
    words: (cwd, argv, pre, withSocket) => [cwd, withSocket ? '1' : '0', String(pre.length), ...pre, ...argv],
  };
}

/**
 * Berth's monitor waiting for its arguments (agent 0.2.0): launches only `[agent, 'monitor', …args]`,
 * with no `pre` command; the monitor closes fd 4 itself unless its arguments name it (--agent-fd 4).
 */
export function monitorSpare(agent: string): SpareProgram {
  return {
    argv: [agent, 'monitor', '--spare'],
    words: (cwd, argv, pre) => {
      if (argv[0] !== agent || argv[1] !== 'monitor' || pre.length) throw new Error('a monitor spare runs only the monitor, without a command before it');
      return [cwd, ...argv.slice(2)];
    },
  };
}

export interface Launched {
  child: ChildProcess;
  stderr: Readable;
  /** fd 3 of the launched process (conmon's sync pipe). */
  fd3: Readable;
  /** With launch(…, withSocket): the other end of fd 4 of the launched process, a connected unix socket pair (libuv makes 'pipe' stdio that way); unref'd. */
  fd4?: Socket;
}

/** Delay of refillSoon(): lets what the finished start set going (answers, first output) go first. */
const REFILL_AFTER_MS = 25;

export class Launcher {
  private spares: ChildProcess[] = [];
  private closed = false;
  private refill: NodeJS.Timeout | undefined;

  /** `size`: spares kept (how many launches one start makes: conmon, and `runsc start` for gVisor). */
  constructor(
    private readonly size = 1,
    private readonly program: SpareProgram = bashSpare(),
    private readonly env: NodeJS.ProcessEnv = { PATH: process.env.PATH ?? '/usr/sbin:/usr/bin:/sbin:/bin', _OCI_SYNCPIPE: '3' },
  ) {}

  private spawnSpare(): ChildProcess {
    const child = spawn(this.program.argv[0]!, this.program.argv.slice(1), {
      stdio: ['pipe', 'ignore', 'pipe', 'pipe', 'pipe'],
      env: this.env,
      // Its own session and process group, like conmon wants (conmon calls setsid itself too).
      detached: true,
    });
    // A spare must not keep berthd (or a test process) alive, nor crash it.
    child.on('error', () => undefined);
    child.unref();
    for (const s of [child.stdin, child.stderr, child.stdio[3], child.stdio[4]] as Array<{ unref?: () => void; on: (e: string, f: () => void) => void } | null>) {
      s?.on('error', () => undefined);
      s?.unref?.();
    }
    return child;
  }

  /** Spawn the missing spares now (call while idle). */
  warm(): void {
    while (!this.closed && this.spares.length < this.size) {
      const s = this.spawnSpare();
      this.spares.push(s);
      s.once('exit', () => {
        this.spares = this.spares.filter((x) => x !== s);
      });
    }
  }

  /**
   * Runs `argv` in `cwd` (after `pre`, if given, succeeded). The caller reads stderr and fd 3 and
   * listens for the child's exit; the streams are ref'd again so they keep the loop alive while used.
   * `withSocket`: `argv` gets fd 4 (not `pre`), and the caller its other end (Launched.fd4).
   */
  launch(cwd: string, argv: string[], pre: string[] = [], withSocket = false): Launched {
    const words = this.program.words(cwd, argv, pre, withSocket);
    if (words.some((w) => w.includes('\0'))) throw new Error('a launch argument contains a NUL byte');
    let child = this.spares.shift();
    if (!child || child.exitCode !== null || child.signalCode !== null || !child.stdin?.writable) child = this.spawnSpare();
    child.ref();
    const stderr = child.stderr as Readable & { ref?: () => void };
    const fd3 = child.stdio[3] as Readable & { ref?: () => void };
    stderr.ref?.();
    fd3.ref?.();
    (child.stdin as Writable).end(words.map((w) => `${w}\0`).join(''));
    const fd4 = child.stdio[4] as Socket;
    if (!withSocket) fd4.destroy();
    return { child, stderr, fd3, ...(withSocket ? { fd4 } : {}) };
  }

  /** Replace the spares taken, shortly (see the top of this file). Call when a start is over. */
  refillSoon(): void {
    if (this.closed || this.spares.length >= this.size) return;
    clearTimeout(this.refill);
    this.refill = setTimeout(() => this.warm(), REFILL_AFTER_MS);
    this.refill.unref();
  }

  /** Lets the spare exit (its stdin closes). */
  close(): void {
    this.closed = true;
    clearTimeout(this.refill);
    for (const s of this.spares) s.stdin?.end();
    this.spares = [];
  }
}
