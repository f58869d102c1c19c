// The DNS server workloads use (their resolv.conf points at their bridge's gateway): answers
// `<name>.<project>.internal` from Berth's own records (workloads, service replicas that are
// ready) and forwards every other question to the host's resolvers. Messages are encoded and
// decoded with dns-packet; the server itself is a UDP socket and a TCP listener (RFC 7766; the
// ingress's resolver asks over TCP) per gateway address.
import { createSocket, type Socket } from 'node:dgram';
import { createServer, type Server } from 'node:net';
import { readFileSync } from 'node:fs';
import * as dnsPacket from 'dns-packet';
import type { Logger } from 'pino';

export const INTERNAL_SUFFIX = '.internal';
const TTL_S = 5;

/** Addresses for a name inside Berth's zone; undefined when the name is not Berth's to answer. */
export type Resolver = (name: string, clientIp: string) => string[] | undefined;

/** Nameservers from resolv.conf (Berth's own gateways excluded by the caller). */
export function hostResolvers(path = '/etc/resolv.conf'): string[] {
  try {
    return [...readFileSync(path, 'utf8').matchAll(/^\s*nameserver\s+(\d+\.\d+\.\d+\.\d+)\s*$/gm)].map((m) => m[1]!);
  } catch {
    return [];
  }
}

export class DnsServer {
  private readonly sockets = new Map<string, Socket>();
  private readonly tcp = new Map<string, Server>();

  constructor(
    private readonly resolve: Resolver,
    private readonly upstreams: string[],
    private readonly log: Logger,
  ) {}

  /** Serves on address:53 (idempotent); returns the port (tests pass 0 for a free one). */
  async listen(address: string, port = 53): Promise<number> {
    const existing = this.sockets.get(address);
    if (existing) return existing.address().port;
    const sock = createSocket({ type: 'udp4', reuseAddr: false });
    await new Promise<void>((resolve, reject) => {
      sock.once('error', reject);
      sock.bind(port, address, () => {
        sock.off('error', reject);
        resolve();
      });
    });
    sock.on('error', (e) => this.log.warn({ err: e.message, address }, 'dns socket error'));
    sock.on('message', (msg, rinfo) => void this.respond(msg, rinfo.address).then((r) => r && sock.send(r, rinfo.port, rinfo.address)));
    sock.unref();
    this.sockets.set(address, sock);
    const bound = sock.address().port;
    // TCP: two-byte length, then the message; several per connection.
    const srv = createServer((conn) => {
      let buf = Buffer.alloc(0);
      conn.on('error', () => undefined);
      conn.setTimeout(10_000, () => conn.destroy());
      conn.on('data', (d: Buffer) => {
        buf = Buffer.concat([buf, d]);
        while (buf.length >= 2 && buf.length >= 2 + buf.readUInt16BE(0)) {
          const msg = buf.subarray(2, 2 + buf.readUInt16BE(0));
          buf = buf.subarray(2 + msg.length);
          void this.respond(Buffer.from(msg), conn.remoteAddress ?? '').then((r) => {
            if (!r || conn.destroyed) return;
            const len = Buffer.alloc(2);
            len.writeUInt16BE(r.length);
            conn.write(Buffer.concat([len, r]));
          });
        }
        if (buf.length > 65_537) conn.destroy();
      });
    });
    await new Promise<void>((resolve) => {
      srv.once('error', (e) => {
        this.log.warn({ err: e.message, address }, 'dns: no TCP listener');
        resolve();
      });
      srv.listen(bound, address, () => resolve());
    });
    srv.unref();
    if (srv.listening) this.tcp.set(address, srv);
    return bound;
  }

  unlisten(address: string): void {
    this.sockets.get(address)?.close();
    this.sockets.delete(address);
    this.tcp.get(address)?.close();
    this.tcp.delete(address);
  }

  addresses(): string[] {
    return [...this.sockets.keys()];
  }

  close(): void {
    for (const a of [...this.sockets.keys()]) this.unlisten(a);
  }

  /** The reply to one message (undefined: not DNS, no answer). */
  private async respond(msg: Buffer, client: string): Promise<Buffer | undefined> {
    let q: dnsPacket.Packet;
    try {
      q = dnsPacket.decode(msg);
    } catch {
      return undefined; // not DNS
    }
    const question = q.questions?.[0];
    if (!question) return undefined;
    const name = question.name.toLowerCase().replace(/\.$/, '');
    const ips = name.endsWith(INTERNAL_SUFFIX) || !name.includes('.') ? this.resolve(name, client.replace(/^::ffff:/, '')) : undefined;
    if (ips === undefined) return (await this.forward(msg)) ?? this.reply(q, 'SERVFAIL', []);
    const answers = question.type === 'A' ? ips.map((ip) => ({ type: 'A' as const, name: question.name, ttl: TTL_S, data: ip })) : [];
    return this.reply(q, ips.length ? 'NOERROR' : 'NXDOMAIN', answers);
  }

  private reply(q: dnsPacket.Packet, rcode: string, answers: dnsPacket.Answer[]): Buffer {
    return dnsPacket.encode({
      id: q.id ?? 0,
      type: 'response',
      // QR + AA + RD/RA; rcode in the low bits.
      flags: dnsPacket.AUTHORITATIVE_ANSWER | dnsPacket.RECURSION_DESIRED | dnsPacket.RECURSION_AVAILABLE | (rcode === 'NXDOMAIN' ? 3 : rcode === 'SERVFAIL' ? 2 : 0),
      questions: q.questions ?? [],
      answers,
    });
  }

  /** Relays the question to the host's resolvers ("ip" or "ip:port"), first answer wins; undefined after 2 s. */
  private forward(msg: Buffer): Promise<Buffer | undefined> {
    const ups = this.upstreams.filter((u) => !this.sockets.has(u.split(':')[0]!));
    if (ups.length === 0) return Promise.resolve(undefined);
    return new Promise((resolve) => {
      const s = createSocket('udp4');
      const done = (b?: Buffer) => {
        clearTimeout(timer);
        s.close();
        resolve(b);
      };
      const timer = setTimeout(() => done(undefined), 2000);
      s.on('error', () => done(undefined));
      s.on('message', (b) => done(b));
      for (const u of ups) {
        const [host, port] = u.split(':');
        s.send(msg, Number(port ?? 53), host!);
      }
    });
  }
}
