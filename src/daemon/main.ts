#!/usr/bin/env node
// berthd entry point.
import { Command } from 'commander';
import { Daemon, VERSION } from './berthd.js';
import { DEFAULT_BASE_DOMAIN, settingsFromFlags, type IngressFlags } from '../ingress/types.js';
import { useSpawner } from '../lib/exec.js';
import { Spawner } from '../lib/spawner.js';

const program = new Command()
  .name('berthd')
  .description('Berth daemon: runs workloads with per-workload isolation')
  .version(VERSION)
  .option('--data-dir <dir>', 'state directory', process.env.BERTH_DATA_DIR ?? '/var/lib/berth')
  .option('--listen <host:port>', 'TCP address of the API', process.env.BERTH_LISTEN ?? '127.0.0.1:7878')
  .option('--socket <path>', 'unix socket of the API (default <data-dir>/berthd.sock)')
  .option('--cgroup-parent <name>', 'parent cgroup for workloads', 'berth')
  .option('--log-level <level>', 'trace|debug|info|warn|error', process.env.BERTH_LOG_LEVEL ?? 'info')
  .option('--network-pool <cidr>', "IPv4 block that projects' subnets are cut from", process.env.BERTH_NETWORK_POOL ?? '10.89.0.0/16')
  .option('--network-subnet-prefix <n>', 'size of each project subnet (prefix length)', '24')
  .option('--ingress-http <host:port|off>', 'HTTP listener of the ingress', process.env.BERTH_INGRESS_HTTP ?? '0.0.0.0:80')
  .option('--ingress-https <host:port|off>', 'HTTPS listener of the ingress', process.env.BERTH_INGRESS_HTTPS ?? '0.0.0.0:443')
  .option('--base-domain <domain>', 'services get <service>.<project>.<domain>', process.env.BERTH_BASE_DOMAIN ?? DEFAULT_BASE_DOMAIN)
  .option('--acme-directory <url>', 'ACME directory URL: certificates for tls "acme" routes come from there')
  .option('--acme-email <address>', 'contact e-mail for the ACME account')
  .option('--acme-ca-root <file>', 'PEM root that signs the ACME server itself (private ACME servers)')
  .option('--ingress-busy-poll <auto|on|off>', "the ingress proxy's busy-polling: auto = only under sustained load (faster on VMs, a spinning core while on)", process.env.BERTH_INGRESS_BUSY_POLL ?? 'auto')
  .parse();

const o = program.opts<{ dataDir: string; listen: string; socket?: string; cgroupParent: string; logLevel: string; networkPool: string; networkSubnetPrefix: string } & IngressFlags>();

async function main() {
  if (process.getuid?.() !== 0) {
    console.error('berthd: must run as root (it manages mounts, cgroups and containers)');
    process.exit(1);
  }
  let daemon: Daemon;
  // Host tools are started by a small helper process: a start from berthd stalls its event loop.
  const spawner = new Spawner();
  useSpawner(spawner);
  try {
    const prefix = Number(o.networkSubnetPrefix);
    if (!Number.isInteger(prefix)) throw new Error(`--network-subnet-prefix must be a number such as 24, not "${o.networkSubnetPrefix}"`);
    const ingress = settingsFromFlags(o);
    daemon = new Daemon({
      dataDir: o.dataDir,
      listen: o.listen,
      ...(o.socket ? { socketPath: o.socket } : {}),
      cgroupParent: o.cgroupParent,
      logLevel: o.logLevel,
      network: { pool: o.networkPool, subnetPrefix: prefix },
      ingress,
    });
    await daemon.start();
  } catch (e) {
    console.error(`berthd: ${(e as Error).message}`);
    process.exit(1);
  }
  let stopping = false;
  const shutdown = async (sig: string) => {
    if (stopping) return;
    stopping = true;
    daemon.log.info({ signal: sig }, 'shutting down (workloads keep running)');
    const t = setTimeout(() => process.exit(1), 15_000);
    await daemon.stop();
    useSpawner(undefined);
    spawner.close();
    clearTimeout(t);
    process.exit(0);
  };
  process.on('SIGTERM', () => void shutdown('SIGTERM'));
  process.on('SIGINT', () => void shutdown('SIGINT'));
}
void main();
