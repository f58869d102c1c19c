// Workload networking on one host: a bridge and subnet per project, a network namespace per task
// wired with the standard CNI plugins (loopback, bridge + host-local IPAM), nftables rules for
// isolation and egress (firewall.ts), and a DNS server on each bridge's gateway (dns.ts).
//
// Ownership (what is cleaned up, and when):
//   net_networks row   project → subnet + bridge name; the subnet stays the project's.
//   net_attachments    one row per task, written BEFORE anything is created on the host, so a
//                      crash half-way leaves a record that detach() (or the daemon's orphan
//                      collection at start-up, through the drivers' listTasks) finishes.
//   <dir>/ns/<task>    the task's network namespace (a bind mount of /proc/<pid>/ns/net).
//   <dir>/etc/<task>/  its resolv.conf and hosts.
//   bridge, veth pair  created by the bridge plugin; the veth goes with CNI DEL, the bridge with
//                      the project's last attachment.
//   nft tables         berth_<instance> (inet + bridge), re-rendered from the rows after every
//                      change; dropped with the last attachment.
// Tasks keep their network while berthd is down (like their processes); DNS pauses until it is back.
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Logger } from 'pino';
import type { DB } from '../store/db.js';
import { run } from '../lib/exec.js';
import { isMountPoint } from '../lib/host.js';
import { BerthError, invalidArgument } from '../core/errors.js';
import type { TaskNetwork } from '../core/driver.js';
import { cni, DEFAULT_CNI_PATH, type CniResult } from './cni.js';
import { cidrsOverlap, formatCidr, formatIp, nthSubnet, parseCidr, parseIp, subnetCount, type Cidr } from './cidr.js';
import { applyFirewall, removeFirewall, type EgressPolicy, type FirewallState } from './firewall.js';
import { DnsServer, hostResolvers, INTERNAL_SUFFIX } from './dns.js';

export const DEFAULT_POOL = '10.89.0.0/16';
export const DEFAULT_SUBNET_PREFIX = 24;

export interface NetworkOptions {
  /** Berth-owned folder for namespaces, IPAM state and per-task files. */
  dir: string;
  db: DB;
  /** Identifies this daemon's bridges and tables (several daemons may share a host). */
  instance: string;
  /** Pool that project subnets are cut from, and their size. */
  pool?: string;
  subnetPrefix?: number;
  cniPath?: string;
  log: Logger;
}

/** What a task asks for (from its spec), plus the hostname its hosts file names. */
export interface NetworkRequest extends TaskNetwork {
  hostname: string;
}

/** What a driver gets: where the task's network is and how it is addressed. */
export interface NetworkAttachment {
  taskId: string;
  project: string;
  /** Path of the network namespace (bind mount) the task must join. */
  netns: string;
  ip: string;
  prefix: number;
  gateway: string;
  /** MAC address of the task's eth0 (a microVM's NIC takes it over). */
  mac: string;
  hostVeth: string;
  bridge: string;
  /** Files to bind over /etc/resolv.conf and /etc/hosts. */
  resolvConf: string;
  hosts: string;
}

interface NetworkRow {
  project: string;
  subnet: string;
  bridge: string;
}
interface AttachmentRow {
  task_id: string;
  driver: string;
  project: string;
  egress: string;
  names: string;
  ip: string | null;
  mac: string | null;
  host_veth: string | null;
}

/** Extra names (e.g. services → ready replicas): addresses, or undefined when unknown. */
export type NameProvider = (project: string, name: string) => string[] | undefined;

/**
 * The task network a spec asks for: `network.mode` "project" (the default) or "none"; the egress
 * policy defaults to allow-all for workloads and deny-all for sandboxes.
 */
export function taskNetworkFor(
  spec: { network?: { mode?: 'project' | 'none'; egress?: TaskNetwork['egress'] } | undefined },
  project: string,
  name: string,
  defaultEgress: TaskNetwork['egress'],
): TaskNetwork | undefined {
  if (spec.network?.mode === 'none') return undefined;
  return { project, egress: spec.network?.egress ?? defaultEgress, dnsNames: [name] };
}

