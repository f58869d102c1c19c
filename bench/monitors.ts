// The monitors (conmon, or the agent in monitor mode) of an OCI driver's tasks, for the benchmarks that
// measure them (bench/isolation.ts, bench/start-latency.ts).
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';

/**
 * Their pids, from the pid file each monitor writes in its task folder (`<stateDir>/tasks/<id>/conmon.pid`):
 * a pre-started spare monitor took its arguments on stdin, so its command line does not name the task.
 */
export function taskMonitorPids(stateDir: string): number[] {
  let ids: string[] = [];
  try {
    ids = readdirSync(join(stateDir, 'tasks'));
  } catch {
    return []; // no tasks
  }
  const pids: number[] = [];
  for (const id of ids) {
    try {
      const pid = Number(readFileSync(join(stateDir, 'tasks', id, 'conmon.pid'), 'utf8').trim());
      if (pid > 0) pids.push(pid);
    } catch {
      /* raced with its removal */
    }
  }
  return pids;
}
