// The images available to workloads. Until the images issue lands a real OCI store, Berth ships
// one built-in image, "busybox", made from Debian's busybox-static.
import { lstatSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { invalidArgument } from '../core/errors.js';
import { ensureBusyboxImage } from './busybox.js';

export interface ImageConfig {
  env: Record<string, string>;
  entrypoint: string[];
  cmd: string[];
  workingDir: string;
  user: string;
}

export interface ResolvedImage {
  ref: string;
  digest: string;
  rootfs: string;
  config: ImageConfig;
}

export interface ImageCatalog {
  resolve(ref: string): Promise<ResolvedImage>;
  list(): Promise<ResolvedImage[]>;
}

export class BuiltinImages implements ImageCatalog {
  private busybox: Promise<ResolvedImage> | undefined;
  constructor(private readonly dir: string) {}

  private getBusybox(): Promise<ResolvedImage> {
    this.busybox ??= ensureBusyboxImage(this.dir).then((img) => ({
      ref: 'busybox:latest',
      digest: img.digest,
      rootfs: img.rootfs,
      config: {
        env: { PATH: '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' },
        entrypoint: [],
        cmd: ['sh'],
        workingDir: '/',
        user: '0:0',
      },
    }));
    this.busybox.catch(() => (this.busybox = undefined));
    return this.busybox;
  }

  async resolve(ref: string): Promise<ResolvedImage> {
    if (ref === 'busybox' || ref === 'busybox:latest') return this.getBusybox();
    throw invalidArgument(`image "${ref}" is not available on this host; available images: busybox`);
  }

  async list(): Promise<ResolvedImage[]> {
    return [await this.getBusybox()];
  }
}

/**
 * Resolve "uid[:gid]" or "name[:group]" against the image's /etc/passwd and /etc/group.
 * The files are read only if they are regular files (never through a symlink that could point
 * out of the image).
 */
export function resolveUser(rootfs: string, user: string): { uid: number; gid: number } {
  const [u, g] = user.split(':') as [string, string | undefined];
  const readDb = (file: string): string[][] => {
    const p = join(rootfs, 'etc', file);
    try {
      if (!lstatSync(join(rootfs, 'etc')).isDirectory() || !lstatSync(p).isFile()) return [];
      return readFileSync(p, 'utf8')
        .split('\n')
        .filter((l) => l && !l.startsWith('#'))
        .map((l) => l.split(':'));
    } catch {
      return [];
    }
  };
  let uid: number;
  let gid: number | undefined;
  if (/^\d+$/.test(u)) {
    uid = Number(u);
    const row = readDb('passwd').find((r) => r[2] === u);
    if (row) gid = Number(row[3]);
  } else {
    const row = readDb('passwd').find((r) => r[0] === u);
    if (!row) throw invalidArgument(`user "${u}" does not exist in the image's /etc/passwd; use a numeric uid such as "1000:1000"`);
    uid = Number(row[2]);
    gid = Number(row[3]);
  }
  if (g !== undefined) {
    if (/^\d+$/.test(g)) gid = Number(g);
    else {
      const row = readDb('group').find((r) => r[0] === g);
      if (!row) throw invalidArgument(`group "${g}" does not exist in the image's /etc/group; use a numeric gid`);
      gid = Number(row[2]);
    }
  }
  if (uid > 4294967294 || (gid ?? 0) > 4294967294) throw invalidArgument('uid and gid must be below 4294967295');
  return { uid, gid: gid ?? uid };
}
