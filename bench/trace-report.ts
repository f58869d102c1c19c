// Per-stage medians of sandbox cold starts and warm-pool claims from `berth-trace` lines (src/lib/trace.ts).
// Usage: BERTH_TRACE_START=1 BERTH_TEST_LOG=warn node dist/bench/sandboxes.js --tiers gvisor --runs 30 --cold-only 2>&1 \
//          | node dist/bench/trace-report.js
// Lines are grouped by the tier headings the benchmark prints ("gvisor: cold, …"); each start's stages
// are put in the order below and the time between consecutive ones is reported (median, p90).
import { createInterface } from 'node:readline';

const ORDER = [
  'client.post', 'api.arrive', 'api.enter', 'api.created', 'reconcile.start', 'driver.start', 'driver.launch', 'driver.created',
  'driver.running', 'reconcile.running', 'api.answer', 'client.created', 'agent.connected', 'cmd.arrive', 'cmd.request',
  'agent.hello', 'cmd.started', 'cmd.stdout', 'client.stdout',
];
const groups = new Map<string, Map<string, Map<string, number>>>();
let group = 'all';
const pct = (xs: number[], p: number) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.ceil((p / 100) * xs.length) - 1)]!;

for await (const line of createInterface({ input: process.stdin })) {
  // Only sequential runs are reported ("gvisor: cold, 30 sequential …", "microvm: warm, 30 sequential …").
  const head = /^(\w+): (cold|warm), \d+ sequential/.exec(line);
  if (head) group = `${head[1]} ${head[2]}`;
  else if (/^\w+: /.test(line)) group = 'other';
  const m = /berth-trace (\S+) (\S+) ([\d.]+)/.exec(line);
  if (!m) continue;
  if (!groups.has(group)) groups.set(group, new Map());
  const runs = groups.get(group)!;
  if (!runs.has(m[1]!)) runs.set(m[1]!, new Map());
  const st = runs.get(m[1]!)!;
  if (!st.has(m[2]!)) st.set(m[2]!, Number(m[3]));
}
for (const [name, runs] of [...groups].filter(([g]) => g !== 'other')) {
  const done = [...runs.values()].filter((st) => st.has('client.stdout') && st.has('client.post'));
  if (!done.length) continue;
  const totals = done.map((st) => st.get('client.stdout')! - st.get('client.post')!);
  console.log(`${name}: ${done.length} starts, create → first stdout p50 ${pct(totals, 50).toFixed(1)} ms`);
  const deltas = new Map<string, number[]>();
  for (const st of done) {
    const seen = ORDER.filter((s) => st.has(s)).sort((a, b) => st.get(a)! - st.get(b)!);
    for (let i = 1; i < seen.length; i++) {
      const k = `${seen[i - 1]} → ${seen[i]}`;
      if (!deltas.has(k)) deltas.set(k, []);
      deltas.get(k)!.push(st.get(seen[i]!)! - st.get(seen[i - 1]!)!);
    }
  }
  for (const [k, v] of [...deltas].filter(([, v]) => v.length * 2 >= done.length)) {
    console.log(`  ${k.padEnd(42)} p50 ${pct(v, 50).toFixed(2).padStart(7)} ms   p90 ${pct(v, 90).toFixed(2).padStart(7)} ms   (${v.length})`);
  }
}
