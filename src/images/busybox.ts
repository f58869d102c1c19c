// The built-in "busybox" image: a tiny root file system made from the host's statically linked
// busybox (Debian's busybox-static package), so Berth can run tasks without pulling images.
//
// Layout: <imagesDir>/busybox/rootfs (the root file system) and <imagesDir>/busybox/digest
// ("sha256:<hex>" of a canonical listing of rootfs). The rootfs is built in a temporary
// directory next to it and renamed into place, so readers never see a half-built tree and two
// concurrent callers cannot corrupt it: whoever renames first wins, the other discards its copy.

import { execFile } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { BerthError } from '../core/errors.js';

const execFileP = promisify(execFile);

export const BUSYBOX_BINARY = '/bin/busybox';
const DEFAULT_PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';
const INSTALL_HINT = 'install the static build with `apt-get install busybox-static`';
const TMP_PREFIX = '.rootfs-tmp-';
const STALE_TMP_MS = 10 * 60 * 1000;
const APPLET_RE = /^[A-Za-z0-9_.[\]-]+$/;

export interface BusyboxImage {
  name: 'busybox';
  rootfs: string;
  digest: string;
}

export interface ImageProcessConfig {
  env: Record<string, string>;
  cmd: string[];
  workingDir: string;
}

/** Default process configuration of the busybox image (like an OCI image config). */
export function imageConfig(): ImageProcessConfig {
  return { env: { PATH: DEFAULT_PATH }, cmd: ['sh'], workingDir: '/' };
}

const PASSWD = [
  'root:x:0:0:root:/root:/bin/sh',
  'berth:x:1000:1000:berth:/home/berth:/bin/sh',
  'nobody:x:65534:65534:nobody:/nonexistent:/bin/false',
  '',
].join('\n');

const GROUP = ['root:x:0:', 'tty:x:5:', 'berth:x:1000:', 'nogroup:x:65534:', ''].join('\n');

const HOSTS = ['127.0.0.1\tlocalhost', '::1\tlocalhost ip6-localhost ip6-loopback', ''].join('\n');

function precondition(msg: string): BerthError {
  return new BerthError('failed_precondition', msg);
}

/** True when the ELF file has no PT_INTERP program header (i.e. it needs no dynamic loader). */
async function isStaticElf(file: string): Promise<boolean> {
  const fh = await fsp.open(file, 'r');
  try {
    const ident = Buffer.alloc(64);
    const { bytesRead } = await fh.read(ident, 0, 64, 0);
    if (bytesRead < 52 || ident.readUInt32BE(0) !== 0x7f454c46) {
      throw precondition(`${file} is not an ELF executable; ${INSTALL_HINT}`);
    }
    const is64 = ident[4] === 2;
    const le = ident[5] === 1;
    const u16 = (b: Buffer, o: number) => (le ? b.readUInt16LE(o) : b.readUInt16BE(o));
    const u32 = (b: Buffer, o: number) => (le ? b.readUInt32LE(o) : b.readUInt32BE(o));
    const phoff = is64 ? Number(le ? ident.readBigUInt64LE(32) : ident.readBigUInt64BE(32)) : u32(ident, 28);
    const phentsize = u16(ident, is64 ? 54 : 42);
    const phnum = u16(ident, is64 ? 56 : 44);
    if (phentsize < 4 || phnum === 0) return true;
    const ph = Buffer.alloc(phentsize * phnum);
    await fh.read(ph, 0, ph.length, phoff);
    for (let i = 0; i < phnum; i++) {
      const PT_INTERP = 3;
      if (u32(ph, i * phentsize) === PT_INTERP) return false;
    }
    return true;
  } finally {
    await fh.close();
  }
}

async function checkBusybox(): Promise<string[]> {
  try {
    await fsp.access(BUSYBOX_BINARY);
  } catch {
    throw precondition(`${BUSYBOX_BINARY} not found; ${INSTALL_HINT}`);
  }
  if (!(await isStaticElf(BUSYBOX_BINARY))) {
    throw precondition(`${BUSYBOX_BINARY} is dynamically linked and cannot run inside a container image; ${INSTALL_HINT}`);
  }
  let stdout: string;
  try {
    ({ stdout } = await execFileP(BUSYBOX_BINARY, ['--list'], { timeout: 10_000, maxBuffer: 1 << 20 }));
  } catch (e) {
    throw precondition(`\`${BUSYBOX_BINARY} --list\` failed (${(e as Error).message}); ${INSTALL_HINT}`);
  }
  const applets = [...new Set(stdout.split('\n').map((s) => s.trim()))].filter(
    (a) => a !== '' && a !== 'busybox' && a !== '.' && a !== '..' && APPLET_RE.test(a),
  );
  if (!applets.includes('sh')) throw precondition(`${BUSYBOX_BINARY} has no 'sh' applet; ${INSTALL_HINT}`);
  return applets.sort();
}

async function mkdirMode(dir: string, mode: number): Promise<void> {
  await fsp.mkdir(dir);
  await fsp.chmod(dir, mode); // mkdir's mode is filtered by the umask
}

async function writeFileMode(file: string, content: string, mode: number): Promise<void> {
  await fsp.writeFile(file, content);
  await fsp.chmod(file, mode);
}