/** A stable short id for a data directory (bridge and table names are derived from it). */
export function instanceId(dataDir: string): string {
  return createHash('sha256').update(dataDir).digest('hex').slice(0, 6);
}

export class NetworkManager {
  readonly pool: Cidr;
  readonly subnetPrefix: number;
  readonly table: string;
  readonly bridgePrefix: string;
  private readonly cniPath: string;
  private readonly dns: DnsServer;
  private readonly providers: NameProvider[] = [];
  /** attach/detach/firewall are serialized: they share bridges, IPAM and the rule set. */
  private queue: Promise<unknown> = Promise.resolve();

  constructor(private readonly opts: NetworkOptions) {
    const pool = parseCidr(opts.pool ?? DEFAULT_POOL);
    if (!pool) throw invalidArgument(`network pool "${opts.pool}" is not a CIDR block like 10.89.0.0/16`);
    const prefix = opts.subnetPrefix ?? DEFAULT_SUBNET_PREFIX;
    if (!(prefix >= pool.prefix && prefix <= 29)) throw invalidArgument(`subnet prefix /${prefix} must be between the pool's /${pool.prefix} and /29`);
    this.pool = pool;
    this.subnetPrefix = prefix;
    this.table = `berth_${opts.instance}`;
    this.bridgePrefix = `b${opts.instance}`;
    this.cniPath = opts.cniPath ?? DEFAULT_CNI_PATH;
    for (const d of ['ns', 'etc', 'ipam']) mkdirSync(join(opts.dir, d), { recursive: true, mode: 0o700 });
    opts.db.exec(`
      CREATE TABLE IF NOT EXISTS net_networks (project TEXT PRIMARY KEY, subnet TEXT NOT NULL UNIQUE, bridge TEXT NOT NULL UNIQUE, created_at TEXT NOT NULL);
      CREATE TABLE IF NOT EXISTS net_attachments (task_id TEXT PRIMARY KEY, driver TEXT NOT NULL, project TEXT NOT NULL, egress TEXT NOT NULL,
        names TEXT NOT NULL, ip TEXT, mac TEXT, host_veth TEXT, created_at TEXT NOT NULL);
    `);
    this.dns = new DnsServer((name, client) => this.resolve(name, client), hostResolvers(), opts.log);
  }

  private locked<T>(fn: () => Promise<T>): Promise<T> {
    const next = this.queue.then(fn, fn);
    this.queue = next.catch(() => undefined);
    return next;
  }

  /** Start-up: finish what a crash interrupted, re-apply the rules, serve DNS again. */
  async init(): Promise<void> {
    await this.locked(async () => {
      for (const n of this.networks()) {
        if (this.attachmentsOf(n.project).length === 0) await this.removeBridge(n);
        else await this.serveDns(n);
      }
      await this.syncFirewall();
    });
  }

  /** Adds a name source for DNS (services register their ready replicas this way). */
  addNameProvider(p: NameProvider): void {
    this.providers.push(p);
  }

