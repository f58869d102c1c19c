// IPv4 addresses and CIDR blocks as plain numbers: parse, format, contain, split. Pure.
// (Node has net.BlockList for membership tests, but nothing that splits a pool into subnets or
// hands out the n-th one, which is what the project-subnet allocator needs.)

export interface Cidr {
  /** Network address as an unsigned 32-bit number. */
  base: number;
  prefix: number;
}

export function parseIp(s: string): number | undefined {
  const m = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.exec(s);
  if (!m) return undefined;
  const parts = m.slice(1).map(Number);
  if (parts.some((p) => p > 255)) return undefined;
  return ((parts[0]! << 24) | (parts[1]! << 16) | (parts[2]! << 8) | parts[3]!) >>> 0;
}

export function formatIp(n: number): string {
  return [n >>> 24, (n >>> 16) & 255, (n >>> 8) & 255, n & 255].join('.');
}

const mask = (prefix: number) => (prefix === 0 ? 0 : (0xffffffff << (32 - prefix)) >>> 0);

/** "10.88.0.0/16" → Cidr; a bare address is a /32. Host bits must be zero unless `loose`. */
export function parseCidr(s: string, loose = false): Cidr | undefined {
  const [ip, p, extra] = s.split('/');
  if (extra !== undefined || ip === undefined) return undefined;
  const base = parseIp(ip);
  const prefix = p === undefined ? 32 : /^\d{1,2}$/.test(p) ? Number(p) : NaN;
  if (base === undefined || !(prefix >= 0 && prefix <= 32)) return undefined;
  const net = (base & mask(prefix)) >>> 0;
  if (!loose && net !== base) return undefined;
  return { base: net, prefix };
}

export function formatCidr(c: Cidr): string {
  return `${formatIp(c.base)}/${c.prefix}`;
}

export function cidrContains(c: Cidr, ip: number): boolean {
  return ((ip & mask(c.prefix)) >>> 0) === c.base;
}

export function cidrsOverlap(a: Cidr, b: Cidr): boolean {
  const p = Math.min(a.prefix, b.prefix);
  return ((a.base & mask(p)) >>> 0) === ((b.base & mask(p)) >>> 0);
}

/** The `index`-th subnet of length `prefix` inside `pool`, or undefined past the end. */
export function nthSubnet(pool: Cidr, prefix: number, index: number): Cidr | undefined {
  if (prefix < pool.prefix || prefix > 30) return undefined;
  const count = 2 ** (prefix - pool.prefix);
  if (index < 0 || index >= count) return undefined;
  return { base: (pool.base + index * 2 ** (32 - prefix)) >>> 0, prefix };
}

export function subnetCount(pool: Cidr, prefix: number): number {
  return prefix < pool.prefix ? 0 : 2 ** (prefix - pool.prefix);
}
