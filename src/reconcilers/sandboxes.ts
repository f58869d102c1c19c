// Sandbox reconciler: a sandbox is a task whose main process is Berth's guest agent (commands and
// files are served by it: see api/routes/sandboxes.ts). Level-triggered and keyed by id, like the
// workload reconciler: it starts the task, adopts it after a daemon restart, ends it when its
// timeout passes (freeing every host resource) and removes everything on deletion.
import type { Logger } from 'pino';
import { randomBytes } from 'node:crypto';
import type { Ingress } from '../ingress/ingress.js';
import type { IngressRoute } from '../ingress/types.js';
import type { AgentFrame, DriverRegistry, EgressPolicy, TaskHandle } from '../core/driver.js';
import { taskNetworkFor } from '../network/manager.js';
import { isBerthError } from '../core/errors.js';
import type { ImageCatalog } from '../images/catalog.js';
import type { Resource, ResourceStore } from '../store/resources.js';
import type { ReconcileResult } from './controller.js';
import { exitReason, netOf, networkStatus } from './workloads.js';
import { POOL_LABEL } from './sandboxpools.js';
import { traceMark } from '../lib/trace.js';
import { DEFAULT_PATH } from '../drivers/oci/ocispec.js';

export const SANDBOX = 'sandbox';

export interface SandboxSpecT {
  image: string;
  isolation: 'container' | 'gvisor' | 'microvm';
  resources?: { cpuMillis?: number | undefined; memoryMiB?: number | undefined; pids?: number | undefined } | undefined;
  env?: Record<string, string> | undefined;
  /** Life time from start (time spent paused does not count); the sandbox is killed when it passes. */
  timeoutMs: number;
  /** Desired state: paused = every process frozen, memory kept, no CPU used. */
  state?: 'running' | 'paused';
  /** Start from this template (a snapshot of another sandbox) instead of booting the image. */
  template?: string;
  /** Default: the project's network with egress deny-all. */
  network?: { mode?: 'project' | 'none'; egress?: EgressPolicy | undefined } | undefined;
  /** Ports served through the ingress as preview URLs; private ones need the sandbox's access token. */
  ports?: { port: number; public: boolean }[] | undefined;
  /** Pause by itself after idleMs without API activity (commands, files, terminals); the next call resumes it. */
  autoPause?: { idleMs: number } | undefined;
}

export const SANDBOXTEMPLATE = 'sandboxtemplate';
export interface SandboxTemplateSpecT {
  fromSandbox: string;
  image: string;
  isolation: SandboxSpecT['isolation'];
  resources?: SandboxSpecT['resources'];
}
export interface SandboxTemplateStatusT {
  phase: 'ready' | 'failed';
  /** Driver snapshot folder, owned by the template (removed with it). */
  dir?: string;
  snapshotMs?: number;
  bytes?: number;
  message?: string;
}

export interface SandboxStatusT {
  phase: 'pending' | 'starting' | 'running' | 'paused' | 'stopping' | 'stopped' | 'failed';
  pausedAt?: string;
  /** Paused by autoPause (not by a caller): the next command, file or terminal call resumes it. */
  autoPaused?: boolean;
  /** Time spent paused so far (added to the life time). */
  pausedTotalMs?: number;
  startedAt?: string;
  expiresAt?: string;
  finishedAt?: string;
  reason?: string;
  message?: string;
  pid?: number;
  task?: TaskHandle | null;
  network?: { ip: string; dnsName: string } | undefined;
  /** Token that opens the sandbox's private preview URLs (header x-berth-token or ?berth_token=). */
  accessToken?: string;
  /** Runs at the lowest CPU priority (an unclaimed warm-pool member); internal, not shown. */
  background?: boolean;
}

export type SandboxResource = Resource<SandboxSpecT, SandboxStatusT>;

/**
 * API activity per sandbox (in memory: after a daemon restart a sandbox counts as active from the
 * moment it is first seen). The API touches a sandbox on every command, file and terminal call and
 * holds it busy while a command's or terminal's stream is open; autoPause acts on what it records.
 */
