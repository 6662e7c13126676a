/**
 * Per-writer latency samples in a SharedArrayBuffer: each writer thread records into its own
 * row (single writer per row, so plain stores suffice; the reader sums them after the
 * writers are stopped or accepts a sample in flight). Row layout (Float64): count, max,
 * total, then the first SAMPLES_PER_WRITER samples.
 */
export const SAMPLES_PER_WRITER = 16384;
const ROW = 3 + SAMPLES_PER_WRITER;

export function latencySamplesBytes(writers: number): number {
  return Math.max(1, writers) * ROW * 8;
}

export interface LatencySummary {
  count: number;
  totalMs: number;
  p50Ms: number;
  p99Ms: number;
  maxMs: number;
  /** Per writer: the sum of its samples. */
  perWriterTotalMs: number[];
}

export class LatencySamples {
  private readonly f: Float64Array;

  constructor(
    sab: SharedArrayBuffer,
    private readonly writers: number,
  ) {
    this.f = new Float64Array(sab);
  }

  /** Writer `w` only. */
  record(w: number, ms: number): void {
    const f = this.f;
    const base = w * ROW;
    const n = f[base]!;
    if (n < SAMPLES_PER_WRITER) f[base + 3 + n] = ms;
    f[base] = n + 1;
    if (ms > f[base + 1]!) f[base + 1] = ms;
    f[base + 2] = f[base + 2]! + ms;
  }

  /** Every sample kept so far (ms), unsorted; a reader may race a writer's newest one. */
  samples(): number[] {
    const f = this.f;
    const out: number[] = [];
    for (let w = 0; w < this.writers; w++) {
      const base = w * ROW;
      const n = Math.min(f[base]!, SAMPLES_PER_WRITER);
      for (let i = 0; i < n; i++) out.push(f[base + 3 + i]!);
    }
    return out;
  }

  summary(): LatencySummary {
    const f = this.f;
    const samples: number[] = [];
    let count = 0;
    let max = 0;
    const perWriterTotalMs: number[] = [];
    for (let w = 0; w < this.writers; w++) {
      const base = w * ROW;
      const n = f[base]!;
      count += n;
      max = Math.max(max, f[base + 1]!);
      perWriterTotalMs.push(r3(f[base + 2]!));
      for (let i = 0; i < Math.min(n, SAMPLES_PER_WRITER); i++) samples.push(f[base + 3 + i]!);
    }
    samples.sort((a, b) => a - b);
    const pct = (q: number): number => (samples.length ? samples[Math.min(samples.length - 1, Math.floor(q * samples.length))]! : 0);
    return { count, totalMs: r3(perWriterTotalMs.reduce((a, b) => a + b, 0)), p50Ms: r3(pct(0.5)), p99Ms: r3(pct(0.99)), maxMs: r3(max), perWriterTotalMs };
  }
}

function r3(x: number): number {
  return Math.round(x * 1000) / 1000;
}
