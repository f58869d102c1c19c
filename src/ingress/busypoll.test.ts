// The busy-polling governor (pure), its flag and its line in the HAProxy config. The governor driving a
// real HAProxy under load is tested end to end in test/ingress.test.ts.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BusyPollGovernor, DEFAULT_BUSY_POLL_POLICY } from './busypoll.js';
import { buildHaproxyConfig } from './haproxy-config.js';
import { settingsFromFlags } from './types.js';

const policy = { sampleMs: 1000, onRps: 100, onSamples: 2, offRps: 10, offSamples: 3 };

/** Feeds per-second rates (one sample a second) and returns the decision after each. */
function run(g: BusyPollGovernor, rates: number[], start = { count: 0, at: 0 }): boolean[] {
  let { count, at } = start;
  g.sample(count, at);
  return rates.map((r) => {
    count += r;
    at += 1000;
    g.sample(count, at);
    return g.busy;
  });
}

test('busy-polling turns on after onSamples in a row at ≥ onRps, and off after offSamples in a row below offRps', () => {
  const g = new BusyPollGovernor(policy);
  // One busy second is not enough; a dip resets the streak; two in a row turn it on.
  assert.deepEqual(run(g, [150, 50, 150, 150]), [false, false, false, true]);
  // On: a middling rate (between offRps and onRps) keeps it on; quiet seconds must come three in a row.
  assert.deepEqual(run(new BusyPollGovernor(policy), [100, 100, 50, 5, 5, 50, 5, 5, 5]), [false, true, true, true, true, true, true, true, false]);
});

test('a counter that went down (a reloaded or restarted worker) or could not be read says nothing about the rate', () => {
  const g = new BusyPollGovernor(policy);
  assert.equal(g.sample(1_000_000, 0), false);
  assert.equal(g.sample(5, 1000), false); // new worker: a new baseline, not a negative or huge rate
  assert.equal(g.sample(205, 2000), false);
  assert.equal(g.sample(undefined, 3000), false); // unreadable: no rate, and the next reading is a new baseline
  assert.equal(g.sample(10_000, 4000), false);
  assert.equal(g.busy, false);
  assert.equal(g.sample(10_200, 5000), true); // second busy sample in a row (205 at 2000 s was the first)
  assert.equal(g.busy, true);
});

test('the defaults: on after 3 s at ≥ 2,000 req/s, off after 30 s below 500', () => {
  const g = new BusyPollGovernor();
  assert.deepEqual(DEFAULT_BUSY_POLL_POLICY, { sampleMs: 1000, onRps: 2000, onSamples: 3, offRps: 500, offSamples: 30 });
  assert.deepEqual(run(g, [2500, 2500, 2500]), [false, false, true]);
  const off = run(g, Array(30).fill(100), { count: 7500, at: 3000 });
  assert.equal(off.indexOf(false), 29);
});

test('--ingress-busy-poll: auto by default, on/off, anything else refused; the config line follows the decision', () => {
  const flags = { ingressHttp: '127.0.0.1:8080', ingressHttps: 'off', baseDomain: 'berth.localhost' };
  assert.equal(settingsFromFlags(flags).busyPolling, 'auto');
  assert.equal(settingsFromFlags({ ...flags, ingressBusyPoll: 'on' }).busyPolling, 'on');
  assert.equal(settingsFromFlags({ ...flags, ingressBusyPoll: 'off' }).busyPolling, 'off');
  assert.throws(() => settingsFromFlags({ ...flags, ingressBusyPoll: 'yes' }), /--ingress-busy-poll "yes" must be auto, on or off/);
  const paths = { workerSocket: '/d/worker.sock', hostsMap: '/d/hosts.map', tlsHostsMap: '/d/hosts-tls.map', crtList: '/d/crt-list', defaultCert: '/d/certs/default.pem', acmeSocket: '/d/acme.sock' };
  const global = (busyPolling: boolean) => buildHaproxyConfig([], settingsFromFlags(flags), paths, { threads: 1, busyPolling }, new Map()).config.split('\n\n')[0]!;
  assert.match(global(true), /^ {2}busy-polling$/m);
  assert.doesNotMatch(global(false), /busy-polling/);
});
