// Generic resource repository: every Berth resource (project, workload, job, job run, …) is a row
// with a desired `spec` and an observed `status`, kept apart. `generation` counts spec changes,
// `observedGeneration` is the generation a reconciler last acted on, and `resourceVersion`
// counts every write (optimistic concurrency: a write carrying a stale version gets `conflict`).
import { randomBytes } from 'node:crypto';
import { EventEmitter } from 'node:events';
import type { DB } from './db.js';
import type Database from 'better-sqlite3';

type Statement = Database.Statement;
import { alreadyExists, conflict, invalidArgument, notFound } from '../core/errors.js';

/** How a not-found error names a kind, and where the API lists it (under /v1/projects/{project}/). */
const KIND_NAMES: Record<string, [string, string]> = {
  sandbox: ['sandbox', 'sandboxes'],
  sandboxpool: ['warm pool', 'sandbox-pools'],
  sandboxtemplate: ['sandbox template', 'sandbox-templates'],
  jobrun: ['job run', 'jobs/{job}/runs'],
};

export interface Resource<S = unknown, T = unknown> {
  id: string;
  kind: string;
  project: string;
  name: string;
  labels: Record<string, string>;
  spec: S;
  status: T;
  ownerId: string | null;
  generation: number;
  observedGeneration: number;
  resourceVersion: number;
  createdAt: string;
  updatedAt: string;
  deletionRequestedAt: string | null;
}

export interface ResourceEvent {
  seq: number;
  type: 'Normal' | 'Warning';
  reason: string;
  message: string;
  at: string;
}

interface Row {
  id: string;
  kind: string;
  project: string;
  name: string;
  labels: string;
  spec: string;
  status: string;
  owner_id: string | null;
  generation: number;
  observed_generation: number;
  resource_version: number;
  created_at: string;
  updated_at: string;
  deletion_requested_at: string | null;
}

export interface ListOptions {
  project?: string;
  ownerId?: string;
  labelSelector?: string;
  limit?: number;
  pageToken?: string;
}

export interface ChangeNotice {
  kind: string;
  id: string;
  project: string;
  ownerId: string | null;
  op: 'create' | 'update' | 'delete';
}

export function newId(prefix: string): string {
  return `${prefix}-${randomBytes(6).toString('hex')}`;
}

const now = () => new Date().toISOString();

function fromRow<S, T>(r: Row): Resource<S, T> {
  return {
    id: r.id,
    kind: r.kind,
    project: r.project,
    name: r.name,
    labels: JSON.parse(r.labels),
    spec: JSON.parse(r.spec),
    status: JSON.parse(r.status),
    ownerId: r.owner_id,
    generation: r.generation,
    observedGeneration: r.observed_generation,
    resourceVersion: r.resource_version,
    createdAt: r.created_at,
    updatedAt: r.updated_at,
    deletionRequestedAt: r.deletion_requested_at,
  };
}

type Requirement = { key: string; op: '=' | '!=' | 'exists' | '!exists'; value?: string };

/** Parses a Kubernetes-style equality selector: `a=b,c!=d,e,!f`. */
export function parseLabelSelector(sel: string): Requirement[] {
  const out: Requirement[] = [];
  for (const raw of sel.split(',')) {
    const part = raw.trim();
    if (!part) continue;
    let m: RegExpMatchArray | null;
    if ((m = part.match(/^([A-Za-z0-9._/-]+)\s*(!=|==|=)\s*([A-Za-z0-9._-]*)$/))) {
      out.push({ key: m[1]!, op: m[2] === '!=' ? '!=' : '=', value: m[3]! });
    } else if ((m = part.match(/^!([A-Za-z0-9._/-]+)$/))) {
      out.push({ key: m[1]!, op: '!exists' });
    } else if ((m = part.match(/^([A-Za-z0-9._/-]+)$/))) {
      out.push({ key: m[1]!, op: 'exists' });
    } else {
      throw invalidArgument(
        `label selector part "${part}" is not valid; use key=value, key!=value, key or !key separated by commas`,
      );
    }
  }
  return out;
}

export function matchLabels(labels: Record<string, string>, reqs: Requirement[]): boolean {
  return reqs.every((r) => {
    const v = labels[r.key];
    switch (r.op) {
      case '=':
        return v === r.value;
      case '!=':
        return v !== r.value;
      case 'exists':
        return v !== undefined;
      case '!exists':
        return v === undefined;
    }
  });
}