export class SandboxActivity {
  private readonly last = new Map<string, number>();
  private readonly busy = new Map<string, number>();

  touch(id: string): void {
    this.last.set(id, Date.now());
  }

  /** Marks a stream open; the returned function closes it (idempotent); then kick the reconciler. */
  hold(id: string): () => void {
    this.touch(id);
    this.busy.set(id, (this.busy.get(id) ?? 0) + 1);
    let done = false;
    return () => {
      if (done) return;
      done = true;
      this.touch(id);
      const n = (this.busy.get(id) ?? 1) - 1;
      if (n > 0) this.busy.set(id, n);
      else this.busy.delete(id);
    };
  }

  /** When the sandbox was last used (first seen: now); Infinity while a stream is open. */
  lastUsed(id: string): number {
    if (this.busy.has(id)) return Infinity;
    if (!this.last.has(id)) this.touch(id);
    return this.last.get(id)!;
  }

  forget(id: string): void {
    this.last.delete(id);
    this.busy.delete(id);
  }
}

export const sandboxActivity = new SandboxActivity();


export const initialSandboxStatus = (): SandboxStatusT => ({ phase: 'pending', accessToken: randomBytes(24).toString('base64url') });

/** The host name of a sandbox port's preview URL: `<port>-<sandbox>.<project>.<base-domain>`. */
export const previewHost = (ingress: Pick<Ingress, 'hostFor'>, project: string, name: string, port: number) => ingress.hostFor(`${port}-${name}`, project);

/**
 * Ingress routes of the sandboxes' exposed ports (a route provider): to the sandbox's address
 * while it runs (a paused or starting sandbox has none: the ingress answers 503).
 */
export function sandboxRoutes(store: ResourceStore, ingress: Pick<Ingress, 'hostFor'>): IngressRoute[] {
  const out: IngressRoute[] = [];
  for (const s of store.list<SandboxSpecT, SandboxStatusT>(SANDBOX, { limit: 10_000 }).items) {
    if (!s.spec.ports?.length || s.deletionRequestedAt) continue;
    const ip = s.status.phase === 'running' ? s.status.network?.ip : undefined;
    for (const p of s.spec.ports) {
      out.push({
        id: `sandbox/${s.project}/${s.name}/${p.port}`,
        hosts: [previewHost(ingress, s.project, s.name, p.port)],
        backends: ip ? [{ address: ip, port: p.port }] : [],
        tls: 'local',
        ...(p.public || !s.status.accessToken ? {} : { auth: { token: s.status.accessToken } }),
      });
    }
  }
  return out;
}