  /**
   * Gives a task its network namespace, address and rules. Cleans up after itself on failure.
   * `makeNamespace`, when given, makes the (empty) namespace instead: it starts the task's process
   * under `unshare --net=<netns>` (which binds the new namespace there before it execs the process),
   * and resolves once the namespace is bound. The process so starts at once, in its namespace, while
   * the rest is set up (a microVM restored from a snapshot does this), and no separate process is
   * spawned to make the namespace. Not called when the namespace exists already.
   */
  attach(taskId: string, driver: string, req: NetworkRequest, makeNamespace?: (netns: string) => Promise<void>): Promise<NetworkAttachment> {
    return this.locked(async () => {
      const existing = this.row(taskId);
      if (existing?.ip) return this.describe(existing);
      const db = this.opts.db;
      const net = this.networkFor(req.project);
      db.prepare('INSERT OR REPLACE INTO net_attachments (task_id, driver, project, egress, names, created_at) VALUES (?, ?, ?, ?, ?, ?)').run(
        taskId, driver, req.project, JSON.stringify(req.egress), JSON.stringify(req.dnsNames), new Date().toISOString(),
      );
      try {
        const ns = this.netnsPath(taskId);
        if (!isMountPoint(ns)) {
          writeFileSync(ns, '', { mode: 0o600 });
          if (makeNamespace) await makeNamespace(ns);
          else {
            const r = await run('unshare', [`--net=${ns}`, 'true'], { timeoutMs: 10_000 });
            if (r.code !== 0) throw new Error(`could not create a network namespace: ${r.stderr.trim()}`);
          }
        }
        await cni({ command: 'ADD', containerId: taskId, netns: ns, ifname: 'lo', config: { cniVersion: '1.0.0', name: 'berth-lo', type: 'loopback' } }, this.cniPath);
        const res = await cni({ command: 'ADD', containerId: taskId, netns: ns, ifname: 'eth0', config: this.bridgeConfig(net) }, this.cniPath);
        const parsed = parseBridgeResult(res!, ns);
        db.prepare('UPDATE net_attachments SET ip = ?, mac = ?, host_veth = ? WHERE task_id = ?').run(parsed.ip, parsed.mac, parsed.hostVeth, taskId);
        const att = this.describe(this.row(taskId)!);
        const etc = join(this.opts.dir, 'etc', taskId);
        mkdirSync(etc, { recursive: true, mode: 0o755 });
        writeFileSync(att.resolvConf, `nameserver ${att.gateway}\nsearch ${req.project}${INTERNAL_SUFFIX}\noptions ndots:1\n`, { mode: 0o644 });
        writeFileSync(att.hosts, `127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n${att.ip}\t${req.hostname}\n`, { mode: 0o644 });
        await this.serveDns(net);
        await this.syncFirewall();
        return att;
      } catch (e) {
        await this.teardown(taskId).catch((err) => this.opts.log.warn({ task: taskId, err: (err as Error).message }, 'network cleanup after a failed attach'));
        throw new BerthError('failed_precondition', `could not attach the task to network ${net.bridge} (${net.subnet}): ${(e as Error).message}`);
      }
    });
  }

  /** Removes everything attach() created for the task (only if `driver` owns it, when given). Idempotent. */
  detach(taskId: string, driver?: string): Promise<void> {
    // Every driver destroy comes here: a task that never had a network waits for no lock.
    if (!this.row(taskId) && !existsSync(this.netnsPath(taskId))) return Promise.resolve();
    return this.locked(async () => {
      const row = this.row(taskId);
      if (driver && row && row.driver !== driver) return;
      await this.teardown(taskId);
    });
  }

  /** Tasks of one driver that own a network attachment (for orphan collection after a crash). */
  tasksOf(driver: string): string[] {
    return (this.opts.db.prepare('SELECT task_id FROM net_attachments WHERE driver = ?').all(driver) as { task_id: string }[]).map((r) => r.task_id);
  }

  /** The DNS server of a project's network (`<gateway>:53`), once the project has one. */
  dnsServerFor(project: string): string | undefined {
    const n = this.opts.db.prepare('SELECT subnet FROM net_networks WHERE project = ?').get(project) as { subnet: string } | undefined;
    return n && this.dns.addresses().includes(formatIp(parseCidr(n.subnet)!.base + 1)) ? `${formatIp(parseCidr(n.subnet)!.base + 1)}:53` : undefined;
  }

  get(taskId: string): NetworkAttachment | undefined {
    const r = this.row(taskId);
    return r?.ip ? this.describe(r) : undefined;
  }

  /** Stops serving DNS (berthd is stopping); tasks keep their network. */
  close(): void {
    this.dns.close();
  }

  private async teardown(taskId: string): Promise<void> {
    const row = this.row(taskId);
    const ns = this.netnsPath(taskId);
    if (row) {
      const net = this.networkFor(row.project);
      // DEL works without the namespace too (IPAM is released by container id).
      const netns = isMountPoint(ns) ? ns : '';
      await cni({ command: 'DEL', containerId: taskId, netns, ifname: 'eth0', config: this.bridgeConfig(net) }, this.cniPath);
    }
    if (isMountPoint(ns)) {
      const r = await run('umount', [ns], { timeoutMs: 10_000 });
      if (r.code !== 0) await run('umount', ['-l', ns], { timeoutMs: 10_000 });
    }
    rmSync(ns, { force: true });
    rmSync(join(this.opts.dir, 'etc', taskId), { recursive: true, force: true });
    if (!row) return;
    this.opts.db.prepare('DELETE FROM net_attachments WHERE task_id = ?').run(taskId);
    const net = this.networks().find((n) => n.project === row.project);
    if (net && this.attachmentsOf(row.project).length === 0) await this.removeBridge(net);
    await this.syncFirewall();
  }

