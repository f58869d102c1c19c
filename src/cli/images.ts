// `berth image import|export|push|tag|base`, `berth login|logout` and `berth build`: the image
// commands past ls/pull/inspect/rm (those are in main.ts). Archives and build contexts are
// streamed to berthd; progress and build logs come back as NDJSON.
import { spawn } from 'node:child_process';
import { createReadStream, createWriteStream, promises as fsp, statSync } from 'node:fs';
import { Command, Option } from 'commander';
import type { Readable } from 'node:stream';
import { relative, resolve } from 'node:path';
import { ApiError, type BerthClient } from './client.js';
import { printJson } from './format.js';
import type { LayerProgress } from './main.js';

export interface CliCtx {
  client: BerthClient;
  json: boolean;
}

/** What main.ts lends these commands (its helpers, so that flags and errors look the same everywhere). */
export interface CliKit {
  addCommon(cmd: Command, opts?: { project?: boolean }): Command;
  act(fn: (ctx: CliCtx, args: string[], opts: Record<string, unknown>, cmd: Command) => Promise<number | void>): (...a: unknown[]) => Promise<void>;
  qs(params: Record<string, string | number | boolean | undefined>): string;
  readStdin(): Promise<string>;
  progressPrinter(): { update(p: LayerProgress): void; finish(): void };
  usage(message: string): Error;
  failure(code: string, message: string): Error;
}

interface ImageOut {
  ref: string;
  digest: string;
}

/** POST a streamed body and read NDJSON back: progress/log lines to `onEvent`, then the result (or a thrown error). */
async function ndjson<T>(client: BerthClient, path: string, raw: { stream: Readable; contentType: string } | undefined, body: unknown, onEvent: (m: Record<string, unknown>) => void, kit: CliKit): Promise<T> {
  let result: T | undefined;
  let failure: ApiError | undefined;
  await client.stream(
    path,
    (l) => {
      if (!l.trim()) return;
      const m = JSON.parse(l) as Record<string, unknown> & { error?: { code: string; message: string } };
      if (m.error) failure = new ApiError(m.error.code, m.error.message, 0);
      else if ('result' in m) result = m.result as T;
      else onEvent(m);
    },
    undefined,
    { method: 'POST', ...(raw ? { raw } : { body }) },
  );
  if (failure) throw failure;
  if (result === undefined) throw kit.failure('unavailable', `berthd ended ${path} without a result; check the berthd log`);
  return result;
}

/** A file as it is, a directory as a tar of its contents (GNU tar, numeric owners). */
function archiveStream(source: string): Readable {
  if (source === '-') return process.stdin;
  if (statSync(source).isDirectory()) {
    const tar = spawn('tar', ['-C', source, '--numeric-owner', '-cf', '-', '.'], { stdio: ['ignore', 'pipe', 'inherit'] });
    return tar.stdout;
  }
  return createReadStream(source);
}

