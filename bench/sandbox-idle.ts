// A command in a running sandbox (the path of a warm-pool claim's first command) against how long the
// host sat idle before it: one sandbox per tier, `echo ready` → first stdout byte at the client, after
// gaps of 0 … 3000 ms, rounds interleaved; beside it a plain API round trip (GET of a sandbox) after the
// same gaps, which involves no sandbox — how much of a slow first command is the host waking up.
// Usage: node dist/bench/sandbox-idle.js [--rounds 8] [--tiers container,gvisor,microvm] [--write BENCHMARKS.md]   (as root)
import { cpus, release } from 'node:os';
import { parseArgs } from 'node:util';
import { TestDaemon } from '../test/harness.js';
import { updateBenchmarks } from './report.js';
import { Interrupted, catchInterrupts } from './interrupt.js';
import { firstByte } from './sandbox-client.js';

const { values } = parseArgs({
  options: {
    rounds: { type: 'string', default: '8' },
    tiers: { type: 'string', default: 'container,gvisor,microvm' },
    write: { type: 'string' },
  },
});
const ROUNDS = Number(values.rounds);
if (!Number.isInteger(ROUNDS) || ROUNDS < 1) throw new Error('--rounds must be a whole number ≥ 1');
const GAPS = [0, 100, 300, 1000, 3000];
const checkInterrupted = catchInterrupts('sandbox-idle bench');
const S = '/v1/projects/default/sandboxes';
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[xs.length >> 1]!;

/** `echo ready` in a running sandbox: ms until its first stdout event. */
async function echoMs(d: TestDaemon, name: string): Promise<number> {
  const t0 = performance.now();
  await firstByte(d, name);
  return performance.now() - t0;
}

async function main(): Promise<void> {
  const d = await TestDaemon.start();
  const rows: { what: string; byGap: number[][] }[] = [];
  try {
    const names = new Map<string, string>();
    for (const tier of values.tiers!.split(',')) {
      const r = await d.api('POST', `${S}?pool=none`, { spec: { isolation: tier, resources: { memoryMiB: 128 }, timeoutMs: 3_600_000 } });
      if (r.status !== 201 || r.body.status.phase !== 'running') throw new Error(`create ${tier}: ${r.status} ${JSON.stringify(r.body.status ?? r.body)}`);
      names.set(tier, r.body.name);
      for (let i = 0; i < 5; i++) await echoMs(d, r.body.name); // its first runs are slow for other reasons
    }
    const probes: [string, () => Promise<number>][] = [
      ['API only: GET of a sandbox (one store read)', async () => {
        const t0 = performance.now();
        const r = await d.api('GET', `${S}/${[...names.values()][0]}`);
        if (r.status !== 200) throw new Error(`GET sandbox: ${r.status}`);
        return performance.now() - t0;
      }],
      ...[...names].map(([tier, name]): [string, () => Promise<number>] => [`${tier}: \`echo ready\` → first stdout`, () => echoMs(d, name)]),
    ];
    for (const [what] of probes) rows.push({ what, byGap: GAPS.map(() => []) });
    for (let round = 0; round < ROUNDS; round++) {
      checkInterrupted();
      for (const [g, gap] of GAPS.entries()) {
        for (const [i, [, probe]] of probes.entries()) {
          await sleep(gap);
          rows[i]!.byGap[g]!.push(await probe());
        }
      }
      console.error(`round ${round + 1}/${ROUNDS} done`);
    }
  } finally {
    await d.deleteAllSandboxes().catch(() => undefined);
    await d.destroy();
  }
  const text = [
    `Host: ${cpus()[0]?.model ?? 'cpu'}, ${cpus().length} cores, kernel ${release()}, ${new Date().toISOString().slice(0, 10)}. One running sandbox per tier (128 MiB, default network), 5 commands first; then ${ROUNDS} rounds, each probe after each gap (the host otherwise idle: nothing else of this benchmark runs during a gap). Medians of ${ROUNDS}.`,
    '',
    `| what (ms, median) | ${GAPS.map((g) => `after ${g} ms idle`).join(' | ')} |`,
    `|---|${GAPS.map(() => '---|').join('')}`,
    ...rows.map((r) => `| ${r.what} | ${r.byGap.map((xs) => median(xs).toFixed(1)).join(' | ')} |`),
  ].join('\n');
  console.log(text);
  if (values.write) updateBenchmarks(values.write, 'sandbox-idle', 'Sandboxes: a command after the host sat idle', `node dist/bench/sandbox-idle.js --rounds ${ROUNDS} --write BENCHMARKS.md`, text);
}

main().catch((e) => {
  console.error(e);
  process.exit(e instanceof Interrupted ? 130 : 1);
});
