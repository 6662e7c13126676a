/**
 * What the postcopy scenarios of `vmig bench` report: per run, what the guest felt (faults,
 * time blocked, fault latency) and what it got done while pages were missing against the
 * same writers with no migration; at the end, the medians per scenario and, when both ran,
 * preempt on against off (issue 20's goals).
 */

/** The destination's guest in the postcopy scenarios: the source's writers, run on after the switch. */
export interface PostcopyGuest {
  writers: number;
  /** Bytes dirtied per second across all writers. */
  dirtyRate: number;
  hotPages: number;
}

/** One run's figures (the bench line's `postcopy` part). */
export type PostcopyFigures = Record<string, unknown> & {
  faults?: number;
  blocktimeMs?: number;
  vcpuBlocktimeMs?: number[];
  faultLatencyP99Ms?: number;
  guestWritesPerSecond?: number;
  noMigrationWritesPerSecond?: number;
};

/** The bench line's `postcopy` part, from the two reports and the no-migration write rate. */
export function postcopyFigures(pc: Record<string, any>, src: Record<string, any> | undefined, noMigrationWritesPerSecond: number | undefined): PostcopyFigures {
  const wps = pc['writesPerSecondWhileMissing'] as number | undefined;
  return {
    postcopyBytes: src?.['ram']?.postcopyBytes,
    pagesAfterSwitch: pc['postcopyPages'],
    requests: pc['postcopyRequests'],
    faults: pc['faults'],
    faultLatencyP50Ms: pc['faultLatencyP50Ms'],
    faultLatencyP99Ms: pc['faultLatencyP99Ms'],
    faultLatencyMaxMs: pc['faultLatencyMaxMs'],
    blocktimeMs: pc['postcopyBlocktimeMs'],
    vcpuBlocktimeMs: pc['postcopyVcpuBlocktimeMs'],
    destinationWrites: pc['writes'],
    // The guest's progress: from RUN until the last missing page was placed.
    pagesMissingMs: pc['pagesMissingMs'],
    writesWhileMissing: pc['writesWhileMissing'],
    guestWritesPerSecond: wps,
    noMigrationWritesPerSecond,
    guestProgress: wps !== undefined && noMigrationWritesPerSecond ? round(wps / noMigrationWritesPerSecond, 3) : undefined,
    ...(pc['preemptReader'] ? { preemptReader: pc['preemptReader'], preemptPagesByVcpus: pc['preemptPagesByVcpus'], preemptPagesByThread: pc['preemptPagesByThread'] } : {}),
    ...(pc['scheduling'] ? { scheduling: { source: src?.['postcopyScheduling'], destination: pc['scheduling'] } } : {}),
  };
}

interface Medians {
  faults: number;
  /** Per vCPU, the mean of their blocked times. */
  vcpuBlockedMs: number;
  blocktimeMs: number;
  faultLatencyP99Ms: number;
  guestWritesPerSecond: number;
  noMigrationWritesPerSecond: number;
}

/** The postcopy runs of one bench invocation, by scenario. */
export class PostcopySeries {
  private readonly runs = new Map<string, PostcopyFigures[]>();

  add(scenario: string, f: PostcopyFigures): void {
    const list = this.runs.get(scenario) ?? [];
    list.push(f);
    this.runs.set(scenario, list);
  }

  medians(scenario: string): Medians | undefined {
    const rs = this.runs.get(scenario);
    if (!rs?.length) return undefined;
    const m = (pick: (f: PostcopyFigures) => number | undefined): number => round(median(rs.map(pick).filter((x): x is number => typeof x === 'number')), 3);
    return {
      faults: m((f) => f.faults),
      vcpuBlockedMs: m((f) => (f.vcpuBlocktimeMs?.length ? f.vcpuBlocktimeMs.reduce((a, b) => a + b, 0) / f.vcpuBlocktimeMs.length : undefined)),
      blocktimeMs: m((f) => f.blocktimeMs),
      faultLatencyP99Ms: m((f) => f.faultLatencyP99Ms),
      guestWritesPerSecond: m((f) => f.guestWritesPerSecond),
      noMigrationWritesPerSecond: m((f) => f.noMigrationWritesPerSecond),
    };
  }

  /** One line per scenario with its medians, then preempt against off where both ran. */
  summaries(): Record<string, unknown>[] {
    const out: Record<string, unknown>[] = [];
    for (const [scenario, rs] of this.runs) out.push({ postcopySummary: scenario, runs: rs.length, medians: this.medians(scenario) });
    const off = this.medians('postcopy-hot-2ch');
    const on = this.medians('postcopy-hot-2ch-preempt');
    if (off && on) {
      const ratio = (a: number, b: number): number | null => (b > 0 ? round(a / b, 2) : null);
      const vcpuBlocked = ratio(on.vcpuBlockedMs, off.vcpuBlockedMs);
      const blocktime = ratio(on.blocktimeMs, off.blocktimeMs);
      const progress = ratio(on.guestWritesPerSecond, off.guestWritesPerSecond);
      out.push({
        preemptVsOff: { vcpuBlocked, blocktime, faults: ratio(on.faults, off.faults), guestWritesPerSecond: progress, preemptP99Ms: on.faultLatencyP99Ms },
        // Issue 20's goals: blocked time at most 0.7x, p99 at most 5 ms, progress at least as high.
        goals: {
          blockedAtMost07x: vcpuBlocked !== null && blocktime !== null && vcpuBlocked <= 0.7 && blocktime <= 0.7,
          p99AtMost5ms: on.faultLatencyP99Ms <= 5,
          progressAtLeastOff: progress !== null && progress >= 1,
        },
      });
    }
    return out;
  }
}

function median(xs: number[]): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  const mid = s.length / 2;
  return s.length % 2 ? s[Math.floor(mid)]! : (s[mid - 1]! + s[mid]!) / 2;
}

function round(x: number, digits: number): number {
  const k = 10 ** digits;
  return Math.round(x * k) / k;
}
