import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { migrate, openDatabase } from './db.js';
import { ResourceStore, matchLabels, parseLabelSelector } from './resources.js';
import { BerthError } from '../core/errors.js';

function withStore(f: (s: ResourceStore, path: string) => void) {
  const dir = mkdtempSync('/tmp/berth-store-');
  const path = join(dir, 'state.db');
  const db = openDatabase(path);
  try {
    f(new ResourceStore(db), path);
  } finally {
    db.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

test('a real SQLite file in WAL mode with migrations applied once', () => {
  withStore((s, path) => {
    assert.equal(s.db.pragma('journal_mode', { simple: true }), 'wal');
    assert.equal(s.db.pragma('user_version', { simple: true }), 1);
    assert.equal(migrate(s.db), 1, 'idempotent');
    s.create('workload', { project: 'p', name: 'a', spec: { x: 1 }, status: {} });
    const db2 = openDatabase(path);
    assert.equal(new ResourceStore(db2).get<{ x: number }>('workload', 'p', 'a').spec.x, 1, 'visible to a second connection');
    db2.close();
  });
});

test('a database from a newer berthd is refused with a clear message', () => {
  withStore((s) => {
    s.db.pragma('user_version = 99');
    assert.throws(() => migrate(s.db), /newer than this berthd supports/);
  });
});

test('spec and status are written apart; generation counts spec changes only', () => {
  withStore((s) => {
    const r = s.create('workload', { project: 'p', name: 'a', spec: { image: 'busybox' }, status: { phase: 'pending' } });
    assert.equal(r.generation, 1);
    assert.equal(r.resourceVersion, 1);
    const st = s.updateStatus(r.id, { phase: 'running' }, 1);
    assert.equal(st.generation, 1);
    assert.equal(st.observedGeneration, 1);
    assert.equal(st.resourceVersion, 2);
    const sp = s.updateSpec(r.id, { spec: { image: 'busybox', env: { A: '1' } } });
    assert.equal(sp.generation, 2);
    assert.equal(sp.observedGeneration, 1);
    assert.deepEqual(sp.status, { phase: 'running' }, 'status untouched by a spec write');
  });
});

test('optimistic concurrency: a stale resourceVersion is a conflict and writes nothing', () => {
  withStore((s) => {
    const r = s.create('workload', { project: 'p', name: 'a', spec: { v: 1 }, status: {} });
    s.updateSpec(r.id, { spec: { v: 2 } }, r.resourceVersion);
    assert.throws(
      () => s.updateSpec(r.id, { spec: { v: 3 } }, r.resourceVersion),
      (e: unknown) => e instanceof BerthError && e.code === 'conflict' && /fetch it again/.test(e.message),
    );
    assert.equal(s.getById<{ v: number }>(r.id)!.spec.v, 2);
  });
});

test('names are unique per kind and project; events are kept in order', () => {
  withStore((s) => {
    const r = s.create('workload', { project: 'p', name: 'a', spec: {}, status: {} });
    s.create('workload', { project: 'q', name: 'a', spec: {}, status: {} });
    s.create('job', { project: 'p', name: 'a', spec: {}, status: {} });
    assert.throws(() => s.create('workload', { project: 'p', name: 'a', spec: {}, status: {} }), (e: unknown) => e instanceof BerthError && e.code === 'already_exists');
    s.addEvent(r.id, 'Started', 'started (pid 1)');
    s.addEvent(r.id, 'OOMKilled', 'memory limit reached', 'Warning');
    assert.deepEqual(s.events(r.id).map((e) => e.reason), ['Started', 'OOMKilled']);
    s.remove(r.id);
    assert.deepEqual(s.events(r.id), [], 'events go with their resource');
  });
});

test('label selectors', () => {
  const sel = parseLabelSelector('app=web,tier!=db,canary,!legacy');
  assert.equal(matchLabels({ app: 'web', tier: 'fe', canary: 'true' }, sel), true);
  assert.equal(matchLabels({ app: 'web', tier: 'db', canary: 'true' }, sel), false);
  assert.equal(matchLabels({ app: 'web', canary: 'true', legacy: 'x' }, sel), false);
  assert.throws(() => parseLabelSelector('a in (b)'), /not valid/);
});

test('change notices carry the owner so owners can be woken', () => {
  withStore((s) => {
    const seen: Array<{ kind: string; op: string; ownerId: string | null }> = [];
    s.on('change', (n) => seen.push({ kind: n.kind, op: n.op, ownerId: n.ownerId }));
    const r = s.create('workload', { project: 'p', name: 'a', spec: {}, status: {}, ownerId: 'run-1' });
    s.updateStatus(r.id, { phase: 'running' });
    s.remove(r.id);
    assert.deepEqual(seen, [
      { kind: 'workload', op: 'create', ownerId: 'run-1' },
      { kind: 'workload', op: 'update', ownerId: 'run-1' },
      { kind: 'workload', op: 'delete', ownerId: 'run-1' },
    ]);
  });
});
