// Ctrl-C (or SIGTERM, SIGHUP) during a benchmark: instead of dying with berthd, sandboxes, bare
// runtimes and mounts left behind, the benchmark throws at its next check and its own cleanup runs.

export class Interrupted extends Error {
  override name = 'Interrupted';
}

/**
 * Catches the signals from now on; the returned check throws Interrupted once one came (exit with 130
 * then). Its `signal` aborts (with that Interrupted) at once: for a long call that takes an AbortSignal.
 */
export function catchInterrupts(bench: string): (() => void) & { signal: AbortSignal } {
  let interrupted: string | undefined;
  const ac = new AbortController();
  for (const s of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    process.on(s, () => {
      if (interrupted) return;
      interrupted = s;
      console.error(`${bench}: ${s}, cleaning up…`);
      ac.abort(new Interrupted(`interrupted by ${s}`));
    });
  }
  const check = () => {
    if (interrupted) throw new Interrupted(`interrupted by ${interrupted}`);
  };
  return Object.assign(check, { signal: ac.signal });
}
