// When the ingress's HAProxy busy-polls (its `busy-polling` setting: the poller never sleeps, it
// asks again at once). Measured on this project's hosts (VMs whose idle vCPUs are descheduled, so every
// sleep → wake-up of the proxy is expensive): behind a busybox replica, throughput through the ingress
// 79.0–79.7 % of direct without it, 98.6–99.5 % with it (BENCHMARKS.md "Ingress"). The price is a core
// that spins while the proxy has nothing to do, so by default ("auto") it is on only under sustained load
// and off again once the load is gone: this governor decides, from the proxy's request counter.

export type BusyPollMode = 'auto' | 'on' | 'off';
export const BUSY_POLL_MODES: readonly BusyPollMode[] = ['auto', 'on', 'off'];

export interface BusyPollPolicy {
  /** How often the request counter is read. */
  sampleMs: number;
  /** On after `onSamples` samples in a row at ≥ `onRps` requests per second… */
  onRps: number;
  onSamples: number;
  /** …off after `offSamples` samples in a row below `offRps`. */
  offRps: number;
  offSamples: number;
}

/**
 * Defaults: on after 3 s at ≥ 2,000 req/s (a load at which the proxy would otherwise sleep and wake
 * thousands of times a second), off after 30 s below 500 req/s — longer than a pause between two
 * load runs, so that it does not flap (each change is a seamless reload).
 */
export const DEFAULT_BUSY_POLL_POLICY: BusyPollPolicy = { sampleMs: 1_000, onRps: 2_000, onSamples: 3, offRps: 500, offSamples: 30 };

export class BusyPollGovernor {
  private on = false;
  private streak = 0;
  private last: { count: number; at: number } | undefined;

  constructor(readonly policy: BusyPollPolicy = DEFAULT_BUSY_POLL_POLICY) {}

  get busy(): boolean {
    return this.on;
  }

  /**
   * One reading of the proxy's cumulative request count (undefined: could not be read) at time `at`
   * (ms). Returns true when the decision flips. A counter that went down belongs to a new worker (a
   * reload or a restart): it starts a new baseline and says nothing about the rate.
   */
  sample(count: number | undefined, at: number): boolean {
    const prev = this.last;
    this.last = count === undefined ? undefined : { count, at };
    if (count === undefined || !prev || count < prev.count || at <= prev.at) {
      return false;
    }
    const rps = ((count - prev.count) * 1000) / (at - prev.at);
    const towardsFlip = this.on ? rps < this.policy.offRps : rps >= this.policy.onRps;
    this.streak = towardsFlip ? this.streak + 1 : 0;
    if (this.streak < (this.on ? this.policy.offSamples : this.policy.onSamples)) return false;
    this.on = !this.on;
    this.streak = 0;
    return true;
  }
}