export function makeSandboxReconciler(deps: { store: ResourceStore; drivers: DriverRegistry; images: ImageCatalog; log: Logger }) {
  const { store, drivers, images, log } = deps;

  return async function reconcileSandbox(id: string): Promise<ReconcileResult | void> {
    const s = store.getById<SandboxSpecT, SandboxStatusT>(id);
    if (!s || s.kind !== SANDBOX) return;
    let st: SandboxStatusT = { ...s.status };
    const save = (patch: Partial<SandboxStatusT>, observedGeneration?: number) => {
      st = { ...st, ...patch };
      for (const k of Object.keys(st) as (keyof SandboxStatusT)[]) if (st[k] === undefined) delete st[k];
      store.updateStatus(id, st, observedGeneration);
    };
    const driver = drivers.get(s.spec.isolation);
    const taskDriver = st.task ? drivers.byName(st.task.driver) ?? driver : driver;
    /** Stop (SIGKILL: a sandbox has nothing to shut down gracefully) and free every host resource. */
    const end = async (phase: 'stopped' | 'failed', reason: string, message: string) => {
      if (st.phase === 'paused' && st.task) await taskDriver?.resume?.(st.task).catch(() => undefined); // a frozen task cannot die
      if (st.task && taskDriver) {
        if (st.phase !== 'stopping') save({ phase: 'stopping' });
        await taskDriver.stop(st.task, { timeoutMs: 2000, signal: 'SIGKILL' }).catch(() => undefined);
      }
      if (taskDriver) await taskDriver.destroy(id, { force: true });
      save({ phase, task: null, pid: undefined, network: undefined, reason, message, finishedAt: new Date().toISOString() }, s.generation);
      store.addEvent(id, reason, message, phase === 'failed' ? 'Warning' : 'Normal');
    };

    if (s.deletionRequestedAt) {
      if (st.task && taskDriver && (await taskDriver.inspect(st.task)).state === 'running') {
        if (st.phase === 'paused') await taskDriver.resume?.(st.task).catch(() => undefined);
        await taskDriver.stop(st.task, { timeoutMs: 2000, signal: 'SIGKILL' }).catch(() => undefined);
      }
      for (const d of drivers.all()) await d.destroy(id, { force: true });
      store.remove(id);
      sandboxActivity.forget(id);
      log.info({ sandbox: s.name, project: s.project, id }, 'sandbox deleted');
      return;
    }
    if (st.phase === 'stopped' || st.phase === 'failed') return;


    if (st.task || st.phase === 'starting' || st.phase === 'stopping') {
      if (!taskDriver) return end('failed', 'IsolationUnavailable', `no driver for isolation "${s.spec.isolation}"`);
      const handle: TaskHandle = st.task ?? { driver: taskDriver.name, id, pid: 0, startedAt: new Date().toISOString(), state: { sandbox: true } };
      const obs = st.task && st.phase !== 'starting' ? await taskDriver.inspect(handle) : await taskDriver.recover(handle);
      if (obs.state !== 'running') {
        const why = obs.exit ? exitReason(obs.exit) : 'the sandbox is gone';
        return end('failed', obs.exit?.oomKilled ? 'OOMKilled' : 'Died', `the sandbox's agent ended: ${why}`);
      }
      if (!st.task || st.phase === 'starting') {
        save({ phase: 'running', task: handle, pid: obs.pid ?? handle.pid, startedAt: st.startedAt ?? handle.startedAt, network: networkStatus(handle, s.name, s.project) });
        store.addEvent(id, 'Adopted', 'running sandbox adopted after a daemon restart');
      }
      if (st.background && !s.labels[POOL_LABEL]) {
        // Claimed (the API lowered it already; this covers a claim that a crash interrupted).
        taskDriver.setBackground?.(id, false);
        save({ background: undefined });
      }
      const want = s.spec.state ?? 'running';
      const pause = async (auto: boolean) => {
        const t0 = performance.now();
        const at = new Date().toISOString(); // before freezing: a call that comes meanwhile wakes it again
        await taskDriver.pause!(st.task!);
        save({ phase: 'paused', pausedAt: at, expiresAt: undefined, autoPaused: auto || undefined }, s.generation);
        store.addEvent(id, auto ? 'AutoPaused' : 'Paused', `processes frozen in ${(performance.now() - t0).toFixed(1)} ms${auto ? ` after ${s.spec.autoPause!.idleMs} ms without activity` : ''}`);
      };
      if (want === 'paused' && st.phase !== 'paused') {
        if (!taskDriver.pause) return void save({ message: `isolation "${s.spec.isolation}" cannot pause` }, s.generation);
        await pause(false);
        return;
      }
      if (want === 'paused' && st.autoPaused) save({ autoPaused: undefined }, s.generation); // now paused by the caller
      // Auto-paused: stays so until a call comes (the API touches the sandbox, then kicks this).
      const woken = !st.autoPaused || (st.pausedAt !== undefined && sandboxActivity.lastUsed(id) >= Date.parse(st.pausedAt));
      if (want === 'running' && st.phase === 'paused' && woken) {
        const t0 = performance.now();
        await taskDriver.resume!(st.task!);
        const pausedMs = st.pausedAt ? Date.now() - Date.parse(st.pausedAt) : 0;
        save({ phase: 'running', pausedAt: undefined, autoPaused: undefined, pausedTotalMs: (st.pausedTotalMs ?? 0) + pausedMs });
        store.addEvent(id, 'Resumed', `resumed in ${(performance.now() - t0).toFixed(1)} ms after ${pausedMs} ms paused`);
      }
      if (st.phase === 'paused') {
        if (s.observedGeneration < s.generation) save({}, s.generation);
        return; // the clock stops while paused
      }
      const exp = Date.parse(st.startedAt!) + s.spec.timeoutMs + (st.pausedTotalMs ?? 0);
      const expIso = new Date(exp).toISOString();
      if (st.expiresAt !== expIso || s.observedGeneration < s.generation) save({ expiresAt: expIso }, s.generation);
      if (Date.now() >= exp) return end('stopped', 'Timeout', `killed after its timeout of ${s.spec.timeoutMs} ms`);
      // While a stream is open lastUsed is Infinity: the API kicks this again when it closes.
      if (s.spec.autoPause && taskDriver.pause) {
        const idleAt = sandboxActivity.lastUsed(id) + s.spec.autoPause.idleMs;
        if (Date.now() >= idleAt) {
          await pause(true);
          return { requeueAfterMs: 0 }; // a call that came while freezing wakes it at once
        }
        if (idleAt < exp) return { requeueAfterMs: idleAt - Date.now() };
      }
      return { requeueAfterMs: exp - Date.now() };
    }

    // No task yet: start one.
    if (!driver) return end('failed', 'IsolationUnavailable', `no driver for isolation "${s.spec.isolation}" on this host`);
    traceMark(id, 'reconcile.start');
    save({ phase: 'starting' }, s.generation);
    let handle: TaskHandle;
    try {
      let restoreFrom: string | undefined;
      if (s.spec.template) {
        const tpl = store.find<SandboxTemplateSpecT, SandboxTemplateStatusT>(SANDBOXTEMPLATE, s.project, s.spec.template);
        if (!tpl?.status.dir || tpl.status.phase !== 'ready') throw new Error(`template "${s.spec.template}" is not ready`);
        restoreFrom = tpl.status.dir;
      }
      const img = await images.resolve(s.spec.image);
      handle = await driver.start({
        ...(restoreFrom ? { restoreFrom } : {}),
        id,
        imageRootfs: img.rootfs,
        imageDigest: img.digest,
        args: [],
        env: { ...img.config.env, ...(s.spec.env ?? {}) },
        cwd: '/',
        user: { uid: 0, gid: 0 },
        resources: s.spec.resources ?? {},
        hostname: s.name,
        labels: s.labels,
        sandbox: true,
        ...(s.labels[POOL_LABEL] ? { background: true } : {}),
        ...netOf(taskNetworkFor(s.spec, s.project, s.name, { policy: 'deny-all' })),
      });
    } catch (e) {
      const msg = isBerthError(e) ? e.message : (e as Error).message;
      log.warn({ sandbox: s.name, project: s.project, err: msg }, 'sandbox failed to start');
      await driver.destroy(id, { force: true }).catch(() => undefined);
      save({ phase: 'failed', task: null, reason: 'FailedStart', message: msg, finishedAt: new Date().toISOString() }, s.generation);
      store.addEvent(id, 'FailedStart', msg, 'Warning');
      return;
    }
    if (s.labels[POOL_LABEL]) {
      const warmed = await warmUp(driver, id, s.spec.env?.PATH ?? DEFAULT_PATH, log);
      if (warmed) store.addEvent(id, 'Warmed', warmed);
    }
    const exp = Date.parse(handle.startedAt) + s.spec.timeoutMs;
    save({ phase: 'running', task: handle, pid: handle.pid, startedAt: handle.startedAt, expiresAt: new Date(exp).toISOString(), network: networkStatus(handle, s.name, s.project), ...(s.labels[POOL_LABEL] && driver.setBackground ? { background: true } : {}) }, s.generation);
    traceMark(id, 'reconcile.running');
    store.addEvent(id, 'Started', `sandbox started (isolation ${s.spec.isolation}, pid ${handle.pid})`);
    return { requeueAfterMs: Math.max(0, exp - Date.now()) };
  };
}