export function registerImageCommands(program: Command, image: Command, kit: CliKit): void {
  const { addCommon, act, qs } = kit;

  addCommon(
    image
      .command('import')
      .description('import a `docker save` archive, an OCI archive (.tar, optionally gzipped) or an OCI layout directory')
      .argument('<path>', 'archive file, OCI layout directory, or - for standard input')
      .option('-t, --tag <ref>', 'name to import the image as (default: the names in the archive)'),
    { project: false },
  ).action(
    act(async (ctx, [source], o) => {
      try {
        statSync(source!);
      } catch {
        if (source !== '-') throw kit.usage(`${source} does not exist; give an archive file or an OCI layout directory`);
      }
      const lines: string[] = [];
      await ctx.client.stream(`/v1/images/import${qs({ tag: o.tag as string | undefined })}`, (l) => lines.push(l), undefined, {
        method: 'POST',
        raw: { stream: archiveStream(source!), contentType: 'application/x-tar' },
      });
      const res = JSON.parse(lines.join('\n')) as { items: ImageOut[] };
      if (ctx.json) return printJson(res);
      for (const i of res.items) process.stdout.write(`${i.ref}\n${i.digest}\n`);
    }),
  );

  const exp = image
    .command('export')
    .description('write an image as an archive (OCI by default; --format docker for `docker load`)')
    .argument('<ref>')
    .requiredOption('-o, --output <file>', 'archive file to write (- for standard output)')
    .addOption(new Option('--format <format>', 'archive format').choices(['oci', 'docker']).default('oci'))
    .option('--addr <addr>', 'berthd address (env BERTH_ADDR)')
    .option('--token <token>', 'API token (env BERTH_TOKEN)');
  exp.action(
    act(async (ctx, [ref], o) => {
      const file = o.output as string;
      const dest = file === '-' ? process.stdout : createWriteStream(`${file}.part`, { mode: 0o644 });
      try {
        await ctx.client.download(`/v1/images/export${qs({ ref, format: o.format as string })}`, dest);
        if (file !== '-') await fsp.rename(`${file}.part`, file);
      } catch (e) {
        if (file !== '-') await fsp.rm(`${file}.part`, { force: true });
        throw e;
      }
    }),
  );

  addCommon(
    image
      .command('push')
      .description('push a local image to the registry its name points to (blobs the registry has in another repository are mounted, not uploaded)')
      .argument('<ref>', 'e.g. 127.0.0.1:5000/team/app:v1 (tag a local image with that name first: berth image tag)'),
    { project: false },
  ).action(
    act(async (ctx, [ref]) => {
      const bar = ctx.json ? undefined : kit.progressPrinter();
      const res = await ndjson<{ ref: string; digest: string; uploaded: string[]; mounted: string[]; existing: string[] }>(
        ctx.client,
        '/v1/images/push',
        undefined,
        { ref, progress: true },
        (m) => m.progress && bar?.update(m.progress as LayerProgress),
        kit,
      ).finally(() => bar?.finish());
      if (ctx.json) return printJson(res);
      process.stdout.write(`${res.ref}\n${res.digest}\n(${res.uploaded.length} uploaded, ${res.mounted.length} mounted, ${res.existing.length} already there)\n`);
    }),
  );

  addCommon(image.command('tag').description('give a local image another name (creates or moves the tag)').argument('<source>').argument('<target>'), { project: false }).action(
    act(async (ctx, [source, target]) => {
      const res = await ctx.client.request<ImageOut>('POST', '/v1/images/tag', { source, target });
      if (ctx.json) return printJson(res);
      process.stdout.write(`${res.ref}\n`);
    }),
  );

  addCommon(
    image
      .command('base')
      .description('make a base image on this host: debian (mmdebstrap, minbase, from the host\'s Debian mirror) or busybox (busybox-static)')
      .argument('<kind>', 'debian or busybox')
      .option('--suite <suite>', 'Debian suite (default bookworm)')
      .option('--include <pkgs>', 'extra Debian packages, comma-separated (e.g. postgresql)')
      .option('-t, --tag <ref>', 'name of the image (default localhost/debian:<suite>[-<hash>] or localhost/busybox:latest)')
      .option('-q, --quiet', 'no build log on stderr'),
    { project: false },
  ).action(
    act(async (ctx, [kind], o) => {
      if (kind !== 'debian' && kind !== 'busybox') throw kit.usage(`unknown base image kind "${kind}"; use debian or busybox`);
      const include = typeof o.include === 'string' ? o.include.split(',').map((x) => x.trim()).filter(Boolean) : undefined;
      const body = { kind, progress: true, ...(o.suite ? { suite: o.suite } : {}), ...(include ? { include } : {}), ...(o.tag ? { tag: o.tag } : {}) };
      const res = await ndjson<ImageOut & { cached: boolean }>(ctx.client, '/v1/images/base', undefined, body, (m) => {
        if (typeof m.log === 'string' && !o.quiet && !ctx.json) process.stderr.write(`${m.log}\n`);
      }, kit);
      if (ctx.json) return printJson(res);
      process.stdout.write(`${res.ref}\n${res.digest}${res.cached ? ' (cached)' : ''}\n`);
    }),
  );

  addCommon(
    program
      .command('build')
      .description('build an image from a Dockerfile (buildah; RUN steps without network unless --network)')
      .argument('<dir>', 'build context directory (.dockerignore applies)')
      .requiredOption('-t, --tag <ref>', 'name of the image, e.g. app:v1')
      .option('-f, --file <path>', 'Dockerfile (default DIR/Dockerfile); must be inside DIR')
      .option('--build-arg <k=v>', 'build argument (repeatable)', (v: string, prev: string[] = []) => [...prev, v])
      .option('--network', 'give RUN steps the host network')
      .option('-q, --quiet', 'no build log on stderr'),
    { project: false },
  ).action(
    act(async (ctx, [dir], o) => {
      if (!statSync(dir!, { throwIfNoEntry: false })?.isDirectory()) throw kit.usage(`${dir} is not a directory; give the build context directory`);
      let dockerfile: string | undefined;
      if (typeof o.file === 'string') {
        const rel = relative(resolve(dir!), resolve(o.file));
        if (rel.startsWith('..') || rel.startsWith('/')) throw kit.usage(`the Dockerfile ${o.file} must be inside the build context ${dir}`);
        dockerfile = rel;
      }
      for (const a of (o.buildArg as string[] | undefined) ?? []) if (!/^[A-Za-z_][A-Za-z0-9_]*=/.test(a)) throw kit.usage(`--build-arg ${a}: use KEY=VALUE`);
      const query = new URLSearchParams({ tag: o.tag as string, ...(dockerfile ? { dockerfile } : {}), ...(o.network ? { network: 'true' } : {}) });
      for (const a of (o.buildArg as string[] | undefined) ?? []) query.append('buildArg', a);
      const res = await ndjson<ImageOut>(ctx.client, `/v1/images/build?${query}`, { stream: archiveStream(dir!), contentType: 'application/x-tar' }, undefined, (m) => {
        if (typeof m.log === 'string' && !o.quiet && !ctx.json) process.stderr.write(`${m.log}\n`);
      }, kit);
      if (ctx.json) return printJson(res);
      process.stdout.write(`${res.ref}\n${res.digest}\n`);
    }),
  );

  addCommon(
    program
      .command('login')
      .description('store credentials for a registry (checked against it first); pulls and pushes of that registry use them')
      .argument('<registry>', 'registry host[:port], e.g. 127.0.0.1:5000')
      .requiredOption('-u, --username <name>', 'user name')
      .option('--password-stdin', 'read the password from standard input (the only way to give it)'),
    { project: false },
  ).action(
    act(async (ctx, [registry], o) => {
      if (!o.passwordStdin) throw kit.usage('give the password on standard input with --password-stdin (never on the command line)');
      const password = await kit.readStdin();
      if (!password) throw kit.usage('the password read from standard input is empty');
      const res = await ctx.client.request<{ registry: string; username: string }>('POST', '/v1/registries/login', { registry, username: o.username, password });
      if (ctx.json) return printJson(res);
      process.stdout.write(`logged in to ${res.registry} as ${res.username}\n`);
    }),
  );

  addCommon(program.command('logout').description('remove the stored credentials of a registry').argument('<registry>'), { project: false }).action(
    act(async (ctx, [registry]) => {
      const res = await ctx.client.request<{ registry: string; removed: boolean }>('DELETE', `/v1/registries/login${qs({ registry })}`);
      if (ctx.json) return printJson(res);
      process.stdout.write(res.removed ? `logged out of ${res.registry}\n` : `no credentials were stored for ${res.registry}\n`);
    }),
  );
}
