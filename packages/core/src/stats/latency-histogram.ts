/**
 * Latencies recorded by many threads into one bounded histogram in shared memory: log-scale
 * buckets (HDR-style, 32 per power of two, so a bucket is at most 1/32 = 3.1 % as wide as its
 * values) from 1 us to 2^32 us (71 minutes; longer ones land in the last bucket). Memory is
 * fixed whatever the number of samples, and every sample counts, so p99 is the whole run's.
 *
 * Shared state (one SharedArrayBuffer):
 * - buckets: Uint32 counts, BUCKETS of them, shared by every writer thread;
 * - rows: per writer, Float64 [count, max (ms), total (ms)].
 *
 * Ordering rules:
 * 1. A bucket count is only changed with Atomics.add (any writer thread may hit any bucket:
 *    no increment is lost) and only read with Atomics.load (a reader in another thread, e.g.
 *    a metrics scrape, sees whole counts; a sample in flight is counted or not, never torn).
 * 2. A writer's row has one writer thread (its own), so it uses plain stores; a reader
 *    summing rows while the writers run may miss a sample in flight, as it may in rule 1.
 *    The final report is read after the writers have stopped (their exit orders everything).
 */

/** Sub-buckets per power of two: 2^5 = 32. */
const SUB_BITS = 5;
const SUB = 1 << SUB_BITS;
/** Values below this (us) each have a bucket of their own (1 us wide). */
const LINEAR = 2 * SUB;
/** The largest value (us) told apart; above it everything is in the last bucket. */
const MAX_US = 0xffff_ffff;
/** Buckets: 64 linear, then 32 per power of two from 2^6 to 2^31. */
export const BUCKETS = LINEAR + (31 - SUB_BITS) * SUB;
const ROW = 3;

export function latencyHistogramBytes(writers: number): number {
  return BUCKETS * 4 + Math.max(1, writers) * ROW * 8;
}

/** The bucket of a latency of `us` microseconds. */
export function bucketOf(us: number): number {
  const v = us >= MAX_US ? MAX_US : us > 0 ? Math.floor(us) : 0;
  if (v < LINEAR) return v;
  const shift = 31 - Math.clz32(v) - SUB_BITS;
  return LINEAR + (shift - 1) * SUB + ((v >>> shift) - SUB);
}

/** The values (us) of bucket `i`: [lo, hi). */
export function bucketRange(i: number): { lo: number; hi: number } {
  if (i < LINEAR) return { lo: i, hi: i + 1 };
  const shift = Math.floor((i - LINEAR) / SUB) + 1;
  const sub = ((i - LINEAR) % SUB) + SUB;
  return { lo: sub * 2 ** shift, hi: (sub + 1) * 2 ** shift };
}

export interface LatencySummary {
  count: number;
  totalMs: number;
  /** Percentiles: the upper end of the bucket the rank falls in, at most the maximum. */
  p50Ms: number;
  p99Ms: number;
  maxMs: number;
  /** Per writer: the sum of its latencies. */
  perWriterTotalMs: number[];
}

/** Latencies counted in coarse buckets: `counts[i]` those up to `boundsMs[i]`, the last those above every bound. */
export interface LatencyBuckets {
  boundsMs: number[];
  counts: number[];
  /** The sum of every latency (ms). */
  sumMs: number;
}

export class LatencyHistogram {
  private readonly counters: Uint32Array;
  private readonly rows: Float64Array;

  constructor(
    sab: SharedArrayBuffer,
    private readonly writers: number,
  ) {
    this.counters = new Uint32Array(sab, 0, BUCKETS);
    this.rows = new Float64Array(sab, BUCKETS * 4, Math.max(1, writers) * ROW);
  }

  /** Writer `w`'s thread only (rule 2 for its row). */
  record(w: number, ms: number): void {
    // Rule 1: any thread may hit this bucket.
    Atomics.add(this.counters, bucketOf(ms * 1000), 1);
    const r = this.rows;
    const base = w * ROW;
    r[base] = r[base]! + 1;
    if (ms > r[base + 1]!) r[base + 1] = ms;
    r[base + 2] = r[base + 2]! + ms;
  }

  /** Every bucket's count (rule 1's reader side). */
  counts(): number[] {
    const out = new Array<number>(BUCKETS);
    for (let i = 0; i < BUCKETS; i++) out[i] = Atomics.load(this.counters, i);
    return out;
  }

  /** The largest latency (ms) any writer recorded. */
  maxMs(): number {
    let max = 0;
    for (let w = 0; w < this.writers; w++) max = Math.max(max, this.rows[w * ROW + 1]!);
    return max;
  }

  /**
   * Counts per coarse bucket: `boundsMs` ascending, a latency in the first bucket whose
   * bound it does not exceed, the last slot for everything above the last bound. Exact to
   * within one fine bucket (3 %): a fine bucket goes where its lowest value goes.
   */
  coarse(boundsMs: readonly number[]): number[] {
    const out = new Array<number>(boundsMs.length + 1).fill(0);
    const counts = this.counts();
    let j = 0;
    for (let i = 0; i < BUCKETS; i++) {
      if (counts[i] === 0) continue;
      const lo = bucketRange(i).lo / 1000;
      while (j < boundsMs.length && lo > boundsMs[j]!) j++;
      out[j]! += counts[i]!;
    }
    return out;
  }

  /** coarse() with the sum of every latency, for a report or a Prometheus histogram. */
  buckets(boundsMs: readonly number[]): LatencyBuckets {
    let sumMs = 0;
    for (let w = 0; w < this.writers; w++) sumMs += this.rows[w * ROW + 2]!;
    return { boundsMs: [...boundsMs], counts: this.coarse(boundsMs), sumMs };
  }

  /** The latency (ms) at quantile `q` (0..1] of `counts`, capped at `maxMs`. */
  static quantile(counts: readonly number[], q: number, maxMs: number): number {
    const n = counts.reduce((a, b) => a + b, 0);
    if (n === 0) return 0;
    const rank = Math.max(1, Math.ceil(q * n));
    let seen = 0;
    for (let i = 0; i < counts.length; i++) {
      seen += counts[i]!;
      if (seen >= rank) return Math.min(maxMs, bucketRange(i).hi / 1000);
    }
    return maxMs;
  }

  summary(): LatencySummary {
    const counts = this.counts();
    const max = this.maxMs();
    const perWriterTotalMs: number[] = [];
    let count = 0;
    for (let w = 0; w < this.writers; w++) {
      count += this.rows[w * ROW]!;
      perWriterTotalMs.push(r3(this.rows[w * ROW + 2]!));
    }
    return {
      count,
      totalMs: r3(perWriterTotalMs.reduce((a, b) => a + b, 0)),
      p50Ms: r3(LatencyHistogram.quantile(counts, 0.5, max)),
      p99Ms: r3(LatencyHistogram.quantile(counts, 0.99, max)),
      maxMs: r3(max),
      perWriterTotalMs,
    };
  }
}

function r3(x: number): number {
  return Math.round(x * 1000) / 1000;
}
