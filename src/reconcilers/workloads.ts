// Workload reconciler: drives the host towards a workload's spec and records what it observes
// in status. Level-triggered and keyed by workload id: it reads the spec, asks the driver what
// the task is really doing, and acts on the difference — so the same code handles a fresh
// create, an exit, a spec change, a stop, a delete, and adoption after a daemon crash.
import { createHash } from 'node:crypto';
import type { Logger } from 'pino';
import type { DriverRegistry, ExitResult, TaskConfig, TaskHandle, TaskNetwork } from '../core/driver.js';
import { taskNetworkFor } from '../network/manager.js';
import { BerthError, isBerthError } from '../core/errors.js';
import type { ImageCatalog } from '../images/catalog.js';
import { resolveUser } from '../images/catalog.js';
import type { Resource, ResourceStore } from '../store/resources.js';
import type { WorkloadSpec, WorkloadStatusT } from '../api/schemas.js';
import type { ReconcileResult } from './controller.js';

export const WORKLOAD = 'workload';

/** Status as stored: the API view plus driver-private bookkeeping. */
export interface StoredWorkloadStatus extends WorkloadStatusT {
  task?: TaskHandle | null;
  taskSpecHash?: string;
}

export type WorkloadResource = Resource<WorkloadSpec, StoredWorkloadStatus>;

export const initialWorkloadStatus = (): StoredWorkloadStatus => ({ phase: 'pending', restartCount: 0 });

export interface WorkloadDeps {
  store: ResourceStore;
  drivers: DriverRegistry;
  images: ImageCatalog;
  log: Logger;
  restartBackoff?: { initialMs: number; maxMs: number; resetAfterMs: number };
}

/** Only the fields that change what runs; a change to them restarts the task. */
export function taskSpecHash(s: WorkloadSpec): string {
  const { image, command, args, env, workingDir, user, resources, isolation, network } = s;
  return createHash('sha256').update(JSON.stringify({ image, command, args, env, workingDir, user, resources, isolation, network })).digest('hex').slice(0, 16);
}

export function exitReason(e: ExitResult): string {
  if (e.oomKilled) return 'OOMKilled';
  if (e.exitCode < 0) return 'Lost';
  return e.signal ? `exited ${e.exitCode} (${e.signal})` : `exited ${e.exitCode}`;
}

/** Status fields after the task has ended and its runtime resources are gone. */
function exitedStatus(exit: ExitResult, reason: string): Partial<StoredWorkloadStatus> {
  return {
    task: null,
    pid: undefined,
    monitorPid: undefined,
    exitCode: exit.exitCode,
    signal: exit.signal,
    oomKilled: exit.oomKilled,
    finishedAt: exit.finishedAt,
    reason,
  };
}

/** What the status shows of a task's network. */
export const networkStatus = (h: TaskHandle, name: string, project: string) => (h.network ? { ip: h.network.ip, dnsName: `${name}.${project}.internal` } : undefined);

/** `{ network }` when the task is networked (exactOptionalPropertyTypes: no `network: undefined`). */
export const netOf = (n: TaskNetwork | undefined): { network?: TaskNetwork } => (n ? { network: n } : {});