/**
 * A warm-pool member runs a trivial command (`sh -c 'echo warm'`, found through PATH like a caller's
 * command) three times through its agent before it counts as ready, so that the first command of whoever
 * claims it finds the agent's connection open and the common paths warm: the agent's fork/exec and its
 * stdout relay, the shell's pages and, in a microVM under TCG, the translated code of all of these.
 * Measured in a fresh microVM: the first command took 300–600 ms without it; with `/bin/sh -c :` the
 * claimed sandbox's first `echo` still took ~45 ms (PATH lookup and output path cold), with this ~20 ms
 * (later commands ~10–20 ms). An image without a shell just skips the runs.
 *
 * Then it lists every directory on the sandbox's PATH (the agent reads each whole and lstat()s every
 * entry), so that finding any program by name reads nothing from disk: a directory of hundreds of
 * entries is hashed (ext4 htree), a lookup reads only the block its name hashes to, so the warm-up's
 * `sh` left the blocks of other names cold, and each cold block or inode is a virtio-blk read. Measured
 * in the agent of a claimed microVM (TCG): the first by-name lookup of another program took 7–12 ms
 * (a negative lookup in /usr/sbin 3.5 ms, /bin 5–6 ms), later ones 0.5–0.7 ms. A program that has not
 * run yet still pays reading its own binary the first time.
 */
