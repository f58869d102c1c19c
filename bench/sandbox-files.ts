// Streaming a large file into a sandbox and back out through the public SDK (issue 6: "streaming upload
// and download, 1 GiB must work without buffering it in memory"), per tier, against the same bytes
// written to and read from a file on the host's disk in the same run (the baseline).
// What it checks, beside the throughput: the bytes come back unchanged (SHA-256 both ways), berthd's and
// this client's resident memory stay far below the file's size (sampled every 50 ms), and the sandbox's
// own memory limit (128 MiB) is far below it too, so its agent cannot have held the file either.
// Usage: node dist/bench/sandbox-files.js [--mib 1024] [--tiers container,gvisor,microvm] [--write BENCHMARKS.md]   (as root)
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream, createWriteStream, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { cpus, release } from 'node:os';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { Readable } from 'node:stream';
import { parseArgs } from 'node:util';
import { Sandbox } from '../sdk/src/index.js';
import { TestDaemon } from '../test/harness.js';
import { updateBenchmarks } from './report.js';
import { Interrupted, catchInterrupts } from './interrupt.js';

const { values } = parseArgs({
  options: {
    mib: { type: 'string', default: '1024' },
    tiers: { type: 'string', default: 'container,gvisor,microvm' },
    write: { type: 'string' },
  },
});
const MIB = Number(values.mib);
if (!Number.isInteger(MIB) || MIB < 1) throw new Error('--mib must be a whole number ≥ 1');
const TOTAL = MIB * 1024 * 1024;
const checkInterrupted = catchInterrupts('sandbox-files bench');
const BLOCK = randomBytes(4 * 1024 * 1024); // repeated: generating the data must not be what is measured

/** The file's bytes, made on the fly (never held whole), hashed as they go out. */
function source(hash: ReturnType<typeof createHash>): ReadableStream<Uint8Array> {
  let sent = 0;
  return new ReadableStream<Uint8Array>({
    pull(ctl) {
      if (sent >= TOTAL) return ctl.close();
      const n = Math.min(BLOCK.length, TOTAL - sent);
      const chunk = new Uint8Array(BLOCK.subarray(0, n)); // a copy: the stream may keep it until sent
      hash.update(chunk);
      sent += n;
      ctl.enqueue(chunk);
    },
  });
}

/** Resident memory of a process now, in KiB. */
const rssKiB = (pid: number) => Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? 0);

/** Peak resident memory (KiB) of processes while `body` runs, sampled every 50 ms. */
async function peakRss<T>(pids: number[], body: () => Promise<T>): Promise<{ result: T; peakKiB: number[] }> {
  const peakKiB = pids.map(rssKiB);
  const sample = () => pids.forEach((p, i) => (peakKiB[i] = Math.max(peakKiB[i]!, rssKiB(p))));
  const timer = setInterval(sample, 50);
  try {
    const result = await body();
    sample();
    return { result, peakKiB };
  } finally {
    clearInterval(timer);
  }
}

interface Row {
  what: string;
  upMBs: number;
  downMBs: number;
  berthdKiB?: [number, number];
  clientKiB: [number, number];
}

const mbs = (ms: number) => TOTAL / 1e6 / (ms / 1000);