  private async removeBridge(n: NetworkRow): Promise<void> {
    const gw = formatIp(parseCidr(n.subnet)!.base + 1);
    this.dns.unlisten(gw);
    if (existsSync(`/sys/class/net/${n.bridge}`)) await run('ip', ['link', 'del', n.bridge], { timeoutMs: 10_000 });
  }

  private async serveDns(n: NetworkRow): Promise<void> {
    const gw = formatIp(parseCidr(n.subnet)!.base + 1);
    try {
      await this.dns.listen(gw);
    } catch (e) {
      this.opts.log.warn({ gateway: gw, err: (e as Error).message }, 'cannot serve DNS on the gateway');
    }
  }

  private async syncFirewall(): Promise<void> {
    const rows = this.opts.db.prepare('SELECT * FROM net_attachments WHERE ip IS NOT NULL').all() as AttachmentRow[];
    if (rows.length === 0) return removeFirewall(this.table);
    const projects = new Set(rows.map((r) => r.project));
    const nets = this.networks().filter((n) => projects.has(n.project));
    const state: FirewallState = {
      table: this.table,
      bridgePrefix: this.bridgePrefix,
      subnets: nets.map((n) => n.subnet),
      gateways: nets.map((n) => formatIp(parseCidr(n.subnet)!.base + 1)),
      bridges: nets.map((n) => n.bridge),
      attachments: rows.map((r) => ({ ip: r.ip!, mac: r.mac!, hostVeth: r.host_veth!, egress: JSON.parse(r.egress) as EgressPolicy })),
    };
    await applyFirewall(state);
  }

  /** The project's network; allocated (first free subnet of the pool that the host does not use) on first use. */
  private networkFor(project: string): NetworkRow {
    const db = this.opts.db;
    const found = db.prepare('SELECT project, subnet, bridge FROM net_networks WHERE project = ?').get(project) as NetworkRow | undefined;
    if (found) return found;
    const taken = this.networks();
    const hostRoutes = hostRouteCidrs();
    for (let i = 0; i < subnetCount(this.pool, this.subnetPrefix); i++) {
      const sub = nthSubnet(this.pool, this.subnetPrefix, i)!;
      const subnet = formatCidr(sub);
      const bridge = `${this.bridgePrefix}${i.toString(16).padStart(4, '0')}`;
      if (taken.some((t) => t.subnet === subnet || t.bridge === bridge)) continue;
      if (hostRoutes.some((r) => cidrsOverlap(r, sub))) continue; // another network on this host uses it
      const row = { project, subnet, bridge };
      db.prepare('INSERT INTO net_networks (project, subnet, bridge, created_at) VALUES (?, ?, ?, ?)').run(project, subnet, bridge, new Date().toISOString());
      return row;
    }
    throw new BerthError('unavailable', `no free /${this.subnetPrefix} subnet left in the network pool ${formatCidr(this.pool)}; start berthd with a larger --network-pool`);
  }

  private bridgeConfig(n: NetworkRow): Record<string, unknown> & { type: string } {
    return {
      cniVersion: '1.0.0',
      name: `berth-${n.project}`,
      type: 'bridge',
      bridge: n.bridge,
      isGateway: true,
      ipMasq: false, // masquerading is in Berth's own table (firewall.ts)
      hairpinMode: true,
      ipam: { type: 'host-local', ranges: [[{ subnet: n.subnet }]], routes: [{ dst: '0.0.0.0/0' }], dataDir: join(this.opts.dir, 'ipam') },
    };
  }

