// The SDK streams an upload without holding it: Node's fetch (undici) keeps every chunk of a streamed
// request body while it may follow a redirect (undici #4058), so a 1 GiB `files.write` once made the
// client 1.1 GiB resident (bench/sandbox-files.ts). Here the server is a plain HTTP server that counts
// and drops the bytes, so that only the client's memory is measured; the same call against real
// sandboxes is in sdk.test.ts, and a 1 GiB round trip per tier in bench/sandbox-files.ts.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { Sandbox } from '../sdk/src/index.js';

test('files.write of a 256 MiB stream keeps the client far below the file in memory', async () => {
  let received = 0;
  const server = createServer((req, res) => {
    if (req.method === 'POST') {
      // Sandbox.create: a running sandbox.
      res.writeHead(201, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ name: 'sbx-mem', spec: { isolation: 'container' }, status: { phase: 'running' } }));
      return;
    }
    req.on('data', (c: Buffer) => (received += c.length));
    req.on('end', () => {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ path: '/tmp/big', written: received }));
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  try {
    const sbx = await Sandbox.create({ apiUrl: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, apiKey: 'k', isolation: 'container' });
    const total = 256 * 1024 * 1024;
    const block = new Uint8Array(1024 * 1024).fill(7);
    let sent = 0;
    let peak = process.memoryUsage().rss;
    const before = peak;
    const src = new ReadableStream<Uint8Array>({
      pull(ctl) {
        peak = Math.max(peak, process.memoryUsage().rss);
        if (sent >= total) return ctl.close();
        sent += block.length;
        ctl.enqueue(block.slice()); // a fresh chunk each time, as from a file or a generator
      },
    });
    const w = await sbx.files.write('/tmp/big', src);
    assert.equal(w.written, total);
    const grewMiB = (peak - before) / 2 ** 20;
    assert.ok(grewMiB < 96, `the client grew by ${grewMiB.toFixed(0)} MiB while streaming 256 MiB`);
  } finally {
    server.close();
  }
});