async function hostBaseline(): Promise<Row> {
  const dir = mkdtempSync('/var/tmp/berth-files-bench-');
  try {
    const file = join(dir, 'big');
    const up = createHash('sha256');
    const before = process.memoryUsage().rss >> 10;
    const t0 = performance.now();
    await pipeline(Readable.fromWeb(source(up) as never), createWriteStream(file));
    const t1 = performance.now();
    const down = createHash('sha256');
    for await (const c of createReadStream(file)) down.update(c as Buffer);
    const t2 = performance.now();
    if (up.digest('hex') !== down.digest('hex')) throw new Error('host baseline: the bytes read back differ');
    return { what: 'host disk: a file written, then read (the baseline)', upMBs: mbs(t1 - t0), downMBs: mbs(t2 - t1), clientKiB: [before, process.memoryUsage().rss >> 10] };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

async function main(): Promise<void> {
  const d = await TestDaemon.start();
  const rows: Row[] = [];
  try {
    const tiers = ((await d.api('GET', '/v1/info')).body.drivers as { isolation: string; healthy: boolean }[]).filter((x) => x.healthy).map((x) => x.isolation);
    rows.push(await hostBaseline());
    console.error(`host: up ${rows[0]!.upMBs.toFixed(0)} MB/s, down ${rows[0]!.downMBs.toFixed(0)} MB/s`);
    for (const tier of values.tiers!.split(',')) {
      checkInterrupted();
      if (!tiers.includes(tier)) {
        console.error(`${tier}: not installed, skipped`);
        continue;
      }
      const sbx = await Sandbox.create({ apiUrl: d.addr, apiKey: d.token, isolation: tier as 'gvisor', timeoutMs: 3_600_000, memoryMiB: 128, diskMiB: MIB + 512 });
      try {
        const client0 = rssKiB(process.pid);
        const berthd0 = rssKiB(d.pid);
        const up = createHash('sha256');
        const w = await peakRss([d.pid, process.pid], async () => {
          const t0 = performance.now();
          const r = await sbx.files.write('/tmp/big', source(up), { requestTimeoutMs: 3_600_000, signal: checkInterrupted.signal });
          if (r.written !== TOTAL) throw new Error(`${tier}: wrote ${r.written} of ${TOTAL} bytes`);
          return performance.now() - t0;
        });
        const r = await peakRss([d.pid, process.pid], async () => {
          const down = createHash('sha256');
          let got = 0;
          const t0 = performance.now();
          const stream = await sbx.files.read('/tmp/big', { format: 'stream', requestTimeoutMs: 3_600_000, signal: checkInterrupted.signal });
          for await (const c of stream as unknown as AsyncIterable<Uint8Array>) {
            down.update(c);
            got += c.length;
          }
          const ms = performance.now() - t0;
          if (got !== TOTAL || down.digest('hex') !== up.digest('hex')) throw new Error(`${tier}: read back ${got} bytes that differ from what was written`);
          return ms;
        });
        rows.push({
          what: `${tier}: \`files.write\` of a stream, then \`files.read\` as a stream`,
          upMBs: mbs(w.result),
          downMBs: mbs(r.result),
          berthdKiB: [berthd0, Math.max(w.peakKiB[0]!, r.peakKiB[0]!)],
          clientKiB: [client0, Math.max(w.peakKiB[1]!, r.peakKiB[1]!)],
        });
        console.error(`${tier}: up ${rows.at(-1)!.upMBs.toFixed(0)} MB/s, down ${rows.at(-1)!.downMBs.toFixed(0)} MB/s, berthd RSS peak ${(rows.at(-1)!.berthdKiB![1] / 1024).toFixed(0)} MiB`);
      } finally {
        await sbx.kill().catch(() => undefined);
      }
    }
  } finally {
    await d.deleteAllSandboxes().catch(() => undefined);
    await d.destroy();
  }
  const mib = (k: number) => `${(k / 1024).toFixed(0)} MiB`;
  const host = rows[0]!;
  const text = [
    `Host: ${cpus()[0]?.model ?? 'cpu'}, ${cpus().length} cores, kernel ${release()}, ${new Date().toISOString().slice(0, 10)}. One file of ${MIB} MiB, made on the fly from a repeated 4 MiB random block, streamed through the SDK into a fresh sandbox per tier (128 MiB memory limit, ${MIB + 512} MiB disk) and read back; SHA-256 compared both ways. Resident memory sampled every 50 ms (before → peak).`,
    '',
    '| what | write MB/s (vs host disk) | read MB/s (vs host disk) | berthd RSS before → peak | client RSS before → peak |',
    '|---|---|---|---|---|',
    ...rows.map((r) =>
      r === host
        ? `| ${r.what} | ${r.upMBs.toFixed(0)} | ${r.downMBs.toFixed(0)} | | ${mib(r.clientKiB[0])} → ${mib(r.clientKiB[1])} |`
        : `| ${r.what} | ${r.upMBs.toFixed(0)} (${(r.upMBs / host.upMBs).toFixed(2)}×) | ${r.downMBs.toFixed(0)} (${(r.downMBs / host.downMBs).toFixed(2)}×) | ${mib(r.berthdKiB![0])} → ${mib(r.berthdKiB![1])} | ${mib(r.clientKiB[0])} → ${mib(r.clientKiB[1])} |`,
    ),
  ].join('\n');
  console.log(text);
  if (values.write) updateBenchmarks(values.write, 'sandbox-files', 'Sandboxes: streaming a large file in and out', `node dist/bench/sandbox-files.js --mib ${MIB} --write BENCHMARKS.md`, text);
}

main().catch((e) => {
  console.error(e);
  process.exit(e instanceof Interrupted || checkInterrupted.signal.aborted ? 130 : 1);
});
