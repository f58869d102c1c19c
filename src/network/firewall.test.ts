import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { renderFirewall, type FirewallState } from './firewall.js';

const state: FirewallState = {
  table: 'berth_fwtest',
  bridgePrefix: 'bfwt',
  bridges: ['bfwt0000', 'bfwt0001'],
  subnets: ['10.89.0.0/24', '10.89.1.0/24'],
  gateways: ['10.89.0.1', '10.89.1.1'],
  attachments: [
    { ip: '10.89.0.2', mac: '02:00:00:00:00:02', hostVeth: 'veth00000002', egress: { policy: 'allow-all' } },
    { ip: '10.89.0.3', mac: '02:00:00:00:00:03', hostVeth: 'veth00000003', egress: { policy: 'deny-all' } },
    { ip: '10.89.1.4', mac: '02:00:00:00:00:04', hostVeth: 'veth00000004', egress: { policy: 'allowlist', allow: [{ cidr: '198.18.0.0/24', ports: [80, 443], protocol: 'tcp' }, { cidr: '198.18.1.1' }, { cidr: '198.18.2.0/24', ports: [53] }] } },
  ],
};

/** nft's own parser and kernel checks, without committing anything (`nft -c`). */
function nftCheck(script: string): string {
  const r = spawnSync('nft', ['-c', '-f', '-'], { input: script, encoding: 'utf8' });
  return r.status === 0 ? '' : r.stderr;
}

test('the rendered rule set is accepted by nft', () => {
  assert.equal(nftCheck(renderFirewall(state)), '');
  assert.equal(nftCheck(renderFirewall({ ...state, subnets: [], gateways: [], bridges: [], attachments: [] })), '', 'empty state');
});

test('what the rules say', () => {
  const s = renderFirewall(state);
  // Replaced atomically: created-if-missing, deleted, defined again, in one script.
  assert.match(s, /^add table inet berth_fwtest\ndelete table inet berth_fwtest\n/);
  // Host protection: only DNS to the gateways; the rest from the bridges is rejected.
  assert.match(s, /iifname "bfwt\*" ip daddr \{ 10\.89\.0\.1, 10\.89\.1\.1 \} meta l4proto \{ tcp, udp \} th dport 53 accept/);
  assert.match(s, /chain input \{[\s\S]*?iifname "bfwt\*" reject with icmpx type admin-prohibited\n  \}/);
  // Projects: same bridge passes (br_netfilter), bridge to bridge does not.
  assert.match(s, /iifname "bfwt0000" oifname "bfwt0000" accept[\s\S]*iifname "bfwt\*" oifname "bfwt\*" reject/);
  // Egress: deny-all and allowlist by source address; allow-all is not listed.
  assert.match(s, /ip saddr vmap \{ 10\.89\.0\.3 : jump deny, 10\.89\.1\.4 : jump eg_0a590104 \}/);
  assert.doesNotMatch(s, /10\.89\.0\.2 : /);
  assert.match(s, /chain eg_0a590104 \{\n    ip daddr 198\.18\.0\.0\/24 meta l4proto tcp th dport \{ 80, 443 \} accept\n    ip daddr 198\.18\.1\.1 accept\n    ip daddr 198\.18\.2\.0\/24 meta l4proto \{ tcp, udp \} th dport \{ 53 \} accept\n    reject/);
  // Masquerade only what leaves the bridges.
  assert.match(s, /ip saddr \{ 10\.89\.0\.0\/24, 10\.89\.1\.0\/24 \} ip daddr != \{ 10\.89\.0\.0\/24, 10\.89\.1\.0\/24 \} oifname != "bfwt\*" masquerade/);
  // Anti-spoofing per port, and the in-project egress policy on the bridge.
  assert.match(s, /iifname "veth00000003" ether saddr != 02:00:00:00:00:03 drop\n    iifname "veth00000003" meta protocol ip ip saddr != 10\.89\.0\.3 drop\n    iifname "veth00000003" meta protocol ip6 drop/);
  assert.match(s, /table bridge berth_fwtest \{[\s\S]*iifname "veth00000003" jump deny\n    iifname "veth00000004" jump eg_0a590104/);
});

test('interface names cannot inject rules', () => {
  const s = renderFirewall({ ...state, attachments: [{ ...state.attachments[0]!, hostVeth: 'veth" accept; drop "x' }] });
  assert.doesNotMatch(s, /accept; drop/);
  assert.equal(nftCheck(s), '');
});
