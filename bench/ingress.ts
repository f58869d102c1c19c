// Benchmark: the ingress data plane. wrk (10 s, 50 connections, 2 threads) against the same small
// HTTP server (bench/ingress-backend, Go net/http, one replica on loopback), in the same run:
//   direct       wrk → backend
//   ingress http   wrk → Berth's ingress (HAProxy, configured by src/ingress exactly as berthd does) → backend
//   ingress https  the same over TLS (HTTP/1.1 + keep-alive, local-CA certificate)
//   node http    wrk → the leanest Node.js proxy (bench/ingress-node-proxy.ts) → backend
// Runs are interleaved (direct, ingress http, ingress https, node, direct, …) and each figure is the median
// over --runs. Throughput is a ratio against direct; latency is p99(target) − p99(direct).
// --pin: wrk on CPU 0, backend and proxy on CPU 1 (the proxy then has to share the backend's core).
// --backend node: the replica is a node:http server instead (slower per request, like many real apps).
// Usage: node dist/bench/ingress.js [--backend go|node] [--runs 5] [--duration 10] [--connections 50] [--pin] [--write BENCHMARKS.md]
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer, type AddressInfo } from 'node:net';
import { cpus } from 'node:os';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import pino from 'pino';
import { Ingress } from '../src/ingress/ingress.js';
import { updateBenchmarks } from './report.js';
import { Interrupted, catchInterrupts } from './interrupt.js';
import { haproxyVersion, haproxyWorker, runWrk, type WrkResult } from './wrk.js';

const { values } = parseArgs({
  options: {
    runs: { type: 'string', default: '5' },
    duration: { type: 'string', default: '10' },
    connections: { type: 'string', default: '50' },
    pin: { type: 'boolean', default: false },
    backend: { type: 'string', default: 'go' },
    write: { type: 'string' },
  },
});
const RUNS = Number(values.runs);
const DURATION = Number(values.duration);
const CONNS = Number(values.connections);
for (const [k, v] of [['--runs', RUNS], ['--duration', DURATION], ['--connections', CONNS]] as const) {
  if (!Number.isInteger(v) || v < 1) throw new Error(`${k} must be a whole number ≥ 1`);
}
const PIN = values.pin!;
const BACKEND = values.backend!;
if (BACKEND !== 'go' && BACKEND !== 'node') throw new Error('--backend must be go or node');
const ROOT = resolve(new URL('../..', import.meta.url).pathname);
const HOST = 'bench.berth.localhost';

const sorted = (xs: number[]) => [...xs].sort((a, b) => a - b);
const median = (xs: number[]) => {
  const s = sorted(xs);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};

function need(bin: string, pkg: string): void {
  if (spawnSync('sh', ['-c', `command -v ${bin}`]).status !== 0) throw new Error(`${bin} is not installed: apt-get install ${pkg}`);
}

async function freePort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', () => r()));
  const port = (s.address() as AddressInfo).port;
  await new Promise((r) => s.close(r));
  return port;
}

/** Start a child that prints its bound address on its first stdout line. */
async function startPrinting(cmd: string[], cpu: string | undefined): Promise<{ proc: ChildProcess; addr: string }> {
  const argv = cpu ? ['taskset', '-c', cpu, ...cmd] : cmd;
  const proc = spawn(argv[0]!, argv.slice(1), { stdio: ['ignore', 'pipe', 'inherit'] });
  const addr = await new Promise<string>((res, rej) => {
    let out = '';
    proc.stdout!.setEncoding('utf8').on('data', (d: string) => {
      out += d;
      if (out.includes('\n')) res(out.split('\n')[0]!.trim());
    });
    proc.once('exit', (c) => rej(new Error(`${cmd.join(' ')} exited ${c}`)));
  });
  return { proc, addr };
}


const wrk = (url: string, host: string | undefined, seconds: number, pids: { backend?: number; proxy?: number } = {}): WrkResult =>
  runWrk(url, { host, seconds, connections: CONNS, pin: PIN, pids });

