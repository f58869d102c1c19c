// Job and job-run reconcilers.
//
// A job is a template plus an optional cron schedule. Each execution is a job run (its own
// resource, owned by the job) and each attempt of a run is a workload (restartPolicy never,
// owned by the run), so attempts get the workload machinery for free: logs, exit codes, OOM
// reporting, crash recovery. Retries, back-off, deadlines and concurrency policy live here.
import { Cron } from 'croner';
import type { Logger } from 'pino';
import { conflict } from '../core/errors.js';
import type { Resource, ResourceStore } from '../store/resources.js';
import type { JobRunSpecT, JobRunStatusT, JobSpec, JobStatusT, WorkloadSpec } from '../api/schemas.js';
import type { ReconcileResult } from './controller.js';
import { WORKLOAD, initialWorkloadStatus, type StoredWorkloadStatus } from './workloads.js';

export const JOB = 'job';
export const JOBRUN = 'jobrun';

export interface StoredJobStatus extends JobStatusT {
  runSeq?: number;
}
export type JobResource = Resource<JobSpec, StoredJobStatus>;
export type JobRunResource = Resource<JobRunSpecT, JobRunStatusT>;

const TERMINAL_RUN = new Set(['succeeded', 'failed', 'cancelled']);
const TERMINAL_WORKLOAD = new Set(['exited', 'failed', 'stopped']);
/** How late a scheduled run may still start (after a daemon outage, for example). */
const STARTING_DEADLINE_MS = 60_000;

export interface JobDeps {
  store: ResourceStore;
  log: Logger;
}

export function isRunActive(r: JobRunResource): boolean {
  return !TERMINAL_RUN.has(r.status.phase) && !r.deletionRequestedAt;
}

/** Creates a run of the job now, applying the concurrency policy. Returns undefined if skipped. */
export function triggerRun(store: ResourceStore, jobId: string, trigger: 'manual' | 'schedule', scheduledAt?: string): JobRunResource | undefined {
  return store.db.transaction(() => {
    const job = store.getById<JobSpec, StoredJobStatus>(jobId)!;
    const runs = store.list<JobRunSpecT, JobRunStatusT>(JOBRUN, { ownerId: job.id, limit: 1000 }).items;
    const active = runs.filter(isRunActive);
    if (active.length > 0 && job.spec.concurrencyPolicy === 'forbid') {
      if (trigger === 'manual') {
        throw conflict(`job "${job.name}" already has an active run (${active.map((r) => r.name).join(', ')}) and its concurrencyPolicy is forbid; wait for it to finish, cancel it, or change the policy`);
      }
      store.addEvent(job.id, 'Skipped', `scheduled run at ${scheduledAt} skipped: ${active.map((r) => r.name).join(', ')} still active (concurrencyPolicy forbid)`);
      return undefined;
    }
    if (active.length > 0 && job.spec.concurrencyPolicy === 'replace') {
      for (const r of active) {
        store.updateSpec(r.id, { spec: { ...r.spec, cancel: true } });
        store.addEvent(job.id, 'Replaced', `run ${r.name} cancelled to start a new one (concurrencyPolicy replace)`);
      }
    }
    const seq = (job.status.runSeq ?? 0) + 1;
    store.updateStatus(job.id, { ...job.status, runSeq: seq });
    const spec: JobRunSpecT = {
      job: job.name,
      trigger,
      ...(scheduledAt ? { scheduledAt } : {}),
      template: job.spec.template,
      retries: job.spec.retries,
      retryBackoffMs: job.spec.retryBackoffMs,
      ...(job.spec.activeDeadlineMs ? { activeDeadlineMs: job.spec.activeDeadlineMs } : {}),
    };
    const run = store.create<JobRunSpecT, JobRunStatusT>(JOBRUN, {
      project: job.project,
      name: `${job.name}-${seq}`,
      labels: { 'berth.dev/job': job.name },
      spec,
      status: { phase: 'pending', attempts: [] },
      ownerId: job.id,
    });
    store.addEvent(job.id, 'RunCreated', `run ${run.name} created (${trigger}${scheduledAt ? ` for ${scheduledAt}` : ''})`);
    return run;
  })();
}

