// Read-only views of host state shared by the drivers, the test harness and the conformance suite.
import { existsSync, readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';

/** Mount points at or below `dir` (octal escapes of /proc/self/mountinfo decoded), deepest first. */
export function mountPointsUnder(dir: string): string[] {
  const out: string[] = [];
  for (const l of readFileSync('/proc/self/mountinfo', 'utf8').split('\n')) {
    const mp = l.split(' ')[4]?.replace(/\\(\d{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
    if (mp && (mp === dir || mp.startsWith(`${dir}/`))) out.push(mp);
  }
  return out.sort((a, b) => b.length - a.length);
}

export function isMountPoint(path: string): boolean {
  return mountPointsUnder(path).includes(path);
}

/** Every cgroup hierarchy: the v2 root, or each v1 controller (and a hybrid host's "unified"). */
export function cgroupHierarchies(): string[] {
  const root = '/sys/fs/cgroup';
  if (existsSync(join(root, 'cgroup.controllers'))) return [root];
  try {
    return readdirSync(root, { withFileTypes: true })
      .filter((e) => e.isDirectory())
      .map((e) => join(root, e.name));
  } catch {
    return [];
  }
}

/** CPU time (user + system, all threads) a process has used, in ms; 0 once it is gone. */
export function processCpuMs(pid: number): number {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' '); // after "pid (comm) "; comm may hold ") "
    return (Number(f[11]) + Number(f[12])) * 10; // utime + stime in USER_HZ ticks (100 per second on Linux)
  } catch {
    return 0;
  }
}
