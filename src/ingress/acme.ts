// Certificates from an ACME server (RFC 8555) with acme-client: http-01 challenges are answered by
// a small HTTP responder in berthd on a unix socket, to which HAProxy routes
// /.well-known/acme-challenge/ on its HTTP listener. Issued certificates go into the CertStore;
// onIssued() then re-renders the crt-list and reloads the proxy.
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import { join } from 'node:path';
import * as acme from 'acme-client';
import type { Logger } from 'pino';
import type { CertStore } from './certs.js';
import type { AcmeOptions } from './types.js';

const CHALLENGE_PREFIX = '/.well-known/acme-challenge/';
/** A failed order is tried again after this long. */
const RETRY_MS = 30_000;

export class AcmeIssuer {
  private readonly tokens = new Map<string, string>();
  private readonly inFlight = new Set<string>();
  private readonly failedAt = new Map<string, number>();
  private server: http.Server | undefined;
  private client: acme.Client | undefined;
  private stopped = false;

  constructor(
    private readonly opts: AcmeOptions,
    private readonly dir: string,
    private readonly socket: string,
    private readonly certs: CertStore,
    private readonly log: Logger,
    private readonly onIssued: () => void,
  ) {}

  /** The challenge responder on the unix socket (a stale socket file from a crash is replaced). */
  async listen(): Promise<void> {
    if (this.server) return;
    this.stopped = false;
    rmSync(this.socket, { force: true });
    const server = http.createServer((req, res) => {
      const token = req.url?.startsWith(CHALLENGE_PREFIX) ? req.url.slice(CHALLENGE_PREFIX.length) : '';
      const answer = this.tokens.get(token);
      res.writeHead(answer ? 200 : 404, { 'content-type': 'text/plain' }).end(answer ?? 'no such challenge\n');
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(this.socket, () => resolve());
    });
    server.unref();
    this.server = server;
  }

  async close(): Promise<void> {
    this.stopped = true;
    const s = this.server;
    this.server = undefined;
    if (s) await new Promise((r) => s.close(r));
    rmSync(this.socket, { force: true });
  }

  /** Order certificates for the hosts that lack a valid one (in the background, one order per host at a time). */
  want(hosts: string[]): void {
    for (const host of hosts) {
      if (this.inFlight.has(host) || this.certs.valid(this.certs.file('acme', host))) continue;
      if (Date.now() - (this.failedAt.get(host) ?? 0) < RETRY_MS) continue;
      this.inFlight.add(host);
      void this.order(host)
        .then(() => {
          this.failedAt.delete(host);
          if (!this.stopped) this.onIssued();
        })
        .catch((e: Error) => {
          this.failedAt.set(host, Date.now());
          this.log.error({ host, err: e.message }, 'ingress: ACME order failed; retrying in 30 s');
          const t = setTimeout(() => !this.stopped && this.onIssued(), RETRY_MS + 100);
          t.unref();
        })
        .finally(() => this.inFlight.delete(host));
    }
  }

  private async account(): Promise<acme.Client> {
    if (this.client) return this.client;
    if (this.opts.caRoot) {
      // A private ACME server (pebble in tests): trust its root for the directory's HTTPS only.
      acme.axios.defaults.httpsAgent = new https.Agent({ ca: readFileSync(this.opts.caRoot) });
    }
    const dir = join(this.dir, 'acme');
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    const keyFile = join(dir, 'account.key');
    if (!existsSync(keyFile)) writeFileSync(keyFile, await acme.crypto.createPrivateKey(), { mode: 0o600 });
    const client = new acme.Client({ directoryUrl: this.opts.directory, accountKey: readFileSync(keyFile) });
    await client.createAccount({ termsOfServiceAgreed: true, contact: [`mailto:${this.opts.email}`] });
    this.client = client;
    return client;
  }

  private async order(host: string): Promise<void> {
    const client = await this.account();
    const [key, csr] = await acme.crypto.createCsr({ commonName: host, altNames: [host] });
    const cert = await client.auto({
      csr,
      email: this.opts.email,
      termsOfServiceAgreed: true,
      challengePriority: ['http-01'],
      // acme-client would fetch the challenge itself through public DNS first; the ACME server's
      // own validation is the one that counts (and the host may only resolve for it).
      skipChallengeVerification: true,
      challengeCreateFn: async (_authz, challenge, keyAuthorization) => {
        this.tokens.set(challenge.token, keyAuthorization);
      },
      challengeRemoveFn: async (_authz, challenge) => {
        this.tokens.delete(challenge.token);
      },
    });
    this.certs.writePem(this.certs.file('acme', host), `${cert.trim()}\n${key.toString().trim()}\n`);
    this.log.info({ host }, 'ingress: ACME certificate issued');
  }
}
