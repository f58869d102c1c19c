// Registry credentials stored per registry host[:port] (`berth login`), in a 0600 JSON file in
// berthd's data dir, written atomically. They are handed to the registry client for pulls and
// pushes of that registry only; the API lists the registries and user names, never a password,
// and nothing here logs.
import { chmodSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import type { RegistryCredentials } from './registry.js';

export class CredentialStore {
  private cache: Record<string, RegistryCredentials> | undefined;

  constructor(private readonly file: string) {}

  private load(): Record<string, RegistryCredentials> {
    if (this.cache) return this.cache;
    try {
      const raw = JSON.parse(readFileSync(this.file, 'utf8')) as unknown;
      this.cache = raw && typeof raw === 'object' ? (raw as Record<string, RegistryCredentials>) : {};
    } catch {
      this.cache = {};
    }
    return this.cache;
  }

  private save(all: Record<string, RegistryCredentials>): void {
    const tmp = `${this.file}.tmp-${process.pid}`;
    writeFileSync(tmp, JSON.stringify(all), { mode: 0o600 });
    chmodSync(tmp, 0o600);
    renameSync(tmp, this.file);
    this.cache = all;
  }

  get(registry: string): RegistryCredentials | undefined {
    const c = this.load()[registry];
    return c && typeof c.username === 'string' && typeof c.password === 'string' ? { username: c.username, password: c.password } : undefined;
  }

  set(registry: string, creds: RegistryCredentials): void {
    this.save({ ...this.load(), [registry]: { username: creds.username, password: creds.password } });
  }

  delete(registry: string): boolean {
    const all = { ...this.load() };
    if (!(registry in all)) return false;
    delete all[registry];
    this.save(all);
    return true;
  }

  /** Registries with stored credentials and their user names (never passwords). */
  list(): { registry: string; username: string }[] {
    return Object.entries(this.load())
      .map(([registry, c]) => ({ registry, username: c.username }))
      .sort((a, b) => a.registry.localeCompare(b.registry));
  }
}
