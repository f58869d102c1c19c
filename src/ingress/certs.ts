// Certificates the ingress serves: Berth's local CA (made once per data dir) signs one leaf per
// `tls: local` host; ACME certificates (acme.ts) sit beside them. Each host's file is one PEM
// (chain + key, mode 0600) named in HAProxy's crt-list. Keys and certificates are made with the
// openssl CLI (Node's crypto makes keys but cannot sign X.509 certificates).
import { randomBytes, X509Certificate } from 'node:crypto';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { runOk } from '../lib/exec.js';

export const CA_NAME = 'Berth Local CA';
/** Leaves are valid this long and made again when less than RENEW_DAYS remain. */
const LEAF_DAYS = 365;
export const RENEW_DAYS = 30;

export type CertIssuer = 'local' | 'acme';

export class CertStore {
  readonly caCert: string;
  readonly caKey: string;
  readonly defaultCert: string;
  private readonly root: string;

  constructor(readonly dir: string) {
    this.caCert = join(dir, 'pki', 'ca.crt');
    this.caKey = join(dir, 'pki', 'ca.key');
    this.root = join(dir, 'certs');
    this.defaultCert = join(this.root, 'default.pem');
  }

  file(issuer: CertIssuer, host: string): string {
    return join(this.root, issuer, `${host}.pem`);
  }

  /** The CA (once per data dir) and the certificate for unknown SNI names. */
  async ensureCa(): Promise<void> {
    // Temporary directories of a berthd that crashed while making a certificate.
    const pki = join(this.dir, 'pki');
    if (existsSync(pki)) for (const f of readdirSync(pki)) if (f.startsWith('.')) rmSync(join(pki, f), { recursive: true, force: true });
    if (!existsSync(this.caCert) || !existsSync(this.caKey)) {
      const dir = join(this.dir, 'pki');
      mkdirSync(dir, { recursive: true, mode: 0o700 });
      const tmp = mkdtempSync(join(dir, '.new-'));
      try {
        await runOk('openssl', ['req', '-x509', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', join(tmp, 'ca.key'), '-out', join(tmp, 'ca.crt'), '-subj', `/CN=${CA_NAME}`, '-days', '3650']);
        chmodSync(join(tmp, 'ca.key'), 0o600);
        renameSync(join(tmp, 'ca.key'), this.caKey);
        renameSync(join(tmp, 'ca.crt'), this.caCert);
      } finally {
        rmSync(tmp, { recursive: true, force: true });
      }
    }
    if (!this.valid(this.defaultCert)) await this.writeLeaf(this.defaultCert, 'berth-ingress.invalid');
  }

  caPem(): string {
    return readFileSync(this.caCert, 'utf8');
  }

  /** A leaf from the local CA for `host` unless a valid one exists. */
  async ensureLocal(host: string): Promise<string> {
    const file = this.file('local', host);
    if (!this.valid(file)) await this.writeLeaf(file, host);
    return file;
  }

  /** The file holds a certificate that is not near its end (and, for local leaves, from this CA). */
  valid(file: string, renewDays = RENEW_DAYS): boolean {
    try {
      const cert = new X509Certificate(readFileSync(file));
      if (Date.parse(cert.validTo) - Date.now() < renewDays * 86_400_000) return false;
      if (file.startsWith(join(this.root, 'acme'))) return true;
      return cert.checkIssued(new X509Certificate(readFileSync(this.caCert)));
    } catch {
      return false;
    }
  }

  /** Write chain + key for a host atomically, mode 0600. */
  writePem(file: string, pem: string): void {
    mkdirSync(join(file, '..'), { recursive: true, mode: 0o700 });
    const tmp = `${file}.tmp`;
    writeFileSync(tmp, pem, { mode: 0o600 });
    renameSync(tmp, file);
  }

  private async writeLeaf(file: string, host: string): Promise<void> {
    mkdirSync(join(this.dir, 'pki'), { recursive: true, mode: 0o700 });
    const tmp = mkdtempSync(join(this.dir, 'pki', '.leaf-'));
    try {
      const [key, csr, crt, ext] = ['leaf.key', 'leaf.csr', 'leaf.crt', 'ext.cnf'].map((f) => join(tmp, f)) as [string, string, string, string];
      writeFileSync(ext, `subjectAltName=DNS:${host}\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n`);
      await runOk('openssl', ['req', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', key, '-subj', `/CN=${host}`, '-out', csr]);
      await runOk('openssl', ['x509', '-req', '-in', csr, '-CA', this.caCert, '-CAkey', this.caKey, '-set_serial', `0x${randomBytes(16).toString('hex')}`, '-days', String(LEAF_DAYS), '-extfile', ext, '-out', crt]);
      this.writePem(file, readFileSync(crt, 'utf8') + readFileSync(this.caCert, 'utf8') + readFileSync(key, 'utf8'));
    } finally {
      rmSync(tmp, { recursive: true, force: true });
    }
  }

  /** Existing certificate files by host, ACME ones first (a host has one issuer at a time). */
  present(issuer: CertIssuer): string[] {
    const d = join(this.root, issuer);
    return existsSync(d) ? readdirSync(d).filter((f) => f.endsWith('.pem')).map((f) => f.slice(0, -4)) : [];
  }

  /** Remove the certificates of hosts no route serves with that issuer any more. */
  forget(issuer: CertIssuer, live: Set<string>): void {
    for (const host of this.present(issuer)) if (!live.has(host)) rmSync(this.file(issuer, host), { force: true });
  }
}
