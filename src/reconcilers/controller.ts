// A level-triggered controller in the style of controller-runtime: work items are resource ids
// (never events); an id queued many times is reconciled once; the same id is never reconciled
// twice at the same time; errors requeue with per-id exponential back-off; a result may ask for
// a timed requeue (`requeueAfterMs`) for scheduled work.
import type { Logger } from 'pino';
import { isBerthError } from '../core/errors.js';

export interface ReconcileResult {
  requeueAfterMs?: number;
}

export type Reconciler = (id: string) => Promise<ReconcileResult | void>;

export interface ControllerOptions {
  name: string;
  reconcile: Reconciler;
  log: Logger;
  concurrency?: number;
  baseBackoffMs?: number;
  maxBackoffMs?: number;
}

export class Controller {
  private readonly queue: string[] = [];
  private readonly queued = new Set<string>();
  private readonly active = new Set<string>();
  /** Ids that were enqueued while being reconciled: run again right after. */
  private readonly dirty = new Set<string>();
  private readonly timers = new Map<string, { at: number; t: NodeJS.Timeout }>();
  private readonly failures = new Map<string, number>();
  private running = 0;
  private stopped = false;
  private idleWaiters: Array<() => void> = [];
  readonly name: string;

  constructor(private readonly opts: ControllerOptions) {
    this.name = opts.name;
  }

  enqueue(id: string): void {
    if (this.stopped) return;
    if (this.active.has(id)) {
      this.dirty.add(id);
      return;
    }
    if (this.queued.has(id)) return;
    this.queued.add(id);
    this.queue.push(id);
    this.pump();
  }

  /** Requeue after a delay; an earlier pending timer for the same id wins. */
  enqueueAfter(id: string, delayMs: number): void {
    if (this.stopped) return;
    const at = Date.now() + delayMs;
    const cur = this.timers.get(id);
    if (cur && cur.at <= at) return;
    if (cur) clearTimeout(cur.t);
    const t = setTimeout(() => {
      this.timers.delete(id);
      this.enqueue(id);
    }, Math.max(0, delayMs));
    t.unref();
    this.timers.set(id, { at, t });
  }

  private pump(): void {
    const max = this.opts.concurrency ?? 8;
    while (!this.stopped && this.running < max && this.queue.length > 0) {
      const id = this.queue.shift()!;
      this.queued.delete(id);
      this.active.add(id);
      this.running++;
      void this.runOne(id);
    }
  }

  private async runOne(id: string): Promise<void> {
    try {
      const res = await this.opts.reconcile(id);
      this.failures.delete(id);
      if (res?.requeueAfterMs !== undefined) this.enqueueAfter(id, res.requeueAfterMs);
    } catch (e) {
      const n = (this.failures.get(id) ?? 0) + 1;
      this.failures.set(id, n);
      const base = this.opts.baseBackoffMs ?? 200;
      const delay = Math.min(base * 2 ** (n - 1), this.opts.maxBackoffMs ?? 60_000);
      this.opts.log.warn(
        { controller: this.name, id, attempt: n, retryInMs: delay, err: isBerthError(e) ? e.message : e },
        'reconcile failed; will retry',
      );
      this.enqueueAfter(id, delay);
    } finally {
      this.active.delete(id);
      this.running--;
      if (this.dirty.delete(id)) this.enqueue(id);
      this.pump();
      if (this.running === 0 && this.queue.length === 0) {
        const w = this.idleWaiters;
        this.idleWaiters = [];
        w.forEach((f) => f());
      }
    }
  }

  /** Resolves when nothing is queued or running (timers may still be pending). */
  idle(): Promise<void> {
    if (this.running === 0 && this.queue.length === 0) return Promise.resolve();
    return new Promise((r) => this.idleWaiters.push(r));
  }

  async stop(): Promise<void> {
    this.stopped = true;
    for (const { t } of this.timers.values()) clearTimeout(t);
    this.timers.clear();
    this.queue.length = 0;
    this.queued.clear();
    while (this.running > 0) await new Promise((r) => setTimeout(r, 10));
  }
}
