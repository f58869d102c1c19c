// Runs CNI plugins (the standard containernetworking plugins from Debian: bridge, host-local,
// loopback) following the CNI 1.0 contract: the plugin binary gets the operation and the
// container in CNI_* environment variables, the network config on stdin, and answers with a
// result (or an error object) on stdout. DEL must succeed when there is nothing left to delete.
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { run } from '../lib/exec.js';

export const DEFAULT_CNI_PATH = '/usr/lib/cni';

export interface CniInterface {
  name: string;
  mac?: string;
  sandbox?: string;
}
export interface CniResult {
  cniVersion: string;
  interfaces?: CniInterface[];
  ips?: { interface?: number; address: string; gateway?: string }[];
  routes?: { dst: string; gw?: string }[];
}

export class CniError extends Error {
  constructor(
    readonly plugin: string,
    readonly code: number,
    msg: string,
  ) {
    super(`CNI plugin ${plugin}: ${msg}`);
    this.name = 'CniError';
  }
}

export interface CniCall {
  command: 'ADD' | 'DEL' | 'CHECK';
  containerId: string;
  netns: string;
  ifname: string;
  config: Record<string, unknown> & { type: string };
}

export async function cni(call: CniCall, cniPath = DEFAULT_CNI_PATH): Promise<CniResult | undefined> {
  const plugin = join(cniPath, call.config.type);
  if (!existsSync(plugin)) {
    throw new CniError(call.config.type, 127, `${plugin} is not installed (apt-get install containernetworking-plugins; scripts/setup.sh does it)`);
  }
  const env = {
    PATH: process.env.PATH ?? '/usr/sbin:/usr/bin:/sbin:/bin',
    CNI_COMMAND: call.command,
    CNI_CONTAINERID: call.containerId,
    CNI_NETNS: call.netns,
    CNI_IFNAME: call.ifname,
    CNI_PATH: cniPath,
  };
  const r = await run(plugin, [], { env, input: JSON.stringify(call.config), timeoutMs: 30_000 });
  if (r.code !== 0) {
    let msg = (r.stderr || r.stdout).trim();
    try {
      const e = JSON.parse(r.stdout) as { msg?: string; details?: string };
      msg = [e.msg, e.details].filter(Boolean).join(': ') || msg;
    } catch {
      /* not JSON */
    }
    throw new CniError(call.config.type, r.code, msg || `exited ${r.code}`);
  }
  if (call.command !== 'ADD') return undefined;
  return JSON.parse(r.stdout) as CniResult;
}
