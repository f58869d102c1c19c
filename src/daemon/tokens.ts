// API tokens. Only a SHA-256 hash of each token is stored; the secret is shown once, at creation.
// The first start writes an admin token to a file readable only by root.
import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync, chmodSync } from 'node:fs';
import type { DB } from '../store/db.js';
import type Database from 'better-sqlite3';

type Statement = Database.Statement;
import { alreadyExists, notFound } from '../core/errors.js';
import type { AuthInfo } from '../api/context.js';

const hash = (t: string) => createHash('sha256').update(t).digest('hex');

export interface TokenRecord {
  id: string;
  name: string;
  project: string | null;
  createdAt: string;
}

export class TokenStore {
  constructor(private readonly db: DB) {}

  create(name: string, project: string | null): { token: string; record: TokenRecord } {
    const token = `berth_${randomBytes(24).toString('base64url')}`;
    const id = `tok-${randomBytes(6).toString('hex')}`;
    const createdAt = new Date().toISOString();
    try {
      this.db.prepare(`INSERT INTO tokens (id, name, hash, project, created_at) VALUES (?, ?, ?, ?, ?)`).run(id, name, hash(token), project, createdAt);
    } catch (e) {
      if (String((e as { code?: string }).code).startsWith('SQLITE_CONSTRAINT')) throw alreadyExists(`token "${name}" already exists; choose another name or delete it first`);
      throw e;
    }
    return { token, record: { id, name, project, createdAt } };
  }

  /** Prepared once: every API request verifies a token (see ResourceStore.stmt for why). */
  private verifyStmt: Statement | undefined;

  verify(token: string): AuthInfo | undefined {
    const h = hash(token);
    this.verifyStmt ??= this.db.prepare(`SELECT id, name, hash, project FROM tokens WHERE hash = ?`);
    const row = this.verifyStmt.get(h) as
      | { id: string; name: string; hash: string; project: string | null }
      | undefined;
    if (!row || !timingSafeEqual(Buffer.from(row.hash), Buffer.from(h))) return undefined;
    return { tokenId: row.id, name: row.name, project: row.project };
  }

  list(): TokenRecord[] {
    return (this.db.prepare(`SELECT id, name, project, created_at FROM tokens ORDER BY name`).all() as Array<{ id: string; name: string; project: string | null; created_at: string }>).map(
      (r) => ({ id: r.id, name: r.name, project: r.project, createdAt: r.created_at }),
    );
  }

  remove(name: string): void {
    const r = this.db.prepare(`DELETE FROM tokens WHERE name = ?`).run(name);
    if (r.changes === 0) throw notFound(`token "${name}" not found; list tokens with GET /v1/tokens`);
  }

  /** Ensure the admin token file exists and is valid; returns the token. */
  ensureAdminToken(path: string): string {
    if (existsSync(path)) {
      const t = readFileSync(path, 'utf8').trim();
      if (this.verify(t)) {
        chmodSync(path, 0o600);
        return t;
      }
    }
    this.db.prepare(`DELETE FROM tokens WHERE name = 'admin'`).run();
    const { token } = this.create('admin', null);
    writeFileSync(path, token + '\n', { mode: 0o600 });
    chmodSync(path, 0o600);
    return token;
  }
}
