// Start-path tracing: with BERTH_TRACE_START=1 in berthd's environment, each stage of a sandbox's
// cold start (API → store → driver → runtime → agent → first output) writes one line
// `berth-trace <id> <stage> <epoch ms>` to stderr, so that where the time goes can be read off a
// benchmark run (absolute times: lines of different processes line up). Off, a mark costs one test.
const ON = process.env.BERTH_TRACE_START === '1';

/** `at`: a performance.now() taken earlier (a stage that began before its id was known). */
export function traceMark(id: string, stage: string, at = performance.now()): void {
  if (ON) process.stderr.write(`berth-trace ${id} ${stage} ${(performance.timeOrigin + at).toFixed(2)}\n`);
}

const arrivals = new WeakMap<object, number>();

/** Notes when a request arrived (first middleware); traceArrival(req, id) marks it once the id is known. */
export function noteArrival(req: object): void {
  if (ON) arrivals.set(req, performance.now());
}

export function traceArrival(req: object, id: string, stage: string): void {
  const t = arrivals.get(req);
  if (t !== undefined) traceMark(id, stage, t);
}