async function warmUp(driver: NonNullable<ReturnType<DriverRegistry['get']>>, id: string, path: string, log: Logger): Promise<string | undefined> {
  if (!driver.agent) return undefined;
  const t0 = performance.now();
  const agent = await driver.agent(id, 5000).catch((e: unknown) => void log.debug({ sandbox: id, err: (e as Error).message }, 'warm-pool member: no agent to warm up (ignored)'));
  let runs = 0;
  const listed: string[] = [];
  if (agent) {
    try {
      for (; runs < WARMUP_RUNS; runs++) {
        await agent.request({ id: `warmup-${runs}`, type: 'run', args: ['sh', '-c', 'echo warm'], env: {}, cwd: '/', stdin: false }, 10_000);
      }
    } catch (e) {
      log.debug({ sandbox: id, err: (e as Error).message }, 'warm-pool member: warm-up run failed (ignored)');
    }
    // (A directory the image lacks answers not_found: nothing to warm.)
    for (const dir of new Set(path.split(':').filter((d) => d.startsWith('/')))) {
      let n = 0;
      const count = (f: AgentFrame) => void (n += Array.isArray(f.entries) ? f.entries.length : 0);
      if (await agent.request({ type: 'file.list', path: dir }, 10_000, undefined, count).then(() => true, () => false)) listed.push(`${dir} (${n})`);
    }
  }
  return `warm-up in ${(performance.now() - t0).toFixed(0)} ms: ${runs} of ${WARMUP_RUNS} runs of sh -c 'echo warm'; PATH directories listed: ${listed.join(', ') || 'none'}`;
}
// Measured in fresh microVMs, `echo` back to back: the 1st run ~230–280 ms, the 2nd ~85–110, the 3rd
// ~17–22, the 4th ~12–21. The warm-pool claim (bench:sandboxes --tiers microvm --runs 30 --warm-only,
// interleaved): 2 warm-ups 33.6 / 31.5 ms, 3 warm-ups 30.5 / 30.0 / 30.0 / 31.1 ms, 5 warm-ups 31.3 /
// 34.7 ms. Each warm-up costs a booting member ~20–100 ms more at background priority.
const WARMUP_RUNS = 3;

