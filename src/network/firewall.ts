// The nftables rules that isolate workloads, rendered from Berth's state as one script and applied
// atomically (`nft -f -`), so the kernel always holds exactly what the state says — after every
// attach and detach, and again at start-up after a crash. Berth owns two tables per daemon
// instance (`inet berth_<inst>` and `bridge berth_<inst>`) and touches nothing else.
//
// What they enforce (issue 5/6: project isolation and egress policy):
// - host protection (inet input): from a workload bridge only DNS to the bridge's gateway, replies,
//   and allowlisted host destinations reach the host; its API and other services do not;
// - project isolation (inet forward): nothing is routed from one project's bridge to another's,
//   and nothing from outside opens a connection to a workload;
// - egress (inet forward + bridge forward for traffic inside a project): allow-all → anything
//   (masqueraded); deny-all → nothing; allowlist → only the listed CIDR/port/protocol tuples;
// - anti-spoofing (bridge prerouting): a workload port only sends from its own MAC and IPv4
//   address (containers keep CAP_NET_RAW), and no IPv6 (Berth's networks are IPv4 only), so the
//   address-keyed rules above cannot be dodged.
import { run } from '../lib/exec.js';
import type { EgressPolicy, EgressRule } from '../core/driver.js';

export type { EgressPolicy, EgressRule };

export interface FirewallAttachment {
  ip: string;
  mac: string;
  hostVeth: string;
  egress: EgressPolicy;
}

export interface FirewallState {
  /** Table name (both families), e.g. berth_1a2b3c. */
  table: string;
  /** Prefix every bridge of this instance starts with; matched as "<prefix>*". */
  bridgePrefix: string;
  /** Project subnets in use (masquerade sources). */
  subnets: string[];
  /** Gateway addresses (the bridges' own IPs): DNS is served there. */
  gateways: string[];
  /** The bridges in use (one per project network). */
  bridges: string[];
  attachments: FirewallAttachment[];
}

/** Refused connections fail at once (ICMP admin-prohibited / TCP reset), instead of hanging until a timeout. */
const REJECT = 'reject with icmpx type admin-prohibited';
const DENY_CHAIN = 'deny';
const q = (s: string) => `"${s.replace(/[^A-Za-z0-9_.*-]/g, '')}"`;
const chainOf = (ip: string) => `eg_${ip.split('.').map((o) => Number(o).toString(16).padStart(2, '0')).join('')}`;

function ruleLines(r: EgressRule): string {
  const proto = r.protocol ?? 'any';
  const ports = r.ports && r.ports.length > 0 ? `th dport { ${r.ports.join(', ')} } ` : '';
  const l4 = proto !== 'any' ? `meta l4proto ${proto} ` : ports ? 'meta l4proto { tcp, udp } ' : '';
  return `ip daddr ${r.cidr} ${l4}${ports}accept`;
}

/** The deny chain and per-workload allowlist chains (the same in both families, but for the verdict). */
function allowChains(state: FirewallState, verdict: string): string[] {
  const out: string[] = [`  chain ${DENY_CHAIN} {`, `    ${verdict}`, '  }'];
  for (const a of state.attachments) {
    if (a.egress.policy !== 'allowlist') continue;
    out.push(`  chain ${chainOf(a.ip)} {`, ...a.egress.allow.map((r) => `    ${ruleLines(r)}`), `    ${verdict}`, '  }');
  }
  return out;
}

/** `ip saddr vmap { … }` entries for deny-all and allowlist workloads. */
function egressVmap(state: FirewallState, includeDeny: boolean): string | undefined {
  const entries = state.attachments
    .filter((a) => a.egress.policy === 'allowlist' || (includeDeny && a.egress.policy === 'deny-all'))
    .map((a) => `${a.ip} : ${a.egress.policy === 'allowlist' ? `jump ${chainOf(a.ip)}` : `jump ${DENY_CHAIN}`}`);
  return entries.length ? `ip saddr vmap { ${entries.join(', ')} }` : undefined;
}

