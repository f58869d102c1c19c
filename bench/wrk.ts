// wrk, run and read: requests/s, p50/p99 latency, errors, and the CPU time per request of the
// processes behind it (independent of how busy the host is). Shared by the ingress benchmarks.
import { readFileSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { processCpuMs } from '../src/lib/host.js';

export interface WrkResult {
  rps: number;
  p50: number;
  p99: number;
  errors: number;
  /** CPU time per request (µs) of the backend and of the proxy. */
  backendUs: number;
  proxyUs: number;
}

/** user+system CPU time of a process (all threads) in µs. */
export function cpuUs(pid: number | undefined): number {
  return pid ? processCpuMs(pid) * 1000 : 0;
}

/**
 * CPU time (µs) of the cgroup a process is in: for a workload whose work is done by short-lived
 * children (busybox httpd forks per connection and ignores SIGCHLD, so no parent's counters see it).
 */
export function cgroupCpuUs(pid: number | undefined): number {
  if (!pid) return 0;
  try {
    const lines = readFileSync(`/proc/${pid}/cgroup`, 'utf8').trim().split('\n');
    const v1 = lines.map((l) => l.split(':')).find(([, ctrls]) => ctrls!.split(',').includes('cpuacct'));
    if (v1) return Number(readFileSync(`/sys/fs/cgroup/${v1[1]}/${v1[2]}/cpuacct.usage`, 'utf8')) / 1000;
    const v2 = lines.find((l) => l.startsWith('0::'))!.slice(3);
    return Number(/usage_usec (\d+)/.exec(readFileSync(`/sys/fs/cgroup/${v2}/cpu.stat`, 'utf8'))![1]);
  } catch {
    return 0;
  }
}

/** wrk's "1.23ms" / "456.00us" / "1.01s" → ms. */
function toMs(s: string): number {
  const m = /^([\d.]+)(us|ms|s|m)$/.exec(s.trim());
  if (!m) throw new Error(`cannot read wrk latency "${s}"`);
  const x = Number(m[1]);
  return m[2] === 'us' ? x / 1000 : m[2] === 'ms' ? x : m[2] === 's' ? x * 1000 : x * 60_000;
}

export function runWrk(
  url: string,
  o: { host?: string | undefined; seconds: number; connections: number; pin?: boolean; pids?: { backend?: number; proxy?: number }; backendCgroup?: boolean },
): WrkResult {
  const pids = o.pids ?? {};
  const backendCpu = o.backendCgroup ? cgroupCpuUs : cpuUs;
  const b0 = backendCpu(pids.backend);
  const p0 = cpuUs(pids.proxy);
  const args = ['-t2', `-c${o.connections}`, `-d${o.seconds}s`, '--latency', ...(o.host ? ['-H', `Host: ${o.host}`] : []), url];
  const argv = o.pin ? ['taskset', '-c', '0', 'wrk', ...args] : ['wrk', ...args];
  const r = spawnSync(argv[0]!, argv.slice(1), { encoding: 'utf8', timeout: (o.seconds + 30) * 1000 });
  if (r.status !== 0) throw new Error(`wrk failed: ${r.stderr}${r.stdout}`);
  const out = r.stdout;
  const rps = Number(/Requests\/sec:\s+([\d.]+)/.exec(out)?.[1]);
  const p50 = toMs(/^\s+50%\s+(\S+)/m.exec(out)?.[1] ?? '');
  const p99 = toMs(/^\s+99%\s+(\S+)/m.exec(out)?.[1] ?? '');
  const sock = /Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)/.exec(out);
  const non2xx = Number(/Non-2xx or 3xx responses: (\d+)/.exec(out)?.[1] ?? 0);
  const errors = non2xx + (sock ? sock.slice(1).reduce((a, b) => a + Number(b), 0) : 0);
  const requests = Number(/(\d+) requests in/.exec(out)?.[1]) || 1;
  return { rps, p50, p99, errors, backendUs: (backendCpu(pids.backend) - b0) / requests, proxyUs: (cpuUs(pids.proxy) - p0) / requests };
}

/** HAProxy's current worker (the child of its master that serves); the master itself idles. */
export function haproxyWorker(masterPid: number | undefined): number | undefined {
  if (!masterPid) return undefined;
  const kids = readFileSync(`/proc/${masterPid}/task/${masterPid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean).map(Number);
  return kids.at(-1);
}

export function haproxyVersion(): string {
  return /version (\S+)/.exec(spawnSync('haproxy', ['-v'], { encoding: 'utf8' }).stdout)?.[1] ?? '?';
}
