// Where the guest agent binary (agent/, built by scripts/setup.sh) lives on the host.
import { existsSync } from 'node:fs';

export const BERTH_AGENT = '/usr/local/lib/berth/berth-agent';

export function findAgent(): string | undefined {
  return [process.env.BERTH_AGENT, BERTH_AGENT].find((p): p is string => !!p && existsSync(p));
}