export function makeWorkloadReconciler(deps: WorkloadDeps) {
  const { store, drivers, images, log } = deps;
  const backoff = deps.restartBackoff ?? { initialMs: 1000, maxMs: 300_000, resetAfterMs: 600_000 };

  async function buildTaskConfig(w: WorkloadResource): Promise<TaskConfig> {
    const img = await images.resolve(w.spec.image);
    store.addEvent(w.id, 'Pulled', `image ${img.ref} (${img.digest.slice(0, 19)}) is present`);
    const args = [...(w.spec.command ?? img.config.entrypoint), ...(w.spec.args ?? (w.spec.command ? [] : img.config.cmd))];
    if (args.length === 0) throw new BerthError('invalid_argument', 'the workload has no command: set spec.command or spec.args');
    const user = resolveUser(img.rootfs, w.spec.user ?? img.config.user);
    return {
      id: w.id,
      imageRootfs: img.rootfs,
      imageDigest: img.digest,
      args,
      env: { ...img.config.env, ...(w.spec.env ?? {}) },
      cwd: w.spec.workingDir ?? img.config.workingDir ?? '/',
      user,
      resources: w.spec.resources ?? {},
      hostname: w.name,
      labels: w.labels,
      ...netOf(taskNetworkFor(w.spec, w.project, w.name, { policy: 'allow-all' })),
    };
  }

  return async function reconcileWorkload(id: string): Promise<ReconcileResult | void> {
    const w = store.getById<WorkloadSpec, StoredWorkloadStatus>(id);
    if (!w || w.kind !== WORKLOAD) return;
    let st: StoredWorkloadStatus = { ...w.status };
    const save = (patch: Partial<StoredWorkloadStatus>, observedGeneration?: number) => {
      st = { ...st, ...patch };
      for (const k of Object.keys(st) as (keyof StoredWorkloadStatus)[]) if (st[k] === undefined) delete st[k];
      store.updateStatus(id, st, observedGeneration);
    };
    const driver = drivers.get(w.spec.isolation);
    const taskDriver = st.task ? drivers.byName(st.task.driver) ?? driver : driver;

    // 1. Deletion: stop and remove every host resource, then the record (finalizer semantics).
    if (w.deletionRequestedAt) {
      if (st.task && taskDriver) {
        const obs = await taskDriver.inspect(st.task);
        if (obs.state === 'running') {
          if (st.phase !== 'stopping') save({ phase: 'stopping' });
          await taskDriver.stop(st.task, { timeoutMs: w.spec.stopTimeoutMs, signal: w.spec.stopSignal });
        }
      }
      // Every driver: a change of isolation may have left the old tier's layer and logs behind.
      for (const d of drivers.all()) await d.destroy(id);
      store.remove(id);
      log.info({ workload: w.name, project: w.project, id }, 'workload deleted');
      return;
    }

    // 2. A task exists (or may exist after a crash during start): observe it.
    if ((st.task || st.phase === 'starting' || st.phase === 'stopping') && taskDriver) {
      const handle: TaskHandle = st.task ?? { driver: taskDriver.name, id, pid: 0, startedAt: new Date().toISOString() };
      const obs = st.task && st.phase !== 'starting' ? await taskDriver.inspect(handle) : await taskDriver.recover(handle);
      if (obs.state === 'running') {
        if (!st.task || st.phase === 'starting') {
          const adopted = { ...handle, pid: obs.pid ?? handle.pid, ...(obs.monitorPid ? { monitorPid: obs.monitorPid } : {}) };
          save({ phase: 'running', task: adopted, pid: adopted.pid, monitorPid: adopted.monitorPid, startedAt: st.startedAt ?? adopted.startedAt, taskSpecHash: st.taskSpecHash ?? taskSpecHash(w.spec), network: networkStatus(adopted, w.name, w.project) });
          store.addEvent(id, 'Adopted', `running task (pid ${adopted.pid}) adopted after a daemon restart`);
        }
        const mustStop = w.spec.state === 'stopped' || st.taskSpecHash !== taskSpecHash(w.spec);
        if (!mustStop) {
          if (st.phase !== 'running') save({ phase: 'running' });
          return;
        }
        save({ phase: 'stopping' });
        const exit = await taskDriver.stop(st.task!, { timeoutMs: w.spec.stopTimeoutMs, signal: w.spec.stopSignal });
        store.addEvent(id, 'Stopped', `${w.spec.state === 'stopped' ? 'stopped on request' : 'stopped to apply a spec change'}: ${exitReason(exit)}`);
        await taskDriver.destroy(id, { keepData: true });
        save({ ...exitedStatus(exit, w.spec.state === 'stopped' ? 'Stopped' : 'SpecChanged'), phase: w.spec.state === 'stopped' ? 'stopped' : 'pending', network: undefined }, w.generation);
        return { requeueAfterMs: 0 };
      }
      // Exited (or vanished): record it once, free the runtime resources, then apply the restart policy.
      const exit: ExitResult = obs.exit ?? { exitCode: -1, oomKilled: false, finishedAt: new Date().toISOString() };
      if (st.task) {
        store.addEvent(id, exit.oomKilled ? 'OOMKilled' : 'Exited', exit.oomKilled ? `OOMKilled: memory limit ${w.spec.resources?.memoryMiB ?? '?'} MiB reached (exit ${exit.exitCode})` : exitReason(exit), exit.exitCode === 0 ? 'Normal' : 'Warning');
      }
      await taskDriver.destroy(id, { keepData: true });
      if (st.network) save({ network: undefined });
      const ranMs = st.startedAt ? Date.parse(exit.finishedAt) - Date.parse(st.startedAt) : 0;
      const base = exitedStatus(exit, exit.oomKilled ? 'OOMKilled' : exit.exitCode < 0 ? 'Lost' : st.phase === 'stopping' ? 'Stopped' : 'Exited');
      if (w.spec.state === 'stopped' || st.phase === 'stopping') {
        save({ ...base, phase: 'stopped' }, w.generation);
        return;
      }
      const restart = w.spec.restartPolicy === 'always' || (w.spec.restartPolicy === 'on-failure' && exit.exitCode !== 0);
      if (restart) {
        const count = ranMs > backoff.resetAfterMs ? 1 : st.restartCount + 1;
        const delay = Math.min(backoff.initialMs * 2 ** (count - 1), backoff.maxMs);
        save({ ...base, phase: 'backoff', restartCount: count, nextRestartAt: new Date(Date.now() + delay).toISOString() });
        store.addEvent(id, 'BackOff', `restarting in ${delay} ms (restart ${count}, policy ${w.spec.restartPolicy})`);
        return { requeueAfterMs: delay };
      }
      save({ ...base, phase: exit.exitCode === 0 ? 'exited' : 'failed' });
      return;
    }

    // 3. No task. Decide whether to start one.
    if (w.spec.state === 'stopped') {
      if (st.phase !== 'stopped' || w.observedGeneration < w.generation) save({ phase: 'stopped', nextRestartAt: undefined }, w.generation);
      return;
    }
    if (st.phase === 'backoff' && st.nextRestartAt && w.observedGeneration >= w.generation) {
      const wait = Date.parse(st.nextRestartAt) - Date.now();
      if (wait > 0) return { requeueAfterMs: wait };
    } else if ((st.phase === 'exited' || st.phase === 'failed' || st.phase === 'stopped') && w.observedGeneration >= w.generation) {
      return; // finished; nothing new was asked for
    }
    if (!driver) {
      save({ phase: 'failed', reason: 'IsolationUnavailable', message: `no driver for isolation "${w.spec.isolation}" on this host` }, w.generation);
      return;
    }
    save({ phase: 'starting', nextRestartAt: undefined, reason: undefined, message: undefined }, w.generation);
    let handle: TaskHandle;
    try {
      const cfg = await buildTaskConfig(w);
      handle = await driver.start(cfg);
    } catch (e) {
      const msg = isBerthError(e) ? e.message : (e as Error).message;
      store.addEvent(id, 'FailedStart', msg, 'Warning');
      log.warn({ workload: w.name, project: w.project, err: msg }, 'workload failed to start');
      if (w.spec.restartPolicy !== 'never') {
        const count = st.restartCount + 1;
        const delay = Math.min(backoff.initialMs * 2 ** (count - 1), backoff.maxMs);
        save({ phase: 'backoff', task: null, restartCount: count, reason: 'FailedStart', message: msg, nextRestartAt: new Date(Date.now() + delay).toISOString() });
        return { requeueAfterMs: delay };
      }
      save({ phase: 'failed', task: null, reason: 'FailedStart', message: msg });
      return;
    }
    save({
      phase: 'running',
      task: handle,
      pid: handle.pid,
      monitorPid: handle.monitorPid,
      startedAt: handle.startedAt,
      finishedAt: undefined,
      exitCode: undefined,
      signal: undefined,
      oomKilled: undefined,
      reason: undefined,
      taskSpecHash: taskSpecHash(w.spec),
      network: networkStatus(handle, w.name, w.project),
    });
    store.addEvent(id, 'Started', `started (pid ${handle.pid})`);
    // The task may already have exited (a quick `echo`): look again right away.
    return { requeueAfterMs: 0 };
  };
}
