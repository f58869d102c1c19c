// Where the guest agent binary (agent/, built by scripts/setup.sh) lives on the host.
import { existsSync, statSync } from 'node:fs';
import { spawnSync } from 'node:child_process';

export const BERTH_AGENT = '/usr/local/lib/berth/berth-agent';

export function findAgent(): string | undefined {
  return [process.env.BERTH_AGENT, BERTH_AGENT].find((p): p is string => !!p && existsSync(p));
}

const versions = new Map<string, string | undefined>();

/** The agent binary's version ("0.2.0"; `berth-agent --version`), asked once per binary (path and mtime); undefined if it does not answer. */
export function agentVersion(path: string): string | undefined {
  let key: string;
  try {
    key = `${path}\0${statSync(path).mtimeMs}`;
  } catch {
    return undefined;
  }
  if (!versions.has(key)) {
    const r = spawnSync(path, ['--version'], { encoding: 'utf8', timeout: 5000 });
    versions.set(key, /^berth-agent\/(\d+\.\d+\.\d+)/.exec(r.stdout ?? '')?.[1]);
  }
  return versions.get(key);
}

/** Whether the agent binary is at least `want` (major.minor.patch). */
export function agentAtLeast(path: string, want: string): boolean {
  const have = agentVersion(path)?.split('.').map(Number);
  if (!have) return false;
  const w = want.split('.').map(Number);
  for (let i = 0; i < 3; i++) if (have[i] !== w[i]) return have[i]! > w[i]!;
  return true;
}