  private networks(): NetworkRow[] {
    return this.opts.db.prepare('SELECT project, subnet, bridge FROM net_networks').all() as NetworkRow[];
  }
  private attachmentsOf(project: string): AttachmentRow[] {
    return this.opts.db.prepare('SELECT * FROM net_attachments WHERE project = ?').all(project) as AttachmentRow[];
  }
  private row(taskId: string): AttachmentRow | undefined {
    return this.opts.db.prepare('SELECT * FROM net_attachments WHERE task_id = ?').get(taskId) as AttachmentRow | undefined;
  }
  private netnsPath(taskId: string): string {
    return join(this.opts.dir, 'ns', taskId);
  }

  private describe(r: AttachmentRow): NetworkAttachment {
    const net = this.networkFor(r.project);
    const sub = parseCidr(net.subnet)!;
    return {
      taskId: r.task_id,
      project: r.project,
      netns: this.netnsPath(r.task_id),
      ip: r.ip!,
      prefix: sub.prefix,
      gateway: formatIp(sub.base + 1),
      mac: r.mac!,
      hostVeth: r.host_veth!,
      bridge: net.bridge,
      resolvConf: join(this.opts.dir, 'etc', r.task_id, 'resolv.conf'),
      hosts: join(this.opts.dir, 'etc', r.task_id, 'hosts'),
    };
  }

  /** DNS: `<name>.<project>.internal`, or a bare `<name>` in the asking task's own project. */
  resolve(fqdn: string, clientIp: string): string[] | undefined {
    let name: string;
    let project: string;
    if (fqdn.endsWith(INTERNAL_SUFFIX)) {
      const labels = fqdn.slice(0, -INTERNAL_SUFFIX.length).split('.');
      if (labels.length !== 2) return [];
      [name, project] = labels as [string, string];
    } else {
      const client = this.opts.db.prepare('SELECT project FROM net_attachments WHERE ip = ?').get(clientIp) as { project: string } | undefined;
      if (!client) return undefined;
      name = fqdn;
      project = client.project;
    }
    for (const p of this.providers) {
      const ips = p(project, name);
      if (ips) return ips;
    }
    const rows = this.opts.db.prepare('SELECT ip, names FROM net_attachments WHERE project = ? AND ip IS NOT NULL').all(project) as { ip: string; names: string }[];
    return rows.filter((r) => (JSON.parse(r.names) as string[]).includes(name)).map((r) => r.ip);
  }
}

/** Address, MAC and host-side veth of the task's eth0 from the bridge plugin's result. */
export function parseBridgeResult(res: CniResult, netns: string): { ip: string; mac: string; hostVeth: string } {
  const ifs = res.interfaces ?? [];
  const ipEntry = res.ips?.find((i) => i.interface !== undefined && ifs[i.interface]?.sandbox) ?? res.ips?.[0];
  const inner = ipEntry?.interface !== undefined ? ifs[ipEntry.interface] : ifs.find((i) => i.sandbox === netns);
  const hostVeth = ifs.find((i) => !i.sandbox && i.name.startsWith('veth'));
  const ip = ipEntry?.address.split('/')[0];
  if (!ip || parseIp(ip) === undefined || !inner?.mac || !hostVeth) throw new Error(`unexpected result from the bridge plugin: ${JSON.stringify(res)}`);
  return { ip, mac: inner.mac, hostVeth: hostVeth.name };
}

/** Destinations of the host's routes, except default routes (from /proc/net/route). */
function hostRouteCidrs(): Cidr[] {
  const out: Cidr[] = [];
  let text = '';
  try {
    text = readFileSync('/proc/net/route', 'utf8');
  } catch {
    return out;
  }
  for (const line of text.split('\n').slice(1)) {
    const f = line.trim().split(/\s+/);
    if (f.length < 8) continue;
    const le = (hex: string) => Buffer.from(hex, 'hex').readUInt32LE(0);
    const dst = le(f[1]!);
    const mask = le(f[7]!);
    if (mask === 0) continue;
    const prefix = 32 - Math.log2((~mask >>> 0) + 1);
    if (Number.isInteger(prefix)) out.push({ base: dst >>> 0, prefix });
  }
  return out;
}
