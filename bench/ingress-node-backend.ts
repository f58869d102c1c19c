// The Node.js flavour of bench/ingress's backend (the Go one is bench/ingress-backend): a "hello"
// node:http server. Usage: node dist/bench/ingress-node-backend.js 127.0.0.1:0 (prints its address).
import http from 'node:http';
import type { AddressInfo } from 'node:net';

const listen = process.argv[2] ?? '127.0.0.1:0';
const body = Buffer.from('hello from the backend\n');
const server = http.createServer((_req, res) => {
  res.writeHead(200, { 'content-type': 'text/plain', 'content-length': body.length });
  res.end(body);
});
server.keepAliveTimeout = 60_000;
const i = listen.lastIndexOf(':');
server.listen(Number(listen.slice(i + 1)), listen.slice(0, i), () => {
  const a = server.address() as AddressInfo;
  console.log(`${a.address}:${a.port}`);
});
