// The microVM command line (pure): where guest RAM lives and what a restored VM is started with;
// the guest's network config.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { NetworkAttachment } from '../../network/manager.js';
import { buildQemuArgs, guestNet, VM_NET, type VmMachine } from './driver.js';

const machine: VmMachine = { accel: 'tcg', kernel: '/k', initramfs: '/i', rootImage: '/r', vcpus: 1, memoryMiB: 256, epochMs: 1, net: true };
const val = (args: string[], flag: string) => args.filter((_, i) => args[i - 1] === flag);

test('plain RAM by default; a memfd (shared) or a private file mapping under the default RAM id', () => {
  const plain = buildQemuArgs({ dir: '/t', ...machine });
  assert.deepEqual(val(plain, '-object'), []);
  assert.doesNotMatch(val(plain, '-M')[0]!, /memory-backend/);
  const memfd = buildQemuArgs({ dir: '/t', ...machine, ram: { memfd: true } });
  assert.match(val(memfd, '-M')[0]!, /,memory-backend=microvm\.ram$/);
  assert.deepEqual(val(memfd, '-object'), ['memory-backend-memfd,id=microvm.ram,size=256M,share=on']);
  const file = buildQemuArgs({ dir: '/t', ...machine, ram: { file: '/tpl/ram' } });
  assert.deepEqual(val(file, '-object'), ['memory-backend-file,id=microvm.ram,size=256M,mem-path=/tpl/ram,share=off']);
  assert.deepEqual(val(file, '-m'), ['256M'], 'the machine size stays');
});

test('a booted VM gets kernel, initramfs and command line; a restored one gets -incoming instead', () => {
  const booted = buildQemuArgs({ dir: '/t', ...machine });
  assert.deepEqual([val(booted, '-kernel'), val(booted, '-initrd'), val(booted, '-incoming')], [['/k'], ['/i'], []]);
  const restored = buildQemuArgs({ dir: '/t', ...machine, incoming: 'defer' });
  assert.deepEqual([val(restored, '-kernel'), val(restored, '-initrd'), val(restored, '-append'), val(restored, '-incoming')], [[], [], [], ['defer']]);
  // No post-migration announcement (test/sandboxes.test.ts checks that a fork sends no packet).
  assert.deepEqual([val(booted, '-global'), val(restored, '-global')], [[], ['migration.announce-rounds=0']]);
  // Booted or restored, the NIC has the one guest MAC that every microVM has (VM_NET), on tap0.
  for (const args of [booted, restored]) {
    assert.deepEqual(val(args, '-device').filter((d) => d.startsWith('virtio-net')), [`virtio-net-device,netdev=net0,mac=${VM_NET.guestMac}`]);
    assert.match(val(args, '-netdev')[0]!, /^tap,id=net0,ifname=tap0,/);
  }
  assert.deepEqual(val(buildQemuArgs({ dir: '/t', ...machine, net: false }), '-netdev'), [], 'no network: no NIC');
});

test('under TCG the guest trusts its TSC (the host counter), so a busy host cannot turn its clock into 4 ms jiffies; under KVM no such flag', () => {
  const tcg = val(buildQemuArgs({ dir: '/t', ...machine, tscKhz: 2_100_000 }), '-append')[0]!.split(' ');
  assert.ok(tcg.includes('tsc=reliable') && tcg.includes('tsc_early_khz=2100000'), tcg.join(' '));
  assert.ok(val(buildQemuArgs({ dir: '/t', ...machine }), '-append')[0]!.split(' ').includes('tsc=reliable'), 'without a known TSC rate too');
  const kvm = val(buildQemuArgs({ dir: '/t', ...machine, accel: 'kvm', tscKhz: 2_100_000 }), '-append')[0]!;
  assert.doesNotMatch(kvm, /tsc/, 'KVM guests use kvm-clock');
});

test('every guest gets the fixed address, gateway and MAC; its own name maps to that address, other names stay', () => {
  const dir = mkdtempSync(join(tmpdir(), 'berth-guestnet-'));
  try {
    writeFileSync(join(dir, 'resolv.conf'), 'nameserver 10.89.0.1\n');
    writeFileSync(join(dir, 'hosts'), '127.0.0.1\tlocalhost\n10.89.0.7\tsb1\n10.89.0.70\tother\n');
    const att = { ip: '10.89.0.7', prefix: 24, gateway: '10.89.0.1', mac: '0a:0b:0c:0d:0e:0f', resolvConf: join(dir, 'resolv.conf'), hosts: join(dir, 'hosts') } as NetworkAttachment;
    assert.deepEqual(guestNet(att), {
      ip: VM_NET.guestIp,
      prefix: VM_NET.prefix,
      gateway: VM_NET.gatewayIp,
      mac: VM_NET.guestMac,
      resolvConf: 'nameserver 10.89.0.1\n',
      hosts: `127.0.0.1\tlocalhost\n${VM_NET.guestIp}\tsb1\n10.89.0.70\tother\n`,
    });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
