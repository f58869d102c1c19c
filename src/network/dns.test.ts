import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createSocket } from 'node:dgram';
import { connect } from 'node:net';
import * as dnsPacket from 'dns-packet';
import pino from 'pino';
import { DnsServer } from './dns.js';

const log = pino({ level: 'silent' });

async function ask(port: number, name: string, type: 'A' | 'AAAA' = 'A', host = '127.0.0.2'): Promise<dnsPacket.Packet> {
  const s = createSocket('udp4');
  try {
    return await new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error('no answer')), 3000);
      s.on('message', (m) => {
        clearTimeout(t);
        resolve(dnsPacket.decode(m));
      });
      s.send(dnsPacket.encode({ type: 'query', id: 7, flags: dnsPacket.RECURSION_DESIRED, questions: [{ type, name }] }), port, host);
    });
  } finally {
    s.close();
  }
}
const rcode = (p: dnsPacket.Packet) => ((p as unknown as { rcode?: string }).rcode);

test('answers names inside .internal from its resolver and forwards the rest upstream', async () => {
  // The upstream: a plain UDP responder that knows only "example.test".
  const upstream = createSocket('udp4');
  upstream.on('message', (m, r) => {
    const q = dnsPacket.decode(m);
    const answers = q.questions![0]!.name === 'example.test' ? [{ type: 'A' as const, name: 'example.test', ttl: 60, data: '192.0.2.7' }] : [];
    upstream.send(dnsPacket.encode({ type: 'response', id: q.id!, flags: 0, questions: q.questions!, answers }), r.port, r.address);
  });
  await new Promise<void>((r) => upstream.bind(0, '127.0.0.1', () => r()));
  const upPort = upstream.address().port;
  const asked: string[] = [];
  const server = new DnsServer(
    (name, client) => {
      asked.push(`${name}@${client}`);
      if (name === 'web.p1.internal') return ['10.89.0.2', '10.89.0.3'];
      if (!name.includes('.')) return name === 'web' ? ['10.89.0.2'] : [];
      return name.endsWith('.internal') ? [] : undefined;
    },
    [`127.0.0.1:${upPort}`],
    log,
  );
  const port = await server.listen('127.0.0.2', 0);
  try {
    const a = await ask(port, 'web.p1.internal');
    assert.equal(a.id, 7);
    assert.deepEqual(a.answers!.map((x) => (x as { data: string }).data).sort(), ['10.89.0.2', '10.89.0.3']);
    assert.equal(rcode(a), 'NOERROR');
    assert.equal(rcode(await ask(port, 'nope.p1.internal')), 'NXDOMAIN');
    const six = await ask(port, 'web.p1.internal', 'AAAA');
    assert.equal(rcode(six), 'NOERROR');
    assert.equal(six.answers!.length, 0, 'IPv4 only: no AAAA records, but the name exists');
    assert.deepEqual((await ask(port, 'web')).answers!.map((x) => (x as { data: string }).data), ['10.89.0.2']);
    const fwd = await ask(port, 'example.test');
    assert.deepEqual(fwd.answers!.map((x) => (x as { data: string }).data), ['192.0.2.7']);
    assert.ok(asked.includes('web.p1.internal@127.0.0.1'), asked.join());
  } finally {
    server.close();
    upstream.close();
  }
});

test('answers over TCP too (two-byte length prefix; several questions per connection)', async () => {
  const server = new DnsServer((n) => (n === 'web.p1.internal' ? ['10.89.0.9'] : []), [], log);
  const port = await server.listen('127.0.0.4', 0);
  try {
    const sock = connect(port, '127.0.0.4');
    const frame = (id: number) => {
      const m = dnsPacket.encode({ type: 'query', id, questions: [{ type: 'A', name: 'web.p1.internal' }] });
      const len = Buffer.alloc(2);
      len.writeUInt16BE(m.length);
      return Buffer.concat([len, m]);
    };
    const replies: dnsPacket.Packet[] = [];
    await new Promise<void>((resolve, reject) => {
      let buf = Buffer.alloc(0);
      sock.on('error', reject);
      sock.on('data', (d: Buffer) => {
        buf = Buffer.concat([buf, d]);
        while (buf.length >= 2 && buf.length >= 2 + buf.readUInt16BE(0)) {
          replies.push(dnsPacket.decode(buf.subarray(2, 2 + buf.readUInt16BE(0))));
          buf = buf.subarray(2 + buf.readUInt16BE(0));
        }
        if (replies.length === 2) resolve();
      });
      sock.write(Buffer.concat([frame(1), frame(2)]));
    });
    sock.destroy();
    assert.deepEqual(replies.map((r) => [r.id, (r.answers![0] as { data: string }).data]).sort(), [[1, '10.89.0.9'], [2, '10.89.0.9']]);
  } finally {
    server.close();
  }
});

test('without an upstream, names outside .internal get SERVFAIL', async () => {
  const server = new DnsServer(() => undefined, [], log);
  const port = await server.listen('127.0.0.3', 0);
  try {
    assert.equal(rcode(await ask(port, 'example.test', 'A', '127.0.0.3')), 'SERVFAIL');
  } finally {
    server.close();
  }
});
