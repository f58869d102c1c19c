// `berth ingress …`: the ingress's status and Berth's local CA certificate (what browsers and
// clients trust to reach `tls: local` hosts over HTTPS, e.g. `berth ingress ca > berth-ca.pem`).
import type { Command } from 'commander';
import type { BerthClient } from './client.js';
import { printJson, printTable } from './format.js';

interface IngressCtx {
  client: BerthClient;
  json: boolean;
}
type Wrap = (fn: (ctx: IngressCtx) => Promise<number | void>) => (...args: unknown[]) => Promise<void>;
type AddCommon = (cmd: Command, opts?: { project?: boolean }) => Command;

interface Status {
  enabled: boolean;
  http: string | null;
  https: string | null;
  baseDomain: string;
  proxy: { pid: number | null; running: boolean; adopted: boolean; busyPolling?: { mode: string; on: boolean } };
  routes: { id: string; hosts: string[]; backends: number; tls: string; auth: boolean }[];
  rejected: { id: string; reason: string }[];
  lastError: string | null;
}

export function registerIngress(program: Command, addCommon: AddCommon, act: Wrap): void {
  const ingress = program.command('ingress').description('the HTTP/HTTPS ingress: status and the local CA certificate');
  addCommon(ingress.command('ca').description("print Berth's local CA certificate (PEM); trust it to reach ingress hosts over HTTPS"), { project: false }).action(
    act(async (ctx) => {
      const r = await ctx.client.request<{ pem: string }>('GET', '/v1/ingress/ca');
      if (ctx.json) return printJson(r);
      process.stdout.write(r.pem);
    }),
  );
  addCommon(ingress.command('status').description('show the listeners, the proxy process and the routes'), { project: false }).action(
    act(async (ctx) => {
      const s = await ctx.client.request<Status>('GET', '/v1/ingress');
      if (ctx.json) return printJson(s);
      process.stdout.write(
        `ingress ${s.enabled ? 'on' : 'off'}; http ${s.http ?? 'off'}, https ${s.https ?? 'off'}, base domain ${s.baseDomain}; ` +
          `proxy ${s.proxy.running ? `running (pid ${s.proxy.pid}${s.proxy.adopted ? ', adopted' : ''})` : 'not running'}` +
          `${s.proxy.busyPolling ? `; busy-polling ${s.proxy.busyPolling.mode}${s.proxy.busyPolling.mode === 'auto' ? ` (now ${s.proxy.busyPolling.on ? 'on' : 'off'})` : ''}` : ''}\n`,
      );
      if (s.lastError) process.stdout.write(`last error: ${s.lastError}\n`);
      printTable(['ROUTE', 'HOSTS', 'BACKENDS', 'TLS', 'TOKEN'], s.routes.map((r) => [r.id, r.hosts.join(','), r.backends, r.tls, r.auth]));
      for (const r of s.rejected) process.stdout.write(`rejected ${r.id}: ${r.reason}\n`);
    }),
  );
}