export class ResourceStore extends EventEmitter {
  /**
   * Prepared statements by SQL text. Preparing costs more than running these small statements
   * (about 0.1 ms each, and starting a workload runs a dozen), so each SQL text is prepared once
   * per connection. The texts are a small fixed set (write() and list() build theirs from column
   * and filter names only, never from values).
   */
  private readonly stmts = new Map<string, Statement>();

  constructor(readonly db: DB) {
    super();
    this.setMaxListeners(100);
  }

  private stmt(sql: string): Statement {
    let s = this.stmts.get(sql);
    if (!s) {
      s = this.db.prepare(sql);
      this.stmts.set(sql, s);
    }
    return s;
  }

  private emitChange(n: ChangeNotice): void {
    this.emit('change', n);
  }

  create<S, T>(
    kind: string,
    input: { project: string; name: string; labels?: Record<string, string>; spec: S; status: T; ownerId?: string; id?: string },
  ): Resource<S, T> {
    const t = now();
    const id = input.id ?? newId(kind.slice(0, 3));
    try {
      this
        .stmt(
          `INSERT INTO resources (id, kind, project, name, labels, spec, status, owner_id, created_at, updated_at)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
        )
        .run(id, kind, input.project, input.name, JSON.stringify(input.labels ?? {}), JSON.stringify(input.spec), JSON.stringify(input.status), input.ownerId ?? null, t, t);
    } catch (e) {
      if ((e as { code?: string }).code === 'SQLITE_CONSTRAINT_UNIQUE' || (e as { code?: string }).code === 'SQLITE_CONSTRAINT_PRIMARYKEY') {
        const where = kind === 'project' ? '' : ` in project "${input.project}"`;
        throw alreadyExists(`${kind} "${input.name}" already exists${where}; choose another name or delete the existing one first`);
      }
      throw e;
    }
    const r = this.getById<S, T>(id)!;
    this.emitChange({ kind, id, project: r.project, ownerId: r.ownerId, op: 'create' });
    return r;
  }

  getById<S = unknown, T = unknown>(id: string): Resource<S, T> | undefined {
    const row = this.stmt(`SELECT * FROM resources WHERE id = ?`).get(id) as Row | undefined;
    return row ? fromRow<S, T>(row) : undefined;
  }

  find<S = unknown, T = unknown>(kind: string, project: string, name: string): Resource<S, T> | undefined {
    const row = this.stmt(`SELECT * FROM resources WHERE kind = ? AND project = ? AND name = ?`).get(kind, project, name) as Row | undefined;
    return row ? fromRow<S, T>(row) : undefined;
  }

  get<S = unknown, T = unknown>(kind: string, project: string, name: string): Resource<S, T> {
    const r = this.find<S, T>(kind, project, name);
    if (!r) {
      const where = kind === 'project' ? '' : ` in project "${project}"`;
      const k = KIND_NAMES[kind];
      throw notFound(`${k?.[0] ?? kind} "${name}" not found${where}; list them with GET /v1/${kind === 'project' ? 'projects' : `projects/${project}/${k?.[1] ?? `${kind}s`}`}`);
    }
    return r;
  }

  list<S = unknown, T = unknown>(kind: string, opts: ListOptions = {}): { items: Resource<S, T>[]; nextPageToken: string | null } {
    const limit = Math.min(Math.max(opts.limit ?? 100, 1), 1000);
    const reqs = opts.labelSelector ? parseLabelSelector(opts.labelSelector) : [];
    const where: string[] = ['kind = ?'];
    const args: unknown[] = [kind];
    if (opts.project !== undefined) {
      where.push('project = ?');
      args.push(opts.project);
    }
    if (opts.ownerId !== undefined) {
      where.push('owner_id = ?');
      args.push(opts.ownerId);
    }
    if (opts.pageToken) {
      let after: string;
      try {
        after = Buffer.from(opts.pageToken, 'base64url').toString('utf8');
      } catch {
        throw invalidArgument('pageToken is not valid; pass the nextPageToken value from a previous list response');
      }
      const parts = after.split('\u0000');
      if (parts.length !== 2) throw invalidArgument('pageToken is not valid; pass the nextPageToken value from a previous list response');
      where.push('(project, name) > (?, ?)');
      args.push(parts[0], parts[1]);
    }
    const stmt = this.stmt(`SELECT * FROM resources WHERE ${where.join(' AND ')} ORDER BY project, name`);
    const items: Resource<S, T>[] = [];
    let next: string | null = null;
    for (const row of stmt.iterate(...args) as IterableIterator<Row>) {
      const r = fromRow<S, T>(row);
      if (reqs.length && !matchLabels(r.labels, reqs)) continue;
      if (items.length === limit) {
        const last = items[items.length - 1]!;
        next = Buffer.from(`${last.project}\u0000${last.name}`).toString('base64url');
        break;
      }
      items.push(r);
    }
    return { items, nextPageToken: next };
  }

  /** Replace the spec (and labels); bumps generation. `expectedVersion` enables optimistic concurrency. */
  updateSpec<S>(id: string, change: { spec: S; labels?: Record<string, string> }, expectedVersion?: number): Resource<S> {
    return this.write(id, expectedVersion, (cur) => ({
      spec: JSON.stringify(change.spec),
      labels: JSON.stringify(change.labels ?? cur.labels),
      generation: cur.generation + 1,
    }));
  }

  /** Replace the status; never touches spec or generation. */
  updateStatus<T>(id: string, status: T, observedGeneration?: number, expectedVersion?: number): Resource<unknown, T> {
    return this.write(id, expectedVersion, (cur) => ({
      status: JSON.stringify(status),
      observed_generation: observedGeneration ?? cur.observedGeneration,
    })) as Resource<unknown, T>;
  }

  markForDeletion(id: string): Resource {
    return this.write(id, undefined, (cur) => ({ deletion_requested_at: cur.deletionRequestedAt ?? now() }));
  }

  private write<S>(id: string, expectedVersion: number | undefined, f: (cur: Resource) => Record<string, string | number | null>): Resource<S> {
    const tx = this.db.transaction(() => {
      const cur = this.getById(id);
      if (!cur) throw notFound(`resource ${id} no longer exists; it was deleted`);
      if (expectedVersion !== undefined && expectedVersion !== cur.resourceVersion) {
        throw conflict(
          `${cur.kind} "${cur.name}" was modified (resourceVersion is ${cur.resourceVersion}, you sent ${expectedVersion}); fetch it again and retry your change`,
        );
      }
      const cols = f(cur);
      const sets = Object.keys(cols).map((k) => `${k} = ?`);
      this
        .stmt(`UPDATE resources SET ${sets.join(', ')}, resource_version = resource_version + 1, updated_at = ? WHERE id = ?`)
        .run(...Object.values(cols), now(), id);
      return cur;
    });
    const before = tx();
    const r = this.getById<S>(id)!;
    this.emitChange({ kind: before.kind, id, project: before.project, ownerId: before.ownerId, op: 'update' });
    return r;
  }

  remove(id: string): void {
    const cur = this.getById(id);
    if (!cur) return;
    this.db.transaction(() => {
      this.stmt(`DELETE FROM resources WHERE id = ?`).run(id);
      this.stmt(`DELETE FROM events WHERE resource_id = ?`).run(id);
    })();
    this.emitChange({ kind: cur.kind, id, project: cur.project, ownerId: cur.ownerId, op: 'delete' });
  }

  addEvent(resourceId: string, reason: string, message: string, type: 'Normal' | 'Warning' = 'Normal'): void {
    this.stmt(`INSERT INTO events (resource_id, type, reason, message, at) VALUES (?, ?, ?, ?, ?)`).run(resourceId, type, reason, message, now());
  }

  events(resourceId: string, limit = 200): ResourceEvent[] {
    const rows = this
      .stmt(`SELECT seq, type, reason, message, at FROM events WHERE resource_id = ? ORDER BY seq DESC LIMIT ?`)
      .all(resourceId, limit) as ResourceEvent[];
    return rows.reverse();
  }

  count(kind: string, project?: string): number {
    const row = project === undefined
      ? (this.stmt(`SELECT count(*) n FROM resources WHERE kind = ?`).get(kind) as { n: number })
      : (this.stmt(`SELECT count(*) n FROM resources WHERE kind = ? AND project = ?`).get(kind, project) as { n: number });
    return row.n;
  }
}
