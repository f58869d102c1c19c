// Ctrl-C (or SIGTERM, SIGHUP) during a benchmark: instead of dying with berthd, sandboxes, bare
// runtimes and mounts left behind, the benchmark throws at its next check and its own cleanup runs.

export class Interrupted extends Error {
  override name = 'Interrupted';
}

/** Catches the signals from now on; the returned check throws Interrupted once one came (exit with 130 then). */
export function catchInterrupts(bench: string): () => void {
  let interrupted: string | undefined;
  for (const s of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    process.on(s, () => {
      if (interrupted) return;
      interrupted = s;
      console.error(`${bench}: ${s}, cleaning up…`);
    });
  }
  return () => {
    if (interrupted) throw new Interrupted(`interrupted by ${interrupted}`);
  };
}