/** The whole script: (re)creates both tables in one transaction. Pure. */
export function renderFirewall(s: FirewallState): string {
  const br = q(`${s.bridgePrefix}*`);
  const lines: string[] = [];
  // "add" then "delete" then define: replaces the tables atomically whether or not they exist.
  for (const fam of ['inet', 'bridge']) lines.push(`add table ${fam} ${s.table}`, `delete table ${fam} ${s.table}`);
  lines.push(`table inet ${s.table} {`);
  lines.push(...allowChains(s, REJECT));
  const gw = s.gateways.length ? `{ ${s.gateways.join(', ')} }` : undefined;
  const vmapIn = egressVmap(s, false);
  lines.push(
    '  chain input {',
    '    type filter hook input priority filter - 10; policy accept;',
    `    iifname ${br} ct state established,related accept`,
    ...(gw ? [`    iifname ${br} ip daddr ${gw} meta l4proto { tcp, udp } th dport 53 accept`] : []),
    ...(vmapIn ? [`    iifname ${br} ${vmapIn}`] : []),
    `    iifname ${br} ${REJECT}`,
    '  }',
  );
  const vmapFwd = egressVmap(s, true);
  lines.push(
    '  chain forward {',
    '    type filter hook forward priority filter - 10; policy accept;',
    `    oifname ${br} ct state established,related accept`,
    `    iifname ${br} ct state established,related accept`,
    // With br_netfilter loaded (bridge-nf-call-iptables=1), frames bridged inside one project
    // pass here too (in and out on the same bridge): the bridge table below judges those.
    ...s.bridges.map((b) => `    iifname ${q(b)} oifname ${q(b)} accept`),
    `    iifname ${br} oifname ${br} ${REJECT}`,
    `    oifname ${br} ct status dnat accept`,
    `    oifname ${br} drop`,
    ...(vmapFwd ? [`    iifname ${br} ${vmapFwd}`] : []),
    '  }',
  );
  if (s.subnets.length) {
    const nets = `{ ${s.subnets.join(', ')} }`;
    lines.push(
      '  chain postrouting {',
      '    type nat hook postrouting priority srcnat; policy accept;',
      `    ip saddr ${nets} ip daddr != ${nets} oifname != ${br} masquerade`,
      '  }',
    );
  }
  lines.push('}');

  lines.push(`table bridge ${s.table} {`);
  // (The bridge family has no reject here: frames are dropped.)
  lines.push(...allowChains(s, 'drop'));
  lines.push('  chain prerouting {', '    type filter hook prerouting priority filter - 10; policy accept;');
  for (const a of s.attachments) {
    const port = q(a.hostVeth);
    lines.push(
      `    iifname ${port} ether saddr != ${a.mac} drop`,
      `    iifname ${port} meta protocol ip ip saddr != ${a.ip} drop`,
      `    iifname ${port} meta protocol ip6 drop`,
    );
  }
  lines.push('  }');
  // Inside a project, frames are bridged, not routed: the egress policy applies here too.
  lines.push('  chain forward {', '    type filter hook forward priority filter - 10; policy accept;', '    meta protocol arp accept');
  for (const a of s.attachments) {
    if (a.egress.policy === 'deny-all') lines.push(`    iifname ${q(a.hostVeth)} jump ${DENY_CHAIN}`);
    else if (a.egress.policy === 'allowlist') lines.push(`    iifname ${q(a.hostVeth)} jump ${chainOf(a.ip)}`);
  }
  lines.push('  }', '}');
  return lines.join('\n') + '\n';
}

export async function applyFirewall(s: FirewallState): Promise<void> {
  const r = await run('nft', ['-f', '-'], { input: renderFirewall(s), timeoutMs: 30_000 });
  if (r.code !== 0) throw new Error(`nft: ${(r.stderr || r.stdout).trim().slice(0, 800)}`);
}

/** Removes both tables (the last network of this instance is gone, or a test cleans up). */
export async function removeFirewall(table: string): Promise<void> {
  await run('nft', ['-f', '-'], { input: ['inet', 'bridge'].map((f) => `add table ${f} ${table}\ndelete table ${f} ${table}\n`).join(''), timeoutMs: 30_000 });
}
