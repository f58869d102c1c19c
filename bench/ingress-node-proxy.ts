// The Node.js candidate for the ingress data plane, measured by bench/ingress.ts against the ingress (HAProxy):
// the leanest reverse proxy Node can be (node:http server, keep-alive agent, streams piped, round
// robin), so its figure is an upper bound for any Node proxy with routing, retries and TLS on top.
// Usage: node dist/bench/ingress-node-proxy.js <listen host:port> <backend host:port>...
// (prints the bound address on stdout).
import http from 'node:http';
import type { AddressInfo } from 'node:net';

const [listen, ...backends] = process.argv.slice(2);
if (!listen || backends.length === 0) throw new Error('usage: ingress-node-proxy <listen host:port> <backend host:port>...');
const targets = backends.map((b) => {
  const i = b.lastIndexOf(':');
  return { host: b.slice(0, i), port: Number(b.slice(i + 1)) };
});
const agent = new http.Agent({ keepAlive: true, maxSockets: 256 });
let next = 0;

const server = http.createServer((req, res) => {
  const t = targets[next++ % targets.length]!;
  const up = http.request({ host: t.host, port: t.port, method: req.method, path: req.url, headers: req.headers, agent }, (r) => {
    res.writeHead(r.statusCode ?? 502, r.headers);
    r.pipe(res);
  });
  up.on('error', () => {
    if (!res.headersSent) res.writeHead(502);
    res.end();
  });
  req.pipe(up);
});
server.keepAliveTimeout = 60_000;
const i = listen.lastIndexOf(':');
server.listen(Number(listen.slice(i + 1)), listen.slice(0, i), () => {
  const a = server.address() as AddressInfo;
  console.log(`${a.address}:${a.port}`);
});