const checkInterrupted = catchInterrupts('ingress bench');

async function main(): Promise<void> {
  need('wrk', 'wrk');
  need('haproxy', 'haproxy');
  if (BACKEND === 'go') need('go', 'golang (or the Go toolchain setup.sh installs)');
  if (PIN) need('taskset', 'util-linux');
  const tmp = mkdtempSync('/tmp/berth-bench-ingress-');
  const children: ChildProcess[] = [];
  let ingress: Ingress | undefined;
  try {
    let backendCmd = [process.execPath, join(ROOT, 'dist', 'bench', 'ingress-node-backend.js')];
    if (BACKEND === 'go') {
      backendCmd = [join(tmp, 'ingress-backend')];
      const b = spawnSync('go', ['build', '-o', backendCmd[0]!, '.'], { cwd: join(ROOT, 'bench', 'ingress-backend'), encoding: 'utf8', env: { ...process.env, CGO_ENABLED: '0' } });
      if (b.status !== 0) throw new Error(`building the backend failed: ${b.stderr}`);
    }
    const backend = await startPrinting([...backendCmd, '127.0.0.1:0'], PIN ? '1' : undefined);
    children.push(backend.proc);
    const [bHost, bPort] = backend.addr.split(':') as [string, string];

    const httpPort = await freePort();
    const httpsPort = await freePort();
    ingress = new Ingress({
      dir: join(tmp, 'ingress'),
      // Busy-polling off: this bench measures the proxy's CPU per request, which a spinning poller
      // would swamp (and it pins the worker's pid, which a busy-polling reload would replace).
      settings: { http: { host: '127.0.0.1', port: httpPort }, https: { host: '127.0.0.1', port: httpsPort }, baseDomain: 'berth.localhost', acme: undefined, busyPolling: 'off' },
      log: pino({ level: 'warn' }),
    });
    await ingress.start();
    // 127.0.0.1 as a host too: wrk sends SNI and Host from its URL, and cannot resolve *.localhost.
    await ingress.setRoutes([{ id: 'bench', hosts: [HOST, '127.0.0.1'], backends: [{ address: bHost, port: Number(bPort) }], tls: 'local' }]);
    const master = ingress.status().proxy.pid!;
    if (PIN) spawnSync('taskset', ['-a', '-cp', '1', String(master)]);
    const proxyPid = haproxyWorker(master)!;
    if (PIN) spawnSync('taskset', ['-a', '-cp', '1', String(proxyPid)]);

    const node = await startPrinting([process.execPath, join(ROOT, 'dist', 'bench', 'ingress-node-proxy.js'), '127.0.0.1:0', backend.addr], PIN ? '1' : undefined);
    children.push(node.proc);

    const targets: { name: string; url: string; host?: string; proxy?: number }[] = [
      { name: 'direct', url: `http://${backend.addr}/` },
      { name: 'ingress http', url: `http://127.0.0.1:${httpPort}/`, host: HOST, proxy: proxyPid },
      { name: 'ingress https', url: `https://127.0.0.1:${httpsPort}/`, proxy: proxyPid },
      { name: 'node http', url: `http://${node.addr}/`, host: HOST, proxy: node.proc.pid! },
    ];
    // The route's certificate is made before the route is applied; still, wait for HTTPS, then warm up.
    const deadline = Date.now() + 20_000;
    for (let w = wrk(targets[2]!.url, undefined, 1); w.rps === 0 || w.errors > 0; w = wrk(targets[2]!.url, undefined, 1)) {
      checkInterrupted();
      if (Date.now() > deadline) throw new Error('the HTTPS route did not answer within 20 s');
    }
    for (const t of targets) {
      checkInterrupted();
      const w = wrk(t.url, t.host, 2);
      if (w.errors > 0 || w.rps === 0) throw new Error(`${t.name}: warm-up got errors (${w.errors}) or no requests`);
    }
    const results = new Map<string, WrkResult[]>(targets.map((t) => [t.name, []]));
    for (let i = 0; i < RUNS; i++) {
      for (const t of targets) {
        checkInterrupted();
        const r = wrk(t.url, t.host, DURATION, { backend: backend.proc.pid!, ...(t.proxy ? { proxy: t.proxy } : {}) });
        results.get(t.name)!.push(r);
        console.error(`run ${i + 1}/${RUNS} ${t.name}: ${r.rps.toFixed(0)} req/s p50 ${r.p50.toFixed(2)} ms p99 ${r.p99.toFixed(2)} ms cpu ${r.backendUs.toFixed(0)}/${r.proxyUs.toFixed(0)} µs errors ${r.errors}`);
      }
    }
    const med = (name: string, k: keyof WrkResult) => median(results.get(name)!.map((r) => r[k]));
    const d = { rps: med('direct', 'rps'), p50: med('direct', 'p50'), p99: med('direct', 'p99') };
    const rows = targets.map((t) => {
      const rps = med(t.name, 'rps');
      const p99 = med(t.name, 'p99');
      const errors = results.get(t.name)!.reduce((a, r) => a + r.errors, 0);
      const ratio = rps / d.rps;
      const added = p99 - d.p99;
      const verdict = t.name === 'direct' ? '(baseline)' : `${ratio >= 0.8 ? '✅' : '❌'} ≥ 80 %, ${added <= 2 ? '✅' : '❌'} ≤ +2 ms`;
      const cpu = `${med(t.name, 'backendUs').toFixed(0)} / ${t.proxy ? med(t.name, 'proxyUs').toFixed(0) : '—'}`;
      return `| ${t.name} | ${rps.toFixed(0)} | ${(ratio * 100).toFixed(1)} % | ${med(t.name, 'p50').toFixed(2)} | ${p99.toFixed(2)} | ${t.name === 'direct' ? '—' : `${added >= 0 ? '+' : ''}${added.toFixed(2)}`} | ${cpu} | ${errors} | ${verdict} |`;
    });
    const text = [
      `Host: ${cpus().length} × ${cpus()[0]?.model ?? 'CPU'}, shared by wrk, the backend and the proxy${PIN ? ' (pinned: wrk on CPU 0; backend and proxy on CPU 1)' : ' (not pinned)'}.`,
      `wrk ${DURATION} s, ${CONNS} connections, 2 threads, keep-alive; backend: ${BACKEND === 'go' ? 'Go net/http "hello" server (bench/ingress-backend)' : 'Node.js node:http "hello" server (bench/ingress-node-backend.ts)'}, one replica on loopback;`,
      `HAProxy ${haproxyVersion()} configured by src/ingress (nbthread 1, round robin, retries + redispatch, keep-alive to the backend); medians of ${RUNS} interleaved runs.`,
      '',
      '| path | req/s | of direct | p50 ms | p99 ms | added p99 ms | CPU µs/req backend / proxy | errors | target |',
      '|---|---:|---:|---:|---:|---:|---:|---:|---|',
      ...rows,
    ].join('\n');
    console.log(text);
    if (values.write) {
      const cmd = `node dist/bench/ingress.js --backend ${BACKEND} --runs ${RUNS} --duration ${DURATION} --connections ${CONNS}${PIN ? ' --pin' : ''} --write BENCHMARKS.md`;
      const key = `ingress-${BACKEND}${PIN ? '-pinned' : ''}`;
      updateBenchmarks(values.write, key, `Ingress: through the proxy vs direct (${BACKEND} backend${PIN ? ', pinned CPUs' : ''})`, cmd, text);
    }
  } finally {
    await ingress?.stop();
    for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
    rmSync(tmp, { recursive: true, force: true });
  }
}

main().catch((e) => {
  console.error(`ingress bench: ${(e as Error).message}`);
  process.exit(e instanceof Interrupted ? 130 : 1);
});
