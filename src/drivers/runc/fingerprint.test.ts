// `berth info` says which monitor supervises runc containers: Berth's own (the agent's monitor mode)
// or Debian's conmon (it said "conmon unknown" for Berth's).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { RuncDriver } from './driver.js';
import { findAgent } from '../agent/binary.js';

const skip = process.getuid?.() !== 0 ? 'needs root' : !existsSync('/usr/sbin/runc') ? 'needs runc' : undefined;

for (const monitor of ['berth', 'conmon'] as const) {
  const why = skip ?? (monitor === 'berth' && !findAgent() ? 'needs the agent binary' : monitor === 'conmon' && !existsSync('/usr/bin/conmon') ? 'needs conmon' : undefined);
  test(`runc's fingerprint names its monitor (${monitor})`, { skip: why }, async () => {
    const stateDir = mkdtempSync('/tmp/berth-runc-fp-');
    const d = new RuncDriver({ stateDir, cgroupParent: 'berth-runc-fp-test', monitor });
    try {
      const fp = await d.fingerprint();
      const want = monitor === 'berth' ? /^berth-agent monitor \d+\.\d+\.\d+$/ : /^conmon \d+\.\d+\.\d+/;
      assert.match(fp.attributes.monitor ?? '', want);
      assert.ok(fp.reason?.endsWith(`supervised by ${fp.attributes.monitor}`), fp.reason);
    } finally {
      d.close();
      rmSync(stateDir, { recursive: true, force: true });
    }
  });
}