export function makeJobRunReconciler(deps: JobDeps) {
  const { store, log } = deps;
  return async function reconcileJobRun(id: string): Promise<ReconcileResult | void> {
    const run = store.getById<JobRunSpecT, JobRunStatusT>(id);
    if (!run || run.kind !== JOBRUN) return;
    const children = store.list<WorkloadSpec, StoredWorkloadStatus>(WORKLOAD, { ownerId: run.id, limit: 1000 }).items;
    if (run.deletionRequestedAt) {
      for (const c of children) if (!c.deletionRequestedAt) store.markForDeletion(c.id);
      if (children.length === 0) store.remove(run.id);
      return;
    }
    let st: JobRunStatusT = { ...run.status, attempts: [...run.status.attempts] };
    const save = (patch: Partial<JobRunStatusT>) => {
      st = { ...st, ...patch };
      store.updateStatus(run.id, st, run.generation);
    };
    const stopChild = (c: Resource<WorkloadSpec, StoredWorkloadStatus>) => {
      if (c.spec.state !== 'stopped') store.updateSpec(c.id, { spec: { ...c.spec, state: 'stopped' } });
    };
    const current = st.attempts[st.attempts.length - 1];
    const child = current ? children.find((c) => c.name === current.workload) : undefined;

    if (TERMINAL_RUN.has(st.phase)) {
      if (child && !TERMINAL_WORKLOAD.has(child.status.phase)) stopChild(child);
      return;
    }
    const finish = (phase: JobRunStatusT['phase'], reason: string, exitCode?: number) => {
      save({ phase, reason, finishedAt: new Date().toISOString(), ...(exitCode !== undefined ? { exitCode } : {}), nextAttemptAt: undefined });
      store.addEvent(run.id, phase === 'succeeded' ? 'Succeeded' : 'Failed', `run ${phase}: ${reason}`, phase === 'succeeded' ? 'Normal' : 'Warning');
      if (run.ownerId) store.emit('change', { kind: JOB, id: run.ownerId, project: run.project, ownerId: null, op: 'update' });
    };
    if (run.spec.cancel) {
      if (child && !TERMINAL_WORKLOAD.has(child.status.phase)) stopChild(child);
      finish('cancelled', 'cancelled (replaced by a newer run or on request)');
      return;
    }
    if (run.spec.activeDeadlineMs && st.startedAt) {
      const left = Date.parse(st.startedAt) + run.spec.activeDeadlineMs - Date.now();
      if (left <= 0) {
        if (child && !TERMINAL_WORKLOAD.has(child.status.phase)) stopChild(child);
        finish('failed', `DeadlineExceeded: still running after ${run.spec.activeDeadlineMs} ms`);
        return;
      }
    }

    const startAttempt = () => {
      const n = st.attempts.length + 1;
      const name = `${run.name}-a${n}`;
      const spec: WorkloadSpec = { ...run.spec.template, restartPolicy: 'never', state: 'running' };
      store.create<WorkloadSpec, StoredWorkloadStatus>(WORKLOAD, {
        project: run.project,
        name,
        labels: { 'berth.dev/job': run.spec.job, 'berth.dev/job-run': run.name },
        spec,
        status: initialWorkloadStatus(),
        ownerId: run.id,
      });
      const now = new Date().toISOString();
      save({
        phase: 'running',
        startedAt: st.startedAt ?? now,
        nextAttemptAt: undefined,
        attempts: [...st.attempts, { attempt: n, workload: name, startedAt: now }],
      });
      log.debug({ run: run.name, attempt: n }, 'job attempt started');
    };

    if (!current) {
      startAttempt();
      return deadlineRequeue(run, st);
    }
    if (!child) {
      finish('failed', `attempt workload ${current.workload} was deleted`);
      return;
    }
    if (!TERMINAL_WORKLOAD.has(child.status.phase) || child.status.exitCode === undefined && child.status.phase !== 'failed') {
      return deadlineRequeue(run, st);
    }
    // The current attempt has finished.
    if (current.finishedAt === undefined) {
      const exitCode = child.status.exitCode ?? -1;
      st.attempts[st.attempts.length - 1] = {
        ...current,
        exitCode,
        oomKilled: child.status.oomKilled ?? false,
        finishedAt: child.status.finishedAt ?? new Date().toISOString(),
      };
      save({ attempts: st.attempts });
    }
    const done = st.attempts[st.attempts.length - 1]!;
    if (done.exitCode === 0) {
      finish('succeeded', 'exited 0', 0);
      return;
    }
    if (st.attempts.length > run.spec.retries) {
      finish('failed', `${st.attempts.length} attempt(s) failed; last ${done.oomKilled ? 'OOMKilled' : `exited ${done.exitCode}`}`, done.exitCode);
      return;
    }
    if (!st.nextAttemptAt) {
      const delay = run.spec.retryBackoffMs * 2 ** (st.attempts.length - 1);
      save({ nextAttemptAt: new Date(Date.now() + delay).toISOString() });
      store.addEvent(run.id, 'BackOff', `attempt ${st.attempts.length} ${done.oomKilled ? 'OOMKilled' : `exited ${done.exitCode}`}; retrying in ${delay} ms`, 'Warning');
    }
    const wait = Date.parse(st.nextAttemptAt!) - Date.now();
    if (wait > 0) return { requeueAfterMs: wait };
    startAttempt();
    return deadlineRequeue(run, st);
  };
}