async function buildRootfs(dir: string, applets: string[]): Promise<void> {
  await fsp.chmod(dir, 0o755);
  for (const d of ['bin', 'sbin', 'usr', 'usr/bin', 'usr/sbin', 'etc', 'proc', 'sys', 'dev', 'home', 'home/berth']) {
    await mkdirMode(path.join(dir, d), 0o755);
  }
  await mkdirMode(path.join(dir, 'tmp'), 0o1777);
  await mkdirMode(path.join(dir, 'root'), 0o700);
  if (process.getuid?.() === 0) await fsp.chown(path.join(dir, 'home/berth'), 1000, 1000);

  await fsp.copyFile(BUSYBOX_BINARY, path.join(dir, 'bin/busybox'));
  await fsp.chmod(path.join(dir, 'bin/busybox'), 0o755);
  for (const a of applets) await fsp.symlink('busybox', path.join(dir, 'bin', a));

  await writeFileMode(path.join(dir, 'etc/passwd'), PASSWD, 0o644);
  await writeFileMode(path.join(dir, 'etc/group'), GROUP, 0o644);
  await writeFileMode(path.join(dir, 'etc/hosts'), HOSTS, 0o644);
  await writeFileMode(path.join(dir, 'etc/resolv.conf'), '', 0o644);
}

/**
 * sha256 over a canonical listing of `dir`: one line per entry, sorted by path, with type, mode,
 * owner, size, symlink target and content hash. Timestamps are left out, so identical inputs
 * give the same digest.
 */
export async function computeRootfsDigest(dir: string): Promise<string> {
  const lines: string[] = [];
  async function walk(rel: string): Promise<void> {
    const abs = path.join(dir, rel);
    const st = await fsp.lstat(abs);
    const mode = (st.mode & 0o7777).toString(8).padStart(4, '0');
    const base = `${rel === '' ? '.' : rel}\t${mode}\t${st.uid}:${st.gid}`;
    if (st.isSymbolicLink()) {
      lines.push(`${base}\tl\t${await fsp.readlink(abs)}`);
    } else if (st.isDirectory()) {
      lines.push(`${base}\td`);
      const names = (await fsp.readdir(abs)).sort();
      for (const n of names) await walk(rel === '' ? n : `${rel}/${n}`);
    } else if (st.isFile()) {
      const h = createHash('sha256').update(await fsp.readFile(abs)).digest('hex');
      lines.push(`${base}\tf\t${st.size}\t${h}`);
    } else {
      lines.push(`${base}\t?`);
    }
  }
  await walk('');
  return `sha256:${createHash('sha256').update(lines.join('\n')).digest('hex')}`;
}

async function exists(p: string): Promise<boolean> {
  try {
    await fsp.lstat(p);
    return true;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return false;
    throw e;
  }
}

async function readDigest(file: string): Promise<string | undefined> {
  try {
    const d = (await fsp.readFile(file, 'utf8')).trim();
    return /^sha256:[0-9a-f]{64}$/.test(d) ? d : undefined;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw e;
  }
}

async function writeDigest(file: string, digest: string): Promise<void> {
  const tmp = `${file}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
  await fsp.writeFile(tmp, `${digest}\n`);
  await fsp.rename(tmp, file);
}

/** Remove temporary build directories left behind by a crashed builder. Best effort. */
async function removeStaleTemps(imageDir: string): Promise<void> {
  let names: string[];
  try {
    names = await fsp.readdir(imageDir);
  } catch {
    return;
  }
  for (const n of names) {
    if (!n.startsWith(TMP_PREFIX)) continue;
    const p = path.join(imageDir, n);
    try {
      const st = await fsp.lstat(p);
      if (Date.now() - st.mtimeMs > STALE_TMP_MS) await fsp.rm(p, { recursive: true, force: true });
    } catch {
      /* raced with another cleaner */
    }
  }
}

/**
 * Make sure `<imagesDir>/busybox/rootfs` exists and return it with its digest. Idempotent and
 * safe to call concurrently; fast when the image is already there.
 */
export async function ensureBusyboxImage(imagesDir: string): Promise<BusyboxImage> {
  const imageDir = path.resolve(imagesDir, 'busybox');
  const rootfs = path.join(imageDir, 'rootfs');
  const digestFile = path.join(imageDir, 'digest');

  if (await exists(rootfs)) {
    const d = await readDigest(digestFile);
    if (d) return { name: 'busybox', rootfs, digest: d };
  } else {
    const applets = await checkBusybox();
    await fsp.mkdir(imageDir, { recursive: true });
    await removeStaleTemps(imageDir);
    const tmp = path.join(imageDir, `${TMP_PREFIX}${process.pid}-${randomBytes(6).toString('hex')}`);
    await fsp.mkdir(tmp);
    try {
      await buildRootfs(tmp, applets);
      const digest = await computeRootfsDigest(tmp);
      let renamed = false;
      try {
        await fsp.rename(tmp, rootfs);
        renamed = true;
      } catch (e) {
        const code = (e as NodeJS.ErrnoException).code;
        if (code !== 'ENOTEMPTY' && code !== 'EEXIST') throw e;
        // Another caller finished first; use its rootfs (and the digest it writes or we recompute).
      }
      if (renamed) {
        await writeDigest(digestFile, digest);
        return { name: 'busybox', rootfs, digest };
      }
    } finally {
      await fsp.rm(tmp, { recursive: true, force: true });
    }
    const d = await readDigest(digestFile);
    if (d) return { name: 'busybox', rootfs, digest: d };
  }
  // rootfs present without a digest (e.g. a crash between the two renames): recompute it.
  const digest = await computeRootfsDigest(rootfs);
  await writeDigest(digestFile, digest);
  return { name: 'busybox', rootfs, digest };
}
