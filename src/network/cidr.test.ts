import { test } from 'node:test';
import assert from 'node:assert/strict';
import { cidrContains, cidrsOverlap, formatCidr, formatIp, nthSubnet, parseCidr, parseIp, subnetCount } from './cidr.js';

test('parse and format IPv4 addresses', () => {
  assert.equal(parseIp('10.88.1.2'), 0x0a580102);
  assert.equal(formatIp(0xc0a80001), '192.168.0.1');
  for (const bad of ['256.1.1.1', '1.2.3', '1.2.3.4.5', 'a.b.c.d', '']) assert.equal(parseIp(bad), undefined, bad);
});

test('CIDRs: host bits, containment, overlap', () => {
  assert.deepEqual(parseCidr('10.88.0.0/16'), { base: 0x0a580000, prefix: 16 });
  assert.equal(parseCidr('10.88.0.1/16'), undefined, 'host bits set');
  assert.equal(formatCidr(parseCidr('10.88.0.1/16', true)!), '10.88.0.0/16');
  assert.equal(parseCidr('10.0.0.0/33'), undefined);
  assert.equal(formatCidr(parseCidr('1.2.3.4')!), '1.2.3.4/32');
  const c = parseCidr('10.88.4.0/24')!;
  assert.ok(cidrContains(c, parseIp('10.88.4.200')!));
  assert.ok(!cidrContains(c, parseIp('10.88.5.1')!));
  assert.ok(cidrsOverlap(parseCidr('10.0.0.0/8')!, c));
  assert.ok(!cidrsOverlap(parseCidr('10.89.0.0/16')!, c));
  assert.ok(cidrContains(parseCidr('0.0.0.0/0')!, parseIp('8.8.8.8')!));
});

test('split a pool into per-project subnets', () => {
  const pool = parseCidr('10.88.0.0/16')!;
  assert.equal(subnetCount(pool, 24), 256);
  assert.equal(formatCidr(nthSubnet(pool, 24, 0)!), '10.88.0.0/24');
  assert.equal(formatCidr(nthSubnet(pool, 24, 255)!), '10.88.255.0/24');
  assert.equal(nthSubnet(pool, 24, 256), undefined);
  assert.equal(nthSubnet(pool, 8, 0), undefined, 'subnet larger than the pool');
});