function deadlineRequeue(run: JobRunResource, st: JobRunStatusT): ReconcileResult | void {
  if (!run.spec.activeDeadlineMs || !st.startedAt) return;
  return { requeueAfterMs: Math.max(0, Date.parse(st.startedAt) + run.spec.activeDeadlineMs - Date.now()) };
}

export function makeJobReconciler(deps: JobDeps & { onRunCreated?: (id: string) => void }) {
  const { store } = deps;
  return async function reconcileJob(id: string): Promise<ReconcileResult | void> {
    const job = store.getById<JobSpec, StoredJobStatus>(id);
    if (!job || job.kind !== JOB) return;
    const runs = store
      .list<JobRunSpecT, JobRunStatusT>(JOBRUN, { ownerId: job.id, limit: 1000 })
      .items.sort((a, b) => a.createdAt.localeCompare(b.createdAt) || a.name.localeCompare(b.name, undefined, { numeric: true }));
    if (job.deletionRequestedAt) {
      for (const r of runs) if (!r.deletionRequestedAt) store.markForDeletion(r.id);
      if (runs.length === 0) store.remove(job.id);
      return;
    }
    // History: keep the newest `historyLimit` finished runs.
    const finished = runs.filter((r) => TERMINAL_RUN.has(r.status.phase) && !r.deletionRequestedAt);
    for (const r of finished.slice(0, Math.max(0, finished.length - job.spec.historyLimit))) store.markForDeletion(r.id);

    let status: StoredJobStatus = { ...job.status };
    let result: ReconcileResult | void = undefined;
    if (job.spec.schedule && !job.spec.suspend) {
      const cron = new Cron(job.spec.schedule, { timezone: job.spec.timeZone, paused: true });
      const now = Date.now();
      const from = new Date(status.lastScheduleTime ?? job.createdAt);
      // Find the most recent due time at or before now.
      let due: Date | null = null;
      for (let t = cron.nextRun(from), i = 0; t && t.getTime() <= now && i < 10_000; t = cron.nextRun(t), i++) due = t;
      if (due) {
        const late = now - due.getTime();
        status = { ...status, lastScheduleTime: due.toISOString() };
        store.updateStatus(job.id, { ...store.getById<JobSpec, StoredJobStatus>(job.id)!.status, lastScheduleTime: due.toISOString() });
        if (late <= STARTING_DEADLINE_MS) {
          const run = triggerRun(store, job.id, 'schedule', due.toISOString());
          if (run) deps.onRunCreated?.(run.id);
        } else {
          store.addEvent(job.id, 'MissedSchedule', `run due at ${due.toISOString()} not started: ${Math.round(late / 1000)} s late (starting deadline ${STARTING_DEADLINE_MS / 1000} s)`, 'Warning');
        }
      }
      const next = cron.nextRun(new Date(Math.max(now, due?.getTime() ?? 0)));
      if (next) {
        status.nextScheduleTime = next.toISOString();
        result = { requeueAfterMs: Math.max(0, next.getTime() - Date.now()) };
      }
    } else {
      delete status.nextScheduleTime;
    }
    const fresh = store.getById<JobSpec, StoredJobStatus>(job.id)!;
    const current = store.list<JobRunSpecT, JobRunStatusT>(JOBRUN, { ownerId: job.id, limit: 1000 }).items;
    const lastRun = current.sort((a, b) => a.createdAt.localeCompare(b.createdAt)).at(-1);
    const next: StoredJobStatus = {
      ...fresh.status,
      active: current.filter(isRunActive).map((r) => r.name),
      ...(status.lastScheduleTime ? { lastScheduleTime: status.lastScheduleTime } : {}),
      ...(lastRun ? { lastRun: lastRun.name, lastRunPhase: lastRun.status.phase } : {}),
    };
    if (status.nextScheduleTime) next.nextScheduleTime = status.nextScheduleTime;
    else delete next.nextScheduleTime;
    if (JSON.stringify(next) !== JSON.stringify(fresh.status) || fresh.observedGeneration !== fresh.generation) {
      store.updateStatus(job.id, next, fresh.generation);
    }
    return result;
  };
}
